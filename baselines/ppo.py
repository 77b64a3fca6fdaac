"""
PPO, OpenRLHF-style (the paper's Table 1 and 8 row): the actor starts from the SFT model, the
critic from the reward model (its score head read at every position); the reward is the reward
model's score of the whole response minus a per-token KL penalty to the SFT model, advantages
come from GAE, and the losses are PPO's clipped policy and value losses. Each rollout samples one
response for rollout_batch_size prompts, then trains one pass over them.

Run
    python train.py --method=ppo
    torchrun --nproc_per_node 8 train.py --method=ppo --model tulu8b --reward_model RM
Resumable like every stage; the rollout's generation and scores are kept in pieces as they finish.

Deliberate simplifications
- One epoch per rollout (OpenRLHF's default), no reward normalisation beyond the clip to [-10, 10].
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import checkpoint
import config
import data
import dpo
import engine
import reward


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
def score_rollouts(items: list[Rollout], actor, ref, critic, cfg: config.Config, rt: engine.Runtime) -> None:
    """Fill in each rollout's old log-probs, values, KL, advantages and returns (every rank gets all
    of them; strided shares as in pair_scores), then whiten the advantages over the rollout."""
    forward_batch = max(1, cfg.micro_batch_size) * 4
    share = list(range(rt.rank, len(items), rt.world))
    padded = share + [share[0] if share else 0] * (math.ceil(len(items) / rt.world) - len(share))
    results = []
    for start in range(0, len(padded), forward_batch):
        batch_items = [items[i] for i in padded[start : start + forward_batch]]
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
    for part in engine.all_gather_objects(rt, list(zip(share, results))):
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


def make_ppo_loss(cfg: config.Config, model: ActorCritic, rt: engine.Runtime):
    """PPO's clipped policy loss plus its clipped value loss, each a token mean per response."""

    def ppo_loss(items, kept, batch_size, world):
        batch = data.collate_sequences([r.prompt_ids for r in items], [r.response_ids for r in items], items[0].pad_id)
        mask = batch["response_mask"].to(rt.device).float()  # tokens; `kept` masks padding rollouts out
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
        total = ((policy_loss + value_loss) * kept).sum()
        n = kept.sum().item()
        clipped_share = (((ratio - 1).abs() > cfg.ppo_clip).float() * mask).sum(-1) / tokens
        return total * world / batch_size, {
            "loss": total.item() / batch_size,
            "policy_loss_sum": (policy_loss * kept).sum().item(),
            "policy_loss_count": n,
            "value_loss_sum": (value_loss * kept).sum().item(),
            "value_loss_count": n,
            "clip_fraction_sum": (clipped_share * kept).sum().item(),
            "clip_fraction_count": n,
            "score_sum": sum(r.score * w for r, w in zip(items, kept.tolist())),
            "score_count": n,
            "kl_sum": sum(r.kl * w for r, w in zip(items, kept.tolist())),
            "kl_count": n,
        }

    return ppo_loss


def rollout_pieces(stage: checkpoint.Stage, rt: engine.Runtime, r: int) -> engine.Pieces:
    """Where rollout r keeps its generation and scores as they finish. The actor that generates them
    is the one rollout r - 1's pass left: a resumed run retrains the same steps to it (bit for bit
    with --deterministic) before it reads them back."""
    return engine.Pieces(
        stage.dir / f"rollout{r + 1}", rt, f"[ppo] stopped during rollout {r + 1}'s generation and scoring"
    )


