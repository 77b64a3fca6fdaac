"""
The objective MetaAPO builds on, and the offline methods: a stage's preference pairs, the
concatenated forward of a batch's answers, L_pref and the preference score (Eq. 3 and 4, SimPO's
A.9, IPO), the offline objectives (DPO, IPO, SimPO, SLiC-HF, KTO with its batch reference point),
one offline pass (`run_offline`, the DPO warm-up among them) and the scores of every pair.

Run
    python train.py --method=dpo        # the DPO warm-up (also ipo, kto, simpo, slic)
    torchrun --nproc_per_node 8 train.py --method=dpo --model tulu8b
Distributed through engine.py; the losses themselves are pure functions in losses.py.

Deliberate simplifications
- IPO sums log-ratios (its Eq. 17, the reference code; --ipo_length_normalized: TRL's form) and
  SLiC-HF sums its NLL (--slic_nll=mean: TRL's CPO form).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

import data
import losses
import meta
from checkpoint import Stage, prepare_pass, write_json
from config import (
    OBJECTIVES,
    Config,
    describe,
    reference_path,
    require_test_source,
    seed_for,
    sft_path,
    train_source,
)
from engine import (
    Runtime,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    epoch_batches,
    export_hf,
    global_batches,
    load_logprob_model,
    optimize,
    print0,
    progress_state,
)

# ==============================================================================================
# A stage's preference pairs


@dataclass
class PolicyPair(data.TokenizedPair):
    """A tokenized pair that knows its tokenizer's pad id (for collation), for keep_unsampled a
    fixed Eq. 5 weight, and for SELM an answer the policy gave itself."""

    pad_id: int = 0
    weight_override: float | None = None
    own_ids: list[int] | None = None


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
# The concatenated forward and the objectives

OFFLINE_ROLES = ("chosen_ids", "rejected_ids")

ONLINE_ROLES = ("online_chosen_ids", "online_rejected_ids")

SPLIT_SAVING = 0.25  # the online pair gets a forward of its own when that pads at least this share fewer tokens


def padded_tokens(items: list, roles: tuple[str, ...]) -> int:
    """Tokens one forward of these answers of `items` runs on: every row padded to the longest."""
    return len(items) * len(roles) * max(len(p.prompt_ids) + len(getattr(p, role)) for p in items for role in roles)


def online_split(items: list, rt: Runtime, extra_roles: tuple[str, ...] = ()) -> bool:
    """Whether MetaAPO's online pair (the policy's own answers, often far shorter than the offline
    ones) gets a forward of its own: when that pads at least SPLIT_SAVING fewer tokens on the rank
    that pads most, which sets the pace. Collective: under FSDP2 every forward all-gathers each
    block's weights and every backward reduce-scatters their gradients, so all ranks must run the
    same number of forwards; they agree from the max over every rank's micro-batch, rather than
    each deciding on its own one (ranks that split while others did not would hang at their next
    collective). Measured with scripts/bench_tuple_forward.py on CPU: 4k-token offline and 1k-token
    online answers run forward and backward 1.37x faster in two forwards; at the toy's shapes, where
    two forwards pad 3% fewer tokens, one forward is as fast (0.97x)."""
    joint = padded_tokens(items, OFFLINE_ROLES + ONLINE_ROLES + extra_roles)
    apart = padded_tokens(items, OFFLINE_ROLES) + padded_tokens(items, ONLINE_ROLES + extra_roles)
    tokens = all_reduce_max(rt, torch.tensor([apart, joint], dtype=torch.float64)).tolist()
    return tokens[0] <= (1 - SPLIT_SAVING) * tokens[1]


def pair_forward(
    model, items: list, rt: Runtime, online: bool = False, extra_roles: tuple[str, ...] = (), split: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-prob sums and response lengths, (n_roles, B) each: rows chosen, rejected
    (, online chosen, online rejected) (, extra roles).

    One concatenated forward (the DPO repository's), so FSDP gathers each weight once; with
    `split` (online_split's decision, the same on every rank) the online pair and the extra roles
    get a second forward of their own, each padded to its own longest row."""
    groups = [(items, online, extra_roles)]
    if online and split:
        as_pairs = [
            dataclasses.replace(p, chosen_ids=p.online_chosen_ids, rejected_ids=p.online_rejected_ids) for p in items
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


def pair_metrics(out: losses.PairLoss, mask: torch.Tensor, prefix: str = "") -> dict:
    n = mask.sum().item()
    return {
        f"{prefix}reward_accuracy_sum": ((out.chosen_rewards > out.rejected_rewards).float() * mask).sum().item(),
        f"{prefix}margin_sum": ((out.chosen_rewards - out.rejected_rewards) * mask).sum().item(),
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

    def preference_loss(items, mask, batch_size, world):
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
        total = (out.losses * mask).sum()
        return total * world / batch_size, {"loss": total.item() / batch_size, **pair_metrics(out, mask)}

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
    forward_batch = max(1, cfg.micro_batch_size) * 2
    policy_logps, ref_logps, mask = [], [], []
    for start in range(0, rounds, forward_batch):  # the same number of forwards on every rank (padding weighted 0)
        part = share[start : start + forward_batch]
        mask.append(
            torch.tensor([1.0] * len(part) + [0.0] * (min(forward_batch, rounds - start) - len(part)), device=rt.device)
        )
        part = part + [mismatched[0]] * (len(mask[-1]) - len(part))
        tensors = data.collate_sequences([x for x, _ in part], [y for _, y in part], batch[0].pad_id)
        inputs = [tensors[k].to(rt.device) for k in ("input_ids", "attention_mask", "response_mask")]
        policy_logps.append(policy(*inputs))
        ref_logps.append(ref(*inputs))
    return losses.kto_reference_kl(
        torch.cat(policy_logps), torch.cat(ref_logps), torch.cat(mask), lambda totals: all_reduce_sum(rt, totals)
    )


# ==============================================================================================
# Offline methods and the scores of every pair


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
    pairs, _ = train_pairs(cfg, rt, data.load_tokenizer(sft_path(cfg)))
    if keep is not None:
        pairs = keep(pairs)
    stage = Stage(cfg, rt, name or method)
    latest = stage.start()
    policy, tokenizer = load_logprob_model(sft_path(cfg), cfg, rt, trainable=True)
    ref = None if method in ("simpo", "slic") else load_logprob_model(reference_path(cfg), cfg, rt, trainable=False)[0]
    batches = (
        epoch_batches(pairs, cfg.epochs, cfg.batch_size, seed_for(cfg, "batches"))
        if shuffle
        else global_batches(pairs * cfg.epochs, cfg.batch_size)
    )
    optimizer, scheduler, progress = prepare_pass(stage, latest, policy, cfg.lr, len(batches), cfg)
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
            if progress.step in checkpoints and str(progress.step) not in done:
                scores = pair_scores(policy, ref, validate, dataclasses.replace(cfg, objective="dpo"), rt)
                if rt.main:
                    losses_now = {str(p.index): -s.score for p, s in zip(validate, scores)}  # DPO loss = -l
                    write_json(path, {**done, str(progress.step): losses_now})
                barrier(rt)
            return {}

    optimize(
        stage,
        policy,
        optimizer,
        scheduler,
        batches,
        make_preference_loss(cfg, method, policy, ref, rt, kto),
        progress,
        f"{len(pairs)} pairs",
        checkpoint_extras=progress_state(progress),
        before_batch=before_batch,
        after_step=after_step,
    )
    export_hf(policy, policy.lm, tokenizer, stage.model_dir, cfg, rt, prefix="lm.")
    summary = {"train_time_s": stage.elapsed_s(), "steps": progress.step, "pairs": len(pairs)}
    stage.finish(summary)
    return summary


class PairScores(NamedTuple):
    """What pair_scores gives per pair (l_off, for Algorithm 1's offline tuples)."""

    score: float  # the preference score l (Eq. 4; A.9 for simpo)
    meta_input: float  # h's input: l with meta_input_beta (meta.meta_input_score)
    chosen_logratio: float  # log pi(y_w|x) - log pi_ref(y_w|x)
    rejected_logratio: float  # log pi(y_l|x) - log pi_ref(y_l|x)


@torch.no_grad()
def pair_scores(policy, ref, items: list, cfg: Config, rt: Runtime) -> list[PairScores]:
    """The PairScores of every pair, on every rank. Each rank scores a strided share, padded to
    equal length so that sharded models run the same forwards, in forwards of 4 micro-batches (no
    gradients, so no activations kept)."""
    forward_batch = max(1, cfg.micro_batch_size) * 4
    share = list(range(rt.rank, len(items), rt.world))
    padded = share + [share[0] if share else 0] * (math.ceil(len(items) / rt.world) - len(share))
    results = []
    for start in range(0, len(padded), forward_batch):
        batch = [items[i] for i in padded[start : start + forward_batch]]
        logps, lengths = pair_forward(policy, batch, rt)
        ref_logps = pair_forward(ref, batch, rt)[0] if ref is not None else torch.zeros_like(logps)
        score = objective_losses(cfg, logps, ref_logps, lengths)[1]
        ratios = logps - ref_logps
        meta_input = meta.meta_input_score(cfg.objective, cfg.beta, cfg.meta_input_beta, score, logps, ref_logps)
        columns = (score.tolist(), meta_input.tolist(), ratios[0].tolist(), ratios[1].tolist())
        results += [PairScores(*values) for values in zip(*columns)]
    merged = {}
    for part in all_gather_objects(rt, list(zip(share, results))):
        merged.update(part)
    return [merged[i] for i in range(len(items))]
