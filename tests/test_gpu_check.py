"""scripts/gpu_check.sh in its dry mode (GPU_CHECK_DRY=1): every step of the GPU check at tiny widths
on the CPU, the 8B-shaped steps on 2 gloo ranks under torchrun, so the script a GPU session runs
cannot rot between sessions; and its step limits, which must fit one command on a lent GPU."""

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
    "dpo_8b_shape",
    "metaapo_8b_shape",
    "throughput_memory",
    "kernel_bench",
    "toy_stop_and_resume",
)


def test_gpu_check_step_limits_fit_one_command_of_8_minutes():
    """A lent GPU gives at most 10 minutes per command: the limits of every step add up to under 8."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    limits = dict(re.findall(r"^\s*(?:want \w+ && )?step (\w+) (\d+) ", script, flags=re.M))
    assert set(limits) == set(STEPS), limits
    assert sum(map(int, limits.values())) < 8 * 60, limits


def test_gpu_check_dry_run_passes_every_step(tmp_path):
    out = tmp_path / "gpu_check"
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(out), "PY": sys.executable}
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "2 rank(s) under torchrun" in summary
    for step in STEPS:
        assert re.search(rf"^{step}\s+PASS\b", summary, flags=re.M), summary
        # each row printed as its step ended, before the closing tables
        assert result.stdout.index(f"{step} ") < result.stdout.index("== kernel ==")
    assert "PRECISION OK" in (out / "kernel_precision.log").read_text()
    assert re.search(r"^\| ours: .* \| 64 \|", (out / "kernel_bench.log").read_text(), flags=re.M)
    assert "generated for 8/8 prompts" in (out / "metaapo_8b_shape.log").read_text()  # --sampling=all
    report = (out / "throughput_memory.log").read_text()
    assert "2 rank(s)" in report and re.search(r"^\| dpo \| 4 \|", report, flags=re.M)
    assert re.search(r"^\| metaapo-sampling_all-meta_interval_1 \|", report, flags=re.M)
    toy = (out / "toy_stop_and_resume.log").read_text()
    assert "with status 143" in toy and "resumed: status 0" in toy
    # the summary table is printed last, every step in it
    assert result.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])


def test_a_step_that_would_end_past_the_budget_is_skipped_and_fails(tmp_path):
    """BUDGET: a step whose limit would end past it is not started (a lent GPU's command would be
    killed mid-step); its row says so and the check fails."""
    out = tmp_path / "gpu_check"
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(out), "PY": sys.executable, "BUDGET": "1"}
    env["STEPS"] = "precision,bench"
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    summary = (out / "summary.txt").read_text()
    assert result.returncode == 1 and re.search(r"^kernel_precision\s+SKIPPED .*BUDGET=1", summary, flags=re.M)
    assert re.search(r"^kernel_bench\s+SKIPPED", summary, flags=re.M) and not (out / "kernel_bench.log").exists()
