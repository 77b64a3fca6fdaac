"""
Meta-Aligner (Xu et al. 2026, arXiv 2604.24178), RECONSTRUCTED: the paper's method text is not
public (only its abstract); every choice below rebuilds it from the abstract and from the systems
it descends from (PRO's prompt -> weight network, RiC's conditioning and rejection sampling,
MetaAPO's alternating meta updates), as experiments/meta_aligner/README.md explains. The config
keys of the reconstructed choices say so in their comments ([R], AlignerConfig below).

The method, on the two-objective toy (toy_multiobjective.py here: helpful vs harmless):
- Stage 0 [R]: the plain SFT model (train.py's SFT stage on the teacher's demonstrations), then
  conditional SFT on both answers of every offline row, each conditioned on the trade-off it
  realised, c(w^(x, y)) with w^ = softmax(normalised reward / T_w), written as weights in the
  prompt ("<w1> 7 <w2> 3"); g_phi fitted to the chosen answers' w^ by KL (PRO's Eq. 7).
- Online iterations, in rounds of T_meta policy steps: w_x = (1 - eps) g_phi(x) + eps Dirichlet(1);
  K samples under c(w_x); the best under w_x . R kept; its target moved toward the trade-off it
  realised, w~ = normalise((1 - lambda) w_x + lambda w^(x, y*)); conditional SFT on the kept
  samples under c(w~); (x, w~) pushed to g_phi's buffer, and every T_meta steps one Adam step on
  the buffer's KL(w~ || g_phi(x)) (first-order, alternating, as MetaAPO's code).
- The baselines of the same budget (samples and policy steps) run through the same loop: `pro`
  (g_phi frozen after stage 0, lambda = 0, no exploration), `static` (w ~ Dirichlet(1), lambda = 0,
  no g_phi) and `ric` (RiC, read in its code: stage 0 conditioned on the normalised rewards, then
  MORS: one sample per (prompt, goal), K goals per prompt, kept when any objective reaches its
  0.7-quantile, relabelled with the rewards it obtained).

Pieces: `WeightNet` g_phi(x) (mean-pooled token embeddings, 32 -> 64 -> m MLP, softmax [R: PRO's
adapter, scaled down]); `realised_weights`; `relabel`; `best_of_k`; `explore`; `WeightLearner`
(g_phi, its Adam, its buffer: `fit` is PRO's offline fit, `update` the meta step); RiC's
`ric_targets` (its l2 inference map), `ric_sample_goals`, `ric_keep`; `conditional_rows`
(stage 0's data); `OnlineRun` (the loop, checkpointed: a killed run resumes at its round and step).

Run (from the repository's root)
    python -m experiments.meta_aligner.meta_aligner         # Meta-Aligner, lambda 0.5, seed 0 (out/meta_aligner-seed0)
    python -m experiments.meta_aligner.meta_aligner --aligner_method=ric --seed=1    # a baseline
    torchrun --nproc_per_node 2 -m experiments.meta_aligner.meta_aligner ...  # the policy sharded (FSDP2)
    python -m experiments.meta_aligner.pareto               # every method over 3 seeds: fronts, hypervolumes
Every rank generates its share of each round and receives every sample, so the kept samples, the
relabelled targets and g_phi's updates are the same on every rank (and for any number of ranks).

Deliberate simplifications
- A round's samples are drawn with the policy at the round's start (RiC generates once per
  iteration), not one policy step at a time.
- Generation uses the policy's own generate (transformers); the vLLM path of train.py is not
  wired here: the method is a toy-scale reconstruction.
- RiC's online stage trains on its kept online rows only (its code also mixes in 10k filtered
  offline rows).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import toy
import train
from checkpoint import Stage, entry_process, read_json, write_json
from config import Config, ConfigError, config_help, parse_config, seed_for
from engine import (
    NonFiniteLoss,
    Progress,
    Runtime,
    Stopped,
    TrainingPass,
    barrier,
    check_stop,
    distributed_generate,
    export_hf,
    load_logprob_model,
    make_optimizer,
    make_scheduler,
    print0,
    saved_progress,
    shuffled,
    stop_exit,
)
from experiments.meta_aligner import toy_multiobjective as mo

WEIGHT_TEMPERATURE = 0.1  # T_w of the realised-weight map (PRO's appendix)


class WeightNet(nn.Module):
    """g_phi(x): mean-pooled token embeddings -> MLP -> softmax over the m objectives."""

    def __init__(self, vocab_size: int, objectives: int = 2, width: int = 32, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, objectives))

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(self.embed.weight.dtype).unsqueeze(-1)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.softmax(self.mlp(pooled), dim=-1)


def realised_weights(rewards: torch.Tensor, temperature: float = WEIGHT_TEMPERATURE) -> torch.Tensor:
    """w^(x, y) = softmax(R(x, y) / T_w) per row of normalised rewards (B, m)."""
    return torch.softmax(rewards / temperature, dim=-1)


def relabel(asked: torch.Tensor, realised: torch.Tensor, strength: float) -> torch.Tensor:
    """w~ = normalise((1 - lambda) w + lambda w^): the target moved toward the realised trade-off."""
    moved = (1 - strength) * asked + strength * realised
    return moved / moved.sum(-1, keepdim=True)


def best_of_k(weights: torch.Tensor, rewards: torch.Tensor) -> int:
    """The index of the sample with the highest w . R among K (rewards (K, m)); the first on ties."""
    scores = (rewards * weights).sum(-1).tolist()
    best = 0
    for k, score in enumerate(scores):  # explicit, so that ties keep the first
        if score > scores[best]:
            best = k
    return best


def explore(weights: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """(1 - eps) w + eps d, d ~ Dirichlet(1, ..., 1) per row, drawn from `generator`."""
    if eps <= 0:
        return weights
    exponential = -torch.log(torch.rand(weights.shape, generator=generator, dtype=torch.float64)).to(weights.dtype)
    dirichlet = exponential / exponential.sum(-1, keepdim=True)
    return (1 - eps) * weights + eps * dirichlet


def kl_to(target: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(target || predicted), both on the simplex."""
    return (target * (target.clamp(min=1e-12).log() - predicted.clamp(min=1e-12).log())).sum(-1).mean()


