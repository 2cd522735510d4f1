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
