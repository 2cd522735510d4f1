"""The world the features run in: the lab's hosts (rbees_core.testing.hosts) and the real
programs started on them, shared by every scenario of a run and started when first needed.

Step definitions live in the ``steps_*`` modules beside this file and are imported here, so
every feature file sees every step.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from steps_batches import *  # noqa: F403
from steps_common import *  # noqa: F403
from steps_jobs import *  # noqa: F403
from steps_lifecycle import *  # noqa: F403
from steps_pool import *  # noqa: F403
from steps_recovery import *  # noqa: F403
from steps_sharding import *  # noqa: F403
from steps_tls import *  # noqa: F403
from world import World

from rbees_core.testing.hosts import LAB_DESCRIPTION, Lab

TAGS = {
    "m0": "M0: the CLI over SSH, no daemon",
    "m1": "M1: pool-managerd and the HTTP transport",
    "m2": "M2: jobs through rbees-orcd",
    "queue": "the queue's capacity and policies",
    "validation": "bad input",
    "auth": "the API token",
    "no_repl": "the CLIs are never a REPL",
    "leftovers": "rbees down leaves no process, a dead pool's workers included",
    "recovery": "crashed workers restarted with backoff, a lost pool's jobs ended",
    "sharding": "one model across two hosts over llama.cpp's RPC backend",
    "evict": "one memory figure: a pool's memory limit, evict to fit",
    "tls": "HTTPS on every hop, the lab's CA, a client with the wrong CA",
}


def pytest_configure(config: pytest.Config) -> None:
    for tag, doc in TAGS.items():
        config.addinivalue_line("markers", f"{tag}: {doc}")


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
          ) -> Iterator[World]:
    lab = Lab.create(tmp_path_factory.mktemp("lab"),
                     mode=os.environ.get("RBEES_BDD_MODE", "auto"))
    request.config.stash[LAB_DESCRIPTION] = lab.describe()
    w = World(lab=lab, root=lab.root)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def ctx(world: World) -> Iterator[dict[str, Any]]:
    """What one scenario's steps hand each other (the last command, answer, job ids). A link
    a scenario left cut is restored after it, a rbees-orcd it restarted with other options
    is stopped (the next scenario starts the lab's own), a hub it slowed down is sped up,
    and its jobs still queued or running are cancelled."""
    shared: dict[str, Any] = {}
    yield shared
    for name in shared.get("cut", []):
        world.lab.link(name, True)
    if shared.get("tls"):  # the next scenario finds the lab's plain daemons (or none)
        world.use_tls(False)
    if shared.get("orcd_changed"):  # restarted with other options: the next scenario's
        world.kill("orcd", signal.SIGTERM)  # "the cluster is up" starts the lab's own
    if shared.get("pool_changed"):  # restarted with other settings: the next scenario's
        world.kill(f"pool:{shared['pool_changed']}", signal.SIGTERM)  # starts the lab's own
        for link in shared.get("linked", []):
            link.unlink(missing_ok=True)
    if shared.get("throttled") and world.hub is not None:
        world.hub.throttle_bps = None
    cancel_leftovers(world, shared)


def cancel_leftovers(world: World, shared: dict[str, Any]) -> None:
    """Cancel the jobs of the lab's rbees-orcd a scenario left queued or running (it failed
    half-way): 16 long jobs a failed recovery scenario left queued held every later
    scenario's jobs for that pool behind them for many minutes. Cancelling a finished job
    changes nothing."""
    if "second" in shared or world.daemons.get("orcd") is None:
        return
    ids = {*shared.get("job_ids", []), shared.get("job_id")} - {None}
    for job_id in ids:
        with contextlib.suppress(httpx.HTTPError):
            world.http("POST", f"{world.blep.orcd_url}/v2/tasks/{job_id}/cancel", timeout=5)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"features: {Path(__file__).parent}"]
