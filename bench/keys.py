"""Section (k) of bench/orchestrator.py: what checking an API key adds to an admission
(issue 25; target < 0.2 ms).

In process, no network: rbees-orcd's auth middleware (rbees_core/http/auth.py) with its real
resolver (a KeyRing over a store holding 100 keys, rbees_core/orchestrator/keys.py) and its
real route policy (every route of rbees-orcd), in front of an app that answers at once;
``POST /v2/tasks`` sent through it with the operator token, an inference key with a 1e9 rpm
limit (the rate-limit path counted too) and through the bare app. The median of many calls,
per case; the added cost is the key's median minus the bare app's.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_MS = 0.2


async def _bare(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 202, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def _scope(credential: str | None) -> dict[str, Any]:
    headers = [(b"content-type", b"application/json")]
    if credential:
        headers.append((b"authorization", f"Bearer {credential}".encode()))
    return {"type": "http", "method": "POST", "path": "/v2/tasks", "headers": headers}


async def _time(app: Any, credential: str | None, calls: int) -> list[float]:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await app(_scope(credential), receive, send)
        samples.append((time.perf_counter() - t0) * 1000)
    assert set(statuses) == {202}, set(statuses)
    return samples


def bench_key_check(calls: int = 20000) -> list[str]:
    """The (k) rows: median ms per admission through the middleware, and the verdict."""
    from rbees_core import plugins
    from rbees_core.auth import RoutePolicy
    from rbees_core.http import OPEN_PATHS, OPEN_PREFIX
    from rbees_core.http.app import error_response
    from rbees_core.http.auth import AuthMiddleware
    from rbees_core.orchestrator.keys import KeyRing
    from rbees_core.orchestrator.store import Store
    from rbees_core.programs import orcd

    token = "bench-operator-token-0123456789"
    pm = plugins.make_manager(plugins.builtin_plugins())
    policy = RoutePolicy(orcd.operations(), orcd.routes(pm, 0.0), open_paths=OPEN_PATHS,
                         open_prefixes=(OPEN_PREFIX,))
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "orcd.sqlite3") as store:
        keys = KeyRing(store, token)
        for i in range(99):
            keys.create(f"k{i}", ["inference"])
        _, key = keys.create("bench", ["inference"], rpm=10**9)
        app = AuthMiddleware(_bare, keys.resolve, policy, error_response)
        cases = {"bare app (no auth)": (_bare, None), "operator token": (app, token),
                 "API key (inference, rpm limit)": (app, key)}
        medians = {}
        for name, (target, credential) in cases.items():
            asyncio.run(_time(target, credential, 500))  # warm
            medians[name] = statistics.median(asyncio.run(_time(target, credential, calls)))
    added = medians["API key (inference, rpm limit)"] - medians["bare app (no auth)"]
    rows = ["| case | median ms per POST /v2/tasks through the middleware |", "|---|---:|"]
    rows += [f"| {name} | {ms:.4f} |" for name, ms in medians.items()]
    verdict = "PASS" if added < TARGET_MS else "FAIL"
    rows.append(f"\nkey checking adds {added:.4f} ms to an admission (target < {TARGET_MS} "
                f"ms): {verdict}")
    return rows


if __name__ == "__main__":
    print("\n".join(bench_key_check()))
