"""Replay of recorded decisions (issue 28, item 2): every decision keeps the snapshot it was
made from, compactly; re-deciding them with the policy that made them reproduces each one
exactly, another policy reports what it would have changed; the snapshots are pruned past
their retention; a live rbees-orcd's decision replays to itself.

The fixture store is a day of decisions (:func:`rbees_core.testing.decisions.record_day`:
800 jobs on a GPU box, a Mac and a NAS, least-loaded deciding), made once per module.
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from rbees_scheduler_builtin.policies import Binpack, LeastLoaded, Spread

from rbees_core.errors import InvalidParamsError
from rbees_core.log import Logger
from rbees_core.orchestrator.decisions import (
    Retention,
    decode_snapshot,
    encode_snapshot,
    parse_span,
    recorded,
)
from rbees_core.orchestrator.store import Store
from rbees_core.replay import change_of, rerun
from rbees_core.testing.cluster import Cluster
from rbees_core.testing.decisions import MIDNIGHT, record_day, three_pools

BIN = Path(sys.executable).parent
EXAMPLES = Path(__file__).resolve().parents[1] / "schedulers" / "examples"


class Clock:
    def __init__(self) -> None:
        self.now = MIDNIGHT

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    db = tmp_path_factory.mktemp("replay") / "orcd.sqlite3"
    clock = Clock()
    with Store(db, clock=clock) as store:
        records = record_day(store, clock, LeastLoaded().decide)
    yield db, records


def _stored(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    try:
        page = recorded(lambda sql, args: conn.execute(sql, args).fetchall(), since=0.0,
                        limit=1000)
        out = list(page["decisions"])
        while page["next_cursor"]:
            page = recorded(lambda sql, args: conn.execute(sql, args).fetchall(), since=0.0,
                            limit=1000, cursor=page["next_cursor"])
            out += page["decisions"]
        return out
    finally:
        conn.close()


def test_the_day_is_a_day_of_real_scheduling(day: tuple[Path, list[dict[str, Any]]]) -> None:
    _, records = day
    actions = [d["action"] for r in records for d in r["decision"]["decisions"]]
    assert len(records) > 1000
    for action in ("dispatch", "wait", "start_worker", "stop_worker"):
        assert action in actions  # placements, waits and evictions
    assert records[-1]["decided_at"] - records[0]["decided_at"] > 20 * 3600


def test_snapshots_take_under_2_kb_per_decision(day: tuple[Path, list[dict[str, Any]]]
                                                ) -> None:
    db, records = day
    conn = sqlite3.connect(db)
    sizes = [n for (n,) in conn.execute("SELECT length(snapshot) FROM decisions "
                                        "WHERE snapshot IS NOT NULL")]
    conn.close()
    assert len(sizes) == len(records)
    mean = statistics.mean(sizes)
    raw = statistics.mean(len(json.dumps(r["snapshot"])) for r in records)
    print(f"snapshot: {mean:.0f} B per decision on average (max {max(sizes)}), "
          f"{raw:.0f} B as JSON")
    assert mean < 2048


def test_the_store_gives_back_every_snapshot_as_recorded(
        day: tuple[Path, list[dict[str, Any]]]) -> None:
    db, records = day
    stored = _stored(db)  # paged 1,000 at a time, by time (then job id: a moment's)
    records = sorted(records, key=lambda r: (r["decided_at"], r["job_id"], r["decision_id"]))
    assert [(r["job_id"], r["decision_id"]) for r in stored] == \
        [(r["job_id"], r["decision_id"]) for r in records]
    assert all(a["snapshot"] == b["snapshot"] and a["decision"] == b["decision"]
               for a, b in zip(stored, records, strict=True))


def test_pages_of_large_snapshots_are_shorter(day: tuple[Path, list[dict[str, Any]]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from rbees_core.orchestrator import decisions

    db, records = day
    monkeypatch.setattr(decisions, "MAX_PAGE_BYTES", 40_000)  # some 30 decisions a page
    conn = sqlite3.connect(db)
    page = recorded(lambda sql, args: conn.execute(sql, args).fetchall(), since=0.0,
                    limit=1000)
    conn.close()
    assert 10 < len(page["decisions"]) < 100 and page["next_cursor"]
    assert len(_stored(db)) == len(records)  # every page, cursor after cursor


def test_the_same_policy_reproduces_every_decision(day: tuple[Path, list[dict[str, Any]]]
                                                   ) -> None:
    db, _ = day
    result = rerun(LeastLoaded().decide, _stored(db))
    summary = result["summary"]
    assert summary["decisions"] > 1000
    assert summary["exact"] == summary["same"] == summary["decisions"]
    assert summary["jobs_changed"] == 0


@pytest.mark.parametrize("other", [Spread, Binpack])
def test_another_policy_reports_what_it_would_change(
        day: tuple[Path, list[dict[str, Any]]], other: Any) -> None:
    db, _ = day
    result = rerun(other().decide, _stored(db))
    summary = result["summary"]
    assert summary["policy"] == other.name
    assert summary["exact"] == 0  # its name is in every verdict
    changed = [r for r in result["rows"] if r["change"]]
    assert changed and summary["jobs_changed"] == len({r["job_id"] for r in changed})
    assert sum(summary[k] for k in ("same", "placement", "wait_avoided", "wait_added",
                                    "eviction", "other")) == summary["decisions"]
    row = changed[0]
    assert row["recorded"]["policy"] == "least-loaded"
    assert row["replayed"]["policy"] == other.name
    assert (row["recorded"]["action"], row["recorded"]["target"]) != \
        (row["replayed"]["action"], row["replayed"]["target"]) or row["change"] == "other"


def test_change_of_names_what_changed() -> None:
    dispatch = [{"action": "dispatch", "pool_id": "p", "worker_id": "w1"}]
    wait = [{"action": "wait", "reason": "busy"}]
    assert change_of(dispatch, [{**dispatch[0], "reason": "other words"}]) is None
    assert change_of(dispatch, [{**dispatch[0], "worker_id": "w2"}]) == "placement"
    assert change_of(wait, dispatch) == "wait_avoided"
    assert change_of(dispatch, wait) == "wait_added"
    stop = [{"action": "stop_worker", "pool_id": "p", "worker_id": "w9"}, *wait]
    assert change_of(wait, stop) == "eviction"
    # a wait rbees-orcd put in place of the policy's start (a crashing model backed off)
    start = {"action": "start_worker", "pool_id": "gpu-box", "device": "cuda:0",
             "model": "smollm2"}
    snap = {"now": 1.0, "job": {"job_id": "j", "model": "smollm2"}, "queue": [], "pools": []}
    held = {"policy": "p", "decisions": [{"action": "wait", "reason": "the worker for "
            "smollm2 on gpu-box crashed 3 time(s) in a row (exit 1): restart backed off, "
            "4.0 s left"}]}

    def decide(_: Any) -> Any:
        from rbees_core.scheduling import Decision, Verdict

        return Verdict("p", [Decision(**start)])

    result = rerun(decide, [{"job_id": "j", "decision": held, "snapshot": snap}])
    assert result["rows"][0]["held"] and result["summary"]["held"] == 1


def test_the_cli_replays_a_state_database(day: tuple[Path, list[dict[str, Any]]],
                                         tmp_path: Path) -> None:
    db, records = day
    env = {**os.environ, "COLUMNS": "200", "RBEES_HOME": str(tmp_path)}

    def replay(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "rbees"), "scheduler", "replay", "--db", str(db),
                               "--since", "3650d", *args], capture_output=True, text=True,
                              env=env, timeout=300)

    same = replay("--format", "json")
    assert same.returncode == 0, same.stderr
    summary = json.loads(same.stdout)["summary"]
    assert summary["exact"] == summary["decisions"] == len(records)
    other = replay("--policy", "spread")
    assert other.returncode == 0, other.stderr
    lines = other.stdout.splitlines()
    assert lines[0].split() == ["DECIDED_AT", "JOB_ID", "MODEL", "RECORDED", "REPLAYED",
                                "CHANGE"]
    assert f"{len(records)} decisions of " in lines[-1] and "replayed with spread" in lines[-1]
    assert any(" placement" in line or "wait_" in line for line in lines[1:-1])
    script = replay("--script", str(EXAMPLES / "low_power.star"), "--format", "json")
    assert script.returncode == 0, script.stderr
    assert json.loads(script.stdout)["summary"]["decisions"] == len(records)
    both = replay("--policy", "spread", "--script", "x.star")
    assert both.returncode != 0 and "not both" in both.stderr
    junk = tmp_path / "junk.sqlite3"
    junk.write_text("not a database")
    refused = subprocess.run([str(BIN / "rbees"), "scheduler", "replay", "--db", str(junk)],
                             capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("rbees: error: --db: ") and "not a database" in \
        refused.stderr


async def test_retention_drops_old_snapshots_and_keeps_the_decisions(tmp_path: Path) -> None:
    clock = Clock()
    with Store(tmp_path / "orcd.sqlite3", clock=clock) as store:
        records = record_day(store, clock, LeastLoaded().decide, jobs=40)
        middle = records[len(records) // 2]["decided_at"]
        retention = Retention(store.write_async, keep_s=3600.0, log=Logger("test"))
        dropped = await retention.prune(now=middle + 3600.0)
        kept = recorded(store.query, since=0.0, limit=1000)["decisions"]
        assert dropped == len([r for r in records if r["decided_at"] < middle])
        assert len(kept) == len(records) - dropped
        assert all(r["decided_at"] >= middle for r in kept)
        first = records[0]
        assert store.decisions(first["job_id"])[0]["policy"] == "least-loaded"  # why: kept
        forever = Retention(store.write_async, keep_s=None, log=Logger("test"))
        assert await forever.prune(now=time.time() + 1e9) == 0
        store.keep_snapshots = False  # decision_retention = "0": none is even encoded
        await store.record_decision_async(first["job_id"], first["decision"],
                                          first["snapshot"])
        assert store.query("SELECT snapshot FROM decisions WHERE job_id = ? ORDER BY "
                           "decision_id DESC LIMIT 1", (first["job_id"],)) == [(None,)]


def test_encoding_and_spans() -> None:
    snap = {"now": 1.5, "pools": [{"pool_id": "p", "workers": []}], "queue": []}
    assert decode_snapshot(encode_snapshot(snap)) == snap
    for data in ({"now": 1}, {"pools": []}, {"pools": [{"pool_id": "p", "workers": [1]}]}):
        assert decode_snapshot(encode_snapshot(data)) == data
    many = {"now": 2.0, "pools": [{**pool, "pool_id": f"{pool['pool_id']}-{n}"}
                                  for n in range(400) for pool in three_pools()]}
    assert decode_snapshot(encode_snapshot(many)) == many  # compressed faster: 1,200 pools
    with pytest.raises(ValueError, match="upgrade rbees"):
        decode_snapshot(b"\x09abc")
    assert parse_span("7d", field="x") == 7 * 86400
    assert parse_span("1h30m", field="x") == 5400
    assert parse_span("90", field="x") == 90
    for bad in ("", "7 days", "-1", True, "d"):
        with pytest.raises(InvalidParamsError):
            parse_span(bad, field="x")


def test_a_live_decision_replays_to_itself(rbees_cluster: Cluster) -> None:
    since = time.time() - 60
    job = rbees_cluster.submit()
    events = rbees_cluster.events(job["job_id"])
    assert events[-1][1] == "end", events
    answer = httpx.get(f"{rbees_cluster.url}/v2/decisions", params={"since": since},
                       timeout=30)
    assert answer.status_code == 200, answer.text
    mine = [r for r in answer.json()["decisions"] if r["job_id"] == job["job_id"]]
    assert mine, answer.json()
    snapshot = mine[0]["snapshot"]
    assert snapshot["job"]["job_id"] == job["job_id"] and snapshot["pools"]
    result = rerun(LeastLoaded().decide, mine)
    assert result["summary"]["exact"] == len(mine), result["rows"]
    other = httpx.get(f"{rbees_cluster.url}/v2/tasks/{job['job_id']}/replay",
                      params={"policy": "spread"}, timeout=30)
    assert other.status_code == 200, other.text
    body = other.json()
    assert body["job_id"] == job["job_id"] and body["summary"]["policy"] == "spread"
    assert body["rows"][0]["recorded"]["policy"] == "least-loaded"
    default = httpx.get(f"{rbees_cluster.url}/v2/tasks/{job['job_id']}/replay", timeout=30)
    assert default.status_code == 200, default.text  # the first other policy, by name
    assert default.json()["policy"] == "binpack" and "spread" in default.json()["policies"]
    unknown = httpx.get(f"{rbees_cluster.url}/v2/tasks/{job['job_id']}/replay",
                        params={"policy": "no-such-policy"}, timeout=30)
    assert unknown.status_code == 400 and "binpack" in unknown.text, unknown.text
    cli = rbees_cluster.rbees("scheduler", "replay", "--since", "1h", "--format", "json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["summary"]["exact"] >= 1
