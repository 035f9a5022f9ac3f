"""The GPU benchmarks run end to end here: gpu_step.py's --smoke mode on the CPU, and sddmm.py's CUDA mode
rehearsed on CPU tensors (the Triton kernel in Triton's interpreter) on tiny shapes. Their figures mean nothing
on a CPU; what this proves is that a GPU session can run them unchanged."""

import importlib.util
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow
def test_gpu_step_smoke_runs_every_config_and_reports_ratios_to_lora():
    configs = "floor,sft-rigl,sft-sm3,lora,full"  # sft-rigl-triton: ~40 s in the interpreter, see below
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_step.py"), "--smoke", "--configs", configs],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in configs}
    assert set(rows) == set(configs.split(","))
    assert rows["lora"][4] == "1.00x"  # the ratio column is relative to LoRA
    assert int(rows["sft-rigl"][1].replace(",", "")) == pytest.approx(
        int(rows["lora"][1].replace(",", "")), abs=20
    )
    assert any(line.startswith("sft-rigl: window step") for line in lines)


def test_sddmm_cuda_mode_rehearsed_on_the_cpu(triton_interpreter, capsys):
    spec = importlib.util.spec_from_file_location("bench_sddmm", BENCHMARKS / "sddmm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = Namespace(repeats=1, dtype="bfloat16", tokens=40, block_r="16,32")
    bench.cuda_main(args, device=torch.device("cpu"), shapes=((45, 29),), densities=(0.05, 0.3))
    out = capsys.readouterr().out
    assert "45x29" in out and "crossover" in out and "R16" in out and "R32" in out
