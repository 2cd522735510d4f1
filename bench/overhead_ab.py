"""Bench (a) of bench/orchestrator.py on two commits, in alternating rounds of one run.

A refactor of rbees-orcd is judged by whether it made (a) worse: the added TTFT and the
tokens/s ratio through rbees-orcd, and rbees-orcd's CPU per relayed token. This VM drifts
between minutes by more than the differences being judged, so the two commits run in
alternating rounds (base, head, base, head, ...) on the same installed environment, each
from its own checkout (a detached ``git worktree`` of BASE, imported first through
PYTHONPATH), and every round is reported, not the best.

Usage: python bench/overhead_ab.py BASE [--head HEAD] [--rounds 3] [--runs 15] [--tokens 64]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"\| (added TTFT <= 5 ms|tokens/s ratio >= 0\.97[^|]*) \| ([^|]+) \|")
CPU = re.compile(r"CPU while it relayed: ([0-9.]+) ms per token")


def checkout(rev: str, into: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force",
                    str(into), rev], check=True, capture_output=True)
    return into


def pythonpath(tree: Path) -> str:
    dirs = [tree, *sorted(tree.glob("plugins/*/src")), *sorted(tree.glob("backends/*/src")),
            *sorted(tree.glob("schedulers/*/src"))]
    return os.pathsep.join(str(d) for d in dirs)


def one_round(tree: Path, runs: int, tokens: int) -> dict[str, str]:
    code = ("import sys; sys.path.insert(0, 'bench'); from orchestrator import bench_overhead; "
            f"print('\\n'.join(bench_overhead({runs}, {tokens})))")
    env = {**os.environ, "PYTHONPATH": pythonpath(tree)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, text=True,
                         capture_output=True, timeout=900)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:80]}
    got = {name.split(" ")[0]: value.strip() for name, value in ROW.findall(out.stdout)}
    cpu = CPU.search(out.stdout)
    got["cpu"] = f"{cpu.group(1)} ms" if cpu else "?"
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base")
    parser.add_argument("--head", default="HEAD")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rbees-ab-"))
    trees = {}
    for label, rev in (("base", args.base), ("head", args.head)):
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True,
                             capture_output=True, text=True).stdout.strip()
        trees[f"{label} {sha}"] = checkout(rev, tmp / label)
    print(f"bench (a), {args.runs} jobs each way per round, {args.tokens} tokens per job\n")
    print("| round | commit | added TTFT | tokens/s ratio | orcd CPU per token |")
    print("|---:|---|---:|---:|---:|")
    try:
        for n in range(1, args.rounds + 1):
            for label, tree in trees.items():
                got = one_round(tree, args.runs, args.tokens)
                if "error" in got:
                    print(f"| {n} | {label} | failed: {got['error']} | | |", flush=True)
                    continue
                print(f"| {n} | {label} | {got.get('added', '?')} | {got.get('tokens/s', '?')} "
                      f"| {got['cpu']} |", flush=True)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
