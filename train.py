"""
Every optimisation in the project: config and presets, distributed setup, FSDP2 sharding, SFT,
reward-model training (Eq. 1), the offline baselines, the MetaAPO loop (Algorithm 1), the online
baselines, and checkpoint save / resume.

Run
    python train.py                                   # the toy pipeline on CPU: SFT -> reward model
                                                      # -> DPO warm-up -> MetaAPO -> results table
    python train.py --method=online_dpo               # one more method on the same toy run
    python train.py --sampling=random                 # a MetaAPO ablation (stage metaapo-sampling_random)
    torchrun --nproc_per_node 8 train.py --model tulu8b                   # the paper's Llama-3.1-8B run
    torchrun --nproc_per_node 8 train.py --model qwen7b --reward_model RM  # with a given reward model
    python train.py --resume                          # continue an interrupted run where it stopped
Any config field can be set with --key=value (or --key value); an unknown key is an error that
lists the valid ones. `--model` picks a preset (toy, tulu8b, qwen7b) or takes any HF id / local
path as the SFT model. Every stage writes <out_dir>/<stage>/: config.json, metrics.jsonl,
checkpoints/ (resumable, torch.distributed.checkpoint) and model/ (HF safetensors + tokenizer).

Stopping and resuming
- Every optimisation pass writes a checkpoint every tenth of its steps (--save_every to choose),
  every --save_minutes, and at phase boundaries; phase 1 (scoring, generation, annotation) keeps
  its work in pieces as they finish (Pieces). `--resume` continues from the latest complete
  checkpoint (a damaged one is moved aside), bit-exact with --deterministic.
- SIGTERM or SIGINT: in training the current step finishes and a checkpoint is written; in phase 1
  the run stops before its next piece (vLLM workers terminated); either way it exits within
  seconds with a one-line message and status 128 + the signal; a second signal exits at once.
- `--resume` checks the config against the stage's config.json: a key that changes the result
  (optimisation, data, method, seeds, iterations, ...) must be the same, or the run stops and
  lists the differences; the harmless ones (RESUME_HARMLESS) are taken and recorded there.
- A finished stage (done.json) is never entered again, with or without --resume.
- What cannot train is refused before any work: bad numbers and length limits in the config, a
  model, tokenizer or reward-model path that does not load (named by its flag), no usable pair.

Methods (SPEC sections 4-6)
    pipeline      every stage the run needs, skipping finished ones, then the results table
    sft rm        supervised fine-tuning (toy only); Bradley-Terry reward model from the SFT model
    dpo ipo kto simpo slic selective_dpo    offline baselines, one epoch over the offline pairs
    metaapo       Algorithm 1 (`run_iterative`), with the ablation switches sampling, weighting,
                  keep_unsampled, meta_depth, meta_inputs, meta_input_beta and objective
    online_dpo selm adpo    online and hybrid baselines in the same iteration structure
    ppo           OpenRLHF-style PPO from the SFT model, its critic from the reward model (`run_ppo`)
The baselines follow their authors' code (SPEC section 5): Selective DPO's reference runs over
seeds and halves with losses averaged over checkpoints and an easy-to-hard final run, SELM's
optimism term, KTO's reference point from mismatched pairs of the whole batch with TRL's scaling;
IPO sums log-ratios (--ipo_length_normalized: TRL's per-token form), SLiC-HF sums its NLL
(--slic_nll=mean: TRL's CPO form).

Deliberate simplifications
- A checkpoint is read shard by shard under FSDP2 only from safetensors files holding every
  parameter; anything else (a new score head, other formats) is loaded whole on each rank's CPU
  first (fine for 8B models on 80 GB GPUs), then sharded block by block.
- Each MetaAPO iteration reloads the policy from the previous iteration's HF export (written in
  fp32 but for the last, so no progress is rounded away) and starts a fresh AdamW and LR schedule
  (warm-up + cosine over that iteration's steps), as the reference implementation does; the
  meta-learner, its optimizer and its buffer persist across iterations.
- On CPU the model is sharded only when there are several processes; on GPU it is always
  sharded (FSDP2 also gives single-GPU runs bf16 compute over fp32 master weights), a plain
  `python train.py` starting a process group of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import gc
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import transformers
from tqdm import tqdm

import data
import losses
from meta import INPUT_MODES, SAMPLING_MODES, WEIGHTING_MODES, MetaController, meta_features
from reward import RewardModel, require_reward_head, toy_gold_judge
from sample import BACKENDS, GenerationStopped, PairStats, generate, make_online_pairs

# ==============================================================================================
# Config

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
    "selm",
    "adpo",
    "ppo",
    "stage",
)
OFFLINE_METHODS = ("dpo", "ipo", "kto", "simpo", "slic")
ITERATIVE_METHODS = ("metaapo", "online_dpo", "selm", "adpo", "stage")
OBJECTIVES = ("dpo", "ipo", "simpo")


@dataclass
class Config:
    # --- what to run
    model: str = "toy"  # preset (toy, tulu8b, qwen7b) or any HF model id / local path: the SFT model
    method: str = "pipeline"  # one of METHODS; pipeline = every stage the run needs, then the results table
    out_dir: str = ""  # run directory; "" = out/<model>-seed<seed>; each stage writes <out_dir>/<stage>/
    seed: int = 0  # data order, initialisation, gating and sampling
    data_seed: int = -1  # the toy task's data (out/toy/seed<N>); -1 = seed
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
    # selm: weight of the optimism term alpha*beta*(log pi - log pi_ref) on the policy's own answer
    selm_alpha: float = 0.001
    selective_seeds: int = 3  # selective_dpo: reference runs per half (seeds x 2 halves), as the original
    # selective_dpo: evenly spaced points of each reference run at which the loss is averaged
    selective_checkpoints: int = 5
    keep_ratio: float = 0.5  # selective_dpo: fraction of the pairs kept (the easiest)
    adpo_threshold: float = math.log(2)  # adpo: pairs whose DPO loss is below this get online pairs
    # L_pref of metaapo and the online methods: dpo, ipo or simpo (slic too for online_dpo and stage)
    objective: str = "dpo"
    # --- MetaAPO and the online methods
    iterations: int = 3  # T: D_off is split into T chunks, one per iteration
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
    keep_unsampled: bool = False  # also train on the unselected offline tuples, with weight 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 2048
    generator: str = "transformers"  # transformers, or vllm (GPU; one worker process per rank)
    gen_batch_size: int = 64  # prompts per generate call (transformers)
    gpu_memory_utilization: float = 0.5  # vLLM's share of each GPU
    vllm_max_model_len: int = 0  # vLLM's context (KV cache); 0 = the longest prompt + max_new_tokens
    vllm_enforce_eager: bool = False  # vLLM without CUDA graphs: starts faster, decodes slower
    vllm_python: str = ""  # the vLLM child's interpreter, e.g. a venv whose vLLM pins another torch; "" = this one
    # --- the alignment-stage method (seed 004): static or on-policy data per iteration
    # stage: fixed data per iteration, e.g. off,on (static, then on-policy); "" = chosen by the boundary score
    schedule: str = ""
    probe_ratio: float = 0.03  # stage: share of an iteration's prompts in its boundary measurement
    probe_samples: int = 4  # stage: on-policy answers per probe prompt, each compared with the 2 static ones
    stage_threshold: float = 0.5  # stage: a boundary score at or above it means the fine-tuning stage: on-policy data
    # --- PPO (OpenRLHF's defaults): actor = the SFT model, critic = the reward model with per-token values
    critic_lr: float = 9e-6  # the critic's AdamW (the actor's is lr)
    kl_coef: float = 0.01  # per-token KL penalty to the SFT model, in the reward
    gae_gamma: float = 1.0  # GAE's discount
    gae_lambda: float = 0.95  # GAE's lambda
    ppo_clip: float = 0.2  # clip of the policy ratio
    value_clip: float = 0.2  # clip of the value change
    rollout_batch_size: int = 1024  # prompts per rollout; each rollout is then one pass of batch_size steps
    # --- system
    activation_checkpointing: bool = True  # recompute each decoder block in backward
    # FSDP2 across micro-batches: unsharded (sync on the last), sharded (sync each), auto (sharded if needed to fit)
    grad_accumulation: str = "auto"
    chunk_size: int = 0  # rows per chunk of the fused log-prob kernel (0 = its default)
    export_dtype: str = "auto"  # HF exports: auto (bf16 on GPU, fp32 on CPU), bf16 or fp32
    save_every: int = 0  # optimizer steps between checkpoints; 0 = every tenth of a pass (and at phase boundaries)
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


def toy_preset(data_seed: int) -> dict:
    """The embedded toy task (data.py): tiny Llama, CPU, a few minutes end to end."""
    root = Path("out/toy") / f"seed{data_seed}"  # built by data.ensure_toy_assets
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


PRESETS = {
    "toy": toy_preset,
    # Table B.4; the reward model is a path argument (or this run's `rm` stage)
    "tulu8b": lambda data_seed: dict(
        model="allenai/Llama-3.1-Tulu-3-8B-SFT", temperature=1.0, top_p=1.0, generator="vllm", micro_batch_size=1
    ),
    "qwen7b": lambda data_seed: dict(
        model="FuseAI/FuseChat-Qwen-2.5-7B-SFT", temperature=0.8, top_p=0.95, generator="vllm", micro_batch_size=1
    ),
}
CHOICES = {
    "method": METHODS,
    "objective": OBJECTIVES + ("slic",),
    "sampling": SAMPLING_MODES,
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
    (("top_p", "gpu_memory_utilization", "keep_ratio", "probe_ratio"), lambda v: 0 < v <= 1, "in (0, 1]"),
    (("stage_threshold",), lambda v: 0 <= v <= 1, "in [0, 1]"),
]


def check_config(cfg: Config) -> None:
    """Refuse a config that cannot train, naming the flag, before any work is done."""
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"--{key}: must be one of {', '.join(choices)}, got {getattr(cfg, key)!r}")
    for keys, test, what in LIMITS:
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
    if cfg.objective == "slic" and cfg.method not in ("online_dpo", "stage"):
        raise ConfigError(
            "--objective=slic: only --method=online_dpo or stage train on it (SLiC-HF has no preference score), got "
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


def parse_config(argv: list[str]) -> Config:
    """Defaults < the preset of --model < the command line."""
    fields = {f.name: f.default for f in dataclasses.fields(Config)}
    overrides, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --key=value")
        key, has_value, value = arg[2:].partition("=")
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
            elif i + 1 < len(argv):
                i, value = i + 1, argv[i + 1]
            else:
                raise ConfigError(f"--{key} needs a value")
        overrides[key] = _convert(key, value, fields[key])
        i += 1
    cfg = Config()
    preset = overrides.get("model", cfg.model)
    seed = overrides.get("seed", cfg.seed)
    data_seed = overrides.get("data_seed", -1)
    if preset in PRESETS:
        for key, value in PRESETS[preset](seed if data_seed < 0 else data_seed).items():
            setattr(cfg, key, value)
    for key, value in overrides.items():
        if not (key == "model" and preset in PRESETS):
            setattr(cfg, key, value)
    cfg.preset = preset if preset in PRESETS else ""
    check_config(cfg)
    if not cfg.out_dir:
        cfg.out_dir = str(Path("out") / f"{Path(preset).name}-seed{cfg.seed}")
    return cfg


def config_help() -> str:
    """`python train.py --help`: every key with its default and comment, grouped as in Config
    (read from its source, so the two cannot drift apart), then the presets."""
    import inspect

    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    lines = [
        __doc__.strip().split("\n\n")[0],
        "",
        "usage: python train.py [--key=value ...]  (or torchrun --nproc_per_node N train.py ...)",
    ]
    above = None  # a key's comment is on its line, or on the line above when it would not fit there
    for line in inspect.getsource(Config).splitlines()[1:]:
        text = line.strip()
        if text.startswith("# ---"):
            lines += ["", text[5:].strip() + ":"]
        elif text.startswith("# "):
            above = text[2:]
        elif match := re.match(r"(\w+): [^=]+=.*?(?:  # (.*))?$", text):
            name, comment = match.groups()
            default = defaults[name]
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            comment = comment or above
            lines.append(f"  --{name}={shown}" + (f"  {comment}" if comment else ""))
            above = None
    lines += ["", "presets (--model=NAME; any other value is a hub id or a local path of the SFT model):"]
    lines += [f"  {name}: {', '.join(f'{k}={v}' for k, v in preset(0).items())}" for name, preset in PRESETS.items()]
    return "\n".join(lines)


def config_dict(cfg: Config) -> dict:
    return {**dataclasses.asdict(cfg), "preset": getattr(cfg, "preset", "")}


# ==============================================================================================
# Distributed setup


@dataclass
class Runtime:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False  # a process group exists
    fsdp: bool = False  # models are sharded with fully_shard
    objects: object = None  # the group pickled objects travel over: gloo beside NCCL (None: the default group)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: Config) -> Runtime:
    """The device and, whenever models are sharded, a process group: torchrun's (NCCL on CUDA, gloo
    on CPU), or on a GPU without torchrun a group of this one process, so that `python train.py`
    on one GPU runs the same FSDP2 path as a torchrun job. On CPU without torchrun: none."""
    rt = Runtime()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in a single process is intended
    if cfg.deterministic:
        # cuBLAS refuses deterministic matmuls without a fixed workspace; it reads this at its first matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if torchrun:
        rt.rank, rt.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        rt.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        rt.device = torch.device("cuda", rt.local_rank)
        torch.cuda.set_device(rt.device)
    rt.fsdp = rt.device.type == "cuda" or rt.world > 1
    if torchrun or rt.fsdp:
        start_process_group(rt, cfg.dist_timeout_minutes)
    return rt


def start_process_group(rt: Runtime, timeout_minutes: float) -> None:
    """torchrun's process group (its environment variables), or one of this process alone. Every
    collective waits up to timeout_minutes for the slowest rank (NCCL's own default is 10 minutes,
    shorter than a generation phase on a slow rank). On CUDA the group is bound to this rank's GPU
    (NCCL starts now, so a broken node fails at start-up), and pickled objects (generations,
    scores) travel over a gloo group beside it rather than through GPU memory."""
    from datetime import timedelta

    timeout = timedelta(minutes=timeout_minutes)
    cuda = rt.device.type == "cuda"
    backend, device_id = ("nccl", rt.device) if cuda else ("gloo", None)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout, device_id=device_id)
    else:
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, device_id=device_id
        )
    rt.distributed = True
    rt.objects = dist.new_group(backend="gloo", timeout=timeout) if cuda else None


def print0(rt: Runtime, *args) -> None:
    if rt.main:
        print(*args, flush=True)


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def all_reduce_sum(rt: Runtime, values: torch.Tensor) -> torch.Tensor:
    if rt.distributed:
        values = values.to(rt.device)
        dist.all_reduce(values)
    return values


def all_gather_objects(rt: Runtime, obj) -> list:
    if not rt.distributed:
        return [obj]
    gathered = [None] * rt.world
    dist.all_gather_object(gathered, obj, group=rt.objects)
    return gathered


# ==============================================================================================
# Models: loading, FSDP2 sharding, HF export


MASTER_DTYPE = torch.float32  # weights and optimizer state; bf16 compute comes from FSDP's mixed precision on GPU


def _decoder_blocks(lm) -> list:
    names = set(getattr(lm, "_no_split_modules", None) or [])
    return [m for m in lm.modules() if type(m).__name__ in names]


def shard_model(root: torch.nn.Module, lm, cfg: Config, rt: Runtime, trainable: bool) -> torch.nn.Module:
    """Activation checkpointing per decoder block, fully_shard per block, then the root.

    bf16 parameters and fp32 gradient reductions on GPU, fp32 on CPU. `root` is the module whose
    forward runs the whole model (the LogprobModel wrapper or a reward model), so the head's
    gathered weight is what the fused kernel sees. fully_shard moves each block to the GPU as it
    shards it, so the whole model is never there unsharded (its freed blocks would stay cached in
    the allocator). A frozen model's root reshards after each forward: with no backward to come,
    keeping its gathered embeddings and head (2 GiB at 8B) would only hold memory.
    """
    if trainable and cfg.activation_checkpointing:
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not trainable:
        root.requires_grad_(False)
    if not rt.fsdp:
        return root.to(rt.device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(rt.device.type, (rt.world,))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if rt.device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    for block in _decoder_blocks(lm):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=None if trainable else True)
    return root


def reshard(model: nn.Module) -> None:
    """Free the gathered weights FSDP2 keeps after a forward without gradients (the root's own:
    embeddings, final norm, head): every FSDP module back to its shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def weights_dtype(rt: Runtime, trainable: bool) -> torch.dtype:
    """fp32 master weights for a model that trains; a frozen one (reference, reward model) is held
    in bf16 on GPU, which is what it computes in anyway, so it needs no fp32 copy."""
    return MASTER_DTYPE if trainable or rt.device.type != "cuda" else torch.bfloat16


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory, and initialisers do
    nothing) and their buffers real: RoPE's inv_freq and the like are computed at construction
    and are not in checkpoints. What accelerate's init_empty_weights(include_buffers=False) does."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def checkpoint_files(path: str) -> list[Path]:
    """The safetensors files of a model directory or of a hub id's cached snapshot ([] without them)."""
    directory = Path(path)
    if not directory.is_dir():
        if not HUB_ID.fullmatch(path):
            return []
        from huggingface_hub import snapshot_download

        try:  # from_pretrained fetches the same files; a failure here leaves the error to it
            directory = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))
        except Exception:
            return []
    return sorted(directory.glob("*.safetensors"))


