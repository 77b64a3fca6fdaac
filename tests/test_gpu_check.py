"""scripts/gpu_check.sh in its dry mode (GPU_CHECK_DRY=1): every step of the GPU check at tiny widths
on the CPU, so the script a GPU session runs cannot rot between sessions."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = (
    "cuda_tests",
    "kernel_precision",
    "build_8b_shaped",
    "single_process",
    "deterministic",
    "dpo_8b_shape",
    "metaapo_8b_shape",
    "throughput_memory",
    "kernel_bench",
    "toy_stop_and_resume",
)


def test_gpu_check_dry_run_passes_every_step(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(out), "PY": sys.executable}
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    for step in STEPS:
        assert re.search(rf"^{step}\s+PASS\b", summary, flags=re.M), summary
    kernel = (out / "kernel.log").read_text()
    assert "PRECISION OK" in kernel and re.search(r"^\| ours: .* \| 64 \|", kernel, flags=re.M)
    run8b = (out / "run8b.log").read_text()
    assert "generated for 8/8 prompts" in run8b  # the MetaAPO iteration sampled every prompt (--sampling=all)
    assert re.search(r"^\| dpo \| 4 \|", run8b, flags=re.M) and re.search(
        r"^\| metaapo-sampling_all \|", run8b, flags=re.M
    )
    toy = (out / "toy.log").read_text()
    assert "with status 143" in toy and "resumed: status 0" in toy
    # the summary table is printed last, every step in it
    assert result.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
