"""M0's hosts (``rbees jobs submit`` without a daemon, see :mod:`.m0`): whether M0 is used,
each host's pool client and state, and the cache of their last answers.

Each host is asked through its typed pool client (:mod:`rbees_core.pool_client`): its
status to schedule, a worker started or stopped when the policy says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

import attrs
import pluggy

from rbees_core.errors import RbeesError
from rbees_core.files import write_private
from rbees_core.hosts import HostConfig
from rbees_core.pool_client import PoolClient, to_json
from rbees_core.transport import Transport

#: How long ``rbees`` waits for rbees-orcd's /health before it schedules by itself.
HEALTH_TIMEOUT_S = 0.5
#: A host's ``rbees-pool status`` must answer within this (after connecting).
STATUS_TIMEOUT_S = 20.0
#: How long a new worker may take to load its model.
SPAWN_TIMEOUT_S = 180.0
#: How long to wait for a worker that another client is starting.
WAIT_FOR_WORKER_S = 60.0
#: Where a dispatch may go; ``loading``/``starting`` workers are on their way.
LIVE = frozenset({"ready", "busy"})
COMING = frozenset({"loading", "starting"})
TRANSPORTS = frozenset({"ssh", "local"})


def use_m0(host: str | None) -> bool:
    """Whether ``jobs submit`` schedules by itself (see the module's docstring)."""
    if host:
        return True
    if os.environ.get("RBEES_ORCHESTRATOR_URL"):
        return False
    from rbees_core.hosts import load_hosts

    if not load_hosts(check=False):
        return False
    import httpx

    from rbees_core.programs.rbees_commands.cluster import orchestrator_url

    try:
        from rbees_core.tls import client_context

        httpx.get(f"{orchestrator_url()}/health", timeout=HEALTH_TIMEOUT_S,
                  verify=client_context())
    except httpx.HTTPError:
        return True
    return False


def _say(text: str) -> None:
    print(f"rbees: {text}", file=sys.stderr, flush=True)


@attrs.define
class Host:
    """One configured host, its transport, and what its pool said of its state (the JSON
    of :class:`rbees_core.api.pool.PoolStatus`, as the cache keeps it)."""

    config: HostConfig
    transport: Transport | None = None
    state: dict[str, Any] | None = None
    problem: str | None = None
    elapsed_ms: float = 0.0

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def client(self) -> PoolClient:
        """The host's pool client (the transport is opened by :meth:`M0Job.place`)."""
        assert self.transport is not None
        return self.transport.pool_client()


async def _gather_one(host: Host) -> None:
    began = time.monotonic()
    try:
        if host.config.transport not in TRANSPORTS:
            raise RbeesError(f"transport {host.config.transport!r} cannot reach workers "
                             "without rbees-orcd (use ssh or local)")
        timeout = host.config.connect_timeout_s + STATUS_TIMEOUT_S
        host.state = to_json(await asyncio.wait_for(host.client.status(), timeout))
    except (asyncio.TimeoutError, TimeoutError):
        host.problem = "no answer to rbees-pool status in time"
    except RbeesError as exc:
        prefix = f"{host.name}: "
        host.problem = exc.message[len(prefix):] if exc.message.startswith(prefix) \
            else exc.message
    host.elapsed_ms = (time.monotonic() - began) * 1000


async def gather(hosts: list[Host]) -> None:
    """Every host's state at once; a host that fails gets ``problem`` instead."""
    await asyncio.gather(*(_gather_one(h) for h in hosts))


def cache_file() -> Any:
    """Where the last answer of each host is kept (beside hosts.toml), for the quick path."""
    from rbees_core.hosts import hosts_dir

    return hosts_dir() / "run" / "m0-hosts.json"


def load_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_cache(hosts: list[Host]) -> None:
    cache = load_cache()
    for host in hosts:
        if host.state is not None:
            cache[host.name] = {"at": time.time(), "state": host.state}
        else:
            cache.pop(host.name, None)
    path = cache_file()
    with contextlib.suppress(OSError):
        write_private(path, json.dumps(cache))


def load_scheduler(pm: pluggy.PluginManager) -> Any:
    """The policy of ``[scheduler]``, as rbees-orcd makes it."""
    from rbees_core import plugins
    from rbees_core.config import load_config

    settings = load_config().scheduler
    return plugins.lookup(pm, plugins.SCHEDULERS, settings.policy).from_config(settings)


