"""Steps of jobs through rbees-orcd: submit, stream, cancel, failures, OpenAI, the queue."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from pytest_bdd import given, parsers, then, when
from world import HEARTBEAT_S, World, wait_until

from rbees_core.testing import find_free_port, follow_events, parse_sse

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
ORDINALS = {"1st": 0, "2nd": 1, "3rd": 2}


def submit(world: World, body: dict[str, Any], url: str | None = None) -> httpx.Response:
    return world.http("POST", f"{url or world.blep.orcd_url}/v2/tasks", json=body, timeout=30)


def events(world: World, job_id: str, after: int = 0, url: str | None = None, timeout: float = 180
           ) -> list[tuple[int | None, str, Any]]:
    got = world.http("GET", f"{url or world.blep.orcd_url}/v2/tasks/{job_id}/events",
                     headers={"Last-Event-ID": str(after)}, timeout=timeout)
    assert got.status_code == 200, got.text
    return parse_sse(got.text)


def job(world: World, job_id: str) -> dict[str, Any]:
    return dict(world.http("GET", f"{world.blep.orcd_url}/v2/tasks/{job_id}", timeout=10).json())


@when("I submit a task to the orchestrator with:")
def submit_task(world: World, ctx: dict[str, Any], docstring: str) -> None:
    ctx["submitted_at"] = time.monotonic()
    got = submit(world, json.loads(docstring))
    assert got.status_code == 202, got.text
    ctx["job_id"] = got.json()["job_id"]


@then(parsers.parse('the job ends with "{terminal}"'))
def job_ends(world: World, ctx: dict[str, Any], terminal: str) -> None:
    frames = events(world, ctx["job_id"])
    ctx["ended_at"] = time.monotonic()  # the stream is read to its terminal event
    assert frames[-1][1] == terminal, frames[-3:]
    ctx["frames"] = frames


@then(parsers.parse('the job ran on pool "{pool}"'))
def job_pool(world: World, ctx: dict[str, Any], pool: str) -> None:
    assert job(world, ctx["job_id"])["pool_id"] == pool


@then(parsers.parse("replaying its events after event {after:d} starts at event {first:d} with "
                    "no duplicates"))
def replay(world: World, ctx: dict[str, Any], after: int, first: int) -> None:
    frames = events(world, ctx["job_id"], after=after)
    ids = [i for i, _, _ in frames]
    assert ids[0] == first and ids == list(range(first, first + len(ids))), ids
    assert [e for _, e, _ in frames][-1] == "end"


# -- a long job, cancelled or failed ------------------------------------------------------------


@given("a long job is streaming")
@given(parsers.parse('a long job is streaming on pool "{pool}"'))
def long_job(world: World, ctx: dict[str, Any], pool: str | None = None) -> None:
    placement = {"placement": {"pool": pool}} if pool else {}
    got = submit(world, {"model": "smollm2", "prompt": COUNTING, "max_tokens": 3000,
                         "temperature": 0, **placement})
    assert got.status_code == 202, got.text
    job_id = got.json()["job_id"]
    live = follow_events(f"{world.blep.orcd_url}/v2/tasks/{job_id}/events",
                         headers=world.auth(), timeout=120)
    assert live.first_token.wait(60), live.seen
    ctx.update(job_id=job_id, seen=live.seen, reader=live.thread)


@when("the worker running it is killed")
def kill_worker(world: World, ctx: dict[str, Any]) -> None:
    record = job(world, ctx["job_id"])
    worker = world.http("GET", f"{world.host(record['pool_id']).pool_url}/v2/workers/"
                               f"{record['worker_id']}").json()
    os.kill(int(worker["pid"]), signal.SIGKILL)
    ctx["killed_at"] = time.monotonic()


def stream_end(ctx: dict[str, Any]) -> tuple[float, str, Any]:
    ctx["reader"].join(60)
    assert not ctx["reader"].is_alive(), "the stream did not end"
    return tuple(ctx["seen"][-1])  # type: ignore[return-value]


@then(parsers.parse('the stream ends with "{terminal}" code "{code}" and no token after the '
                    'cancel'))
def ends_cancelled(ctx: dict[str, Any], terminal: str, code: str) -> None:
    _, event, data = stream_end(ctx)
    assert (event, data["code"]) == (terminal, code), ctx["seen"][-3:]
    late = [t for t, e, _ in ctx["seen"] if e == "token" and t > ctx["done_at"]]
    assert not late, f"{len(late)} tokens after the cancel"


@then(parsers.parse('the stream ends with "{terminal}" code "{code}" within {seconds:d} seconds '
                    'of the kill'))
def ends_failed(ctx: dict[str, Any], terminal: str, code: str, seconds: int) -> None:
    at, event, data = stream_end(ctx)
    assert (event, data["code"]) == (terminal, code), ctx["seen"][-3:]
    assert at - ctx["killed_at"] < seconds, at - ctx["killed_at"]


# -- pools lost and regained -------------------------------------------------------------------


@then(parsers.parse('the pool "{name}" is "{status}" within 3 heartbeats and a margin'))
def pool_status_heartbeats(world: World, name: str, status: str) -> None:
    wait_until(lambda: world.pools().get(name) == status, 3 * HEARTBEAT_S + 3,
               f"pool {name} {status}")


@then(parsers.parse('the pools "{first}" and "{second}" are "{status}"'))
def pools_are(world: World, first: str, second: str, status: str) -> None:
    pools = world.pools()
    assert pools.get(first) == status and pools.get(second) == status, pools


@then(parsers.parse('the pool "{name}" is "{status}" within {seconds:d} seconds'))
def pool_status_within(world: World, name: str, status: str, seconds: int) -> None:
    wait_until(lambda: world.pools().get(name) == status, seconds, f"pool {name} {status}")


@when(parsers.parse("{count:d} batch jobs are submitted"))
@when(parsers.parse('{count:d} batch jobs preferring pool "{pool}" are submitted'))
def batch_jobs(world: World, ctx: dict[str, Any], count: int, pool: str | None = None) -> None:
    ids = []
    placement = {"placement": {"prefer_pools": [pool]}} if pool else {}
    for i in range(count):
        got = submit(world, {"model": "smollm2", "prompt": f"Number {i}:", "max_tokens": 3,
                             "priority": "batch", **placement})
        assert got.status_code == 202, got.text
        ids.append(got.json()["job_id"])
    ctx["job_ids"] = ids


@then(parsers.parse('every job ends with "{terminal}" on pool "{pool}"'))
def every_job_on(world: World, ctx: dict[str, Any], terminal: str, pool: str) -> None:
    for job_id in ctx["job_ids"]:
        assert events(world, job_id)[-1][1] == terminal
        assert job(world, job_id)["pool_id"] == pool


@when("rbees-orcd on blep is killed with SIGKILL and started again")
def restart_orcd(world: World) -> None:
    time.sleep(0.5)  # some done, some running, most queued
    world.kill("orcd")
    world.start_orcd()


@then("every job reaches exactly one terminal event")
def exactly_once(world: World, ctx: dict[str, Any]) -> None:
    failed = []
    for job_id in ctx["job_ids"]:
        frames = events(world, job_id)
        terminals = [(e, d) for _, e, d in frames if e in ("end", "error")]
        assert len(terminals) == 1, (job_id, frames)
        assert [i for i, _, _ in frames] == list(range(1, len(frames) + 1)), frames
        if terminals[0][0] == "error":
            failed.append(terminals[0][1]["code"])
    ctx["failed_codes"] = failed


@then(parsers.parse('at most {count:d} job failed with "{code}"'))
@then(parsers.parse('at most {count:d} jobs failed with "{code}"'))
def at_most_failed(ctx: dict[str, Any], count: int, code: str) -> None:
    assert set(ctx["failed_codes"]) <= {code} and len(ctx["failed_codes"]) <= count, \
        ctx["failed_codes"]


# -- OpenAI ------------------------------------------------------------------------------------


def openai_client(world: World) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{world.blep.orcd_url}/v1", api_key=world.token,
                         max_retries=0, timeout=120)


@when(parsers.parse('the openai client asks the orchestrator for a chat completion of "{text}"'))
def openai_chat(world: World, ctx: dict[str, Any], text: str) -> None:
    with openai_client(world) as client:  # closed: its socket would outlive the step
        ctx["completion"] = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": text}], max_tokens=8)


@then("the completion has text and usage")
def completion_ok(ctx: dict[str, Any]) -> None:
    completion = ctx["completion"]
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens > 0


@when(parsers.parse('the openai client streams a chat completion of "{text}" with include_usage'))
def openai_stream(world: World, ctx: dict[str, Any], text: str) -> None:
    with openai_client(world) as client:
        ctx["chunks"] = list(client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": text}], max_tokens=8,
            stream=True, stream_options={"include_usage": True}))


@then("the chunks carry text and the last one carries usage")
def stream_ok(ctx: dict[str, Any]) -> None:
    chunks = ctx["chunks"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


@when("the openai client lists the models")
def openai_models(world: World, ctx: dict[str, Any]) -> None:
    with openai_client(world) as client:
        ctx["models"] = [m.id for m in client.models.list()]


@then(parsers.parse('"{model}" is among them'))
def model_listed(ctx: dict[str, Any], model: str) -> None:
    assert model in ctx["models"], ctx["models"]


@when(parsers.parse('the openai client asks for a chat completion with model "{model}"'))
def openai_unknown(world: World, ctx: dict[str, Any], model: str) -> None:
    import openai

    try:
        openai_client(world).chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    except openai.APIStatusError as exc:
        ctx["error"] = exc
    else:
        raise AssertionError("no error")


@then(parsers.parse("the client raises an error with status {status:d}"))
def openai_error(ctx: dict[str, Any], status: int) -> None:
    error = ctx["error"]
    assert error.status_code == status
    assert error.body and "message" in error.body, error.body


# -- the queue's capacity ------------------------------------------------------------------------


def start_second_orcd(world: World, ctx: dict[str, Any], name: str, *options: str) -> None:
    """A second rbees-orcd on blep with no pool, its own home ``second-NAME``."""
    blep = world.blep
    port = find_free_port() if world.lab.mode == "loopback" else 8090
    key = "orcd-second"
    world.kill(key)
    home = world.root / blep.name / f"second-{name}"  # its own pid file and database
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    world._spawn(key, blep, "rbees-orcd", "--bind", f"{blep.address}:{port}", *options,
                 env=world.blep_env(RBEES_HOME=str(home)))
    url = f"http://{blep.address}:{port}"
    world.wait_health(url, key)
    ctx["second"] = url


@given(parsers.parse('a second orchestrator on blep with queue capacity {capacity:d} and policy '
                     '"{policy}"'))
def second_orcd(world: World, ctx: dict[str, Any], capacity: int, policy: str) -> None:
    start_second_orcd(world, ctx, policy, "--queue-capacity", str(capacity),
                      "--queue-policy", policy)


@given(parsers.parse("a second orchestrator on blep with a maximum queue wait of {seconds:d} "
                     "second"))
def second_orcd_max_wait(world: World, ctx: dict[str, Any], seconds: int) -> None:
    start_second_orcd(world, ctx, "max-wait", "--max-queue-wait", str(seconds))


@when(parsers.parse("{count:d} batch jobs are submitted to it"))
def submit_to_second(world: World, ctx: dict[str, Any], count: int) -> None:
    ctx["answers"] = [submit(world, {"model": "smollm2", "prompt": f"job {i}",
                                     "priority": "batch"}, ctx["second"]) for i in range(count)]


@then(parsers.parse("the first {count:d} are accepted"))
@then(parsers.parse("all {count:d} are accepted"))
def accepted(ctx: dict[str, Any], count: int) -> None:
    assert [a.status_code for a in ctx["answers"][:count]] == [202] * count


@then(parsers.parse('the {nth} is refused with 429 "{code}" and a Retry-After'))
def refused(ctx: dict[str, Any], nth: str, code: str) -> None:
    got = ctx["answers"][ORDINALS[nth]]
    assert got.status_code == 429 and got.json()["error"]["code"] == code, got.text
    assert int(got.headers["Retry-After"]) >= 1


@then(parsers.parse('the {nth} ends with "{terminal}" code "{code}"'))
def dropped(world: World, ctx: dict[str, Any], nth: str, terminal: str, code: str) -> None:
    job_id = ctx["answers"][ORDINALS[nth]].json()["job_id"]
    frames = events(world, job_id, url=ctx["second"], timeout=30)
    assert frames[-1][1] == terminal and frames[-1][2]["code"] == code, frames


# -- nothing lost --------------------------------------------------------------------------------


def job_count(world: World) -> int:
    got = world.http("GET", f"{world.blep.orcd_url}/v2/tasks", params={"limit": 1000})
    return len(got.json()["jobs"])


@given("the orchestrator's job count is noted")
def note_count(world: World, ctx: dict[str, Any]) -> None:
    ctx["count"] = job_count(world)


@then("the orchestrator's job count is unchanged")
def count_unchanged(world: World, ctx: dict[str, Any]) -> None:
    assert job_count(world) == ctx["count"]


@given("a token file on blep readable by others")
def loose_token_file(world: World, ctx: dict[str, Any]) -> None:
    path = world.blep.home / "loose.token"
    path.write_text(world.token)
    path.chmod(0o644)
    ctx["token_file"] = str(path)


# -- pull on first use -------------------------------------------------------------------------

@given(parsers.parse('the hub serves the SmolLM2 file as "{repo}" file "{filename}"'))
def hub_serves_smollm2(world: World, ctx: dict[str, Any], repo: str, filename: str) -> None:
    from rbees_core import plugins
    from rbees_core.models import DEFAULT_MODEL_REF, resolve_model

    hub = world.ensure_hub()
    if filename not in hub.repos.get(repo, {}):
        pm = plugins.make_manager(plugins.builtin_plugins())
        hub.add(repo, filename, Path(resolve_model(pm, DEFAULT_MODEL_REF)).read_bytes())
    ctx["hub_file"] = hub.repos[repo][filename]
    ctx["hub_gets"] = _file_gets(world, ctx)


#: how fast the hub sends files when asked to be slow: SmolLM2's 98 MB in about 4 s, long
#: enough to watch a download's progress
SLOW_BPS = 25 * 1024 * 1024


@given("the hub sends files slowly")
def hub_slow(world: World, ctx: dict[str, Any]) -> None:
    """Until the scenario ends (``ctx`` in conftest.py sets the hub's speed back)."""
    world.ensure_hub().throttle_bps = SLOW_BPS
    ctx["throttled"] = True


def _file_gets(world: World, ctx: dict[str, Any]) -> int:
    """The hub's GETs of the file's bytes so far."""
    assert world.hub is not None
    sha = ctx["hub_file"].sha256
    return sum(1 for r in world.hub.requests
               if r.server == "cdn" and r.method == "GET" and sha in r.path)


@when(parsers.parse('{count:d} tasks for "{model}" are submitted at once'))
def submit_many_at_once(world: World, ctx: dict[str, Any], count: int, model: str) -> None:
    ids = []
    for _ in range(count):
        got = submit(world, {"model": model, "prompt": "Bees are", "max_tokens": 4,
                             "temperature": 0, "seed": 1})
        assert got.status_code == 202, got.text
        ids.append(got.json()["job_id"])
    ctx["job_ids"] = ids


@then('each job streams "downloading" events, then tokens, and ends with "end"')
def each_job_downloads_then_streams(world: World, ctx: dict[str, Any]) -> None:
    for job_id in ctx["job_ids"]:
        frames = events(world, job_id)
        names = [e for _, e, _ in frames]
        assert "downloading" in names and names[-1] == "end", names
        assert names.index("downloading") < names.index("token"), names
        last = [d for _, e, d in frames if e == "downloading"][-1]
        assert last["bytes"] == last["total"] == len(ctx["hub_file"].content), last


@then(parsers.parse('while it downloads, "rbees jobs why" of the first job says "{text}" '
                    "and how far"))
def why_while_downloading(world: World, ctx: dict[str, Any], text: str) -> None:
    """``rbees jobs why`` on blep, again and again until the job's first token: some
    answer says ``downloading MODEL to pool P (n of m bytes)``."""
    import re

    job_id = ctx["job_ids"][0]
    said: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = world.run_on("blep", "rbees", "jobs", "why", job_id, timeout=30)
        assert done.returncode == 0, done.stderr
        said.append(done.stdout)
        # Before the pool's first progress report the size is not known yet and the
        # answer reads "(0 bytes)"; ask again until it says how far of how much.
        found = re.search(r"downloading (\S+) to pool (\S+) \((\d+) of (\d+) bytes\)", said[-1])
        if found or job(world, job_id)["status"] != "queued":
            break
        time.sleep(0.05)
    assert text in said[-1] and found, said[-3:]
    size = len(ctx["hub_file"].content)
    assert found.group(2) in ("mac", "workstation") and int(found.group(4)) == size, found
    assert int(found.group(3)) <= size
    print(f"MEASURED: rbees jobs why said: {found.group(0)}")


@when(parsers.parse('another task for "{model}" is submitted'))
def submit_another(world: World, ctx: dict[str, Any], model: str) -> None:
    got = submit(world, {"model": model, "prompt": "Bees are", "max_tokens": 4,
                         "temperature": 0, "seed": 1})
    assert got.status_code == 202, got.text
    ctx["job_id"] = got.json()["job_id"]


@then('it streams tokens and ends with "end", without a "downloading" event')
def streams_without_download(world: World, ctx: dict[str, Any]) -> None:
    names = [e for _, e, _ in events(world, ctx["job_id"])]
    assert "downloading" not in names and "token" in names and names[-1] == "end", names


@when(parsers.parse('an OpenAI chat stream for "{model}" is read to its end'))
def openai_raw_stream(world: World, ctx: dict[str, Any], model: str) -> None:
    """Raw, with httpx: the OpenAI client libraries drop SSE comments."""
    with httpx.stream("POST", f"{world.blep.orcd_url}/v1/chat/completions", timeout=120,
                      headers=world.auth(), json={
                          "model": model, "stream": True, "max_tokens": 8, "temperature": 0,
                          "messages": [{"role": "user", "content": "Say hi"}]}) as answer:
        assert answer.status_code == 200, answer.read()
        ctx["frames"] = answer.read().decode().split("\n\n")


@then(parsers.parse('it carries "{comment}" comments, then text, then "data: [DONE]"'))
def comments_then_text(ctx: dict[str, Any], comment: str) -> None:
    frames = ctx["frames"]
    comments = [i for i, f in enumerate(frames) if f.startswith(comment)]
    texts = [i for i, f in enumerate(frames) if f.startswith("data: {")
             and (json.loads(f[6:]).get("choices") or [{}])[0].get("delta", {}).get("content")]
    assert comments and texts and comments[0] < texts[0], frames[:12]
    assert frames[-2] == "data: [DONE]", frames[-3:]
    print(f"MEASURED: {len(comments)} progress comments, e.g. {frames[comments[-1]]!r}")


@then("the hub sent the file once")
def hub_sent_once(world: World, ctx: dict[str, Any]) -> None:
    assert _file_gets(world, ctx) - ctx["hub_gets"] == 1


# -- never hang ----------------------------------------------------------------------------------


@when(parsers.parse("a job with deadline_ms {deadline:d} is submitted to it"))
def submit_with_deadline(world: World, ctx: dict[str, Any], deadline: int) -> None:
    ctx["submitted_at"] = time.monotonic()
    got = submit(world, {"model": "smollm2", "prompt": "Hi", "max_tokens": 4,
                         "deadline_ms": deadline}, ctx["second"])
    assert got.status_code == 202, got.text
    ctx["job_id"], ctx["url"] = got.json()["job_id"], ctx["second"]


@then(parsers.parse('the job ends with "{terminal}" code "{code}" within {seconds:d} '
                    "{unit} of its submission"))
def ends_within(world: World, ctx: dict[str, Any], terminal: str, code: str, seconds: int,
                unit: str) -> None:
    t0 = ctx.get("submitted_at") or time.monotonic()
    frames = events(world, ctx["job_id"], url=ctx.get("url"), timeout=30)
    took = time.monotonic() - t0
    assert frames[-1][1] == terminal and frames[-1][2]["code"] == code, frames[-3:]
    assert frames[-1][2]["retriable"] is False, frames[-1]
    print(f"MEASURED: {code} {took:.3f} s after the submission")
    assert took < seconds, f"{code} after {took:.2f} s"
    ctx["error"] = frames[-1][2]


@then(parsers.parse('its error says "{text}"'))
def error_says(ctx: dict[str, Any], text: str) -> None:
    assert text in ctx["error"]["message"], ctx["error"]


def queued_jobs(world: World, url: str) -> list[str]:
    """Ids of the jobs queued on the orchestrator at ``url``."""
    got = world.http("GET", f"{url}/v2/tasks", params={"status": "queued", "limit": 100},
                     timeout=10)
    return [j["job_id"] for j in got.json()["jobs"]]


@when(parsers.parse('a {request} for "{model}" to it is dropped by its client while the job '
                    "is queued"))
def dropped_while_queued(world: World, ctx: dict[str, Any], request: str, model: str) -> None:
    """The client sends the request, sees its job queued on the second orchestrator (no
    pool: it waits), then closes its connection."""
    url = ctx["second"]
    before = set(queued_jobs(world, url))

    def new_job() -> str | None:
        return next(iter(set(queued_jobs(world, url)) - before), None)

    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    headers = world.auth()
    if request == "plain OpenAI chat request":
        # not streamed: the client's read times out while the job waits; it hangs up
        outcome: list[BaseException | None] = []

        def post() -> None:
            with httpx.Client(timeout=httpx.Timeout(10.0, read=2.0), headers=headers) as c:
                try:
                    c.post(f"{url}/v1/chat/completions", json=chat)
                    outcome.append(None)
                except httpx.ReadTimeout as exc:
                    outcome.append(exc)

        poster = threading.Thread(target=post, daemon=True)
        poster.start()
        ctx["job_id"] = wait_until(new_job, 2, "the request's job queued", interval=0.05)
        poster.join(30)
        assert outcome and outcome[0] is not None, "answered while it should wait"
    elif request == "streamed OpenAI chat request":
        with httpx.Client(timeout=10.0, headers=headers) as client, client.stream(
                "POST", f"{url}/v1/chat/completions", json={**chat, "stream": True}) as answer:
            assert answer.status_code == 200, answer.read()
            for _ in answer.iter_raw():  # the role chunk, pings: the job is queued
                job_id = new_job()
                if job_id is not None:
                    ctx["job_id"] = job_id
                    break
    elif request == "/v2 task with cancel_on_disconnect":
        got = submit(world, {"model": model, "prompt": "Hi", "max_tokens": 4,
                             "cancel_on_disconnect": True}, url)
        assert got.status_code == 202, got.text
        ctx["job_id"] = got.json()["job_id"]
        with httpx.Client(timeout=10.0, headers=headers) as client, client.stream(
                "GET", f"{url}/v2/tasks/{ctx['job_id']}/events") as answer:
            for line in answer.iter_lines():  # its `queued` event, then it hangs up
                if line.startswith("event: queued"):
                    break
    else:
        raise AssertionError(f"no such request: {request}")
    assert "job_id" in ctx, "the request's job was never seen queued"
    ctx["dropped_at"] = time.monotonic()
    ctx["url"] = url


@then(parsers.parse("it holds no queued job within {seconds:d} second of the drop"))
def none_queued_after_drop(world: World, ctx: dict[str, Any], seconds: int) -> None:
    wait_until(lambda: not queued_jobs(world, ctx["url"]), seconds + 5, "no queued job")
    took = time.monotonic() - ctx["dropped_at"]
    print(f"MEASURED: no queued job {took:.2f} s after the client went away")
    assert took < seconds, f"{took:.2f} s"


@then(parsers.parse('the dropped job is "{status}"'))
def dropped_job_status(world: World, ctx: dict[str, Any], status: str) -> None:
    got = world.http("GET", f"{ctx['url']}/v2/tasks/{ctx['job_id']}", timeout=10).json()
    assert got["status"] == status, got


@when(parsers.parse('an OpenAI chat request for "{model}" is sent to it'))
def openai_chat_to_second(world: World, ctx: dict[str, Any], model: str) -> None:
    t0 = time.monotonic()
    ctx["answer"] = world.http("POST", f"{ctx['second']}/v1/chat/completions", timeout=60,
                               json={"model": model, "max_tokens": 4,
                                     "messages": [{"role": "user", "content": "Hi"}]})
    ctx["took"] = time.monotonic() - t0
    ctx["url"] = ctx["second"]


@then(parsers.parse('it is answered {status:d} "{code}" with a Retry-After, after {low:g} to '
                    "{high:g} seconds"))
def answered_late(ctx: dict[str, Any], status: int, code: str, low: float, high: float) -> None:
    answer = ctx["answer"]
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code, answer.text
    assert int(answer.headers["Retry-After"]) >= 1, answer.headers
    print(f"MEASURED: {status} {code} after {ctx['took']:.2f} s, Retry-After "
          f"{answer.headers['Retry-After']} s")
    assert low <= ctx["took"] <= high, f"after {ctx['took']:.2f} s"


@then("it holds no queued job")
def holds_none(world: World, ctx: dict[str, Any]) -> None:
    assert not queued_jobs(world, ctx["url"])


@then(parsers.parse('the job ends with a retriable "{terminal}" code "{code}"'))
def ends_retriable(world: World, ctx: dict[str, Any], terminal: str, code: str) -> None:
    frames = events(world, ctx["job_id"], timeout=60)
    assert frames[-1][1] == terminal and frames[-1][2]["code"] == code, frames[-3:]
    assert frames[-1][2]["retriable"] is True, frames[-1]
    ctx["error"] = frames[-1][2]
