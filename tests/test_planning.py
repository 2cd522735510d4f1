"""Placement planning (issue 22, item 5): fit, partial offload, split and eviction, as a
pure function over fake inventories.

The inventories are built the way a pool reports itself: GPUs as the NVML probe makes
them (:class:`~rbees_core.api.pool.GpuEntry`, live free memory), the CPU as the cpu probe
does, workers as pool-managerd lists them, turned into a snapshot pool by
:func:`rbees_core.scheduling.snapshot_pool` and into the planner's input by
:func:`rbees_core.planning.host_of`.
"""

from __future__ import annotations

from typing import Any

import pytest

from rbees_core.api.pool import CpuEntry, GpuEntry, PoolState, WorkerEntry
from rbees_core.planning import (
    GPU_OVERHEAD_BYTES,
    DeviceMemory,
    Host,
    ModelNeed,
    NoFit,
    Plan,
    could_ever_fit,
    describe_offload,
    device_bytes,
    evict_for,
    host_of,
    host_plans,
    need_of,
    plan,
)
from rbees_core.scheduling import memory_needed, model_entry, snapshot_pool

GIB = 1024 ** 3
NOW = 1_772_625_600.0

#: an 8B model at 8 bits: 32 layers of 0.25 GiB, 1 GiB besides (9 GiB whole)
SMALL = ModelNeed(9 * GIB, layers=32, layer_bytes=GIB // 4)
#: a 70B-class model at 3 bits: 80 layers of 0.4 GiB, 1.5 GiB besides (33.5 GiB whole)
LARGE = ModelNeed(int(33.5 * GIB), layers=80, layer_bytes=int(0.4 * GIB))


def gpu(index: int, name: str, total_gib: float, free_gib: float | None = None) -> GpuEntry:
    """A GPU as rbees-gpu-nvml reports it: live free memory, nothing reserved."""
    free = total_gib if free_gib is None else free_gib
    return GpuEntry(index=index, uuid=f"GPU-{index:08d}", name=name, backend="cuda",
                    memory_total_bytes=int(total_gib * GIB), memory_free_bytes=int(free * GIB))


def cpu(ram_gib: float, free_gib: float | None = None) -> CpuEntry:
    free = ram_gib if free_gib is None else free_gib
    return CpuEntry(cores=16, ram_total_bytes=int(ram_gib * GIB),
                    ram_free_bytes=int(free * GIB))


def resident(worker_id: str, device: str, gib: float, *, model: str = "other",
             busy: bool = False, state: str = "ready") -> WorkerEntry:
    return WorkerEntry(worker_id=worker_id, model_ref=model, backend="llamacpp", device=device,
                       uri=f"http://127.0.0.1:9000/{worker_id}", pid=1, state=state,  # type: ignore[arg-type]
                       slots_total=4, slots_free=3 if busy else 4,
                       memory_bytes=int(gib * GIB), started_at=NOW - 3600)


def state(pool_id: str, gpus: list[GpuEntry], ram: CpuEntry,
          workers: list[WorkerEntry] = ()) -> PoolState:  # type: ignore[assignment]
    return PoolState(pool_id=pool_id, host=pool_id, gpus=gpus, cpu=ram,
                     workers=list(workers), models=[{"id": "m", "ref": "m"}])


def snap_pool(st: PoolState, idle: dict[str, float] | None = None) -> dict[str, Any]:
    since = idle or {}
    return snapshot_pool(st, idle_since=since.get)


def duo(workers: list[WorkerEntry] = (), free: tuple[float, float] = (24, 12)  # type: ignore[assignment]
        ) -> PoolState:
    """A 24 GB + 12 GB host (an RTX 4090 and an RTX 3060) with 64 GiB of RAM."""
    return state("duo", [gpu(0, "NVIDIA GeForce RTX 4090", 24, free[0]),
                         gpu(1, "NVIDIA GeForce RTX 3060", 12, free[1])], cpu(64), workers)


def small(workers: list[WorkerEntry] = (), free: float = 7.5) -> PoolState:  # type: ignore[assignment]
    """An 8 GB host (an RTX 3070, 0.5 GiB taken by the desktop) with 32 GiB of RAM."""
    return state("small", [gpu(0, "NVIDIA GeForce RTX 3070", 8, free)], cpu(32), workers)


def cpu_only(workers: list[WorkerEntry] = ()) -> PoolState:  # type: ignore[assignment]
    """A host without a GPU: 16 GiB of RAM."""
    return state("cpu-box", [], cpu(16), workers)


def host(st: PoolState, idle: dict[str, float] | None = None, keep: str | None = None):  # type: ignore[no-untyped-def]
    return host_of(snap_pool(st, idle),
                   keep=(lambda w: w.get("model_ref") == keep) if keep else None)


# -- fit, split, partial offload, CPU --------------------------------------------------------

def test_a_model_that_fits_one_gpu_goes_there_whole() -> None:
    chosen = plan(SMALL, [host(duo())])
    assert isinstance(chosen, Plan)
    assert (chosen.kind, chosen.device, chosen.n_gpu_layers, chosen.tensor_split) == \
        ("gpu", "cuda:0", None, None)
    assert chosen.describe() == "" and chosen.evict == ()
    # both GPUs could hold it whole: no split, no offload is offered for either
    assert {d: p.kind for d, p in host_plans(SMALL, host(duo())).items()} == \
        {"cuda:0": "gpu", "cuda:1": "gpu", "cpu": "cpu"}


def test_a_model_larger_than_24_gb_is_split_over_24_and_12() -> None:
    chosen = plan(LARGE, [host(duo())])
    assert isinstance(chosen, Plan)
    assert (chosen.kind, chosen.device, chosen.split_devices) == \
        ("split", "cuda:0", ("cuda:0", "cuda:1"))
    assert chosen.tensor_split == (0.667, 0.333)  # in proportion to free memory
    assert chosen.describe() == "split cuda:0 0.67, cuda:1 0.33"
    assert chosen.n_gpu_layers is None  # every layer on a GPU
    used = dict(chosen.uses)
    assert used["cuda:0"] <= 24 * GIB and used["cuda:1"] <= 12 * GIB
    assert sum(used.values()) >= LARGE.total_bytes


def test_a_policy_that_prefers_partial_offload_keeps_the_second_gpu_free() -> None:
    chosen = plan(LARGE, [host(duo())], prefer=("partial", "split", "cpu"))
    assert isinstance(chosen, Plan)
    assert (chosen.kind, chosen.device) == ("partial", "cuda:0")
    k = (24 * GIB - GPU_OVERHEAD_BYTES) // LARGE.layer_bytes
    assert chosen.n_gpu_layers == k == 59
    assert chosen.describe() == "59 of 80 layers on cuda:0, rest on CPU"
    assert dict(chosen.uses)["cpu"] == LARGE.total_bytes - k * LARGE.layer_bytes


def test_split_follows_free_memory_not_the_boards_size() -> None:
    # 8 GiB of the 4090 taken by something else: 16 and 12 GiB free
    chosen = plan(ModelNeed(int(26 * GIB), layers=64, layer_bytes=int(0.39 * GIB)),
                  [host(duo(free=(16, 12)))])
    assert isinstance(chosen, Plan) and chosen.kind == "split"
    assert chosen.tensor_split == (0.571, 0.429)


def test_partial_offload_on_an_8_gb_gpu() -> None:
    chosen = plan(SMALL, [host(small())])  # 9 GiB whole, 7.5 GiB free
    assert isinstance(chosen, Plan)
    assert (chosen.kind, chosen.device, chosen.n_gpu_layers) == ("partial", "cuda:0", 29)
    assert chosen.describe() == "29 of 32 layers on cuda:0, rest on CPU"
    on_gpu = dict(chosen.uses)["cuda:0"]
    assert on_gpu == 29 * SMALL.layer_bytes + GPU_OVERHEAD_BYTES <= int(7.5 * GIB)


def test_a_policy_that_prefers_the_cpu_over_offloading() -> None:
    chosen = plan(SMALL, [host(small())], prefer=("cpu", "partial"))
    assert isinstance(chosen, Plan) and (chosen.kind, chosen.device) == ("cpu", "cpu")
    assert chosen.n_gpu_layers is None


def test_a_model_of_unknown_shape_fits_whole_or_not_at_all() -> None:
    sized_by_file = ModelNeed(9 * GIB)
    assert set(host_plans(sized_by_file, host(small()))) == {"cpu"}
    assert set(host_plans(ModelNeed(int(33.5 * GIB)), host(duo()))) == {"cpu"}


def test_cpu_only_hosts_take_the_model_whole_in_ram_or_not() -> None:
    chosen = plan(SMALL, [host(cpu_only())])
    assert isinstance(chosen, Plan)
    assert (chosen.kind, chosen.device, chosen.n_gpu_layers, chosen.tensor_split) == \
        ("cpu", "cpu", None, None)
    too_big = plan(LARGE, [host(cpu_only())])
    assert isinstance(too_big, NoFit) and too_big.never
    assert "33.5 GiB" in too_big.reason


def test_partial_offload_needs_the_rest_to_fit_in_ram() -> None:
    tight = state("tight", [gpu(0, "NVIDIA GeForce RTX 3070", 8)], cpu(8, free_gib=1))
    assert host_plans(SMALL, host(tight)) == {}
    assert could_ever_fit(SMALL, host(tight))  # with nothing else running it would
    # three inventories together: the whole-GPU fit wins over offload and the CPU
    chosen = plan(SMALL, [host(cpu_only()), host(small()), host(duo())])
    assert isinstance(chosen, Plan) and (chosen.pool_id, chosen.kind) == ("duo", "gpu")


def test_never_fits_only_when_no_split_or_offload_could_hold_it() -> None:
    huge = ModelNeed(200 * GIB, layers=80, layer_bytes=int(2.4 * GIB))
    assert not could_ever_fit(huge, host(duo()))
    assert could_ever_fit(LARGE, host(duo()))
    assert could_ever_fit(LARGE, host(small()))   # 18 layers on the GPU, the rest in RAM
    assert not could_ever_fit(LARGE, host(cpu_only()))
    result = plan(huge, [host(duo()), host(small()), host(cpu_only())])
    assert isinstance(result, NoFit) and result.never


# -- eviction --------------------------------------------------------------------------------

def test_the_least_recently_used_idle_worker_is_evicted_first() -> None:
    workers = [resident("wa", "cuda:0", 10), resident("wb", "cuda:0", 10)]
    for older, newer in (("wa", "wb"), ("wb", "wa")):
        h = host(duo(workers, free=(4, 12)), idle={older: NOW - 600, newer: NOW - 30})
        p = evict_for(ModelNeed(12 * GIB), h, "cuda:0")
        assert p is not None and p.evict == (older,)
        assert (p.kind, p.device) == ("gpu", "cuda:0")


def test_a_busy_worker_is_never_evicted() -> None:
    workers = [resident("busy", "cuda:0", 10, busy=True), resident("idle", "cuda:0", 10)]
    # the busy one was used longest ago (it knows no idle_since): still only the idle goes
    h = host(duo(workers, free=(4, 12)), idle={"idle": NOW - 5})
    p = evict_for(ModelNeed(12 * GIB), h, "cuda:0")
    assert p is not None and p.evict == ("idle",)
    assert evict_for(ModelNeed(20 * GIB), h, "cuda:0") is None  # would need the busy one
    # the job's own model is never stopped to start it again
    own = host(duo([resident("own", "cuda:0", 10, model="m")], free=(14, 12)), keep="m")
    assert evict_for(ModelNeed(20 * GIB), own, "cuda:0") is None


def test_eviction_comes_only_when_nothing_fits_without_and_records_the_stops() -> None:
    full = [resident("wa", "cuda:0", 3.5), resident("wb", "cuda:0", 3.5)]
    ram_full = state("small", [gpu(0, "NVIDIA GeForce RTX 3070", 8, 0.5)], cpu(8, 1), full)
    chosen = plan(SMALL, [host(ram_full, idle={"wa": NOW - 60, "wb": NOW - 10})])
    assert isinstance(chosen, NoFit) and not chosen.never  # stopping both frees too little
    need = ModelNeed(6 * GIB, layers=32, layer_bytes=GIB // 8)
    chosen = plan(need, [host(ram_full, idle={"wa": NOW - 60, "wb": NOW - 10})])
    assert isinstance(chosen, Plan) and chosen.evict == ("wa", "wb")
    # with one GiB more free, a partial offload starts now and nothing is stopped
    roomy = state("small", [gpu(0, "NVIDIA GeForce RTX 3070", 8, 1.5)], cpu(16), full)
    chosen = plan(need, [host(roomy)])
    assert isinstance(chosen, Plan) and chosen.kind == "partial" and chosen.evict == ()


def test_workers_being_stopped_count_as_freeing() -> None:
    workers = [resident("wa", "cuda:0", 10, state="stopping"), resident("wb", "cuda:0", 10)]
    p = evict_for(ModelNeed(12 * GIB), host(duo(workers, free=(4, 12))), "cuda:0")
    assert p is not None and p.evict == ()  # wait for wa's memory, stop nothing more


# -- accounting: each worker once --------------------------------------------------------------

def test_two_workers_on_one_device_are_accounted_once_each() -> None:
    workers = [resident("wa", "cuda:0", 10), resident("wb", "cuda:0", 10)]
    pool = snap_pool(duo(workers, free=(4, 12)), idle={"wa": NOW - 600, "wb": NOW - 30})
    h = host_of(pool)
    gpu0 = h.device("cuda:0")
    assert gpu0 is not None
    # NVML's free memory already leaves out what both hold: nothing is subtracted again
    assert gpu0.available == 4 * GIB
    # a 12 GiB model needs one of them stopped (4 + 10), not both (as 4 - 20 + 10 would)
    p = evict_for(ModelNeed(12 * GIB), h, "cuda:0")
    assert p is not None and p.evict == ("wa",)
    # a worker listed twice (as rbees-orcd's expected entry and the pool's) is one worker:
    # stopping it frees its 10 GiB once, so 4 + 10 + 10 holds 24 GiB only with both stopped
    pool["workers"].append(dict(pool["workers"][0]))
    h = host_of(pool)
    assert [r.worker_id for r in h.residents] == ["wa", "wb"]
    assert evict_for(ModelNeed(24 * GIB), h, "cuda:0").evict == ("wa", "wb")  # type: ignore[union-attr]
    assert evict_for(ModelNeed(int(24.5 * GIB)), h, "cuda:0") is None


def test_memory_promised_to_a_loading_worker_is_not_available() -> None:
    pool = snap_pool(duo())
    pool["devices"][1]["memory_reserved_bytes"] = 6 * GIB  # a worker loading on cuda:0
    h = host_of(pool)
    assert h.device("cuda:0").available == 18 * GIB  # type: ignore[union-attr]
    chosen = plan(ModelNeed(20 * GIB), [h])
    assert isinstance(chosen, Plan) and chosen.kind == "cpu"


@pytest.mark.parametrize(("job", "entry", "expected"), [
    ({"memory_bytes": 9 * GIB, "memory_layers": 32, "memory_layer_bytes": GIB // 4}, {},
     SMALL),
    ({}, {"memory_bytes": 9 * GIB, "layers": 32, "layer_bytes": GIB // 4}, SMALL),
    # the pool's estimate, for 4 slots (4 GiB of KV cache), rescaled to 1 slot in
    # memory_bytes: 7 GiB of weights in 32 layers and 1 GiB of KV cache (0.25 GiB a layer),
    # 0.5 GiB of other weights and 0.5 GiB of compute buffers
    ({}, {"memory_bytes": 9 * GIB, "memory": {
        "weights_bytes": 15 * GIB // 2, "kv_cache_bytes": 4 * GIB, "overhead_bytes": GIB // 2,
        "layers": 32, "layer_weights_bytes": 7 * GIB // 32, "layer_kv_bytes": GIB // 8}},
     SMALL),
    ({"memory_bytes": 9 * GIB}, {"layers": 32, "layer_bytes": GIB}, ModelNeed(9 * GIB)),
])
def test_the_need_comes_from_the_job_or_the_pools_model_entry(
        job: dict[str, Any], entry: dict[str, Any], expected: ModelNeed) -> None:
    pool = {"pool_id": "p", "models": [{"id": "m", "ref": "m", **entry}]}
    full = {"model": "m", **job}
    assert need_of(full, model_entry(pool, "m"), memory_needed(full, pool)) == expected


def test_a_start_decision_says_how_the_model_is_offloaded() -> None:
    assert describe_offload("cuda:0", 12, None) == "12 layers on cuda:0, rest on CPU"
    assert describe_offload("cuda:0", None, (0.67, 0.33)) == "split cuda:0 0.67, cuda:1 0.33"
    assert describe_offload("cuda:1", None, (0.0, 0.5, 0.5)) == "split cuda:1 0.50, cuda:2 0.50"
    assert describe_offload("cpu", 0, None) == describe_offload("cuda:0", None, None) == ""
    three = Plan("split", "p", "cuda:2", tensor_split=(0.6, 0.4),
                 split_devices=("cuda:2", "cuda:1"))
    assert three.split_by_index() == (0.0, 0.4, 0.6)


def test_the_flags_alone_give_the_bytes_the_plan_takes_on_each_device() -> None:
    """What a pool's preflight or a replayed decision knows: the start's flags."""
    split = plan(LARGE, [host(duo())])
    partial = plan(LARGE, [host(duo())], prefer=("partial",))
    assert isinstance(split, Plan) and isinstance(partial, Plan)
    assert device_bytes(LARGE, split.device, None, split.split_by_index()) == dict(split.uses)
    assert device_bytes(LARGE, partial.device, partial.n_gpu_layers, None) == dict(partial.uses)
    assert device_bytes(LARGE, "cuda:0") == {"cuda:0": LARGE.total_bytes}
    assert device_bytes(ModelNeed(GIB), "cuda:0", 12, None) == {"cuda:0": GIB}  # no shape


def test_a_replayed_split_reserves_its_share_on_each_gpu() -> None:
    from rbees_scheduler_builtin import LeastLoaded

    from rbees_core.replay import replay

    pool = snap_pool(duo())
    pool["models"] = [{"id": "big", "ref": "big", "memory_bytes": LARGE.total_bytes,
                       "layers": LARGE.layers, "layer_bytes": LARGE.layer_bytes}]
    snap = {"now": NOW, "pools": [pool], "throughput": {}}
    (_, verdict), = replay(LeastLoaded().decide, snap, [{"model": "big"}])
    start = verdict.decisions[0]
    assert start.tensor_split == (0.667, 0.333)
    # replay works on a copy: play it on this one to see the reservations
    from rbees_core.replay import apply_verdict

    apply_verdict(snap, {"model": "big"}, verdict)
    reserved = {d["device"]: d["memory_reserved_bytes"] for d in pool["devices"]}
    assert reserved["cpu"] == 0
    assert reserved["cuda:0"] > reserved["cuda:1"] > 10 * GIB
    assert reserved["cuda:0"] + reserved["cuda:1"] >= LARGE.total_bytes


def test_a_backends_estimate_is_a_need() -> None:
    from rbees_core.backend import MemoryEstimate

    estimate = MemoryEstimate(weights_bytes=8 * GIB, kv_cache_bytes=GIB, layers=32,
                              layer_weights_bytes=GIB // 4 - GIB // 32,
                              layer_kv_bytes=GIB // 32, overhead_bytes=0)
    assert ModelNeed.of(estimate) == SMALL
    assert ModelNeed.of(MemoryEstimate(weights_bytes=GIB)).layers == 0  # no shape: whole
    # what a pool's preflight of "--n-gpu-layers 12" on cuda:0 checks there, and in RAM
    assert device_bytes(ModelNeed.of(estimate), "cuda:0", 12) == {
        "cuda:0": 12 * SMALL.layer_bytes + GPU_OVERHEAD_BYTES,
        "cpu": SMALL.total_bytes - 12 * SMALL.layer_bytes}


def test_unified_memory_gpus_hold_a_model_whole_or_not_at_all() -> None:
    """A Mac's GPU shares the host's RAM: offloading part of a model to RAM gains nothing."""
    mac = Host("mac", (DeviceMemory("cpu", 32 * GIB, 6 * GIB),
                       DeviceMemory("metal:0", 32 * GIB, 7 * GIB)))
    assert set(host_plans(SMALL, mac)) == set()
    assert could_ever_fit(SMALL, mac)  # whole, once memory is free


def test_a_start_decision_round_trips_through_its_record() -> None:
    """rbees-orcd records decisions as JSON and ``rbees jobs why`` reads them back."""
    import json

    from rbees_core.scheduling import Decision, describe_decision

    start = Decision("start_worker", pool_id="duo", device="cuda:0", model="big",
                     tensor_split=[0.667, 0.333])
    again = Decision(**json.loads(json.dumps(start.to_dict())))
    assert again == start and again.tensor_split == (0.667, 0.333)
    assert describe_decision(again) == ("start a worker for big on cuda:0 of pool duo "
                                        "(split cuda:0 0.67, cuda:1 0.33)")


def test_a_model_larger_than_one_gpu_is_downloaded_where_it_can_be_split() -> None:
    """Pull on first use: the pool whose GPUs can hold it split (or in part) is chosen."""
    from rbees_core.pulls import download_choice

    duo_pool, small_pool = snap_pool(duo()), snap_pool(small())
    job = {"model": "big", "memory_bytes": LARGE.total_bytes, "memory_layers": LARGE.layers,
           "memory_layer_bytes": LARGE.layer_bytes}
    assert download_choice(job, [small_pool, duo_pool]) == ("duo", {
        "small": "pool duo was chosen to download it"})
    # of unknown shape, it fits only the RAM of the duo host, whole
    whole = {"model": "big", "memory_bytes": LARGE.total_bytes}
    assert download_choice(whole, [small_pool, duo_pool])[0] == "duo"
    assert download_choice(whole, [small_pool])[0] is None


def test_a_pools_own_estimate_places_a_70b_class_model_split() -> None:
    """End to end over the real shapes: a pool reports its model with the backend's
    estimate (``models[].memory``, for 4 slots of 4096 tokens), rbees-orcd's snapshot sizes
    a worker of one slot by it, and the default policy splits the model over 24 + 12 GB."""
    from rbees_scheduler_builtin import LeastLoaded

    from rbees_core.backend import MemoryEstimate
    from rbees_core.scheduling import Snapshot

    kv_token = 80 * 2 * 1024 * 2  # f16 K and V of one token, 80 layers of 1024 KV columns
    estimate = MemoryEstimate(
        weights_bytes=int(31.5 * GIB), kv_cache_bytes=kv_token * 4096 * 4,
        layers=80, layer_weights_bytes=int(0.38 * GIB), layer_kv_bytes=kv_token * 4096 * 4 // 80,
        kv_token_bytes=kv_token, slots=4, ctx=4096)
    st = duo()
    st = PoolState(pool_id=st.pool_id, host=st.host, gpus=st.gpus, cpu=st.cpu, workers=[],
                   models=[{"id": "big", "ref": "hf:big/big-Q3_K_M.gguf",
                            "memory": estimate.to_dict()}])
    pool = snapshot_pool(st, ctx=4096)
    entry = model_entry(pool, "big")
    assert isinstance(entry, dict) and entry["memory_bytes"] < estimate.total_bytes  # 1 slot
    need = need_of({"model": "big"}, entry, memory_needed({"model": "big"}, pool))
    assert need.layers == 80 and need.total_bytes == entry["memory_bytes"]
    verdict = LeastLoaded().decide(Snapshot({"now": NOW, "job": {"job_id": "j", "model": "big"},
                                             "queue": [], "pools": [pool], "throughput": {}}))
    start = verdict.decisions[0]
    assert (start.action, start.device, start.tensor_split) == \
        ("start_worker", "cuda:0", (0.667, 0.333)), verdict
