"""The web UI served by rbees-orcd, driven in a real headless Chromium against a real cluster.

The cluster comes from ``rbees up`` (rbees-orcd, pool-managerd, llama.cpp SmolLM2 workers);
the browser is Debian's chromium, driven by playwright. Screenshots of each page land in
``artifacts/screenshots/``.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbees_core.programs.orcd_web import assets
from rbees_core.testing import find_free_port, parse_sse, wait_http
from tests.test_orcd import BIN, COUNTING, Cluster, up

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
HOSTILE = ('<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
           '<b>not bold</b>')
#: Records the length of the newest reply's text every 20 ms into window.__lengths.
SAMPLER = """() => {
  window.__lengths = [];
  clearInterval(window.__sampler);
  window.__sampler = setInterval(() => {
    const all = document.querySelectorAll('.msg.assistant .content');
    window.__lengths.push(all.length ? all[all.length - 1].textContent.length : 0);
  }, 20);
}"""
LAST_REPLY = """() => {
  const all = document.querySelectorAll('.msg.assistant');
  const m = all[all.length - 1];
  return m ? {text: m.querySelector('.content').textContent, pending: m.classList.contains(
    'pending'), meta: m.querySelector('.meta').textContent, job: m.dataset.job || null} : null;
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the web UI tests drive Debian's chromium. "
                    ".ci/run installs it (apt-get install -y chromium).")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[dev]' (scripts/setup.sh does)")
    pw = sync_playwright().start()
    with tempfile.TemporaryDirectory(prefix="rbees-chromium-") as profile:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 860})
        try:
            yield context
        finally:
            context.close()
            pw.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = up(tmp_path_factory.mktemp("webui"))
    yield c
    c.rbees("down")


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh tab; any uncaught script error in it fails the test."""
    tab = browser.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    tab.close()
    assert errors == [], errors


def shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def open_page(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")


def chat_setup(page: Any, cluster: Cluster, *, max_tokens: int) -> None:
    open_page(page, f"{cluster.url}/#/chat")
    page.wait_for_selector("#model option[value='smollm2']", state="attached")
    page.select_option("#model", "smollm2")
    for selector, value in (("#temperature", "0"), ("#max-tokens", str(max_tokens)),
                            ("#seed", "7")):
        page.fill(selector, value)
        page.dispatch_event(selector, "change")


def increases(lengths: list[int]) -> int:
    return sum(1 for a, b in itertools.pairwise(lengths) if b > a)


def crawl(url: str) -> list[str]:
    """The paths of the page's files, found from GET / as a browser would find them."""
    found: list[str] = []
    todo = ["/"]
    while todo:
        path = todo.pop()
        text = httpx.get(f"{url}{path}", timeout=10).text
        refs = re.findall(r'(?:src|href)="(/ui/[^"]+)"', text)
        refs += ["/ui/" + m for m in re.findall(r'from "\./([\w.-]+)"', text)]
        for ref in refs:
            if ref not in found:
                found.append(ref)
                todo.append(ref)
    return found


def test_page_and_assets_load_under_1_s_weigh_under_500_kb_and_stay_local(
        cluster: Cluster, page: Any) -> None:
    paths = crawl(cluster.url)  # also warms the orchestrator
    files = assets()
    assert sorted(paths) == sorted(f"/ui/{n}" for n in files if n != "index.html")
    t0 = time.perf_counter()
    weight = 0
    with httpx.Client(base_url=cluster.url, timeout=10) as client:
        for path in ["/", *paths]:
            answer = client.get(path)
            assert answer.status_code == 200, path
            assert "script-src 'self'" in answer.headers["content-security-policy"]
            weight += len(answer.content)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"GET / and {len(paths)} files took {elapsed:.3f} s"
    assert weight < 500_000, f"the UI weighs {weight} bytes"

    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.setCacheDisabled", {"cacheDisabled": True})
    open_page(page, f"{cluster.url}/#/dashboard")
    timing = page.evaluate("""() => {
      const nav = performance.getEntriesByType('navigation')[0];
      return {load: nav.loadEventEnd - nav.startTime,
              files: performance.getEntriesByType('resource').map(r => r.name)};
    }""")
    assert 0 < timing["load"] < 1000, timing
    assert {f"{cluster.url}{p}" for p in paths} <= set(timing["files"])
    outside = [u for u in requests if not u.startswith(cluster.url)]
    assert outside == [], f"the page reached outside its origin: {outside}"
    print(f"\nweb UI: {weight} bytes in {len(paths) + 1} files; GET all {elapsed * 1000:.0f} ms;"
          f" browser load {timing['load']:.0f} ms")