class WeightLearner:
    """g_phi, its Adam optimiser (lr 5e-3, MetaAPO's meta learning rate [R]) and its buffer."""

    def __init__(self, vocab_size: int, objectives: int = 2, lr: float = 5e-3, interval: int = 8, seed: int = 0):
        with torch.random.fork_rng():  # the initialisation draws from its own seed, not the run's stream
            torch.manual_seed(seed)
            self.net = WeightNet(vocab_size, objectives)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.interval = interval
        self.buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (ids, mask, w~) per step
        self.updates = 0

    @torch.no_grad()
    def weights(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids, mask)

    def step(self, input_ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> float:
        """One Adam step on the mean KL(targets || g_phi(x))."""
        loss = kl_to(targets, self.net(input_ids, mask))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def fit(self, input_ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, epochs: int, batch: int = 64):
        """PRO's offline fit (stage 0): KL to the preferred responses' realised weights."""
        generator = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            order = torch.randperm(len(targets), generator=generator)
            for start in range(0, len(order), batch):
                rows = order[start : start + batch]
                self.step(input_ids[rows], mask[rows], targets[rows])

    def append(self, input_ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> None:
        """One policy step's kept samples: their prompts and moved targets w~ (detached)."""
        self.buffer.append((input_ids.detach(), mask.detach(), targets.detach()))

    def ready(self) -> bool:
        return len(self.buffer) >= self.interval

    def state(self) -> dict:
        """What a checkpoint keeps: the net, its optimiser, its buffer and its count of updates."""
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "buffer": self.buffer,
            "updates": self.updates,
        }

    def load_state(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer, self.updates = list(state["buffer"]), state["updates"]

    def update(self) -> dict:
        """The meta step: one Adam step on the buffer's mean KL(w~ || g_phi(x)), then the buffer is cleared."""
        width = max(ids.shape[1] for ids, _, _ in self.buffer)
        ids = torch.cat([F.pad(ids, (0, width - ids.shape[1])) for ids, _, _ in self.buffer])
        mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for _, m, _ in self.buffer])
        targets = torch.cat([t for _, _, t in self.buffer])
        loss = self.step(ids, mask, targets)
        self.buffer.clear()
        self.updates += 1
        return {"weight_net_loss": loss, "weight_net_updates": self.updates}


# ----------------------------------------------------------------------------------------------
# RiC (Yang et al. 2024), the baseline whose machinery the reconstruction reuses (read in its code)

