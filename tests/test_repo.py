"""Project layout rules (one file per concern, one-way dependencies) and the README / CI contract."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The source files in layers: a file imports only files of earlier layers, so the
# dependencies flow one way and there is no circle. The seven original scripts, the engine files
# (config, engine, checkpoint, plan), the objective MetaAPO builds on (dpo), the other methods
# (baselines/), Algorithm 1 (train.py) and the evaluation on top; then the research record
# (experiments/), which builds on all of it and which nothing outside it imports.
LAYERS = [
    ["data.py", "losses.py"],
    ["meta.py", "sample.py", "toy.py"],
    ["smollm2.py"],
    ["reward.py"],
    ["config.py"],
    ["engine.py"],
    ["checkpoint.py", "plan.py"],
    ["dpo.py"],
    ["baselines/ppo.py", "baselines/selective_dpo.py", "baselines/boundary.py", "baselines/online.py"],
    ["iterative_run.py"],
    ["train.py"],
    ["evaluate.py"],
]
EXPERIMENT_LAYERS = [
    ["experiments/__init__.py", "experiments/meta_aligner/toy_multiobjective.py"],
    ["experiments/dynamics.py", "experiments/meta_aligner/meta_aligner.py"],
    ["experiments/compare.py"],
    ["experiments/boundary_grid.py", "experiments/meta_aligner/pareto.py"],
]
SCRIPTS = [name for layer in LAYERS + EXPERIMENT_LAYERS for name in layer]


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
    files = {module.replace(".", "/") + ".py" for module in imported}
    files |= {module.replace(".", "/") + "/__init__.py" for module in imported}  # a package: its __init__.py
    return files & set(SCRIPTS) - {name}


def holds_code(path: Path) -> bool:
    return len(ast.parse(path.read_text()).body) > 1


def test_every_source_file_is_in_a_layer():
    # a package's __init__.py is a source file when it holds more than its docstring
    sources = {str(p.relative_to(ROOT)) for p in ROOT.glob("**/*.py") if p.name != "__init__.py" or holds_code(p)}
    sources = {s for s in sources if not s.startswith(("tests/", "scripts/", ".venv/", "out/"))}
    assert sources == set(SCRIPTS)


def test_dependencies_flow_one_way():
    """Each file imports only files of earlier layers (so no two files import each other, around
    any circle): in the core, train.py and evaluate.py on top and imported by nothing; experiments/
    above the core, imported by nothing outside it; and there is no utils.py."""
    assert not (ROOT / "utils.py").exists() and not (ROOT / "common.py").exists()
    layers = LAYERS + EXPERIMENT_LAYERS
    experiments = {name for layer in EXPERIMENT_LAYERS for name in layer}
    for depth, layer in enumerate(layers):
        earlier = {name for below in layers[:depth] for name in below}
        for name in layer:
            imported = imported_scripts(name)
            assert imported <= earlier, f"{name} imports {sorted(imported - earlier)}, which is not below it"
            if name not in experiments:
                assert not imported & experiments, f"{name} imports experiments/ ({sorted(imported & experiments)})"
                assert not imported & {"train.py", "evaluate.py"}, f"{name} imports an entry point"


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
