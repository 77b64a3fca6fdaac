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
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import config
import data
import dpo
import engine
import evaluate
import train
from conftest import TINY, fresh_run, in_directory, metrics, overriding, run_train

ROOT = Path(__file__).resolve().parent.parent
DPO = ["--method=dpo", "--deterministic"] + TINY  # 192 pairs, batch 16: 12 steps, checkpoints by time


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
    """The uninterrupted run every interrupted one must reproduce (started with --resume, which with
    nothing to resume says so and starts afresh), with a checkpoint every 2 steps kept after it
    finished (a finished stage drops its checkpoints; the tests damage copies of them)."""
    out = dpo_run(base_run, tmp_path_factory.mktemp("whole"), "whole")
    with mock.patch.object(checkpoint.Stage, "drop_checkpoints", lambda self: None):
        result = run_train(DPO + [f"--out_dir={out}", "--resume", "--save_every=2"])
    assert f"[dpo] --resume: nothing to resume in {out / 'dpo'}; the stage starts afresh" in result.stdout
    return out / "dpo"


def unfinished_copy(stage, out):
    """A finished stage's directory as a run stopped after its last checkpoint would have left it."""
    shutil.copytree(stage, out / "dpo")
    shutil.rmtree(out / "dpo" / "model")
    (out / "dpo" / "done.json").unlink()
    return sorted((out / "dpo" / "checkpoints").iterdir())


def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_used(base_run, whole_dpo, tmp_path):
    """A truncated shard (a full disk, a node lost mid-copy): named in one warning, moved aside to
    <name>.damaged (neither used nor counted among the kept ones), the run resumes from the
    checkpoint before it and ends with the uninterrupted run's weights."""
    out = dpo_run(base_run, tmp_path, "damaged")
    previous, latest = unfinished_copy(whole_dpo, out)
    shard = next(latest.glob("*.distcp"))
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    with mock.patch.object(checkpoint.Stage, "drop_checkpoints", lambda self: None):  # to look at them after
        result = run_train(DPO + [f"--out_dir={out}", "--resume"])
    assert (
        f"[dpo] checkpoint {latest} is damaged ({shard.name} truncated ({size // 2} of {size} bytes)): moved aside, "
        f"using {previous.name}" in result.stdout
    )
    assert f"resumed from {previous}" in result.stdout and latest.with_name(latest.name + ".damaged").exists()
    a, b = weights(whole_dpo), weights(out / "dpo")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_usable_checkpoint_is_a_refusal_that_changes_nothing(base_run, whole_dpo, tmp_path):
    out = dpo_run(base_run, tmp_path, "ruined")
    previous, latest = unfinished_copy(whole_dpo, out)
    (latest / ".metadata").unlink()
    (previous / "state.pt").write_bytes(b"")
    message = refused(DPO + [f"--out_dir={out}", "--resume"])
    assert message.startswith(f"train.py: --resume: no usable checkpoint in {out / 'dpo' / 'checkpoints'} (")
    assert f"{latest.name}: .metadata unreadable" in message and f"{previous.name}: state.pt unreadable" in message
    assert message.endswith(f"remove {out / 'dpo'} to start the stage afresh")
    assert sorted((out / "dpo" / "checkpoints").iterdir()) == [previous, latest]  # nothing moved or removed


def test_offline_stage_killed_under_defaults_resumes_mid_way(base_run, whole_dpo, tmp_path):
    out = dpo_run(base_run, tmp_path, "killed")
    process = start(DPO, out)
    wait_for_steps(process, out / "dpo" / "metrics.jsonl", 7)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    checkpoints = sorted(p.name for p in (out / "dpo" / "checkpoints").iterdir() if not p.name.endswith(".tmp"))
    # the default cadence by time wrote some (the first step's, then as often as writing costs little: how many
    # depends on the machine's speed, and the oldest may have been rotated out by keep_checkpoints)
    assert checkpoints and all(int(name.split("-")[1]) <= 7 for name in checkpoints)
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


def test_a_stopped_run_is_named_by_its_program(monkeypatch, capsys):
    """The one line a stopped run ends with names the program that stopped (meta_aligner.py's said
    train.py), with status 128 + the signal."""
    monkeypatch.setattr(engine, "STOP_SIGNAL", [signal.SIGTERM])
    with pytest.raises(SystemExit) as stopped:
        engine.stop_exit("[aligner] stopped after step 3", "meta_aligner.py")
    assert stopped.value.code == 143
    assert capsys.readouterr().err == "meta_aligner.py: [aligner] stopped after step 3\n"


