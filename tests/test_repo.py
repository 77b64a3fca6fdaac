"""Project layout rules (SPEC section 2) and the README / CI contract."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The source files in layers (SPEC section 2): a file imports only files of earlier layers, so the
# dependencies flow one way and there is no circle. The seven original scripts, the engine files
# (config, fsdp, checkpoint, plan), the objective MetaAPO builds on (dpo), the other methods
# (baselines/), Algorithm 1 (train.py) and the evaluation on top.
LAYERS = [
    ["data.py", "losses.py"],
    ["meta.py", "sample.py", "toy.py"],
    ["smollm2.py"],
    ["reward.py", "toy_multiobjective.py"],
    ["config.py"],
    ["fsdp.py"],
    ["checkpoint.py", "plan.py"],
    ["dpo.py"],
    ["baselines/ppo.py", "baselines/selective_dpo.py", "baselines/boundary.py", "baselines/online.py"],
    ["iterative_run.py"],
    ["train.py"],
    ["meta_aligner.py"],
    ["dynamics.py"],
    ["compare.py"],
    ["pareto.py"],
    ["evaluate.py"],
]
# the only files above train.py: the evaluation, and seed 003's Meta-Aligner (it reuses train.py's SFT stage)
ABOVE_TRAIN = ("meta_aligner.py", "dynamics.py", "compare.py", "evaluate.py")
SCRIPTS = [name for layer in LAYERS for name in layer]


def test_ci_runs_the_readme_test_command_as_written():
    ci_command = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert len(ci_command) == 1
    readme_commands = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    assert ci_command[0] in readme_commands
    assert "pytest" in ci_command[0]
    # torch is pinned before the requirements are installed, so a CPU machine never pulls CUDA wheels
    assert ci_command[0].index("torch==2.13.0") < ci_command[0].index("-r requirements.txt")


def test_every_script_opens_with_a_docstring():
    for name in SCRIPTS:
        docstring = ast.get_docstring(ast.parse((ROOT / name).read_text()))
        assert docstring and len(docstring.splitlines()) >= 3, name


def imported_scripts(name: str) -> set[str]:
    """The project's source files that `name` imports anywhere (module level or inside a function)."""
    imported = set()
    for node in ast.walk(ast.parse((ROOT / name).read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    # train.py's __main__ block imports the module by its own name (so that what checkpoints pickle is
    # train.X): a file importing itself is no dependency
    return {module.replace(".", "/") + ".py" for module in imported} & set(SCRIPTS) - {name}


def test_every_source_file_is_in_a_layer():
    sources = {str(p.relative_to(ROOT)) for p in ROOT.glob("**/*.py") if p.name != "__init__.py"}
    sources = {s for s in sources if not s.startswith(("tests/", "scripts/", ".venv/", "out/"))}
    assert sources == set(SCRIPTS)


def test_dependencies_flow_one_way():
    """Each file imports only files of earlier layers (so no two files import each other, around
    any circle): train.py and the evaluation on top, nothing imports evaluate.py, only the
    evaluation imports train.py; and there is no utils.py."""
    assert not (ROOT / "utils.py").exists() and not (ROOT / "common.py").exists()
    for depth, layer in enumerate(LAYERS):
        earlier = {name for below in LAYERS[:depth] for name in below}
        for name in layer:
            imported = imported_scripts(name)
            assert imported <= earlier, f"{name} imports {sorted(imported - earlier)}, which is not below it"
            assert "evaluate.py" not in imported and ("train.py" not in imported or name in ABOVE_TRAIN)


def test_vllm_is_not_a_core_requirement():
    requirements = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    names = {re.split(r"[<>=!~\[ ]", line)[0].lower() for line in requirements if line}
    assert {"torch", "transformers", "safetensors", "numpy", "tqdm", "pytest"} <= names
    assert "vllm" not in names


def test_toy_self_check_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "toy.py", "--out_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "sizes: sft 4000, train_prefs 6000, test_prefs 512" in result.stdout
    assert "^ marks response-mask tokens" in result.stdout and "lengths in tokens" in result.stdout


def test_ruff_formats_and_lints_clean():
    """The tree is as `ruff format` writes it, and `ruff check` (rules in pyproject.toml) finds nothing."""
    for command in (["format", "--check", "--diff", "."], ["check", "."]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"ruff {' '.join(command)}:\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
