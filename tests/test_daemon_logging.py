"""Issue 26 item 4: a daemon's stderr is JSON lines only, stdlib ``logging`` records and
``warnings.warn`` included (with their level and logger name), ``--log-level`` sets the
threshold, and request lines carry the request's correlation id. Item 2: as a systemd
service (or with ``--log-to stdout``) the lines go to stdout. Real processes."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import httpx

from rbees_core.log import JsonLinesHandler, correlation_id
from rbees_core.testing import find_free_port, wait_http

from .test_pool_managerd import EXE, start_pool, stop_pool

DAEMON = textwrap.dedent("""
    import asyncio, logging, sys, warnings
    from starlette.applications import Starlette
    from rbees_core.http import Daemon, launch
    from rbees_core.log import Logger

    async def main() -> int:
        daemon = Daemon("test-daemon", pid_file=__import__("pathlib").Path(sys.argv[1]),
                        log=Logger("test-daemon"))

        async def beside() -> None:
            logging.getLogger("rbees.scheduler.script").warning("fell back to %s", "fifo")
            logging.getLogger("some.library").info("an info record")
            logging.getLogger("some.library").debug("a debug record")
            logging.getLogger("httpx").info("HTTP Request: GET http://x/v2/ready")
            logging.getLogger("httpx").warning("an httpx warning")
            warnings.warn("a deprecation", DeprecationWarning, stacklevel=1)
            try:
                1 / 0
            except ZeroDivisionError:
                logging.getLogger("some.library").exception("it failed")
            daemon.shutdown.set()

        return await daemon.serve(Starlette(), "127.0.0.1", int(sys.argv[2]), beside=beside)

    raise SystemExit(launch("test-daemon", main()))
""")


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = text.strip().splitlines()
    assert lines
    return [json.loads(line) for line in lines]  # any bare text line fails here


def run_daemon(tmp_path: Path, level: str | None) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONWARNINGS": "always"}
    env.pop("RBEES_LOG_LEVEL", None)
    if level:
        env["RBEES_LOG_LEVEL"] = level
    done = subprocess.run([sys.executable, "-c", DAEMON, str(tmp_path / "d.pid"),
                           str(find_free_port())], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    return json_lines(done.stderr)


def test_stdlib_records_and_warnings_become_json_lines(tmp_path: Path) -> None:
    lines = run_daemon(tmp_path, None)
    by_message = {line.get("message"): line for line in lines if line["event"] == "log"}
    fallback = by_message["fell back to fifo"]
    assert fallback["level"] == "warning" and fallback["logger"] == "rbees.scheduler.script"
    assert fallback["component"] == "test-daemon" and fallback["correlation_id"] == "-"
    assert by_message["an info record"]["level"] == "info"  # INFO is no longer lost
    assert "a debug record" not in by_message
    # a line per request the daemon makes would drown the rest; its warnings stay
    assert "HTTP Request: GET http://x/v2/ready" not in by_message
    assert by_message["an httpx warning"]["logger"] == "httpx"
    warned = [line for line in lines if line.get("logger") == "py.warnings"]
    assert warned and "a deprecation" in warned[0]["message"]
    failed = by_message["it failed"]
    assert failed["level"] == "error" and "ZeroDivisionError" in failed["exception"]
    events = [line["event"] for line in lines]
    assert "listening" in events and events[-1] == "exit"

    quiet = run_daemon(tmp_path, "warning")
    assert not any(line.get("message") == "an info record" for line in quiet)
    assert not any(line["event"] == "listening" for line in quiet)


def test_pool_managerd_log_level_debug_logs_requests_with_their_correlation_id(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    pool = start_pool(home, "--log-level", "debug",
                      env={"RBEES_LOG_LEVEL": "info"})  # the flag beats the variable
    try:
        answer = httpx.get(f"{pool.url}/v2/workers", headers={"X-Correlation-Id": "cid-26-4"})
        assert answer.status_code == 200
    finally:
        assert stop_pool(pool) == 0
    lines = json_lines(pool.log.read_text())
    requests = [line for line in lines if line["event"] == "request"]
    mine = [line for line in requests if line["correlation_id"] == "cid-26-4"]
    assert len(mine) == 1, requests
    assert mine[0]["method"] == "GET" and mine[0]["path"] == "/v2/workers"
    assert mine[0]["status"] == 200 and mine[0]["level"] == "debug"
    assert mine[0]["component"] == "pool-managerd" and mine[0]["duration_ms"] >= 0


def test_the_handler_writes_the_correlation_id_of_the_context() -> None:
    out = io.StringIO()
    logger = logging.getLogger("rbees.test.handler")
    logger.propagate = False
    handler = JsonLinesHandler("unit", out)
    logger.addHandler(handler)
    try:
        token = correlation_id.set("abc")
        logger.warning("hello %s", "there", extra={"event": "greeting", "fields": {"n": 1}})
        correlation_id.reset(token)
    finally:
        logger.removeHandler(handler)
    line = json.loads(out.getvalue())
    assert line["event"] == "greeting" and line["message"] == "hello there"
    assert line["correlation_id"] == "abc" and line["n"] == 1 and line["level"] == "warning"


def run_pool_managerd(tmp_path: Path, *args: str, journal: str | None = None
                      ) -> tuple[str, str]:
    """Run pool-managerd at debug with its stdout on one end of a Unix stream socket, as
    systemd gives a service the journal (``journal``: "match" sets ``JOURNAL_STREAM`` to
    that socket, "elsewhere" to another one, as a process started by a service inherits
    it); answer one request with a correlation id, stop it; its stdout and stderr."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    other, other_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = {**os.environ, "RBEES_HOME": str(tmp_path / "home"), "RBEES_LOG_LEVEL": "debug"}
    env.pop("RBEES_LOG_TO", None)
    env.pop("JOURNAL_STREAM", None)
    if journal is not None:
        st = os.fstat((theirs if journal == "match" else other).fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    port = find_free_port()
    err = tmp_path / "stderr"
    with open(err, "wb") as stderr:
        proc = subprocess.Popen([str(EXE), "--bind", f"127.0.0.1:{port}", *args], env=env,
                                stdout=theirs.fileno(), stderr=stderr)
    theirs.close()
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: ours.recv(65536), b"")))
    reader.start()
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=60, proc=proc)
        answer = httpx.get(f"http://127.0.0.1:{port}/v2/workers",
                           headers={"X-Correlation-Id": "cid-journal"}, timeout=10)
        assert answer.status_code == 200
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
        reader.join(10)
        for sock in (ours, other, other_end):
            sock.close()
    return b"".join(chunks).decode(), err.read_text()