RIC_LOW, RIC_HIGH = -4.3, 4.3  # about the extremes of 100k N(0, 1) draws, RiC's lo / hi
RIC_QUANTILE = 0.7  # MORS keeps a sample whose reward on any objective reaches this quantile


def ric_targets(weights: tuple[float, ...], low: float = RIC_LOW, high: float = RIC_HIGH) -> tuple[float, ...]:
    """RiC's inference map ('l2', what its evaluation.py calls): target_i = w_i / |w|_2 (high - low) + low."""
    norm = sum(w * w for w in weights) ** 0.5
    return tuple(w / norm * (high - low) + low for w in weights)


def ric_sample_goals(objectives: int, rng: random.Random, low: float = RIC_LOW, high: float = RIC_HIGH):
    """RiC's online targets: every objective drawn uniformly in [low, high], then every objective
    but the lowest set to high."""
    goals = [rng.uniform(low, high) for _ in range(objectives)]
    lowest = min(range(objectives), key=lambda i: goals[i])
    return tuple(g if i == lowest else high for i, g in enumerate(goals))


def ric_keep(rewards: torch.Tensor, quantile: float = RIC_QUANTILE) -> list[bool]:
    """MORS's rejection: keep a sample whose normalised reward on ANY objective is at or above that
    objective's `quantile` over the samples (rewards (N, m))."""
    thresholds = torch.quantile(rewards, quantile, dim=0)
    return (rewards >= thresholds).any(dim=1).tolist()


def conditional_rows(
    pref_rows: list[dict], seed: int, condition: str = "wic", temperature: float = WEIGHT_TEMPERATURE
) -> tuple[list[dict], list[tuple[float, float]], torch.Tensor]:
    """Stage 0's conditional SFT data [R: RiC's offline stage]: both answers of every offline row,
    each conditioned on what it realised under the reward signal: `wic`, its weights c(w^(x, y)),
    w^ = softmax(normalised reward / T_w) (PRO's weights, written in context); `ric`, RiC's own
    condition, its normalised rewards. Returns the rows (chosen then rejected per offline row, in
    the rows' order), the normalisation statistics and every answer's w^ (its rows' order)."""
    rng = random.Random(seed)
    answers = [(row["prompt"], row[key][-1]["content"]) for row in pref_rows for key in ("chosen", "rejected")]
    rewards = [mo.reward_signal(prompt, answer, rng) for prompt, answer in answers]
    stats = mo.reward_stats(rewards)
    normalised = [mo.normalise(r, stats) for r in rewards]
    realised = realised_weights(torch.tensor(normalised, dtype=torch.float64), temperature)
    rows = []
    for (prompt, answer), w, z in zip(answers, realised.tolist(), normalised):
        text = mo.conditioned(prompt, tuple(w)) if condition == "wic" else mo.ric_conditioned(prompt, z)
        rows.append(
            {
                "prompt": text,
                "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}],
            }
        )
    return rows, stats, realised


# ----------------------------------------------------------------------------------------------
# Its config: train.py's keys and the Meta-Aligner's own


