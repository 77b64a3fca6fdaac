"""
The run's configuration: the Config dataclass (every key, its default and a comment), the presets
of --model, the --key=value parser and its checks, `--help`, where a stage's inputs come from
(data sources, model paths, stage directories) and the checks that they load, made before any
expensive work.

Run
    python train.py --help             # every key with its default and comment, and the presets
    python train.py --model=X --dry_run   # the config parsed and checked, the plan printed (plan.py)
Every script parses its command line here (train.py, evaluate.py, scripts/); nothing here is
distributed.

Deliberate simplifications
- The parser is hand-written (--key=value, --key value, a bare --flag for booleans), so the
  dataclass stays the only list of keys, defaults and comments; --help reads the comments from
  this file's source.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import data
import smollm2
import toy
from meta import INPUT_MODES, SAMPLING_MODES, WEIGHTING_MODES
from sample import BACKENDS

# ==============================================================================================
# The keys, their defaults and the presets

METHODS = (
    "pipeline",
    "sft",
    "rm",
    "dpo",
    "ipo",
    "kto",
    "simpo",
    "slic",
    "selective_dpo",
    "metaapo",
    "online_dpo",
    "iterative_dpo",
    "selm",
    "adpo",
    "ppo",
    "boundary",
)

OFFLINE_METHODS = ("dpo", "ipo", "kto", "simpo", "slic")

ITERATIVE_METHODS = ("metaapo", "online_dpo", "iterative_dpo", "selm", "adpo", "boundary")

OBJECTIVES = ("dpo", "ipo", "simpo")


@dataclass
class Config:
    # --- what to run
    model: str = "toy"  # preset (toy, tulu8b, qwen7b) or any HF model id / local path: the SFT model
    method: str = "pipeline"  # one of METHODS; pipeline = every stage the run needs, then the results table
    out_dir: str = ""  # run directory; "" = out/<model>-seed<seed>; each stage writes <out_dir>/<stage>/
    seed: int = 0  # data order, initialisation, gating and sampling
    data_seed: int = -1  # the toy task's data (out/toy/seed<N>); -1 = seed
    toy_regime: str = "mismatch"  # the toy data: mismatch (foreign offline styles) or skill (the paper's premise)
    resume: bool = False  # continue unfinished stages from their latest checkpoint
    # --- data
    dataset: str = "HuggingFaceH4/ultrafeedback_binarized"  # preference pairs: file, directory or hub id
    train_split: str = "train_prefs"  # a directory's or hub dataset's split; a single file is all training data
    test_split: str = "test_prefs"
    # held-out pairs: file, directory or hub id; "" = dataset's test_split (none for a single file)
    test_dataset: str = ""
    sft_dataset: str = ""  # SFT demonstrations (method sft); the toy preset sets it
    skip_bad_rows: bool = False  # skip and count malformed rows instead of stopping
    max_train_pairs: int = 0  # use only the first N offline pairs (0 = all); for quick runs
    max_prompt_len: int = 2048  # prompts longer than this (in tokens) are dropped
    max_len: int = 4096  # prompt + response; longer responses are truncated
    # --- models
    sft_model: str = ""  # the SFT model; "" = this run's sft stage (toy) or `model`
    reward_model: str = ""  # reward model path; "" = this run's rm stage
    policy: str = ""  # starting policy of metaapo and the online methods; "" = this run's dpo stage
    reference: str = ""  # reference of offline methods and of MetaAPO's first iteration; "" = the SFT model
    init_from_config: bool = False  # method sft: train from a fresh initialisation of `model`'s config (the toy)
    # --- optimisation of the preference stages
    lr: float = 5e-7  # peak learning rate
    warmup_ratio: float = 0.03  # linear warm-up over this fraction of the steps
    lr_floor: float = 0.1  # cosine decays to this fraction of lr
    betas: tuple = (0.9, 0.95)  # AdamW betas
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm
    batch_size: int = 128  # pairs (tuples) per optimizer step, over all ranks
    micro_batch_size: int = 1  # pairs per rank per forward; gradients accumulate to batch_size
    epochs: int = 1  # passes over the data per stage (per iteration for the iterative methods)
    # --- SFT and reward-model stages
    sft_lr: float = 2e-5
    sft_epochs: int = 1
    sft_batch_size: int = 128  # sequences per optimizer step
    rm_lr: float = 9e-6
    rm_batch_size: int = 128  # pairs per optimizer step
    rm_max_len: int = 4096  # reward-model truncation, for training and scoring
    # --- objectives
    # L_pref of metaapo and the online methods: dpo, ipo or simpo (slic too for online_dpo and boundary)
    objective: str = "dpo"
    beta: float = 0.1  # DPO / IPO / KTO beta
    label_smoothing: float = 0.0  # conservative DPO
    simpo_beta: float = 2.5
    simpo_gamma: float = 0.6
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    slic_delta: float = 1.0
    slic_nll_weight: float = 0.1
    slic_nll: str = "sum"  # the NLL term: sum over the answer's tokens (SLiC-HF) or mean (TRL's CPO)
    # IPO on per-token log-ratios (TRL) instead of summed ones (IPO's Eq. 17, the reference code)
    ipo_length_normalized: bool = False
    # --- MetaAPO and the online methods
    iterations: int = 3  # T: D_off is split into T chunks, one per iteration
    # policy steps per iteration of every iterative method: 0 = one epoch over its pairs; N = N steps,
    # cycling through reshuffled epochs of them (equal steps for methods with unequal pairs)
    steps_per_iteration: int = 0
    num_samples: int = 8  # K responses per selected prompt
    meta_interval: int = 8  # T_meta: policy steps per meta update (16 = the reference code's effective interval)
    meta_lr: float = 5e-3  # the meta-learner's AdamW: one step per meta update
    meta_weight_decay: float = 1e-4  # the reference code's meta optimizer
    meta_grad_clip: float = 1.0  # max gradient norm of a meta update
    # h's input is log sigmoid(meta_input_beta * Delta); 0 = beta (Eq. 4), 1 = the reference code
    meta_input_beta: float = 0.0
    meta_depth: int = 2  # linear layers of the meta-learner (5 for the ablation)
    meta_inputs: str = "score"  # score, or multi (score + chosen and rejected log-ratios)
    sampling: str = "meta"  # meta, random, threshold or all
    weighting: str = "meta"  # meta, uniform (w = 0.5) or fixed (w = sigmoid(l_off))
    threshold: float = math.log(0.5)  # sampling=threshold: generate when l_off is below it
    # sampling=threshold: 0 = use --threshold; > 0 = each iteration, the tuples of lowest l_off, this share of them
    threshold_ratio: float = 0.0
    random_ratio: float = 0.5  # sampling=random: the chance of each tuple to be sent to generation
    keep_unsampled: bool = False  # also train on the unselected offline tuples, with weight 1
    # a sampled tuple whose K rewards all tie: keep = its offline pair trains with a zero-gradient
    # (y, y) online pair, as in the reference code; drop = the tuple is dropped, offline pair too
    tied_samples: str = "keep"
    # metaapo, as a diagnostic: false = a tied tuple trains in Eq. 5 but its (l_off, l_on) stays out of the meta buffer
    tied_in_meta_buffer: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 2048
    generator: str = "transformers"  # transformers, or vllm (GPU; one worker process per rank)
    gen_batch_size: int = 64  # prompts per generate call (transformers)
    gpu_memory_utilization: float = 0.5  # vLLM's share of each GPU
    vllm_max_model_len: int = 0  # vLLM's context (KV cache); 0 = the longest prompt + max_new_tokens
    vllm_enforce_eager: bool = False  # vLLM without CUDA graphs: starts faster, decodes slower
    vllm_python: str = ""  # the vLLM child's interpreter, e.g. a venv whose vLLM pins another torch; "" = this one
    # --- system
    activation_checkpointing: bool = True  # recompute each decoder block in backward
    # FSDP2 across micro-batches: unsharded (sync on the last), sharded (sync each), auto (sharded if needed to fit)
    grad_accumulation: str = "auto"
    chunk_size: int = 0  # rows per chunk of the fused log-prob kernel (0 = its default)
    export_dtype: str = "auto"  # HF exports: auto (bf16 on GPU, fp32 on CPU), bf16 or fp32
    # optimizer steps between checkpoints; 0 = by time: after the first step, then once writing one costs at most
    # 5% of the time since the last (and at phase boundaries)
    save_every: int = 0
    save_minutes: float = 30.0  # also a checkpoint once this many minutes passed since the last (0 = off)
    keep_checkpoints: int = 2  # checkpoints kept per stage
    deterministic: bool = False  # torch.use_deterministic_algorithms, for bit-exact reruns
    # how long a rank waits for the others at a collective: a generation phase or a rank-0 export can keep them there
    dist_timeout_minutes: float = 120.0
    eval_samples: int = 4  # results table: samples per held-out prompt
    eval_prompts: int = 0  # results table: held-out prompts used (0 = all)
    wandb_project: str = ""  # also log to Weights & Biases (pip install wandb; WANDB_MODE=offline needs no network)
    # print each stage's steps and tokens and a per-GPU memory plan, refuse one that cannot fit; run nothing
    dry_run: bool = False
    gpus: int = 0  # --dry_run: GPUs to plan for (0 = this launch's world size)
    gpu_memory_gb: float = 0.0  # --dry_run: memory per GPU in GiB (0 = this GPU's, 80 without one)
    # --- the online baselines (baselines/online.py): Online DPO on a share of the prompts, SELM, ADPO
    # selm: weight of the optimism term alpha*beta*(log pi - log pi_ref) on the policy's own answer
    selm_alpha: float = 0.001
    adpo_threshold: float = math.log(2)  # adpo: pairs whose DPO loss is below this get online pairs
    # adpo: the offline pairs it trains on with the online ones: all of D_t, or only the selected
    # tuples' (the reference code's merge_dataset_adpo, inferred: the authors ran no ADPO script)
    adpo_offline: str = "all"
    # online_dpo, iterative_dpo: the share of each iteration's prompts that get K answers, drawn at random
    prompt_ratio: float = 1.0
    # --- Selective DPO (baselines/selective_dpo.py)
    selective_seeds: int = 3  # selective_dpo: reference runs per half (seeds x 2 halves), as the original
    # selective_dpo: evenly spaced points of each reference run at which the loss is averaged
    selective_checkpoints: int = 5
    keep_ratio: float = 0.5  # selective_dpo: fraction of the pairs kept (the easiest)
    # --- the on-policy/static boundary method (baselines/boundary.py): static or on-policy data per iteration
    # boundary: fixed data per iteration, e.g. off,on (static, then on-policy); "" = chosen by the boundary score
    schedule: str = ""
    probe_ratio: float = 0.03  # boundary: share of an iteration's prompts in its boundary measurement
    probe_samples: int = 4  # boundary: on-policy answers per probe prompt, each compared with the 2 static ones
    boundary_threshold: float = 0.5  # boundary: a score at or above it means the fine-tuning stage: on-policy data
    # --- PPO (baselines/ppo.py, OpenRLHF's defaults): actor = the SFT model, critic = the RM with per-token values
    critic_lr: float = 9e-6  # the critic's AdamW (the actor's is lr)
    kl_coef: float = 0.01  # per-token KL penalty to the SFT model, in the reward
    gae_gamma: float = 1.0  # GAE's discount
    gae_lambda: float = 0.95  # GAE's lambda
    ppo_clip: float = 0.2  # clip of the policy ratio
    value_clip: float = 0.2  # clip of the value change
    rollout_batch_size: int = 1024  # prompts per rollout; each rollout is then one pass of batch_size steps


def toy_preset(data_seed: int, regime: str = "mismatch") -> dict:
    """The embedded toy task (toy.py): tiny Llama, CPU, a few minutes end to end."""
    root = toy.toy_root(data_seed, regime)  # built by toy.ensure_toy_assets
    return dict(
        model=str(root / "base"),
        init_from_config=True,
        dataset=str(root),
        sft_dataset=str(root / "sft.jsonl"),
        max_prompt_len=16,
        max_len=40,
        rm_max_len=40,
        max_new_tokens=24,
        sft_lr=3e-3,
        sft_epochs=10,
        sft_batch_size=64,
        rm_lr=3e-4,
        rm_batch_size=16,
        lr=5e-5,
        batch_size=16,
        micro_batch_size=16,
        gen_batch_size=256,
        activation_checkpointing=False,
        generator="transformers",
        critic_lr=3e-4,
        # the critic learns at the reward model's rate; 8 PPO steps per rollout as OpenRLHF's 1024 / 128
        rollout_batch_size=128,
        selective_seeds=2,
        selective_checkpoints=2,  # Selective DPO's reference runs, cut to fit the comparison (original: 3 x 5)
    )


def smollm2_preset(data_seed: int, regime: str = "mismatch") -> dict:
    """SmolLM2-135M-Instruct (the SFT model: no SFT stage) on smollm2.py's graded instructions, on the
    CPU: 384 offline pairs, answers of at most 32 tokens, K = 4 samples at temperature 0.7,
    batches of 8 pairs; with 3 iterations of 128 tuples, about 10 policy steps each, so T_meta = 2
    for about 5 meta updates per iteration (the paper's runs have 5 at T_meta = 16). The reward
    model's rate, 3e-4 as the toy's, was fixed by its held-out accuracy alone (0.49 at 3e-5, 0.63
    at 1e-4, 0.68 at 3e-4, one epoch), before any method ran."""
    return dict(
        model=str(smollm2.model_dir()),
        dataset=str(smollm2.data_root(data_seed)),
        max_prompt_len=64,
        max_len=96,
        rm_max_len=96,
        max_new_tokens=32,
        temperature=0.7,
        num_samples=4,
        lr=1e-5,
        rm_lr=3e-4,
        batch_size=8,
        micro_batch_size=8,
        rm_batch_size=8,
        gen_batch_size=64,
        meta_interval=2,
        eval_samples=2,
        activation_checkpointing=False,
        generator="transformers",
    )


PRESETS = {
    "toy": toy_preset,
    "smollm2": smollm2_preset,
    # Table B.4, with the meta-learner as the authors' scripts ran it: h reads log sigmoid(Delta)
    # (unscaled) and updates every 16 policy steps (docs/algorithm.md#departures); the reward model is a path
    # argument (or this run's `rm` stage)
    "tulu8b": lambda data_seed, regime: dict(
        model="allenai/Llama-3.1-Tulu-3-8B-SFT",
        temperature=1.0,
        top_p=1.0,
        generator="vllm",
        micro_batch_size=1,
        meta_input_beta=1.0,
        meta_interval=16,
    ),
    "qwen7b": lambda data_seed, regime: dict(
        model="FuseAI/FuseChat-Qwen-2.5-7B-SFT",
        temperature=0.8,
        top_p=0.95,
        generator="vllm",
        micro_batch_size=1,
        meta_input_beta=1.0,
        meta_interval=16,
    ),
}

CHOICES = {
    "method": METHODS,
    "objective": OBJECTIVES + ("slic",),
    "sampling": SAMPLING_MODES,
    "toy_regime": ("mismatch", "skill"),
    "tied_samples": ("keep", "drop"),
    "adpo_offline": ("all", "selected"),
    "weighting": WEIGHTING_MODES,
    "meta_inputs": INPUT_MODES,
    "generator": BACKENDS,
    "export_dtype": ("auto", "bf16", "fp32"),
    "grad_accumulation": ("auto", "unsharded", "sharded"),
    "slic_nll": ("sum", "mean"),
}

# Names other trainers (OpenRLHF, the reference implementation's CLI, TRL) give our keys: an
# unknown key close to one of them is answered with ours.
OTHER_NAMES = {
    "learning_rate": "lr",
    "train_batch_size": "batch_size",
    "micro_train_batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "max_epochs": "epochs",
    "num_train_epochs": "epochs",
    "pretrain": "model",
    "model_name_or_path": "model",
    "ref_pretrain": "reference",
    "reward_pretrain": "reward_model",
    "prompt_max_len": "max_prompt_len",
    "max_length": "max_len",
    "generate_max_len": "max_new_tokens",
    "n_samples_per_prompt": "num_samples",
    "save_path": "out_dir",
    "output_dir": "out_dir",
    "meta_k": "meta_interval",
    "max_grad_norm": "grad_clip",
    "adam_betas": "betas",
}


# Old names still accepted: a notice gives the current one
RENAMED_KEYS = {"stage_threshold": "boundary_threshold"}
RENAMED_VALUES = {("method", "stage"): "boundary"}  # old names accepted: --method=stage


def renamed(old: str, new: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {old} is now {new} (the old name is still accepted)", file=sys.stderr)


# Every seed a run draws from --seed, in one place: the purpose and the integers it gives. Some
# integers recur (phase 2's shuffle of iteration 0 and phase 1's generation seed of iteration 1 are
# both 1000 seed + ... ); they feed different random generators, so nothing is shared.
SEEDS = {
    "batches": lambda seed: 1000 * seed,  # SFT's and the offline methods' shuffles (epoch e: + e)
    "reward model batches": lambda seed: seed,
    "slices": lambda seed: seed,  # D_off shuffled and cut into D_1..D_T
    "phase 1 generation": lambda seed, t: 1000 * seed + t,  # iteration t (batch k of the transformers backend: + k)
    "phase 2 batches": lambda seed, t: 1000 * seed + 10 * t,
    "boundary probe": lambda seed, t: 1000 * seed + 500 + t,
    "selective halves": lambda seed, s: seed + 17 + s,  # Selective DPO's random halving s
    "ppo prompts": lambda seed: seed,
    "ppo rollout": lambda seed, r: 1000 * seed + r,  # rollout r's generation and its batches
    "results table": lambda seed: seed + 4242,  # the toy's held-out answers
    "dynamics": lambda seed, t: seed + 777 + t,  # dynamics.py's fresh pairs of iteration t
    "toy properties": lambda seed: seed + 999,  # dynamics.regime_properties' answers
    "prompt subset": lambda seed, index: 1000 * seed + 700 + index,  # online_dpo's --prompt_ratio draw of a prompt
}


def seed_for(cfg: Config, purpose: str, *ids: int) -> int:
    """The seed of `purpose` (a key of SEEDS, or of an experiment config's EXTRA_SEEDS) for this run,
    e.g. seed_for(cfg, "phase 1 generation", t)."""
    return {**SEEDS, **getattr(cfg, "EXTRA_SEEDS", {})}[purpose](cfg.seed, *ids)


# ==============================================================================================
# Parsing and checking the command line


class ConfigError(ValueError):
    """A bad command-line argument; the message names it."""


def _convert(name: str, text: str, default):
    kind = type(default)
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        value = tuple(float(x) for x in text.split(",")) if kind is tuple else kind(text)
    except ValueError:
        raise ConfigError(f"--{name}: expected {kind.__name__}, got {text!r}") from None
    if kind in (float, tuple) and not all(math.isfinite(x) for x in (value if kind is tuple else (value,))):
        raise ConfigError(f"--{name}: must be finite, got {text!r}")
    return value


# What each number may be: a value failing its test is refused before anything runs.
LIMITS = [
    (
        (
            "batch_size",
            "micro_batch_size",
            "epochs",
            "sft_epochs",
            "sft_batch_size",
            "rm_batch_size",
            "rm_max_len",
            "iterations",
            "rollout_batch_size",
            "meta_interval",
            "max_new_tokens",
            "gen_batch_size",
            "eval_samples",
            "keep_checkpoints",
            "selective_seeds",
            "selective_checkpoints",
        ),
        lambda v: v >= 1,
        "at least 1",
    ),
    (("num_samples",), lambda v: v >= 2, "at least 2 (the online pair is the best and the worst of K responses)"),
    (("probe_samples",), lambda v: v >= 1, "at least 1"),
    (("meta_depth",), lambda v: v >= 2, "at least 2 (linear layers)"),
    (
        (
            "max_train_pairs",
            "steps_per_iteration",
            "save_every",
            "save_minutes",
            "eval_prompts",
            "chunk_size",
            "gpus",
            "gpu_memory_gb",
            "weight_decay",
            "meta_weight_decay",
            "temperature",
            "meta_input_beta",
            "slic_delta",
            "slic_nll_weight",
            "kto_desirable_weight",
            "kto_undesirable_weight",
            "simpo_gamma",
        ),
        lambda v: v >= 0,
        "at least 0",
    ),
    (
        (
            "lr",
            "sft_lr",
            "rm_lr",
            "meta_lr",
            "critic_lr",
            "grad_clip",
            "meta_grad_clip",
            "beta",
            "simpo_beta",
            "dist_timeout_minutes",
        ),
        lambda v: v > 0,
        "positive",
    ),
    (("kl_coef", "ppo_clip", "value_clip", "selm_alpha"), lambda v: v >= 0, "at least 0"),
    (("gae_gamma", "gae_lambda"), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("warmup_ratio",), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("lr_floor",), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("label_smoothing",), lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    (
        ("top_p", "gpu_memory_utilization", "keep_ratio", "probe_ratio", "random_ratio", "prompt_ratio"),
        lambda v: 0 < v <= 1,
        "in (0, 1]",
    ),
    (("threshold_ratio",), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("boundary_threshold",), lambda v: 0 <= v <= 1, "in [0, 1]"),
]


def check_config(cfg: Config) -> None:
    """Refuse a config that cannot train, naming the flag, before any work is done."""
    # an experiment's config (a subclass of Config with keys of its own) brings their rules as class attributes
    for key, choices in {**CHOICES, **getattr(cfg, "EXTRA_CHOICES", {})}.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"--{key}: must be one of {', '.join(choices)}, got {getattr(cfg, key)!r}")
    for keys, test, what in [*LIMITS, *getattr(cfg, "EXTRA_LIMITS", [])]:
        for key in keys:
            if not test(getattr(cfg, key)):
                raise ConfigError(f"--{key}: must be {what}, got {getattr(cfg, key)}")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise ConfigError(
            f"--betas: must be two numbers in [0, 1), as --betas=0.9,0.95; got {','.join(map(str, cfg.betas))}"
        )
    if not 0 < cfg.max_prompt_len < cfg.max_len:
        raise ConfigError(
            f"--max_prompt_len ({cfg.max_prompt_len}) must be positive and below --max_len ({cfg.max_len}): the "
            "response needs room"
        )
    if cfg.method == "kto" and cfg.batch_size < 2:
        raise ConfigError(
            "--method=kto needs --batch_size of at least 2: its reference point pairs each answer with another prompt "
            f"of the batch, got {cfg.batch_size}"
        )
    if cfg.objective == "slic" and cfg.method not in ("online_dpo", "boundary"):
        raise ConfigError(
            "--objective=slic: only --method=online_dpo or boundary train on it (SLiC-HF has no preference score), got "
            f"{cfg.method}"
        )
    if cfg.schedule and (
        len(cfg.schedule.split(",")) != cfg.iterations or set(cfg.schedule.split(",")) - {"on", "off"}
    ):
        raise ConfigError(
            f"--schedule: one of on or off per iteration, comma-separated ({cfg.iterations} iterations), got "
            f"{cfg.schedule!r}"
        )
    if cfg.vllm_python and not (os.path.isfile(cfg.vllm_python) and os.access(cfg.vllm_python, os.X_OK)):
        raise ConfigError(f"--vllm_python: {cfg.vllm_python} is not an executable file (a venv's bin/python)")
    if cfg.method == "sft" and not cfg.sft_dataset:
        raise ConfigError("--method=sft needs --sft_dataset (the toy preset sets it)")


def parse_config(argv: list[str], later_wins: bool = False, cls: type[Config] = Config) -> Config:
    """Defaults < the preset of --model < the command line. A key given twice is refused, unless
    later_wins (argument lists a program composes from its defaults and a user's command line).
    cls: Config, or an experiment's subclass of it with keys of its own."""
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    overrides, given, i = {}, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --key=value")
        key, has_value, value = arg[2:].partition("=")
        name = key
        if key in RENAMED_KEYS:
            renamed(f"--{key}", f"--{RENAMED_KEYS[key]}")
            key = RENAMED_KEYS[key]
        if key in given and not later_wins:  # the last one would win without a word
            also = f" (as --{given[key]})" if given[key] != name else ""
            raise ConfigError(f"--{name} is given twice{also}; give it once")
        given[key] = name
        if key not in fields:
            names = {**{name: name for name in fields}, **OTHER_NAMES}
            closest = names[difflib.get_close_matches(key, names, n=1, cutoff=0.0)[0]]
            raise ConfigError(
                f"unknown config key --{key}; the closest valid one is --{closest} (python train.py --help lists them "
                "all)"
            )
        if not has_value:
            if isinstance(fields[key], bool) and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                value = "true"  # a bare flag
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i, value = i + 1, argv[i + 1]
            else:
                raise ConfigError(f"--{key} needs a value (--{key}=VALUE or --{key} VALUE)")
        overrides[key] = _convert(key, value, fields[key])
        if (key, overrides[key]) in RENAMED_VALUES:
            renamed(f"--{key}={overrides[key]}", f"--{key}={RENAMED_VALUES[key, overrides[key]]}")
            overrides[key] = RENAMED_VALUES[key, overrides[key]]
        i += 1
    cfg = cls()
    preset = overrides.get("model", cfg.model)
    seed = overrides.get("seed", cfg.seed)
    data_seed = overrides.get("data_seed", -1)
    regime = overrides.get("toy_regime", cfg.toy_regime)
    if regime != cfg.toy_regime and preset != "toy":
        raise ConfigError(f"--toy_regime={regime}: the toy's data only; --model={preset} is not the toy")
    if preset in PRESETS:
        for key, value in PRESETS[preset](seed if data_seed < 0 else data_seed, regime).items():
            setattr(cfg, key, value)
    for key, value in overrides.items():
        if not (key == "model" and preset in PRESETS):
            setattr(cfg, key, value)
    cfg.preset = preset if preset in PRESETS else ""
    check_config(cfg)
    if not cfg.out_dir:
        name = Path(preset).name + (f"-{regime}" if regime != "mismatch" else "")
        cfg.out_dir = str(Path("out") / f"{name}-seed{cfg.seed}")
    return cfg


def config_help(title: str, cls: type[Config] = Config, program: str = "train.py") -> str:
    """`python train.py --help`: `title`, then every key with its default and comment, grouped as
    in Config and then in an experiment's subclass `cls` (read from their source, so the two
    cannot drift apart), then the presets."""
    import inspect

    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    source = [line for klass in reversed(cls.__mro__[:-1]) for line in inspect.getsource(klass).splitlines()[1:]]
    lines = [
        title,
        "",
        f"usage: python {program} [--key=value ...]  (or torchrun --nproc_per_node N {program} ...)",
    ]
    above = None  # a key's comment is on its line, or on the line above when it would not fit there
    for line in source:
        text = line.strip()
        if text.startswith("# ---"):
            lines += ["", text[5:].strip() + ":"]
        elif text.startswith("# "):
            above = text[2:]
        elif (match := re.match(r"(\w+): [^=]+=.*?(?:  # (.*))?$", text)) and match.group(1) in defaults:
            name, comment = match.groups()
            default = defaults[name]
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            comment = comment or above
            lines.append(f"  --{name}={shown}" + (f"  {comment}" if comment else ""))
            above = None
    lines += ["", "presets (--model=NAME; any other value is a hub id or a local path of the SFT model):"]
    lines += [
        f"  {name}: {', '.join(f'{k}={v}' for k, v in preset(0, 'mismatch').items())}"
        for name, preset in PRESETS.items()
    ]
    return "\n".join(lines)


def preset_defaults(preset: str) -> Config:
    """Config's defaults with `preset`'s values (a preset's data paths as for seed 0)."""
    return dataclasses.replace(Config(), **(PRESETS[preset](0, "mismatch") if preset in PRESETS else {}))


def config_dict(cfg: Config) -> dict:
    return {**dataclasses.asdict(cfg), "preset": getattr(cfg, "preset", "")}


# ==============================================================================================
# Where a stage's inputs come from


def train_source(cfg: Config) -> tuple[str, str | None]:
    """(source, split) of the training pairs: a single file is all training data."""
    return cfg.dataset, None if Path(cfg.dataset).is_file() else cfg.train_split


def test_source(cfg: Config) -> tuple[str, str | None] | None:
    """(source, split) of the held-out pairs: --test_dataset, else --dataset's test_split; None
    when --dataset is a single file, or a directory without that split, and no --test_dataset is
    given: then there are no held-out pairs (never the training rows)."""
    if cfg.test_dataset:
        return cfg.test_dataset, None if Path(cfg.test_dataset).is_file() else cfg.test_split
    if Path(cfg.dataset).is_file():
        return None
    if Path(cfg.dataset).is_dir():
        try:
            data.split_files(Path(cfg.dataset), cfg.test_split)
        except data.DataError:
            return None
    return cfg.dataset, cfg.test_split


def describe(source: tuple[str, str | None]) -> str:
    return f"{source[0]} [{source[1]}]" if source[1] else source[0]


def require_test_source(cfg: Config, purpose: str) -> tuple[str, str | None]:
    """test_source, or an error saying that `purpose` needs held-out pairs and how to give them."""
    source = test_source(cfg)
    if source is None:
        raise ConfigError(
            f"{purpose} needs held-out pairs, and --dataset={cfg.dataset} has no {cfg.test_split} split (a single file "
            "is training data only); pass --test_dataset (a file, a directory with that split, or a hub id)"
        )
    return source


def sft_path(cfg: Config) -> str:
    return cfg.sft_model or (str(Path(cfg.out_dir) / "sft" / "model") if cfg.init_from_config else cfg.model)


def reward_path(cfg: Config) -> str:
    return cfg.reward_model or str(Path(cfg.out_dir) / "rm" / "model")


def warm_policy_path(cfg: Config) -> str:
    return cfg.policy or str(Path(cfg.out_dir) / "dpo" / "model")


def reference_path(cfg: Config) -> str:
    return cfg.reference or sft_path(cfg)


# ==============================================================================================
# Before any work: every input loads

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _short(err: Exception) -> str:
    """An exception's message on one line (its lines joined: the first alone can end mid-sentence)."""
    return " ".join(str(err).split())[:300] or type(err).__name__


HUB_HINT = "pass a local path instead, connect to the network, or set HF_HUB_OFFLINE=1 with it in the local cache"


def load_config(flag: str, path: str):
    """The model config at `path` (a directory or hub id), or a one-line error naming `flag`: for a
    hub id that cannot be reached (no network, HF_HUB_OFFLINE, a typo) it says how to go on."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as err:  # transformers raises OSError, ValueError, ... for the many ways a path is wrong
        if Path(path).expanduser().exists():
            raise ConfigError(f"{flag}: {path} is not a model transformers can load: {_short(err)}") from None
        raise ConfigError(
            f"{flag}: {path} cannot be read from the Hugging Face hub ({_short(err)}); {HUB_HINT}"
        ) from None


def check_model(flag: str, path: str, produced_by: str = "", reward: bool = False) -> None:
    """Refuse, naming the flag, a model that cannot be loaded: a missing path, a directory without
    config.json or tokenizer, a hub id that does not resolve, a causal LM given as reward model.
    Reads only the config and the tokenizer, so it costs seconds even for an 8B model.
    `produced_by`: the stage whose output `path` is when the flag is unset."""
    if not Path(path).expanduser().exists():
        if produced_by:
            raise ConfigError(
                f"{flag} is not set and this run's {produced_by} stage has no model at {path}: run that stage first "
                f"(--method={produced_by}, or the default pipeline) or pass {flag}"
            )
        if not HUB_ID.fullmatch(path):
            raise ConfigError(
                f"{flag}: {path} does not exist (neither a local directory nor a hub id of the form owner/name)"
            )
    config = load_config(flag, path)
    try:
        data.load_tokenizer(path)
    except Exception as err:
        raise ConfigError(
            f"{flag}: {path} has no tokenizer that loads (save it with the model): {_short(err)}"
            + ("" if Path(path).expanduser().exists() else f"; {HUB_HINT}")
        ) from None
    if reward and any(name.endswith("ForCausalLM") for name in getattr(config, "architectures", None) or []):
        raise ConfigError(
            f"{flag}: {path} is a causal LM ({', '.join(config.architectures)}), not a reward model; pass a "
            "sequence-classification checkpoint with one label (train.py --method rm)"
        )


def check_lengths(cfg: Config, path: str) -> None:
    """Refuse, naming both flags, length limits no prompt can meet: the chat template of `path`'s
    tokenizer (the one the data is tokenized with) wraps even a one-word prompt in tokens of its
    own, and the answer needs room after the longest prompt."""
    shortest = len(data.encode_prompt(data.load_tokenizer(path), [{"role": "user", "content": "a"}]))
    if shortest > cfg.max_prompt_len or shortest >= cfg.max_len:
        raise ConfigError(
            f"--max_prompt_len={cfg.max_prompt_len} with --max_len={cfg.max_len}: the chat template of {path} makes "
            f"a one-word prompt {shortest} tokens long, so no prompt (and answer) fits; raise --max_prompt_len to the "
            "longest prompt you want and --max_len above it"
        )


def check_data(flag: str, source: str, split: str | None = None) -> None:
    """A data path exists and holds the split's files (a hub id is fetched now)."""
    if not source:
        return
    if not Path(source).exists() and (not HUB_ID.fullmatch(source) or Path(source).suffix in data.DATA_EXTENSIONS):
        raise ConfigError(
            f"{flag}: {source} does not exist (neither a local file or directory nor a hub dataset id of the form "
            "owner/name)"
        )
    try:  # a hub id is downloaded here, where a failure can name the flag (the data is needed anyway)
        data.resolve_files(source, split)
    except data.DataError as err:
        raise ConfigError(f"{flag}: {err}") from None


def check_inputs(cfg: Config, method: str) -> None:
    """Before any expensive work: every model and data path `method` reads can be loaded. For the
    pipeline, the models given by flag (the others are made by its stages, and checked then)."""
    sft = (
        ("--sft_model", sft_path(cfg), "" if cfg.sft_model else "sft")
        if cfg.sft_model or cfg.init_from_config
        else ("--model", cfg.model, "")
    )
    reference = ("--reference", cfg.reference, "") if cfg.reference else sft
    policy = ("--policy", warm_policy_path(cfg), "" if cfg.policy else "dpo")
    reward = ("--reward_model", reward_path(cfg), "" if cfg.reward_model else "rm")
    if method == "sft":
        models = [("--model", cfg.model, "")]
    elif method == "rm":
        models = [sft]
    elif method in ("simpo", "slic"):
        models = [sft]
    elif method in OFFLINE_METHODS or method == "selective_dpo":
        models = [sft, reference]
    elif method in ITERATIVE_METHODS:
        start = sft if method == "iterative_dpo" else policy  # the authors' iterative DPO starts from SFT
        models = [start, reward] + ([] if cfg.objective in ("simpo", "slic") else [reference])
    elif method == "ppo":
        models = [sft, reward]
    else:  # pipeline
        models = [m for m in (sft, reference, policy, reward) if not m[2]]
    for flag, path, produced_by in dict.fromkeys(models):
        check_model(flag, path, produced_by, reward=flag == "--reward_model")
    check_lengths(cfg, models[0][1] if models else cfg.model)
    if method != "sft":
        check_data("--dataset", *train_source(cfg))
    if cfg.test_dataset:
        check_data("--test_dataset", *test_source(cfg))
    if method in ("sft", "pipeline") and cfg.init_from_config:
        check_data("--sft_dataset", cfg.sft_dataset)


def stage_name(cfg: Config, method: str) -> str:
    """A method's directory; MetaAPO ablations and other objectives get their own, e.g.
    metaapo-sampling_random, online_dpo-objective_simpo or boundary-objective_slic-schedule_off-on."""
    switches = {
        "metaapo": (
            "sampling",
            "weighting",
            "keep_unsampled",
            "tied_samples",
            "random_ratio",
            "threshold_ratio",
            "steps_per_iteration",
            "meta_depth",
            "meta_inputs",
            "meta_input_beta",
            "objective",
            "meta_interval",
            "meta_lr",
            "tied_in_meta_buffer",
        ),
        "online_dpo": ("objective", "prompt_ratio", "steps_per_iteration", "tied_samples"),
        "iterative_dpo": ("objective", "prompt_ratio", "steps_per_iteration", "tied_samples"),
        "selm": ("objective", "steps_per_iteration"),
        "adpo": ("adpo_offline", "steps_per_iteration"),
        "boundary": ("objective", "schedule", "steps_per_iteration"),
    }.get(method, ())
    defaults = preset_defaults(getattr(cfg, "preset", ""))  # a preset's own values name no directory
    return "-".join(
        [method]
        + [
            f"{key}_{str(getattr(cfg, key)).replace(',', '-')}"
            for key in switches
            if getattr(cfg, key) != getattr(defaults, key)
        ]
    )
