"""Steps of the pool hosts: SSH, the hub, workers, git, links, the HTTP transport."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import httpx
from pytest_bdd import given, parsers, then, when
from steps_common import run
from world import World, git, wait_until

from rbees_core.testing import parse_sse
from rbees_core.testing.hosts import ORCHESTRATOR


@given(parsers.parse('the pool hosts "{first}" and "{second}" are reachable over SSH from blep'))
def ssh_hosts(world: World) -> None:
    world.ensure_ssh_hosts()


@given(parsers.parse('the hub serves a {mb:d} MB model "{repo}" file "{filename}"'))
def hub_serves(world: World, ctx: dict[str, Any], mb: int, repo: str, filename: str) -> None:
    hub = world.ensure_hub()
    if filename not in hub.repos.get(repo, {}):
        content = os.urandom(mb * 2**20)
        hub.add(repo, filename, content)
    ctx["hub_sha256"] = hub.repos[repo][filename].sha256


@then(parsers.parse('the file "{filename}" on "{name}" has the hub\'s sha256'))
def file_has_sha(world: World, ctx: dict[str, Any], filename: str, name: str) -> None:
    found = list((world.host(name).home / "models").rglob(filename))
    assert found, f"no {filename} under {world.host(name).home / 'models'}"
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    assert digest == ctx["hub_sha256"]


# -- workers over SSH --------------------------------------------------------------------------


def listed(world: World, ctx: dict[str, Any], name: str) -> dict[str, Any] | None:
    done = run(world, ctx, ORCHESTRATOR, f"rbees pool worker list --host {name} --format json")
    assert done.returncode == 0, done.stderr
    for worker in json.loads(done.stdout):
        if worker["worker_id"] == ctx["worker_id"]:
            return dict(worker)
    return None


@then("the spawned worker is ready")
def spawned_ready(ctx: dict[str, Any]) -> None:
    data = json.loads(ctx["done"].stdout)
    assert data["state"] == "ready", data
    ctx["worker_id"] = data["worker_id"]


@then(parsers.parse('the spawned worker is listed as "{state}"'))
def spawned_listed(ctx: dict[str, Any], state: str) -> None:
    workers = json.loads(ctx["done"].stdout)
    mine = [w for w in workers if w["worker_id"] == ctx["worker_id"]]
    assert mine and mine[0]["state"] == state, workers


@when(parsers.parse('blep stops the spawned worker on "{name}"'))
def stop_spawned(world: World, ctx: dict[str, Any], name: str) -> None:
    done = run(world, ctx, ORCHESTRATOR,
               f"rbees pool worker stop {ctx['worker_id']} --host {name} --format json")
    assert done.returncode == 0, done.stderr


@then(parsers.parse('the spawned worker is gone from "{name}"'))
def spawned_gone(world: World, ctx: dict[str, Any], name: str) -> None:
    def gone() -> bool:
        worker = listed(world, ctx, name)
        return worker is None or worker["state"] not in ("starting", "loading", "ready", "busy")

    wait_until(gone, 30, "the worker stopped", interval=0.5)


# -- git ---------------------------------------------------------------------------------------


@given(parsers.parse('"{name}" has a git checkout one commit behind its remote'))
def checkout_behind(world: World, ctx: dict[str, Any], name: str) -> None:
    root = world.root / name / "git"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    lib = root / "lib-work"
    lib.mkdir()
    git(lib, "init", "-q", "-b", "main")
    (lib / "lib.txt").write_text("v1\n")
    git(lib, "add", "lib.txt")
    git(lib, "commit", "-q", "-m", "lib v1")
    git(root, "clone", "-q", "--bare", str(lib), "lib.git")
    git(root, "init", "-q", "--bare", "-b", "main", "remote.git")
    git(root, "clone", "-q", "remote.git", "seed")
    seed = root / "seed"
    (seed / "README.md").write_text("pool\n")
    git(seed, "add", "README.md")
    git(seed, "commit", "-q", "-m", "first")
    git(seed, "submodule", "add", "-q", str(root / "lib.git"), "vendor/lib")
    git(seed, "commit", "-q", "-m", "add lib")
    git(seed, "push", "-q", "origin", "main")
    checkout = world.root / name / "checkout"
    if checkout.exists():
        shutil.rmtree(checkout)
    git(root, "clone", "-q", "--recurse-submodules", "remote.git", str(checkout))
    (seed / "README.md").write_text("pool v2\n")
    git(seed, "commit", "-q", "-am", "second")
    git(seed, "push", "-q", "origin", "main")
    ctx["remote_head"] = git(seed, "rev-parse", "HEAD")
    ctx["checkout"] = checkout


@given(parsers.parse('the checkout on "{name}" has an uncommitted change'))
def checkout_dirty(ctx: dict[str, Any]) -> None:
    (ctx["checkout"] / "README.md").write_text("local edit\n")


@then(parsers.parse('the checkout on "{name}" is at the remote\'s commit'))
def checkout_at_remote(ctx: dict[str, Any]) -> None:
    assert git(ctx["checkout"], "rev-parse", "HEAD") == ctx["remote_head"]


# -- links -------------------------------------------------------------------------------------


def pool_pids(world: World, name: str) -> list[int]:
    proc = world.daemons.get(f"pool:{name}")
    return [proc.pid] if proc is not None and proc.poll() is None else []


@given(parsers.parse('the link of "{name}" is cut'))
def link_cut(world: World, ctx: dict[str, Any], name: str) -> None:
    pids = pool_pids(world, name)
    server = world.sshd.get(name)
    if world.lab.mode == "loopback" and server is not None and server.process is not None:
        pids.append(server.process.pid)
    if world.lab.mode == "loopback" and pids:  # the host's workers are cut off too
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            answer = world.http("GET", f"{world.host(name).pool_url}/v2/workers",
                                timeout=5).json()
            listed = answer["workers"] if isinstance(answer, dict) else answer
            pids += [int(w["pid"]) for w in listed
                     if w.get("pid") and w.get("state") not in ("stopped", "failed")]
    world.lab.link(name, False, pids)
    ctx.setdefault("cut", []).append(name)
    ctx["cut_at"] = time.monotonic()


@when(parsers.parse('the link of "{name}" is restored'))
def link_restored(world: World, ctx: dict[str, Any], name: str) -> None:
    world.lab.link(name, True)
    ctx["cut"].remove(name)


# -- the HTTP transport and the pool daemon ----------------------------------------------------


@given(parsers.parse('blep knows "{name}" as host "{alias}" over HTTP'))
def http_host(world: World, ctx: dict[str, Any], name: str, alias: str) -> None:
    token_file = world.blep.home / f"{alias}.token"
    token_file.write_text(world.token)
    token_file.chmod(0o600)
    run(world, ctx, ORCHESTRATOR, f"rbees hosts remove {alias}")
    done = run(world, ctx, ORCHESTRATOR,
               f"rbees hosts add {alias} --transport http --url {world.host(name).pool_url} "
               f"--token-file {token_file}")
    assert done.returncode == 0, done.stderr


def pool_worker(world: World, name: str, worker_id: str) -> dict[str, Any]:
    got = world.http("GET", f"{world.host(name).pool_url}/v2/workers/{worker_id}", timeout=5)
    assert got.status_code == 200, got.text
    return dict(got.json())


@then(parsers.parse('the started worker becomes "{state}" on "{name}" within {seconds:d} seconds'))
@then(parsers.parse('the started worker is "{state}" on "{name}" within {seconds:d} seconds'))
def worker_state(world: World, ctx: dict[str, Any], state: str, name: str, seconds: int) -> None:
    def reached() -> dict[str, Any] | None:
        worker = pool_worker(world, name, ctx["worker_id"])
        return worker if worker["state"] == state else None

    ctx["worker"] = wait_until(reached, seconds, f"worker {state}", interval=0.2)


@then("the started worker's uri is on mac's address")
def worker_uri(world: World, ctx: dict[str, Any]) -> None:
    assert ctx["worker"]["uri"].startswith(f"http://{world.host('mac').address}:")


@when("the started worker's process is killed")
def kill_started(ctx: dict[str, Any]) -> None:
    os.kill(int(ctx["worker"]["pid"]), signal.SIGKILL)


@then(parsers.parse('no worker of backend "{backend}" exists on "{name}"'))
def no_worker_of(world: World, backend: str, name: str) -> None:
    assert not [w for w in world.pool_workers(name) if w["backend"] == backend]


@when(parsers.parse('I stream a download of "{ref}" through {name}\'s pool daemon'))
def stream_download(world: World, ctx: dict[str, Any], ref: str, name: str) -> None:
    got = world.http("POST", f"{world.host(name).pool_url}/v2/models/download",
                     json={"model": ref}, timeout=120)
    assert got.status_code == 200, got.text
    ctx["frames"] = parse_sse(got.text)


@then(parsers.parse('the stream has "progress" events and ends with "end" carrying the hub\'s '
                    'sha256'))
def download_frames(ctx: dict[str, Any]) -> None:
    frames = ctx["frames"]
    assert any(event == "progress" for _, event, _ in frames), frames[:3]
    _, event, data = frames[-1]
    assert event == "end" and data["sha256"] == ctx["hub_sha256"], frames[-1]
    assert Path(data["path"]).name == "tiny.gguf"


# -- nothing left behind ---------------------------------------------------------------------


@when(parsers.parse('pool-managerd on "{name}" is killed with SIGKILL'))
def kill_pool(world: World, ctx: dict[str, Any], name: str) -> None:
    record = world.http("GET", f"{world.blep.orcd_url}/v2/tasks/{ctx['job_id']}").json()
    assert record["pool_id"] == name, record
    worker = pool_worker(world, name, record["worker_id"])
    ctx["worker_pid"] = int(worker["pid"])
    world.kill(f"pool:{name}", signal.SIGKILL)


@then(parsers.parse('the worker serving the job still runs on "{name}"'))
def orphan_runs(world: World, ctx: dict[str, Any], name: str) -> None:
    time.sleep(1.0)  # time to die, if it went with its pool
    running = [(pid, program) for pid, program, host in world.rbees_processes()
               if host == name]
    assert (ctx["worker_pid"], "rbees-workerd") in running, running
    assert "pool-managerd" not in [program for _, program in running], running


@then("no rbees process is left on any host")
def nothing_left(world: World) -> None:
    deadline = time.monotonic() + 10
    while (left := world.rbees_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"still running (pid, program, host): {left}"


@then("the job's stream has ended with a terminal event")
def stream_ended(ctx: dict[str, Any]) -> None:
    ctx["reader"].join(30)
    assert not ctx["reader"].is_alive(), "the job's stream did not end"
    _, event, data = ctx["seen"][-1]
    assert event in ("end", "error", "cancelled"), ctx["seen"][-3:]
    print(f"the job ended: {event} {data}")
