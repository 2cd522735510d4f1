#!/usr/bin/env bash
# Extra tools for bench/worker.py case (c): llama_cpp.server, in its own virtualenv so that
# its FastAPI stack cannot change the versions rbees is tested with. It reuses the
# llama-cpp-python already built into .venv (a .pth file) instead of compiling it again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-bench/bin/python ] || python3 -m venv .venv-bench
.venv-bench/bin/pip install --quiet "uvicorn>=0.22" "fastapi>=0.100" "pydantic-settings>=2.0.1" \
    "sse-starlette>=1.6.1" "starlette-context>=0.3.6,<0.4" "PyYAML>=5.1" numpy jinja2 diskcache \
    typing-extensions
site=$(.venv/bin/python -c 'import llama_cpp, os; print(os.path.dirname(os.path.dirname(llama_cpp.__file__)))')
bsite=$(.venv-bench/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$site" > "$bsite/rbees-llama-cpp.pth"
.venv-bench/bin/python -c "import llama_cpp.server.app; print('llama_cpp.server ready')"

# llama.cpp's own C++ server, the strongest baseline of bench/worker.py and
# bench/orchestrator.py: built from the llama.cpp source that the pinned llama-cpp-python
# vendors (its sdist), with the flags scripts/setup.sh gives llama-cpp-python, so the two
# differ only in what wraps the engine. Only the llama-server target is built.
LLAMA_CPP_VERSION=$(sed -n 's/^LLAMA_CPP_VERSION=//p' scripts/setup.sh)
server=bench/.llama-server/bin/llama-server
if [ -x "$server" ] && [ "$(cat bench/.llama-server/VERSION 2>/dev/null)" = "$LLAMA_CPP_VERSION" ]; then
    echo "llama-server from llama-cpp-python $LLAMA_CPP_VERSION ready" >&2
else
    src=bench/.llama-server/src
    rm -rf bench/.llama-server && mkdir -p "$src"
    .venv/bin/pip download --quiet --no-deps --no-binary :all: -d bench/.llama-server \
        "llama-cpp-python==$LLAMA_CPP_VERSION"
    tar -xzf bench/.llama-server/llama_cpp_python-"$LLAMA_CPP_VERSION".tar.gz -C "$src" \
        --strip-components=1
    flags=()
    if [ -n "${CMAKE_ARGS:-}" ]; then
        read -r -a flags <<<"$CMAKE_ARGS"
    elif [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then  # the flags of scripts/setup.sh
        flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
               -DGGML_BMI2=ON)
    fi
    cmake -S "$src/vendor/llama.cpp" -B bench/.llama-server/build -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF "${flags[@]}" >/dev/null
    cmake --build bench/.llama-server/build --target llama-server \
        -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" >/dev/null
    mkdir -p bench/.llama-server/bin
    cp bench/.llama-server/build/bin/llama-server "$server"
    echo "$LLAMA_CPP_VERSION" > bench/.llama-server/VERSION
    rm -rf "$src" bench/.llama-server/build bench/.llama-server/*.tar.gz
    "$server" --version 2>&1 | head -2 >&2
fi
