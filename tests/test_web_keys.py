"""The web UI's keys page (issue 25, item 6), in a real headless Chromium against a real
cluster with an operator token: log in (the credential kept in sessionStorage, never in
localStorage), make a key (shown once, kept nowhere), see its usage after it ran a chat
completion, revoke it; a key without the admin scope is told the page is not for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbees_core.testing.cluster import Cluster, up
from tests.test_web_ui import browser, open_page, page, shot

__all__ = ["browser", "page"]  # the fixtures, imported for this module's tests
TOKEN = "web-keys-operator-token-0123456789"
STORED = "() => [sessionStorage, localStorage].map((s) => Object.keys(s).map((k) => s.getItem(k)))"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = up(tmp_path_factory.mktemp("webkeys") / "home", environ={"RBEES_API_TOKEN": TOKEN})
    yield c
    c.rbees("down")


def login(page: Any, url: str, credential: str) -> None:
    open_page(page, url)
    page.wait_for_selector("#token-dialog[open]")
    page.fill("#token-input", credential)
    page.click("#token-save")


def test_an_admin_makes_a_key_sees_it_once_sees_its_usage_and_revokes_it(
        cluster: Cluster, page: Any, tmp_path: Path) -> None:
    login(page, f"{cluster.url}/#/keys", TOKEN)
    page.wait_for_selector("#keys .empty:has-text('No API keys yet')")
    page.fill("#key-name", "alice")
    page.fill("#key-rpm", "60")
    page.click("#key-create")
    page.wait_for_selector("#key-once:not([hidden])")
    key = page.text_content("#key-once-value")
    assert key is not None and key.startswith("rbk_")
    row = page.wait_for_selector("tr[data-key='alice'][data-state='live']")
    assert "inference" in row.text_content() and "60 req/min" in row.text_content()
    # the key is in no storage; the operator token is in this tab's sessionStorage only
    session, local = page.evaluate(STORED)
    assert session == [TOKEN] and local == [] and key not in session
    # the key works, and what it used shows on the page
    answer = httpx.post(f"{cluster.url}/v1/chat/completions", timeout=120,
                        headers={"Authorization": f"Bearer {key}"},
                        json={"model": "smollm2", "max_tokens": 4, "temperature": 0,
                              "messages": [{"role": "user", "content": "Hi"}]})
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    totals = page.wait_for_selector("table.usage-totals tr[data-usage-key='alice']",
                                    timeout=30_000)
    cells = [c.text_content() for c in totals.query_selector_all("td")]
    assert cells == ["alice", "1", str(usage["prompt_tokens"]),
                     str(usage["completion_tokens"])], cells
    shot(page, "keys")
    # leaving the page takes the key shown once with it
    open_page(page, f"{cluster.url}/#/chat")
    open_page(page, f"{cluster.url}/#/keys")
    page.wait_for_selector("tr[data-key='alice']")
    assert page.is_hidden("#key-once") and key not in page.content()
    # revoking takes two clicks; then the key is refused
    page.click("[data-revoke='alice']")
    assert page.get_attribute("tr[data-key='alice']", "data-state") == "live"
    page.click("[data-revoke='alice']")
    page.wait_for_selector("tr[data-key='alice'][data-state='revoked']")
    assert httpx.get(f"{cluster.url}/v1/models", headers={
        "Authorization": f"Bearer {key}"}).status_code == 401


def test_a_key_without_admin_scope_is_told_the_page_is_not_for_it(
        cluster: Cluster, page: Any) -> None:
    made = httpx.post(f"{cluster.url}/v2/keys", headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"name": "reader", "scopes": ["read"]}, timeout=10)
    assert made.status_code == 201, made.text
    login(page, f"{cluster.url}/#/keys", made.json()["key"])
    page.wait_for_selector("#keys-forbidden")
    assert page.get_attribute("#conn", "data-state") == "ok"  # logged in: 403, not 401
