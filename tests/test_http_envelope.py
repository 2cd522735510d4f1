"""Which envelope an error takes: OpenAI's under /v1/, rbees' elsewhere (CONTRACT section 1),
for the errors no route raises too -- the router's 404 and 405, the token check's 401, a
crash's 500 (found by the structural fuzz: ``GET /v1/chat/completions`` was a 405 in rbees'
shape, which OpenAI clients cannot read)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rbees_core.errors import InvalidParamsError, NotFoundError
from rbees_core.http import build_app, parse_json

TOKEN = "t0ken-0123456789abcdef"


async def ok(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def crash(request: Request) -> Response:
    raise RuntimeError("boom")


async def missing(request: Request) -> Response:
    raise NotFoundError("no such thing")


def client() -> httpx.AsyncClient:
    routes = [Route(f"{prefix}/{name}", handler, methods=["POST"])
              for prefix in ("/v1", "/v2") for name, handler in
              (("ok", ok), ("crash", crash), ("missing", missing))]
    app = build_app(routes, token=TOKEN)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://rbees.test",
                             headers={"Authorization": f"Bearer {TOKEN}"})


def openai_shape(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"]
    return dict(error)


def rbees_shape(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert error["code"].isupper() and isinstance(error["retriable"], bool), error
    assert error["correlation_id"] == response.headers["x-correlation-id"]
    return dict(error)


@pytest.mark.parametrize(("method", "path", "status", "kind"), [
    ("GET", "ok", 405, "invalid_request_error"),
    ("POST", "nowhere", 404, "not_found_error"),
    ("POST", "missing", 404, "not_found_error"),
    ("POST", "crash", 500, "server_error"),
])
async def test_each_error_under_v1_is_in_openai_shape_and_in_rbees_shape_elsewhere(
        method: str, path: str, status: int, kind: str) -> None:
    async with client() as c:
        v1 = await c.request(method, f"/v1/{path}")
        assert v1.status_code == status
        assert openai_shape(v1)["type"] == kind
        assert v1.headers["x-correlation-id"]
        v2 = await c.request(method, f"/v2/{path}")
        assert v2.status_code == status
        rbees_shape(v2)


async def test_a_missing_token_on_v1_is_a_401_in_openai_shape() -> None:
    async with client() as c:
        v1 = await c.post("/v1/ok", headers={"Authorization": "Bearer wrong"})
        assert v1.status_code == 401 and v1.headers["www-authenticate"] == "Bearer"
        error = openai_shape(v1)
        assert error["type"] == "authentication_error" and error["code"] == "unauthenticated"
        v2 = await c.post("/v2/ok", headers={"Authorization": "Bearer wrong"})
        assert rbees_shape(v2)["code"] == "UNAUTHENTICATED"
        assert (await c.post("/v1/ok")).json() == {"ok": True}


async def test_the_token_may_come_as_x_api_key_as_anthropics_clients_send_it() -> None:
    async with client() as c:
        assert (await c.post("/v2/ok", headers={"Authorization": "", "x-api-key": TOKEN})
                ).json() == {"ok": True}
        wrong = await c.post("/v2/ok", headers={"Authorization": "", "x-api-key": "wrong"})
        assert wrong.status_code == 401
        empty = await c.post("/v2/ok", headers={"Authorization": "", "x-api-key": ""})
        assert empty.status_code == 401


@pytest.mark.parametrize(("raw", "field"), [
    (b'{"a": NaN}', "a"), (b'{"a": {"b": Infinity}}', "b"), (b'{"a": [-Infinity]}', "body"),
    (b'{"size_bytes": 1e400}', "size_bytes"), (b"1e400", "body"), (b"[NaN]", "body"),
])
def test_a_number_that_is_not_finite_is_refused_where_it_is(raw: bytes, field: str) -> None:
    """Found by the structural fuzz: a heartbeat whose free-form ``models`` held 1e400 was
    accepted, and every GET /v2/pools after it was a 500 (JSON cannot carry inf back)."""
    with pytest.raises(InvalidParamsError) as caught:
        parse_json(raw)
    assert caught.value.field == field and "finite" in caught.value.message
    assert parse_json(b'{"a": 1e300, "b": -0.0, "c": 10}') == {"a": 1e300, "b": -0.0, "c": 10}


async def test_a_registered_prefix_answers_every_error_in_its_shape() -> None:
    """A protocol plugin's room (Ollama's /api/) answers its routes' errors, the token
    check's 401, the router's 404/405 and a crash's 500 in its own shape; /v1 and /v2 keep
    theirs."""
    from rbees_core.http import app as http_app
    from rbees_core.http import register_error_shape

    def plain(status: int, message: str, code: str, field: str | None) -> dict[str, Any]:
        return {"error": message}

    with pytest.raises(ValueError):
        register_error_shape("api", plain)
    register_error_shape("/x-test/", plain)
    try:
        routes = [Route("/x-test/ok", ok, methods=["POST"]),
                  Route("/x-test/missing", missing, methods=["POST"]),
                  Route("/x-test/crash", crash, methods=["POST"]),
                  Route("/v1/ok", ok, methods=["POST"])]
        app = build_app(routes, token=TOKEN)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://rbees.test") as c:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            answers = [await c.post("/x-test/ok"),  # no token
                       await c.post("/x-test/missing", headers=auth),
                       await c.get("/x-test/ok", headers=auth),
                       await c.post("/x-test/nowhere", headers=auth),
                       await c.post("/x-test/crash", headers=auth)]
            assert [a.status_code for a in answers] == [401, 404, 405, 404, 500]
            for a in answers:
                assert set(a.json()) == {"error"} and isinstance(a.json()["error"], str), a.text
            openai_shape(await c.post("/v1/ok"))
    finally:
        http_app._ERROR_SHAPES.pop("/x-test/", None)
