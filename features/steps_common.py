"""Steps every feature uses: running programs on a host, HTTP calls, and what they answered."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from typing import Any

import httpx
from pytest_bdd import given, parsers, then, when
from world import World

DAEMONS = {"the orchestrator": ("blep", "orcd_url"), "mac's pool daemon": ("mac", "pool_url"),
           "workstation's pool daemon": ("workstation", "pool_url")}


def fill(text: str, ctx: dict[str, Any]) -> str:
    """``{job_id}``, ``{worker_id}``, ``{token_file}`` in a step's text, from the scenario."""
    for key, value in ctx.items():
        if isinstance(value, str):
            text = text.replace("{" + key + "}", value)
    return text


def daemon_url(world: World, daemon: str) -> str:
    name, attr = DAEMONS[daemon]
    return str(getattr(world.host(name), attr))


def run(world: World, ctx: dict[str, Any], host: str, command: str, *, token: bool = True
        ) -> subprocess.CompletedProcess[str]:
    argv = shlex.split(fill(command, ctx))
    began = time.monotonic()
    done = world.run_on(host, argv[0], *argv[1:], token=token)
    ctx["done_at"] = time.monotonic()
    ctx["elapsed"] = ctx["done_at"] - began
    ctx["done"] = done
    return done


# -- running programs ------------------------------------------------------------------------


@given(parsers.parse('the cluster is up: rbees-orcd on blep, pool-managerd on mac and '
                     'workstation'))
def cluster_up(world: World) -> None:
    world.ensure_cluster()


@when(parsers.re(r'(?P<host>blep|mac|workstation) runs "(?P<command>[^"]+)"$'))
def host_runs(world: World, ctx: dict[str, Any], host: str, command: str) -> None:
    run(world, ctx, host, command)


@when(parsers.re(r'(?P<host>blep|mac|workstation) runs "(?P<command>[^"]+)" without a token$'))
def host_runs_without_token(world: World, ctx: dict[str, Any], host: str, command: str) -> None:
    run(world, ctx, host, command, token=False)


@when(parsers.re(r'blep runs "(?P<command>[^"]+)" twice$'))
def blep_runs_twice(world: World, ctx: dict[str, Any], command: str) -> None:
    first = run(world, ctx, "blep", command)
    second = run(world, ctx, "blep", command)
    ctx["runs"] = [first, second]


@when(parsers.re(r'blep runs "(?P<command>[^"]+)" with an open terminal-less stdin$'))
def blep_runs_with_open_stdin(world: World, ctx: dict[str, Any], command: str) -> None:
    host = world.blep
    began = time.monotonic()
    proc = host.popen(*shlex.split(command), env=world.blep_env(), stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # stdin stays open: a program waiting for input would hang here
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    ctx["elapsed"] = time.monotonic() - began
    ctx["done"] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@then("the command succeeds")
def command_succeeds(ctx: dict[str, Any]) -> None:
    done = ctx["done"]
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout}\n" \
                                 f"stderr: {done.stderr}"


@then(parsers.parse("the command fails with exit code {code:d}"))
def command_fails(ctx: dict[str, Any], code: int) -> None:
    done = ctx["done"]
    assert done.returncode == code, f"exit {done.returncode}, wanted {code}\n" \
                                    f"stdout: {done.stdout}\nstderr: {done.stderr}"


@then(parsers.parse("the command finishes within {seconds:d} seconds"))
def command_finishes(ctx: dict[str, Any], seconds: int) -> None:
    assert ctx["elapsed"] < seconds and ctx["done"].returncode is not None


@then(parsers.parse('stderr is one line containing "{text}"'))
def stderr_one_line(ctx: dict[str, Any], text: str) -> None:
    lines = ctx["done"].stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert text in lines[0], lines[0]


@then(parsers.parse('stderr contains "{text}"'))
def stderr_contains(ctx: dict[str, Any], text: str) -> None:
    assert text in ctx["done"].stderr, ctx["done"].stderr


@then(parsers.parse('stdout contains "{text}"'))
def stdout_contains(ctx: dict[str, Any], text: str) -> None:
    assert text in ctx["done"].stdout, ctx["done"].stdout


@then(parsers.parse('it printed "{text}"'))
def printed(ctx: dict[str, Any], text: str) -> None:
    done = ctx["done"]
    assert text in done.stdout + done.stderr, (done.stdout, done.stderr)


@then(parsers.parse('stdout does not contain "{text}"'))
def stdout_lacks(ctx: dict[str, Any], text: str) -> None:
    assert text not in ctx["done"].stdout, ctx["done"].stdout


@then("stdout is not empty")
def stdout_not_empty(ctx: dict[str, Any]) -> None:
    assert ctx["done"].stdout.strip(), ctx["done"].stderr


def output(ctx: dict[str, Any]) -> str:
    if "answer" in ctx and "done" not in ctx:
        return str(ctx["answer"].text)
    return str(ctx["done"].stdout)


