"""Worker benchmark: rbees-workerd side by side with llama.cpp's own C++ llama-server.

One model (the embedded SmolLM2-135M Q4_1), the same thread count everywhere, the same chat
(bench/sidebyside.py's MESSAGES), greedy. Each case is a warm-up then ``--runs`` samples (the
median shown); ``--repeat N`` runs the whole set N times in a row and reports every run.

  L1   llama-server -np 1, one stream through its OpenAI chat endpoint (SSE)
  L1k  the same server, a 1,000-token prompt that no cache holds: TTFT
  W1   rbees-workerd (--slots 1), one stream over POST /v2/execute (SSE)
  W1k  the same worker, a 1,000-token prompt that no cache holds: TTFT
  L4   llama-server -np 4, four concurrent streams: total tokens/s
  W4   rbees-workerd --slots 4, four concurrent streams: total tokens/s
Extra baselines (``--skip a,a1,a4,c,e`` leaves them out):
  a    llama-cpp-python in-process, one stream (high-level Llama, create_chat_completion)
  a1   a bare llama-cpp-python decode loop, 1 sequence: llama_decode and numpy's argmax, no
       HTTP and no client (the engine's ceiling: no server of this engine can be faster;
       raw prompt)
  a4   the same loop, 4 sequences in one batch (the ceiling of four concurrent streams)
  c    llama_cpp.server, one stream through its OpenAI chat API (in .venv-bench, made by
       bench/setup.sh; left out where that is missing)
  e    rbees-workerd --backend torch, one stream (where rbees-backend-torch is installed)
  g    rbees-workerd, one stream asking for JSON, sampled freely (Wj) and under the grammar
       of a JSON schema (Wg), alternated: the grammar sampler's cost (issue 23: Wg >= 0.85 x
       Wj tokens/s)
  s    rbees-workerd sharded over two llama.cpp RPC servers on loopback (S2, S2k) against
       the same worker unsharded (Wu), alternated, and the network round trips a generated
       token costs (S2rt): bench/shard.py (issue 27)

Judged (issue 21): W1 >= 1.05 x L1 tokens/s; TTFT(W1) <= TTFT(L1) + 2 ms; W4 >= 1.05 x L4;
TTFT(W1k) <= 1.1 x TTFT(L1k). Not judged, printed beside them: a1/L1 and a4/L4, how far the
bare engine is ahead of llama-server, the most any server of it could be. Every baseline
runs with its own defaults (no OpenMP setting is forced on any case); llama-server is
bench/.llama-server/bin/llama-server (bench/setup.sh builds it), ``--llama-server PATH`` or
``$RBEES_BENCH_LLAMA_SERVER``.

Usage: python bench/worker.py [--tokens 128] [--threads 2] [--runs 3] [--repeat 1]
                              [--skip a,a1,a4,c,e] [--llama-server PATH] [--device cuda:0]
                              [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
from shard import bench_shard  # bench/shard.py, beside this file
from sidebyside import (  # bench/sidebyside.py, beside this file
    BUSY_REFUSALS,
    CTX,
    MESSAGES,
    ROOT,
    Check,
    LlamaServer,
    Many,
    Stream,
    baseline_env,
    chat_stream,
    concurrent,
    find_llama_server,
    header,
    load_note,
    long_messages,
    measurements_table,
    median_many,
    median_of,
    ratio_check,
    report,
    worker_stream,
)

from rbees_core import plugins
from rbees_core.models import DEFAULT_MODEL_REF, resolve_model
from rbees_core.testing import find_free_port, wait_http, workerd_argv

PROMPT = "Once upon a time, in a small village by the sea, there lived"
LONG_WORDS = 1000
_salts = itertools.count()


def salt() -> str:
    return f"{os.getpid()}-{time.time_ns()}-{next(_salts)}"


@attrs.frozen
class Result:
    name: str
    label: str
    tps: float | None
    ttft_ms: float | None
    tokens: int


def from_stream(name: str, label: str, s: Stream) -> Result:
    return Result(name, label, s.tokens_per_s, s.ttft_ms, s.tokens)


def from_many(name: str, label: str, m: Many) -> Result:
    return Result(name, label, m.total_per_s, m.ttft_ms, m.tokens)


# -- llama-server and rbees-workerd, the judged cases ---------------------------------------


class Worker:
    """A running rbees-workerd, with the environment of this process (its own defaults)."""

    def __init__(self, threads: int, slots: int = 1, backend: str = "llamacpp",
                 device: str = "cpu", extra: tuple[str, ...] = ()) -> None:
        self.port = find_free_port()
        self.home = tempfile.mkdtemp(prefix="rbees-bench-")
        argv = workerd_argv(f"bench-{backend}-{slots}", self.port, backend=backend,
                            device=device, slots=slots,
                            extra=("--threads", str(threads), "--ctx", str(CTX), *extra))
        self.proc = subprocess.Popen(argv, env={**os.environ, "RBEES_HOME": self.home},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(timeout=300)
        self.jobs = itertools.count()
        try:
            wait_http(f"{self.url}/v2/ready", timeout=300, proc=self.proc)
        except BaseException:
            self.close()
            raise

    def stream(self, messages: list[dict[str, str]], tokens: int, **extra: Any) -> Stream:
        return worker_stream(self.client, self.url, messages, tokens, f"b{next(self.jobs)}",
                             **extra)

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def one_and_long(name: str, label: str, stream: Callable[[list[dict[str, str]], int], Stream],
                 tokens: int, runs: int, long_words: int) -> list[Result]:
    """One stream of MESSAGES, then TTFT of a long prompt new to every cache."""
    one = median_of(runs, lambda: stream(MESSAGES, tokens))
    long = median_of(runs, lambda: stream(long_messages(long_words, salt()), 4))
    size = "1,000-token" if long_words == LONG_WORDS else f"{long_words}-word"
    return [from_stream(name, label, one),
            Result(f"{name}k", f"{label}, {size} prompt (TTFT)", None, long.ttft_ms,
                   long.tokens)]


def bench_llama_server(exe: Path, path: str, slots: int, tokens: int, threads: int,
                       runs: int, long_words: int = LONG_WORDS, device: str = "cpu"
                       ) -> list[Result]:
    with LlamaServer(exe, path, threads, slots, device) as server, \
            httpx.Client(timeout=300) as client:
        def stream(messages: list[dict[str, str]], n: int) -> Stream:
            return chat_stream(client, server.url, "smollm2", messages, n)

        if slots == 1:
            return one_and_long("L1", f"llama-server `{server.flags()}`, 1 stream", stream,
                                tokens, runs, long_words)
        many = median_many(runs, lambda: concurrent(4, lambda _: stream(MESSAGES, tokens)))
        return [from_many("L4", f"llama-server `{server.flags()}`, 4 concurrent (total)",
                          many)]


def bench_worker(slots: int, tokens: int, threads: int, runs: int,
                 long_words: int = LONG_WORDS, device: str = "cpu") -> list[Result]:
    with Worker(threads, slots, device=device) as w:
        flags = f"--device {device} --slots {slots} --threads {threads} --ctx {CTX}"
        if slots == 1:
            return one_and_long("W1", f"rbees-workerd `{flags}`, 1 stream", w.stream,
                                tokens, runs, long_words)
        many = median_many(runs, lambda: concurrent(4, lambda _: w.stream(MESSAGES, tokens)))
        return [from_many("W4", f"rbees-workerd `{flags}`, 4 concurrent (total)", many)]


JSON_MESSAGES = [{"role": "user", "content": "Describe five honey bees of a hive as JSON: "
                  "for each its name, age in days, role and three favourite flowers."}]
BEES_SCHEMA = {"type": "object", "properties": {"bees": {"type": "array", "items": {
    "type": "object", "properties": {
        "name": {"type": "string"}, "age_days": {"type": "integer", "minimum": 0},
        "role": {"enum": ["worker", "drone", "queen", "forager", "nurse"]},
        "flowers": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age_days", "role", "flowers"], "additionalProperties": False}}},
    "required": ["bees"], "additionalProperties": False}


def bench_grammar(tokens: int, threads: int, runs: int, device: str = "cpu") -> list[Result]:
    """The same JSON-asking chat on one worker, free and under a JSON schema's grammar,
    alternated so that a busy machine weighs on both alike."""
    with Worker(threads, 1, device=device) as w:
        free: list[Stream] = []
        bound: list[Stream] = []
        for _ in range(runs + 1):  # the first of each is median_of's warm-up
            free.append(w.stream(JSON_MESSAGES, tokens))
            bound.append(w.stream(JSON_MESSAGES, tokens, json_schema=BEES_SCHEMA))
    it, jit = iter(free), iter(bound)
    return [from_stream("Wj", "rbees-workerd, 1 stream, JSON asked, free",
                        median_of(runs, lambda: next(it))),
            from_stream("Wg", "rbees-workerd, 1 stream, JSON asked, under a JSON schema",
                        median_of(runs, lambda: next(jit)))]


# -- extra baselines ----------------------------------------------------------------------


def bench_inprocess(path: str, tokens: int, threads: int, runs: int) -> list[Result]:
    from llama_cpp import Llama

    llm = Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=CTX, n_batch=256,
                verbose=False)

    def once() -> Stream:
        t0 = time.perf_counter()
        first = None
        n = 0
        chunks: Any = llm.create_chat_completion(MESSAGES,  # type: ignore[arg-type]
                                                 max_tokens=tokens, temperature=0, stream=True)
        for chunk in chunks:
            if chunk["choices"][0]["delta"].get("content"):
                n += 1
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        assert first is not None
        return Stream((first - t0) * 1000, (n - 1) / (end - first), n, end)

    try:
        s = median_of(runs, once)
    finally:
        llm.close()
    return [from_stream("a", "llama-cpp-python in-process, 1 stream", s)]


def bench_batched_loop(path: str, tokens: int, threads: int, runs: int, n_seq: int = 4
                       ) -> list[Result]:
    """``n_seq`` sequences decoded together by the least a program can do: fill the batch,
    ``llama_decode``, numpy's argmax of each sequence's logits (as rbees-workerd samples
    greedily). No HTTP, no client, no text: what the engine alone allows on this host."""
    import llama_cpp as lib
    import numpy as np

    lib.llama_backend_init()
    mparams = lib.llama_model_default_params()
    model = lib.llama_model_load_from_file(path.encode(), mparams)
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = CTX * n_seq
    cparams.n_batch = cparams.n_ubatch = 256
    cparams.n_seq_max = n_seq
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.kv_unified = False
    cparams.no_perf = True
    ctx = lib.llama_init_from_model(model, cparams)
    mem = lib.llama_get_memory(ctx)
    vocab = lib.llama_model_get_vocab(model)
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    data = PROMPT.encode()
    buf = (lib.llama_token * 256)()
    n_prompt = lib.llama_tokenize(vocab, data, len(data), buf, 256, True, True)
    prompt = list(buf[:n_prompt])
    batch = lib.llama_batch_init(256, 0, 1)
    eos = lib.llama_vocab_eos(vocab)

    def fill(entries: list[tuple[int, int, int, bool]]) -> None:
        for k, (tok, pos, seq, want) in enumerate(entries):
            batch.token[k], batch.pos[k], batch.n_seq_id[k] = tok, pos, 1
            batch.seq_id[k][0], batch.logits[k] = seq, want
        batch.n_tokens = len(entries)

    def argmax(i: int) -> int:
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
        return int(logits.argmax())

    def once() -> Stream:
        for s in range(n_seq):
            lib.llama_memory_seq_rm(mem, s, -1, -1)
        entries = []
        for s in range(n_seq):
            entries += [(t, i, s, i == len(prompt) - 1) for i, t in enumerate(prompt)]
        fill(entries)
        lib.llama_decode(ctx, batch)
        idx = [len(prompt) * (s + 1) - 1 for s in range(n_seq)]
        pos = len(prompt)
        t_first = time.perf_counter()
        produced = 0
        for _ in range(tokens):
            toks = [argmax(i) for i in idx]
            toks = [eos + 1 if tok == eos else tok for tok in toks]  # the same length always
            produced += n_seq
            fill([(toks[s], pos, s, True) for s in range(n_seq)])
            idx = list(range(n_seq))
            lib.llama_decode(ctx, batch)
            pos += 1
        end = time.perf_counter()
        return Stream(0.0, produced / (end - t_first), produced, end)

    try:
        s = median_of(runs, once)
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(model)
    what = "1 sequence" if n_seq == 1 else f"{n_seq} sequences (total)"
    return [Result(f"a{n_seq}", f"bare llama-cpp-python decode loop, {what}, no HTTP (raw "
                   "prompt)", s.tokens_per_s, None, s.tokens)]


def bench_llama_cpp_server(path: str, tokens: int, threads: int, runs: int) -> list[Result]:
    python = ROOT / ".venv-bench" / "bin" / "python"
    if not python.exists():
        return []
    port = find_free_port()
    proc = subprocess.Popen(
        [str(python), "-m", "llama_cpp.server", "--model", path, "--port", str(port),
         "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(CTX),
         "--n_batch", "256"],
        env=baseline_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/v1/models", timeout=120, proc=proc)
        with httpx.Client(timeout=300) as client:
            s = median_of(runs, lambda: chat_stream(client, url, "smollm2", MESSAGES, tokens))
    finally:
        proc.terminate()
        proc.wait(60)
    return [from_stream("c", "llama_cpp.server, 1 stream, OpenAI chat", s)]


def bench_torch(tokens: int, threads: int, runs: int) -> list[Result]:
    try:
        import rbees_backend_torch  # noqa: F401
    except ImportError:
        return []
    with Worker(threads, backend="torch") as w:
        s = median_of(max(1, runs - 1), lambda: w.stream(MESSAGES, tokens))
    return [from_stream("e", "rbees-workerd --backend torch, 1 stream", s)]


# -- judging and printing -----------------------------------------------------------------


def checks(by: dict[str, Result]) -> list[Check]:
    def tps(name: str) -> float | None:
        r = by.get(name)
        return r.tps if r else None

    def ttft(name: str) -> float | None:
        r = by.get(name)
        return r.ttft_ms if r else None

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    w1, l1, w1k, l1k = ttft("W1"), ttft("L1"), ttft("W1k"), ttft("L1k")
    return [
        ratio_check("rbees-workerd 1 stream tokens/s / llama-server -np 1", ">= 1.05",
                    div(tps("W1"), tps("L1")), 1.05),
        ratio_check("rbees-workerd 1 stream TTFT - llama-server's", "<= +2 ms",
                    w1 - l1 if w1 is not None and l1 is not None else None, 2.0,
                    at_least=False, fmt="{:+.1f} ms"),
        ratio_check("rbees-workerd --slots 4, 4 concurrent / llama-server -np 4", ">= 1.05",
                    div(tps("W4"), tps("L4")), 1.05),
        ratio_check("1,000-token prompt TTFT, rbees-workerd / llama-server", "<= 1.1",
                    div(w1k, l1k), 1.1, at_least=False),
        ratio_check("grammar sampler: JSON schema / free tokens/s, same chat (issue 23)",
                    ">= 0.85", div(tps("Wg"), tps("Wj")), 0.85),
    ]


#: the ceiling ratios printed beside the judged rows: (label, numerator, denominator)
CEILINGS = (
    ("bare loop / llama-server, 1 stream (a1/L1): the most W1/L1 could be", "a1", "L1"),
    ("rbees-workerd / bare loop, 1 stream (W1/a1)", "W1", "a1"),
    ("bare loop / llama-server, 4 concurrent (a4/L4): the most W4/L4 could be", "a4", "L4"),
    ("rbees-workerd / bare loop, 4 concurrent (W4/a4)", "W4", "a4"),
)


def ceilings(by: dict[str, Result]) -> list[str]:
    """Each of :data:`CEILINGS` in this run, formatted; "-" where a case was skipped."""
    out = []
    for _, a, b in CEILINGS:
        num, den = by.get(a), by.get(b)
        ok = num is not None and den is not None and num.tps and den.tps
        out.append(f"{num.tps / den.tps:.3f}" if ok else "-")  # type: ignore[union-attr, operator]
    return out


def table(results: list[Result]) -> str:
    lines = ["| case | what | tokens/s | TTFT ms | tokens |", "|---|---|---:|---:|---:|"]
    for r in results:
        tps = f"{r.tps:.1f}" if r.tps is not None else "-"
        ttft = f"{r.ttft_ms:.1f}" if r.ttft_ms is not None else "-"
        lines.append(f"| {r.name} | {r.label} | {tps} | {ttft} | {r.tokens} |")
    return "\n".join(lines)


def run_once(args: argparse.Namespace, path: str, exe: Path | None) -> list[Result]:
    t, n, r, lw, dev = args.tokens, args.threads, args.runs, args.long_words, args.device
    steps: list[tuple[str, Callable[[], list[Result]]]] = []
    if exe is not None:
        steps.append(("L1", lambda: bench_llama_server(exe, path, 1, t, n, r, lw, dev)))
    steps.append(("W1", lambda: bench_worker(1, t, n, r, lw, dev)))
    if exe is not None:
        steps.append(("L4", lambda: bench_llama_server(exe, path, 4, t, n, r, lw, dev)))
    steps += [
        ("W4", lambda: bench_worker(4, t, n, r, lw, dev)),
        ("a", lambda: bench_inprocess(path, t, n, r)),
        ("a1", lambda: bench_batched_loop(path, t, n, r, n_seq=1)),
        ("a4", lambda: bench_batched_loop(path, t, n, r)),
        ("c", lambda: bench_llama_cpp_server(path, t, n, r)),
        ("e", lambda: bench_torch(t, n, r)),
        ("g", lambda: bench_grammar(t, n, r, dev)),
        ("s", lambda: bench_shard(t, n, r, lw)),
    ]
    results: list[Result] = []
    for name, step in steps:
        if name in args.skip:
            continue
        print(f"  {name} ...", file=sys.stderr, flush=True)
        try:
            results += step()
        except Exception as exc:  # report and go on: one missing case must not hide others
            print(f"  {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu",
                        help="cuda:N: rbees-workerd --device cuda:N against llama-server with "
                             "every layer on that GPU (a CUDA build: CMAKE_ARGS=-DGGML_CUDA=on "
                             "bash bench/setup.sh); the extra baselines stay on the CPU")
    parser.add_argument("--runs", type=int, default=3, help="samples per case in a run")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of the whole set, one after the other; all are reported")
    parser.add_argument("--skip", default="",
                        help="comma-separated cases to skip (a,a1,a4,c,e,g,s)")
    parser.add_argument("--llama-server", default=None, help="the llama-server binary")
    parser.add_argument("--long-words", type=int, default=LONG_WORDS, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="8 tokens, 1 sample, no extra baselines: that the bench runs")
    args = parser.parse_args(argv)
    args.skip = set(args.skip.split(",")) - {""}
    if args.quick:
        args.tokens, args.runs, args.long_words = 8, 1, 64
        args.skip |= {"a", "a1", "a4", "c", "e"}
    exe = find_llama_server(args.llama_server)
    path = resolve_model(plugins.make_manager(plugins.builtin_plugins()), DEFAULT_MODEL_REF)
    print(f"# rbees-workerd side by side (SmolLM2-135M-Instruct Q4_1), {args.repeat} run(s)\n")
    print(header(args.threads, args.tokens, args.runs, exe) + "\n")
    every: list[list[Check]] = []
    limits: list[list[str]] = []
    for i in range(args.repeat):
        print(f"run {i + 1} of {args.repeat} ...", file=sys.stderr, flush=True)
        load = load_note()
        results = run_once(args, path, exe)
        every.append(checks({r.name: r for r in results}))
        limits.append(ceilings({r.name: r for r in results}))
        print(f"## Run {i + 1} of {args.repeat}\n\n{load}\n")
        print(table(results) + "\n", flush=True)
    print(f"## Acceptance, every run (issue 21)\n\n{report(every)}")
    if any(v != "-" for run in limits for v in run):
        rows = [(label, [run[k] for run in limits]) for k, (label, _, _) in enumerate(CEILINGS)]
        print("\n## The engine's ceiling, every run (not judged)\n\n" + measurements_table(
            rows, args.repeat, "tokens/s ratios; the bare loop has no HTTP, no client, no text"))
    if BUSY_REFUSALS[0]:
        print(f"\nrbees-workerd refused {BUSY_REFUSALS[0]} request(s) sent just after the one "
              "before ended (503, its slot not yet free); each was sent again, timed afresh.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
