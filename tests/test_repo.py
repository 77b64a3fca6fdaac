"""Project layout rules (SPEC section 2) and the README / CI contract."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["train.py", "sample.py", "reward.py", "meta.py", "losses.py", "data.py", "evaluate.py"]


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
    """The project's scripts that `name` imports anywhere (module level or inside a function)."""
    imported = set()
    for node in ast.walk(ast.parse((ROOT / name).read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    # train.py's __main__ block imports the module by its own name (so that what checkpoints pickle is
    # train.X): a file importing itself is no dependency
    return {module + ".py" for module in imported} & set(SCRIPTS) - {name}


def test_dependencies_flow_one_way():
    """train.py and evaluate.py orchestrate: the other files import neither, train.py does not
    import evaluate.py (evaluate.py builds on train.py), there is no utils.py, and no two files
    import each other, directly or around a longer circle."""
    assert not (ROOT / "utils.py").exists() and not (ROOT / "common.py").exists()
    graph = {name: imported_scripts(name) for name in SCRIPTS}
    for name, imported in graph.items():
        assert "evaluate.py" not in imported, f"{name} imports evaluate.py"
        if name not in ("train.py", "evaluate.py"):
            assert "train.py" not in imported, f"{name} imports train.py"
    for start in SCRIPTS:  # depth-first search for a path leading back to start
        stack, seen = list(graph[start]), set()
        while stack:
            name = stack.pop()
            assert name != start, f"import circle through {start}"
            if name not in seen:
                seen.add(name)
                stack.extend(graph[name])


def test_vllm_is_not_a_core_requirement():
    requirements = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    names = {re.split(r"[<>=!~\[ ]", line)[0].lower() for line in requirements if line}
    assert {"torch", "transformers", "safetensors", "numpy", "tqdm", "pytest"} <= names
    assert "vllm" not in names


def test_data_self_check_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "data.py", "--out_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
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
