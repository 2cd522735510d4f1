"""An outsider's backend (examples/rbees-backend-echo) installed for real and used end to end.

The distribution is built and installed into the running environment from a copy of its
source (offline: no index, no build isolation, no dependencies), found through its entry
point, and served by a real ``rbees-workerd``. It is uninstalled afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from rbees_core.testing import ManagedProcess, WorkerHandle, find_free_port, workerd_argv

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "rbees-backend-echo"
DIST = "rbees-backend-echo"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(
    not EXAMPLE.is_dir(), reason="the example distribution is not in this checkout")


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PIP_NO_INPUT": "1"}
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def echo_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the example, so that building it leaves nothing in the checkout."""
    source = tmp_path_factory.mktemp("src") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    return source


@pytest.fixture(scope="module")
def echo_installed(echo_source: Path) -> Iterator[None]:
    pytest.importorskip("setuptools", reason="building the example needs setuptools")
    already = pip("show", DIST).returncode == 0
    if not already:
        done = pip("install", "--no-deps", "--no-build-isolation", "--no-index",
                   str(echo_source))
        assert done.returncode == 0, done.stdout + done.stderr
    try:
        yield
    finally:
        if not already:
            pip("uninstall", "-y", DIST)


def rbees(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("RBEES_DISABLED_PLUGINS", "RBEES_DISABLE_PLUGIN_AUTOLOAD")}
    return subprocess.run([str(BIN / "rbees"), *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=60)


def test_its_own_test_suite_passes(echo_installed: None, echo_source: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.pop("RBEES_DISABLED_PLUGINS", None)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                            cwd=echo_source, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "skipped" not in result.stdout


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "not-a-model.bin"
    path.write_bytes(b"the echo backend never reads this")
    return path


@pytest.fixture
def echo_worker(echo_installed: None, rbees_worker: Callable[..., WorkerHandle],
                model_file: Path, monkeypatch: pytest.MonkeyPatch) -> WorkerHandle:
    monkeypatch.delenv("RBEES_DISABLED_PLUGINS", raising=False)
    monkeypatch.delenv("RBEES_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    return rbees_worker(model=str(model_file), backend="echo", worker_id="echo1",
                        ready_timeout=60)


def test_listed_by_rbees_plugins(echo_installed: None) -> None:
    result = rbees("plugins", "--format", "json")
    assert result.returncode == 0, result.stderr
    listed = {p["name"]: p for p in json.loads(result.stdout)}
    assert listed["backend-echo"] == {"name": "backend-echo", "version": "0.1.0",
                                      "hooks": ["rbees_register_backends"]}


@pytest.mark.parametrize("prompt", ["hello bees", "é€😀", "mixed: a é b € c 😀 d 日本"])
def test_worker_echoes_and_reassembles_utf8(echo_worker: WorkerHandle, prompt: str) -> None:
    frames = echo_worker.execute({"job_id": "j-utf8", "prompt": prompt, "max_tokens": 200,
                                  "temperature": 0})
    events = [event for _, event, _ in frames]
    assert events[0] == "started"
    assert events[-1] == "end"
    pieces = [data["t"] for _, event, data in frames if event == "token"]
    assert "".join(pieces) == prompt
    assert all(piece and "\ufffd" not in piece for piece in pieces)
    end = frames[-1][2]
    assert end["stop_reason"] == "eos"
    assert end["tokens_in"] == end["tokens_out"] == len(prompt.encode())
    ready = httpx.get(f"{echo_worker.url}/v2/ready", timeout=5)
    assert ready.status_code == 200
    assert ready.json()["backend"] == "echo"


def test_worker_applies_stop_strings_and_max_tokens(echo_worker: WorkerHandle) -> None:
    stopped = echo_worker.execute({"job_id": "j-stop", "prompt": "one 😀 two 😀 three",
                                   "stop": ["two"]})
    assert "".join(d["t"] for _, e, d in stopped if e == "token") == "one 😀 "
    assert stopped[-1][2]["stop_reason"] == "stop"
    # 5 tokens are 1 + 4 bytes: "a" and the whole of "😀"; 6 would split "€".
    cut = echo_worker.execute({"job_id": "j-max", "prompt": "a😀€", "max_tokens": 5})
    assert "".join(d["t"] for _, e, d in cut if e == "token") == "a😀"
    assert cut[-1][2]["stop_reason"] == "max_tokens"


def wait_exit(proc: ManagedProcess, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while proc.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    code = proc.proc.poll()
    assert code is not None, f"the worker did not exit\n{proc.log()}"
    return code


def test_disabled_by_name(echo_installed: None, model_file: Path, tmp_path: Path,
                          rbees_process: Callable[..., ManagedProcess]) -> None:
    env = {"RBEES_DISABLED_PLUGINS": "backend-echo", "RBEES_HOME": str(tmp_path / "home")}
    listed = rbees("plugins", "--format", "json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "backend-echo" not in {p["name"] for p in json.loads(listed.stdout)}
    worker = rbees_process(
        workerd_argv("echo-off", find_free_port(), model=str(model_file), backend="echo"),
        env=env, name="workerd-echo-off")
    assert wait_exit(worker) == 1
    assert "BACKEND_UNAVAILABLE" in worker.log()