def load_pretrained(auto_class, path: str, rt: Runtime, dtype: torch.dtype, seed: int | None = None, **config):
    """(model, checkpoint files, missing keys) of `auto_class` from `path`. Under FSDP2, when the
    safetensors checkpoint holds every parameter, the model is built with its parameters on the
    meta device and `files` are the checkpoint: load_shards fills in each rank's shard after
    sharding, reading only the rows it holds, so no rank ever holds the whole model. Otherwise (one
    process on CPU, a checkpoint without some parameter such as a new score head, other formats)
    from_pretrained loads it whole on CPU, `seed` seeding what it initialises; files = []."""
    from transformers import AutoConfig

    files = checkpoint_files(path) if rt.fsdp else []
    if files:
        from safetensors import safe_open

        with parameters_on_meta():
            model = auto_class.from_config(AutoConfig.from_pretrained(path, **config), dtype=dtype)
        stored = {key for file in files for key in safe_open(file, framework="pt").keys()}
        if {name for name, _ in model.named_parameters()} <= stored:
            try:
                from transformers import GenerationConfig

                model.generation_config = GenerationConfig.from_pretrained(path)  # its stop ids, as from_pretrained
            except OSError:
                pass  # no generation_config.json: the one from_config derived from the config stays
            return model, files, []
        del model
    if seed is not None:
        torch.manual_seed(seed)
    model, info = auto_class.from_pretrained(path, dtype=dtype, output_loading_info=True, **config)
    return model, [], info["missing_keys"]


@torch.no_grad()
def load_shards(root: nn.Module, prefix: str, files: list[Path], rt: Runtime) -> None:
    """Fill a model sharded with its parameters on the meta device (load_pretrained) from its
    safetensors files. FSDP2 shards dim 0 in chunks of ceil(rows / world), rank r holding chunk r;
    each rank reads only those rows of each tensor (safetensors slices are read from the file).
    `prefix`: the wrapper's name for the HF model (e.g. "lm." in LogprobModel)."""
    from safetensors import safe_open

    buffers = {name: buffer.clone() for name, buffer in root.named_buffers()}  # real already: keep them
    root.to_empty(device=rt.device)
    for name, buffer in root.named_buffers():
        buffer.copy_(buffers[name])
    handles = [safe_open(file, framework="pt") for file in files]
    where = {key: handle for handle in handles for key in handle.keys()}
    for name, param in root.named_parameters():
        key = name[len(prefix) :]
        local = param.to_local() if hasattr(param, "to_local") else param  # this rank's rows, unpadded
        start = rt.rank * math.ceil(param.shape[0] / rt.world) if param.dim() else 0
        if local.numel():
            rows = (
                where[key].get_slice(key)[start : start + local.shape[0]] if param.dim() else where[key].get_tensor(key)
            )
            local.copy_(rows.to(local.dtype))


def load_causal_lm(path: str, cfg: Config, rt: Runtime, from_config: bool = False, trainable: bool = True):
    """(HF causal LM, tokenizer, checkpoint files load_shards must read after sharding: see load_pretrained)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = data.load_tokenizer(path)
    if from_config:
        torch.manual_seed(cfg.seed)
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=weights_dtype(rt, trainable))
        files = []
    else:
        lm, files, _ = load_pretrained(AutoModelForCausalLM, path, rt, weights_dtype(rt, trainable))
    lm.config.use_cache = False
    return lm, tokenizer, files


def load_logprob_model(path: str, cfg: Config, rt: Runtime, trainable: bool, from_config: bool = False):
    """(LogprobModel sharded as the FSDP root, tokenizer)."""
    lm, tokenizer, files = load_causal_lm(path, cfg, rt, from_config, trainable)
    model = losses.LogprobModel(lm, cfg.chunk_size or None)
    model = shard_model(model, lm, cfg, rt, trainable)
    if files:
        load_shards(model, "lm.", files, rt)
    if rt.fsdp:  # FSDP2 sets up its root at the first forward: run one now (2 tokens), or a generate() that calls
        with torch.no_grad():  # the blocks without the root first would make a block a root of its own
            ids = torch.zeros(1, 2, dtype=torch.long, device=rt.device)
            model(ids, torch.ones_like(ids), torch.tensor([[False, True]], device=rt.device))
    model.train(trainable)
    return model, tokenizer


def load_reward_model(path: str, cfg: Config, rt: Runtime, trainable: bool = False, init_head: bool = False):
    """A sequence-classification model (num_labels = 1), sharded, wrapped as reward.RewardModel.
    init_head: the rm stage's start, the SFT model with a new score head (seeded)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = data.load_tokenizer(path)
    model, files, missing = load_pretrained(
        AutoModelForSequenceClassification,
        path,
        rt,
        weights_dtype(rt, trainable),
        seed=cfg.seed if init_head else None,
        num_labels=1,
    )
    if not init_head:  # the annotator must have a trained score head, not a random one
        require_reward_head(path, model, {"missing_keys": missing})
    model = shard_model(model, model, cfg, rt, trainable)
    if files:
        load_shards(model, "", files, rt)
    model.train(trainable)
    return RewardModel(model, tokenizer, max_len=cfg.rm_max_len, batch_size=max(1, cfg.micro_batch_size) * 4)


def copy_tree(source: Path, target: Path) -> None:
    """Copy a model directory atomically (a temporary copy renamed into place). Only for a stage's
    own unfinished output: a finished stage is never entered again."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def release_memory(*models: nn.Module) -> None:
    """Give back the memory of models the caller has just deleted (`del model` first: a model
    still referenced anywhere stays in memory) and the gathered weights of `models` (reshard),
    then the allocator's cache to the GPU."""
    for model in models:
        reshard(model)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def full_state_dict(model: torch.nn.Module, rt: Runtime) -> dict:
    """The whole model's state on CPU on every rank (collective under FSDP)."""
    if not rt.fsdp:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_hf(
    model: torch.nn.Module,
    hf_model,
    tokenizer,
    path: Path,
    cfg: Config,
    rt: Runtime,
    prefix: str = "",
    dtype: torch.dtype | None = None,
) -> None:
    """An HF safetensors checkpoint + tokenizer at `path`, loadable by from_pretrained and vLLM,
    written atomically (a temporary directory renamed into place), in `dtype` or else export_dtype's."""
    state = full_state_dict(model, rt)
    if rt.main:
        if dtype is None:
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
                cfg.export_dtype, torch.bfloat16 if rt.device.type == "cuda" else torch.float32
            )
        state = {k[len(prefix) :]: v.to(dtype) for k, v in state.items() if k.startswith(prefix)}
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        hf_model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    barrier(rt)


# ==============================================================================================
# Stages: directories, metrics, checkpoints


WANDB: list = []  # the Weights & Biases run (rank 0, --wandb_project), once started


def start_wandb(cfg: Config, rt: Runtime) -> None:
    """Optional experiment tracking: wandb is an extra, imported only when asked for; with
    WANDB_MODE=offline it writes locally and needs no network."""
    if not cfg.wandb_project or not rt.main:
        return
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb_project needs wandb, an optional extra: pip install wandb") from None
    WANDB.append(
        wandb.init(project=cfg.wandb_project, name=Path(cfg.out_dir).name, config=config_dict(cfg), dir=cfg.out_dir)
    )


class NonFiniteLoss(RuntimeError):
    """A non-finite loss or gradient; the last good checkpoint is kept."""


class NothingTrained(RuntimeError):
    """A stage that would end without a single optimizer step; nothing is marked done."""


# Keys a stage may be resumed with other values of: they change how it is saved, logged, evaluated
# or laid out in memory, not what it computes. Every other key must match the stage's config.json.
RESUME_HARMLESS = (
    "method",
    "save_every",
    "save_minutes",
    "keep_checkpoints",
    "micro_batch_size",
    "activation_checkpointing",
    "chunk_size",
    "deterministic",
    "gpu_memory_utilization",
    "vllm_max_model_len",
    "vllm_enforce_eager",
    "vllm_python",
    "dist_timeout_minutes",
    "eval_samples",
    "eval_prompts",
    "wandb_project",
)
PATH_KEYS = (
    "model",
    "out_dir",
    "dataset",
    "test_dataset",
    "sft_dataset",
    "sft_model",
    "reward_model",
    "policy",
    "reference",
)


def same_path(a: str, b: str) -> bool:
    """Two spellings of one file or directory (relative / absolute, links); hub ids by their text."""
    if a == b:
        return True
    try:
        return bool(a) and bool(b) and os.path.samefile(a, b)
    except OSError:
        return False


def resume_changes(saved: dict, cfg: Config) -> tuple[dict, dict]:
    """The keys whose value differs between a stage's saved config and `cfg`, as {key: (saved, now)}:
    (those that change the result, the harmless ones). A key the saved config lacks had its default."""
    defaults = config_dict(Config())
    result, harmless = {}, {}
    for key, now in config_dict(cfg).items():
        if key in ("preset", "resume"):
            continue
        before = saved.get(key, defaults[key])
        now = list(now) if isinstance(now, tuple) else now
        if before == now or (key in PATH_KEYS and same_path(str(before), str(now))):
            continue
        kto_batch = (
            key == "micro_batch_size" and cfg.method == "kto"
        )  # KTO's reference point comes from the micro-batch
        (harmless if (key in RESUME_HARMLESS and not kto_batch) or key == "out_dir" else result)[key] = (before, now)
    return result, harmless


def read_json(path: Path) -> dict:
    """A JSON record this program wrote (config.json, done.json); a damaged one is a clear error."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable ({err}); remove {path.parent} to run that stage again") from None


def write_json(path: Path, record: dict) -> None:
    """Write atomically: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


