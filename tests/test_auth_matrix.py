"""Credentials (issue 25): every route of every daemon, taken from the daemon's own route
table, against every kind of credential; the matrix of expected answers is written here, not
derived from the code it checks, and every cell is asked.

Each route has a class (``ROUTES``: what it needs) and each class a row of answers per
credential (``ANSWERS``): 401 (no credential resolves), 403 (resolved, scope not granted) or
``OK`` (anything but 401/403: the handler ran; a 400 for the empty body, a 404 for the
made-up id). A route that is in a daemon's table but not in ``ROUTES`` fails the test, so a
new route cannot go unchecked. Also: keys are stored hashed (the database holds no key), an
``inference`` key sees only its own jobs, the job record, ``why`` and usage carry the key's
name, a 60 rpm key gets 429 (OpenAI's shape, ``Retry-After``) on its 61st request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbees_core import plugins
from rbees_core.auth import join_token, pool_control_token
from rbees_core.http import build_app
from rbees_core.http.auth import token_resolver
from rbees_core.log import Logger
from rbees_core.orchestrator.service import OrcdSettings, OrchestratorService
from rbees_core.pool import credentials
from rbees_core.programs import orcd, pool_managerd, workerd
from rbees_core.testing import lifespan

TOKEN = "operator-token-0123456789abcdef"
OK = "ok"
CREDENTIALS = ("none", "wrong", "expired", "inference", "read", "admin", "operator",
               "join", "join_other", "control", "worker")

#: class -> credential -> answer. ``join`` is pool p1's join token (the paths use p1),
#: ``join_other`` pool p2's; ``control`` the control token rbees-orcd sends pool p1 and its
#: workers (it opens nothing on rbees-orcd); ``worker`` a made-up worker token.
_NONE = {"none": 401, "wrong": 401, "expired": 401, "worker": 401, "control": 401}
ANSWERS: dict[str, dict[str, Any]] = {
    "open": dict.fromkeys(CREDENTIALS, OK),
    "inference": {**_NONE, "inference": OK, "read": 403, "admin": OK, "operator": OK,
                  "join": 403, "join_other": 403},
    "jobs": {**_NONE, "inference": OK, "read": OK, "admin": OK, "operator": OK,
             "join": 403, "join_other": 403},
    "read": {**_NONE, "inference": 403, "read": OK, "admin": OK, "operator": OK,
             "join": 403, "join_other": 403},
    "admin": {**_NONE, "inference": 403, "read": 403, "admin": OK, "operator": OK,
              "join": 403, "join_other": 403},
    "pool": {**_NONE, "inference": 403, "read": 403, "admin": 403, "operator": OK,
             "join": OK, "join_other": 403},
    "pool_admin": {**_NONE, "inference": 403, "read": 403, "admin": OK, "operator": OK,
                   "join": OK, "join_other": 403},
    # pool-managerd and workers know the operator token and their pool's control token
    # only: keys and join tokens are unknown there (401), whatever their scope; a pool
    # knows its workers' own tokens, which open its ready callback and nothing else
    "operator_only": {**dict.fromkeys(CREDENTIALS, 401), "operator": OK, "control": OK},
    "pool_operator": {**dict.fromkeys(CREDENTIALS, 401), "operator": OK, "control": OK,
                      "worker": 403},
    "ready": {**dict.fromkeys(CREDENTIALS, 401), "operator": OK, "control": OK,
              "worker": OK},
}

#: Every route of rbees-orcd (its own and its plugins') -> its class.
ORCD_ROUTES = {
    ("GET", "/health"): "open", ("GET", "/metrics"): "open", ("GET", "/"): "open",
    ("GET", "/ui/{name}"): "open",
    ("GET", "/openapi.json"): "jobs",
    ("POST", "/v2/tasks"): "inference", ("GET", "/v2/tasks"): "jobs",
    ("GET", "/v2/tasks/{job_id}"): "jobs", ("GET", "/v2/tasks/{job_id}/events"): "jobs",
    ("POST", "/v2/tasks/{job_id}/cancel"): "jobs",
    ("GET", "/v2/tasks/{job_id}/decision"): "jobs",
    ("GET", "/v2/tasks/{job_id}/replay"): "jobs", ("GET", "/v2/decisions"): "read",
    ("GET", "/v2/pools"): "read", ("GET", "/v2/pools/{pool_id}"): "read",
    ("DELETE", "/v2/pools/{pool_id}"): "pool_admin",
    ("POST", "/v2/pools/{pool_id}/heartbeat"): "pool",
    ("POST", "/v2/pools/{pool_id}/drain"): "admin",
    ("GET", "/v2/models"): "read",
    ("POST", "/v1/chat/completions"): "inference", ("POST", "/v1/completions"): "inference",
    ("GET", "/v1/models"): "jobs", ("GET", "/v1/models/{model_id:path}"): "jobs",
    ("POST", "/v1/embeddings"): "inference",
    ("POST", "/v2/pools/{pool_id}/workers"): "admin",
    ("POST", "/v2/pools/{pool_id}/workers/{worker_id}/stop"): "admin",
    ("POST", "/v2/pools/{pool_id}/models/download"): "admin",
    ("POST", "/v2/models/retry"): "admin",
    ("POST", "/v2/keys"): "admin", ("GET", "/v2/keys"): "admin",
    ("POST", "/v2/keys/{name}/revoke"): "admin", ("POST", "/v2/keys/{name}/rotate"): "admin",
    ("GET", "/v2/usage"): "admin", ("POST", "/v2/pools/{pool_id}/join-token"): "admin",
    ("POST", "/v2/pools/{pool_id}/join-token/revoke"): "admin",
    # client-protocol plugins (present when installed)
    ("GET", "/api/version"): "inference", ("GET", "/api/tags"): "inference",
    ("POST", "/api/show"): "inference", ("GET", "/api/ps"): "inference",
    ("POST", "/api/pull"): "admin", ("DELETE", "/api/delete"): "admin",
    ("POST", "/api/embed"): "inference", ("POST", "/api/embeddings"): "inference",
    ("POST", "/api/chat"): "inference", ("POST", "/api/generate"): "inference",
    ("POST", "/api/create"): "admin", ("POST", "/api/copy"): "admin",
    ("POST", "/api/push"): "admin",
    ("POST", "/v1/messages"): "inference", ("POST", "/v1/messages/count_tokens"): "inference",
    ("POST", "/v1/responses"): "inference", ("POST", "/v1/responses/input_tokens"): "inference",
    ("GET", "/v1/responses/{response_id}"): "inference",
    # OpenAI's Batch API (a key's batches run as that key)
    ("POST", "/v1/files"): "inference", ("GET", "/v1/files/{file_id}"): "inference",
    ("GET", "/v1/files"): "inference", ("DELETE", "/v1/files/{file_id}"): "inference",
    ("GET", "/v1/files/{file_id}/content"): "inference",
    ("POST", "/v1/batches"): "inference", ("GET", "/v1/batches"): "inference",
    ("GET", "/v1/batches/{batch_id}"): "inference",
    ("POST", "/v1/batches/{batch_id}/cancel"): "inference",
    ("DELETE", "/v1/responses/{response_id}"): "inference",
    ("POST", "/v1/responses/{response_id}/cancel"): "inference",
    ("GET", "/v1/responses/{response_id}/input_items"): "inference",
}
POOL_ROUTES = {
    ("GET", "/health"): "open", ("GET", "/metrics"): "open",
    ("POST", "/v2/internal/workers/ready"): "ready",
    **{key: "pool_operator" for key in [
        ("GET", "/openapi.json"), ("GET", "/v2/state"), ("GET", "/v2/workers"),
        ("GET", "/v2/workers/{worker_id}"), ("POST", "/v2/workers/start"),
        ("POST", "/v2/workers/{worker_id}/drain"), ("POST", "/v2/workers/{worker_id}/stop"),
        ("GET", "/v2/models"), ("POST", "/v2/rpc/start"), ("POST", "/v2/rpc/{server_id}/stop"),
        ("POST", "/v2/models/download"), ("POST", "/v2/models/retry"),
        ("DELETE", "/v2/models/{model_id:path}")]},
}
WORKER_ROUTES = {
    ("GET", "/health"): "open", ("GET", "/metrics"): "open",
    **{key: "operator_only" for key in [
        ("GET", "/openapi.json"), ("GET", "/v2/ready"), ("GET", "/v2/loading/progress"),
        ("POST", "/v2/execute"), ("POST", "/v2/embed"), ("POST", "/v2/cores"),
        ("POST", "/v2/cancel"), ("POST", "/v2/shutdown")]},
}
#: values for the path parameters: ids nothing has (the handlers answer 404 or 400)
PARAMS = {"job_id": "job-none", "pool_id": "p1", "worker_id": "w-none", "name": "nobody",
          "model_id": "no/such-model", "response_id": "resp-none", "file_id": "file-none",
          "batch_id": "batch-none", "server_id": "rpc-none"}
CORE_ORCD = {k for k in ORCD_ROUTES if not k[1].startswith("/api/")
             and not k[1].startswith(("/v1/messages", "/v1/responses"))}


def table(routes: list[Any]) -> list[tuple[str, str]]:
    """``(method, path template)`` of each route of a daemon's route table (HEAD aside)."""
    return sorted({(m, r.path) for r in routes for m in getattr(r, "methods", None) or ()
                   if m != "HEAD"})