@dataclass
class AlignerConfig(Config):
    """Config with the Meta-Aligner's keys (`python -m experiments.meta_aligner.meta_aligner --help`
    lists them after train.py's); the EXTRA_* class attributes are their checks, seeds and resume
    rules, which config.py and checkpoint.py read beside their own."""

    # --- the Meta-Aligner (experiments/meta_aligner), RECONSTRUCTED: [R] marks a reconstructed choice
    aligner_method: str = "meta_aligner"  # meta_aligner, pro (g_phi frozen), static (w ~ Dirichlet(1)), ric
    aligner_relabel: float = 0.5  # [R] lambda: a kept sample's target moved this far toward the trade-off it realised
    aligner_samples: int = 4  # [R] K: samples per prompt, the best under w . R kept (RiC: 1 each, K goals)
    aligner_explore: float = 0.1  # [R] eps: w = (1 - eps) g_phi(x) + eps Dirichlet(1) (meta_aligner only)
    aligner_weight_temperature: float = 0.1  # T_w of the realised weights softmax(R / T_w) (PRO's appendix)
    aligner_weight_interval: int = 8  # [R] T_meta: policy steps per weight-net update (MetaAPO's meta_k)
    aligner_weight_lr: float = 5e-3  # [R] the weight net's Adam (MetaAPO's meta learning rate)
    aligner_weight_fit_epochs: int = 10  # [R] stage 0: epochs of PRO's KL fit of g_phi to the chosen answers
    aligner_offline_epochs: int = 2  # [R] stage 0: epochs of conditional SFT on the offline answers (RiC)
    aligner_offline_lr: float = 1e-3  # [R] stage 0's conditional SFT, from the SFT model
    aligner_lr: float = 1e-4  # [R] the online conditional SFT (RiC: about a tenth of the offline rate)
    aligner_iterations: int = 2  # [R] online iterations (RiC: 2)
    aligner_prompts: int = 512  # prompts per online iteration
    aligner_batch_size: int = 16  # prompts per online policy step (one kept sample each; RiC: its kept share)
    aligner_eval_prompts: int = 512  # held-out prompts per point of the Pareto front (one sample each, top_p 0.9)
    # the stages before the online ones (sft/, offline_*/, data/), shareable by seeds; "" = out_dir
    aligner_shared_dir: str = ""

    EXTRA_CHOICES: ClassVar[dict] = {"aligner_method": ("meta_aligner", "pro", "static", "ric")}
    EXTRA_LIMITS: ClassVar[list] = [
        (
            ("aligner_weight_interval", "aligner_iterations", "aligner_prompts", "aligner_batch_size"),
            lambda v: v >= 1,
            "at least 1",
        ),
        (("aligner_eval_prompts",), lambda v: v >= 1, "at least 1"),
        (("aligner_samples",), lambda v: v >= 1, "at least 1"),
        (("aligner_weight_fit_epochs",), lambda v: v >= 0, "at least 0"),
        (("aligner_offline_epochs",), lambda v: v >= 1, "at least 1"),
        (("aligner_relabel", "aligner_explore"), lambda v: 0 <= v <= 1, "in [0, 1]"),
        (
            ("aligner_weight_temperature", "aligner_weight_lr", "aligner_offline_lr", "aligner_lr"),
            lambda v: v > 0,
            "positive",
        ),
    ]
    EXTRA_SEEDS: ClassVar[dict] = {
        "aligner rewards": lambda seed, i: seed + 31 * i,  # stage 0's reward noise (i = 0)
        "aligner prompts": lambda seed: seed + 53,  # the online prompts' order
        # round r of iteration t (its weights, goals, generation and reward noise)
        "aligner round": lambda seed, t, r: 1000 * seed + 100 * t + r + 1,
        "aligner front": lambda seed: seed + 4343,  # the held-out answers of the fronts
    }
    EXTRA_RESUME_HARMLESS: ClassVar[tuple] = ("aligner_eval_prompts",)
    EXTRA_PATH_KEYS: ClassVar[tuple] = ("aligner_shared_dir",)


# ----------------------------------------------------------------------------------------------
# The runs on the engine: the two-objective toy's config, stage 0, the online iterations

STAGE_SFT, STAGE_WIC, STAGE_RIC = "sft", "offline_wic", "offline_ric"
# the keys of the online iterations only: the shared stages (SFT, stage 0) hold their defaults
ONLINE_KEYS = (
    "aligner_method",
    "aligner_relabel",
    "aligner_samples",
    "aligner_explore",
    "aligner_weight_interval",
    "aligner_lr",
    "aligner_iterations",
    "aligner_prompts",
    "aligner_batch_size",
)
# the online keys that name a run's directory when they differ from their defaults
NAMED_KEYS = ONLINE_KEYS[1:] + ("aligner_weight_temperature", "aligner_weight_lr")


def data_seed(cfg: AlignerConfig) -> int:
    return cfg.data_seed if cfg.data_seed >= 0 else cfg.seed


def mo_assets_root(cfg: AlignerConfig) -> Path:
    return Path("out/toy_mo") / f"seed{data_seed(cfg)}"


def mo_config(argv: list[str], later_wins: bool = False) -> AlignerConfig:
    """The toy preset pointed at the two-objective toy's data (toy_multiobjective.ensure_mo_assets;
    --dataset=DIR: a data directory built by it elsewhere), with room for the condition in the
    prompt; out_dir defaults to out/meta_aligner-seed<N>."""
    cfg = parse_config(["--model=toy", *argv], later_wins, cls=AlignerConfig)
    given = any(a.split("=")[0] == "--dataset" for a in argv)  # a data directory built elsewhere (the tests)
    assets = toy.toy_asset_paths(Path(cfg.dataset) if given else mo_assets_root(cfg))
    cfg.model, cfg.dataset, cfg.sft_dataset = str(assets.base), str(assets.root), str(assets.sft)
    cfg.max_prompt_len, cfg.max_len = 24, 48
    if not any(a.startswith("--out_dir") for a in argv):
        cfg.out_dir = str(Path("out") / f"meta_aligner-seed{cfg.seed}")
    return cfg