def test_under_systemd_the_json_lines_go_to_the_journal_with_their_priority(
        tmp_path: Path) -> None:
    """Issue 26 item 2: run as a service (stdout is the journal ``JOURNAL_STREAM`` names),
    a daemon logs to stdout, each JSON line behind the syslog priority journald strips and
    keeps (``journalctl -p warning``); request lines carry their correlation id."""
    out, err = run_pool_managerd(tmp_path, journal="match")
    assert err == ""
    priorities = {"debug": "<7>", "info": "<6>", "warning": "<4>", "error": "<3>"}
    lines = []
    for raw in out.strip().splitlines():
        assert raw[:3] in priorities.values(), raw
        line = json.loads(raw[3:])
        assert raw[:3] == priorities[line["level"]], raw
        lines.append(line)
    events = [line["event"] for line in lines]
    assert "listening" in events and events[-1] == "exit"
    mine = [line for line in lines if line["correlation_id"] == "cid-journal"]
    assert [line["event"] for line in mine] == ["request"]
    assert mine[0]["path"] == "/v2/workers" and mine[0]["component"] == "pool-managerd"


def test_log_to_stdout_writes_plain_json_lines_and_an_inherited_journal_is_ignored(
        tmp_path: Path) -> None:
    out, err = run_pool_managerd(tmp_path, "--log-to", "stdout")
    assert err == ""
    lines = json_lines(out)  # no priority prefix: stdout is not the journal
    assert any(line["correlation_id"] == "cid-journal" for line in lines)
    # JOURNAL_STREAM inherited from a service (a terminal's shell) names another stream:
    # the lines stay on stderr
    out, err = run_pool_managerd(tmp_path, journal="elsewhere")
    assert out == ""
    assert any(line["correlation_id"] == "cid-journal" for line in json_lines(err))


def test_a_job_dispatched_later_carries_its_correlation_id_to_the_worker(
        rbees_cluster: Any) -> None:
    """Issue 26 item 4: the first job of a model waits in the queue while its worker
    starts and the dispatch loop places it later, outside the request that submitted it;
    the worker's lines about it still carry the submitter's correlation id."""
    answer = httpx.post(f"{rbees_cluster.url}/v2/tasks", timeout=30,
                        headers={"X-Correlation-Id": "cid-late-dispatch"},
                        json={"model": "smollm2", "prompt": "Bees are", "max_tokens": 2})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    assert rbees_cluster.events(job_id)[-1][1] == "end"
    lines = [line for log in rbees_cluster.home.rglob("worker.log")
             for line in json_lines(log.read_text())]
    accepted = [line for line in lines
                if line["event"] == "job_accepted" and line.get("job_id") == job_id]
    assert len(accepted) == 1, lines
    assert accepted[0]["correlation_id"] == "cid-late-dispatch"
