"""Steps of sharding (issue 27): pools that lend a device over llama.cpp's RPC backend, a
worker sharded across two hosts through the lender's gateway, and what a cut link does."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from pytest_bdd import given, parsers, then, when
from steps_jobs import events, submit
from world import World, wait_until

from rbees_core.auth import pool_control_token
from rbees_core.testing import parse_sse
from rbees_core.testing.hosts import POOLS
from rbees_core.testing.processes import find_free_port

MIB = 2**20
PROMPT = "The three most useful things a honey bee does are"
_unsharded: dict[str, str] = {}


@given("the cluster is up with pools that lend over RPC and hold SmolLM2 on neither alone")
def lending_cluster(world: World, request: pytest.FixtureRequest) -> None:
    world.ensure_cluster()
    limit = memory_limit(world)
    for name in POOLS:
        world.kill(f"pool:{name}", signal.SIGTERM)
        world.start_pool(name, RBEES_POOL_RPC="true", RBEES_POOL_MEMORY_LIMIT=str(limit),
                         RBEES_RPC_DEAD_LINK_S="0.5")  # a heartbeat of this lab

    def back_to_plain() -> None:  # the next feature's pools lend nothing
        for name in POOLS:
            world.kill(f"pool:{name}", signal.SIGTERM)

    request.addfinalizer(back_to_plain)
    wait_until(lambda: all(world.pools().get(n) == "ready" for n in POOLS), 30,
               "both lending pools ready in the orchestrator")


def memory_limit(world: World) -> int:
    """Bytes between what a worker of SmolLM2 holding half of its layers needs and what a
    whole one needs, by the pools' own estimate: it fits on neither pool alone."""
    from rbees_core.backend import MemoryEstimate
    from rbees_core.planning import ModelNeed
    from rbees_core.sharding import local_bytes

    state = world.http("GET", f"{world.host('workstation').pool_url}/v2/state").json()
    model = next(m for m in state["models"] if "smollm2" in str(m.get("ref")).lower())
    estimate = MemoryEstimate.from_dict(model["memory"])
    assert estimate is not None, model
    need = ModelNeed.of(estimate)
    half, whole = local_bytes(need, (1, 1)), need.total_bytes
    assert half < whole - 8 * MIB, (half, whole)
    print(f"MEASURED: SmolLM2 needs {whole / MIB:.0f} MiB whole, {half / MIB:.0f} MiB for "
          "half of its layers; each pool's limit is between")
    return (half + whole) // 2


@given("the lab's links are real (network namespaces)")
def real_links(world: World) -> None:
    """In loopback mode a cut link is a frozen pool; the kernel of the machine still
    acknowledges what the worker sends through the tunnel to the frozen gateway, so no
    link dies and the sharded job waits instead of failing: only netns mode shows a cut."""
    if world.lab.mode != "netns":
        pytest.skip("a cut link needs the lab's network namespaces (RBEES_BDD_MODE=netns)")


def servers(world: World, name: str) -> dict[str, dict[str, Any]]:
    state = world.http("GET", f"{world.host(name).pool_url}/v2/state", timeout=10).json()
    return {s["server_id"]: s for s in state["rpc_servers"]}


@given("mac lends its CPU over RPC")
def lend(world: World, ctx: dict[str, Any]) -> None:
    ready = [s for s in servers(world, "mac").values() if s["state"] == "ready"]
    if not ready:
        answer = world.http("POST", f"{world.host('mac').pool_url}/v2/rpc/start",
                            json={"device": "cpu", "memory_bytes": 100 * MIB, "threads": 1})
        assert answer.status_code == 202, answer.text
        sid = answer.json()["server_id"]

        def up() -> dict[str, Any] | None:
            entry = servers(world, "mac")[sid]
            assert entry["state"] != "failed", entry
            return entry if entry["state"] == "ready" else None

        ready = [wait_until(up, 60, "mac's RPC server ready")]
    ctx["rpc"] = ready[0]


def connect_from(world: World, name: str, host: str, port: int) -> bool:
    """Whether a TCP connection from host ``name`` to ``host:port`` is accepted."""
    code = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])),"
            " timeout=3).close()\nexcept OSError:\n sys.exit(1)")
    argv = [*world.host(name).prefix(), sys.executable, "-c", code, host, str(port)]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


@then("workstation cannot connect to mac's RPC server")
def rpc_port_closed(world: World, ctx: dict[str, Any]) -> None:
    host, _, port = ctx["rpc"]["endpoint"].rpartition(":")
    assert host == "127.0.0.1"
    if world.lab.mode == "netns":  # mac's address and its loopback, from workstation
        assert not connect_from(world, "workstation", world.host("mac").address, int(port))
        assert not connect_from(world, "workstation", "127.0.0.1", int(port))
        gateway = ctx["rpc"]["tunnel"].split("//", 1)[1].split("/", 1)[0]
        ghost, _, gport = gateway.rpartition(":")
        assert connect_from(world, "workstation", ghost, int(gport))  # the gateway answers