def test_model_output_renders_as_text_never_as_html(cluster: Cluster, page: Any) -> None:
    open_page(page, f"{cluster.url}/#/chat")
    got = page.evaluate("""async (s) => {
      const { renderInto } = await import('/ui/render.js');
      const out = {};
      for (const mode of ['text', 'markdown']) {
        const el = document.createElement('div');
        document.body.append(el);
        renderInto(el, s, mode);
        out[mode] = {text: el.textContent, tags: [...el.querySelectorAll('*')].map(e => e.tagName)};
      }
      const md = document.createElement('div');
      renderInto(md, '**bold** `<i>x</i>`\\n\\n```\\n'
        + '<img src=x onerror="window.__pwned=3">\\n```\\n'
        + '[a](javascript:window.__pwned=4) [b](https://example.org/)', 'markdown');
      out.md = {tags: [...md.querySelectorAll('*')].map(e => e.tagName),
                hrefs: [...md.querySelectorAll('a')].map(a => a.getAttribute('href')),
                text: md.textContent};
      await new Promise(r => setTimeout(r, 300));
      out.pwned = window.__pwned ?? null;
      return out;
    }""", HOSTILE)
    assert got["text"] == {"text": HOSTILE, "tags": []}
    assert got["markdown"] == {"text": HOSTILE, "tags": ["P"]}
    assert got["md"]["tags"] == ["P", "STRONG", "CODE", "PRE", "CODE", "P", "A"]
    assert got["md"]["hrefs"] == ["https://example.org/"]
    assert "<i>x</i>" in got["md"]["text"] and "[a](javascript:" in got["md"]["text"]
    assert got["pwned"] is None

    # the same through the chat page's own drawing of a stored conversation
    page.evaluate("""(s) => localStorage.setItem('rbees.chat.v1', JSON.stringify({
      current: 'x', conversations: [{id: 'x', title: 'hostile', created: 0, messages: [
        {role: 'user', content: s}, {role: 'assistant', model: 'smollm2', content: s}]}],
      settings: {markdown: true}}))""", HOSTILE)
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_timeout(300)
    drawn = page.evaluate("""() => ({
      texts: [...document.querySelectorAll('.msg .content')].map(e => e.textContent),
      injected: document.querySelectorAll('#messages script, #messages img, #messages b').length,
      pwned: window.__pwned ?? null})""")
    assert drawn == {"texts": [HOSTILE, HOSTILE], "injected": 0, "pwned": None}
    page.evaluate("() => localStorage.removeItem('rbees.chat.v1')")


def test_chat_reply_streams_token_by_token_and_is_kept(cluster: Cluster, page: Any) -> None:
    chat_setup(page, cluster, max_tokens=48)
    page.evaluate(SAMPLER)
    page.fill("#prompt", "Tell me three facts about honey bees.")
    page.press("#prompt", "Enter")
    page.wait_for_function("() => { const m = [...document.querySelectorAll('.msg.assistant')]"
                           ".pop(); return m && !m.classList.contains('pending'); }",
                           timeout=120_000)
    lengths = page.evaluate("() => { clearInterval(window.__sampler); return window.__lengths; }")
    reply = page.evaluate(LAST_REPLY)
    assert reply["text"].strip() and "done" in reply["meta"], reply
    assert increases(lengths) >= 3, f"the reply grew in only {increases(lengths)} steps"
    assert cluster.job(reply["job"])["status"] == "completed"
    shot(page, "chat")
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.evaluate(LAST_REPLY)["text"] == reply["text"]  # kept in localStorage


