"""Resume and refusals (train.py, evaluate.py): a stage killed under the default settings resumes
mid-way; SIGTERM / SIGINT finish the step, checkpoint and exit; --resume refuses a config that
changes the result; a finished stage is left alone; runs that cannot train, and bad paths, fail
at start-up naming the flag; a single data file is never its own held-out split."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import train
from conftest import TINY, fresh_run, metrics, run_train

ROOT = Path(__file__).resolve().parent.parent
DPO = ["--method=dpo", "--deterministic"] + TINY  # 192 pairs, batch 16: 12 steps, an automatic checkpoint every 2


def dpo_run(base_run, tmp_path, name):
    out = fresh_run(base_run, tmp_path, name)
    shutil.rmtree(out / "dpo")
    return out


def start(args, out):
    return subprocess.Popen(
        [sys.executable, "train.py", *args, f"--out_dir={out}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_steps(process, log, steps, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if log.exists() and sum("step" in r and "phase" not in r for r in metrics(log)) >= steps:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before step {steps}: {process.poll()}")


def weights(path):
    return load_file(path / "model" / "model.safetensors")


def steps_logged(stage):
    return [r["step"] for r in metrics(stage / "metrics.jsonl") if "step" in r and "phase" not in r]


@pytest.fixture(scope="module")
def whole_dpo(base_run, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    out = dpo_run(base_run, tmp_path_factory.mktemp("whole"), "whole")
    run_train(DPO + [f"--out_dir={out}"])
    return out / "dpo"


def test_offline_stage_killed_under_defaults_resumes_mid_way(base_run, whole_dpo, tmp_path):
    out = dpo_run(base_run, tmp_path, "killed")
    process = start(DPO, out)
    wait_for_steps(process, out / "dpo" / "metrics.jsonl", 7)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    checkpoints = sorted(p.name for p in (out / "dpo" / "checkpoints").iterdir() if not p.name.endswith(".tmp"))
    assert (
        checkpoints and checkpoints[-1] >= "step-00000006"
    )  # the default cadence: a tenth of the pass (2 of 12 steps)
    result = run_train(DPO + [f"--out_dir={out}", "--resume"])
    assert "resumed from" in result.stdout
    assert steps_logged(out / "dpo") == list(range(1, 13))  # nothing lost, nothing logged twice
    a, b = weights(whole_dpo), weights(out / "dpo")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_checkpoints_and_exits(base_run, whole_dpo, tmp_path, signum, code):
    out = dpo_run(base_run, tmp_path, "stopped")
    process = start(DPO + ["--save_every=100"], out)  # no cadence checkpoint: the one found is the signal's
    wait_for_steps(process, out / "dpo" / "metrics.jsonl", 3)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == code, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert (
        last.startswith("train.py: [dpo] stopped after step ") and "continue with the same command and --resume" in last
    )
    assert "Traceback" not in stderr
    (checkpoint,) = (out / "dpo" / "checkpoints").iterdir()
    step = int(checkpoint.name.split("-")[1])
    assert f"stopped after step {step} " in last and steps_logged(out / "dpo") == list(range(1, step + 1))
    run_train(DPO + [f"--out_dir={out}", "--resume", "--save_every=100"])
    a, b = weights(whole_dpo), weights(out / "dpo")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_signal_exits_at_once(monkeypatch):
    """The handler itself (two signals sent at once merge into one in the kernel, so this is not
    tested through a process): the first asks for a stop, the second exits with 128 + signal."""
    exits = []
    monkeypatch.setattr(train, "STOP_SIGNAL", [])
    monkeypatch.setattr(train.os, "_exit", exits.append)
    train.request_stop(signal.SIGTERM, None)
    assert train.STOP_SIGNAL == [signal.SIGTERM] and exits == []
    train.request_stop(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]


def test_resume_refuses_a_config_that_changes_the_result(base_run, tmp_path):
    out = dpo_run(base_run, tmp_path, "changed")
    process = start(DPO, out)
    wait_for_steps(process, out / "dpo" / "metrics.jsonl", 4)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    saved = (out / "dpo" / "config.json").read_text()
    checkpoints = sorted((out / "dpo" / "checkpoints").iterdir())
    refused = subprocess.run(
        [
            sys.executable,
            "train.py",
            *DPO,
            f"--out_dir={out}",
            "--resume",
            "--lr=1e-3",
            "--batch_size=8",
            "--beta=0.2",
            "--save_every=5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    message = refused.stderr
    assert "started with other settings that change its result" in message
    for key, before, now in (("lr", "5e-05", "0.001"), ("batch_size", "16", "8"), ("beta", "0.1", "0.2")):
        assert f"--{key}: {before} when it started, {now} now" in message
    assert "save_every" not in message and "remove" in message and "config.json" in message
    assert (out / "dpo" / "config.json").read_text() == saved and sorted(
        (out / "dpo" / "checkpoints").iterdir()
    ) == checkpoints
    # harmless changes (checkpointing, micro-batching, the same directory by another path) are taken and recorded
    run_train(
        DPO
        + [
            f"--out_dir={out}",
            "--resume",
            "--save_every=5",
            "--keep_checkpoints=3",
            "--micro_batch_size=4",
            f"--dataset={(ROOT / json.loads(saved)['dataset']).resolve()}",
        ]
    )
    config = json.loads((out / "dpo" / "config.json").read_text())
    assert (
        config["save_every"] == 0 and config["micro_batch_size"] == 8 and config["lr"] == 5e-05
    )  # the values it started with
    (resume,) = config["resumes"]
    assert resume["changes"] == {"save_every": [0, 5], "keep_checkpoints": [2, 3], "micro_batch_size": [8, 4]}
    assert (out / "dpo" / "done.json").exists()


def test_same_path_and_resume_changes():
    cfg = train.parse_config(["--lr=1e-4"])
    saved = train.config_dict(train.parse_config([]))
    saved["betas"] = list(saved["betas"])
    changed, harmless = train.resume_changes(saved, cfg)
    assert changed == {"lr": (5e-05, 1e-4)} and harmless == {}
    del saved["test_dataset"]  # a config.json written before the key existed: it had the default
    assert train.resume_changes(saved, train.parse_config([])) == ({}, {})
    assert train.same_path("data.py", str(ROOT / "data.py")) or not Path("data.py").exists()
    assert train.same_path(str(ROOT / "data.py"), str(ROOT / "tests" / ".." / "data.py"))
    assert not train.same_path("org/model-a", "org/model-b")
    kto = train.parse_config(["--method=kto", "--micro_batch_size=4"])
    assert "micro_batch_size" in train.resume_changes(train.config_dict(train.parse_config(["--method=kto"])), kto)[0]


def test_a_finished_stage_is_left_alone(base_run, tmp_path):
    out = fresh_run(base_run, tmp_path)
    stage = out / "dpo"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in stage.rglob("*") if p.is_file()}
    for extra in ([], ["--resume"], ["--resume", "--lr=1"]):
        result = run_train(["--method=dpo", f"--out_dir={out}"] + TINY + extra)
        assert "[dpo] already finished" in result.stdout and "left as it is" in result.stdout
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in stage.rglob("*") if p.is_file()} == before


def test_a_damaged_done_record_is_a_clear_error(base_run, tmp_path):
    out = fresh_run(base_run, tmp_path)
    (out / "dpo" / "done.json").write_text("")
    result = subprocess.run(
        [sys.executable, "train.py", "--method=dpo", f"--out_dir={out}"] + TINY,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "done.json: unreadable" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Refused at start-up, before any expensive work


def refused(args, timeout=120):
    started = time.time()
    result = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "", time.time() - started


def test_missing_and_broken_model_paths_are_named_at_start_up(base_run, tmp_path, toy_dir):
    out = fresh_run(base_run, tmp_path)
    message, _ = refused(["--method=metaapo", f"--out_dir={out}", f"--reward_model={tmp_path / 'no-such-rm'}"] + TINY)
    assert (
        message
        == f"train.py: --reward_model: {tmp_path / 'no-such-rm'} does not exist (neither a local directory nor a hub "
        "id of the form owner/name)"
    )
    assert not (out / "metaapo").exists()  # refused before the stage began: no generation, no directory
    message, _ = refused(["--method=metaapo", f"--out_dir={out}", f"--reward_model={toy_dir}"] + TINY)
    assert "--reward_model:" in message and "is a causal LM" in message
    shutil.rmtree(out / "rm")
    message, _ = refused(["--method=metaapo", f"--out_dir={out}"] + TINY)
    assert message.startswith("train.py: --reward_model is not set and this run's rm stage has no model at")
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(toy_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    message, _ = refused(["--method=dpo", f"--out_dir={tmp_path / 'x'}", f"--sft_model={no_tokenizer}"] + TINY)
    assert message.startswith(f"train.py: --sft_model: {no_tokenizer} has no tokenizer that loads")
    message, _ = refused(["--method=dpo", f"--out_dir={tmp_path / 'x'}", "--sft_model=out/nothing/here/model"] + TINY)
    assert (
        message
        == "train.py: --sft_model: out/nothing/here/model does not exist (neither a local directory nor a hub id of "
        "the form owner/name)"
    )
    message, _ = refused(
        [
            "--method=dpo",
            f"--out_dir={tmp_path / 'x'}",
            f"--sft_model={toy_dir}",
            f"--dataset={tmp_path / 'none.jsonl'}",
        ]
    )
    assert message.startswith(f"train.py: --dataset: {tmp_path / 'none.jsonl'} does not exist")


def write_pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_zero_usable_pairs_fail_before_training(base_run, tmp_path, toy_dir):
    same = write_pairs(tmp_path / "same.jsonl", [{"prompt": "ascending : b a", "chosen": "a b", "rejected": "a b"}] * 5)
    message, _ = refused(
        ["--method=dpo", f"--out_dir={tmp_path / 'run'}", f"--sft_model={toy_dir}", f"--dataset={same}"] + TINY
    )
    assert (
        message.startswith(f"train.py: {same}: no usable preference pair after tokenization (0 kept")
        and "5 dropped (identical" in message
    )
    long = write_pairs(
        tmp_path / "long.jsonl",
        [{"prompt": "ascending : " + " ".join("abcdefghij" * 3), "chosen": "a", "rejected": "b"}],
    )
    message, _ = refused(
        ["--method=dpo", f"--out_dir={tmp_path / 'run2'}", f"--sft_model={toy_dir}", f"--dataset={long}"] + TINY
    )
    assert "no usable preference pair" in message and "1 dropped (prompt > max_prompt_len)" in message
    assert not (tmp_path / "run" / "dpo" / "done.json").exists()


def test_a_single_data_file_is_training_data_only(base_run, tmp_path):
    train_file = ROOT / json.loads((base_run / "rm" / "config.json").read_text())["dataset"] / "train_prefs.jsonl"
    test_file = train_file.with_name("test_prefs.jsonl")
    out = tmp_path / "run"
    shutil.copytree(base_run / "sft", out / "sft")
    result = run_train(["--method=rm", f"--out_dir={out}", f"--dataset={train_file}"] + TINY)
    assert "no held-out pairs" in result.stdout
    assert json.loads((out / "rm" / "done.json").read_text())["test_accuracy"] is None  # never its own training rows
    shutil.rmtree(out / "rm")
    run_train(["--method=rm", f"--out_dir={out}", f"--dataset={train_file}", f"--test_dataset={test_file}"] + TINY)
    done = json.loads((out / "rm" / "done.json").read_text())
    assert done["test_source"] == str(test_file) and done["test_pairs"] == len(test_file.read_text().splitlines())
    cfg = train.parse_config([f"--dataset={train_file}"])
    assert train.train_source(cfg) == (str(train_file), None) and train.test_source(cfg) is None
    with pytest.raises(train.ConfigError, match="needs held-out pairs.*pass --test_dataset"):
        train.load_heldout(cfg, "the results table")


def test_heldout_rows_honour_skip_bad_rows(tmp_path):
    test_dir = tmp_path / "data"
    test_dir.mkdir()
    good = {"prompt": "ascending : b a", "chosen": "a b", "rejected": "b a"}
    (test_dir / "test_prefs.jsonl").write_text(json.dumps(good) + "\n{broken\n" + json.dumps(good) + "\n")
    (test_dir / "train_prefs.jsonl").write_text(json.dumps(good) + "\n")
    with pytest.raises(data.DataError, match="test_prefs.jsonl:2: invalid JSON"):
        train.load_heldout(train.parse_config([f"--dataset={test_dir}"]), "the results table")
    pairs, source = train.load_heldout(
        train.parse_config([f"--dataset={test_dir}", "--skip_bad_rows"]), "the results table"
    )
    assert len(pairs) == 2 and source == (str(test_dir), "test_prefs")


# ---------------------------------------------------------------------------------------------
# evaluate.py: the same one-line errors


def evaluate_error(args, cwd=ROOT):
    result = subprocess.run(
        [sys.executable, "evaluate.py", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def test_evaluate_bad_inputs_are_one_line_errors(toy_dir, tmp_path):
    bad = tmp_path / "question.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["a"]}\n{"question_id": 2}\n')
    assert (
        evaluate_error([f"--model={toy_dir}", f"--mt_bench={bad}"])
        == f"evaluate.py: {bad}:2: an MT-Bench question needs 'question_id' and 'turns': [str, ...]"
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for flag in ("--mt_bench", "--arena_hard"):
        assert (
            evaluate_error([f"--model={toy_dir}", f"{flag}={empty}"])
            == f"evaluate.py: {empty}: no questions in the file"
        )
    assert evaluate_error([f"--model={tmp_path / 'nothing'}", f"--mt_bench={bad}"]).startswith(
        f"evaluate.py: --model: {tmp_path / 'nothing'} does not exist"
    )
    assert (
        evaluate_error([f"--model={toy_dir}", "--reward_stats"]) == "evaluate.py: --reward_stats needs --reward_model"
    )