@then(parsers.parse('the output contains "{text}"'))
def output_contains(ctx: dict[str, Any], text: str) -> None:
    assert text in output(ctx), output(ctx)[:2000]


@then("the output contains the job id")
def output_has_job(ctx: dict[str, Any]) -> None:
    assert ctx["job_id"] in output(ctx)


def json_output(ctx: dict[str, Any]) -> Any:
    return json.loads(output(ctx))


@then(parsers.parse('the JSON output has "{key}" equal to "{value}"'))
def json_key_equals(ctx: dict[str, Any], key: str, value: str) -> None:
    data = json_output(ctx)
    assert str(data[key]) == value, data


@then(parsers.parse('the JSON output has "{key}" of at most {limit:d}'))
def json_key_at_most(ctx: dict[str, Any], key: str, limit: int) -> None:
    data = json_output(ctx)
    assert 0 < int(data[key]) <= limit, data


@then(parsers.parse('the JSON output has a "{obj}" object with "{key}" of at least {least:d}'))
def json_object_key(ctx: dict[str, Any], obj: str, key: str, least: int) -> None:
    data = json_output(ctx)
    if isinstance(data, list):  # one record per host
        (data,) = data
    data = data.get("state", data) if obj not in data else data
    assert int(data[obj][key]) >= least, data


@then(parsers.parse('the output names the hosts "{first}" and "{second}"'))
def output_names_hosts(ctx: dict[str, Any], first: str, second: str) -> None:
    text = output(ctx)
    assert f'"{first}"' in text and f'"{second}"' in text, text[:2000]


@then("both runs printed the same text")
def same_text(ctx: dict[str, Any]) -> None:
    first, second = ctx["runs"]
    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
    assert first.stdout.strip() and first.stdout == second.stdout, (first.stdout, second.stdout)


# -- HTTP --------------------------------------------------------------------------------------


def answer(ctx: dict[str, Any], response: httpx.Response) -> None:
    ctx.pop("done", None)
    ctx["answer"] = response


@when(parsers.parse('I GET "{path}" from {daemon} with token "{token}"'))
def get_with_token(world: World, ctx: dict[str, Any], path: str, daemon: str, token: str
                   ) -> None:
    answer(ctx, world.http("GET", daemon_url(world, daemon) + path,
                           token=None if token == "none" else token))


@when(parsers.parse('I GET "{path}" from {daemon} without a token'))
def get_without_token(world: World, ctx: dict[str, Any], path: str, daemon: str) -> None:
    answer(ctx, world.http("GET", daemon_url(world, daemon) + path, token=None))


@when(parsers.re(r'I GET "(?P<path>[^"]+)" from (?P<daemon>the orchestrator|mac\'s pool daemon|'
                 r'workstation\'s pool daemon)$'))
def get(world: World, ctx: dict[str, Any], path: str, daemon: str) -> None:
    answer(ctx, world.http("GET", daemon_url(world, daemon) + fill(path, ctx)))


@when(parsers.parse('I POST to {daemon} "{path}" with:'))
def post(world: World, ctx: dict[str, Any], daemon: str, path: str, docstring: str) -> None:
    response = world.http("POST", daemon_url(world, daemon) + fill(path, ctx),
                           content=docstring.encode(),
                           headers={"Content-Type": "application/json"})
    answer(ctx, response)
    if response.status_code == 202 and "worker_id" in response.text:
        ctx["worker_id"] = response.json()["worker_id"]


@when(parsers.parse('I POST raw bytes "{raw}" to {daemon} "{path}"'))
def post_raw(world: World, ctx: dict[str, Any], raw: str, daemon: str, path: str) -> None:
    answer(ctx, world.http("POST", daemon_url(world, daemon) + path, content=raw.encode(),
                           headers={"Content-Type": "application/json"}))


@then(parsers.parse("the answer status is {status:d}"))
def answer_status(ctx: dict[str, Any], status: int) -> None:
    got = ctx["answer"]
    assert got.status_code == status, f"{got.status_code}: {got.text[:2000]}"


@then(parsers.parse('the error code is "{code}"'))
def error_code(ctx: dict[str, Any], code: str) -> None:
    body = ctx["answer"].json()
    assert body["error"]["code"] == code, body


@then(parsers.parse('the error names the field "{field}"'))
def error_names_field(ctx: dict[str, Any], field: str) -> None:
    error = ctx["answer"].json()["error"]
    assert field in error["message"] or field in json.dumps(error.get("details", {})), error


@then("the answer keeps the envelope with a correlation id")
def envelope(ctx: dict[str, Any]) -> None:
    got = ctx["answer"]
    error = got.json()["error"]
    assert set(error) >= {"code", "message", "retriable", "correlation_id"}, error
    assert got.headers["X-Correlation-Id"] == error["correlation_id"]


@then(parsers.parse('the answer has header "{name}" starting with "{prefix}"'))
def header_starts(ctx: dict[str, Any], name: str, prefix: str) -> None:
    assert ctx["answer"].headers.get(name, "").startswith(prefix), dict(ctx["answer"].headers)
