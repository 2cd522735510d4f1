"""What bench/worker.py and bench/orchestrator.py share for issue 21's side-by-side rows.

- :class:`LlamaServer`: llama.cpp's own C++ ``llama-server`` (built by bench/setup.sh from the
  llama.cpp source that the pinned llama-cpp-python vendors), started with ``-m MODEL -t
  THREADS -c CTX -np SLOTS`` and its own defaults otherwise, driven through its OpenAI chat
  endpoint with streaming.
- :func:`chat_stream` (any OpenAI chat endpoint: llama-server, rbees-orcd) and
  :func:`worker_stream` (rbees-workerd's ``POST /v2/execute``): one streamed answer, timed
  from the request to its first token (TTFT) and after it (tokens/s).
- :func:`concurrent`: ``k`` streams at once, their total tokens/s.
- :class:`Check` and :func:`report`: every row judged against its target, PASS/FAIL, one
  column per run and "holds in k of n" (every run is reported, not the best).

Every baseline runs with its own defaults: :func:`baseline_env` strips the OpenMP variables
that the operator's shell may hold (``OMP_WAIT_POLICY`` above all) from the environment of
the processes that are not rbees'.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx

from rbees_core.testing import find_free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
LLAMA_SERVER_REL = Path("bench/.llama-server/bin/llama-server")
#: the user's message of every one-stream and concurrent case (an instruct model answers it
#: with a long story, so 128 greedy tokens come before its end of turn)
STORY = "Write a long story about a small village by the sea and the people who live there."
#: a system message of its own: SmolLM2's template adds a default one where there is none,
#: llama-server's built-in ChatML would not, and the prompts would differ
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": STORY}]
#: context per slot everywhere (rbees-workerd --ctx, llama-server -c CTX x SLOTS)
CTX = 4096


def baseline_env() -> dict[str, str]:
    """This process's environment without OpenMP's knobs: a baseline runs with its defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}


def omp_setting() -> str:
    """The OpenMP settings rbees' processes inherit here, for the report's header."""
    found = [f"{k}={v}" for k, v in sorted(os.environ.items())
             if k.startswith(("OMP_", "GOMP_", "KMP_"))]
    return ", ".join(found) or "none set (each engine's own default)"


def find_llama_server(given: str | None) -> Path | None:
    """``--llama-server PATH``, else ``$RBEES_BENCH_LLAMA_SERVER``, else the build of
    bench/setup.sh under the repository root; None when none is there (its rows are then
    reported as not measured)."""
    for candidate in (given, os.environ.get("RBEES_BENCH_LLAMA_SERVER"),
                      str(ROOT / LLAMA_SERVER_REL)):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def llama_server_version(exe: Path) -> str:
    """``llama-server --version``'s line (version and commit) and the llama-cpp-python
    version it was built for (bench/.llama-server/VERSION, written by bench/setup.sh)."""
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30,
                         env=baseline_env())
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines()
             if line.startswith(("version", "built with"))]
    stamp = exe.parent.parent / "VERSION"
    source = f"; source of llama-cpp-python {stamp.read_text().strip()}" \
        if stamp.is_file() else ""
    return "; ".join(lines) + source


