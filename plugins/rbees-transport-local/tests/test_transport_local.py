"""The local transport: the shared contract, run against this host's own rbees-pool."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pluggy
import pytest
from rbees_transport_local import LocalTransport

from rbees_core import plugins
from rbees_core.errors import RemoteProgramMissingError
from rbees_core.hosts import HostConfig, open_transport
from rbees_core.testing.transport import ProgramTransportContract


def test_loads_through_its_entry_point(rbees_pm: pluggy.PluginManager) -> None:
    assert plugins.transports(rbees_pm)["local"] is LocalTransport
    names = {p.name: p for p in plugins.list_plugins(rbees_pm)}
    assert names["transport-local"].version == "0.1.0"
    assert names["transport-local"].hooks == ["rbees_register_transports"]
    host = HostConfig(name="here", transport="local")
    assert isinstance(open_transport(rbees_pm, host), LocalTransport)


class TestLocalContract(ProgramTransportContract):
    @pytest.fixture
    async def transport(self, tmp_path: Path, fake_hub: Any) -> AsyncIterator[LocalTransport]:
        host = HostConfig(name="here", transport="local",
                          env={"RBEES_HOME": str(tmp_path / "pool-home")})
        async with LocalTransport(host) as transport:
            yield transport


async def test_a_missing_program_is_one_clear_error(tmp_path: Path) -> None:
    host = HostConfig(name="here", transport="local", remote_pool=str(tmp_path / "absent"))
    with pytest.raises(RemoteProgramMissingError, match=r"^here: cannot run .*absent: No such"):
        await LocalTransport(host).run(["--version"])


async def test_the_host_s_environment_reaches_rbees_pool(tmp_path: Path) -> None:
    home = tmp_path / "elsewhere"
    host = HostConfig(name="here", transport="local", env={"RBEES_HOME": str(home)})
    result = await LocalTransport(host).run(["worker", "list", "--format", "json"])
    assert result.exit_code == 0 and result.stdout.strip() == "[]"
    assert await LocalTransport(host).accept_new() is None  # no host keys here
