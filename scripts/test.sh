#!/usr/bin/env bash
# The whole test matrix (lint, kernel, each plugin distribution) through nox.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
exec nox "$@"