def shared_dir(cfg: AlignerConfig) -> Path:
    return Path(cfg.aligner_shared_dir or cfg.out_dir)


def shared_config(cfg: AlignerConfig, **changes) -> AlignerConfig:
    """cfg for a stage before the online ones: in shared_dir, its seed the data's, the online keys
    at their defaults, so that every method and seed that reaches it (and --resume) sees the same
    config: the stages before the online ones depend on the data only."""
    defaults = AlignerConfig()
    online = {k: getattr(defaults, k) for k in ONLINE_KEYS}
    shared = dataclasses.replace(
        cfg, **{**online, "out_dir": str(shared_dir(cfg)), "seed": data_seed(cfg), "data_seed": -1, **changes}
    )
    shared.preset = getattr(cfg, "preset", "")
    return shared


def online_stage_name(cfg: AlignerConfig) -> str:
    """online-<method>, with each named key that differs from its default, e.g.
    online-meta_aligner-aligner_relabel_0.25."""
    defaults = AlignerConfig()
    switches = [f"{k}_{getattr(cfg, k):g}" for k in NAMED_KEYS if getattr(cfg, k) != getattr(defaults, k)]
    return "-".join([f"online-{cfg.aligner_method}", *switches])


def offline_stage(cfg: AlignerConfig) -> str:
    return STAGE_RIC if cfg.aligner_method == "ric" else STAGE_WIC