def test_a_second_signal_exits_at_once(monkeypatch):
    """The handler itself (two signals sent at once merge into one in the kernel, so this is not
    tested through a process): the first asks for a stop, the second exits with 128 + signal."""
    exits = []
    monkeypatch.setattr(engine, "STOP_SIGNAL", [])
    monkeypatch.setattr(engine.os, "_exit", exits.append)
    engine.request_stop(signal.SIGTERM, None)
    assert engine.STOP_SIGNAL == [signal.SIGTERM] and exits == []
    engine.request_stop(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT]


def test_resume_refuses_a_config_that_changes_the_result(base_run, tmp_path):
    out = dpo_run(base_run, tmp_path, "changed")
    process = start(DPO, out)
    wait_for_steps(process, out / "dpo" / "metrics.jsonl", 4)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    saved = (out / "dpo" / "config.json").read_text()
    checkpoints = sorted((out / "dpo" / "checkpoints").iterdir())
    with in_directory(ROOT), pytest.raises(SystemExit) as refusal:
        train.main(
            overriding(
                DPO, f"--out_dir={out}", "--resume", "--lr=1e-3", "--batch_size=8", "--beta=0.2", "--save_every=5"
            )
        )
    message = refusal.value.code
    assert isinstance(message, str)  # a message, not a traceback
    assert "started with other settings that change its result" in message
    for key, before, now in (("lr", "5e-05", "0.001"), ("batch_size", "16", "8"), ("beta", "0.1", "0.2")):
        assert f"--{key}: {before} when it started, {now} now" in message
    assert "save_every" not in message and "remove" in message and "config.json" in message
    assert (out / "dpo" / "config.json").read_text() == saved and sorted(
        (out / "dpo" / "checkpoints").iterdir()
    ) == checkpoints
    # harmless changes (checkpointing, micro-batching, the same directory by another path) are taken and recorded
    run_train(
        overriding(
            DPO,
            f"--out_dir={out}",
            "--resume",
            "--save_every=5",
            "--keep_checkpoints=3",
            "--micro_batch_size=4",
            f"--dataset={(ROOT / json.loads(saved)['dataset']).resolve()}",
        )
    )
    recorded = json.loads((out / "dpo" / "config.json").read_text())
    assert (
        recorded["save_every"] == 0 and recorded["micro_batch_size"] == 8 and recorded["lr"] == 5e-05
    )  # the values it started with
    (resume,) = recorded["resumes"]
    assert resume["changes"] == {"save_every": [0, 5], "keep_checkpoints": [2, 3], "micro_batch_size": [8, 4]}
    assert (out / "dpo" / "done.json").exists()


def test_pieces_read_back_count_the_seconds_they_took(tmp_path, monkeypatch):
    """A phase's time after a resume includes the pieces a stopped run had finished: each piece's
    seconds are kept beside it and added up when it is read back (a fake clock: 3 s and 4 s)."""

    class Clock:
        readings = iter([0.0, 3.0, 10.0, 14.0, 20.0, 21.0])

        def time(self):
            return next(self.readings)

    monkeypatch.setattr(engine, "time", Clock())
    rt, directory = engine.Runtime(), tmp_path / "phase1"
    first = engine.Pieces(directory, rt, "stopped")
    assert first.run("scores", 2, lambda k: [k]) == [[0], [1]] and first.restored_s == 0.0
    second = engine.Pieces(directory, rt, "stopped")  # the resumed run: two pieces read back, the third computed
    assert second.run("scores", 3, lambda k: [k]) == [[0], [1], [2]]
    assert second.restored_s == pytest.approx(7.0)
    assert (directory / "scores-00002.seconds").read_text() == "1.000"


def test_a_resumed_stage_counts_the_time_its_checkpoint_carries(tmp_path, monkeypatch):
    """A stage's time (train_time_s, total_s) after a resume is the time the processes before it
    spent up to the checkpoint plus this process's: 5 s before a state-only checkpoint, a kill at
    9 s (4 s lost and redone), then 3 s in the resumed process: 8 s."""

    class Clock:
        now = 0.0

        def time(self):
            return self.now

        def strftime(self, *args):
            return time.strftime(*args)

    clock = Clock()
    monkeypatch.setattr(checkpoint, "time", clock)
    cfg = config.parse_config([f"--out_dir={tmp_path}", "--resume"])
    first = checkpoint.Stage(cfg, engine.Runtime(), "dpo")
    first.start()
    clock.now = 5.0
    first.save_checkpoint(1, None, None, None, {})
    clock.now = 9.0  # killed here
    assert first.elapsed_s() == 9.0
    clock.now = 100.0
    second = checkpoint.Stage(cfg, engine.Runtime(), "dpo")
    second.load_checkpoint(second.start(), None, None, None)
    clock.now = 103.0
    assert second.elapsed_s() == pytest.approx(8.0)


