from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbees_core.testing import (
    ManagedProcess,
    WorkerHandle,
    find_free_port,
    wait_http,
    workerd_argv,
)


def start_worker(tmp: Path, *, worker_id: str = "w1", slots: int = 1, backend: str = "llamacpp",
                 extra: tuple[str, ...] = (), env: dict[str, str] | None = None
                 ) -> WorkerHandle:
    port = find_free_port()
    argv = workerd_argv(worker_id, port, backend=backend, slots=slots, extra=extra)
    log_path = tmp / f"{worker_id}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "RBEES_HOME": str(tmp / "home"),
                                     **(env or {})}, start_new_session=True)
    managed = ManagedProcess(argv=argv, proc=proc, log_path=log_path)
    try:
        token = (env or {}).get("RBEES_API_TOKEN")
        wait_http(f"http://127.0.0.1:{port}/v2/ready", timeout=120, proc=proc,
                  headers={"Authorization": f"Bearer {token}"} if token else None)
    except (RuntimeError, TimeoutError):
        managed.stop()
        raise RuntimeError(managed.log()) from None
    return WorkerHandle(process=managed, port=port, worker_id=worker_id)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHandle]:
    """One llama.cpp SmolLM2 worker with 1 slot, shared by a module's tests."""
    handle = start_worker(tmp_path_factory.mktemp("worker"))
    yield handle
    handle.process.stop()


@pytest.fixture(scope="module")
def worker4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHandle]:
    """A llama.cpp SmolLM2 worker with 4 slots."""
    handle = start_worker(tmp_path_factory.mktemp("worker4"), worker_id="w4", slots=4)
    yield handle
    handle.process.stop()
