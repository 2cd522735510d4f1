"""The contract every transport keeps, as a test class to subclass (like httpx's transports,
every implementation is held to the same behaviour).

A transport's test module subclasses :class:`TransportContract` (its name starting with
``Test``) and provides a ``transport`` fixture: a :class:`rbees_core.interfaces.Transport`
for a pool host whose ``rbees-pool`` (or pool-managerd) uses a fresh ``RBEES_HOME`` and
sees ``HF_ENDPOINT`` of the ``fake_hub`` fixture, so downloads come from the loopback hub::

    class TestSshContract(TransportContract):
        @pytest.fixture
        async def transport(self, fake_hub, tmp_path):
            async with SshTransport(host_config(...)) as transport:
                yield transport

The tests run real processes: a download, and a real SmolLM2 worker spawned, listed and
stopped. Commands and their JSON are rbees-pool's (``--format json``).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from rbees_core.api.pool import LIVE_WORKER_STATES as LIVE
from rbees_core.interfaces import Transport, TransportResult
from rbees_core.models import DEFAULT_MODEL_REF
from rbees_core.pool.workers import WorkerRecord

HUB_REPO = "rbees-contract/transport-GGUF"
HUB_FILE = "t.Q4_0.gguf"
#: Big enough for several progress reports (the hf source reports every 10 MiB chunk).
HUB_BYTES = 32 * 1024 * 1024
#: Slow enough that progress visibly arrives before the end (about 2 s in all).
HUB_THROTTLE_BPS = 16 * 1024 * 1024
STATUS_KEYS = {"pool_id", "host", "gpus", "cpu", "workers", "models"}
MODEL_KEYS = {"id", "ref", "path", "size_bytes", "sha256", "source"}
WORKER_KEYS = set(WorkerRecord.json_keys())


def json_of(result: TransportResult) -> Any:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def one_error_line(result: TransportResult, *fragments: str) -> str:
    """The failed command's only stderr line, which must hold ``fragments``."""
    assert result.exit_code == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rbees-pool: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


class TransportContract:
    """What ``rbees pool`` relies on from every transport."""

    async def test_version_is_rbees_pool_s(self, transport: Transport) -> None:
        result = await transport.run(["--version"])
        assert result.exit_code == 0, result.stderr
        assert re.fullmatch(r"rbees-pool \d+\.\d+\.\d+\S*\n", result.stdout)

    async def test_status_has_rbees_pool_s_shape(self, transport: Transport) -> None:
        state = json_of(await transport.run(["status", "--format", "json"]))
        assert set(state) == STATUS_KEYS
        assert state["cpu"]["cores"] >= 1
        assert [w for w in state["workers"] if w["state"] in LIVE] == []
        assert DEFAULT_MODEL_REF in {m["ref"] for m in state["models"]}

    async def test_every_stdout_line_is_passed_on_in_order(self, transport: Transport
                                                           ) -> None:
        seen: list[str] = []
        result = await transport.run(["models", "list", "--format", "json"],
                                     on_line=seen.append)
        assert seen == result.stdout.splitlines()
        models = json_of(result)
        assert all(set(m) == MODEL_KEYS for m in models)
        assert DEFAULT_MODEL_REF in {m["ref"] for m in models}

    async def test_a_failed_command_is_a_result_with_one_error_line(
            self, transport: Transport) -> None:
        errors: list[str] = []
        result = await transport.run(["worker", "stop", "--format", "json", "--",
                                      "no-such-worker"], on_stderr=errors.append)
        line = one_error_line(result, "no-such-worker")
        assert errors == [line]

    @pytest.mark.parametrize("hostile", ["x; touch {marker}", "$(touch {marker})",
                                         "`touch {marker}`", "x' 'y", "a\nb"])
    async def test_arguments_arrive_as_they_are(self, transport: Transport, tmp_path: Path,
                                                hostile: str) -> None:
        marker = tmp_path / "pwned"
        result = await transport.run(["worker", "stop", "--format", "json", "--",
                                      hostile.format(marker=marker)])
        assert result.exit_code == 1, result
        assert result.stderr.startswith("rbees-pool: error: ")
        assert not marker.exists()

    async def test_a_download_streams_its_progress(self, transport: Transport,
                                                   fake_hub: Any) -> None:
        fake_hub.add(HUB_REPO, HUB_FILE, bytes(range(256)) * (HUB_BYTES // 256))
        fake_hub.throttle_bps = HUB_THROTTLE_BPS
        arrivals: list[tuple[float, dict[str, Any]]] = []
        result = await transport.run(
            ["models", "download", "--format", "json", "--", f"hf:{HUB_REPO}/{HUB_FILE}"],
            on_line=lambda line: arrivals.append((time.monotonic(), json.loads(line))))
        assert result.exit_code == 0, result.stderr
        events = [event for _, event in arrivals]
        assert [e["event"] for e in events][-1] == "end"
        end = events[-1]
        assert set(end) == {"event", "fetched", *MODEL_KEYS}
        assert end["fetched"] is True and end["size_bytes"] == HUB_BYTES
        midway = [(at, e) for at, e in arrivals
                  if e["event"] == "progress" and 0 < e["bytes_done"] < HUB_BYTES]
        assert midway, events
        assert arrivals[-1][0] - midway[0][0] > 0.2, "progress came only at the end"
        assert all(e["bytes_total"] == HUB_BYTES for _, e in midway)
        again = json_of(await transport.run(["models", "list", "--format", "json"]))
        assert end["path"] in {m["path"] for m in again}

    @pytest.mark.model
    async def test_a_worker_is_spawned_listed_and_stopped(self, transport: Transport) -> None:
        spawned = json_of(await transport.run([
            "worker", "spawn", "--model", DEFAULT_MODEL_REF, "--format", "json", "--", "cpu"]))
        try:
            assert set(spawned) >= WORKER_KEYS and spawned["state"] == "ready"
            assert spawned["model_ref"] == DEFAULT_MODEL_REF and spawned["device"] == "cpu"
            listed = json_of(await transport.run(["worker", "list", "--format", "json"]))
            assert [(w["worker_id"], w["state"], w["pid"]) for w in listed] == [
                (spawned["worker_id"], "ready", spawned["pid"])]
        finally:
            stopped = json_of(await transport.run([
                "worker", "stop", "--format", "json", "--", spawned["worker_id"]]))
        assert [(w["worker_id"], w["state"]) for w in stopped] == [
            (spawned["worker_id"], "stopped")]
        after = json_of(await transport.run(["worker", "list", "--format", "json"]))
        assert [w for w in after if w["state"] in LIVE] == []  # a daemon may keep the entry

    async def test_it_closes_twice_and_reconnects(self, transport: Transport) -> None:
        await transport.aclose()
        await transport.aclose()
        assert (await transport.run(["--version"])).exit_code == 0