def test_same_path_and_resume_changes():
    cfg = config.parse_config(["--lr=1e-4"])
    saved = config.config_dict(config.parse_config([]))
    saved["betas"] = list(saved["betas"])
    changed, harmless = checkpoint.resume_changes(saved, cfg)
    assert changed == {"lr": (5e-05, 1e-4)} and harmless == {}
    del saved["test_dataset"]  # a config.json written before the key existed: it had the default
    assert checkpoint.resume_changes(saved, config.parse_config([])) == ({}, {})
    assert checkpoint.same_path("data.py", str(ROOT / "data.py")) or not Path("data.py").exists()
    assert checkpoint.same_path(str(ROOT / "data.py"), str(ROOT / "tests" / ".." / "data.py"))
    assert not checkpoint.same_path("org/model-a", "org/model-b")
    kto = config.parse_config(["--method=kto", "--micro_batch_size=4"])
    assert (
        "micro_batch_size"
        in checkpoint.resume_changes(config.config_dict(config.parse_config(["--method=kto"])), kto)[0]
    )


def test_a_finished_stage_is_left_alone(base_run, tmp_path, capsys):
    out = fresh_run(base_run, tmp_path)
    stage = out / "dpo"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in stage.rglob("*") if p.is_file()}
    for extra in ([], ["--resume"], ["--resume", "--lr=1"]):
        with in_directory(ROOT):
            train.main(["--method=dpo", f"--out_dir={out}"] + TINY + extra)
        stdout = capsys.readouterr().out
        assert "[dpo] already finished" in stdout and "left as it is" in stdout
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in stage.rglob("*") if p.is_file()} == before


def test_a_damaged_done_record_is_a_clear_error(base_run, tmp_path):
    out = fresh_run(base_run, tmp_path)
    (out / "dpo" / "done.json").write_text("")
    assert "done.json: unreadable" in one_line_error(train.main, ["--method=dpo", f"--out_dir={out}"] + TINY)


# ---------------------------------------------------------------------------------------------
# Refused at start-up, before any expensive work


def one_line_error(main, args) -> str:
    """main(args) in this process (no interpreter start-up to wait for) must end in a clean exit
    with an error message, not an exception (which would be a traceback on the command line);
    returns the message's last line."""
    with in_directory(ROOT), pytest.raises(SystemExit) as exit_info:
        main(args)
    assert isinstance(exit_info.value.code, str), exit_info.value.code
    return exit_info.value.code.strip().splitlines()[-1]


def refused(args):
    return one_line_error(train.main, args)


