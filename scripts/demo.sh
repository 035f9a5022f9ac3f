#!/usr/bin/env bash
# The README's main job: set up .venv if needed, then run `deltahub demo` (offline, CPU, tiny model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
deltahub demo "$@"
