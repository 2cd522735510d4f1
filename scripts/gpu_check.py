"""The GPU paths of rbees on an NVIDIA host: what CI, which has no GPU, cannot run.

  1. NVML inventory through rbees-gpu-nvml: the entries pool-managerd reports (CONTRACT 4)
  2. llama-cpp-python's CUDA build through rbees-backend-llamacpp: SmolLM2 on cuda:0,
     greedy, against the same on cpu
  3. torch's CUDA backend through rbees-backend-torch: SmolLM2 (GGUF, dequantized by
     transformers) on cuda:0

  4. with --bench N: issue 21's rows on the GPU, N runs each: bench/worker.py --device cuda:0
     (rbees-workerd against llama-server with every layer on the GPU) and section (s) of
     bench/orchestrator.py (a plain ``rbees up``, whose scheduler puts the worker on the GPU,
     against the same baselines on the GPU); needs rbees installed and a CUDA build of
     llama-server (CMAKE_ARGS="-DGGML_CUDA=on" bash bench/setup.sh, or --llama-server)

Prints what it found and a table; exits 1 when a check fails. The checks run from a checkout
without installing it (the kernel and the three plugins are put on sys.path).
Usage: python scripts/gpu_check.py MODEL.gguf [--tokens 64] [--skip-torch]
                                   [--bench N] [--llama-server PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for src in ("plugins/rbees-gpu-nvml/src", "backends/rbees-backend-llamacpp/src",
            "backends/rbees-backend-torch/src", "."):
    sys.path.insert(0, str(ROOT / src))

PROMPT = "Once upon a time, in a small village by the sea, there lived"


def generate(backend: Any, path: str, device: str, tokens: int) -> dict[str, Any]:
    """Load ``path`` on ``device`` and decode ``tokens`` greedily through the backend's
    LoadedModel, as rbees-workerd's engine does."""
    from rbees_core.backend import Feed, SamplingParams

    estimate = backend.estimate_memory(path, device=device, slots=1, ctx=2048)
    t0 = time.perf_counter()
    model = backend.load(path, device=device, slots=1, ctx=2048, threads=None,
                         progress=lambda stage, fraction: None)
    loaded = time.perf_counter() - t0
    prompt = model.tokenize(PROMPT)
    runs = []
    for _ in range(2):  # the second run is the one reported: the first warms the device
        model.begin(0, SamplingParams(temperature=0))
        t0 = time.perf_counter()
        model.decode([Feed(0, prompt, True)])
        token = model.sample(0)
        first = time.perf_counter()
        out = [token]
        for _ in range(tokens - 1):
            model.decode([Feed(0, (token,), True)])
            token = model.sample(0)
            out.append(token)
        end = time.perf_counter()
        model.end(0)
        runs.append((out, (first - t0) * 1000, (tokens - 1) / (end - first)))
    out, ttft_ms, tps = runs[-1]
    text = b"".join(model.token_bytes(t) for t in out).decode("utf-8", "replace")
    # the preflight's estimate (weights and cache, without the overhead) against what the
    # loaded model reports: informative
    estimated = None if estimate is None else estimate.weights_bytes + estimate.kv_cache_bytes
    return {"device": device, "load_s": round(loaded, 2), "ttft_ms": round(ttft_ms, 1),
            "tokens_per_s": round(tps, 1), "tokens": out, "text": text,
            "memory_bytes": model.memory_bytes, "estimated_bytes": estimated}


