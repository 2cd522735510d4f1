#!/usr/bin/env bash
# The main job on the embedded default: a local cluster (rbees-orcd + pool-managerd on this
# host) serving SmolLM2-135M from its package answers one job, streamed token by token.
# Run ./scripts/setup.sh first (README's one-liner does both). `rbees down` stops the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export RBEES_HOME=${RBEES_HOME:-$PWD/.rbees-home}
PROMPT=${1:-"Write one sentence about bees."}

if ! rbees orchestrator status >/dev/null 2>&1; then
    rbees up
fi
rbees jobs submit --model smollm2 --prompt "$PROMPT"
echo "the cluster keeps running: rbees jobs submit ... again, or rbees down (RBEES_HOME=$RBEES_HOME)" >&2
