"""Worker benchmark: rbees-workerd against llama-cpp-python in-process and llama_cpp.server.

One run, one model (the embedded SmolLM2-135M Q4_1), the same thread count everywhere.
Prints one Markdown table and the target ratios:

  (a)  llama-cpp-python in-process, one stream (high-level Llama, streaming)
  (a4) a bare llama-cpp-python batched-decode loop, 4 sequences (the engine's ceiling)
  (b)  rbees-workerd, one stream over HTTP/SSE
  (c)  llama_cpp.server, one stream through its OpenAI API (run bench/setup.sh once)
  (d)  rbees-workerd --slots 4, aggregate tokens/s at 1, 2 and 4 concurrent streams
  (e)  rbees-workerd --backend torch, one stream (needs rbees-backend-torch)

Usage: python bench/worker.py [--tokens 128] [--threads 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from rbees_core import plugins
from rbees_core.models import DEFAULT_MODEL_REF, resolve_model
from rbees_core.testing import find_free_port, wait_http, workerd_argv

PROMPT = "Once upon a time, in a small village by the sea, there lived"


class Result:
    def __init__(self, name: str, label: str, tps: float, ttft_ms: float | None,
                 tokens: int, note: str = "") -> None:
        self.name, self.label, self.tps, self.ttft_ms = name, label, tps, ttft_ms
        self.tokens, self.note = tokens, note


def median_run(runs: int, once: Callable[[], tuple[float, float | None, int]]
               ) -> tuple[float, float | None, int]:
    once()  # warm-up
    samples = [once() for _ in range(runs)]
    tps = statistics.median(s[0] for s in samples)
    ttfts = [s[1] for s in samples if s[1] is not None]
    return tps, (statistics.median(ttfts) if ttfts else None), samples[-1][2]


# -- (a) and (a4): llama-cpp-python in-process --------------------------------------------


def bench_inprocess(path: str, tokens: int, threads: int, runs: int) -> Result:
    from llama_cpp import Llama

    llm = Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=4096, n_batch=256,
                verbose=False)

    def once() -> tuple[float, float | None, int]:
        t0 = time.perf_counter()
        first = None
        n = 0
        for _ in llm.create_completion(PROMPT, max_tokens=tokens, temperature=0, stream=True):
            n += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        assert first is not None
        return (n - 1) / (end - first), (first - t0) * 1000, n

    tps, ttft, n = median_run(runs, once)
    llm.close()
    return Result("a", "llama-cpp-python in-process, 1 stream", tps, ttft, n)


def bench_batched_loop(path: str, tokens: int, threads: int, runs: int, n_seq: int = 4
                       ) -> Result:
    import llama_cpp as lib

    lib.llama_backend_init()
    mparams = lib.llama_model_default_params()
    model = lib.llama_model_load_from_file(path.encode(), mparams)
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = 4096 * n_seq
    cparams.n_batch = cparams.n_ubatch = 256
    cparams.n_seq_max = n_seq
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.kv_unified = False
    cparams.no_perf = True
    ctx = lib.llama_init_from_model(model, cparams)
    mem = lib.llama_get_memory(ctx)
    vocab = lib.llama_model_get_vocab(model)
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

    def once() -> tuple[float, float | None, int]:
        samplers = []
        for s in range(n_seq):
            lib.llama_memory_seq_rm(mem, s, -1, -1)
            chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            samplers.append(chain)
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
            toks = []
            for s in range(n_seq):
                tok = lib.llama_sampler_sample(samplers[s], ctx, idx[s])
                toks.append(eos + 1 if tok == eos else tok)
            produced += n_seq
            fill([(toks[s], pos, s, True) for s in range(n_seq)])
            idx = list(range(n_seq))
            lib.llama_decode(ctx, batch)
            pos += 1
        end = time.perf_counter()
        for chain in samplers:
            lib.llama_sampler_free(chain)
        return produced / (end - t_first), None, produced

    tps, _, n = median_run(runs, once)
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)
    return Result("a4", f"bare llama-cpp-python batched loop, {n_seq} sequences (total)",
                  tps, None, n)


# -- (b), (d), (e): rbees-workerd over HTTP -----------------------------------------------


class Worker:
    def __init__(self, threads: int, slots: int = 1, backend: str = "llamacpp") -> None:
        self.port = find_free_port()
        self.home = tempfile.mkdtemp(prefix="rbees-bench-")
        argv = workerd_argv(f"bench-{backend}-{slots}", self.port, backend=backend,
                            slots=slots, extra=("--threads", str(threads)))
        self.proc = subprocess.Popen(argv, env={**os.environ, "RBEES_HOME": self.home},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_http(f"{self.url}/v2/ready", timeout=300, proc=self.proc)
        self.client = httpx.Client(timeout=300)
        self.jobs = 0

    def stream(self, tokens: int) -> tuple[float, float, int, float]:
        """(tokens/s after the first token, TTFT ms, tokens, wall end)."""
        self.jobs += 1
        body = {"job_id": f"b{self.jobs}-{threading.get_ident()}", "prompt": PROMPT,
                "max_tokens": tokens, "temperature": 0, "seed": 1}
        t0 = time.perf_counter()
        first = None
        n = 0
        with self.client.stream("POST", f"{self.url}/v2/execute", json=body) as response:
            for line in response.iter_lines():
                if line == "event: token":
                    n += 1
                    if first is None:
                        first = time.perf_counter()
        end = time.perf_counter()
        assert first is not None and n > 1
        return (n - 1) / (end - first), (first - t0) * 1000, n, end

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(60)


def bench_worker(tokens: int, threads: int, runs: int) -> Result:
    w = Worker(threads)
    try:
        tps, ttft, n = median_run(runs, lambda: w.stream(tokens)[:3])
    finally:
        w.close()
    return Result("b", "rbees-workerd, 1 stream, HTTP/SSE", tps, ttft, n)


def bench_concurrent(tokens: int, threads: int, runs: int) -> list[Result]:
    w = Worker(threads, slots=4)
    out = []
    try:
        for streams in (1, 2, 4):
            def once(k: int = streams) -> tuple[float, float | None, int]:
                results: list[tuple[float, float, int, float]] = []
                start = time.perf_counter()
                threads_ = [threading.Thread(target=lambda: results.append(w.stream(tokens)))
                            for _ in range(k)]
                for t in threads_:
                    t.start()
                for t in threads_:
                    t.join()
                total = sum(r[2] for r in results)
                end = max(r[3] for r in results)
                return total / (end - start), statistics.median(r[1] for r in results), total

            tps, ttft, n = median_run(runs, once)
            out.append(Result(f"d({streams})",
                              f"rbees-workerd --slots 4, {streams} concurrent (total)",
                              tps, ttft, n))
    finally:
        w.close()
    return out


def bench_torch(tokens: int, threads: int, runs: int) -> Result:
    w = Worker(threads, backend="torch")
    try:
        tps, ttft, n = median_run(max(1, runs - 1), lambda: w.stream(tokens)[:3])
    finally:
        w.close()
    return Result("e", "rbees-workerd --backend torch, 1 stream", tps, ttft, n)


# -- (c): llama_cpp.server --------------------------------------------------------------


def bench_llama_server(path: str, tokens: int, threads: int, runs: int) -> Result:
    port = find_free_port()
    bench_python = os.path.join(os.path.dirname(__file__), "..", ".venv-bench", "bin", "python")
    python = bench_python if os.path.exists(bench_python) else sys.executable
    proc = subprocess.Popen(
        [python, "-m", "llama_cpp.server", "--model", path, "--port", str(port),
         "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096",
         "--n_batch", "256"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/v1/models", timeout=120, proc=proc)
        client = httpx.Client(timeout=300)

        def once() -> tuple[float, float | None, int]:
            t0 = time.perf_counter()
            first = None
            n = 0
            body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
            with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {") and \
                            json.loads(line[6:])["choices"][0].get("text"):
                        n += 1
                        if first is None:
                            first = time.perf_counter()
            end = time.perf_counter()
            assert first is not None
            return (n - 1) / (end - first), (first - t0) * 1000, n

        tps, ttft, n = median_run(runs, once)
        client.close()
    finally:
        proc.terminate()
        proc.wait(60)
    return Result("c", "llama_cpp.server, 1 stream, OpenAI SSE", tps, ttft, n)


def table(results: list[Result]) -> str:
    lines = ["| case | what | tokens/s | TTFT ms | tokens |", "|---|---|---:|---:|---:|"]
    for r in results:
        ttft = f"{r.ttft_ms:.1f}" if r.ttft_ms is not None else "-"
        lines.append(f"| {r.name} | {r.label} | {r.tps:.1f} | {ttft} | {r.tokens} |")
    return "\n".join(lines)


def targets(by: dict[str, Result]) -> str:
    rows = ["| target | measured | holds |", "|---|---|---|"]

    def row(name: str, value: str, ok: bool) -> None:
        rows.append(f"| {name} | {value} | {'yes' if ok else 'NO'} |")

    a, b = by.get("a"), by.get("b")
    if a and b:
        row("b/a >= 0.95", f"{b.tps / a.tps:.3f}", b.tps / a.tps >= 0.95)
        assert a.ttft_ms is not None and b.ttft_ms is not None
        row("TTFT(b) <= TTFT(a) + 5 ms", f"{b.ttft_ms - a.ttft_ms:+.1f} ms",
            b.ttft_ms <= a.ttft_ms + 5)
    if b and "c" in by:
        row("b > c", f"{b.tps:.1f} vs {by['c'].tps:.1f}", b.tps > by["c"].tps)
    if "a4" in by and "d(4)" in by:
        ratio = by["d(4)"].tps / by["a4"].tps
        row("d(4) >= 0.9 x a4", f"{ratio:.3f}", ratio >= 0.9)
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated cases to skip (c,e,...)")
    args = parser.parse_args()
    skip = set(args.skip.split(",")) - {""}
    # the worker's llama.cpp backend runs OpenMP passively; give every case the same policy
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    path = resolve_model(plugins.make_manager(plugins.builtin_plugins()), DEFAULT_MODEL_REF)
    results: list[Result] = []
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("a", lambda: bench_inprocess(path, args.tokens, args.threads, args.runs)),
        ("a4", lambda: bench_batched_loop(path, args.tokens, args.threads, args.runs)),
        ("b", lambda: bench_worker(args.tokens, args.threads, args.runs)),
        ("c", lambda: bench_llama_server(path, args.tokens, args.threads, args.runs)),
        ("d", lambda: bench_concurrent(args.tokens, args.threads, args.runs)),
        ("e", lambda: bench_torch(args.tokens, args.threads, args.runs)),
    ]
    for name, step in steps:
        if name in skip:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            got = step()
        except Exception as exc:  # report and go on: one missing case must not hide others
            print(f"  {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        results.extend(got if isinstance(got, list) else [got])
    print(f"SmolLM2-135M-Instruct Q4_1, {args.tokens} tokens, {args.threads} threads, "
          f"median of {args.runs} runs after a warm-up\n")
    print(table(results))
    print()
    print(targets({r.name: r for r in results}))


if __name__ == "__main__":
    main()
