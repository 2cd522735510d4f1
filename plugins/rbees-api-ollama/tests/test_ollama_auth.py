"""Auth of Ollama's API: a daemon with a token does not open up for Ollama's clients (which
send no credential by default); they get in with the token as ``OLLAMA_API_KEY``, and every
refusal is in Ollama's ``{"error": ...}`` shape, which the ``ollama`` package reads."""

from __future__ import annotations

from typing import Any

import httpx
import ollama
import pytest
import rbees_api_ollama
from starlette.applications import Starlette

from rbees_core import plugins
from rbees_core.http import build_app

TOKEN = "t0ken-0123456789abcdef"


class Facade:
    """The part of rbees-orcd's service these routes read: no pool, the real plugins."""

    def __init__(self) -> None:
        self.pm = plugins.make_manager(plugins.builtin_plugins())

    def pool_records(self) -> list[dict[str, Any]]:
        return []


def app(token: str | None) -> Any:
    """rbees-orcd's app around the plugin's routes, with a facade that knows no pool."""
    asgi = build_app(rbees_api_ollama.rbees_register_routes(program="rbees-orcd"), token=token)
    inner = asgi
    while not isinstance(inner, Starlette):
        inner = inner.app
    inner.state.orcd = Facade()
    return asgi


def client(asgi: Any, **kwargs: Any) -> ollama.AsyncClient:
    return ollama.AsyncClient(host="http://rbees.test", transport=httpx.ASGITransport(app=asgi),
                              **kwargs)


async def test_a_daemon_with_a_token_refuses_ollama_clients_without_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    asgi = app(TOKEN)
    with pytest.raises(ollama.ResponseError) as refused:
        await client(asgi).list()
    assert refused.value.status_code == 401 and "token" in refused.value.error
    with pytest.raises(ollama.ResponseError) as wrong:
        await client(asgi, headers={"Authorization": "Bearer not-the-token"}).list()
    assert wrong.value.status_code == 401
    for path in ("/api/version", "/api/nowhere"):  # nothing under /api/ is open
        answer = await client(asgi)._client.get(path)
        assert answer.status_code == 401 and set(answer.json()) == {"error"}


async def test_the_token_as_ollama_api_key_lets_them_in(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setenv("OLLAMA_API_KEY", TOKEN)  # the ollama package sends it as a bearer
    assert (await client(app(TOKEN)).list()).models == []
    monkeypatch.delenv("OLLAMA_API_KEY")
    explicit = client(app(TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})
    assert (await explicit.list()).models == []


async def test_without_a_token_they_need_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    asgi = app(None)
    assert (await client(asgi).list()).models == []
    answer = await client(asgi)._client.get("/api/version")
    assert answer.status_code == 200 and answer.json()["version"].count(".") == 2
    with pytest.raises(ollama.ResponseError) as missing:
        await client(asgi).show("no-such-model")
    assert missing.value.status_code == 404 and "not found" in missing.value.error