def prompt_tensors(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """g_phi's input: the prompts' token ids (no chat template, no condition), right-padded, and their mask."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(i) for i in ids)
    padded = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    return padded, mask


def ensure_sft(cfg: AlignerConfig, rt: Runtime) -> str:
    """The plain SFT model (the toy's teacher demonstrations, no condition): the SFT baseline and
    where stage 0 starts."""
    sft_cfg = shared_config(cfg, method="sft", init_from_config=True)
    if not (shared_dir(cfg) / STAGE_SFT / "done.json").exists():
        train.run_sft(sft_cfg, rt, STAGE_SFT)
    return str(shared_dir(cfg) / STAGE_SFT / "model")


def ensure_offline(cfg: AlignerConfig, rt: Runtime) -> Path:
    """Stage 0 [R: RiC's offline stage, PRO's fit]: conditional SFT from the SFT model on both
    answers of every offline row, each conditioned on what it realised (weights, or RiC's rewards),
    then (weights) g_phi fitted to the chosen answers' realised weights by KL. Its directory
    holds the model, weight_net.pt and the normalisation statistics (stats.json)."""
    sft_path = ensure_sft(cfg, rt)
    name = offline_stage(cfg)
    directory = shared_dir(cfg) / name
    stage_cfg = shared_config(
        cfg,
        method="sft",
        model=sft_path,
        init_from_config=False,
        sft_lr=cfg.aligner_offline_lr,
        sft_epochs=cfg.aligner_offline_epochs,
        aligner_method="ric" if name == STAGE_RIC else "meta_aligner",
        sft_dataset=str(shared_dir(cfg) / "data" / f"{name}.jsonl"),
    )
    complete = all((directory / f).exists() for f in ("done.json", "stats.json"))
    if complete and (name == STAGE_RIC or (directory / "weight_net.pt").exists()):
        return directory
    pref_rows = [row for _, row in data.iter_rows(cfg.dataset, cfg.train_split)]
    rows, stats, realised = conditional_rows(
        pref_rows,
        seed_for(stage_cfg, "aligner rewards", 0),
        "ric" if name == STAGE_RIC else "wic",
        cfg.aligner_weight_temperature,
    )
    if rt.main and not Path(stage_cfg.sft_dataset).exists():  # the same rows every time (the data's seed)
        data.write_jsonl(stage_cfg.sft_dataset, rows)
    barrier(rt)
    if not (directory / "done.json").exists():
        train.run_sft(stage_cfg, rt, name)
    if rt.main:
        write_json(directory / "stats.json", {"objectives": list(mo.MO_OBJECTIVES), "mean_std": stats})
        if name == STAGE_WIC and not (directory / "weight_net.pt").exists():
            tokenizer = data.load_tokenizer(directory / "model")
            learner = WeightLearner(len(tokenizer), lr=cfg.aligner_weight_lr, seed=stage_cfg.seed)
            ids, mask = prompt_tensors(tokenizer, [row["prompt"] for row in pref_rows])
            learner.fit(ids, mask, realised[0::2].float(), cfg.aligner_weight_fit_epochs)  # the chosen answers
            torch.save(learner.net.state_dict(), directory / "weight_net.pt.tmp")
            os.replace(directory / "weight_net.pt.tmp", directory / "weight_net.pt")
    barrier(rt)
    return directory


def offline_stats(directory: Path) -> list[tuple[float, float]]:
    """Stage 0's normalisation statistics, (mean, std) per objective, as ensure_offline wrote them."""
    return [tuple(s) for s in json.loads((directory / "stats.json").read_text())["mean_std"]]


def online_prompts(cfg: AlignerConfig) -> list[list[str]]:
    """The offline rows' prompts, shuffled, cut into aligner_iterations slices of aligner_prompts
    (wrapping around when the rows run out)."""
    prompts = [row["prompt"] for _, row in data.iter_rows(cfg.dataset, cfg.train_split)]
    prompts = shuffled(prompts, seed_for(cfg, "aligner prompts"))
    need = cfg.aligner_iterations * cfg.aligner_prompts
    prompts = (prompts * math.ceil(need / len(prompts)))[:need]
    return [prompts[t * cfg.aligner_prompts : (t + 1) * cfg.aligner_prompts] for t in range(cfg.aligner_iterations)]


class OnlineRun:
    """The online iterations of one method (stage 1 of the note's M1, and the baselines' online
    stages): the policy, g_phi and the rounds of aligner_weight_interval policy steps. A round
    samples every one of its prompts under the method's weights, keeps and relabels, then takes
    its policy steps; g_phi (meta_aligner) is updated from its buffer every T_meta steps."""

    def __init__(self, cfg: AlignerConfig, rt: Runtime):
        self.cfg, self.rt, self.method = cfg, rt, cfg.aligner_method
        self.offline = ensure_offline(cfg, rt)
        self.stats = offline_stats(self.offline)
        self.stage = Stage(cfg, rt, online_stage_name(cfg))
        self.latest = self.stage.start()
        self.model, self.tokenizer = load_logprob_model(str(self.offline / "model"), cfg, rt, trainable=True)
        self.learner = None
        if self.method in ("meta_aligner", "pro"):
            self.learner = WeightLearner(
                len(self.tokenizer), lr=cfg.aligner_weight_lr, interval=cfg.aligner_weight_interval, seed=cfg.seed
            )
            self.learner.net.load_state_dict(torch.load(self.offline / "weight_net.pt", map_location="cpu"))
        self.slices = online_prompts(cfg)
        self.round_prompts = cfg.aligner_batch_size * cfg.aligner_weight_interval
        self.rounds = math.ceil(cfg.aligner_prompts / self.round_prompts)
        total = cfg.aligner_iterations * math.ceil(cfg.aligner_prompts / cfg.aligner_batch_size)
        self.optimizer = make_optimizer(self.model, cfg.aligner_lr, cfg)
        self.scheduler = make_scheduler(self.optimizer, total, cfg)
        self.progress, self.position, self.kept, self.counts = Progress(), (0, 0), None, {"generated": 0, "kept": 0}
        if self.latest is not None:
            saved = self.stage.load_checkpoint(self.latest, self.model, self.optimizer, self.scheduler)
            self.progress, self.position, self.kept = saved_progress(saved), tuple(saved["position"]), saved["kept"]
            self.counts = saved["counts"]
            if self.learner is not None:
                self.learner.load_state(saved["learner"])

    def checkpoint_state(self) -> dict:
        return {
            "progress": dataclasses.asdict(self.progress),
            "position": list(self.position),
            "kept": self.kept,
            "counts": self.counts,
            "learner": self.learner.state() if self.learner is not None else None,
        }

    def weights(self, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        """The weights each prompt is sampled under: g_phi(x) explored (meta_aligner), g_phi(x)
        (pro, frozen), Dirichlet(1) draws (static)."""
        if self.method == "static":
            return explore(torch.full((len(prompts), len(mo.MO_OBJECTIVES)), 0.5), 1.0, generator)
        weights = self.learner.weights(*prompt_tensors(self.tokenizer, prompts))
        return explore(weights, self.cfg.aligner_explore, generator) if self.method == "meta_aligner" else weights

    def generate(self, texts: list[str], n: int, seed: int) -> list[list]:
        ids = [data.encode_prompt(self.tokenizer, [{"role": "user", "content": text}]) for text in texts]
        return distributed_generate(
            self.model, self.tokenizer, ids, "", n, self.cfg, self.rt, seed, self.stage.dir, backend="transformers"
        )

    def sample_round(self, t: int, r: int) -> list[dict]:
        """The round's kept samples, each {prompt, response, condition, target}: best-of-K under
        the asked weights, the target relabelled toward what it realised (WIC methods); or RiC's
        MORS, one sample per (prompt, goal), kept when any objective reaches its 0.7-quantile and
        conditioned on the rewards it obtained."""
        cfg, K = self.cfg, self.cfg.aligner_samples
        prompts = self.slices[t][r * self.round_prompts : (r + 1) * self.round_prompts]
        seed = seed_for(cfg, "aligner round", t, r)
        rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
        if self.method == "ric":
            requests = [(p, ric_sample_goals(len(mo.MO_OBJECTIVES), rng)) for p in prompts for _ in range(K)]
            generations = self.generate([mo.ric_conditioned(p, goal) for p, goal in requests], 1, seed)
            answers = [(p, g[0].text) for (p, _), g in zip(requests, generations)]
            obtained = [mo.normalise(mo.reward_signal(p, a, rng), self.stats) for p, a in answers]
            keep = ric_keep(torch.tensor(obtained))
            self.counts["generated"] += len(answers)
            kept = [
                {"prompt": p, "response": a, "condition": mo.ric_conditioned(p, z), "target": None}
                for (p, a), z, k in zip(answers, obtained, keep)
                if k
            ]
            self.counts["kept"] += len(kept)
            return kept
        asked = self.weights(prompts, generator)
        generations = self.generate([mo.conditioned(p, tuple(w)) for p, w in zip(prompts, asked.tolist())], K, seed)
        self.counts["generated"] += K * len(prompts)
        kept = []
        for prompt, w, samples in zip(prompts, asked, generations):  # explicit: one prompt's K samples at a time
            rewards = torch.tensor([mo.normalise(mo.reward_signal(prompt, s.text, rng), self.stats) for s in samples])
            best = best_of_k(w, rewards)
            strength = cfg.aligner_relabel if self.method == "meta_aligner" else 0.0
            target = relabel(
                w.view(1, -1), realised_weights(rewards[best : best + 1], cfg.aligner_weight_temperature), strength
            )[0]
            kept.append(
                {
                    "prompt": prompt,
                    "response": samples[best].text,
                    "condition": mo.conditioned(prompt, tuple(target.tolist())),
                    "asked": w.tolist(),
                    "target": target.tolist(),
                }
            )
        self.counts["kept"] += len(kept)
        return kept

    def step_batches(self, kept: list[dict], n_prompts: int) -> list[list]:
        """The round's policy steps: its kept samples cut into as many global batches as its
        n_prompts make at aligner_batch_size (so every method takes the same number of steps)."""
        steps = math.ceil(n_prompts / self.cfg.aligner_batch_size)
        examples = [data.SFTExample([{"role": "user", "content": k["condition"]}], k["response"]) for k in kept]
        tokenized, _ = data.tokenize_sft(examples, self.tokenizer, self.cfg.max_prompt_len, self.cfg.max_len)
        size = math.ceil(len(tokenized) / steps)
        return [tokenized[i : i + size] for i in range(0, len(tokenized), size)] if tokenized else []

    def sft_loss(self, items, mask, n_tokens, world):
        batch = data.collate_sft(items, self.tokenizer.pad_token_id)
        device = self.rt.device
        logps = self.model(
            batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["response_mask"].to(device)
        )
        total = -(logps * mask).sum()
        return total * world / n_tokens, {"loss": total.item() / n_tokens}

    def run(self) -> dict:
        cfg = self.cfg
        t0, r0 = self.position
        for t in range(t0, cfg.aligner_iterations):
            for r in range(r0 if t == t0 else 0, self.rounds):
                resumed = (t, r) == tuple(self.position) and self.kept is not None
                if not resumed:
                    self.position, self.progress.batch = (t, r), 0
                    self.kept = self.sample_round(t, r)
                self.train_round(t, r)
            check_stop(self.rt, f"[{self.stage.name}] stopped after iteration {t + 1}")
            export_hf(
                self.model,
                self.model.lm,
                self.tokenizer,
                self.stage.dir / f"iter{t + 1}",
                self.cfg,
                self.rt,
                prefix="lm.",
            )
            if self.rt.main and self.learner is not None:
                torch.save(self.learner.net.state_dict(), self.stage.dir / f"iter{t + 1}" / "weight_net.pt")
            barrier(self.rt)
        summary = {"train_time_s": self.stage.elapsed_s(), "steps": self.progress.step, **self.counts}
        summary["models"] = [str(self.stage.dir / f"iter{t}") for t in range(1, cfg.aligner_iterations + 1)]
        self.stage.finish(summary)
        return summary

    def train_round(self, t: int, r: int) -> None:
        """The round's conditional SFT steps; meta_aligner pushes each step's (x, w~) to g_phi's
        buffer and updates g_phi when it holds T_meta steps (before the step's checkpoint, so a
        resumed run never repeats or loses an update)."""
        n_prompts = len(self.slices[t][r * self.round_prompts : (r + 1) * self.round_prompts])
        training = TrainingPass(
            self.stage,
            self.model,
            self.optimizer,
            self.scheduler,
            self.step_batches(self.kept, n_prompts),
            self.progress,
            f"iteration {t + 1} round {r + 1}/{self.rounds}",
            checkpoint_extras=self.checkpoint_state,
            log_extra={"iteration": t + 1, "round": r + 1},
            save_period=self.cfg.save_every or self.cfg.aligner_weight_interval,
        )
        for batch in training:
            record, _ = training.step(batch, self.sft_loss, sum(len(e.response_ids) for e in batch))
            rows = [self.kept[e.index] for e in batch]
            gold = [mo.gold_scores(x["prompt"], x["response"]) for x in rows]
            record["kept_helpful"], record["kept_harmless"] = (sum(g[i] for g in gold) / len(gold) for i in range(2))
            if self.method != "ric":
                for tag in mo.MO_TAGS:  # the harmless weight each tag's prompts were sampled under
                    asked = [x["asked"][1] for x in rows if x["prompt"].startswith(tag)]
                    record[f"asked_harmless_{tag}"] = sum(asked) / len(asked) if asked else float("nan")
            if self.method == "meta_aligner":
                ids, mask = prompt_tensors(self.tokenizer, [x["prompt"] for x in rows])
                self.learner.append(ids, mask, torch.tensor([x["target"] for x in rows]))
                if self.learner.ready():
                    record.update(self.learner.update())
            training.end_step(record)


def ensure_online(cfg: AlignerConfig, rt: Runtime) -> dict:
    """The online stage's summary: its done.json once it finished, else the stage run (or resumed)."""
    done = Path(cfg.out_dir) / online_stage_name(cfg) / "done.json"
    return read_json(done) if done.exists() else OnlineRun(cfg, rt).run()


def main(argv: list[str] | None = None) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(config_help(__doc__.strip().split("\n\n")[0], AlignerConfig, "-m experiments.meta_aligner.meta_aligner"))
        return
    try:
        cfg = mo_config(argv)
    except ConfigError as err:
        raise SystemExit(f"meta_aligner: {err}") from None
    with entry_process(cfg) as rt:
        try:
            if rt.main and not any(a.split("=")[0] == "--dataset" for a in argv):
                mo.ensure_mo_assets(data_seed(cfg))
            barrier(rt)
            summary = ensure_online(cfg, rt)
            print0(rt, f"[meta_aligner] {Path(cfg.out_dir) / online_stage_name(cfg)}: {json.dumps(summary)}")
        except Stopped as err:
            stop_exit(f"{err}; continue with the same command and --resume", "experiments.meta_aligner.meta_aligner")
        except (ConfigError, NonFiniteLoss, data.DataError) as err:
            raise SystemExit(f"meta_aligner: {err}") from None


if __name__ == "__main__":
    # checkpoints pickle experiments.meta_aligner.meta_aligner.X, not __main__.X (as train.py)
    from experiments.meta_aligner import meta_aligner

    meta_aligner.main()