def concrete(template: str) -> str:
    path = template
    if template.endswith("/join-token/revoke"):  # a revocation that works: not p1's, whose
        path = path.replace("{pool_id}", "p9")  # join token the walk goes on using
    for name, value in PARAMS.items():
        path = path.replace(f"{{{name}:path}}", value).replace(f"{{{name}}}", value)
    return "/ui/app.js" if path == "/ui/nobody" else path


def headers_for(creds: dict[str, str], who: str) -> dict[str, str]:
    return {} if who == "none" else {"Authorization": f"Bearer {creds[who]}"}


async def walk(client: httpx.AsyncClient, routes: list[tuple[str, str]],
               classes: dict[tuple[str, str], str], creds: dict[str, str]) -> list[str]:
    """Ask every (route, credential) cell; the cells whose answer is not the expected one."""
    wrong = []
    for method, template in routes:
        assert (method, template) in classes, f"{method} {template} is in no class: add it"
        row = ANSWERS[classes[(method, template)]]
        for who in CREDENTIALS:
            kwargs: dict[str, Any] = {"headers": headers_for(creds, who)}
            if method in ("POST", "PUT", "PATCH"):
                kwargs["json"] = {}
            answer = await client.request(method, concrete(template), **kwargs)
            got: Any = answer.status_code if answer.status_code in (401, 403) else OK
            if got != row[who]:
                wrong.append(f"{method} {template} as {who}: {answer.status_code} "
                             f"(expected {row[who]}) {answer.text[:120]}")
    return wrong


