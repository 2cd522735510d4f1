"""Shard planning over inventories (issue 27, rbees_core.sharding): one device fits (no
shard), two GPUs of one host (a local split), only two hosts together (an RPC shard),
nothing fits (NO_CAPACITY); and the order among shards: fewest devices, one host, best
link, lending pools only."""

from __future__ import annotations

from rbees_core.planning import DeviceMemory, Host, ModelNeed, NoFit, Plan
from rbees_core.sharding import ShardPlan, plan_shard, split_layers

GIB = 1024 ** 3
#: 30 layers of 0.1 GiB and 0.5 GiB of the rest: 3.5 GiB in all
NEED = ModelNeed(total_bytes=int(3.5 * GIB), layers=30, layer_bytes=GIB // 10)


def cpu(pool: str, gib: float) -> Host:
    return Host(pool, (DeviceMemory("cpu", int(gib * GIB), int(gib * GIB)),))


def test_one_device_that_holds_it_is_no_shard() -> None:
    got = plan_shard(NEED, [cpu("mac", 2), cpu("workstation", 8)])
    assert isinstance(got, Plan) and (got.kind, got.pool_id) == ("cpu", "workstation")


def test_two_gpus_of_one_host_split_locally() -> None:
    gpus = Host("gpu-box", (DeviceMemory("cuda:0", 3 * GIB, 3 * GIB),
                            DeviceMemory("cuda:1", 3 * GIB, 3 * GIB),
                            DeviceMemory("cpu", 1 * GIB, 1 * GIB)))
    got = plan_shard(NEED, [gpus, cpu("mac", 3)])
    assert isinstance(got, Plan) and got.kind == "split" and got.pool_id == "gpu-box"


def test_only_two_hosts_together_shard_over_rpc() -> None:
    got = plan_shard(NEED, [cpu("mac", 2), cpu("workstation", 2.5)])
    assert isinstance(got, ShardPlan), got
    assert {p.pool_id for p in got.parts} == {"mac", "workstation"}
    assert sum(p.layers for p in got.parts) == 30
    # the worker's part holds the rest of the model too; nothing is over what a device has
    main = got.parts[0]
    assert main.bytes == main.layers * NEED.layer_bytes + NEED.rest_bytes
    assert all(p.bytes == p.layers * NEED.layer_bytes + 128 * 2**20 for p in got.remote)
    assert all(p.bytes <= (2.5 if p.pool_id == "workstation" else 2) * GIB for p in got.parts)
    assert abs(sum(got.tensor_split) - 1) < 0.01
    assert got.remote and got.remote[0].pool_id != got.pool_id
    text = got.describe()
    assert text.startswith("shard over ") and "no single device holds it" in text
    assert got.to_dict()["kind"] == "shard"


def test_nothing_fits_is_no_capacity() -> None:
    got = plan_shard(NEED, [cpu("mac", 1), cpu("workstation", 1)])
    assert isinstance(got, NoFit) and got.never
    assert "even with every worker stopped" in got.reason
    # sharding off: the placement planner's own answer
    off = plan_shard(NEED, [cpu("mac", 2), cpu("workstation", 2.5)], sharding=False)
    assert isinstance(off, NoFit)


def test_fewest_devices_first() -> None:
    hosts = [cpu("a", 1.5), cpu("b", 1.5), cpu("c", 1.5), cpu("big", 3)]
    got = plan_shard(NEED, hosts)
    assert isinstance(got, ShardPlan) and len(got.parts) == 2 and "big" in got.pools


def test_devices_of_one_host_before_two_hosts() -> None:
    # a Mac's unified GPU is not split by the placement planner (nothing gained locally
    # on one memory), but its metal and cpu devices shard; that beats another host
    mac = Host("mac", (DeviceMemory("metal:0", 2 * GIB, 2 * GIB),
                       DeviceMemory("cpu", 2 * GIB, 2 * GIB)))
    got = plan_shard(NEED, [mac, cpu("workstation", 2)])
    assert isinstance(got, ShardPlan) and got.pools == ("mac",)


def test_the_best_measured_link_wins() -> None:
    hosts = [cpu("mac", 2.5), cpu("near", 2), cpu("far", 2)]
    links = {frozenset(("mac", "near")): 0.4, frozenset(("mac", "far")): 9.0,
             frozenset(("near", "far")): 9.0}
    got = plan_shard(NEED, hosts, links=links)
    assert isinstance(got, ShardPlan) and set(got.pools) == {"mac", "near"}
    assert got.rtt_ms == 0.4


def test_only_lending_pools_hold_remote_parts() -> None:
    hosts = [cpu("mac", 2), cpu("workstation", 2.5)]
    got = plan_shard(NEED, hosts, lenders={"mac"})
    assert isinstance(got, ShardPlan)
    assert got.pool_id == "workstation" and got.remote[0].pool_id == "mac"
    assert isinstance(plan_shard(NEED, hosts, lenders=()), NoFit)


def test_layers_follow_the_room_and_fit() -> None:
    assert split_layers(NEED, [2 * GIB, 1 * GIB]) == (20, 10)
    assert split_layers(NEED, [GIB, GIB]) is None  # 20 layers fit, 30 asked
    assert split_layers(ModelNeed(GIB), [GIB, GIB]) is None  # no shape: no layers to split