def one_backend(module: str, cls: str, model: str, device: str, tokens: int
                ) -> tuple[dict[str, Any], list[str]]:
    backend = getattr(__import__(module, fromlist=[cls]), cls)()
    return generate(backend, model, device, tokens), type(backend).available_devices()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--skip-torch", action="store_true",
                        help="leave out rbees-backend-torch (half a minute of dequantizing)")
    parser.add_argument("--bench", type=int, default=0, metavar="N",
                        help="then issue 21's benches on cuda:0, N runs each")
    parser.add_argument("--llama-server", default=None, help="a CUDA build of llama-server")
    args = parser.parse_args()
    rows: list[tuple[str, str, bool]] = []

    def check(name: str, run: Any) -> Any:
        try:
            detail, ok, value = run()
        except Exception:
            traceback.print_exc()
            rows.append((name, "raised (traceback above)", False))
            return None
        rows.append((name, detail, ok))
        return value

    def nvml() -> tuple[str, bool, Any]:
        import attrs
        from rbees_gpu_nvml import NvmlInventory

        gpus = [attrs.asdict(g) for g in NvmlInventory().collect()]  # the wire JSON
        print("NVML inventory:", json.dumps(gpus, indent=1, default=str))
        names = ", ".join(f"{g['name']} ({g['memory_total_bytes'] >> 20} MiB)" for g in gpus)
        return f"{len(gpus)} GPU(s): {names}", bool(gpus), gpus

    check("NVML inventory (rbees-gpu-nvml)", nvml)

    def backend_run(module: str, cls: str, device: str) -> Any:
        def run() -> tuple[str, bool, Any]:
            # each in a process of its own, as rbees-workerd runs one backend per process
            # (two CUDA runtimes in one process, llama.cpp's and torch's, crashed it)
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                got, available = pool.apply(one_backend, (module, cls, args.model, device,
                                                          args.tokens))
            print(f"{cls}.available_devices() = {available}")
            print(f"{cls} on {device}:", json.dumps({k: v for k, v in got.items()
                                                     if k != "tokens"}))
            ok = device.partition(":")[0] in available and len(got["tokens"]) == args.tokens
            memory = (f", {got['memory_bytes'] >> 20} MiB held"
                      + (f" (estimated {got['estimated_bytes'] >> 20})"
                         if got["estimated_bytes"] is not None else ""))
            return (f"{got['tokens_per_s']} tok/s, TTFT {got['ttft_ms']} ms, "
                    f"load {got['load_s']} s{memory}"), ok, got
        return run

    llama_cpu = check("llama.cpp on cpu", backend_run(
        "rbees_backend_llamacpp.backend", "LlamaCppBackend", "cpu"))
    llama_gpu = check("llama.cpp on cuda:0 (CUDA build)", backend_run(
        "rbees_backend_llamacpp.backend", "LlamaCppBackend", "cuda:0"))
    torch_gpu = None if args.skip_torch else check("torch on cuda:0", backend_run(
        "rbees_backend_torch.backend", "TorchBackend", "cuda:0"))
    # Greedy decoding follows the argmax, and different kernels round differently: on a
    # 135M model two close logits swap early. Reported, not judged.
    for name, a, b in (("llama.cpp greedy, cuda:0 against cpu", llama_gpu, llama_cpu),
                       ("torch against llama.cpp, both cuda:0", torch_gpu, llama_gpu)):
        if a and b:
            first_diff = next((i for i, (x, y) in enumerate(
                zip(a["tokens"], b["tokens"], strict=True)) if x != y), None)
            rows.append((f"{name} (informative)", "the same tokens" if first_diff is None
                         else f"same up to token {first_diff}", True))
    print("\n| check | result | holds |\n|---|---|---|")
    for name, detail, ok in rows:
        print(f"| {name} | {detail} | {'yes' if ok else 'NO'} |", flush=True)
    if args.bench:
        bench(args.bench, args.llama_server)
    return 0 if all(ok for _, _, ok in rows) else 1


def bench(repeat: int, llama_server: str | None) -> None:
    """Issue 21's rows with the worker on cuda:0, each bench in a process of its own, its
    table printed as it comes (the benches judge; this script's exit status does not)."""
    extra = ["--llama-server", llama_server] if llama_server else []
    for argv in (
        [str(ROOT / "bench/worker.py"), "--device", "cuda:0", "--repeat", str(repeat),
         "--skip", "a,a1,a4,c,e,g,s", *extra],
        [str(ROOT / "bench/orchestrator.py"), "--device", "cuda:0", "--repeat", str(repeat),
         "--skip-overhead", "--skip-admission", "--skip-protocols", "--skip-keys",
         "--skip-batches", *extra],
    ):
        print(f"\n$ python {' '.join(argv)}", flush=True)
        subprocess.run([sys.executable, *argv], check=False)


if __name__ == "__main__":
    sys.exit(main())