@then("workstation gets through mac's gateway with mac's token only")
def gateway_token(world: World, ctx: dict[str, Any]) -> None:
    code = ("import asyncio,sys\nfrom rbees_core.rpc_tunnel import LocalEnd\n"
            "async def main():\n await LocalEnd(sys.argv[1], sys.argv[2]).start()\n"
            "asyncio.run(main())")

    def attempt(token: str) -> subprocess.CompletedProcess[str]:
        argv = [*world.host("workstation").prefix(), sys.executable, "-c", code,
                ctx["rpc"]["tunnel"], token]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              env=world.host("workstation").env())

    ok = attempt(pool_control_token(world.token, "mac"))
    assert ok.returncode == 0, ok.stderr
    refused = attempt("not-the-token")
    assert refused.returncode != 0 and "bad proof" in refused.stderr, refused.stderr


@then("neither pool starts SmolLM2 whole")
def whole_refused(world: World) -> None:
    for name in POOLS:
        answer = world.http("POST", f"{world.host(name).pool_url}/v2/workers/start",
                            json={"model_ref": "smollm2", "device": "cpu", "threads": 1})
        assert answer.status_code == 409, answer.text
        assert answer.json()["error"]["code"] == "INSUFFICIENT_RAM"


@given("workstation starts a worker of SmolLM2 sharded onto mac")
@when("workstation starts a worker of SmolLM2 sharded onto mac")
def start_sharded(world: World, ctx: dict[str, Any]) -> None:
    lend(world, ctx)
    url = world.host("workstation").pool_url
    answer = world.http("POST", f"{url}/v2/workers/start", json={
        "model_ref": "smollm2", "device": "cpu", "threads": 1, "tensor_split": [1, 1],
        "rpc": [ctx["rpc"]["tunnel"]], "rpc_token": pool_control_token(world.token, "mac")})
    assert answer.status_code == 202, answer.text
    wid = answer.json()["worker_id"]

    def ready() -> bool:
        entry = world.http("GET", f"{url}/v2/workers/{wid}", timeout=10).json()
        assert entry["state"] not in ("failed", "stopped"), entry
        return bool(entry["state"] == "ready")

    wait_until(ready, 120, "the sharded worker ready")
    ctx["sharded_worker"] = wid


@when(parsers.parse('a greedy job for SmolLM2 runs on pool "{pool}"'))
@when("a greedy job for SmolLM2 runs on no pool in particular")
def greedy_job(world: World, ctx: dict[str, Any], pool: str | None = None) -> None:
    placement = {"placement": {"pool": pool}} if pool else {}
    got = submit(world, {"model": "smollm2", "prompt": PROMPT, "max_tokens": 16,
                         "temperature": 0, "seed": 1, **placement})
    assert got.status_code == 202, got.text
    ctx["job_id"] = got.json()["job_id"]
    frames = events(world, ctx["job_id"])
    assert frames[-1][1] == "end", frames[-3:]
    ctx["text"] = "".join(d["t"] for _, e, d in frames if e == "token")


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def unsharded_text() -> str:
    """The same prompt on one rbees-workerd of this machine: no limit, no shard."""
    if "text" not in _unsharded:
        port = find_free_port()
        exe = str(Path(sys.executable).with_name("rbees-workerd"))
        proc = subprocess.Popen([exe, "--worker-id", "reference", "--port", str(port),
                                 "--threads", "1"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: _ready(url), 120, "the reference worker")
            reply = httpx.post(f"{url}/v2/execute", json={
                "job_id": "reference", "prompt": PROMPT, "max_tokens": 16,
                "temperature": 0, "seed": 1}, timeout=120)
            _unsharded["text"] = "".join(d["t"] for _, e, d in parse_sse(reply.text)
                                         if e == "token")
        finally:
            proc.terminate()
            proc.wait(30)
    return _unsharded["text"]


@then("its text is the unsharded text of the same prompt")
def same_text(ctx: dict[str, Any]) -> None:
    expected = unsharded_text()
    print(f"MEASURED: sharded {ctx['text']!r} / unsharded {expected!r}")
    assert ctx["text"] == expected and expected


@given("the job's why names the shard over mac and workstation")
@then("the job's why names the shard over mac and workstation")
def why_shard(world: World, ctx: dict[str, Any]) -> None:
    answer = world.http("GET", f"{world.blep.orcd_url}/v2/tasks/{ctx['job_id']}/decision",
                        timeout=10).json()
    reasons = [d.get("reason") or "" for r in answer["decisions"] for d in r["decisions"]]
    shard = next((r for r in reasons if r.startswith("shard over")), None)
    print(f"MEASURED: why: {shard}")
    assert shard is not None and "mac/cpu" in shard and "workstation/cpu" in shard, answer
