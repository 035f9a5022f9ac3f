#!/usr/bin/env bash
# The GPU checks of training (docs/training.md, "Training on GPUs") as one run on a machine with a CUDA GPU:
# the cuda test tier, then benchmarks/sddmm.py --device cuda (sets TRITON_MAX_DENSITY / TRITON_BLOCK_R in
# training/sddmm.py) and benchmarks/gpu_step.py. Each step has a time limit; outputs go to $OUT (default
# ./gpu-check). Needs a CUDA build of torch with triton (it ships with it) and `pip install -e '.[dev]'`.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
python=${PYTHON:-python}
mkdir -p "$out"
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')" || exit 1
"$python" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee "$out/device.txt"
status=0
timeout "${TIER_LIMIT:-240}" "$python" -m pytest -m cuda -q -p no:cacheprovider 2>&1 | tee "$out/cuda-tier.txt" || status=1
timeout "${SDDMM_LIMIT:-240}" "$python" benchmarks/sddmm.py --device cuda --repeats 10 2>&1 | tee "$out/sddmm-cuda.txt" || status=1
timeout "${STEP_LIMIT:-240}" "$python" benchmarks/gpu_step.py 2>&1 | tee "$out/gpu-step.txt" || status=1
exit $status
