"""Steps of tls.feature: the lab over HTTPS, a client with the wrong CA."""

from __future__ import annotations

import shlex
from typing import Any

from pytest_bdd import given, parsers, then, when
from world import World

from rbees_core.testing.hosts import ORCHESTRATOR


@given(parsers.parse("the cluster is up over TLS: rbees-orcd on blep, pool-managerd on mac "
                     "and workstation"))
def cluster_up_over_tls(world: World, ctx: dict[str, Any]) -> None:
    ctx["tls"] = True  # the next scenario gets the lab's plain daemons back
    world.ensure_cluster(tls=True)


@then("every pool and worker the orchestrator knows has an https URL")
def every_url_https(world: World) -> None:
    pools = world.http("GET", f"{world.blep.orcd_url}/v2/pools", timeout=10).json()["pools"]
    assert {p["pool_id"] for p in pools} >= {"mac", "workstation"}, pools
    urls = [p["url"] for p in pools] + [w["uri"] for p in pools for w in p["workers"]]
    assert len(urls) >= 4, urls  # each pool and at least one worker on each
    assert all(u.startswith("https://") for u in urls), urls


@given("a CA file on blep that signed none of the lab's certificates")
def other_ca(world: World, ctx: dict[str, Any]) -> None:
    from rbees_core.tls_ca import issue

    ctx["other_ca"] = str(issue(world.root / "other-ca", "elsewhere", ["elsewhere"], []).ca)


@when(parsers.re(r'blep runs "(?P<command>[^"]+)" with RBEES_CA_FILE set to it$'))
def blep_runs_with_ca(world: World, ctx: dict[str, Any], command: str) -> None:
    argv = shlex.split(command)
    host = world.host(ORCHESTRATOR)
    ctx["done"] = host.run(argv[0], *argv[1:], env=world.blep_env(RBEES_CA_FILE=ctx["other_ca"]))


@when(parsers.parse('{count:d} jobs pinned to pool "{pool}" are submitted'))
def pinned_jobs(world: World, ctx: dict[str, Any], count: int, pool: str) -> None:
    ids = []
    for i in range(count):
        got = world.http("POST", f"{world.blep.orcd_url}/v2/tasks", timeout=30, json={
            "model": "smollm2", "prompt": f"Number {i}:", "max_tokens": 3,
            "placement": {"pool": pool}})
        assert got.status_code == 202, got.text
        ids.append(got.json()["job_id"])
    ctx["job_ids"] = ids