def test_missing_and_broken_model_paths_are_named_at_start_up(base_run, tmp_path, toy_dir):
    out = fresh_run(base_run, tmp_path)
    message = refused(["--method=metaapo", f"--out_dir={out}", f"--reward_model={tmp_path / 'no-such-rm'}"] + TINY)
    assert (
        message
        == f"train.py: --reward_model: {tmp_path / 'no-such-rm'} does not exist (neither a local directory nor a hub "
        "id of the form owner/name)"
    )
    assert not (out / "metaapo").exists()  # refused before the stage began: no generation, no directory
    message = refused(["--method=metaapo", f"--out_dir={out}", f"--reward_model={toy_dir}"] + TINY)
    assert "--reward_model:" in message and "is a causal LM" in message
    shutil.rmtree(out / "rm")
    message = refused(["--method=metaapo", f"--out_dir={out}"] + TINY)
    assert message.startswith("train.py: --reward_model is not set and this run's rm stage has no model at")
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(toy_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    message = refused(["--method=dpo", f"--out_dir={tmp_path / 'x'}", f"--sft_model={no_tokenizer}"] + TINY)
    assert message.startswith(f"train.py: --sft_model: {no_tokenizer} has no tokenizer that loads")
    assert not message.rstrip().endswith(":")  # transformers' reason whole, not its first line ("... from one of:")
    message = refused(["--method=dpo", f"--out_dir={tmp_path / 'x'}", "--sft_model=out/nothing/here/model"] + TINY)
    assert (
        message
        == "train.py: --sft_model: out/nothing/here/model does not exist (neither a local directory nor a hub id of "
        "the form owner/name)"
    )
    message = refused(
        [
            "--method=dpo",
            f"--out_dir={tmp_path / 'x'}",
            f"--sft_model={toy_dir}",
            f"--dataset={tmp_path / 'none.jsonl'}",
        ]
    )
    assert message.startswith(f"train.py: --dataset: {tmp_path / 'none.jsonl'} does not exist")


def test_an_unreachable_hub_id_is_a_one_line_error_saying_how_to_go_on(tmp_path, toy_dir):
    """Hub ids that cannot be reached (here: HF_HUB_OFFLINE=1 and nothing cached), for a model, the
    dry run's config and a dataset: one line naming the flag and the id and how to go on. One
    process for the three (HF_HUB_OFFLINE is read when huggingface_hub is imported)."""
    script = tmp_path / "offline.py"
    script.write_text(
        "import json, sys, train\n"
        "messages = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        train.main(argv)\n"
        "    except SystemExit as exit_:\n"
        "        messages.append(exit_.code)\n"
        "print(json.dumps(messages))\n"
    )
    runs = [
        ["--model=nobody/no-such-model", "--method=dpo", f"--out_dir={tmp_path / 'a'}"],
        ["--model=tulu8b", "--dry_run"],
        ["--method=dpo", f"--sft_model={toy_dir}", "--dataset=nobody/no-such-data", f"--out_dir={tmp_path / 'b'}"],
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(script), json.dumps(runs)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model, dry, dataset = json.loads(result.stdout.strip().splitlines()[-1])
    hint = "pass a local path instead, connect to the network, or set HF_HUB_OFFLINE=1 with it in the local cache"
    assert model.startswith("train.py: --model: nobody/no-such-model cannot be read from the Hugging Face hub (")
    assert dry.startswith("train.py: --model: allenai/Llama-3.1-Tulu-3-8B-SFT cannot be read from the Hugging Face hub")
    assert model.endswith(hint) and dry.endswith(hint) and "\n" not in model + dry + dataset
    assert dataset.startswith(
        "train.py: --dataset: nobody/no-such-data: the hub dataset (split 'train_prefs') cannot be"
    )
    assert "set HF_HUB_OFFLINE=1 with it in the local cache" in dataset


def write_pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_zero_usable_pairs_fail_before_training(base_run, tmp_path, toy_dir):
    same = write_pairs(tmp_path / "same.jsonl", [{"prompt": "ascending : b a", "chosen": "a b", "rejected": "a b"}] * 5)
    message = refused(
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
    message = refused(
        ["--method=dpo", f"--out_dir={tmp_path / 'run2'}", f"--sft_model={toy_dir}", f"--dataset={long}"] + TINY
    )
    assert "no usable preference pair" in message and "1 dropped (prompt > max_prompt_len)" in message
    assert not (tmp_path / "run" / "dpo" / "done.json").exists()
    # limits no prompt can meet are refused before any data is read, naming both flags
    message = refused(
        [
            "--method=dpo",
            f"--out_dir={tmp_path / 'run3'}",
            f"--sft_model={toy_dir}",
            "--max_len=2",
            "--max_prompt_len=1",
        ]
    )
    assert message.startswith(f"train.py: --max_prompt_len=1 with --max_len=2: the chat template of {toy_dir} makes")
    assert not (tmp_path / "run3").exists()


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
    cfg = config.parse_config([f"--dataset={train_file}"])
    assert config.train_source(cfg) == (str(train_file), None) and config.test_source(cfg) is None
    with pytest.raises(config.ConfigError, match="needs held-out pairs.*pass --test_dataset"):
        dpo.load_heldout(cfg, "the results table")


def test_heldout_rows_honour_skip_bad_rows(tmp_path):
    test_dir = tmp_path / "data"
    test_dir.mkdir()
    good = {"prompt": "ascending : b a", "chosen": "a b", "rejected": "b a"}
    (test_dir / "test_prefs.jsonl").write_text(json.dumps(good) + "\n{broken\n" + json.dumps(good) + "\n")
    (test_dir / "train_prefs.jsonl").write_text(json.dumps(good) + "\n")
    with pytest.raises(data.DataError, match="test_prefs.jsonl:2: invalid JSON"):
        dpo.load_heldout(config.parse_config([f"--dataset={test_dir}"]), "the results table")
    pairs, source = dpo.load_heldout(
        config.parse_config([f"--dataset={test_dir}", "--skip_bad_rows"]), "the results table"
    )
    assert len(pairs) == 2 and source == (str(test_dir), "test_prefs")


# ---------------------------------------------------------------------------------------------
# evaluate.py: the same one-line errors


def evaluate_error(args):
    return one_line_error(evaluate.main, args)


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
    # every question file is checked before any answer is written: a good AlpacaEval file and a bad Arena-Hard one
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "ascending : b a"}]))
    arena = tmp_path / "arena.jsonl"
    arena.write_text('{"question_id": 1, "turns": "not a list"}\n')
    message = evaluate_error(
        [f"--model={toy_dir}", f"--alpaca_eval={alpaca}", f"--arena_hard={arena}", f"--out={tmp_path / 'eval'}"]
    )
    assert (
        message
        == f"evaluate.py: {arena}:1: an Arena-Hard question needs 'question_id' and 'turns': [{{'content': str}}]"
    )
    assert not (tmp_path / "eval").exists()


