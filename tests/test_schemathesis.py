"""Property-based API tests: schemathesis drives each daemon from its own /openapi.json.

Every generated request must get an answer below 500, every error must be in the contract's
envelope (OpenAI's shape on /v1), and the daemon must stay healthy afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from rbees_core.testing import find_free_port, wait_http

BIN = Path(sys.executable).parent
SENT: Counter[str] = Counter()
MIN_REQUESTS = {"rbees-orcd": 300, "pool-managerd": 200}


def _daemon(name: str, home: Path, *args: str) -> Iterator[str]:
    port = find_free_port()
    proc = subprocess.Popen([str(BIN / name), "--bind", f"127.0.0.1:{port}", *args],
                            env={**os.environ, "RBEES_HOME": str(home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", timeout=30, proc=proc)
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def orcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _daemon("rbees-orcd", tmp_path_factory.mktemp("orcd-fuzz"),
                       "--queue-capacity", "50")


@pytest.fixture(scope="module")
def pool_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _daemon("pool-managerd", tmp_path_factory.mktemp("pool-fuzz"), "--pool-id", "fz")


@pytest.fixture(scope="module")
def orcd_schema(orcd_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{orcd_url}/openapi.json")


@pytest.fixture(scope="module")
def pool_schema(pool_url: str) -> Any:
    # starting real workers or deleting models is not what this test is about
    return schemathesis.openapi.from_url(f"{pool_url}/openapi.json").exclude(
        path_regex="^/v2/workers/start$|^/v2/models")


def check(program: str, response: Any, path: str) -> None:
    SENT[program] += 1
    assert response.status_code < 500, (path, response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        if path.startswith("/v1/"):
            assert set(body["error"]) == {"message", "type", "param", "code"}
        else:
            error = body["error"]
            assert isinstance(error["code"], str) and error["code"].isupper()
            assert error["message"] and isinstance(error["retriable"], bool)
            echoed = response.headers["x-correlation-id"]
            echoed = echoed[0] if isinstance(echoed, list) else echoed
            assert error["correlation_id"] == echoed


FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def fuzz(schema: Any, program: str) -> None:
    """Run every operation of ``schema`` through hypothesis, one operation at a time."""
    for result in schema.get_all_operations():
        operation = result.ok()

        @FUZZ
        @given(case=operation.as_strategy())
        def one(case: Any) -> None:
            response = case.call(timeout=10)
            check(program, response, case.path)

        one()


def test_orcd_never_5xx_and_keeps_the_envelope(orcd_schema: Any) -> None:
    fuzz(orcd_schema, "rbees-orcd")


def test_pool_managerd_never_5xx_and_keeps_the_envelope(pool_schema: Any) -> None:
    fuzz(pool_schema, "pool-managerd")


def test_enough_requests_and_both_daemons_still_healthy(orcd_url: str, pool_url: str) -> None:
    for program, minimum in MIN_REQUESTS.items():
        assert SENT[program] >= minimum, SENT
    assert httpx.get(f"{orcd_url}/health").json()["status"] == "ok"
    assert httpx.get(f"{pool_url}/health").json()["status"] == "ok"