def collect_rollout(
    cfg: config.Config,
    rt: engine.Runtime,
    stage: checkpoint.Stage,
    r: int,
    prompts: list,
    raw: list,
    tokenizer,
    actor,
    ref,
    critic,
    rm,
) -> list[Rollout]:
    """Rollout r: one answer per prompt from the current actor, scored by the reward model, then
    per-token KL to the SFT model, values and GAE advantages (score_rollouts). Generation and
    scores are kept in pieces (rollout_pieces) as they finish."""
    tic = time.time()
    pieces = rollout_pieces(stage, rt, r)
    policy_path = config.sft_path(cfg)
    if cfg.generator == "vllm":  # the worker reads the current actor from disk
        policy_path = str(stage.dir / "rollout_actor")
        engine.export_hf(actor, actor.lm, tokenizer, Path(policy_path), cfg, rt, prefix="lm.")
    generations = engine.distributed_generate(
        actor,
        tokenizer,
        [p.prompt_ids for p in prompts],
        policy_path,
        1,
        cfg,
        rt,
        config.seed_for(cfg, "ppo rollout", r),
        stage.dir,
        pieces=pieces,
    )
    answers = [g[0] for g in generations]
    parts = pieces.run(
        "rewards",
        math.ceil(len(prompts) / engine.PIECE),
        lambda k: rm.score(
            [raw[p.index].prompt for p in prompts[k * engine.PIECE : (k + 1) * engine.PIECE]],
            [a.text for a in answers[k * engine.PIECE : (k + 1) * engine.PIECE]],
            [a.finish_reason == "stop" for a in answers[k * engine.PIECE : (k + 1) * engine.PIECE]],
        ),
    )
    scores = [score for part in parts for score in part]
    engine.check_stop(rt, pieces.where)
    room = [cfg.max_len - len(p.prompt_ids) for p in prompts]
    samples = [
        Rollout(p.prompt_ids, a.token_ids[:n] or [tokenizer.eos_token_id], p.index, tokenizer.pad_token_id, s)
        for p, a, s, n in zip(prompts, answers, scores, room)
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


def run_ppo(cfg: config.Config, rt: engine.Runtime) -> dict:
    """PPO over the offline prompts: rollouts of rollout_batch_size prompts, each one response
    from the actor scored by the reward model, then one pass of PPO steps over them."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = data.load_tokenizer(config.sft_path(cfg))
    pairs, raw = dpo.train_pairs(cfg, rt, tokenizer)
    prompts = engine.shuffled(pairs, config.seed_for(cfg, "ppo prompts"))
    rollouts = [prompts[i : i + cfg.rollout_batch_size] for i in range(0, len(prompts), cfg.rollout_batch_size)]
    stage = checkpoint.Stage(cfg, rt, "ppo")
    latest = stage.start()
    actor, _ = engine.load_logprob_model(config.sft_path(cfg), cfg, rt, trainable=True)
    ref = engine.load_logprob_model(config.sft_path(cfg), cfg, rt, trainable=False)[0]
    critic_lm, files, missing = engine.load_pretrained(
        AutoModelForSequenceClassification, config.reward_path(cfg), rt, engine.MASTER_DTYPE, num_labels=1
    )
    reward.require_reward_head(
        config.reward_path(cfg), critic_lm, {"missing_keys": missing}
    )  # it starts from the trained head
    critic = engine.shard_model(ValueModel(critic_lm), critic_lm, cfg, rt, trainable=True)
    if files:
        engine.load_shards(critic, "rm.", files, rt)
    rm = engine.load_reward_model(config.reward_path(cfg), cfg, rt)
    model = ActorCritic(actor, critic)
    optimizer = torch.optim.AdamW(
        [
            {"params": engine.trainable_parameters(actor), "lr": cfg.lr},
            {"params": engine.trainable_parameters(critic), "lr": cfg.critic_lr},
        ],
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
    )
    steps = sum(math.ceil(len(r) * cfg.epochs / cfg.batch_size) for r in rollouts)
    scheduler = engine.make_scheduler(optimizer, steps, cfg)
    state = {
        "rollout": 0,
        "samples": None,
        "progress": dataclasses.asdict(engine.Progress()),
        "times": {"sampling_s": 0.0, "training_s": 0.0},
        "annotations": 0,
    }
    if latest is not None:
        state = stage.load_checkpoint(latest, model, optimizer, scheduler)["ppo"]
    progress = engine.saved_progress(state)
    state.pop("loop", None)
    save = lambda: {"ppo": {**state, "progress": dataclasses.asdict(progress)}}  # noqa: E731
    loss_fn = make_ppo_loss(cfg, model, rt)
    for r in range(state["rollout"], len(rollouts)):
        if state["samples"] is None:  # sample, score, and estimate advantages
            tic = time.time()
            samples = collect_rollout(cfg, rt, stage, r, rollouts[r], raw, tokenizer, actor, ref, critic, rm)
            state.update(samples=samples, annotations=state["annotations"] + len(samples))
            state["times"]["sampling_s"] += time.time() - tic
        tic = time.time()
        batches = engine.epoch_batches(
            state["samples"], cfg.epochs, cfg.batch_size, config.seed_for(cfg, "ppo rollout", r)
        )
        engine.optimize(
            stage,
            model,
            optimizer,
            scheduler,
            batches,
            loss_fn,
            progress,
            f"rollout {r + 1}/{len(rollouts)}",
            checkpoint_extras=save,
            log_extra={"rollout": r + 1},
            save_period=cfg.save_every or max(1, math.ceil(steps / 10)),
        )
        state["times"]["training_s"] += time.time() - tic
        state.update(rollout=r + 1, samples=None)
        progress.batch = 0
        rollout_pieces(stage, rt, r).remove()
    engine.export_hf(actor, actor.lm, tokenizer, stage.model_dir, cfg, rt, prefix="lm.")
    summary = {
        "annotation_ratio": state["annotations"] / max(1, len(prompts)) / cfg.num_samples,
        **state["times"],
        "steps": progress.step,
        "rollouts": len(rollouts),
        "total_s": stage.elapsed_s(),
    }
    stage.log({"phase": "done", **summary})
    stage.finish(summary)
    return summary