def test_stop_mid_reply_cancels_the_job_and_nothing_more_appears(
        cluster: Cluster, page: Any) -> None:
    chat_setup(page, cluster, max_tokens=2000)
    page.click("#new-conv")
    page.fill("#prompt", COUNTING)
    page.press("#prompt", "Enter")
    page.wait_for_function("() => { const m = [...document.querySelectorAll('.msg.assistant')]"
                           ".pop(); return m && m.querySelector('.content').textContent.length"
                           " > 30; }", timeout=120_000)
    page.click("#stop")
    page.wait_for_function("() => !document.querySelector('.msg.assistant.pending')",
                           timeout=10_000)
    stopped = page.evaluate(LAST_REPLY)
    page.evaluate(SAMPLER)
    page.wait_for_timeout(1500)
    lengths = page.evaluate("() => { clearInterval(window.__sampler); return window.__lengths; }")
    assert set(lengths) == {len(stopped["text"])}, "the reply grew after Stop"
    assert "stopped" in stopped["meta"]
    shot(page, "chat-stopped")
    record = cluster.job(stopped["job"])
    assert record["status"] == "cancelled"
    assert 0 < record["tokens_out"] < 2000
    assert page.evaluate("() => document.querySelector('#stop').hidden")


def test_dashboard_shows_pool_cpu_worker_jobs_why_and_charts(
        cluster: Cluster, page: Any) -> None:
    job_id = cluster.submit(max_tokens=6)["job_id"]
    assert cluster.events(job_id)[-1][1] == "end"
    pool = httpx.get(f"{cluster.url}/v2/pools", timeout=10).json()["pools"][0]
    worker = next(w for w in pool["workers"] if w["state"] in ("ready", "busy"))
    open_page(page, f"{cluster.url}/#/dashboard")
    card = page.wait_for_selector(f"article.pool[data-pool='{pool['pool_id']}']")
    assert "ready" in card.text_content() and "last heartbeat" in card.text_content()
    ram = page.wait_for_selector(f"article.pool[data-pool='{pool['pool_id']}'] "
                                 ".device[data-device='cpu'] [role=meter]")
    assert 0 < int(ram.get_attribute("aria-valuenow")) < int(ram.get_attribute("aria-valuemax"))
    row = page.wait_for_selector(f"tr[data-worker='{worker['worker_id']}']")
    assert "smollm2" in row.text_content() and worker["state"] in row.text_content()
    assert f"/ {worker['slots_total']} busy" in row.text_content()
    job_row = page.wait_for_selector(f"tr[data-job='{job_id}']")
    assert "completed" in job_row.text_content() and " ms" in job_row.text_content()
    page.click(f"button[data-why='{job_id}']")
    why = page.wait_for_selector(f"pre[data-why-for='{job_id}']:has-text('Policy')")
    assert worker["worker_id"] in why.text_content()
    # what another policy would have done, re-decided on the decision's recorded snapshot
    other = page.wait_for_selector(f"div[data-replay-for='{job_id}'] li")
    assert "(least-loaded) →" in other.text_content(), other.text_content()
    page.select_option(f"div[data-replay-for='{job_id}'] select", "spread")
    page.wait_for_selector(f"div[data-replay-for='{job_id}'] option[value='spread'][selected]",
                           state="attached")
    assert "(least-loaded) →" in page.wait_for_selector(
        f"div[data-replay-for='{job_id}'] li").text_content()
    for stat in ("queue-interactive", "queue-batch", "running", "tps"):
        assert page.query_selector(f"[data-stat='{stat}']") is not None
    page.wait_for_function("() => document.querySelectorAll('svg.linechart path.line').length"
                           " == 2", timeout=10_000)
    shot(page, "dashboard")


