"""Workers shared by several tests: loading a model costs seconds, so each loads once."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rbees_core.models import DEFAULT_MODEL_REF
from rbees_core.testing import ManagedProcess, WorkerHandle, find_free_port, wait_http, workerd_argv

StartWorker = Callable[..., WorkerHandle]


@pytest.fixture(scope="session")
def start_torch_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartWorker]:
    """``start(model=..., worker_id=...)``: a real ``rbees-workerd --backend torch``, ready."""
    started: list[ManagedProcess] = []

    def start(*, model: str = DEFAULT_MODEL_REF, worker_id: str = "torch1",
              device: str = "cpu", ready_timeout: float = 300.0) -> WorkerHandle:
        tmp = tmp_path_factory.mktemp(f"workerd-{worker_id}")
        port = find_free_port()
        argv = workerd_argv(worker_id, port, model=model, backend="torch", device=device)
        log_path = tmp / "workerd.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "RBEES_HOME": str(tmp / "home")},
                                    start_new_session=True)
        managed = ManagedProcess(argv=argv, proc=proc, log_path=log_path)
        started.append(managed)
        try:
            wait_http(f"http://127.0.0.1:{port}/v2/ready", timeout=ready_timeout, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}\n--- worker log ---\n{managed.log()}") from exc
        return WorkerHandle(process=managed, port=port, worker_id=worker_id)

    yield start
    for managed in started:
        managed.stop(grace=10.0)


@pytest.fixture(scope="session")
def gguf_worker(start_torch_worker: StartWorker) -> WorkerHandle:
    """One torch worker on the embedded SmolLM2 GGUF, shared by the whole session."""
    return start_torch_worker(worker_id="torch-gguf")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from rbees_core import plugins
    from rbees_core.models import resolve_model

    pm = plugins.make_manager(plugins.builtin_plugins())
    return Path(resolve_model(pm, DEFAULT_MODEL_REF))
