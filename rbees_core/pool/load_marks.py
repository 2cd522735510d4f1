"""Models that can never load here: counted, marked, refused, cleared (pool-managerd).

pool-managerd is the one owner of these marks: it sees every load failure of its workers and
every download. A start of a model fails to load when the preflight finds the file unreadable
(``MODEL_LOAD_FAILED``: not a GGUF file) or when its worker ends before it is ready (exit,
start timeout); ``[pool] max_load_failures`` (default 3) such failures in a row mark the
model failed on this pool, with the last reason (the worker's own ``load_failed`` error,
llama.cpp's message). A marked model is refused at once (:class:`ModelMarkedFailedError`, 409
``MODEL_LOAD_FAILED``), reported in ``/v2/state`` and heartbeats (``failed_models``) so that
rbees-orcd neither starts it here nor keeps its jobs waiting, and kept across restarts in
``$RBEES_HOME/pool/failed_models.json``. A worker that gets ready resets the count; a new
download of the model, or ``POST /v2/models/retry`` (``rbees models retry``), clears the mark.

Marks are keyed by the reference as it was asked for (``smollm2``, ``file:/m/x.gguf``); a
catalog id and its sources' references name one model (:meth:`LoadMarks.key`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs

from rbees_core.api.common import clip
from rbees_core.api.pool import FailedModel
from rbees_core.config import rbees_home
from rbees_core.errors import ModelLoadError
from rbees_core.files import write_private

#: worker log events that carry the load error (rbees-workerd's ``load_failed``)
LOAD_EVENTS = ("load_failed",)


class ModelMarkedFailedError(ModelLoadError):
    """The model failed to load too often on this pool; nothing is started for it until
    the mark is cleared. A preflight failure like the others: 409, nothing spawned."""

    status = 409


def marks_path() -> Path:
    return rbees_home() / "pool" / "failed_models.json"


def load_reason(log_tail: str) -> str | None:
    """The last load error a worker logged (``CODE: message``), from its log's tail."""
    reason = None
    for line in log_tail.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") in LOAD_EVENTS:
            reason = f"{record.get('code', 'MODEL_LOAD_FAILED')}: {record.get('message', '')}"
    return reason


def read_marks() -> list[FailedModel]:
    """The marks pool-managerd keeps under this ``$RBEES_HOME`` (for ``rbees-pool status``;
    only pool-managerd changes them)."""
    return LoadMarks(1).listed()


class LoadMarks:
    """Failed starts per model and the marks they lead to. ``canon`` maps a reference to
    the name it shares with its aliases (the catalog id); identity when not given."""

    def __init__(self, limit: int, *, path: Path | None = None,
                 canon: Callable[[str], str] | None = None) -> None:
        self.limit = limit
        self.path = path or marks_path()
        self.canon = canon or (lambda ref: ref)
        self.failures: dict[str, int] = {}
        self.marks: dict[str, FailedModel] = self._read()

    def _read(self) -> dict[str, FailedModel]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            # a reason written before reasons were cut (it would get heartbeats refused)
            return {m["model_ref"]: FailedModel(**{**m, "reason": clip(m["reason"])})
                    for m in data}
        except (OSError, ValueError, TypeError, KeyError):
            return {}

    def _write(self) -> None:
        write_private(self.path, json.dumps([attrs.asdict(m) for m in self.marks.values()],
                                            indent=2) + "\n")

    def key(self, ref: str) -> str:
        return self.canon(ref)

    def mark_of(self, ref: str) -> FailedModel | None:
        """The mark of ``ref`` (or of a reference naming the same model), if any."""
        key = self.key(ref)
        return next((m for k, m in self.marks.items() if self.key(k) == key), None)

    def check(self, ref: str) -> None:
        """Raise :class:`ModelMarkedFailedError` when ``ref`` is marked. Called by
        pool-managerd's worker start before its preflight."""
        mark = self.mark_of(ref)
        if mark is not None:
            raise ModelMarkedFailedError(
                f"{ref} failed to load {mark.attempts} times on this pool and is marked "
                f"failed: {mark.reason} (clear it with `rbees models retry {ref}` or a new "
                "download)", details={"failed_model": attrs.asdict(mark)})

    def failed(self, ref: str, reason: str) -> FailedModel | None:
        """Count a failed start of ``ref``; the new mark when this one reached the limit."""
        key = self.key(ref)
        n = self.failures[key] = self.failures.get(key, 0) + 1
        if n < self.limit:
            return None
        mark = FailedModel(model_ref=ref, attempts=n, reason=clip(reason), marked_at=time.time())
        self.marks[ref] = mark
        self._write()
        return mark

    def loaded(self, ref: str) -> None:
        """A worker of ``ref`` got ready: its failures so far do not count any more."""
        self.failures.pop(self.key(ref), None)

    def clear(self, refs: Iterable[str]) -> list[FailedModel]:
        """Clear the marks (and counts) of the models ``refs`` name; returns those cleared."""
        keys = {self.key(r) for r in refs}
        cleared = [m for k, m in self.marks.items() if self.key(k) in keys]
        for key in keys:
            self.failures.pop(key, None)
        if cleared:
            for mark in cleared:
                self.marks.pop(mark.model_ref, None)
            self._write()
        return cleared

    def listed(self) -> list[FailedModel]:
        return list(self.marks.values())


def catalog_canon(pm: Any) -> Callable[[str], str]:
    """``ref -> catalog id`` (the ref itself when the catalog does not know it)."""
    from rbees_core.catalog import configured_catalog
    from rbees_core.errors import RbeesError

    try:
        catalog = configured_catalog(pm)
    except RbeesError:
        return lambda ref: ref

    def canon(ref: str) -> str:
        entry = catalog.get(ref) or catalog.by_source(ref)
        return entry.id if entry is not None else ref

    return canon


__all__ = ["LoadMarks", "ModelMarkedFailedError", "catalog_canon", "load_reason", "marks_path",
           "read_marks"]