@pytest.fixture
async def orcd_client(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient,
                                                             OrchestratorService]]:
    svc = OrchestratorService(
        OrcdSettings(db_path=str(tmp_path / "orcd.sqlite3"), token=TOKEN),
        plugins.make_manager(plugins.builtin_plugins()), Logger("rbees-orcd"))
    app = orcd.create_app(svc)
    async with lifespan(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://orcd.test",
                                     timeout=30) as client:
            yield client, svc


async def make_keys(svc: OrchestratorService) -> dict[str, str]:
    keys = svc.keys
    creds = {"wrong": "rbk_000000000000_not-a-key", "operator": TOKEN,
             "join": join_token(TOKEN, "p1"), "join_other": join_token(TOKEN, "p2"),
             "control": pool_control_token(TOKEN, "p1"),
             "worker": "rbw_w-none_made-up-worker-token"}
    for scope in ("inference", "read", "admin"):
        creds[scope] = (await asyncio.to_thread(keys.create, scope, [scope]))[1]
    creds["expired"] = (await asyncio.to_thread(
        keys.create, "old", ["admin"], expires_at=time.time() - 1))[1]
    return creds


async def test_every_route_of_rbees_orcd_answers_each_credential_as_the_matrix_says(
        orcd_client: tuple[httpx.AsyncClient, OrchestratorService], tmp_path: Path) -> None:
    client, svc = orcd_client
    creds = await make_keys(svc)
    routes = table(orcd.routes(svc.pm, 0.0))
    assert set(routes) >= CORE_ORCD, sorted(CORE_ORCD - set(routes))
    wrong = await walk(client, routes, ORCD_ROUTES, creds)
    assert not wrong, "\n".join(wrong)
    # the keys are stored hashed: no byte of any key is in the database files
    await asyncio.to_thread(svc.store.close)
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("orcd.sqlite3*"))
    for who in ("inference", "read", "admin", "expired"):
        # rbk_<12 hex>_<secret>: the secret is token_urlsafe, which may hold "_" itself
        secret = creds[who].split("_", 2)[2].encode()
        assert creds[who].encode() not in stored and secret not in stored