def test_a_finished_stage_keeps_no_checkpoints(base_run, whole_dpo, tmp_path):
    """model/ is final and a finished stage is never resumed: its checkpoints go once done.json is
    written; ones a kill between the two left behind go when the finished stage is met again."""
    out = dpo_run(base_run, tmp_path, "finished")
    run_train(DPO + [f"--out_dir={out}"])
    assert (out / "dpo" / "done.json").exists() and not (out / "dpo" / "checkpoints").exists()
    shutil.copytree(whole_dpo / "checkpoints", out / "dpo" / "checkpoints")  # as a kill after done.json leaves it
    result = run_train(DPO + [f"--out_dir={out}"])
    assert "[dpo] already finished" in result.stdout and not (out / "dpo" / "checkpoints").exists()


def test_resume_without_a_checkpoint_says_the_stage_starts_afresh(base_run, whole_dpo, tmp_path):
    """A stage stopped before its first checkpoint has config.json and metrics.jsonl but nothing to
    resume from: --resume says so, then trains from step 1."""
    out = dpo_run(base_run, tmp_path, "early")
    (out / "dpo").mkdir()
    shutil.copy(whole_dpo / "config.json", out / "dpo" / "config.json")
    (out / "dpo" / "metrics.jsonl").write_text((whole_dpo / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    result = run_train(DPO + [f"--out_dir={out}", "--resume"])
    assert f"[dpo] --resume: no checkpoint in {out / 'dpo' / 'checkpoints'}" in result.stdout
    assert "the stage starts afresh" in result.stdout and steps_logged(out / "dpo") == list(range(1, 13))


def test_a_metaapo_run_stopped_while_finishing_resumes_what_it_kept(base_run, tmp_path, monkeypatch):
    """Stopped after the last iteration's checkpoint, while the final model/ is put in place: the
    resumed run says where it resumed from, and its done.json counts the time the stage had spent
    (not the last process's second) and keeps the trained meta-learner (not a fresh one)."""

    out = fresh_run(base_run, tmp_path)
    args = ["--method=metaapo", f"--out_dir={out}", *TINY]

    def killed(source, target):
        raise SystemExit(137)  # what a kill at that moment leaves: every checkpoint, no model/, no done.json

    monkeypatch.setattr(engine, "copy_tree", killed)  # what IterativeRun.finish calls
    with in_directory(ROOT), pytest.raises(SystemExit):
        train.main(args)
    monkeypatch.undo()
    stage = out / "metaapo"
    assert not (stage / "done.json").exists()
    spent = checkpoint.read_pickle(sorted((stage / "checkpoints").glob("step-*"))[-1] / "state.pt")["elapsed_s"]
    result = run_train(args + ["--resume"])
    assert "[metaapo] resumed from" in result.stdout
    assert json.loads((stage / "done.json").read_text())["total_s"] >= spent > 1.0
    trained = torch.load(stage / "iter2" / "meta_learner.pt", weights_only=False)["learner"]
    final = torch.load(stage / "meta_learner.pt", weights_only=False)["learner"]
    assert all(torch.equal(trained[k], final[k]) for k in trained)


def test_checkpoints_by_time_cost_at_most_a_twentieth(tmp_path, monkeypatch):
    """The default cadence: a checkpoint after the first step (none with a model yet), then once
    the last one's write time is at most 5% of the time since it began: 1 s to write, due 19 s after."""
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(engine.time, "time", lambda: clock.now)
    stage = types.SimpleNamespace(cfg=config.parse_config([]), rt=engine.Runtime(), last_save=0.0, save_cost_s=None)
    due = lambda: engine.reduce_metrics(stage, {"loss": 0.0}, by_time=True)[2]  # noqa: E731
    assert due()
    stage.save_cost_s, clock.now = 1.0, 18.0
    assert not due() and not engine.reduce_metrics(stage, {}, by_time=False)[2]
    clock.now = 19.0
    assert due()