class LlamaServer:
    """A running ``llama-server``; a context manager that stops it."""

    def __init__(self, exe: Path, model: str, threads: int, slots: int, device: str = "cpu"
                 ) -> None:
        self.port = find_free_port()
        # on a GPU every layer goes there (rbees-workerd --device cuda:N offloads them all)
        gpu = ["-ngl", "999", "-dev", f"CUDA{device.partition(':')[2] or 0}"] \
            if device.startswith("cuda") else []
        self.argv = [str(exe), "-m", model, "-t", str(threads), "-c", str(CTX * slots),
                     "-np", str(slots), *gpu, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        self.proc = subprocess.Popen(self.argv, env=baseline_env(), stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            wait_http(f"{self.url}/health", timeout=300, proc=self.proc)
        except BaseException:
            self.close()
            raise

    def flags(self) -> str:
        """The command line, without the model's path, the address and the port."""
        return " ".join(self.argv[3:-4])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@attrs.frozen
class Stream:
    """One streamed answer: TTFT from the request, tokens/s after the first token."""

    ttft_ms: float
    tokens_per_s: float
    tokens: int
    end: float  # time.perf_counter() at its last byte
    text: str = ""
    start: float = 0.0  # time.perf_counter() at the request

    @property
    def overall_per_s(self) -> float:
        """Tokens over the whole request, TTFT included: the measure that a relay which
        hands several tokens over at once cannot inflate (a short answer's tokens/s after
        the first token can)."""
        return self.tokens / (self.end - self.start)


def _finish(t0: float, first: float | None, n: int, text: str) -> Stream:
    end = time.perf_counter()
    if first is None or n < 1:
        raise RuntimeError("the answer held no token")
    rate = (n - 1) / (end - first) if n > 1 and end > first else float("nan")
    return Stream((first - t0) * 1000, rate, n, end, text, t0)


def chat_stream(client: httpx.Client, url: str, model: str, messages: list[dict[str, str]],
                max_tokens: int, **extra: Any) -> Stream:
    """One greedy streamed answer of an OpenAI chat endpoint (``url`` up to ``/v1``). The
    tokens are the answer's ``usage.completion_tokens`` where it gives them, else its chunks
    with content. ``extra`` joins the body."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "seed": 1, "stream": True, "stream_options": {"include_usage": True}, **extra}
    try:
        return _chat_stream(client, url, body)
    except httpx.RemoteProtocolError:
        # llama-server (cpp-httplib) closes a keep-alive connection after 5 requests; a
        # request sent on it as it closes gets no answer at all. Sent again, afresh.
        return _chat_stream(client, url, body)


def _chat_stream(client: httpx.Client, url: str, body: dict[str, Any]) -> Stream:
    t0 = time.perf_counter()
    first, chunks, usage, text = None, 0, None, []
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("error"):
                raise RuntimeError(f"error in the stream: {data['error']}")
            if data.get("usage"):
                usage = data["usage"].get("completion_tokens")
            for choice in data.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    chunks += 1
                    text.append(content)
                    if first is None:
                        first = time.perf_counter()
    return _finish(t0, first, int(usage) if usage else chunks, "".join(text))


def worker_stream(client: httpx.Client, url: str, messages: list[dict[str, str]],
                  max_tokens: int, job_id: str, **extra: Any) -> Stream:
    """One greedy streamed answer of rbees-workerd's ``POST /v2/execute`` (``extra``: more
    fields of the body, a ``json_schema``...)."""
    body = {"job_id": job_id, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "seed": 1, **extra}
    for _ in range(100):
        try:
            return _worker_stream(client, url, body)
        except WorkerBusy:
            BUSY_REFUSALS[0] += 1
            # the slot of the job before is freed just after its stream's last byte; a
            # request sent in between is refused (503), and sent again (timed afresh)
            time.sleep(0.01)
    return _worker_stream(client, url, body)


class WorkerBusy(Exception):
    pass


#: how many times rbees-workerd answered 503 to a request sent just after the one before
#: ended (printed by the benches: it is what a client would see)
BUSY_REFUSALS = [0]


def _worker_stream(client: httpx.Client, url: str, body: dict[str, Any]) -> Stream:
    t0 = time.perf_counter()
    first, n, text = None, 0, []
    with client.stream("POST", f"{url}/v2/execute", json=body) as answer:
        if answer.status_code == 503:
            raise WorkerBusy
        answer.raise_for_status()
        token = False
        for line in answer.iter_lines():
            if line == "event: token":
                n += 1
                token = True
                if first is None:
                    first = time.perf_counter()
            elif token and line.startswith("data: "):
                text.append(json.loads(line[6:]).get("t", ""))
                token = False
    return _finish(t0, first, n, "".join(text))


@attrs.frozen
class Many:
    """``k`` streams at once: their total tokens/s from the first request to the last byte."""

    total_per_s: float
    ttft_ms: float  # median of the streams'
    tokens: int
    each: tuple[Stream, ...]


def concurrent(k: int, one: Callable[[int], Stream]) -> Many:
    """``one(i)`` for i in range(k), each in a thread of its own, started together."""
    results: list[Stream | BaseException] = [RuntimeError("not run")] * k

    def run(i: int) -> None:
        try:
            results[i] = one(i)
        except BaseException as exc:  # re-raised below, in the caller's thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    done = [r for r in results if isinstance(r, Stream)]
    total = sum(s.tokens for s in done)
    return Many(total / (max(s.end for s in done) - start),
                statistics.median(s.ttft_ms for s in done), total, tuple(done))


def median_of(runs: int, once: Callable[[], Stream]) -> Stream:
    """A warm-up, then ``runs`` samples; the sample of median tokens/s, with the median TTFT."""
    once()
    samples = sorted((once() for _ in range(runs)), key=lambda s: s.tokens_per_s)
    mid = samples[len(samples) // 2]
    return attrs.evolve(mid, ttft_ms=statistics.median(s.ttft_ms for s in samples))


def median_many(runs: int, once: Callable[[], Many]) -> Many:
    once()
    samples = sorted((once() for _ in range(runs)), key=lambda m: m.total_per_s)
    return samples[len(samples) // 2]


NOTES = ("the harbour keeps its boats in rows while fishermen mend nets and talk about weather "
         "tides markets and old stories of storms that came from the north")


def long_messages(words: int, salt: str) -> list[dict[str, str]]:
    """A chat whose prompt is about ``words`` tokens (SmolLM2's tokenizer: about one token a
    word here), starting with ``salt`` so that no cache holds a prefix of it."""
    base = NOTES.split()
    text = " ".join(base[i % len(base)] for i in range(words))
    return [{"role": "system", "content": f"Session {salt}. Notes: {text}"},
            {"role": "user", "content": "Summarise the notes in one sentence."}]


# -- judging and the report ----------------------------------------------------------------


@attrs.frozen
class Check:
    """One acceptance row of one run: ``measured`` against ``target``; ``ok`` None when it
    could not be measured (a missing baseline), which counts as not holding."""

    name: str
    target: str
    measured: str
    ok: bool | None


def ratio_check(name: str, target: str, value: float | None, bound: float,
                at_least: bool = True, fmt: str = "{:.3f}") -> Check:
    if value is None or value != value:  # None or NaN
        return Check(name, target, "n/a", None)
    ok = value >= bound if at_least else value <= bound
    return Check(name, target, fmt.format(value), ok)


def verdict(ok: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[ok]


def report(runs: list[list[Check]]) -> str:
    """The acceptance table: a row per check, a column per run (measured and PASS/FAIL),
    and in how many of the runs it held."""
    names: list[tuple[str, str]] = []
    for checks in runs:
        for c in checks:
            if (c.name, c.target) not in names:
                names.append((c.name, c.target))
    head = ["row", "target", *[f"run {i + 1}" for i in range(len(runs))], "holds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, target in names:
        cells, held = [], 0
        for checks in runs:
            found = [c for c in checks if (c.name, c.target) == (name, target)]
            if not found:
                cells.append("-")
                continue
            held += bool(found[0].ok)
            cells.append(f"{found[0].measured} {verdict(found[0].ok)}")
        lines.append(f"| {name} | {target} | " + " | ".join(cells)
                     + f" | {held} of {len(runs)} |")
    return "\n".join(lines)


def measurements_table(rows: list[tuple[str, list[str]]], runs: int, unit: str) -> str:
    """A row per case, a column per run: what each run measured (``unit`` names it)."""
    head = ["case", *[f"run {i + 1}" for i in range(runs)]]
    lines = [f"{unit}\n", "| " + " | ".join(head) + " |", "|---|" + "---:|" * runs]
    for case, cells in rows:
        lines.append(f"| {case} | " + " | ".join(cells + ["-"] * (runs - len(cells))) + " |")
    return "\n".join(lines)


def header(threads: int, tokens: int, runs: int, exe: Path | None) -> str:
    """Where and how it ran: the machine, the engines, the settings."""
    import llama_cpp

    cores = os.cpu_count()
    version = llama_server_version(exe) if exe else \
        "not found (run bench/setup.sh, or --llama-server PATH): its rows are n/a"
    return "\n".join([
        f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cores} cores, Python "
        f"{sys.version.split()[0]}, llama-cpp-python {llama_cpp.__version__}",
        f"- llama-server: {version}",
        f"- {threads} threads everywhere, greedy, {tokens} tokens per answer, context "
        f"{CTX} per slot; median of {runs} samples after a warm-up in each case",
        f"- OpenMP settings given to rbees' processes: {omp_setting()}; the baselines get "
        "none (their own defaults)",
        f"- rbees: {git_head()}",
    ])


def load_note() -> str:
    """The 1-minute load average now, against the cores: a run on a busy machine says so
    (spinning OpenMP threads, llama-server's default, collapse on cores others want)."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    busy = " (busy: other processes want these cores; the numbers measure that)" \
        if load > 0.5 * cores else ""
    return f"load average at the start: {load:.2f} on {cores} cores{busy}"


def git_head() -> str:
    """The commit of the checkout whose rbees_core runs (PYTHONPATH may name another)."""
    import rbees_core

    tree = str(Path(rbees_core.__file__).resolve().parent.parent)
    if not shutil.which("git"):
        return "?"
    out = subprocess.run(["git", "-C", tree, "log", "-1", "--format=%h %s"],
                         capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "-uno"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip()[:80] + (" (with uncommitted changes)" if dirty else "")