def test_batches_page_shows_progress_counts_and_status_and_cancels(
        cluster: Cluster, page: Any) -> None:
    import json

    import openai

    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "smollm2", "max_tokens": 4, "temperature": 0, "seed": i,
                       "messages": [{"role": "user", "content": f"Count from {i}:"}]}}
             for i in range(3)]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    done = client.batches.create(
        input_file_id=client.files.create(file=("b.jsonl", data), purpose="batch").id,
        endpoint="/v1/chat/completions", completion_window="24h")
    hour = time.localtime().tm_hour  # a window that is closed now: its lines wait
    closed = f"{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00"
    waiting = client.batches.create(
        input_file_id=client.files.create(file=("w.jsonl", data), purpose="batch").id,
        endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"rbees_window": closed})
    deadline = time.monotonic() + 120
    while client.batches.retrieve(done.id).status != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    open_page(page, f"{cluster.url}/#/batches")
    row = page.wait_for_selector(f"tr[data-batch='{done.id}'][data-status='completed']")
    assert "3 / 3 answered" in row.text_content() and "3 ok · 0 failed" in row.text_content()
    with page.expect_download() as download:
        page.click(f"tr[data-batch='{done.id}'] button:has-text('output')")
    saved = Path(download.value.path()).read_text().splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in saved) == ["r0", "r1", "r2"]
    other = page.wait_for_selector(f"tr[data-batch='{waiting.id}']")
    assert f"window {closed}" in other.text_content() and "0 / 3 answered" in \
        other.text_content()
    shot(page, "batches")
    page.click(f"button[data-cancel='{waiting.id}']")
    page.wait_for_selector(f"tr[data-batch='{waiting.id}'][data-status='cancelled']",
                           timeout=60_000)
    assert client.batches.retrieve(waiting.id).status == "cancelled"


def test_models_page_starts_a_worker_that_appears_and_stops_it(
        cluster: Cluster, page: Any) -> None:
    open_page(page, f"{cluster.url}/#/models")
    page.wait_for_selector("tr[data-model='smollm2']")
    page.wait_for_selector("#start-device option[value='cpu']", state="attached")
    page.select_option("#start-model", "smollm2")
    page.select_option("#start-device", "cpu")
    page.fill("#start-slots", "2")
    page.click("#start-worker")
    note = page.wait_for_selector("#models-note[data-started]", timeout=30_000)
    worker_id = note.get_attribute("data-started")
    row = f"#model-workers tr[data-worker='{worker_id}']"
    page.wait_for_selector(f"{row}:has-text('ready')", timeout=90_000)
    assert "0 / 2 busy" in page.text_content(row)
    shot(page, "models")
    page.click("#download")  # the embedded model: the pool answers `end` at once
    page.wait_for_selector("#models-note:has-text('Downloaded smollm2 to')", timeout=30_000)
    page.click(f"{row} button[data-stop]")
    page.wait_for_function(
        "(sel) => { const r = document.querySelector(sel); return !r ||"
        " /stopp|failed/.test(r.textContent); }", arg=row, timeout=60_000)
    states = {w["worker_id"]: w["state"] for w in httpx.get(
        f"{cluster.pool_url}/v2/workers", timeout=10).json()["workers"]}
    assert states.get(worker_id) in (None, "stopping", "stopped"), states


