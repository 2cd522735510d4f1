"""One model across several devices over llama.cpp's RPC backend (issue 27): the RPC server
process, the internals of llama-cpp-python 0.3.36 it and the sharded worker use, and a real
sharded worker whose greedy output equals the unsharded one."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import time
from collections.abc import Callable

import llama_cpp
import pytest
from rbees_backend_llamacpp import rpc
from rbees_backend_llamacpp.offload import shard_layers

from rbees_core.errors import BackendUnavailableError, ModelLoadError
from rbees_core.testing import ManagedProcess, WorkerHandle
from rbees_core.testing.processes import find_free_port


def test_the_internals_it_relies_on_are_there() -> None:
    """Fails loudly when a new llama-cpp-python moves what rbees reaches through ctypes:
    its handle on libllama, the untyped ``devices`` field of the model parameters, and an
    RPC backend compiled in (-DGGML_RPC=ON, scripts/setup.sh)."""
    assert llama_cpp.__version__ == "0.3.36"
    assert isinstance(llama_cpp.llama_cpp._lib, ctypes.CDLL)
    fields = dict(llama_cpp.llama_model_params._fields_)
    assert fields["devices"] is ctypes.c_void_p
    g = rpc.ggml()
    assert g.reg and g.local_device("cpu", 0)
    free, total = g.memory(g.local_device("cpu", 0))
    assert 0 < free <= total


def test_layers_go_remote_by_share() -> None:
    # SmolLM2-135M: 30 repeating layers and the output layer
    assert shard_layers(30, (1.0, 1.0)) == 16
    assert shard_layers(30, (0.0, 1.0, 1.0)) == 31
    assert shard_layers(30, (1.0, 1.0, 1.0)) == 21
    assert shard_layers(30, (1000.0, 1.0)) == 1  # a shard keeps at least one layer remote


def test_a_server_binds_loopback_only() -> None:
    assert rpc.is_loopback("127.0.0.1") and rpc.is_loopback("::1")
    assert rpc.is_loopback("localhost") and not rpc.is_loopback("0.0.0.0")
    with pytest.raises(BackendUnavailableError, match="loopback only"):
        rpc.serve("0.0.0.0", 1)
    out = subprocess.run([sys.executable, "-m", "rbees_backend_llamacpp.rpc", "--host",
                          "10.0.0.1", "--port", "1"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "loopback only" in out.stderr


def test_an_endpoint_that_does_not_answer_is_a_load_error() -> None:
    # ggml would abort the process; the probe turns it into the worker's load error
    with pytest.raises(ModelLoadError, match="not reachable"):
        rpc.probe(f"127.0.0.1:{find_free_port()}", timeout=1.0)
    with pytest.raises(ModelLoadError, match="HOST:PORT"):
        rpc.probe("nowhere")


def wait_listening(endpoint: str, proc: ManagedProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            rpc.probe(endpoint, timeout=1.0)
            return
        except ModelLoadError as exc:
            if proc.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"RPC server {endpoint} did not listen:\n{proc.log()}"
                                   ) from exc
            time.sleep(0.2)


def start_servers(rbees_process: Callable[..., ManagedProcess], n: int) -> list[str]:
    endpoints = []
    for i in range(n):
        port = find_free_port()
        proc = rbees_process([sys.executable, "-m", "rbees_backend_llamacpp.rpc", "--port",
                              str(port), "--threads", "1"], name=f"rpc-{i}")
        endpoints.append(f"127.0.0.1:{port}")
        wait_listening(endpoints[-1], proc)
    return endpoints


def test_greedy_output_sharded_over_two_servers_is_the_unsharded_one(
        rbees_worker: Callable[..., WorkerHandle],
        rbees_process: Callable[..., ManagedProcess]) -> None:
    body = {"job_id": "j1", "prompt": "The three laws of robotics are", "max_tokens": 24,
            "temperature": 0, "seed": 1}
    whole = rbees_worker(worker_id="whole")
    expected = whole.text(body)
    whole.process.stop()
    endpoints = start_servers(rbees_process, 2)
    sharded = rbees_worker(worker_id="sharded", extra=[
        "--rpc", ",".join(endpoints), "--tensor-split", "1,1,1", "--threads", "1"])
    assert sharded.text(body) == expected
    assert sharded.text({**body, "job_id": "j2"}) == expected  # the cache is remote too
