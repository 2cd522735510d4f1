"""CLI start-up benchmark: wall time of short ``rbees-pool`` commands against a 300 ms target.

Each command runs once to warm the file cache and write any missing bytecode (``.pyc``, as
an installed rbees has: ``PYTHONDONTWRITEBYTECODE`` is dropped, else every module edited
since its last ``.pyc`` is compiled again on every run), then ``--runs`` times (default 5)
as a real process from this virtualenv, with an empty ``RBEES_HOME``. Prints a Markdown
table of the median wall time (the target's measure), the slowest run and the median CPU
time of the process (user + system: what the command costs when the machine is otherwise
idle), and exits 1 if a median wall time misses the target. With ``--imports`` it also
prints the slowest imports of each command (``python -X importtime``; modules loaded with
``importlib.import_module``, such as plugins, show only through the imports they make).

Usage: python bench/cli.py [--runs 5] [--target-ms 300] [--imports]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
COMMANDS = [
    ["rbees-pool", "--help"],
    ["rbees-pool", "models", "list"],
    ["rbees-pool", "models", "list", "--format", "json"],
    ["rbees", "--help"],
]


def once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """``(wall ms, cpu ms)`` of one run; the CPU time (user + system) of the child does not
    grow with the load other processes put on the machine, the wall time does."""
    began = time.perf_counter()
    proc = subprocess.Popen([str(BIN / argv[0]), *argv[1:]], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    errors = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {errors.decode()}")
    return elapsed * 1000, (usage.ru_utime + usage.ru_stime) * 1000


def slowest_imports(argv: list[str], env: dict[str, str], top: int = 8) -> list[str]:
    module = {"rbees-pool": "pool_cli", "rbees": "rbees_cli"}[argv[0]]
    code = (f"import sys; from rbees_core.programs import {module} as m\n"
            f"try:\n    m.main({argv[1:]!r})\nexcept SystemExit:\n    pass")
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env,
                          capture_output=True, text=True, timeout=60)
    rows = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line[len("import time:"):].split("|")
            if cumulative.strip().isdigit():
                rows.append((int(cumulative), name.rstrip()))
    rows.sort(reverse=True)
    return [f"{us / 1000:7.1f} ms {name}" for us, name in rows[:top]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--target-ms", type=float, default=300.0)
    parser.add_argument("--imports", action="store_true", help="show the slowest imports")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rbees-bench-cli-") as home:
        env = {**os.environ, "RBEES_HOME": home, "COLUMNS": "100"}
        for name in ("RBEES_DISABLED_PLUGINS", "RBEES_DISABLE_PLUGIN_AUTOLOAD", "RBEES_DEBUG",
                     "PYTHONDONTWRITEBYTECODE"):
            env.pop(name, None)
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.2f}, {args.runs} runs after 1 warm-up\n")
        print("| command | median wall ms | max wall ms | median CPU ms | target ms | |")
        print("|---|---:|---:|---:|---:|---|")
        missed = []
        for argv in COMMANDS:
            once(argv, env)
            samples = [once(argv, env) for _ in range(args.runs)]
            median = statistics.median(w for w, _ in samples)
            cpu = statistics.median(c for _, c in samples)
            ok = median <= args.target_ms
            if not ok:
                missed.append(argv)
            print(f"| `{' '.join(argv)}` | {median:.0f} | {max(w for w, _ in samples):.0f} | "
                  f"{cpu:.0f} | {args.target_ms:.0f} | {'ok' if ok else 'SLOW'} |")
        if args.imports:
            for argv in COMMANDS:
                print(f"\nslowest imports of `{' '.join(argv)}` (cumulative):")
                print("\n".join(slowest_imports(argv, env)))
    if missed:
        print(f"\n{len(missed)} command(s) over {args.target_ms:.0f} ms", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
