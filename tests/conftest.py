"""Shared fixtures: the toy tokenizer and tiny random Llama models saved the HF way, and the
finished SFT, reward-model and DPO stages of a tiny toy run that the training tests copy."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

import toy


def run_on_cpu(monkeypatch):
    """What every test not marked `cuda` runs under: no GPU, in this process (torch.cuda.is_available
    answers False) and in the processes it starts (CUDA_VISIBLE_DEVICES is empty). On a GPU host the
    suite then runs as on CI: the toy's numbers, 1 vs 2 gloo processes, no set_device(1) on a
    machine with one GPU. The `cuda` tests (pytest -m cuda, the GPU check) see the GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request, monkeypatch):
    if request.node.get_closest_marker("cuda") is None:
        run_on_cpu(monkeypatch)


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """A directory with the toy tokenizer and a tiny random LlamaForCausalLM (the policy)."""
    path = tmp_path_factory.mktemp("toy_policy")
    tokenizer = toy.build_toy_tokenizer()
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    LlamaForCausalLM(toy.toy_model_config(tokenizer)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def toy_rm_dir(tmp_path_factory):
    """A directory with the toy tokenizer and a tiny random reward model (num_labels = 1)."""
    path = tmp_path_factory.mktemp("toy_rm")
    tokenizer = toy.build_toy_tokenizer()
    tokenizer.save_pretrained(path)
    config = toy.toy_model_config(tokenizer)
    config.num_labels = 1
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture
def toy_tokenizer(toy_dir):
    return AutoTokenizer.from_pretrained(toy_dir)


ROOT = Path(__file__).resolve().parent.parent
# A small toy run: every stage takes seconds (192 offline pairs, 2 iterations of 96 prompts).
TINY = [
    "--sft_epochs=1",
    "--max_train_pairs=192",
    "--batch_size=16",
    "--micro_batch_size=8",
    "--rm_batch_size=16",
    "--iterations=2",
    "--gen_batch_size=64",
    "--eval_prompts=32",
    "--eval_samples=2",
]


def overriding(args: list[str], *extra: str) -> list[str]:
    """`args` without the keys `extra` sets, then `extra`: a test's change to a command line
    (train.py refuses a key given twice)."""
    keys = {a.split("=")[0] for a in extra}
    return [a for a in args if a.split("=")[0] not in keys] + list(extra)


@contextlib.contextmanager
def in_directory(path):
    """contextlib.chdir, which Python 3.10 lacks."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_train(args, cwd=ROOT, timeout=600, torchrun=0, env=None):
    """train.py with `args` on the CPU (also on a GPU host, and from session fixtures, which start
    before a test's own CPU rule), as a finished process (returncode, stdout, stderr). Under
    torchrun, or with an environment of its own, it runs in processes of its own; otherwise
    train.main runs in this process, its output captured, which spares the seconds an interpreter
    takes to import torch and transformers (main restores what it sets globally: signal handlers,
    determinism)."""
    if torchrun or env is not None:
        command = (
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "train.py"]
            if torchrun
            else [sys.executable, "train.py"]
        )
        env = {**(os.environ if env is None else env), "CUDA_VISIBLE_DEVICES": ""}
        result = subprocess.run(command + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    else:
        import train

        stdout, stderr = io.StringIO(), io.StringIO()
        with (
            in_directory(cwd),
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
            mock.patch.object(torch.cuda, "is_available", lambda: False),
        ):
            try:
                train.main(list(args))
                code = 0
            except SystemExit as exit_:  # train.py's one-line errors
                code = exit_.code if isinstance(exit_.code, int) else 1
                print(exit_.code, file=sys.stderr)
        result = subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="session")
def base_run(tmp_path_factory):
    """SFT, reward model and DPO warm-up of a tiny toy run, shared by the tests (copied, not modified)."""
    out = tmp_path_factory.mktemp("base") / "run"
    for method in ("sft", "rm", "dpo"):
        run_train([f"--method={method}", f"--out_dir={out}"] + TINY)
    return out


def fresh_run(base_run, tmp_path, name="run"):
    """A run directory holding copies of the finished base stages."""
    out = tmp_path / name
    for stage in ("sft", "rm", "dpo"):
        shutil.copytree(base_run / stage, out / stage)
    return out


FAKE_VLLM = ROOT / "tests" / "fake_vllm" / "vllm" / "__init__.py"  # a stand-in vllm package


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    package = tmp_path / "fake" / "vllm"
    package.mkdir(parents=True)
    shutil.copy(FAKE_VLLM, package / "__init__.py")
    record = tmp_path / "record"
    record.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "fake"), str(ROOT)]))
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    return record