async def test_anthropic_clients_send_the_key_as_x_api_key(
        orcd_client: tuple[httpx.AsyncClient, OrchestratorService]) -> None:
    client, svc = orcd_client
    creds = await make_keys(svc)
    assert (await client.get("/v1/models", headers={"x-api-key": creds["inference"]})
            ).status_code == 200
    assert (await client.get("/v1/models", headers={"x-api-key": "wrong"})).status_code == 401
    bad = await client.get("/v2/keys", headers={"x-api-key": creds["inference"]})
    assert bad.status_code == 403 and bad.json()["error"]["code"] == "FORBIDDEN"


@pytest.mark.parametrize("daemon", ["pool-managerd", "rbees-workerd"])
async def test_every_route_of_pools_and_workers_takes_the_operator_or_control_token(
        daemon: str) -> None:
    """Pool and worker routes with the operator token and the pool's control token only
    (as their app factories set them up): no client key, join token or made-up worker
    token opens any of them. The apps run without their service (an ``OK`` cell is the
    handler's 500 here: auth let it through). ``worker`` is a real worker token of the
    pool (worker id w-none): the pool opens its ready callback to it, a worker knows none."""
    pm = plugins.make_manager(plugins.builtin_plugins())
    module: Any = pool_managerd if daemon == "pool-managerd" else workerd
    classes = POOL_ROUTES if daemon == "pool-managerd" else WORKER_ROUTES
    route_list = module.routes(pm, 0.0)
    control = pool_control_token(TOKEN, "p1")
    worker, digest = credentials.new_worker_token("w-none")
    known = token_resolver(TOKEN, control)

    def resolve(credential: str) -> Any:  # as pool_managerd.create_app
        return known(credential) or (credentials.worker_principal(
            credential, {"w-none": digest}) if daemon == "pool-managerd" else None)

    app = build_app(route_list, token=TOKEN, operations=module.OPERATIONS, resolver=resolve)
    creds = {"wrong": "not-the-token", "operator": TOKEN, "inference": "rbk_a_b",
             "read": "rbk_c_d", "admin": "rbk_e_f", "expired": "rbk_g_h",
             "join": join_token(TOKEN, "p1"), "join_other": join_token(TOKEN, "p2"),
             "control": control, "worker": worker}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://d.test") as client:
        wrong = await walk(client, table(route_list), classes, creds)
    assert not wrong, "\n".join(wrong)


async def test_an_inference_key_sees_and_cancels_only_its_own_jobs(
        orcd_client: tuple[httpx.AsyncClient, OrchestratorService]) -> None:
    client, svc = orcd_client
    keys = svc.keys
    alice = (await asyncio.to_thread(keys.create, "alice", ["inference"]))[1]
    bob = (await asyncio.to_thread(keys.create, "bob", ["inference"]))[1]
    reader = (await asyncio.to_thread(keys.create, "reader", ["read"]))[1]

    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    made = await client.post("/v2/tasks", headers=auth(alice),
                             json={"model": "smollm2", "prompt": "Bees", "max_tokens": 2})
    assert made.status_code == 202, made.text
    job_id = made.json()["job_id"]
    mine = await client.get(f"/v2/tasks/{job_id}", headers=auth(alice))
    assert mine.status_code == 200 and mine.json()["owner"] == "alice"
    for path in (f"/v2/tasks/{job_id}", f"/v2/tasks/{job_id}/decision",
                 f"/v2/tasks/{job_id}/events"):
        assert (await client.get(path, headers=auth(bob))).status_code == 404, path
    assert (await client.post(f"/v2/tasks/{job_id}/cancel", headers=auth(bob))
            ).status_code == 404
    listed = (await client.get("/v2/tasks", headers=auth(bob))).json()["jobs"]
    assert job_id not in {j["job_id"] for j in listed}
    seen = (await client.get("/v2/tasks", headers=auth(reader))).json()["jobs"]
    assert job_id in {j["job_id"] for j in seen}
    why = await client.get(f"/v2/tasks/{job_id}/decision", headers=auth(reader))
    assert why.json()["owner"] == "alice"
    assert (await client.post(f"/v2/tasks/{job_id}/cancel", headers=auth(alice))
            ).status_code in (200, 202)
    for _ in range(100):  # the cancel is final once written; usage counts final jobs
        usage = (await client.get("/v2/usage", headers=auth(TOKEN))).json()["usage"]
        if usage:
            break
        await asyncio.sleep(0.05)
    assert [(u["key"], u["model"], u["requests"]) for u in usage] == \
        [("alice", mine.json()["model"], 1)]
    # the same as Prometheus counters, labelled with the key's name
    metrics = (await client.get("/metrics")).text
    model = mine.json()["model"]
    assert f'rbees_key_requests_total{{key="alice",model="{model}"}} 1.0' in metrics
    assert alice not in metrics


