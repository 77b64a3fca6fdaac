"""train.py: config parsing, a 2-process torchrun (gloo) run of dpo and metaapo, equal first-step
losses on 1 and 2 processes, bit-exact resume after SIGKILL, the non-finite-loss stop, and an
iteration without any augmented tuple."""

import dataclasses
import json
import math
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

import config
import data
import dpo
import engine
import losses
import meta
import train
from config import Config, ConfigError, parse_config
from conftest import TINY, fresh_run, metrics, overriding, run_train
from meta import MetaLearner

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Config


def test_defaults_presets_and_overrides():
    cfg = parse_config([])
    assert cfg.method == "pipeline" and cfg.preset == "toy" and cfg.batch_size == 16  # the toy preset
    assert cfg.out_dir == "out/toy-seed0" and cfg.model == "out/toy/seed0/base" and cfg.dataset == "out/toy/seed0"
    cfg = parse_config(["--model", "tulu8b", "--lr=1e-6", "--betas=0.9,0.99", "--resume", "--seed", "3"])
    assert cfg.model == "allenai/Llama-3.1-Tulu-3-8B-SFT" and cfg.lr == 1e-6 and cfg.betas == (0.9, 0.99)
    assert cfg.resume is True and cfg.seed == 3 and cfg.generator == "vllm" and cfg.out_dir == "out/tulu8b-seed3"
    assert parse_config(["--model=qwen7b"]).top_p == 0.95
    custom = parse_config(["--model=my-org/my-sft", "--keep_unsampled=false"])
    assert (
        custom.model == "my-org/my-sft"
        and custom.preset == ""
        and custom.batch_size == 128
        and custom.keep_unsampled is False
    )
    assert parse_config(["--sampling=random"]).sampling == "random"


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--lerning_rate=1"],
            r"unknown config key --lerning_rate; the closest valid one is --lr \(python train.py --help lists them "
            r"all\)",
        ),
        (["--batchsize=1"], "the closest valid one is --batch_size"),
        (["--micro_train_batch_size=2"], "the closest valid one is --micro_batch_size"),  # OpenRLHF's name
        (["--lr=fast"], "--lr: expected float, got 'fast'"),
        (["--batch_size=1.5"], "--batch_size: expected int"),
        (["--resume=maybe"], "--resume: expected bool"),
        (["--method=rlhf"], "--method: must be one of pipeline, sft, rm"),
        (["--method=kto", "--batch_size=1"], "--method=kto needs --batch_size of at least 2"),
        (["--sampling=sometimes"], "--sampling: must be one of meta, random, threshold, all"),
        (["--batch_size=0"], "--batch_size: must be at least 1"),
        (["--keep_ratio=0"], "--keep_ratio: must be in"),
        (["lr=1"], "unexpected argument 'lr=1'"),
        (["--lr"], "--lr needs a value"),
        (["--beta", "--seed=1"], "--beta needs a value"),  # the next key is not taken as its value
        (["--lr=1e-5", "--beta=0.1", "--lr=2e-5"], "--lr is given twice; give it once"),  # not the last silently
        (["--boundary_threshold=0.4", "--stage_threshold=0.6"], r"--stage_threshold is given twice \(as --boundary"),
        # runs that could not train, refused before anything runs
        (["--num_samples=1"], "--num_samples: must be at least 2"),
        (["--max_train_pairs=-60"], "--max_train_pairs: must be at least 0, got -60"),
        (
            ["--max_prompt_len=40", "--max_len=40"],
            r"--max_prompt_len \(40\) must be positive and below --max_len \(40\)",
        ),
        (["--keep_checkpoints=0"], "--keep_checkpoints: must be at least 1"),
        (["--save_every=-1"], "--save_every: must be at least 0"),
        (["--betas=0.9"], "--betas: must be two numbers in \\[0, 1\\)"),
        (["--betas=0.9,1.5"], "--betas: must be two numbers"),
        (["--lr=nan"], "--lr: must be finite, got 'nan'"),
        (["--lr=inf"], "--lr: must be finite"),
        (["--lr=-1"], "--lr: must be positive, got -1.0"),
        (["--meta_lr=0"], "--meta_lr: must be positive"),
        (["--top_p=0"], "--top_p: must be in \\(0, 1\\]"),
        (["--warmup_ratio=1"], "--warmup_ratio: must be in \\[0, 1\\)"),
        (["--temperature=-0.5"], "--temperature: must be at least 0"),
        (["--dist_timeout_minutes=0"], "--dist_timeout_minutes: must be positive"),
        (["--vllm_python=/no/such/venv/bin/python"], "--vllm_python: /no/such/venv/bin/python is not an executable"),
    ],
)
def test_config_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_help_lists_every_key_with_its_default_and_comment():
    result = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "unknown config key" not in result.stderr
    text = result.stdout
    for field in dataclasses.fields(Config):
        default = ",".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default
        assert f"  --{field.name}={default}" in text, field.name
    assert "  --lr=5e-07  peak learning rate" in text and "  --betas=0.9,0.95  AdamW betas" in text
    # a comment too long for its key's line sits on the line above, and still reaches --help
    assert "  --dry_run=False  print each stage's steps" in text and "  --schedule=  boundary: fixed data" in text
    groups = [
        "what to run:",
        "data:",
        "models:",
        "optimisation of the preference stages:",
        "MetaAPO and the online methods:",
        "system:",
    ]
    assert all(g in text for g in groups) and [text.index(g) for g in groups] == sorted(text.index(g) for g in groups)
    assert text.index("  --seed=") < text.index("data:") < text.index("  --dataset=")  # each key under its own group
    assert "presets" in text and "tulu8b: model=allenai/Llama-3.1-Tulu-3-8B-SFT" in text
    shown = {}
    for script, option in (
        ("evaluate.py", "--alpaca_eval"),
        ("sample.py", "--max_new_tokens"),
        ("reward.py", "--max_len"),
    ):
        shown[script] = subprocess.run(
            [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert shown[script].returncode == 0 and option in shown[script].stdout, script
        assert "(default: " in shown[script].stdout, script
    evaluate_help = shown["evaluate.py"].stdout
    assert "  --reward_model=" in evaluate_help and "  --generator=transformers" in evaluate_help  # train.py's keys too


def test_wandb_gets_a_copy_of_the_metrics(base_run, tmp_path, monkeypatch):
    """wandb is optional: a stand-in module records what train.py sends it."""
    import types

    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, values):
            calls["log"].append(values)

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls["init"].append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.chdir(ROOT)
    out = fresh_run(base_run, tmp_path)
    shutil.rmtree(out / "dpo")
    train.main(["--method=dpo", f"--out_dir={out}", "--wandb_project=metaapo-tests"] + TINY)
    (init,) = calls["init"]
    assert init["project"] == "metaapo-tests" and init["config"]["method"] == "dpo" and calls["finish"] == 1
    logged = [v for v in calls["log"] if "dpo/loss" in v]
    assert len(logged) == len(metrics(out / "dpo" / "metrics.jsonl")) and all(
        isinstance(x, (int, float)) for v in logged for x in v.values()
    )
    assert [v["dpo/step"] for v in logged] == list(range(1, len(logged) + 1))


def test_config_error_exits_with_the_message():
    result = subprocess.run(
        [sys.executable, "train.py", "--bogus=1"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "train.py: unknown config key --bogus" in result.stderr


def test_short_online_pairs_get_a_forward_of_their_own(toy_dir):
    """S3: MetaAPO's four answers per tuple go through one padded forward, unless the online pair
    (much shorter here) padded apart saves a quarter of the tokens; either way the same log-probs
    and lengths, in the same rows."""
    from transformers import AutoModelForCausalLM

    model = losses.LogprobModel(AutoModelForCausalLM.from_pretrained(toy_dir, dtype=torch.float64))
    calls = []
    forward = model.forward
    model.forward = lambda *args: calls.append(args[0].shape) or forward(*args)

    def tuples(online_length):
        return [
            dpo.PolicyPair(
                index=i,
                prompt_id=str(i),
                prompt_ids=[5, 6, 7],
                chosen_ids=[8 + i] * 30,
                rejected_ids=[9] * 28,
                online_chosen_ids=[10] * online_length,
                online_rejected_ids=[11 + i] * (online_length - 1),
            )
            for i in range(2)
        ]

    rt = engine.Runtime()
    for online_length, forwards in ((6, 2), (27, 1)):
        items = tuples(online_length)
        calls.clear()
        assert dpo.online_split(items, rt) == (forwards == 2)
        logps, lengths = dpo.pair_forward(model, items, rt, online=True, split=dpo.online_split(items, rt))
        assert len(calls) == forwards, calls
        batch = data.collate_preferences(items, 0, online=True)
        expected = forward(batch["input_ids"], batch["attention_mask"], batch["response_mask"]).view(4, 2)
        torch.testing.assert_close(logps, expected, rtol=1e-12, atol=1e-12)
        assert lengths.tolist() == [[30, 30], [28, 28], [online_length] * 2, [online_length - 1] * 2]


def test_real_model_presets_run_the_meta_learner_as_the_authors_scripts():
    for preset in ("tulu8b", "qwen7b"):
        cfg = parse_config([f"--model={preset}"])
        assert (cfg.meta_input_beta, cfg.meta_interval) == (1.0, 16), preset  # unscaled input, every 16 steps
        told = parse_config([f"--model={preset}", "--meta_input_beta=0", "--meta_interval=8"])
        assert (told.meta_input_beta, told.meta_interval) == (0.0, 8)  # a flag still wins over the preset
    toy = parse_config([])
    assert (toy.meta_input_beta, toy.meta_interval) == (0.0, 8)  # the toy keeps Eq. 4's scaled input


def test_meta_input_score_scales_only_h_input():
    policy = torch.tensor([[-3.0, -5.0], [-6.0, -4.0]])  # (roles, B): chosen, rejected
    ref = torch.tensor([[-4.0, -4.0], [-4.0, -4.0]])
    score = losses.preference_score(policy[0], policy[1], ref[0], ref[1], 0.1)
    default = parse_config([])
    assert (
        meta.meta_input_score(default.objective, default.beta, default.meta_input_beta, score, policy, ref) is score
    )  # Eq. 4 with beta: the score itself
    reference_code = parse_config(["--meta_input_beta=1"])
    delta = (policy[0] - ref[0]) - (policy[1] - ref[1])
    torch.testing.assert_close(
        meta.meta_input_score(
            reference_code.objective, reference_code.beta, reference_code.meta_input_beta, score, policy, ref
        ),
        torch.nn.functional.logsigmoid(delta),
    )
    simpo = parse_config(["--meta_input_beta=1", "--objective=simpo"])
    assert (
        meta.meta_input_score(simpo.objective, simpo.beta, simpo.meta_input_beta, score, policy, None) is score
    )  # A.9 holds its own beta
    with pytest.raises(ConfigError, match="meta_input_beta"):
        parse_config(["--meta_input_beta=-1"])


def test_every_config_field_is_commented():
    source = (ROOT / "config.py").read_text()
    block = source[source.index("class Config:") : source.index("def toy_preset")]
    lines = block.splitlines()
    for name in Config.__dataclass_fields__:
        k = next(k for k, line in enumerate(lines) if line.strip().startswith(f"{name}:"))
        above = lines[k - 1].strip()  # a comment too long for the key's line sits above it
        assert (
            "#" in lines[k]
            or (above.startswith("# ") and not above.startswith("# ---"))
            or name
            in (
                "train_split",
                "test_split",
                "weight_decay",
                "sft_lr",
                "sft_epochs",
                "rm_lr",
                "simpo_beta",
                "simpo_gamma",
                "kto_desirable_weight",
                "kto_undesirable_weight",
                "slic_delta",
                "slic_nll_weight",
                "temperature",
                "top_p",
                "max_new_tokens",
                "meta_lr",
                "label_smoothing",
            )
        ), name


# ---------------------------------------------------------------------------------------------
# Runs


def test_unfinished_stage_needs_resume(base_run, tmp_path):
    out = fresh_run(base_run, tmp_path)
    (out / "metaapo").mkdir()
    (out / "metaapo" / "metrics.jsonl").write_text('{"step": 1}\n')
    result = subprocess.run(
        [sys.executable, "train.py", "--method=metaapo", f"--out_dir={out}"] + TINY,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "holds an unfinished run; pass --resume" in result.stderr
    assert (out / "metaapo" / "metrics.jsonl").read_text() == '{"step": 1}\n'  # nothing written over


def test_metaapo_run_writes_its_outputs(base_run, tmp_path):
    out = fresh_run(base_run, tmp_path)
    result = run_train(["--method=metaapo", f"--out_dir={out}", "--meta_interval=2"] + TINY)
    stage = out / "metaapo-meta_interval_2"  # --meta_interval names its directory
    assert (stage / "done.json").exists() and (stage / "model" / "model.safetensors").exists()
    assert not (stage / "checkpoints").exists()  # a finished stage keeps none
    # MetaAPO keeps a tuple whose rewards all tied, whatever their count (the line said "dropped" at 0 ties)
    lines = [line for line in result.stdout.splitlines() if "prompts whose rewards all tied" in line]
    assert len(lines) == 2 and all(line.endswith("(kept with a zero-gradient (y, y) pair)") for line in lines)
    assert json.loads((stage / "config.json").read_text())["method"] == "metaapo"
    assert (stage / "iter1" / "model" / "config.json").exists() and (stage / "meta_learner.pt").exists()
    records = metrics(stage / "metrics.jsonl")
    phases = [r for r in records if r.get("phase") == "generate"]
    assert [p["iteration"] for p in phases] == [1, 2]
    assert all(0 < p["annotation_ratio"] <= 1 and p["selected"] == p["pairs"] + p["pairs_all_equal"] for p in phases)
    steps = [r for r in records if "step" in r and "phase" not in r]
    assert steps and all({"loss", "lr", "grad_norm", "l_off", "l_on", "w"} <= set(r) for r in steps)
    summaries = [r for r in records if r.get("phase") == "train"]
    assert [r["iteration"] for r in summaries] == [1, 2] and all(
        {"mean_loss", "mean_l_off", "mean_l_on", "mean_w"} <= set(r) for r in summaries
    )
    # one meta update (one AdamW step) every T_meta = 2 policy steps; an iteration's leftover step is dropped
    for summary in summaries:
        updates = [r for r in steps if r["iteration"] == summary["iteration"] and "meta_loss" in r]
        assert (
            summary["meta_updates"] == len(updates) == summary["steps"] // 2
            and summary["meta_steps_dropped"] == summary["steps"] % 2
        )
        assert [r["step"] for r in updates] == [r["step"] for r in steps if r["iteration"] == summary["iteration"]][
            1::2
        ]
        assert all(len(r["h_curve"]) == 11 and all(0 < h < 1 for h in r["h_curve"]) for r in updates)
    meta_state = torch.load(stage / "meta_learner.pt", weights_only=False)
    assert meta_state["updates"] == sum(s["steps"] // 2 for s in summaries) > 0
    assert meta_state["optimizer"]["state"][0]["step"].item() == meta_state["updates"]
    done = json.loads((stage / "done.json").read_text())
    assert 0 < done["annotation_ratio"] <= 1 and done["sampling_s"] > 0


def test_pipeline_skips_finished_stages_and_prints_the_table(base_run, tmp_path):
    out = fresh_run(base_run, tmp_path)
    result = run_train([f"--out_dir={out}"] + TINY)
    assert result.stdout.count("already finished") == 3
    table = (out / "results.md").read_text()
    for row in ("| SFT |", "| DPO |", "| MetaAPO |"):
        assert row in table
    assert "win rate vs SFT" in table


def first_step_loss(path):
    return next(r["loss"] for r in metrics(path) if r.get("step") == 1)


@pytest.mark.parametrize("method", ["dpo", "metaapo"])
def test_two_process_run_matches_one_process_first_step(base_run, tmp_path, method):
    args = [f"--method={method}", "--save_every=1"] + TINY
    one, two = fresh_run(base_run, tmp_path, "one"), fresh_run(base_run, tmp_path, "two")
    if method == "dpo":
        shutil.rmtree(one / "dpo")
        shutil.rmtree(two / "dpo")
    run_train(args + [f"--out_dir={one}"])
    run_train(args + [f"--out_dir={two}"], torchrun=2)
    stage = "dpo" if method == "dpo" else "metaapo"
    assert (two / stage / "done.json").exists() and (two / stage / "model" / "model.safetensors").exists()
    assert first_step_loss(two / stage / "metrics.jsonl") == pytest.approx(
        first_step_loss(one / stage / "metrics.jsonl"), rel=1e-4
    )
    if method == "metaapo":  # both processes made the same gating decisions (the generations differ by rank seed)
        gen = lambda path: [r["selected"] for r in metrics(path) if r.get("phase") == "generate"][:1]  # noqa: E731
        assert gen(two / stage / "metrics.jsonl") == gen(one / stage / "metrics.jsonl")


METAAPO_EXACT = ["--method=metaapo", "--save_every=1", "--deterministic", "--batch_size=8", "--micro_batch_size=8"] + [
    a for a in TINY if not a.startswith(("--batch_size", "--micro_batch_size"))
]


@pytest.fixture(scope="module")
def whole_metaapo(base_run, tmp_path_factory):
    """The uninterrupted MetaAPO run every interrupted one must reproduce."""
    whole = fresh_run(base_run, tmp_path_factory.mktemp("whole"), "whole")
    run_train(METAAPO_EXACT + [f"--out_dir={whole}"])
    return whole / "metaapo"


def same_weights_and_steps(whole, resumed):
    a = load_file(whole / "model" / "model.safetensors")
    b = load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = lambda path: [r["step"] for r in metrics(path) if "step" in r and "phase" not in r]  # noqa: E731
    assert steps(resumed / "metrics.jsonl") == steps(whole / "metrics.jsonl")  # no step logged twice


def test_resume_after_sigkill_is_bit_exact(base_run, whole_metaapo, tmp_path):
    killed = fresh_run(base_run, tmp_path, "killed")
    process = subprocess.Popen(
        [sys.executable, "train.py", *METAAPO_EXACT, f"--out_dir={killed}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = killed / "metaapo" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if log.exists() and any(r.get("iteration") == 2 and "phase" not in r for r in metrics(log)):
            break  # a training step of iteration 2 is done
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "metaapo" / "done.json").exists()
    run_train(METAAPO_EXACT + [f"--out_dir={killed}", "--resume"])
    same_weights_and_steps(whole_metaapo, killed / "metaapo")


def test_a_signal_in_phase_one_stops_it_between_pieces_and_resume_is_exact(base_run, whole_metaapo, tmp_path):
    """SIGTERM while iteration 2's phase 1 runs (its l_off scores kept, generation under way): the run
    exits 143 before the next piece, with a line naming where --resume continues, no policy step of
    iteration 2 taken and the finished pieces kept; --resume reads them back and ends with the
    uninterrupted run's weights."""
    stopped = fresh_run(base_run, tmp_path, "stopped")
    pieces = stopped / "metaapo" / "iter2" / "phase1"
    process = subprocess.Popen(
        [sys.executable, "train.py", *METAAPO_EXACT, f"--out_dir={stopped}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not (pieces / "scores-00000.pt").exists():
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be stopped"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: [metaapo] stopped during iteration 2's phase 1 (") and last.endswith(
        "; continue with the same command and --resume"
    )
    assert "Traceback" not in stderr
    log = metrics(stopped / "metaapo" / "metrics.jsonl")
    assert not any(r.get("iteration") == 2 and "lr" in r for r in log)  # no policy step of iteration 2
    assert (pieces / "scores-00000.pt").exists()
    result = run_train(METAAPO_EXACT + [f"--out_dir={stopped}", "--resume"])
    assert "resumed from" in result.stdout
    same_weights_and_steps(whole_metaapo, stopped / "metaapo")
    assert not pieces.exists()  # gone once phase 1's result is in a checkpoint


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(base_run, tmp_path, monkeypatch):
    out = fresh_run(base_run, tmp_path)
    shutil.rmtree(out / "dpo")
    calls = {"n": 0}
    real = losses.dpo_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        result = real(*args, **kwargs)
        if calls["n"] >= 3:  # micro-batches 3+: the second optimizer step
            return result._replace(losses=result.losses * float("nan"))
        return result

    monkeypatch.setattr(losses, "dpo_loss", poisoned)
    monkeypatch.chdir(ROOT)
    with pytest.raises(
        SystemExit,
        match=r"\[dpo\] step 2 \(.*batch 1, dataset rows \[.*\]...\): loss nan.*last good checkpoint is kept",
    ):
        train.main(["--method=dpo", f"--out_dir={out}", "--save_every=1"] + TINY)
    checkpoints = sorted(p.name for p in (out / "dpo" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000001"]
    assert not (out / "dpo" / "done.json").exists()


def test_a_run_that_trains_no_step_fails_instead_of_exporting_its_start(base_run, tmp_path):
    """No tuple selected in any iteration: each iteration is skipped, and the stage is an error, not a
    "MetaAPO" model identical to the DPO warm-up."""
    out = fresh_run(base_run, tmp_path)
    result = subprocess.run(
        [sys.executable, "train.py", "--method=metaapo", f"--out_dir={out}", "--sampling=threshold", "--threshold=-1e9"]
        + TINY,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        result.returncode != 0
        and "trained no step in 2 iterations" in result.stderr
        and "Traceback" not in result.stderr
    )
    stage = out / "metaapo-sampling_threshold"
    records = metrics(stage / "metrics.jsonl")
    assert [r["skipped"] for r in records if r.get("phase") == "train"] == ["no augmented tuple"] * 2
    assert not (stage / "done.json").exists() and not (stage / "model").exists()


EVERY_METHOD = [
    ["--method=ipo"],
    ["--method=kto"],
    ["--method=simpo"],
    ["--method=slic"],
    ["--method=selective_dpo"],
    ["--method=online_dpo"],
    ["--method=selm"],
    ["--method=adpo"],
    ["--method=metaapo", "--sampling=random"],
    ["--method=metaapo", "--sampling=all"],
    ["--method=metaapo", "--weighting=uniform"],
    ["--method=metaapo", "--weighting=fixed"],
    ["--method=metaapo", "--keep_unsampled"],
    ["--method=metaapo", "--meta_depth=5", "--meta_inputs=multi"],
    ["--method=metaapo", "--objective=simpo"],
    ["--method=online_dpo", "--objective=ipo"],
    ["--method=metaapo", "--meta_input_beta=1"],
    ["--method=ppo", "--rollout_batch_size=32"],
    ["--method=kto", "--micro_batch_size=1"],
    ["--method=ipo", "--ipo_length_normalized"],
    ["--method=slic", "--slic_nll=mean"],
    ["--method=iterative_dpo", "--prompt_ratio=0.5"],
    ["--method=adpo", "--adpo_offline=selected", "--steps_per_iteration=3"],
    ["--method=metaapo", "--sampling=threshold", "--threshold_ratio=0.5", "--tied_samples=drop"],
]


def test_every_method_and_ablation_runs(base_run, tmp_path, monkeypatch):
    out = fresh_run(base_run, tmp_path)
    monkeypatch.chdir(ROOT)
    small = overriding(TINY, "--max_train_pairs=64", "--batch_size=8", "--micro_batch_size=8")
    for args in EVERY_METHOD:
        argv = overriding([f"--out_dir={out}"] + small, *args)
        train.main(argv)
        cfg = parse_config(argv)
        stage = out / config.stage_name(cfg, cfg.method)
        assert (stage / "done.json").exists() and (stage / "model" / "model.safetensors").exists(), args
    assert (out / "metaapo-keep_unsampled_True" / "done.json").exists()
    # equal steps: 3 policy steps in each of the 2 iterations, whatever ADPO's pair count
    adpo = [r for r in metrics(out / "adpo-adpo_offline_selected-steps_per_iteration_3" / "metrics.jsonl")]
    assert [r["steps"] for r in adpo if r.get("phase") == "train"] == [3, 3]
    calibrated = metrics(out / "metaapo-sampling_threshold-tied_samples_drop-threshold_ratio_0.5" / "metrics.jsonl")
    assert [r["selected"] for r in calibrated if r.get("phase") == "generate"] == [16, 16]  # half of 32 per iteration
    assert (out / "selective_dpo" / "seed0-half0" / "model").exists() and (
        out / "selective_dpo" / "final" / "model"
    ).exists()
    # the reference code's unscaled input: h sees log sigmoid(Delta), the value terms keep beta
    gating = [
        json.loads(line)
        for line in (out / "metaapo-meta_input_beta_1.0" / "iter1" / "gating.jsonl").read_text().splitlines()
    ]
    h = MetaLearner()
    for row in gating:
        delta = (
            torch.logit(torch.tensor(math.exp(row["l_off"]), dtype=torch.float64)) / 0.1
        )  # l_off = log sigmoid(0.1 Delta)
        assert row["h_input"] == pytest.approx(torch.nn.functional.logsigmoid(delta).item(), abs=1e-4)
        assert row["w"] == pytest.approx(h(torch.tensor([[row["h_input"]]])).item(), abs=1e-6)
    selm = [r for r in metrics(out / "selm" / "metrics.jsonl") if r.get("phase") == "generate"]
    assert all(r["annotation_ratio"] == pytest.approx(1.25) for r in selm)  # K + 2 candidates scored per prompt


def test_a_tuple_whose_rewards_all_tie_keeps_its_offline_pair_with_a_zero_gradient_online_pair(toy_dir):
    """The reference code's tie handling (--tied_samples=keep, the default): the (y, y) online pair
    of a tuple whose K rewards tie gives l_on = log sigmoid(0) and no gradient; --tied_samples=drop
    drops the tuple."""
    from transformers import AutoModelForCausalLM

    from meta import MetaController
    from sample import Candidate, OnlinePair

    cfg = parse_config([])
    D_t = [
        dpo.PolicyPair(index=i, prompt_id=str(i), prompt_ids=[5, 6, 7], chosen_ids=[8, 9 + i], rejected_ids=[10])
        for i in range(2)
    ]
    paired = OnlinePair(Candidate("x", [11, 12], "online"), Candidate("z", [13], "online"), 1.0, 0.0)
    kept = train.join_online_pairs(cfg, D_t, [0, 1], [paired, None], tied=[[14, 15], [16, 17, 18]])
    assert [(p.index, p.online_chosen_ids, p.online_rejected_ids) for p in kept] == [
        (0, [11, 12], [13]),
        (1, [16, 17, 18], [16, 17, 18]),  # the tuple's first answer, twice
    ]
    assert [p.index for p in train.join_online_pairs(cfg, D_t, [0, 1], [paired, None])] == [0]  # drop

    model = losses.LogprobModel(AutoModelForCausalLM.from_pretrained(toy_dir, dtype=torch.float64))
    ref = losses.LogprobModel(AutoModelForCausalLM.from_pretrained(toy_dir, dtype=torch.float64))
    tied = dataclasses.replace(kept[1], weight_override=0.0)  # w = 0: Eq. 5 is the online term alone
    loss_fn = train.metaapo_loss(cfg, model, ref, MetaController(), engine.Runtime())
    loss, sums, _ = loss_fn([tied], torch.ones(1, dtype=torch.float64), 1, 1)
    assert sums["l_on_sum"] == pytest.approx(math.log(0.5), abs=1e-12)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() < 1e-12 for p in model.parameters())
    offline = dataclasses.replace(kept[1], weight_override=1.0)  # the offline pair still trains
    loss_fn([offline], torch.ones(1, dtype=torch.float64), 1, 1)[0].backward()
    assert max(p.grad.abs().max() for p in model.parameters() if p.grad is not None) > 1e-6


def test_tied_tuples_can_stay_out_of_the_meta_buffer(toy_dir):
    """--tied_in_meta_buffer=false (a diagnostic): a tied tuple still trains in Eq. 5, but its
    (l_off, l_on) is not handed to the meta buffer; by default it is, as in the reference code."""
    from transformers import AutoModelForCausalLM

    from meta import MetaController

    base = dict(prompt_ids=[5, 6, 7], chosen_ids=[8, 9], rejected_ids=[10])
    tuples = [
        dpo.PolicyPair(index=0, prompt_id="0", **base, online_chosen_ids=[11, 12], online_rejected_ids=[13]),
        dpo.PolicyPair(index=1, prompt_id="1", **base, online_chosen_ids=[16, 17], online_rejected_ids=[16, 17]),
    ]
    model = losses.LogprobModel(AutoModelForCausalLM.from_pretrained(toy_dir, dtype=torch.float64))
    ref = losses.LogprobModel(AutoModelForCausalLM.from_pretrained(toy_dir, dtype=torch.float64))
    mask = torch.ones(2, dtype=torch.float64)
    buffered = {}
    for flag in ("true", "false"):
        cfg = parse_config([f"--tied_in_meta_buffer={flag}"])
        loss, sums, scores = train.metaapo_loss(cfg, model, ref, MetaController(), engine.Runtime())(tuples, mask, 2, 1)
        buffered[flag] = (loss.item(), scores[1].tolist())
    assert buffered["true"][0] == buffered["false"][0]  # the same Eq. 5 loss
    assert len(buffered["true"][1]) == 2 and buffered["true"][1][1] == pytest.approx(math.log(0.5), abs=1e-12)
    assert buffered["false"][1] == buffered["true"][1][:1]  # the tied tuple's l_on is left out
    assert config.stage_name(parse_config(["--tied_in_meta_buffer=false"]), "metaapo") == (
        "metaapo-tied_in_meta_buffer_False"
    )


def test_online_dpo_and_iterative_dpo_keep_tied_prompts_as_the_authors_script_does():
    """The authors' iterative DPO script pairs a prompt whose rewards all tie as (y, y): a row with no
    gradient that still counts in the batch. online_dpo and iterative_dpo do the same by default
    (--tied_samples=drop: the prompt is dropped, in a directory of its own); SELM and ADPO drop it."""
    from baselines.online import BASELINES

    assert BASELINES["online_dpo"].keeps_ties and BASELINES["iterative_dpo"].keeps_ties
    assert not BASELINES["selm"].keeps_ties and not BASELINES["adpo"].keeps_ties
    assert config.stage_name(parse_config(["--tied_samples=drop"]), "online_dpo") == "online_dpo-tied_samples_drop"
    cfg = parse_config([])
    D_t = [dpo.PolicyPair(index=0, prompt_id="0", prompt_ids=[5, 6], chosen_ids=[8], rejected_ids=[10])]
    joined = train.join_online_pairs(cfg, D_t, [0], [None], tied=[[14, 15]])
    (row,) = BASELINES["online_dpo"].training_pairs(D_t, joined, [True])
    assert (row.chosen_ids, row.rejected_ids, row.online_chosen_ids) == ([14, 15], [14, 15], None)
