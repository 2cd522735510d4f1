"""The contract every transport keeps, as a test class to subclass (like httpx's transports,
every implementation is held to the same behaviour).

A transport's test module subclasses :class:`TransportContract` (its name starting with
``Test``) and provides a ``transport`` fixture: a :class:`rbees_core.transport.Transport`
for a pool host whose ``rbees-pool`` (or pool-managerd) uses a fresh ``RBEES_HOME`` and
sees ``HF_ENDPOINT`` of the ``fake_hub`` fixture, so downloads come from the loopback hub::

    class TestSshContract(TransportContract):
        @pytest.fixture
        async def transport(self, fake_hub, tmp_path):
            async with SshTransport(host_config(...)) as transport:
                yield transport

The tests drive the transport's :meth:`~rbees_core.transport.Transport.pool_client` (the
one interface ``rbees pool``, M0 and rbees-orcd use) with real processes: a download, and a
real SmolLM2 worker started, listed and stopped. A transport that runs programs
(implements :meth:`~rbees_core.transport.Transport.run`) subclasses
:class:`ProgramTransportContract` instead, which also holds it to passing each argument and
each output line on as it is.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from rbees_core.api.pool import LIVE_WORKER_STATES as LIVE
from rbees_core.api.pool import PoolModel, WorkerStartRequest
from rbees_core.errors import RbeesError
from rbees_core.models import DEFAULT_MODEL_REF
from rbees_core.transport import Transport

HUB_REPO = "rbees-contract/transport-GGUF"
HUB_FILE = "t.Q4_0.gguf"
#: Big enough for several progress reports (the hf source reports every 10 MiB chunk).
HUB_BYTES = 32 * 1024 * 1024
#: Slow enough that progress visibly arrives before the end (about 2 s in all).
HUB_THROTTLE_BPS = 16 * 1024 * 1024


def runs_programs(transport: Transport) -> bool:
    """Whether the transport implements :meth:`Transport.run` (ssh, local)."""
    return type(transport).run is not Transport.run


class TransportContract:
    """What ``rbees pool`` relies on from every transport."""

    async def test_version_is_a_version(self, transport: Transport) -> None:
        assert re.fullmatch(r"\d+\.\d+\.\d+\S*", await transport.pool_client().version())

    async def test_status_has_the_host_s_devices_models_and_workers(
            self, transport: Transport) -> None:
        state = await transport.pool_client().status()
        assert state.cpu is not None and state.cpu["cores"] >= 1
        assert [w for w in state.workers if w.state in LIVE] == []
        assert DEFAULT_MODEL_REF in {m.ref for m in state.models}

    async def test_models_are_listed(self, transport: Transport) -> None:
        models = await transport.pool_client().models_list()
        assert all(isinstance(m, PoolModel) for m in models)
        assert DEFAULT_MODEL_REF in {m.ref for m in models}

    async def test_a_refused_command_is_an_error_naming_host_and_worker(
            self, transport: Transport) -> None:
        client = transport.pool_client()
        with pytest.raises(RbeesError) as raised:
            await client.worker_stop("no-such-worker")
        assert raised.value.message.startswith(f"{client.name}: ")
        assert "no-such-worker" in raised.value.message

    @pytest.mark.parametrize("hostile", ["x; touch {marker}", "$(touch {marker})",
                                         "`touch {marker}`", "x' 'y", "a\nb"])
    async def test_arguments_arrive_as_they_are(self, transport: Transport, tmp_path: Path,
                                                hostile: str) -> None:
        marker = tmp_path / "pwned"
        with pytest.raises(RbeesError):
            await transport.pool_client().worker_stop(hostile.format(marker=marker))
        assert not marker.exists()

    async def test_a_download_streams_its_progress(self, transport: Transport,
                                                   fake_hub: Any) -> None:
        fake_hub.add(HUB_REPO, HUB_FILE, bytes(range(256)) * (HUB_BYTES // 256))
        fake_hub.throttle_bps = HUB_THROTTLE_BPS
        client = transport.pool_client()
        arrivals: list[tuple[float, Any]] = []
        end = await client.models_download(
            f"hf:{HUB_REPO}/{HUB_FILE}",
            progress=lambda p: arrivals.append((time.monotonic(), p)))
        ended = time.monotonic()
        assert end.fetched is True and end.size_bytes == HUB_BYTES
        midway = [(at, p) for at, p in arrivals if 0 < p.bytes_done < HUB_BYTES]
        assert midway, arrivals
        assert ended - midway[0][0] > 0.2, "progress came only at the end"
        assert all(p.bytes_total == HUB_BYTES for _, p in midway)
        assert end.path in {m.path for m in await client.models_list()}

    @pytest.mark.model
    async def test_a_worker_is_started_listed_and_stopped(self, transport: Transport) -> None:
        client = transport.pool_client()
        started = await client.worker_start(WorkerStartRequest(model_ref=DEFAULT_MODEL_REF,
                                                               device="cpu"))
        try:
            assert started.state == "ready" and started.pid > 0 and started.port
            assert started.model_ref == DEFAULT_MODEL_REF and started.device == "cpu"
            listed = await client.worker_list()
            assert [(w.worker_id, w.state, w.pid) for w in listed] == [
                (started.worker_id, "ready", started.pid)]
            got = await client.worker_get(started.worker_id)
            assert (got.worker_id, got.uri) == (started.worker_id, started.uri)
        finally:
            stopped = await client.worker_stop(started.worker_id)
        assert (stopped.worker_id, stopped.state) == (started.worker_id, "stopped")
        after = await client.worker_list()
        assert [w for w in after if w.state in LIVE] == []  # a daemon may keep the entry

    async def test_it_closes_twice_and_reconnects(self, transport: Transport) -> None:
        await transport.aclose()
        await transport.aclose()
        assert await transport.pool_client().version()


class ProgramTransportContract(TransportContract):
    """The contract, plus what a transport that runs programs (implements
    :meth:`~rbees_core.transport.Transport.run`: ssh, local) owes on top: each argument and
    each output line passed on as it is. Subclass this one instead for such a transport."""

    @pytest.mark.parametrize("hostile", ["x; touch {marker}", "$(touch {marker})",
                                         "`touch {marker}`", "x' 'y", "a\nb"])
    async def test_run_passes_arguments_as_they_are(self, transport: Transport,
                                                    tmp_path: Path, hostile: str) -> None:
        assert runs_programs(transport), "a ProgramTransportContract transport implements run"
        marker = tmp_path / "pwned"
        result = await transport.run(["worker", "stop", "--format", "json", "--",
                                      hostile.format(marker=marker)])
        assert result.exit_code == 1, result
        assert result.stderr.startswith("rbees-pool: error: ")
        assert not marker.exists()

    async def test_every_output_line_is_passed_on_in_order(self, transport: Transport
                                                           ) -> None:
        seen: list[str] = []
        result = await transport.run(["models", "list", "--format", "json"],
                                     on_line=seen.append)
        assert result.exit_code == 0, result.stderr
        assert seen == result.stdout.splitlines()
        assert DEFAULT_MODEL_REF in {m["ref"] for m in json.loads(result.stdout)}
