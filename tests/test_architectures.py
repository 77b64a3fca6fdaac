"""Real architectures through train.py: tiny random LlamaForCausalLM (with Tulu 3's tokenizer
template) and Qwen2ForCausalLM (ChatML, tied embeddings), with their sequence-classification
heads as reward models, run `--model <dir>` through the DPO warm-up and one MetaAPO iteration on
1 and on 2 processes (gloo FSDP2): the first step's loss is the same on both, and the exports load
with from_pretrained as the same architecture. Also the memory plan (--dry_run) on the real
Llama-3.1-8B (Tulu 3) and Qwen2.5-7B shapes, and the two gradient-accumulation modes."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
)

import chat_tokenizers
import config
import data
import plan
import toy
from conftest import TINY, fresh_run, metrics, run_train

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURES = {  # config class, causal LM, reward head, tokenizer family, tied embeddings
    "llama": (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, "tulu3", False),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification, "qwen2.5", True),
}
SMALL = [
    "--max_prompt_len=200",
    "--max_len=240",
    "--max_new_tokens=12",
    "--batch_size=8",
    "--micro_batch_size=2",
    "--iterations=1",
    "--num_samples=4",
    "--gen_batch_size=16",
    "--lr=1e-3",
    "--meta_interval=1",
    "--activation_checkpointing=true",
]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def model_dirs(request, tmp_path_factory):
    """(policy dir, reward-model dir, data dir, architecture name) for one architecture."""
    config_class, lm_class, rm_class, family, tied = ARCHITECTURES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    tokenizer = chat_tokenizers.build(family)
    spec = chat_tokenizers.FAMILIES[family]
    model_config = config_class(
        vocab_size=8 * -(-len(tokenizer) // 8),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    policy = lm_class(model_config)
    policy.generation_config = GenerationConfig(
        eos_token_id=tokenizer.convert_tokens_to_ids(spec["generation_eos"]),
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    model_config.num_labels = 1
    rm_class(model_config).save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    rows = toy.make_toy_rows(0, {"train_prefs": 24, "test_prefs": 8})
    for split, split_rows in rows.items():
        data.write_jsonl(root / "data" / f"{split}.jsonl", split_rows)
    return root / "policy", root / "rm", root / "data", request.param


def pipeline_args(model_dirs, out):
    policy, rm, dataset, _ = model_dirs
    return [
        f"--model={policy}",
        f"--reward_model={rm}",
        f"--dataset={dataset}",
        f"--out_dir={out}",
        "--deterministic",
    ] + SMALL


def first_loss(path):
    return next(r["loss"] for r in metrics(path) if r.get("step") == 1 and "phase" not in r)


def test_dpo_and_a_metaapo_iteration_on_one_and_two_processes(model_dirs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(pipeline_args(model_dirs, one))
    run_train(pipeline_args(model_dirs, two), torchrun=2)
    lm_class = ARCHITECTURES[model_dirs[3]][1]
    for stage in ("dpo", "metaapo-meta_interval_1"):
        assert first_loss(two / stage / "metrics.jsonl") == pytest.approx(
            first_loss(one / stage / "metrics.jsonl"), rel=1e-4
        ), stage
        for run in (one, two):
            export = run / stage / "model"
            loaded = AutoModelForCausalLM.from_pretrained(export)
            assert type(loaded) is lm_class
            assert data.load_tokenizer(export).chat_template == data.load_tokenizer(model_dirs[0]).chat_template
    gating = [
        [
            json.loads(line)["selected"]
            for line in (run / "metaapo-meta_interval_1" / "iter1" / "gating.jsonl").read_text().splitlines()
        ]
        for run in (one, two)
    ]
    assert gating[0] == gating[1]  # the same decisions on 1 and 2 processes
    # online answers stop on the template's end of turn, and every stage exports weights that load back as trained
    weights = {
        k: v
        for k, v in AutoModelForCausalLM.from_pretrained(one / "metaapo-meta_interval_1" / "model").state_dict().items()
    }
    start = AutoModelForCausalLM.from_pretrained(model_dirs[0]).state_dict()
    assert any(not torch.equal(weights[k], start[k]) for k in weights)
    reward = AutoModelForSequenceClassification.from_pretrained(model_dirs[1])
    assert type(reward) is ARCHITECTURES[model_dirs[3]][2]
    # every parameter trained under FSDP2 too, the root's own (embeddings, final norm) included: the MetaAPO iteration
    # builds its optimizer after no-grad forwards, which leave those unsharded (trainable_parameters reshards them)
    before = AutoModelForCausalLM.from_pretrained(two / "dpo" / "model").state_dict()
    after = AutoModelForCausalLM.from_pretrained(two / "metaapo-meta_interval_1" / "model").state_dict()
    assert [k for k in after if torch.equal(after[k], before[k])] == []


# ---------------------------------------------------------------------------------------------
# The memory plan and the gradient-accumulation modes

CONFIGS = ROOT / "tests" / "model_configs"


def dry_run(model, sft, *extra):
    return subprocess.run(
        [sys.executable, "train.py", f"--model={model}", f"--sft_model={CONFIGS / sft}", "--dry_run", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "model, sft, params", [("tulu8b", "llama-3.1-tulu-3-8b-sft", "8.03B"), ("qwen7b", "qwen2.5-7b", "7.62B")]
)
def test_the_8b_plan_fits_8_gpus_and_not_one(model, sft, params):
    fits = dry_run(model, sft, "--gpus=8", "--gpu_memory_gb=80")
    assert fits.returncode == 0 and "the plan fits" in fits.stdout, fits.stderr
    assert f"({params} parameters)" in fits.stdout and "61135 offline pairs" in fits.stdout
    printed = json.loads(fits.stdout[: fits.stdout.index("\n}\n") + 2])  # the resolved config comes first
    assert printed["preset"] == model and printed["meta_interval"] == 16 and printed["dry_run"] is True
    for phase in ("training (phase 2)", "generation (phase 1)", "reward scoring (phase 1)"):
        assert f"{phase}: " in fits.stdout
    for part in (
        "policy weights (fp32 shards)",
        "AdamW state (fp32 shards)",
        "reference (bf16 shards)",
        "activations",
        "log-prob kernel chunk",
        "vLLM's share",
    ):
        assert part in fits.stdout
    assert re.search(r"launch with TORCH_ELASTIC_SHUTDOWN_TIMEOUT=\d+ ", fits.stdout)  # N5: a stop's time
    refused = dry_run(model, sft, "--gpus=1", "--gpu_memory_gb=80")
    message = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode != 0 and message.startswith(
        "train.py: the plan does not fit on 1 x 80 GiB: training (phase 2) needs "
    )
    assert "GiB per GPU, more than the 80 GiB there are" in message


def test_memory_plan_arithmetic():
    shapes = plan.Shapes(
        params=8_000_000_000,
        outside_blocks=1_000_000_000,
        layers=32,
        hidden=4096,
        intermediate=14336,
        vocab=128256,
        kv_width=1024,
    )
    cfg = config.parse_config(["--model=tulu8b"])
    unsharded = plan.memory_plan(cfg, 8, 80, shapes, shapes, sharded_gradients=False)["training (phase 2)"]
    sharded = plan.memory_plan(cfg, 8, 80, shapes, shapes, sharded_gradients=True)["training (phase 2)"]
    gib = 2**30
    assert unsharded["policy weights (fp32 shards)"] == pytest.approx(4 * 8e9 / 8 / gib)
    assert unsharded["gradients (fp32, unsharded while accumulating)"] == pytest.approx(
        4 * 8e9 / gib
    )  # the whole model's, on every GPU
    assert sharded["gradients (fp32, sharded)"] == pytest.approx(4 * 8e9 / 8 / gib)
    # FSDP2's reduce-scatter input for the root's gradients (embeddings and head), in reduce_dtype fp32
    assert unsharded["fp32 reduce-scatter input (the root's gradients)"] == pytest.approx(4 * 1e9 / gib)
    assert unsharded["AdamW state (fp32 shards)"] == pytest.approx(8 * 8e9 / 8 / gib)
    assert unsharded["activations (16384 tokens per micro-batch)"] == pytest.approx(
        (32 * 16384 * 4096 * 2 + 16384 * (10 * 4096 + 4 * 14336) * 2) / gib
    )
    assert plan.vllm_need_gib(cfg, shapes) == pytest.approx((2 * 8e9 + 4096 * 32 * 2 * 1024 * 2) / gib + 1)
    # N5: a stop finishes the step (16 tuples x 4 answers x 4096 tokens per GPU, 10 N FLOPs per token) and
    # writes 12 bytes per parameter; torchrun's 30 s are not enough, twice the estimate in whole minutes is
    stop = plan.stop_estimate(cfg, 8, shapes, shapes)
    assert stop["step_tokens_per_gpu"] == 16 * 4 * 4096
    assert stop["step_s"] == pytest.approx(16 * 4 * 4096 * 10 * 8e9 / 400e12)
    assert stop["checkpoint_gib_per_gpu"] == pytest.approx(12 * 8e9 / 8 / gib)
    assert stop["shutdown_timeout_s"] == 180 > plan.TORCHRUN_GRACE_S
    # the disk at MetaAPO's end: bf16 exports of the rm and the warm-up, iterations 1-2 in fp32 and 3 plus model/ in
    # bf16, two checkpoints of 12 bytes per parameter (finished stages keep none)
    disk = plan.disk_estimate(config.parse_config(["--model=tulu8b", "--gpus=8"]), shapes, shapes)
    assert sum(disk.values()) == pytest.approx((2 + 2 + (2 * 4 + 2 * 2) + 2 * 12) * 8e9 / gib)
    on_this_cpu = plan.disk_estimate(config.parse_config(["--model=tulu8b"]), shapes, shapes)  # fp32 exports
    assert sum(on_this_cpu.values()) == pytest.approx((4 + 4 + (2 * 4 + 2 * 4) + 2 * 12) * 8e9 / gib)


def test_the_dry_run_warns_when_the_meta_learner_would_not_learn(capsys):
    """120 pairs at the default batch of 128: one policy step per iteration, fewer than T_meta."""
    import train

    path = CONFIGS / "llama-3.1-tulu-3-8b-sft"
    train.main(["--model=tulu8b", f"--sft_model={path}", "--dry_run", "--gpus=8", "--max_train_pairs=120"])
    assert "warning: about 1 policy steps per iteration, fewer than --meta_interval=16" in capsys.readouterr().out
    train.main(["--model=tulu8b", f"--sft_model={path}", "--dry_run", "--gpus=8"])
    assert "warning" not in capsys.readouterr().out


def test_memory_plan_counts_what_is_resident():
    """W2: the fused kernel's whole working set (logits tile, the head's bf16 weight gradient, the
    fp32 hidden gradient); C6: PPO trains actor and critic (gradients and AdamW state for both,
    AdamW state still held while it generates), so grad_accumulation=auto keeps PPO's gradients
    sharded on 8 x 80 GB where MetaAPO's fit unsharded."""
    shapes = plan.Shapes(8_000_000_000, 1_000_000_000, 32, 4096, 14336, 128256, 1024)
    gib = 2**30
    metaapo = config.parse_config(["--model=tulu8b"])
    kernel = plan.memory_plan(metaapo, 8, 80, shapes, shapes, False)["training (phase 2)"][
        "log-prob kernel chunk (fp32 logits tile, bf16 head gradient, fp32 hidden gradient)"
    ]
    assert kernel == pytest.approx((256 * 128256 * 6 + 128256 * 4096 * 2 + 2 * 16384 * 4096 * 4) / gib)
    ppo = config.parse_config(["--model=tulu8b", "--method=ppo"])
    ppo_plan = plan.memory_plan(ppo, 8, 80, shapes, shapes, False)
    training = ppo_plan["training (phase 2)"]
    assert training["gradients (fp32, unsharded while accumulating)"] == pytest.approx(4 * 16e9 / gib)
    assert training["AdamW state (fp32 shards)"] == pytest.approx(8 * 16e9 / 8 / gib)
    assert training["critic weights (fp32 shards)"] == pytest.approx(4 * 8e9 / 8 / gib)
    assert training["reward model (bf16 shards)"] == pytest.approx(2 * 8e9 / 8 / gib)
    assert ppo_plan["generation (phase 1)"]["AdamW state (fp32 shards)"] == pytest.approx(8 * 16e9 / 8 / gib)
    assert (
        "AdamW state (fp32 shards)"
        not in plan.memory_plan(metaapo, 8, 80, shapes, shapes, False)["generation (phase 1)"]
    )
    assert plan.needs_sharded_gradients(ppo, 8, 80, shapes, shapes)
    assert not plan.needs_sharded_gradients(metaapo, 8, 80, shapes, shapes)


def test_sharded_and_unsharded_gradient_accumulation_agree(base_run, tmp_path):
    """Two processes, 4 micro-batches per step: syncing gradients on every micro-batch (they stay
    sharded) or only on the last gives the same training."""
    runs = {}
    for mode in ("sharded", "unsharded"):
        out = fresh_run(base_run, tmp_path, mode)
        shutil.rmtree(out / "dpo")
        run_train(
            [
                "--method=dpo",
                f"--out_dir={out}",
                f"--grad_accumulation={mode}",
                "--micro_batch_size=2",
                "--max_train_pairs=64",
            ]
            + [a for a in TINY if not a.startswith(("--micro_batch_size", "--max_train_pairs"))],
            torchrun=2,
        )
        runs[mode] = [r["loss"] for r in metrics(out / "dpo" / "metrics.jsonl")]
    assert runs["sharded"] == pytest.approx(runs["unsharded"], rel=1e-4) and len(runs["sharded"]) == 4