def test_worker_endpoints_relay_the_pool_and_are_documented(cluster: Cluster) -> None:
    pool_id = httpx.get(f"{cluster.url}/v2/pools", timeout=10).json()["pools"][0]["pool_id"]
    refused = httpx.post(f"{cluster.url}/v2/pools/{pool_id}/workers",
                         json={"model_ref": "no-such-model"}, timeout=30)
    assert refused.status_code == 409  # the pool's preflight answer, relayed
    assert refused.json()["error"]["code"] == "MODEL_NOT_FOUND"
    assert refused.json()["error"]["correlation_id"] == refused.headers["x-correlation-id"]
    nobody = httpx.post(f"{cluster.url}/v2/pools/nopool/workers", json={"model_ref": "smollm2"})
    assert nobody.status_code == 404 and nobody.json()["error"]["code"] == "NOT_FOUND"
    bad = httpx.post(f"{cluster.url}/v2/pools/{pool_id}/workers", json={"model": "smollm2"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_PARAMS"
    gone = httpx.post(f"{cluster.url}/v2/pools/{pool_id}/workers/nope/stop", timeout=30)
    assert gone.status_code == 404 and "nope" in gone.json()["error"]["message"]
    paths = httpx.get(f"{cluster.url}/openapi.json").json()["paths"]
    assert paths["/v2/pools/{pool_id}/workers"]["post"]["responses"]["202"]
    assert "/v2/pools/{pool_id}/workers/{worker_id}/stop" in paths
    assert "/v2/pools/{pool_id}/models/download" in paths
    relayed = httpx.post(f"{cluster.url}/v2/pools/{pool_id}/models/download",
                         json={"model": "smollm2"}, timeout=60)  # embedded: nothing to fetch
    assert relayed.headers["content-type"].startswith("text/event-stream")
    assert parse_sse(relayed.text)[-1][1] == "end"
    unknown = httpx.post(f"{cluster.url}/v2/pools/{pool_id}/models/download",
                         json={"model": "no-such-model"}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "MODEL_NOT_FOUND"
    for open_path in ("/", "/ui/{name}"):
        assert "security" not in paths[open_path]["get"]


def test_with_a_token_the_page_loads_asks_for_it_and_sends_it(
        tmp_path: Path, page: Any) -> None:
    token = "web-ui-token-0123456789"
    port = find_free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(BIN / "rbees-orcd"), "--bind", f"127.0.0.1:{port}"],
                            env={**os.environ, "RBEES_HOME": str(tmp_path),
                                 "RBEES_API_TOKEN": token},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"{url}/health", timeout=30, proc=proc)
        assert httpx.get(f"{url}/").status_code == 200
        assert httpx.get(f"{url}/ui/app.js").status_code == 200
        assert httpx.get(f"{url}/ui/nothing.js").status_code == 404
        assert httpx.get(f"{url}/v2/pools").status_code == 401
        sent: list[str | None] = []
        page.on("request", lambda r: sent.append(r.headers.get("authorization"))
                if "/v2/" in r.url else None)
        open_page(page, f"{url}/#/dashboard")
        page.wait_for_selector("#token-dialog[open]")
        shot(page, "token")
        page.fill("#token-input", "a-wrong-token-000000")
        page.click("#token-save")
        page.wait_for_selector("#token-dialog[open] #token-why:has-text('refused')")
        page.fill("#token-input", token)
        page.click("#token-save")
        page.wait_for_selector("#pools .empty:has-text('No pool has registered')")
        assert page.get_attribute("#conn", "data-state") == "ok"
        assert f"Bearer {token}" in sent
        # kept for this tab only (issue 25): sessionStorage, never localStorage
        assert page.evaluate("() => sessionStorage.getItem('rbees.token')") == token
        assert page.evaluate("() => localStorage.getItem('rbees.token')") is None
        # a GPU pool (this machine has none: the heartbeat is in pool-managerd's shape)
        beat = {"pool_id": "gpu-box", "host": "gpu-box.lan", "seq": 1, "sent_at": time.time(),
                "cpu": {"cores": 16, "ram_total_bytes": 2**36, "ram_free_bytes": 2**35},
                "gpus": [{"index": 0, "uuid": "GPU-1", "name": "RTX 3090", "backend": "cuda",
                          "memory_total_bytes": 24 * 2**30, "memory_free_bytes": 18 * 2**30,
                          "memory_reserved_bytes": 2**30, "utilization": 0.25,
                          "temperature_c": 55, "power_w": 210.0}],
                "workers": [], "models": [], "url": "http://127.0.0.1:9"}
        answer = httpx.post(f"{url}/v2/pools/gpu-box/heartbeat", json=beat,
                            headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text
        gpu = page.wait_for_selector("article.pool[data-pool='gpu-box'] "
                                     ".device[data-device='cuda:0']")
        assert "RTX 3090" in gpu.text_content() and "25% busy" in gpu.text_content()
        assert "VRAM 6.0 GiB / 24.0 GiB used, 1.0 GiB reserved" in gpu.text_content()
        shot(page, "dashboard-gpu")
    finally:
        proc.terminate()
        proc.wait(30)