async def test_a_key_limited_to_60_requests_a_minute_gets_429_on_the_61st(
        orcd_client: tuple[httpx.AsyncClient, OrchestratorService]) -> None:
    client, svc = orcd_client
    key = (await asyncio.to_thread(svc.keys.create, "slow", ["inference"], rpm=60))[1]
    headers = {"Authorization": f"Bearer {key}"}
    for i in range(60):
        answer = await client.get("/v1/models", headers=headers)
        assert answer.status_code == 200, (i, answer.text)
    limited = await client.get("/v1/models", headers=headers)
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    error = limited.json()["error"]  # OpenAI's shape under /v1
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limited"
    # another key is not slowed by it
    other = (await asyncio.to_thread(svc.keys.create, "fast", ["inference"]))[1]
    assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {other}"})
            ).status_code == 200


async def test_revoked_and_rotated_keys_stop_working_at_once(
        orcd_client: tuple[httpx.AsyncClient, OrchestratorService]) -> None:
    client, _ = orcd_client
    admin = {"Authorization": f"Bearer {TOKEN}"}
    made = await client.post("/v2/keys", headers=admin,
                             json={"name": "ci", "scopes": ["inference"], "expires_in": "30d"})
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            ).status_code == 200
    rotated = (await client.post("/v2/keys/ci/rotate", headers=admin)).json()["key"]
    assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            ).status_code == 401
    assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {rotated}"})
            ).status_code == 200
    listed = (await client.get("/v2/keys", headers=admin)).json()["keys"]
    assert [k["name"] for k in listed] == ["ci"] and "key" not in listed[0]
    assert (await client.post("/v2/keys/ci/revoke", headers=admin)).status_code == 200
    assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {rotated}"})
            ).status_code == 401


async def test_a_key_with_max_jobs_1_gets_429_while_its_job_is_queued(
        orcd_client: tuple[httpx.AsyncClient, OrchestratorService]) -> None:
    client, svc = orcd_client
    key = (await asyncio.to_thread(svc.keys.create, "one", ["inference"], max_jobs=1))[1]
    headers = {"Authorization": f"Bearer {key}"}
    task = {"model": "smollm2", "prompt": "Bees", "max_tokens": 2}
    first = await client.post("/v2/tasks", headers=headers, json=task)
    assert first.status_code == 202, first.text
    job_id = first.json()["job_id"]
    record = (await client.get(f"/v2/tasks/{job_id}", headers=headers)).json()
    assert record["status"] == "queued"  # no pool: it waits
    second = await client.post("/v2/tasks", headers=headers, json=task)
    assert second.status_code == 429 and second.headers["Retry-After"] == "1"
    assert second.json()["error"]["code"] == "RATE_LIMITED"
    on_v1 = await client.post("/v1/completions", headers=headers, json=task)
    assert on_v1.status_code == 429 and on_v1.json()["error"]["type"] == "rate_limit_error"
    await client.post(f"/v2/tasks/{job_id}/cancel", headers=headers)
    for _ in range(100):
        if (await client.get(f"/v2/tasks/{job_id}", headers=headers)).json()["status"] \
                == "cancelled":
            break
        await asyncio.sleep(0.02)
    assert (await client.post("/v2/tasks", headers=headers, json=task)).status_code == 202