class Stage:
    """One stage's directory: config.json, metrics.jsonl, checkpoints/, model/, done.json."""

    def __init__(self, cfg: Config, rt: Runtime, name: str):
        self.cfg, self.rt, self.name = cfg, rt, name
        self.dir = Path(cfg.out_dir) / name
        self.checkpoints = self.dir / "checkpoints"
        self.model_dir = self.dir / "model"
        self.metrics_path = self.dir / "metrics.jsonl"
        self.metric_lines = 0
        self.last_save = time.time()  # for the save_minutes cadence

    @property
    def done(self) -> bool:
        return (self.dir / "done.json").exists()

    def start(self) -> Path | None:
        """Create the directory; return the checkpoint to resume from, if any. An unfinished stage
        is never overwritten silently: without --resume it is an error. With --resume, every key
        that changes the result must equal the stage's config.json; harmless changes are recorded
        there under "resumes", the values the stage started with stay."""
        latest = self.latest_checkpoint()
        begun = latest is not None or self.metrics_path.exists()
        if begun and not self.cfg.resume:
            raise ConfigError(
                f"{self.dir} holds an unfinished run; pass --resume to continue it, or remove the directory"
            )
        if self.cfg.resume and not begun:
            print0(self.rt, f"[{self.name}] --resume: nothing to resume in {self.dir}; the stage starts afresh")
        if latest is not None:
            latest = self.usable_checkpoint()
        record = {**config_dict(self.cfg), "stage": self.name}
        if begun and (self.dir / "config.json").exists():
            saved = read_json(self.dir / "config.json")
            changed, harmless = resume_changes(saved, self.cfg)
            if changed:
                lines = "\n".join(
                    f"  --{key}: {before} when it started, {now} now" for key, (before, now) in changed.items()
                )
                raise ConfigError(
                    f"--resume: {self.dir} started with other settings that change its result:\n{lines}\nResume with "
                    f"the values it started with (in {self.dir / 'config.json'}), or remove {self.dir} to start the "
                    "stage afresh with the new ones."
                )
            record = saved
            if harmless:
                record["resumes"] = saved.get("resumes", []) + [
                    {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": harmless}
                ]
                print0(
                    self.rt,
                    f"[{self.name}] resuming with "
                    + ", ".join(f"--{k}={now} (was {before})" for k, (before, now) in harmless.items()),
                )
        barrier(self.rt)
        if self.rt.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json(self.dir / "config.json", record)
        barrier(self.rt)
        if latest is None and self.rt.main:
            self.metrics_path.unlink(missing_ok=True)
        return latest

    def log(self, record: dict) -> None:
        if self.rt.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"stage": self.name, **record}) + "\n")
            if WANDB:  # a copy of the numbers; metrics.jsonl stays the record
                WANDB[0].log(
                    {
                        f"{self.name}/{k}": v
                        for k, v in record.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)
                    }
                )
        self.metric_lines += 1

    def checkpoint_dirs(self) -> list[Path]:
        """The stage's checkpoints, oldest first (not the .tmp of one being written, nor a .damaged one)."""
        if not self.checkpoints.exists():
            return []
        return sorted(p for p in self.checkpoints.glob("step-*") if p.is_dir() and re.fullmatch(r"step-\d+", p.name))

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoint_dirs()
        return found[-1] if found else None

    def usable_checkpoint(self) -> Path:
        """The newest checkpoint that is complete (checkpoint_problem): a damaged newer one (a full
        disk, a node lost while copying) is named in a warning and moved aside to <name>.damaged,
        so that it is neither used nor counted among the kept ones; none usable is a refusal that
        leaves everything as it is."""
        found = self.checkpoint_dirs()
        problems = [(path, checkpoint_problem(path)) for path in reversed(found)]
        usable = next((path for path, problem in problems if problem is None), None)
        if usable is None:
            reasons = "; ".join(f"{path.name}: {problem}" for path, problem in problems)
            raise ConfigError(
                f"--resume: no usable checkpoint in {self.checkpoints} ({reasons}); remove {self.dir} to start the "
                "stage afresh"
            )
        barrier(self.rt)  # every rank has judged them before any is moved
        for path, problem in problems:
            if path == usable:
                break
            print0(self.rt, f"[{self.name}] checkpoint {path} is damaged ({problem}): moved aside, using {usable.name}")
            if self.rt.main:
                shutil.rmtree(path.with_name(path.name + ".damaged"), ignore_errors=True)
                os.replace(path, path.with_name(path.name + ".damaged"))
        barrier(self.rt)
        return usable

    def save_checkpoint(self, step: int, model, optimizer, scheduler, state: dict) -> None:
        """Model + optimizer through torch.distributed.checkpoint (model=None: a state-only
        checkpoint, for phase boundaries where the model is an HF export already), the rest
        (position, scheduler, meta-learner, online pairs) as pickles; atomically, keeping the last
        N. Each rank also writes its RNG states and `state["rank_local"]` (what differs by rank,
        such as its share of the meta buffer) to rank<r>.pt."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.last_save = time.time()
        final = self.checkpoints / f"step-{step:08d}"
        tmp = self.checkpoints / f"step-{step:08d}.tmp"
        if self.rt.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.rt)
        if model is not None:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
        state = dict(state)
        torch.save({"rng": capture_rng(), "local": state.pop("rank_local", None)}, tmp / f"rank{self.rt.rank}.pt")
        if self.rt.main:
            torch.save(
                {
                    **state,
                    "has_model": model is not None,
                    "scheduler": scheduler.state_dict() if scheduler else None,
                    "metric_lines": self.metric_lines,
                },
                tmp / "state.pt",
            )
        barrier(self.rt)
        if self.rt.main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.checkpoint_dirs()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(self.rt)

    def load_checkpoint(self, path: Path, model, optimizer, scheduler) -> dict:
        """Restore model, optimizer, scheduler, RNG states and metrics.jsonl from a checkpoint
        (model=None, or a state-only checkpoint: everything but model and optimizer) and return its
        recorded state, with this rank's `rank_local`."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        state = torch.load(path / "state.pt", weights_only=False)
        if model is not None and state["has_model"]:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path))
            set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        rank_path = path / f"rank{self.rt.rank}.pt"  # absent when resuming on more ranks than saved
        rank_state = torch.load(rank_path if rank_path.exists() else path / "rank0.pt", weights_only=False)
        restore_rng(rank_state["rng"])
        state["rank_local"] = rank_state["local"] if rank_path.exists() else None
        # metrics written after this checkpoint belong to the lost part of the run
        self.metric_lines = state["metric_lines"]
        if self.rt.main and self.metrics_path.exists():
            lines = self.metrics_path.read_text().splitlines(keepends=True)[: self.metric_lines]
            self.metrics_path.write_text("".join(lines))
        print0(self.rt, f"[{self.name}] resumed from {path}")
        return state

    def finish(self, summary: dict) -> None:
        if self.rt.main:
            write_json(self.dir / "done.json", summary)
        barrier(self.rt)


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None: state.pt and every rank<r>.pt load; with a
    model, torch.distributed.checkpoint's .metadata loads and every file it names holds at least the
    bytes it points to (a truncated or missing shard shows here, before any rank reads it)."""
    for name in ["state.pt"] + sorted(p.name for p in path.glob("rank*.pt")):
        try:
            record = torch.load(path / name, weights_only=False)
        except Exception as err:  # missing, truncated, not a pickle: all mean the same here
            return f"{name} unreadable: {_short(err)}"
        if name == "state.pt":
            state = record
    if not (path / "rank0.pt").exists():
        return "rank0.pt missing"
    if state.get("has_model"):
        import torch.distributed.checkpoint as dcp

        try:
            metadata = dcp.FileSystemReader(str(path)).read_metadata()
        except Exception as err:
            return f".metadata unreadable: {_short(err)}"
        needed: dict[str, int] = {}
        for item in metadata.storage_data.values():
            needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
        for name, size in sorted(needed.items()):
            have = (path / name).stat().st_size if (path / name).exists() else None
            if have is None or have < size:
                return f"{name} {'missing' if have is None else f'truncated ({have} of {size} bytes)'}"
    return None


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ==============================================================================================
# The optimisation loop shared by every stage


def trainable_parameters(model: nn.Module) -> list:
    """The parameters an optimizer must hold: under FSDP2 the shards. A root's forward without
    gradients leaves its own parameters (embeddings, final norm, head) unsharded and registers the
    unsharded tensors on the module until the next backward; an optimizer built then would hold
    tensors that never get a gradient, so every FSDP module is resharded first."""
    reshard(model)
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model, lr: float, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the shards (trainable_parameters), created after sharding."""
    return torch.optim.AdamW(trainable_parameters(model), lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, total_steps: int, cfg: Config):
    """Linear warm-up over warmup_ratio of the steps, then cosine down to lr_floor * lr."""
    warmup = max(1, math.ceil(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def shuffled(items: list, seed: int) -> list:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order]


@dataclass
class Loop:
    """Where an optimisation pass is: restored from checkpoints, advanced by `optimize`."""

    step: int = 0  # optimizer steps of this stage so far
    batch: int = 0  # global batches done in the current pass


def optimize(
    stage: Stage,
    model,
    optimizer,
    scheduler,
    batches: list[list],
    loss_fn,
    loop: Loop,
    desc: str,
    save_state=None,
    after_step=None,
    log_extra: dict | None = None,
    sizes: list[float] | None = None,
    save_period: int = 0,
    before_batch=None,
) -> list[dict]:
    """Run the optimizer over `batches` (global batches, identical on every rank) from loop.batch.

    loss_fn(items, weights, batch_size, world) returns (loss to backward, dict of metric sums);
    batch_size is the global batch's size (pairs, or tokens when `sizes` says so); see
    accumulate_gradients. A checkpoint (save_state() with model and optimizer) is written every
    save_every steps of the pass (default: every tenth of it; `save_period`: every that many steps
    of the stage instead, for stages made of many short passes), once save_minutes have passed
    since the last, and after the step during which a stop signal came (then Stopped is raised).
    before_batch(batch), if given, runs on every rank before a global batch's micro-batches (KTO's
    reference point over the whole batch); after_step() after each optimizer step, its dict
    joining the step's record (the meta update). Returns the records logged for each step.
    """
    cfg, rt = stage.cfg, stage.rt
    bar = tqdm(
        total=len(batches),
        initial=loop.batch,
        desc=f"[{stage.name}] {desc}",
        disable=not rt.main,
        leave=False,
        dynamic_ncols=True,
    )
    records = []
    every = cfg.save_every or max(1, math.ceil(len(batches) / 10))
    sync_every_micro_batch = gradients_stay_sharded(cfg, rt, model)
    while loop.batch < len(batches):
        batch = batches[loop.batch]
        if before_batch is not None:
            before_batch(batch)
        size = sizes[loop.batch] if sizes is not None else len(batch)
        sums = accumulate_gradients(stage, model, batch, loss_fn, size, sync_every_micro_batch)
        metrics, stop, save_due = reduce_metrics(stage, sums)
        grad_norm = optimizer_step(stage, model, optimizer, scheduler, metrics.get("loss", 0.0), batch, loop, desc)
        record = {"step": loop.step, **(log_extra or {}), "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm}
        record.update(normalise_metrics(metrics))
        if after_step is not None:
            record.update(after_step() or {})
        stage.log(record)
        records.append(record)
        bar.set_postfix(loss=f"{record.get('loss', 0):.4f}")
        bar.update()
        cadence = loop.step % save_period == 0 if save_period else loop.batch % every == 0 and loop.batch < len(batches)
        if save_state is not None and (stop or save_due or cadence):
            stage.save_checkpoint(loop.step, model, optimizer, scheduler, save_state())
        if stop:
            bar.close()
            raise Stopped(
                f"[{stage.name}] stopped after step {loop.step} ({desc}, {loop.batch} of {len(batches)} batches)"
                + (
                    f"; checkpoint {stage.latest_checkpoint()}"
                    if save_state is not None
                    else "; no checkpoint (none is kept here)"
                )
            )
    bar.close()
    return records


def accumulate_gradients(stage: Stage, model, batch: list, loss_fn, size: float, sync_every_micro_batch: bool) -> dict:
    """Backward over this rank's strided share of a global batch, in micro-batches; a rank with
    fewer items runs zero-weighted padding so every rank does the same number of forwards.
    Gradients are reduced on the last micro-batch only, or on every one (grad_accumulation).
    Returns the summed metrics of this rank."""
    cfg, rt = stage.cfg, stage.rt
    micro = cfg.micro_batch_size
    share = batch[rt.rank :: rt.world]
    n_micro = math.ceil(math.ceil(len(batch) / rt.world) / micro)
    sums: dict[str, float] = {}
    for m in range(n_micro):
        items = share[m * micro : (m + 1) * micro]
        weights = [1.0] * len(items)
        if not items:  # padding: the same computation, weighted 0
            items, weights = [batch[0]], [0.0]
        if rt.fsdp:
            # reduce-scatter on the last micro-batch only (unsharded fp32 gradients kept until then), or on every
            # one (gradients stay sharded, at the cost of more communication): grad_accumulation decides
            model.set_requires_gradient_sync(sync_every_micro_batch or m == n_micro - 1)
        loss, metrics = loss_fn(items, torch.tensor(weights, device=rt.device), size, rt.world)
        loss.backward()
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return sums


def reduce_metrics(stage: Stage, sums: dict) -> tuple[dict, bool, bool]:
    """Every rank's metric sums added up; two flags ride on the same all-reduce: a stop signal on
    any rank, and rank 0's clock for save_minutes. Returns (metrics, stop, save due)."""
    cfg, rt = stage.cfg, stage.rt
    sums = {
        **sums,
        "_stop": float(bool(STOP_SIGNAL)),
        "_save": float(rt.main and cfg.save_minutes > 0 and time.time() - stage.last_save > 60 * cfg.save_minutes),
    }
    keys = sorted(sums)
    metrics = dict(zip(keys, all_reduce_sum(rt, torch.tensor([sums[k] for k in keys], dtype=torch.float64)).tolist()))
    return metrics, metrics.pop("_stop") > 0, metrics.pop("_save") > 0


def optimizer_step(
    stage: Stage, model, optimizer, scheduler, loss_value: float, batch: list, loop: Loop, desc: str
) -> float:
    """Clip the gradient norm, refuse a non-finite loss or gradient (nothing is saved: the last
    good checkpoint stays), step optimizer and schedule, advance `loop`; returns the norm."""
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], stage.cfg.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        rows = [getattr(item, "index", None) for item in batch[:8]]
        raise NonFiniteLoss(
            f"[{stage.name}] step {loop.step + 1} ({desc}, batch {loop.batch}, dataset rows {rows}...): loss "
            f"{loss_value}, gradient norm {grad_norm}; stopped without saving, the last good checkpoint is kept"
        )
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    loop.step += 1
    loop.batch += 1
    return grad_norm


# ==============================================================================================
# Stopping on SIGTERM / SIGINT: the current step finishes, a checkpoint is written, the run exits


class Stopped(Exception):
    """A signal asked the run to stop; the message says where and what was saved."""


STOP_SIGNAL: list[int] = []  # the signal that asked for a stop, once one came


def request_stop(signum, frame) -> None:
    """Signal handler: the first signal asks for a stop at the next safe point; a second one exits at once."""
    if STOP_SIGNAL:
        os._exit(128 + signum)
    STOP_SIGNAL.append(signum)
    if os.environ.get("RANK", "0") == "0":
        print(
            f"\ntrain.py: {signal.Signals(signum).name}: stopping after the current step or piece of work, keeping "
            "what is done (send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )


def check_stop(rt: Runtime, where: str) -> None:
    """Collective: raise Stopped when any rank got a stop signal. `where` says what a resume redoes."""
    if all_reduce_sum(rt, torch.tensor([float(bool(STOP_SIGNAL))])).item() > 0:
        raise Stopped(where)


PIECE = 256  # tuples (or prompts) per piece of phase-1 work: l_off scores, rewards


class Pieces:
    """Phase-1 work kept as it finishes, so that a stop signal costs seconds, not the phase: the
    work is cut into pieces (the l_off scores of PIECE tuples, one round of generate calls, the
    rewards of PIECE prompts' answers); each piece's result, once every rank has it, is written by
    rank 0 to <directory>/<name>-<k>.pt (atomically), and every rank checks for a stop signal
    before each piece. A rerun of the same phase (--resume) reads the finished pieces back and
    computes the rest: the phase is deterministic given its inputs (the iteration's policy and
    reference as exported, the seeds), so the result is the uninterrupted one. directory=None keeps
    nothing but still stops between pieces (evaluation)."""

    def __init__(self, directory: Path | None, rt: Runtime, where: str):
        self.directory, self.rt, self.where = directory, rt, where
        barrier(rt)  # pieces a previous run finished, the same list on every rank
        self.done = {p.stem for p in directory.glob("*.pt")} if directory and directory.exists() else set()

    def run(self, name: str, count: int, compute) -> list:
        """[compute(k) for k in range(count)], compute(k) being a collective that gives every rank
        the same result; finished pieces are read back instead of computed."""
        results = []
        for k in range(count):
            key = f"{name}-{k:05d}"
            if key in self.done:
                results.append(torch.load(self.directory / f"{key}.pt", weights_only=False))
                continue
            kept = f" ({name}: {k} of {count} pieces kept)" if self.directory else ""
            check_stop(self.rt, f"{self.where}{kept}")
            results.append(compute(k))
            if self.directory is not None and self.rt.main:
                self.directory.mkdir(parents=True, exist_ok=True)
                torch.save(results[-1], self.directory / f"{key}.tmp")
                os.replace(self.directory / f"{key}.tmp", self.directory / f"{key}.pt")
        return results

    def remove(self) -> None:
        """Once the phase's result is in a checkpoint, its pieces are not needed any more."""
        if self.directory is not None and self.rt.main:
            shutil.rmtree(self.directory, ignore_errors=True)
        barrier(self.rt)


def normalise_metrics(sums: dict) -> dict:
    """Metric sums -> means: `x_sum` / `x_count` becomes `x`; `loss` is already normalised."""
    out = {"loss": sums.get("loss", 0.0)}
    for key, value in sums.items():
        if key.endswith("_sum"):
            name = key[:-4]
            count = sums.get(name + "_count", 0.0)
            out[name] = value / count if count else float("nan")
    return out


def global_batches(items: list, batch_size: int) -> list[list]:
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def epoch_batches(items: list, epochs: int, batch_size: int, seed: int) -> list[list]:
    """Global batches of `epochs` passes over `items`, pass e shuffled with seed + e."""
    return [b for epoch in range(epochs) for b in global_batches(shuffled(items, seed + epoch), batch_size)]


def prepare_pass(stage: Stage, latest: Path | None, model, lr: float, steps: int, cfg: Config):
    """AdamW and its schedule over `steps`, restored with the model from `latest` when resuming;
    returns (optimizer, scheduler, loop)."""
    optimizer = make_optimizer(model, lr, cfg)
    scheduler = make_scheduler(optimizer, steps, cfg)
    loop = Loop(**stage.load_checkpoint(latest, model, optimizer, scheduler)["loop"]) if latest is not None else Loop()
    return optimizer, scheduler, loop


# ==============================================================================================
# Loss functions. Each gets this rank's micro-batch, per-item weights (0 = padding) and the
# size of the whole global batch, and returns the loss to backward plus metric sums. The loss is
# sum(item losses) * world / global size: FSDP averages gradients over ranks, so the gradient is
# that of the mean over the global batch, whatever the number of ranks.


OFFLINE_ROLES = ("chosen_ids", "rejected_ids")
ONLINE_ROLES = ("online_chosen_ids", "online_rejected_ids")
SPLIT_SAVING = 0.25  # the online pair gets a forward of its own when that pads at least this share fewer tokens


def padded_tokens(items: list, roles: tuple[str, ...]) -> int:
    """Tokens one forward of these answers of `items` runs on: every row padded to the longest."""
    return len(items) * len(roles) * max(len(p.prompt_ids) + len(getattr(p, role)) for p in items for role in roles)


def pair_forward(
    model, items: list, rt: Runtime, online: bool = False, extra_roles: tuple[str, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-prob sums and response lengths, (n_roles, B) each: rows chosen, rejected
    (, online chosen, online rejected) (, extra roles).

    One concatenated forward (the DPO repository's), so FSDP gathers each weight once, except
    that MetaAPO's online pair, the policy's own answers (often far shorter than the offline ones),
    gets a forward of its own when that pads at least SPLIT_SAVING fewer tokens. Measured with
    scripts/bench_tuple_forward.py on CPU: 4k-token offline and 1k-token online answers run
    forward and backward 1.37x faster in two forwards; at the toy's shapes, where two forwards
    pad 3% fewer tokens, one forward is as fast (0.97x)."""
    groups = [(items, online, extra_roles)]
    if online and all(p.online_chosen_ids is not None and p.online_rejected_ids is not None for p in items):
        split = padded_tokens(items, OFFLINE_ROLES) + padded_tokens(items, ONLINE_ROLES + extra_roles)
        if split <= (1 - SPLIT_SAVING) * padded_tokens(items, OFFLINE_ROLES + ONLINE_ROLES + extra_roles):
            as_pairs = [
                dataclasses.replace(p, chosen_ids=p.online_chosen_ids, rejected_ids=p.online_rejected_ids)
                for p in items
            ]
            groups = [(items, False, ()), (as_pairs, False, extra_roles)]
    logps, lengths = [], []
    for group, with_online, extra in groups:
        batch = data.collate_preferences(group, group[0].pad_id, online=with_online, extra_roles=extra)
        roles = batch.pop("n_roles")
        inputs = (batch[key].to(rt.device) for key in ("input_ids", "attention_mask", "response_mask"))
        logps.append(model(*inputs).view(roles, len(items)))
        lengths.append(batch["response_mask"][:, 1:].sum(-1).to(rt.device).float().view(roles, len(items)))
    return torch.cat(logps), torch.cat(lengths)


@dataclass
class PolicyPair(data.TokenizedPair):
    """A tokenized pair that knows its tokenizer's pad id (for collation), for keep_unsampled a
    fixed Eq. 5 weight, and for SELM an answer the policy gave itself."""

    pad_id: int = 0
    weight_override: float | None = None
    own_ids: list[int] | None = None


def objective_losses(
    cfg: Config, policy: torch.Tensor, ref: torch.Tensor | None, lengths: torch.Tensor, offset: int = 0
):
    """(L_pref, preference score l) of the pairs in rows offset, offset + 1 of (n_roles, B) log-probs:
    dpo / ipo with Eq. 4's score, simpo with Eq. A.9's."""
    chosen, rejected = policy[offset], policy[offset + 1]
    if cfg.objective == "simpo":
        chosen_mean, rejected_mean = chosen / lengths[offset].clamp(min=1), rejected / lengths[offset + 1].clamp(min=1)
        return (
            losses.simpo_loss(chosen_mean, rejected_mean, cfg.simpo_beta, cfg.simpo_gamma),
            losses.simpo_score(chosen_mean, rejected_mean, cfg.simpo_beta, cfg.simpo_gamma),
        )
    ref_chosen, ref_rejected = ref[offset], ref[offset + 1]
    if cfg.objective == "ipo":
        per_token = (lengths[offset], lengths[offset + 1]) if cfg.ipo_length_normalized else (None, None)
        out = losses.ipo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta, *per_token)
    else:
        out = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta, cfg.label_smoothing)
    return out, losses.preference_score(chosen, rejected, ref_chosen, ref_rejected, cfg.beta)


def meta_input_score(
    cfg: Config, score: torch.Tensor, policy: torch.Tensor, ref: torch.Tensor | None, offset: int = 0
) -> torch.Tensor:
    """h's input for the pairs in rows offset, offset + 1 (SPEC section 3): Eq. 4's score with
    meta_input_beta in place of beta (1.0 = the reference code's unscaled log sigmoid(Delta)).
    Under the default, and for simpo (Eq. A.9 already holds its beta), the score itself."""
    if cfg.objective == "simpo" or cfg.meta_input_beta in (0.0, cfg.beta):
        return score
    return losses.preference_score(
        policy[offset], policy[offset + 1], ref[offset], ref[offset + 1], cfg.meta_input_beta
    )


def pair_metrics(out: losses.PairLoss, weights: torch.Tensor, prefix: str = "") -> dict:
    n = weights.sum().item()
    return {
        f"{prefix}reward_accuracy_sum": ((out.chosen_rewards > out.rejected_rewards).float() * weights).sum().item(),
        f"{prefix}margin_sum": ((out.chosen_rewards - out.rejected_rewards) * weights).sum().item(),
        f"{prefix}reward_accuracy_count": n,
        f"{prefix}margin_count": n,
    }


def make_preference_loss(
    cfg: Config, method: str, policy, ref, rt: Runtime, kto_reference: dict | None = None, optimism: float = 0.0
):
    """The offline objectives on (chosen, rejected) pairs: dpo, ipo, simpo, slic, and kto
    (unpaired: chosen answers desirable, rejected ones undesirable; its reference point z0 is
    kto_reference["z0"], set per global batch by kto_reference_point). `optimism` > 0 adds SELM's
    term on each pair's own_ids."""
    extra = ("own_ids",) if optimism and ref is not None else ()

    def preference_loss(items, weights, batch_size, world):
        logps, lengths = pair_forward(policy, items, rt, extra_roles=extra)
        ref_logps = None
        if ref is not None:
            with torch.no_grad():
                ref_logps, _ = pair_forward(ref, items, rt, extra_roles=extra)
        if method in OBJECTIVES:  # dpo, ipo, simpo
            out = objective_losses(dataclasses.replace(cfg, objective=method), logps, ref_logps, lengths)[0]
        elif method == "slic":
            out = losses.slic_loss(
                logps[0], logps[1], cfg.slic_delta, cfg.slic_nll_weight, lengths[0] if cfg.slic_nll == "mean" else None
            )
        else:  # kto: every answer is one example, and the loss their mean (TRL's scaling)
            n = len(items)
            kto = losses.kto_loss(
                torch.cat([logps[0], logps[1]]),
                torch.cat([ref_logps[0], ref_logps[1]]),
                torch.arange(2 * n, device=rt.device) < n,
                kto_reference["z0"],
                cfg.beta,
                cfg.kto_desirable_weight,
                cfg.kto_undesirable_weight,
            )
            out = losses.PairLoss(
                (kto.losses[:n] + kto.losses[n:]) / 2, kto.chosen_rewards[:n], kto.rejected_rewards[n:]
            )
        if extra:
            out = out._replace(losses=out.losses + losses.selm_optimism(logps[2], ref_logps[2], optimism, cfg.beta))
        total = (out.losses * weights).sum()
        return total * world / batch_size, {"loss": total.item() / batch_size, **pair_metrics(out, weights)}

    return preference_loss


@torch.no_grad()
def kto_reference_point(batch: list, policy, ref, cfg: Config, rt: Runtime) -> torch.Tensor:
    """KTO's z0 for one global batch (collective): the mean of log pi(y|x) - log pi_ref(y|x) over
    every answer of the batch paired with another example's prompt, TRL's (x_i, y_(i-1)) over the
    examples [chosen..., rejected...], so never with its own prompt; clamped at 0. A batch of one
    pair has no other prompt: z0 = 0 there."""
    examples = [(p.prompt_ids, p.chosen_ids) for p in batch] + [(p.prompt_ids, p.rejected_ids) for p in batch]
    if len(batch) < 2:
        return torch.zeros((), device=rt.device)
    mismatched = [(examples[j][0], examples[j - 1][1]) for j in range(len(examples))]
    share = mismatched[rt.rank :: rt.world]
    rounds = math.ceil(len(mismatched) / rt.world)
    chunk = max(1, cfg.micro_batch_size) * 2
    policy_logps, ref_logps, weights = [], [], []
    for start in range(0, rounds, chunk):  # the same number of forwards on every rank (padding weighted 0)
        part = share[start : start + chunk]
        weights.append(
            torch.tensor([1.0] * len(part) + [0.0] * (min(chunk, rounds - start) - len(part)), device=rt.device)
        )
        part = part + [mismatched[0]] * (len(weights[-1]) - len(part))
        tensors = data.collate_sequences([x for x, _ in part], [y for _, y in part], batch[0].pad_id)
        inputs = [tensors[k].to(rt.device) for k in ("input_ids", "attention_mask", "response_mask")]
        policy_logps.append(policy(*inputs))
        ref_logps.append(ref(*inputs))
    return losses.kto_reference_kl(
        torch.cat(policy_logps), torch.cat(ref_logps), torch.cat(weights), lambda totals: all_reduce_sum(rt, totals)
    )


# ==============================================================================================
# Data helpers


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


def load_heldout(cfg: Config, purpose: str) -> tuple[list[data.PreferencePair], tuple[str, str | None]]:
    """The held-out pairs (skip_bad_rows applies) and where they came from."""
    source = require_test_source(cfg, purpose)
    return data.load_preferences(*source, cfg.skip_bad_rows)[0], source


def load_pairs(
    cfg: Config, rt: Runtime, tokenizer, source: tuple[str, str | None], max_len: int | None = None, limit: int = 0
):
    """(tokenized pairs, raw pairs) of one (source, split); tokenized[i].index points into raw.
    limit > 0: only the first `limit` usable pairs are tokenized and returned. No usable pair at
    all is an error: a stage would train nothing."""
    raw, load_stats = data.load_preferences(*source, cfg.skip_bad_rows)
    tokenized, stats = data.tokenize_preferences(raw, tokenizer, cfg.max_prompt_len, max_len or cfg.max_len, limit)
    read = f" (the first {limit} usable pairs: --max_train_pairs)" if limit and len(tokenized) == limit else ""
    print0(rt, f"data {describe(source)}: {load_stats.summary()}; tokenized{read}: {stats.summary()}")
    if not tokenized:
        raise data.DataError(f"{describe(source)}: no usable preference pair after tokenization ({stats.summary()})")
    return [PolicyPair(**dataclasses.asdict(t), pad_id=tokenizer.pad_token_id) for t in tokenized], raw


def train_pairs(cfg: Config, rt: Runtime, tokenizer, max_len: int | None = None):
    """The training pairs: every usable pair of the training data, or its first max_train_pairs."""
    return load_pairs(cfg, rt, tokenizer, train_source(cfg), max_len, limit=cfg.max_train_pairs)


# ==============================================================================================
# Stage paths


def sft_path(cfg: Config) -> str:
    return cfg.sft_model or (str(Path(cfg.out_dir) / "sft" / "model") if cfg.init_from_config else cfg.model)


def reward_path(cfg: Config) -> str:
    return cfg.reward_model or str(Path(cfg.out_dir) / "rm" / "model")


def warm_policy_path(cfg: Config) -> str:
    return cfg.policy or str(Path(cfg.out_dir) / "dpo" / "model")


def reference_path(cfg: Config) -> str:
    return cfg.reference or sft_path(cfg)


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
        models = [policy, reward] + ([] if cfg.objective in ("simpo", "slic") else [reference])
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
    metaapo-sampling_random, online_dpo-objective_simpo or stage-objective_slic-schedule_off-on."""
    switches = {
        "metaapo": (
            "sampling",
            "weighting",
            "keep_unsampled",
            "meta_depth",
            "meta_inputs",
            "meta_input_beta",
            "objective",
        ),
        "online_dpo": ("objective",),
        "selm": ("objective",),
        "stage": ("objective", "schedule"),
    }.get(method, ())
    defaults = Config()
    return "-".join(
        [method]
        + [
            f"{key}_{str(getattr(cfg, key)).replace(',', '-')}"
            for key in switches
            if getattr(cfg, key) != getattr(defaults, key)
        ]
    )


# ==============================================================================================
# SFT and reward model


def run_sft(cfg: Config, rt: Runtime) -> dict:
    """Supervised fine-tuning: mean NLL of the response tokens of each global batch."""
    started = time.time()
    examples, load_stats = data.load_sft(cfg.sft_dataset, None, cfg.skip_bad_rows)
    tokenized, stats = data.tokenize_sft(examples, data.load_tokenizer(cfg.model), cfg.max_prompt_len, cfg.max_len)
    print0(rt, f"[sft] {cfg.sft_dataset}: {load_stats.summary()}; tokenized: {stats.summary()}")
    if not tokenized:
        raise data.DataError(f"{cfg.sft_dataset}: no usable SFT example after tokenization ({stats.summary()})")
    stage = Stage(cfg, rt, "sft")
    latest = stage.start()
    model, tokenizer = load_logprob_model(cfg.model, cfg, rt, trainable=True, from_config=cfg.init_from_config)
    batches = epoch_batches(tokenized, cfg.sft_epochs, cfg.sft_batch_size, cfg.seed * 1000)
    optimizer, scheduler, loop = prepare_pass(stage, latest, model, cfg.sft_lr, len(batches), cfg)

    def sft_loss(items, weights, n_tokens, world):
        batch = data.collate_sft(items, tokenizer.pad_token_id)
        logps = model(
            batch["input_ids"].to(rt.device),
            batch["attention_mask"].to(rt.device),
            batch["response_mask"].to(rt.device),
        )
        total = -(logps * weights).sum()
        return total * world / n_tokens, {"loss": total.item() / n_tokens}

    tokens = [sum(len(e.response_ids) for e in b) for b in batches]  # the loss is a mean over a global batch's tokens
    optimize(
        stage,
        model,
        optimizer,
        scheduler,
        batches,
        sft_loss,
        loop,
        f"{cfg.sft_epochs} epochs",
        lambda: {"loop": vars(loop).copy()},
        sizes=tokens,
    )
    export_hf(model, model.lm, tokenizer, stage.model_dir, cfg, rt, prefix="lm.")
    summary = {"train_time_s": time.time() - started, "steps": loop.step}
    stage.finish(summary)
    return summary


def run_rm(cfg: Config, rt: Runtime) -> dict:
    """Bradley-Terry reward model (Eq. 1) from the SFT model, one epoch over the offline pairs."""
    started = time.time()
    pairs, _ = train_pairs(cfg, rt, data.load_tokenizer(sft_path(cfg)), max_len=min(cfg.max_len, cfg.rm_max_len))
    stage = Stage(cfg, rt, "rm")
    latest = stage.start()
    rm = load_reward_model(sft_path(cfg), cfg, rt, trainable=True, init_head=True)
    batches = epoch_batches(pairs, 1, cfg.rm_batch_size, cfg.seed)
    optimizer, scheduler, loop = prepare_pass(stage, latest, rm.model, cfg.rm_lr, len(batches), cfg)

    def rm_loss(items, weights, batch_size, world):
        batch = data.collate_preferences(items, rm.tokenizer.pad_token_id)
        rewards = (
            rm.model(input_ids=batch["input_ids"].to(rt.device), attention_mask=batch["attention_mask"].to(rt.device))
            .logits[:, 0]
            .float()
        )
        out = losses.bradley_terry_loss(rewards[: len(items)], rewards[len(items) :])
        total = (out.losses * weights).sum()
        return total * world / batch_size, {"loss": total.item() / batch_size, **pair_metrics(out, weights)}

    optimize(
        stage,
        rm.model,
        optimizer,
        scheduler,
        batches,
        rm_loss,
        loop,
        f"{len(pairs)} pairs",
        lambda: {"loop": vars(loop).copy()},
    )
    export_hf(rm.model, rm.model, rm.tokenizer, stage.model_dir, cfg, rt)
    summary = {"train_time_s": time.time() - started, "steps": loop.step, "test_accuracy": None}
    if test_source(cfg) is None:
        print0(
            rt,
            f"[rm] no held-out pairs (--dataset={cfg.dataset} has no {cfg.test_split} split; a single file is training "
            "data only): no accuracy measured; pass --test_dataset for one",
        )
    else:
        test, source = load_heldout(cfg, "the reward model's accuracy")
        summary.update(test_accuracy=reward_accuracy(rm, test), test_pairs=len(test), test_source=describe(source))
        stage.log({"phase": "eval", **{k: summary[k] for k in ("test_accuracy", "test_pairs", "test_source")}})
        print0(
            rt,
            f"[rm] preference accuracy on the {len(test)} held-out pairs of {describe(source)}: "
            f"{summary['test_accuracy']:.3f}",
        )
    stage.finish(summary)
    return summary


def reward_accuracy(rm: RewardModel, pairs: list[data.PreferencePair]) -> float:
    """Fraction of pairs whose chosen answer gets the higher reward."""
    chosen = rm.score([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = rm.score([p.prompt for p in pairs], [p.rejected for p in pairs])
    return sum(c > r for c, r in zip(chosen, rejected)) / max(1, len(pairs))


# ==============================================================================================
# Offline preference methods


def run_offline(
    cfg: Config,
    rt: Runtime,
    method: str,
    name: str | None = None,
    keep=None,
    shuffle: bool = True,
    validate: list | None = None,
) -> dict:
    """One pass (per epoch) of an offline objective over the offline pairs, from the SFT model,
    with the SFT model as the reference (none for simpo and slic). `keep(pairs)` filters them;
    shuffle=False keeps their order (Selective DPO's easy-to-hard curriculum). `validate`: held-out
    pairs whose DPO losses are written to <stage>/validation.json at selective_checkpoints evenly
    spaced steps (Selective DPO's reference runs)."""
    started = time.time()
    pairs, _ = train_pairs(cfg, rt, data.load_tokenizer(sft_path(cfg)))
    if keep is not None:
        pairs = keep(pairs)
    stage = Stage(cfg, rt, name or method)
    latest = stage.start()
    policy, tokenizer = load_logprob_model(sft_path(cfg), cfg, rt, trainable=True)
    ref = None if method in ("simpo", "slic") else load_logprob_model(reference_path(cfg), cfg, rt, trainable=False)[0]
    batches = (
        epoch_batches(pairs, cfg.epochs, cfg.batch_size, cfg.seed * 1000)
        if shuffle
        else global_batches(pairs * cfg.epochs, cfg.batch_size)
    )
    optimizer, scheduler, loop = prepare_pass(stage, latest, policy, cfg.lr, len(batches), cfg)
    kto = {"z0": None}  # KTO's reference point, set per global batch
    before_batch = (
        (lambda batch: kto.update(z0=kto_reference_point(batch, policy, ref, cfg, rt))) if method == "kto" else None
    )
    after_step = None
    if validate:
        checkpoints = {
            math.ceil(len(batches) * (j + 1) / cfg.selective_checkpoints) for j in range(cfg.selective_checkpoints)
        }
        path = stage.dir / "validation.json"

        # collective: every rank scores, rank 0 writes; a step written before a resume is not scored again
        def after_step():
            done = json.loads(path.read_text()) if path.exists() else {}
            if loop.step in checkpoints and str(loop.step) not in done:
                scores = pair_scores(policy, ref, validate, dataclasses.replace(cfg, objective="dpo"), rt)
                if rt.main:
                    write_json(
                        path, {**done, str(loop.step): {str(p.index): -score[0] for p, score in zip(validate, scores)}}
                    )
                barrier(rt)
            return {}

    optimize(
        stage,
        policy,
        optimizer,
        scheduler,
        batches,
        make_preference_loss(cfg, method, policy, ref, rt, kto),
        loop,
        f"{len(pairs)} pairs",
        lambda: {"loop": vars(loop).copy()},
        after_step,
        before_batch=before_batch,
    )
    export_hf(policy, policy.lm, tokenizer, stage.model_dir, cfg, rt, prefix="lm.")
    summary = {"train_time_s": time.time() - started, "steps": loop.step, "pairs": len(pairs)}
    stage.finish(summary)
    return summary


@torch.no_grad()
def pair_scores(policy, ref, items: list, cfg: Config, rt: Runtime) -> list[tuple[float, float, float, float]]:
    """(l, h's input score, chosen log-ratio, rejected log-ratio) of every pair, on every rank. Each rank scores a
    strided share, padded to equal length so that sharded models run the same forwards, in
    forwards of 4 micro-batches (no gradients, so no activations kept)."""
    chunk = max(1, cfg.micro_batch_size) * 4
    share = list(range(rt.rank, len(items), rt.world))
    padded = share + [share[0] if share else 0] * (math.ceil(len(items) / rt.world) - len(share))
    results = []
    for start in range(0, len(padded), chunk):
        batch = [items[i] for i in padded[start : start + chunk]]
        logps, lengths = pair_forward(policy, batch, rt)
        ref_logps = pair_forward(ref, batch, rt)[0] if ref is not None else torch.zeros_like(logps)
        score = objective_losses(cfg, logps, ref_logps, lengths)[1]
        ratios = logps - ref_logps
        results += list(
            zip(
                score.tolist(),
                meta_input_score(cfg, score, logps, ref_logps).tolist(),
                ratios[0].tolist(),
                ratios[1].tolist(),
            )
        )
    merged = {}
    for part in all_gather_objects(rt, list(zip(share, results))):
        merged.update(part)
    return [merged[i] for i in range(len(items))]


def run_selective_dpo(cfg: Config, rt: Runtime) -> dict:
    """Selective DPO (Gao et al. 2025, as `glorgao/SelectiveDPO` runs it): for each of
    selective_seeds random halvings of the pairs, a DPO run from the SFT model on each half whose
    model scores the other half's DPO loss at selective_checkpoints evenly spaced steps; each
    pair's difficulty is its mean over seeds and checkpoints; the keep_ratio easiest pairs are
    kept, and the final DPO run trains on them from the SFT model in ascending order of
    difficulty, easy to hard, without shuffling. (The original's reference runs are LoRA runs;
    here they are full ones, like every stage of this project.)"""
    started = time.time()
    pairs, _ = train_pairs(cfg, rt, data.load_tokenizer(sft_path(cfg)))
    difficulty: dict[int, list[float]] = {p.index: [] for p in pairs}
    for s in range(cfg.selective_seeds):
        order = shuffled(list(range(len(pairs))), cfg.seed + 17 + s)
        halves = [sorted(order[0::2]), sorted(order[1::2])]
        for k in (0, 1):  # half k trains, the other half is scored
            name = f"selective_dpo/seed{s}-half{k}"
            if not Stage(cfg, rt, name).done:
                run_offline(
                    cfg,
                    rt,
                    "dpo",
                    name,
                    keep=lambda ps, mine=halves[k]: [ps[i] for i in mine],
                    validate=[pairs[i] for i in halves[1 - k]],
                )
                release_memory()
            for losses_at_step in read_json(Path(cfg.out_dir) / name / "validation.json").values():
                for index, value in losses_at_step.items():
                    difficulty[int(index)].append(value)
    mean = {index: float(np.mean(values)) for index, values in difficulty.items()}
    easiest = sorted(pairs, key=lambda p: mean[p.index])[
        : max(1, round(cfg.keep_ratio * len(pairs)))
    ]  # ascending: easy to hard
    print0(
        rt,
        f"[selective_dpo] keeping the {len(easiest)} easiest of {len(pairs)} pairs (mean DPO loss under the models "
        f"that did not see them, {cfg.selective_seeds} seeds x {cfg.selective_checkpoints} checkpoints), trained easy "
        "to hard",
    )
    if not Stage(cfg, rt, "selective_dpo/final").done:
        run_offline(cfg, rt, "dpo", "selective_dpo/final", keep=lambda ps: easiest, shuffle=False)
    out = Path(cfg.out_dir) / "selective_dpo"
    summary = {"train_time_s": time.time() - started, "kept": len(easiest)}
    if rt.main:
        copy_tree(out / "final" / "model", out / "model")
        write_json(out / "done.json", summary)
    barrier(rt)
    return summary


# ==============================================================================================
# Algorithm 1 (metaapo) and the online / hybrid baselines in the same iteration structure


def iteration_paths(cfg: Config, stage: Stage, method: str, t: int) -> tuple[str, str | None]:
    """(policy at the start of iteration t, its reference); t counts from 0.

    metaapo, adpo: the reference lags one iteration, as in the reference implementation:
    iteration 1 uses the SFT model, iteration 2 the warm-up policy, iteration 3 the output of
    iteration 1. online_dpo, selm: the reference is the policy at the start of the iteration.
    Both are always read from disk, so a resumed run sees exactly what an uninterrupted one saw.
    """
    starts = [warm_policy_path(cfg)] + [str(stage.dir / f"iter{i}" / "model") for i in range(1, cfg.iterations + 1)]
    if cfg.objective in ("simpo", "slic"):  # objectives without a reference model
        return starts[t], None
    if method in ("metaapo", "adpo"):
        return starts[t], reference_path(cfg) if t == 0 else starts[t - 1]
    return starts[t], starts[t]


def distributed_generate(
    policy,
    tokenizer,
    prompts: list[list[int]],
    model_path: str,
    n: int,
    cfg: Config,
    rt: Runtime,
    seed: int,
    workdir: Path,
    backend: str | None = None,
    pieces: Pieces | None = None,
    name: str = "generation",
):
    """n responses per prompt, on every rank: vLLM workers on the exported policy, or the
    sharded policy's own `generate`. There the prompts are cut into batches of gen_batch_size,
    batch k sampled with seed + k by rank k % world (in lockstep, synced_gpus), so the answers do
    not depend on the number of ranks; each round (one batch per rank) is a piece of `pieces`
    (`name`), kept as it finishes. A stop signal ends it between rounds, or terminates the vLLM
    workers (which keep their finished chunks): Stopped, naming where."""
    pieces = pieces or Pieces(None, rt, "stopped while generating")
    backend = backend or cfg.generator
    if backend == "vllm":
        # the child's start-up check needs gpu_memory_utilization x total free: nothing gathered, nothing cached
        release_memory(policy)
        try:
            return generate(
                prompts,
                n,
                cfg.temperature,
                cfg.top_p,
                cfg.max_new_tokens,
                seed,
                backend="vllm",
                model_path=model_path,
                workdir=workdir / "vllm",
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                max_model_len=cfg.vllm_max_model_len,
                enforce_eager=cfg.vllm_enforce_eager,
                group=rt.objects,
                vllm_python=cfg.vllm_python,
                should_stop=lambda: bool(STOP_SIGNAL),
            )
        except GenerationStopped as err:
            raise Stopped(f"{pieces.where} ({name}: {err})") from None
    batches = list(range(math.ceil(len(prompts) / cfg.gen_batch_size)))
    mine = batches[rt.rank :: rt.world]

    def one_round(r: int) -> dict:  # every rank generates one batch (or repeats one, unused); all get every batch
        k = mine[r] if r < len(mine) else batches[0]
        out = generate(
            prompts[k * cfg.gen_batch_size : (k + 1) * cfg.gen_batch_size],
            n,
            cfg.temperature,
            cfg.top_p,
            cfg.max_new_tokens,
            seed + k,
            model=policy.lm,
            tokenizer=tokenizer,
            batch_size=cfg.gen_batch_size,
            synced_gpus=rt.world > 1,
        )
        return {b: o for part in all_gather_objects(rt, {k: out} if r < len(mine) else {}) for b, o in part.items()}

    if rt.fsdp:
        policy.unshard()  # the root's own weights (embeddings, final norm, head) are shards outside its forward
    rounds = pieces.run(name, math.ceil(len(batches) / rt.world), one_round)  # the same number on every rank
    if rt.fsdp:
        policy.reshard()
    merged = {k: out for done in rounds for k, out in done.items()}
    return [generation for k in batches for generation in merged[k]]


def select_for_generation(
    cfg: Config,
    method: str,
    meta: MetaController | None,
    offline_scores: torch.Tensor | None,
    features: torch.Tensor | None,
    n: int,
    boundary: dict | None = None,
) -> tuple[list[bool], list[float]]:
    """Algorithm 1 lines 7-12: which of the n offline tuples get online responses, and their weights w."""
    if method == "metaapo":
        decision = meta.gate(offline_scores, features)  # w = h(l_off), u ~ U(0, 1), generate when u > w
        return decision.selected.tolist(), decision.weights.tolist()
    if method == "adpo":  # the tuples whose DPO loss -l_off is below a fixed threshold
        return [-score < cfg.adpo_threshold for score in offline_scores.tolist()], []
    if method == "stage":  # every prompt in a fine-tuning (on-policy) iteration, none in an injection (static) one
        return [boundary["choice"] == "on-policy"] * n, []
    return [True] * n, []  # online_dpo, selm: every prompt


def boundary_score(own: list[list[float]], static: list[list[float]]) -> tuple[float, int, int, int]:
    """Seed 004's boundary score from reward-model scores, per prompt its on-policy answers' and its
    static answers': every on-policy answer is compared with every static answer of its prompt,
    P(a > b) = sigmoid(r(a) - r(b)) read as a vote for the higher reward; BS = the share of votes
    the on-policy answers win, a tie counting half. Returns (BS, wins, ties, comparisons)."""
    wins = ties = comparisons = 0
    for mine, theirs in zip(own, static):
        for a in mine:
            for b in theirs:
                wins, ties, comparisons = wins + (a > b), ties + (a == b), comparisons + 1
    return (wins + 0.5 * ties) / max(1, comparisons), wins, ties, comparisons


def boundary_measurement(
    cfg: Config,
    rt: Runtime,
    policy,
    tokenizer,
    policy_path: str,
    chunk: list,
    raw: list,
    stage: Stage,
    t: int,
    pieces: Pieces,
) -> dict:
    """Seed 004's alignment-stage boundary, measured before iteration t on the first probe_ratio of
    its (shuffled) prompts: probe_samples answers of the current policy per prompt, each compared
    with each static answer (the pair's chosen and rejected) by the reward model; the boundary
    score BS is the share of comparisons the on-policy answers win (ties count half). BS >=
    stage_threshold: the fine-tuning stage, train on on-policy pairs; below: the injection stage,
    train on the static pairs. --schedule overrides the choice (BS is still measured and logged).
    Its generation and scores are pieces of the iteration's phase 1 (`pieces`)."""
    tic = time.time()
    probe = chunk[: max(1, math.ceil(cfg.probe_ratio * len(chunk)))]
    generations = distributed_generate(
        policy,
        tokenizer,
        [p.prompt_ids for p in probe],
        policy_path,
        cfg.probe_samples,
        cfg,
        rt,
        cfg.seed * 1000 + 500 + t,
        stage.dir,
        pieces=pieces,
        name="boundary-generation",
    )
    statics = [(raw[p.index].chosen, raw[p.index].rejected) for p in probe]

    def score_probe(_: int) -> list[float]:
        rm = load_reward_model(reward_path(cfg), cfg, rt)
        return rm.score(
            [raw[p.index].prompt for p, answers in zip(probe, generations) for _ in range(len(answers) + 2)],
            [text for answers, pair in zip(generations, statics) for text in [a.text for a in answers] + list(pair)],
            [done for answers in generations for done in [a.finish_reason == "stop" for a in answers] + [True, True]],
        )

    (rewards,) = pieces.run("boundary-rewards", 1, score_probe)
    group = cfg.probe_samples + 2  # each prompt's on-policy answers, then its 2 static ones
    score, wins, ties, comparisons = boundary_score(
        [rewards[i : i + cfg.probe_samples] for i in range(0, len(rewards), group)],
        [rewards[i + cfg.probe_samples : i + group] for i in range(0, len(rewards), group)],
    )
    schedule = cfg.schedule.split(",") if cfg.schedule else None
    on_policy = schedule[t] == "on" if schedule else score >= cfg.stage_threshold
    record = {
        "boundary_score": score,
        "wins": wins,
        "ties": ties,
        "losses": comparisons - wins - ties,
        "probe_prompts": len(probe),
        "annotations": len(rewards),
        "choice": "on-policy" if on_policy else "static",
        "by": "schedule" if schedule else "boundary score",
        "time_s": time.time() - tic,
    }
    stage.log({"iteration": t + 1, "phase": "boundary", **record})
    print0(
        rt,
        f"[{stage.name}] iteration {t + 1}: boundary score {score:.3f} ({wins} wins, {ties} ties in {comparisons}) -> "
        f"{record['choice']} data ({record['by']})",
    )
    return record


def build_augmented(
    cfg: Config,
    method: str,
    chunk: list[PolicyPair],
    chosen: list[int],
    pairs,
    selected: list[bool],
    own: list[list[int]] | None = None,
) -> list[PolicyPair]:
    """D_aug: each selected tuple joined with its online pair (tuples whose K rewards all tied have
    none and are dropped); keep_unsampled adds the unselected offline tuples with weight 1.
    online_dpo and selm train on the online pairs alone, adpo on the chunk's offline pairs plus the
    online pairs: for them the online pair takes the place of (chosen, rejected). `own`: per
    selected tuple an answer of the policy's own, for SELM's optimism term."""
    augmented = []
    for j, (i, pair) in enumerate(zip(chosen, pairs)):
        if pair is not None:
            room = cfg.max_len - len(chunk[i].prompt_ids)  # online answers obey max_len like offline ones
            augmented.append(
                dataclasses.replace(
                    chunk[i],
                    online_chosen_ids=pair.chosen.token_ids[:room],
                    online_rejected_ids=pair.rejected.token_ids[:room],
                    own_ids=own[j][:room] if own else None,
                )
            )
    if method in ("online_dpo", "selm", "adpo", "stage"):
        online = [
            dataclasses.replace(
                a,
                chosen_ids=a.online_chosen_ids,
                rejected_ids=a.online_rejected_ids,
                online_chosen_ids=None,
                online_rejected_ids=None,
            )
            for a in augmented
        ]
        if (
            method == "stage"
        ):  # on-policy pairs in a fine-tuning iteration, the chunk's static pairs in an injection one
            return online if any(selected) else list(chunk)
        return list(chunk) + online if method == "adpo" else online
    if method == "metaapo" and cfg.keep_unsampled:
        augmented += [
            dataclasses.replace(
                chunk[i],
                online_chosen_ids=chunk[i].chosen_ids,
                online_rejected_ids=chunk[i].rejected_ids,
                weight_override=1.0,
            )
            for i, s in enumerate(selected)
            if not s
        ]
    return augmented


def make_iterative_loss(cfg: Config, method: str, policy, ref, meta: MetaController | None, rt: Runtime):
    """The micro-batch loss of phase 2 and what happens after each policy step (the meta buffer).
    online_dpo, selm and adpo: the plain objective on the pairs build_augmented made."""
    if method != "metaapo":
        return make_preference_loss(
            cfg, cfg.objective, policy, ref, rt, optimism=cfg.selm_alpha if method == "selm" else 0.0
        ), None
    step_scores: dict[str, list] = {"offline": [], "online": [], "features": []}

    def iterative_loss(items, weights, batch_size, world):
        logps, lengths = pair_forward(
            policy, items, rt, online=True
        )  # (4, B): chosen, rejected, online chosen, online rejected
        ref_logps = None
        if ref is not None:
            with torch.no_grad():
                ref_logps = pair_forward(ref, items, rt, online=True)[0]
        online_out, online_score = objective_losses(cfg, logps, ref_logps, lengths, offset=2)
        offline_out, offline_score = objective_losses(cfg, logps, ref_logps, lengths, offset=0)
        ratios = (logps - ref_logps) if ref_logps is not None else logps
        features = meta_features(
            meta_input_score(cfg, offline_score, logps, ref_logps), ratios[0], ratios[1], inputs=cfg.meta_inputs
        )
        w = meta.loss_weights(features)  # Alg. 1 line 16: w = h(l_off) with the current theta, a constant in Eq. 5
        fixed = torch.tensor(
            [-1.0 if item.weight_override is None else item.weight_override for item in items], device=w.device
        )
        w = torch.where(fixed >= 0, fixed, w)
        total = (
            losses.meta_weighted_loss(offline_out.losses, online_out.losses, w) * weights
        ).sum()  # Alg. 1 line 17: Eq. 5
        buffered = (weights > 0) & (fixed < 0)  # real tuples with a real online pair
        step_scores["offline"].append(offline_score.detach()[buffered].cpu())
        step_scores["online"].append(online_score.detach()[buffered].cpu())
        step_scores["features"].append(features[buffered].cpu())
        n = weights.sum().item()
        return total * world / batch_size, {
            "loss": total.item() / batch_size,
            **pair_metrics(offline_out, weights),
            **pair_metrics(online_out, weights, "online_"),
            "l_off_sum": (offline_score.detach() * weights).sum().item(),
            "l_off_count": n,
            "l_on_sum": (online_score.detach() * weights).sum().item(),
            "l_on_count": n,
            "w_sum": (w * weights).sum().item(),
            "w_count": n,
        }

    def after_step():
        # Alg. 1 line 18: this step's detached (l_off, l_on) go to the meta buffer
        meta.buffer.append(
            torch.cat(step_scores["offline"]), torch.cat(step_scores["online"]), torch.cat(step_scores["features"])
        )
        for scores in step_scores.values():
            scores.clear()
        # Alg. 1 lines 19-21: every T_meta policy steps, theta frozen, phi updated on the buffer (Eq. 6), buffer cleared
        if meta.ready():
            return meta.update()
        return {}

    return iterative_loss, after_step


@dataclass
class IterationState:
    """What a checkpoint of an iterative method records besides model and optimizer."""

    iteration: int = 0  # 0-based iteration in progress
    loop: dict = field(default_factory=lambda: vars(Loop()))  # position in phase 2
    augmented: list | None = None  # D_aug of this iteration, once phase 1 is done
    meta: dict | None = None  # MetaController.state_dict()
    times: dict = field(default_factory=lambda: {"sampling_s": 0.0, "training_s": 0.0})
    ratios: list = field(default_factory=list)  # annotation ratio per iteration


def iteration_pass(policy, augmented: list, t: int, cfg: Config):
    """Phase 2's global batches over D_aug and its AdamW and schedule, fresh each iteration as in
    the reference implementation: (batches, optimizer, scheduler)."""
    batches = epoch_batches(augmented, cfg.epochs, cfg.batch_size, cfg.seed * 1000 + t * 10)
    optimizer = make_optimizer(policy, cfg.lr, cfg)
    return batches, optimizer, make_scheduler(optimizer, len(batches), cfg)


def run_iterative(cfg: Config, rt: Runtime, method: str) -> dict:
    """Algorithm 1 for metaapo; online_dpo, selm, adpo and stage in the same iteration structure.
    The bookkeeping (data, meta-learner, checkpoints, where a resumed run stopped) is IterativeRun's."""
    run = IterativeRun(cfg, rt, method)  # D_off cut into D_1..D_T (line 2), h_phi, and a resumed run's position
    for t in range(run.state.iteration, cfg.iterations):  # Alg. 1 line 3: for t = 1..T
        policy, ref, policy_path = run.load_models(t)  # pi_theta, and pi_ref as line 23 left it
        if run.state.augmented is None:  # phase 1 (lines 4-12), unless a resumed run had finished it
            pieces = run.phase_one_pieces(t)  # kept as they finish: a stop loses seconds, not the phase
            run.state.augmented = online_sampling(run, t, policy, ref, policy_path, pieces)
            run.save_phase_boundary()
            pieces.remove()
        preference_optimization(run, t, policy, ref)  # phase 2 (lines 13-22): Eq. 5 steps, Eq. 6 every T_meta
        run.end_iteration(t, policy)  # line 23: pi_theta exported, the next start and the reference after it
        del policy, ref
        release_memory()
    return run.finish()


def online_sampling(run: IterativeRun, t: int, policy, ref, policy_path: str, pieces: Pieces) -> list[PolicyPair]:
    """Phase 1, meta-weighted adaptive online sampling (Alg. 1 lines 4-12): D_aug of iteration t,
    its work kept in `pieces` as it finishes."""
    cfg, rt, method, chunk = run.cfg, run.rt, run.method, run.chunks[t]
    tic = time.time()
    scores, offline_scores, features, boundary = [(None, None)] * len(chunk), None, None, None
    if method in ("metaapo", "adpo"):  # line 6: l_off of every tuple under (pi_theta, pi_ref), Eq. 4
        parts = pieces.run(
            "scores",
            math.ceil(len(chunk) / PIECE),
            lambda k: pair_scores(policy, ref, chunk[k * PIECE : (k + 1) * PIECE], cfg, rt),
        )
        scores = [score for part in parts for score in part]
        offline_scores, input_scores, chosen_ratios, rejected_ratios = (torch.tensor(column) for column in zip(*scores))
        features = meta_features(input_scores, chosen_ratios, rejected_ratios, inputs=cfg.meta_inputs)
    if method == "stage":  # seed 004: the boundary measurement decides the iteration's data
        boundary = boundary_measurement(
            cfg, rt, policy, run.tokenizer, policy_path, chunk, run.raw, run.stage, t, pieces
        )
    # lines 7-8: w = h(l_off), generate when u > w (the baselines: every prompt, a threshold, the boundary score)
    selected, weights = select_for_generation(cfg, method, run.meta, offline_scores, features, len(chunk), boundary)
    chosen = [i for i, s in enumerate(selected) if s]
    prompts, seed = [chunk[i].prompt_ids for i in chosen], cfg.seed * 1000 + t
    # line 9: K responses from the current policy
    generations = distributed_generate(
        policy, run.tokenizer, prompts, policy_path, cfg.num_samples, cfg, rt, seed, run.stage.dir, pieces=pieces
    )
    pairs, pair_stats = annotate(run, chunk, chosen, generations, pieces)  # lines 10-11: ranked by r, best and worst
    # SELM's optimism term needs an answer of the policy's own: the first of its K samples (SELM's code: a greedy one)
    own = [g[0].token_ids for g in generations] if method == "selm" else None
    augmented = build_augmented(cfg, method, chunk, chosen, pairs, selected, own)  # line 12: D_aug
    run.record_sampling(t, scores, selected, weights, chosen, pairs, pair_stats, augmented, boundary, tic)
    return augmented


def annotate(
    run: IterativeRun, chunk: list[PolicyPair], chosen: list[int], generations: list, pieces: Pieces
) -> tuple[list, PairStats]:
    """Alg. 1 lines 10-11: the reward model scores each selected prompt's K answers; its best and
    worst are the online pair (SELM also ranks the offline pair's two answers with them). In
    pieces of PIECE prompts, kept as they finish; the reward model is loaded only if one is left."""
    rows = [run.raw[chunk[i].index] for i in chosen]
    pool = [((row.chosen, chunk[i].chosen_ids), (row.rejected, chunk[i].rejected_ids)) for i, row in zip(chosen, rows)]
    loaded = []  # the reward model, once a piece needs it

    def piece(k: int):
        if not loaded:
            loaded.append(load_reward_model(reward_path(run.cfg), run.cfg, run.rt))
        part = slice(k * PIECE, (k + 1) * PIECE)
        offline = pool[part] if run.method == "selm" else None
        return make_online_pairs([row.prompt for row in rows[part]], generations[part], loaded[0], offline=offline)

    parts = pieces.run("rewards", math.ceil(len(rows) / PIECE), piece)
    loaded.clear()  # phase 2 does not need it
    release_memory()
    return [pair for pairs, _ in parts for pair in pairs], PairStats.combined([stats for _, stats in parts])


def preference_optimization(run: IterativeRun, t: int, policy, ref) -> None:
    """Phase 2 (Alg. 1 lines 13-22), one epoch over D_aug: each step the Eq. 5 loss on pi_theta and
    the step's detached scores into the meta buffer; every T_meta steps one Eq. 6 step on h_phi."""
    cfg, meta = run.cfg, run.meta
    if not run.state.augmented:
        run.stage.log({"iteration": t + 1, "phase": "train", "skipped": "no augmented tuple"})
        print0(run.rt, f"[{run.name}] iteration {t + 1}: no augmented tuple, nothing to train on; skipped")
        return
    tic = time.time()
    batches, optimizer, scheduler = run.resumed_pass or iteration_pass(policy, run.state.augmented, t, cfg)
    loss_fn, after_step = make_iterative_loss(cfg, run.method, policy, ref, meta, run.rt)
    desc, save, extra = f"iteration {t + 1}/{cfg.iterations}", run.checkpoint_state, {"iteration": t + 1}
    records = optimize(
        run.stage, policy, optimizer, scheduler, batches, loss_fn, run.loop, desc, save, after_step, extra
    )
    run.state.times["training_s"] += time.time() - tic
    dropped = meta.buffer.steps if meta is not None else 0
    if meta is not None:  # leftover entries (< T_meta steps) are dropped: the next iteration has another reference
        meta.buffer.clear()
    if records:  # after a resume, the summary covers the steps run since
        means = {
            f"mean_{key}": float(np.mean([r[key] for r in records if key in r]))
            for key in ("loss", "l_off", "l_on", "w", "meta_loss")
            if any(key in r for r in records)
        }
        updates = sum("meta_loss" in r for r in records)
        summary = {"steps": len(records), "time_s": time.time() - tic, **means, "meta_updates": updates}
        run.stage.log({"iteration": t + 1, "phase": "train", **summary, "meta_steps_dropped": dropped})


class IterativeRun:
    """What surrounds Algorithm 1's loop: the tokenized D_off and its chunks, the meta-learner, the
    stage directory, and the IterationState every checkpoint records. Checkpoints are written at
    each phase boundary and inside phase 2; a resumed run continues at the iteration, phase and
    step its last checkpoint reached, with this rank's own share of the meta buffer."""

    def __init__(self, cfg: Config, rt: Runtime, method: str):
        self.cfg, self.rt, self.method, self.name = cfg, rt, method, stage_name(cfg, method)
        self.started = time.time()
        self.tokenizer = data.load_tokenizer(warm_policy_path(cfg))
        offline, self.raw = train_pairs(cfg, rt, self.tokenizer)
        if cfg.iterations > len(offline):
            raise ConfigError(
                f"--iterations={cfg.iterations}: only {len(offline)} usable offline pairs, fewer than one per iteration"
            )
        self.stage = Stage(cfg, rt, self.name)
        self.latest = self.stage.start()
        self.chunks = data.split_into_chunks(
            offline, cfg.iterations, cfg.seed
        )  # D_off shuffled with the seed, cut into D_1..D_T
        self.meta = (
            MetaController(
                cfg.meta_depth,
                cfg.meta_inputs,
                cfg.meta_lr,
                cfg.meta_interval,
                cfg.sampling,
                cfg.weighting,
                cfg.threshold,
                seed=cfg.seed,
                device=rt.device,
                weight_decay=cfg.meta_weight_decay,
                grad_clip=cfg.meta_grad_clip,
            )
            if method == "metaapo"
            else None
        )
        saved = torch.load(self.latest / "state.pt", weights_only=False)["iteration_state"] if self.latest else {}
        self.state = IterationState(**saved)
        self.loop = Loop(**self.state.loop)
        self.resumed_pass = None  # (batches, optimizer, scheduler) restored inside phase 2

    def load_models(self, t: int):
        """(policy, reference or None, the policy's path) of iteration t; resuming inside it, also
        the optimizer, schedule and meta-learner as its checkpoint left them."""
        policy_path, ref_path = iteration_paths(self.cfg, self.stage, self.method, t)
        policy, _ = load_logprob_model(policy_path, self.cfg, self.rt, trainable=True)
        ref = load_logprob_model(ref_path, self.cfg, self.rt, trainable=False)[0] if ref_path else None
        if self.latest is not None:
            self.resume_inside(t, policy)
        else:
            self.state = dataclasses.replace(
                self.state, iteration=t, loop=vars(Loop(step=self.loop.step)), augmented=None, meta=None
            )
            self.loop = Loop(**self.state.loop)
        return policy, ref, policy_path

    def resume_inside(self, t: int, policy) -> None:
        optimizer = scheduler = None
        if self.state.augmented:  # phase 2 has begun: its optimizer and schedule come back with the policy
            self.resumed_pass = iteration_pass(policy, self.state.augmented, t, self.cfg)
            _, optimizer, scheduler = self.resumed_pass
        rank_local = self.stage.load_checkpoint(
            self.latest, policy if optimizer is not None else None, optimizer, scheduler
        )["rank_local"]
        if self.meta is not None and self.state.meta is not None:
            self.meta.load_state_dict(self.state.meta)
            if rank_local is not None:  # this rank's own share of the meta buffer, not rank 0's
                self.meta.buffer.load_state_dict(rank_local["meta_buffer"])
            else:  # a rank the checkpoint did not have: no share of its own
                self.meta.buffer.clear()
        self.latest = None

    def checkpoint_state(self) -> dict:
        meta = self.meta
        return {
            "iteration_state": {
                **vars(self.state),
                "loop": vars(self.loop).copy(),
                "meta": meta.state_dict() if meta else None,
            },
            "rank_local": {"meta_buffer": meta.buffer.state_dict()} if meta is not None else None,
        }

    def phase_one_pieces(self, t: int) -> Pieces:
        """Where iteration t's phase 1 keeps its work as it finishes (until its result is in a checkpoint)."""
        where = f"[{self.name}] stopped during iteration {t + 1}'s phase 1"
        return Pieces(self.stage.dir / f"iter{t + 1}" / "phase1", self.rt, where)

    def save_phase_boundary(self) -> None:
        """A state-only checkpoint: the policy is still the one on disk that the iteration started from."""
        self.stage.save_checkpoint(self.loop.step, None, None, None, self.checkpoint_state())

    def record_sampling(
        self,
        t: int,
        scores: list,
        selected: list[bool],
        weights: list[float],
        chosen: list[int],
        pairs: list,
        pair_stats,
        augmented: list,
        boundary: dict | None,
        tic: float,
    ) -> None:
        """Phase 1's record: per-tuple decisions in iter<t>/gating.jsonl (for evaluate.py's plots),
        the annotation ratio (reward-model calls per offline tuple, in units of K) and the counts."""
        cfg, chunk = self.cfg, self.chunks[t]
        if self.rt.main:
            paired = {i for i, pair in zip(chosen, pairs) if pair is not None}
            data.write_jsonl(
                self.stage.dir / f"iter{t + 1}" / "gating.jsonl",
                [
                    {
                        "index": item.index,
                        "prompt_id": item.prompt_id,
                        "l_off": score[0],
                        "h_input": score[1],
                        "w": weights[i] if weights else None,
                        "selected": selected[i],
                        "paired": i in paired,
                    }
                    for i, (item, score) in enumerate(zip(chunk, scores))
                ],
            )
        ratio = (
            len(chosen)
            / max(1, len(chunk))
            * ((cfg.num_samples + 2) / cfg.num_samples if self.method == "selm" else 1.0)
        )
        if boundary:  # the probe's reward-model calls count too
            ratio += boundary["annotations"] / (len(chunk) * cfg.num_samples)
        nan_mean = lambda values: float(np.mean(values)) if values else float("nan")  # noqa: E731
        self.stage.log(
            {
                "iteration": t + 1,
                "phase": "generate",
                "tuples": len(chunk),
                "selected": len(chosen),
                "annotation_ratio": ratio,
                "pairs": pair_stats.pairs,
                "pairs_dropped_all_equal": pair_stats.all_equal,
                "truncated_candidates": pair_stats.truncated_candidates,
                "augmented": len(augmented),
                "mean_l_off": nan_mean([x[0] for x in scores if x[0] is not None]),
                "mean_w": nan_mean(weights),
                "mean_online_reward": nan_mean(pair_stats.rewards),
                "offline_chosen": pair_stats.offline_chosen,
                "offline_rejected": pair_stats.offline_rejected,
                "time_s": time.time() - tic,
            }
        )
        print0(
            self.rt,
            f"[{self.name}] iteration {t + 1}: generated for {len(chosen)}/{len(chunk)} prompts ({ratio:.1%}), "
            f"{pair_stats.pairs} online pairs, {pair_stats.all_equal} prompts dropped (all rewards equal)",
        )
        self.state.times["sampling_s"] += time.time() - tic
        self.state.ratios.append(ratio)

    def end_iteration(self, t: int, policy) -> None:
        """Export the policy after iteration t: the next iteration starts from it and, one later,
        uses it as its reference, so it keeps the master weights' precision (at lr 5e-7 an
        iteration's progress is mostly below bf16's resolution). Then a phase-boundary checkpoint."""
        export_hf(
            policy,
            policy.lm,
            self.tokenizer,
            self.stage.dir / f"iter{t + 1}" / "model",
            self.cfg,
            self.rt,
            prefix="lm.",
            dtype=MASTER_DTYPE if t + 1 < self.cfg.iterations else None,
        )
        if self.meta is not None and self.rt.main:
            torch.save(self.meta.state_dict(), self.stage.dir / f"iter{t + 1}" / "meta_learner.pt")
        self.loop = Loop(step=self.loop.step)
        self.state = dataclasses.replace(self.state, iteration=t + 1, loop=vars(self.loop).copy(), augmented=None)
        self.resumed_pass = None  # it holds the optimizer: gone before the next iteration loads its models
        self.save_phase_boundary()

    def finish(self) -> dict:
        stage = self.stage
        if self.loop.step == 0:
            raise NothingTrained(
                f"[{self.name}] trained no step in {self.cfg.iterations} iterations: no offline tuple gave an "
                f"augmented one (selected and with an online pair whose rewards differ; see {stage.metrics_path}); the "
                "stage is not marked done"
            )
        if self.rt.main:
            copy_tree(stage.dir / f"iter{self.cfg.iterations}" / "model", stage.model_dir)
            if self.meta is not None:
                torch.save(self.meta.state_dict(), stage.dir / "meta_learner.pt")
        barrier(self.rt)
        summary = {
            "annotation_ratio": float(np.mean(self.state.ratios)) if self.state.ratios else 0.0,
            **self.state.times,
            "total_s": time.time() - self.started,
        }
        stage.log({"phase": "done", **summary})
        stage.finish(summary)
        return summary


# ==============================================================================================
# PPO, OpenRLHF-style (the paper's Table 1 and 8 row): the actor starts from the SFT model, the
# critic from the reward model (its score head read at every position), the reward is the reward
# model's score of the whole response minus a per-token KL penalty to the SFT model, advantages
# come from GAE, and the losses are PPO's clipped policy and value losses. Each rollout samples
# one response for rollout_batch_size prompts, then trains one pass over them.


class ValueModel(nn.Module):
    """V(s_t) at every position: a sequence-classification model's trunk and score head, run in
    one forward so that under FSDP2 it is the root and the head's weight is gathered there."""

    def __init__(self, rm: nn.Module):
        super().__init__()
        self.rm = rm

    def forward(self, input_ids, attention_mask) -> torch.Tensor:
        hidden = self.rm.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        return self.rm.score(hidden).squeeze(-1).float()  # (B, T)


class ActorCritic(nn.Module):
    """Actor and critic (each its own FSDP root) under one AdamW with two parameter groups, so the
    shared optimisation loop drives both; their parameters are disjoint, so are their gradients."""

    def __init__(self, actor: nn.Module, critic: nn.Module):
        super().__init__()
        self.actor, self.critic = actor, critic

    def set_requires_gradient_sync(self, sync: bool) -> None:
        self.actor.set_requires_gradient_sync(sync)
        self.critic.set_requires_gradient_sync(sync)


@dataclass
class Rollout:
    """One sampled response with what PPO needs of it, per response token."""

    prompt_ids: list[int]
    response_ids: list[int]
    index: int  # the offline pair whose prompt it answers
    pad_id: int
    score: float = 0.0  # the reward model's
    old_logps: list[float] = field(default_factory=list)  # the actor's when it sampled
    values: list[float] = field(default_factory=list)  # the critic's then
    advantages: list[float] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    kl: float = 0.0  # sum over its tokens of log pi - log pi_sft


def gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """Generalised advantage estimation over one response, from its last token back:
    delta_t = r_t + gamma V_{t+1} - V_t (V after the end = 0), A_t = delta_t + gamma lam A_{t+1};
    returns R_t = A_t + V_t."""
    advantages, running, next_value = [0.0] * len(rewards), 0.0, 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        advantages[t], next_value = running, values[t]
    return advantages, [a + v for a, v in zip(advantages, values)]


def per_token(items: list[Rollout], attribute: str, shape, device) -> torch.Tensor:
    """A per-response-token list of each rollout, placed at its tokens' positions in a (B, T) batch."""
    out = torch.zeros(shape, device=device)
    for row, item in enumerate(items):
        start = len(item.prompt_ids)
        out[row, start : start + len(item.response_ids)] = torch.tensor(getattr(item, attribute), device=device)
    return out


def shifted_values(critic, batch: dict, device) -> torch.Tensor:
    """V of the state before each token, at that token's position (B, T): the value read where the
    actor reads its log-prob."""
    values = critic(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    return torch.cat([torch.zeros_like(values[:, :1]), values[:, :-1]], dim=1)


@torch.no_grad()
def score_rollouts(items: list[Rollout], actor, ref, critic, cfg: Config, rt: Runtime) -> None:
    """Fill in each rollout's old log-probs, values, KL, advantages and returns (every rank gets all
    of them; strided shares as in pair_scores), then whiten the advantages over the rollout."""
    chunk = max(1, cfg.micro_batch_size) * 4
    share = list(range(rt.rank, len(items), rt.world))
    padded = share + [share[0] if share else 0] * (math.ceil(len(items) / rt.world) - len(share))
    results = []
    for start in range(0, len(padded), chunk):
        batch_items = [items[i] for i in padded[start : start + chunk]]
        batch = data.collate_sequences(
            [r.prompt_ids for r in batch_items], [r.response_ids for r in batch_items], batch_items[0].pad_id
        )
        inputs = [batch[k].to(rt.device) for k in ("input_ids", "attention_mask", "response_mask")]
        logps, ref_logps, values = (
            actor(*inputs, per_token=True),
            ref(*inputs, per_token=True),
            shifted_values(critic, batch, rt.device),
        )
        for row, item in enumerate(batch_items):
            span = slice(len(item.prompt_ids), len(item.prompt_ids) + len(item.response_ids))
            results.append((logps[row, span].tolist(), ref_logps[row, span].tolist(), values[row, span].tolist()))
    merged = {}
    for part in all_gather_objects(rt, list(zip(share, results))):
        merged.update(part)
    for i, item in enumerate(items):
        item.old_logps, ref_logps, item.values = merged[i]
        kl = [a - b for a, b in zip(item.old_logps, ref_logps)]
        rewards = [-cfg.kl_coef * k for k in kl]  # the KL penalty on every token, the reward model's score on the last
        rewards[-1] += min(10.0, max(-10.0, item.score))  # OpenRLHF's reward clip
        item.advantages, item.returns = gae(rewards, item.values, cfg.gae_gamma, cfg.gae_lambda)
        item.kl = sum(kl)
    flat = torch.tensor([a for item in items for a in item.advantages])
    mean, std = flat.mean().item(), flat.std().item() if len(flat) > 1 else 1.0
    for item in items:
        item.advantages = [(a - mean) / (std + 1e-8) for a in item.advantages]


def make_ppo_loss(cfg: Config, model: ActorCritic, rt: Runtime):
    """PPO's clipped policy loss plus its clipped value loss, each a token mean per response."""

    def ppo_loss(items, weights, batch_size, world):
        batch = data.collate_sequences([r.prompt_ids for r in items], [r.response_ids for r in items], items[0].pad_id)
        mask = batch["response_mask"].to(rt.device).float()
        logps = model.actor(
            batch["input_ids"].to(rt.device),
            batch["attention_mask"].to(rt.device),
            batch["response_mask"].to(rt.device),
            per_token=True,
        )
        values = shifted_values(model.critic, batch, rt.device)
        old, old_values, advantages, returns = (
            per_token(items, a, mask.shape, rt.device) for a in ("old_logps", "values", "advantages", "returns")
        )
        ratio = torch.exp(logps - old) * mask
        policy = -torch.min(ratio * advantages, ratio.clamp(1 - cfg.ppo_clip, 1 + cfg.ppo_clip) * advantages)
        clipped = old_values + (values - old_values).clamp(-cfg.value_clip, cfg.value_clip)
        value = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
        tokens = mask.sum(-1).clamp(min=1)
        policy_loss, value_loss = (policy * mask).sum(-1) / tokens, (value * mask).sum(-1) / tokens  # (B,)
        total = ((policy_loss + value_loss) * weights).sum()
        n = weights.sum().item()
        clipped_share = (((ratio - 1).abs() > cfg.ppo_clip).float() * mask).sum(-1) / tokens
        return total * world / batch_size, {
            "loss": total.item() / batch_size,
            "policy_loss_sum": (policy_loss * weights).sum().item(),
            "policy_loss_count": n,
            "value_loss_sum": (value_loss * weights).sum().item(),
            "value_loss_count": n,
            "clip_fraction_sum": (clipped_share * weights).sum().item(),
            "clip_fraction_count": n,
            "score_sum": sum(r.score * w for r, w in zip(items, weights.tolist())),
            "score_count": n,
            "kl_sum": sum(r.kl * w for r, w in zip(items, weights.tolist())),
            "kl_count": n,
        }

    return ppo_loss


def rollout_pieces(stage: Stage, rt: Runtime, r: int) -> Pieces:
    """Where rollout r keeps its generation and scores as they finish. The actor that generates them
    is the one rollout r - 1's pass left: a resumed run retrains the same steps to it (bit for bit
    with --deterministic) before it reads them back."""
    return Pieces(stage.dir / f"rollout{r + 1}", rt, f"[ppo] stopped during rollout {r + 1}'s generation and scoring")


def collect_rollout(
    cfg: Config, rt: Runtime, stage: Stage, r: int, chunk: list, raw: list, tokenizer, actor, ref, critic, rm
) -> list[Rollout]:
    """Rollout r: one answer per prompt from the current actor, scored by the reward model, then
    per-token KL to the SFT model, values and GAE advantages (score_rollouts). Generation and
    scores are kept in pieces (rollout_pieces) as they finish."""
    tic = time.time()
    pieces = rollout_pieces(stage, rt, r)
    policy_path = sft_path(cfg)
    if cfg.generator == "vllm":  # the worker reads the current actor from disk
        policy_path = str(stage.dir / "rollout_actor")
        export_hf(actor, actor.lm, tokenizer, Path(policy_path), cfg, rt, prefix="lm.")
    generations = distributed_generate(
        actor,
        tokenizer,
        [p.prompt_ids for p in chunk],
        policy_path,
        1,
        cfg,
        rt,
        cfg.seed * 1000 + r,
        stage.dir,
        pieces=pieces,
    )
    answers = [g[0] for g in generations]
    parts = pieces.run(
        "rewards",
        math.ceil(len(chunk) / PIECE),
        lambda k: rm.score(
            [raw[p.index].prompt for p in chunk[k * PIECE : (k + 1) * PIECE]],
            [a.text for a in answers[k * PIECE : (k + 1) * PIECE]],
            [a.finish_reason == "stop" for a in answers[k * PIECE : (k + 1) * PIECE]],
        ),
    )
    scores = [score for part in parts for score in part]
    check_stop(rt, pieces.where)
    room = [cfg.max_len - len(p.prompt_ids) for p in chunk]
    samples = [
        Rollout(p.prompt_ids, a.token_ids[:n] or [tokenizer.eos_token_id], p.index, tokenizer.pad_token_id, s)
        for p, a, s, n in zip(chunk, answers, scores, room)
    ]
    score_rollouts(samples, actor, ref, critic, cfg, rt)
    stage.log(
        {
            "rollout": r + 1,
            "phase": "generate",
            "prompts": len(samples),
            "mean_score": float(np.mean(scores)),
            "mean_kl": float(np.mean([s.kl for s in samples])),
            "time_s": time.time() - tic,
        }
    )
    return samples


def run_ppo(cfg: Config, rt: Runtime) -> dict:
    """PPO over the offline prompts: rollouts of rollout_batch_size prompts, each one response
    from the actor scored by the reward model, then one pass of PPO steps over them."""
    from transformers import AutoModelForSequenceClassification

    started = time.time()
    tokenizer = data.load_tokenizer(sft_path(cfg))
    pairs, raw = train_pairs(cfg, rt, tokenizer)
    prompts = shuffled(pairs, cfg.seed)
    rollouts = [prompts[i : i + cfg.rollout_batch_size] for i in range(0, len(prompts), cfg.rollout_batch_size)]
    stage = Stage(cfg, rt, "ppo")
    latest = stage.start()
    actor, _ = load_logprob_model(sft_path(cfg), cfg, rt, trainable=True)
    ref = load_logprob_model(sft_path(cfg), cfg, rt, trainable=False)[0]
    critic_lm, files, missing = load_pretrained(
        AutoModelForSequenceClassification, reward_path(cfg), rt, MASTER_DTYPE, num_labels=1
    )
    require_reward_head(reward_path(cfg), critic_lm, {"missing_keys": missing})  # it starts from the trained head
    critic = shard_model(ValueModel(critic_lm), critic_lm, cfg, rt, trainable=True)
    if files:
        load_shards(critic, "rm.", files, rt)
    rm = load_reward_model(reward_path(cfg), cfg, rt)
    model = ActorCritic(actor, critic)
    optimizer = torch.optim.AdamW(
        [
            {"params": trainable_parameters(actor), "lr": cfg.lr},
            {"params": trainable_parameters(critic), "lr": cfg.critic_lr},
        ],
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
    )
    steps = sum(math.ceil(len(r) * cfg.epochs / cfg.batch_size) for r in rollouts)
    scheduler = make_scheduler(optimizer, steps, cfg)
    state = {
        "rollout": 0,
        "samples": None,
        "loop": vars(Loop()),
        "times": {"sampling_s": 0.0, "training_s": 0.0},
        "annotations": 0,
    }
    if latest is not None:
        state = stage.load_checkpoint(latest, model, optimizer, scheduler)["ppo"]
    loop = Loop(**state["loop"])
    save = lambda: {"ppo": {**state, "loop": vars(loop).copy()}}  # noqa: E731
    loss_fn = make_ppo_loss(cfg, model, rt)
    for r in range(state["rollout"], len(rollouts)):
        if state["samples"] is None:  # sample, score, and estimate advantages
            tic = time.time()
            samples = collect_rollout(cfg, rt, stage, r, rollouts[r], raw, tokenizer, actor, ref, critic, rm)
            state.update(samples=samples, annotations=state["annotations"] + len(samples))
            state["times"]["sampling_s"] += time.time() - tic
        tic = time.time()
        batches = epoch_batches(state["samples"], cfg.epochs, cfg.batch_size, cfg.seed * 1000 + r)
        optimize(
            stage,
            model,
            optimizer,
            scheduler,
            batches,
            loss_fn,
            loop,
            f"rollout {r + 1}/{len(rollouts)}",
            save,
            log_extra={"rollout": r + 1},
            save_period=cfg.save_every or max(1, math.ceil(steps / 10)),
        )
        state["times"]["training_s"] += time.time() - tic
        state.update(rollout=r + 1, samples=None)
        loop.batch = 0
        rollout_pieces(stage, rt, r).remove()
    export_hf(actor, actor.lm, tokenizer, stage.model_dir, cfg, rt, prefix="lm.")
    summary = {
        "annotation_ratio": state["annotations"] / max(1, len(prompts)) / cfg.num_samples,
        **state["times"],
        "steps": loop.step,
        "rollouts": len(rollouts),
        "total_s": time.time() - started,
    }
    stage.log({"phase": "done", **summary})
    stage.finish(summary)
    return summary


# ==============================================================================================
# The results table (toy: gold judge; real models: reward model)


def evaluate_policy_gold(
    path: str, cfg: Config, rt: Runtime, prompts: list[list[int]], messages: list[list[dict]]
) -> list[float]:
    """Gold-judge scores of eval_samples answers per held-out prompt, sampled as in training."""
    policy, tokenizer = load_logprob_model(path, cfg, rt, trainable=False)
    generations = distributed_generate(
        policy,
        tokenizer,
        prompts,
        path,
        cfg.eval_samples,
        cfg,
        rt,
        cfg.seed + 4242,
        Path(cfg.out_dir),
        backend="transformers",
    )
    del policy
    release_memory()
    return toy_gold_judge().score(
        [m for m, g in zip(messages, generations) for _ in g], [x.text for g in generations for x in g]
    )


def results_table(cfg: Config, rt: Runtime, rows: list[tuple[str, str]], summaries: dict) -> str:
    """Gold mean score and win rate against the first row (SFT) on held-out prompts, annotation
    ratio and time per phase."""
    tokenizer = data.load_tokenizer(rows[0][1])
    test, source = load_heldout(cfg, "the results table")
    test = test[: cfg.eval_prompts or len(test)]
    prompts = [data.encode_prompt(tokenizer, p.prompt) for p in test]
    scores = {label: evaluate_policy_gold(path, cfg, rt, prompts, [p.prompt for p in test]) for label, path in rows}
    base = scores[rows[0][0]]
    lines = [
        f"Toy results: gold judge (0-10) on {len(test)} held-out prompts of {describe(source)} x {cfg.eval_samples} "
        f"samples at temperature {cfg.temperature}",
        "",
        "| model | gold mean | win rate vs SFT | annotation ratio | time |",
        "|---|---|---|---|---|",
    ]
    for label, _ in rows:
        wins = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores[label], base)])
        summary = summaries.get(label, {})
        ratio = f"{summary['annotation_ratio']:.1%}" if "annotation_ratio" in summary else "-"
        timing = (
            f"sampling {summary['sampling_s']:.0f}s + training {summary['training_s']:.0f}s"
            if "sampling_s" in summary
            else f"{summary['train_time_s']:.0f}s"
            if "train_time_s" in summary
            else "-"
        )
        lines.append(f"| {label} | {np.mean(scores[label]):.3f} | {wins:.1%} | {ratio} | {timing} |")
    return "\n".join(lines)


# ==============================================================================================
# The memory plan: --dry_run prints each stage's steps and tokens and a per-GPU memory estimate,
# and refuses a plan that cannot fit; grad_accumulation=auto reads the same estimate

GIB = 2**30
OVERHEAD_GIB = 3.0  # CUDA context, NCCL buffers, allocator fragmentation: a fixed allowance per GPU
# The dataset card's size, for planning where the data cannot be read (no network)
KNOWN_PAIRS = {("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"): 61135}


@dataclass
class Shapes:
    """What the memory estimate needs of an architecture, read from its config alone."""

    params: int  # every parameter, tied ones once
    outside_blocks: int  # embeddings, final norm, head: the FSDP root's own parameters
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_width: int  # key/value heads x head dim: the KV cache per token and layer is 2 x this


def model_shapes(path: str, flag: str = "--model") -> Shapes:
    """Shapes of a model directory or hub id, counting its parameters on the meta device (no memory).
    A config that does not load is a one-line error naming `flag`."""
    from transformers import AutoModelForCausalLM

    config = load_config(flag, path).get_text_config()
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in lm.parameters())
    inside = sum(p.numel() for block in _decoder_blocks(lm) for p in block.parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return Shapes(
        params,
        params - inside,
        config.num_hidden_layers,
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
        kv_heads * head_dim,
    )


def activation_bytes(s: Shapes, tokens: int, checkpointing: bool, grad: bool = True) -> float:
    """bf16 activations of one micro-batch of `tokens` on one GPU: a block keeps about
    10 x hidden + 4 x intermediate values per token (attention projections, norms, residuals; the
    MLP's gate, up, activation and product); with checkpointing only each block's input stays and
    one block is recomputed at a time; without gradients only the block running."""
    block = tokens * (10 * s.hidden + 4 * s.intermediate) * 2
    if not grad:
        return block
    return s.layers * tokens * s.hidden * 2 + block if checkpointing else s.layers * block


def memory_plan(
    cfg: Config, world: int, gpu_gib: float, policy: Shapes, annotator: Shapes, sharded_gradients: bool
) -> dict:
    """GiB per GPU in each phase of a run: {phase: {component: GiB}}.

    Training counts the fused kernel's whole working set (a logits tile, the head's bf16 weight
    gradient, the fp32 hidden gradient). Generation counts what stays allocated when the vLLM
    child starts: the shards, once the roots are resharded and the cache emptied (release_memory),
    and the child's gpu_memory_utilization share, which vLLM refuses to start without. A frozen
    model's root reshards after each forward (shard_model), so no gathered reference root is
    counted. PPO (--method ppo) trains two models, the actor (the policy's shapes) and the critic
    (the reward model's), keeps both AdamW states across its rollouts, and holds the reward model
    beside the reference throughout."""
    w, p, r, ppo = world, policy.params, annotator.params, cfg.method == "ppo"
    gathered = lambda s: 2 * (s.outside_blocks + 2 * (s.params - s.outside_blocks) / s.layers)  # noqa: E731 (bf16 root + 2 prefetched blocks)
    trained = p + r if ppo else p  # parameters with gradients and AdamW state
    # MetaAPO's micro-batch: offline and online chosen and rejected; PPO's: one response per item
    tokens = cfg.micro_batch_size * (1 if ppo else 4) * cfg.max_len
    resident = {"policy weights (fp32 shards)": 4 * p / w, "reference (bf16 shards)": 2 * p / w}
    if ppo:
        resident.update({"critic weights (fp32 shards)": 4 * r / w, "reward model (bf16 shards)": 2 * r / w})
    adam = {"AdamW state (fp32 shards)": 8 * trained / w}
    training = {
        **resident,
        "gradients (fp32, sharded)" if sharded_gradients else "gradients (fp32, unsharded while accumulating)": 4
        * trained
        / (w if sharded_gradients else 1),
        **adam,
        "gathered bf16 weights and gradients (root + 2 blocks)": 2 * gathered(policy)
        + (2 * gathered(annotator) if ppo else 0),
        f"activations ({tokens} tokens per micro-batch)": activation_bytes(policy, tokens, cfg.activation_checkpointing)
        + (activation_bytes(annotator, tokens, cfg.activation_checkpointing) if ppo else 0),
        "log-prob kernel chunk (fp32 logits tile, bf16 head gradient, fp32 hidden gradient)": (
            (cfg.chunk_size or 256) * policy.vocab * 6
            + policy.vocab * policy.hidden * 2
            + 2 * tokens * policy.hidden * 4
        ),
    }
    plan = {
        "training (phase 2)": training,
        "generation (phase 1)": {
            **resident,
            **(adam if ppo else {}),  # MetaAPO's optimizer is made after phase 1; PPO's lives across rollouts
            "vLLM's share (gpu_memory_utilization)": cfg.gpu_memory_utilization * gpu_gib * GIB,
        },
        "reward scoring (phase 1)": {
            **resident,
            **({} if ppo else {"reward model (bf16 shards)": 2 * r / w}),
            "gathered bf16 reward-model weights": gathered(annotator),
            f"activations, no gradient ({cfg.micro_batch_size * 4 * cfg.rm_max_len} tokens)": activation_bytes(
                annotator, cfg.micro_batch_size * 4 * cfg.rm_max_len, True, grad=False
            ),
        },
    }
    for parts in plan.values():
        parts["CUDA context, NCCL, fragmentation"] = OVERHEAD_GIB * GIB
    return {phase: {k: v / GIB for k, v in parts.items()} for phase, parts in plan.items()}


def vllm_need_gib(cfg: Config, s: Shapes) -> float:
    """What one vLLM engine (tensor_parallel_size=1) needs in its share: the bf16 weights, the KV
    cache of one longest request, and about 1 GiB of activations."""
    context = cfg.vllm_max_model_len or cfg.max_prompt_len + cfg.max_new_tokens
    return (2 * s.params + context * s.layers * 2 * s.kv_width * 2) / GIB + 1.0


def plan_shapes(cfg: Config) -> tuple[Shapes, Shapes]:
    """(the policy's shapes, the annotating reward model's): the latter is the policy's architecture
    when this run trains it (the rm stage starts from the SFT model)."""
    path = sft_path(cfg) if Path(sft_path(cfg)).exists() or not cfg.init_from_config else cfg.model
    policy = model_shapes(path, "--sft_model" if cfg.sft_model else "--model")
    given = cfg.reward_model and (Path(cfg.reward_model).exists() or HUB_ID.fullmatch(cfg.reward_model))
    return policy, model_shapes(cfg.reward_model, "--reward_model") if given else policy


def needs_sharded_gradients(cfg: Config, world: int, gpu_gib: float, policy: Shapes, annotator: Shapes) -> bool:
    """grad_accumulation=auto's choice: gradients stay sharded when the unsharded ones would not
    fit beside the rest of the training phase (memory_plan; for PPO, actor and critic together)."""
    if cfg.grad_accumulation != "auto":
        return cfg.grad_accumulation == "sharded"
    unsharded = memory_plan(cfg, world, gpu_gib, policy, annotator, False)["training (phase 2)"]
    return sum(unsharded.values()) > 0.9 * gpu_gib


def gradients_stay_sharded(cfg: Config, rt: Runtime, model) -> bool:
    """grad_accumulation: sharded, unsharded, or auto (needs_sharded_gradients, on GPU; on CPU the
    gradients stay unsharded)."""
    if cfg.grad_accumulation != "auto" or rt.device.type != "cuda" or not rt.fsdp:
        return cfg.grad_accumulation == "sharded"
    gpu_gib = torch.cuda.get_device_properties(rt.device).total_memory / GIB
    return needs_sharded_gradients(cfg, rt.world, gpu_gib, *plan_shapes(cfg))


def count_pairs(cfg: Config) -> int | None:
    """Offline pairs a run trains on (rows of the data; the dataset card's count when it cannot be read here)."""
    source = train_source(cfg)
    count = (
        len(data.load_preferences(*source, cfg.skip_bad_rows)[0])
        if Path(source[0]).exists()
        else KNOWN_PAIRS.get(source)
    )
    return min(count, cfg.max_train_pairs) if count is not None and cfg.max_train_pairs else count


def dry_run(cfg: Config, world: int) -> None:
    """Print the plan of `cfg` on `world` GPUs of gpu_memory_gb each; refuse (ConfigError, with the
    numbers) one whose phases cannot fit."""
    gpu_gib = cfg.gpu_memory_gb or (
        torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else 80.0
    )
    policy, annotator = plan_shapes(cfg)
    pairs = count_pairs(cfg)
    lines = [
        f"plan for {world} GPU(s) of {gpu_gib:.0f} GiB: policy {sft_path(cfg)} ({policy.params / 1e9:.2f}B "
        f"parameters), reward model {annotator.params / 1e9:.2f}B, "
        f"{pairs if pairs is not None else 'an unknown number of'} offline pairs",
        "",
    ]
    if pairs is not None:
        rows = []
        if not cfg.reward_model:
            rows.append(("rm", math.ceil(pairs / cfg.rm_batch_size), pairs * 2 * cfg.rm_max_len))
        if not cfg.policy:
            rows.append(("dpo", math.ceil(pairs * cfg.epochs / cfg.batch_size), pairs * cfg.epochs * 2 * cfg.max_len))
        chunk = math.ceil(pairs / cfg.iterations)
        rows.append(
            (
                "metaapo, per iteration (all tuples sampled)",
                math.ceil(chunk * cfg.epochs / cfg.batch_size),
                chunk * cfg.epochs * 4 * cfg.max_len,
            )
        )
        lines += (
            ["| stage | optimizer steps | tokens (at most) |", "|---|---|---|"]
            + [f"| {n} | {s:,} | {t:,} |" for n, s, t in rows]
            + [
                f"MetaAPO: {cfg.iterations} iterations of {chunk:,} tuples, K = {cfg.num_samples} generations per "
                f"sampled prompt (at the paper's 58% annotation, about {math.ceil(0.58 * chunk / cfg.batch_size)} "
                f"policy steps and {math.ceil(0.58 * chunk / cfg.batch_size) // cfg.meta_interval} meta updates per "
                "iteration)",
                "",
            ]
        )
    sharded_gradients = needs_sharded_gradients(cfg, world, gpu_gib, policy, annotator)
    plan = memory_plan(cfg, world, gpu_gib, policy, annotator, sharded_gradients)
    too_big = []
    for phase, parts in plan.items():
        total = sum(parts.values())
        lines += [f"{phase}: {total:.1f} GiB of {gpu_gib:.0f}"] + [f"  {v:7.2f} GiB  {k}" for k, v in parts.items()]
        if total > gpu_gib:
            too_big.append(f"{phase} needs {total:.1f} GiB per GPU, more than the {gpu_gib:.0f} GiB there are")
    need, share = vllm_need_gib(cfg, policy), cfg.gpu_memory_utilization * gpu_gib
    lines.append(
        f"vLLM engine per GPU: {need:.1f} GiB needed (bf16 weights, one request's KV cache) of its {share:.1f} GiB "
        "share"
    )
    if cfg.generator == "vllm" and need > share:
        too_big.append(
            f"vLLM needs {need:.1f} GiB per GPU but gets {share:.1f} (gpu_memory_utilization "
            f"{cfg.gpu_memory_utilization})"
        )
    print("\n".join(lines))
    if too_big:
        raise ConfigError(
            f"the plan does not fit on {world} x {gpu_gib:.0f} GiB: "
            + "; ".join(too_big)
            + ". More GPUs, --grad_accumulation=sharded, a smaller --micro_batch_size or --max_len would help."
        )
    print(f"the plan fits ({'sharded' if sharded_gradients else 'unsharded'} gradient accumulation)")


# ==============================================================================================
# Orchestration


def run_method(cfg: Config, rt: Runtime, method: str) -> dict:
    """Run one stage, after checking its inputs; a finished stage is left as it is (its summary is
    returned): nothing here ever deletes or rewrites a finished model."""
    done = Path(cfg.out_dir) / stage_name(cfg, method) / "done.json"
    if done.exists():
        print0(
            rt, f"[{done.parent.name}] already finished ({done}); left as it is (remove {done.parent} to run it again)"
        )
        return read_json(done)
    check_inputs(cfg, method)
    if method == "sft":
        return run_sft(cfg, rt)
    if method == "rm":
        return run_rm(cfg, rt)
    if method in OFFLINE_METHODS:
        return run_offline(cfg, rt, method)
    if method == "selective_dpo":
        return run_selective_dpo(cfg, rt)
    if method == "ppo":
        return run_ppo(cfg, rt)
    return run_iterative(cfg, rt, method)


def ensure_stage(cfg: Config, rt: Runtime, method: str) -> dict:
    """Run a stage unless it is done, then give a stop signal its chance; return its summary."""
    summary = run_method(cfg, rt, method)
    release_memory()  # the stage's models died with it
    check_stop(rt, f"stopped after the {stage_name(cfg, method)} stage; --resume goes on with the next")
    return summary


def run_pipeline(cfg: Config, rt: Runtime) -> None:
    """Every stage MetaAPO needs, then the results table."""
    check_inputs(cfg, "pipeline")
    summaries = {}
    if cfg.init_from_config and not cfg.sft_model:
        summaries["SFT"] = ensure_stage(cfg, rt, "sft")
    if not cfg.reward_model:
        summaries["RM"] = ensure_stage(cfg, rt, "rm")
    if not cfg.policy:
        summaries["DPO"] = ensure_stage(cfg, rt, "dpo")
    summaries["MetaAPO"] = ensure_stage(cfg, rt, "metaapo")
    if cfg.preset == "toy":
        rows = [
            ("SFT", sft_path(cfg)),
            ("DPO", warm_policy_path(cfg)),
            ("MetaAPO", str(Path(cfg.out_dir) / stage_name(cfg, "metaapo") / "model")),
        ]
        table = results_table(cfg, rt, rows, summaries)
        if rt.main:
            (Path(cfg.out_dir) / "results.md").write_text(table + "\n")
        print0(rt, "\n" + table)
    else:
        print0(rt, f"done: {Path(cfg.out_dir) / stage_name(cfg, 'metaapo') / 'model'}; evaluate it with evaluate.py")


def stop_exit(message: str) -> None:
    """The one-line end of a run stopped by a signal: exit status 128 + the signal, as shells report it."""
    print(f"train.py: {message}", file=sys.stderr, flush=True)
    raise SystemExit(128 + STOP_SIGNAL[0])


def main(argv: list[str] | None = None) -> None:
    transformers.utils.logging.disable_progress_bar()  # our own bars are enough
    # e.g. "score.weight newly initialized" for the reward model, on purpose
    transformers.utils.logging.set_verbosity_error()
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(config_help())
        return
    try:
        cfg = parse_config(argv)
    except ConfigError as err:
        raise SystemExit(f"train.py: {err}") from None
    if cfg.dry_run:
        try:
            return dry_run(cfg, cfg.gpus or int(os.environ.get("WORLD_SIZE", 1)))
        except ConfigError as err:
            raise SystemExit(f"train.py: {err}") from None
    handlers = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    deterministic = torch.are_deterministic_algorithms_enabled()
    rt = setup_distributed(cfg)
    try:
        if cfg.preset == "toy":
            if rt.main:
                data.ensure_toy_assets(cfg.seed if cfg.data_seed < 0 else cfg.data_seed)
            barrier(rt)
        print0(rt, json.dumps(config_dict(cfg), indent=2))
        start_wandb(cfg, rt)
        started = time.time()
        if cfg.method == "pipeline":
            run_pipeline(cfg, rt)
        else:
            run_method(cfg, rt, cfg.method)
        print0(rt, f"total time {time.time() - started:.0f}s")
    except Stopped as err:
        stop_exit(f"{err}; continue with the same command and --resume")
    except (ConfigError, NonFiniteLoss, NothingTrained, data.DataError) as err:
        raise SystemExit(f"train.py: {err}") from None
    except Exception as err:
        if not STOP_SIGNAL:
            raise
        stop_exit(
            f"stopped by {signal.Signals(STOP_SIGNAL[0]).name} ({type(err).__name__} on the way out: {_short(err)}); "
            "continue with the same command and --resume"
        )
    finally:
        if WANDB:
            WANDB.pop().finish()
        if rt.distributed:
            # models and optimizers caught in reference cycles go while the process group still
            # exists: freed after it, at interpreter exit, a rank could abort in a C++ destructor
            gc.collect()
            dist.destroy_process_group()
        for signum, handler in handlers.items():  # main() may run inside another program (the tests)
            signal.signal(signum, handler)
        torch.use_deterministic_algorithms(deterministic)


if __name__ == "__main__":
    # run the imported module's main, so that what checkpoints pickle (PolicyPair, Rollout, ...) is
    # train.X, which any program can load, not __main__.X, which only `python train.py` could
    import train

    train.main()
