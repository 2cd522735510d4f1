"""A real cluster for end-to-end tests: ``rbees up`` (rbees-orcd and a pool-managerd on
loopback, the embedded SmolLM2) in a home of the test's.

:func:`up` starts one and returns a :class:`Cluster`; the ``rbees_cluster`` fixture
(:mod:`rbees_core.testing`) is one per test module, ``rbees down`` after it. Used by the
tests of rbees-orcd's protocols (OpenAI's, the protocol plugins').
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import httpx

from rbees_core.testing.processes import find_free_port
from rbees_core.testing.streams import parse_sse

BIN = Path(sys.executable).parent


def parse_events(text: str) -> list[tuple[int | None, str, Any]]:
    return parse_sse(text)


@attrs.define
class Cluster:
    """A running cluster: its home, rbees-orcd's and the pool's URLs, the environment its
    ``rbees`` commands run in."""

    home: Path
    url: str
    pool_url: str
    env: dict[str, str]

    def rbees(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``rbees ARGS`` against this cluster."""
        return subprocess.run([str(BIN / "rbees"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def submit(self, **task: Any) -> dict[str, Any]:
        """``POST /v2/tasks`` (a short greedy prompt unless ``task`` says otherwise)."""
        body = {"model": "smollm2", "prompt": "Bees are", "max_tokens": 8, "temperature": 0,
                "seed": 1, **task}
        answer = httpx.post(f"{self.url}/v2/tasks", json=body, timeout=30)
        assert answer.status_code == 202, answer.text
        return dict(answer.json())

    def events(self, job_id: str, after: int = 0) -> list[tuple[int | None, str, Any]]:
        """A job's events after ``after``, waiting for its end."""
        answer = httpx.get(f"{self.url}/v2/tasks/{job_id}/events", timeout=120,
                           headers={"Last-Event-ID": str(after)})
        assert answer.status_code == 200, answer.text
        return parse_events(answer.text)

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's record."""
        return dict(httpx.get(f"{self.url}/v2/tasks/{job_id}", timeout=10).json())


def up(home: Path, *extra: str, environ: dict[str, str] | None = None) -> Cluster:
    """``rbees up`` in ``home``, with ``extra`` flags and ``environ`` added to the
    environment (``RBEES_PLACEMENT_CTX``...). Stop it with ``cluster.rbees("down")``."""
    env = {**os.environ, **(environ or {}), "RBEES_HOME": str(home)}
    env.pop("RBEES_ORCHESTRATOR_URL", None)
    orcd, pool = f"127.0.0.1:{find_free_port()}", f"127.0.0.1:{find_free_port()}"
    done = subprocess.run([str(BIN / "rbees"), "up", "--bind", orcd, "--pool-bind", pool,
                           "--heartbeat-interval", "0.5", "--format", "json", *extra],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    return Cluster(home=home, url=info["orchestrator"], pool_url=info["pool"], env=env)


__all__ = ["BIN", "Cluster", "up"]
