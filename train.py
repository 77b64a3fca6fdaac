"""
MetaAPO (Yang et al. 2025): Algorithm 1, the stages it needs, and the pipeline around them.

Algorithm 1 comes first (`run_iterative`, tagged with the paper's line numbers): for each
iteration t of --iterations (T), phase 1 scores every offline tuple of D_t under (pi_theta, pi_ref)
(Eq. 4, l_off), gates it with the meta-learner h_phi (--sampling), generates --num_samples (K)
answers for the tuples it sends and pairs the reward model's best and worst; phase 2 trains the
policy one epoch on the Eq. 5 loss (--objective, --beta, --weighting) and updates h_phi on Eq. 6
every --meta_interval (T_meta) policy steps; the reference follows one iteration behind. The
online baselines (online_dpo, selm, adpo, the on-policy/static boundary method) share the structure; their
differences are small functions of their own. Then the stages before Algorithm 1 (SFT for the
toy, the reward model of Eq. 1), the results table and `main`.

Run
    python train.py                                   # the toy pipeline on CPU: SFT -> reward model
                                                      # -> DPO warm-up -> MetaAPO -> results table
    python train.py --method=online_dpo               # one more method on the same toy run
    python train.py --sampling=random                 # a MetaAPO ablation (stage metaapo-sampling_random)
    torchrun --nproc_per_node 8 train.py --model tulu8b                   # the paper's Llama-3.1-8B run
    torchrun --nproc_per_node 8 train.py --model qwen7b --reward_model RM  # with a given reward model
    python train.py --resume                          # continue an interrupted run where it stopped
    python train.py --help                            # every key (config.py) with its default
Every stage writes <out_dir>/<stage>/: config.json, metrics.jsonl, checkpoints/ (resumable) and
model/ (HF safetensors + tokenizer). The bookkeeping around Algorithm 1's loop (slices, the
iterations' models, checkpoints and resume) is iterative_run.py; the engine is engine.py (ranks,
sharding, the optimisation step, generation) and checkpoint.py (stage directories, resume); the
offline methods are dpo.py, the other baselines baselines/; the memory plan and --dry_run are
plan.py.

Deliberate simplifications
- Each MetaAPO iteration reloads the policy from the previous iteration's HF export (written in
  fp32 but for the last, so no progress is rounded away) and starts a fresh AdamW and LR schedule
  (warm-up + cosine over that iteration's steps), as the reference implementation does; the
  meta-learner, its optimizer and its buffer persist across iterations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

import baselines.boundary
import baselines.ppo
import baselines.selective_dpo
import checkpoint
import config
import data
import dpo
import engine
import iterative_run
import losses
import meta
import plan
import reward
import sample
import smollm2
import toy

# ==============================================================================================
# Algorithm 1


def run_iterative(cfg: config.Config, rt: engine.Runtime, method: str) -> dict:
    """Algorithm 1 for metaapo; online_dpo, selm, adpo and boundary in the same iteration structure.
    The bookkeeping (data, meta-learner, checkpoints, where a resumed run stopped) is IterativeRun's."""
    # D_off cut into D_1..D_T (line 2), h_phi, and a resumed run's position
    run = iterative_run.IterativeRun(cfg, rt, method)
    for t in range(run.state.iteration, cfg.iterations):  # Alg. 1 line 3: for t = 1..T
        policy, ref, policy_path = run.load_models(t)  # pi_theta, and pi_ref as line 23 left it
        if run.state.augmented is None:  # phase 1 (lines 4-12), unless a resumed run had finished it
            pieces = run.phase_one_pieces(t)  # kept as they finish: a stop loses seconds, not the phase
            run.state.augmented = online_sampling(run, t, policy, ref, policy_path, pieces)
            run.checkpoint_between_phases()
            pieces.remove()
        preference_optimization(run, t, policy, ref)  # phase 2 (lines 13-22): Eq. 5 steps, Eq. 6 every T_meta
        run.end_iteration(t, policy)  # line 23: pi_theta exported, the next start and the reference after it
        del policy, ref
        engine.release_memory()
    return run.finish()


def online_sampling(
    run: iterative_run.IterativeRun, t: int, policy, ref, policy_path: str, pieces: engine.Pieces
) -> list[dpo.PolicyPair]:
    """Phase 1, meta-weighted adaptive online sampling (Alg. 1 lines 4-12): D_aug of iteration t,
    its work kept in `pieces` as it finishes. A baseline chooses its prompts and its training pairs
    with rules of its own (run.baseline, baselines/online.py) where MetaAPO uses h_phi."""
    cfg, rt, baseline, D_t = run.cfg, run.rt, run.baseline, run.slices[t]
    tic = time.time()
    scores, w, boundary = None, [], None
    if baseline is None or baseline.scores_offline:  # line 6: l_off of every tuple under (pi_theta, pi_ref), Eq. 4
        score_piece = lambda k: dpo.pair_scores(policy, ref, D_t[k * engine.PIECE : (k + 1) * engine.PIECE], cfg, rt)  # noqa: E731
        scores = [s for part in pieces.run("scores", math.ceil(len(D_t) / engine.PIECE), score_piece) for s in part]
    if baseline is None:  # lines 7-8: w = h(l_off), u ~ U(0, 1), generate when u > w
        selected, w = meta_gate(run.meta, scores, cfg, rt)
    else:  # every prompt, a threshold on l_off, or the boundary method's score
        if baseline.measures_boundary:
            boundary = baselines.boundary.boundary_measurement(
                cfg, rt, policy, run.tokenizer, policy_path, D_t, run.raw, run.stage, t, pieces
            )
        selected = baseline.select(cfg, D_t, [s.score for s in scores] if scores else None, boundary)
    sampled = [i for i, s in enumerate(selected) if s]
    # line 9: K responses from the current policy
    generations = engine.distributed_generate(
        policy,
        run.tokenizer,
        [D_t[i].prompt_ids for i in sampled],
        policy_path,
        cfg.num_samples,
        cfg,
        rt,
        config.seed_for(cfg, "phase 1 generation", t),
        run.stage.dir,
        pieces=pieces,
    )
    pairs, pair_stats = annotate(run, D_t, sampled, generations, pieces)  # lines 10-11: ranked by r, best and worst
    # SELM's optimism term needs an answer of the policy's own: the first of its K samples (SELM's code: a greedy one)
    own = [g[0].token_ids for g in generations] if baseline is not None and baseline.selm else None
    # line 12: D_aug (MetaAPO keeps a tuple whose K rewards tie, with a zero-gradient (y, y) online pair)
    keeps_ties = (baseline is None or baseline.keeps_ties) and cfg.tied_samples == "keep"
    tied = [g[0].token_ids for g in generations] if keeps_ties else None
    joined = join_online_pairs(cfg, D_t, sampled, pairs, own, tied)
    if baseline is not None:
        augmented = baseline.training_pairs(D_t, joined, selected)
    else:
        augmented = joined + (unsampled_tuples(D_t, selected) if cfg.keep_unsampled else [])
    tic -= pieces.restored_s  # the phase's time includes its pieces a stopped run had finished
    run.record_sampling(t, scores, selected, w, sampled, pairs, pair_stats, augmented, boundary, tic)
    return augmented


def meta_gate(
    meta_learner: meta.MetaController, scores: list, cfg: config.Config, rt: engine.Runtime
) -> tuple[list[bool], list[float]]:
    """Alg. 1 lines 7-8 for every tuple of D_t: w = h(l_off), u ~ U(0, 1), generate when u > w.
    (selected, w) decided once: every rank draws its u (their generators stay in step), and rank
    0's decision is the one they all use, since h_phi on two GPUs need not agree to the last bit,
    and ranks that sent different prompts to generation would run different rounds of it."""
    l_off, meta_input, chosen_ratio, rejected_ratio = (torch.tensor(column) for column in zip(*scores))
    decision = meta_learner.gate(
        l_off, meta.meta_features(meta_input, chosen_ratio, rejected_ratio, inputs=cfg.meta_inputs)
    )
    return engine.all_gather_objects(rt, (decision.selected.tolist(), decision.weights.tolist()))[0]


def preference_optimization(run: iterative_run.IterativeRun, t: int, policy, ref) -> None:
    """Phase 2 (Alg. 1 lines 13-22), one epoch over D_aug: each step the Eq. 5 loss on pi_theta and
    the step's detached scores into the meta buffer; every T_meta steps one Eq. 6 step on h_phi.
    The baselines train their objective on the pairs their rule gave, with no meta-learner."""
    cfg, meta_learner, progress = run.cfg, run.meta, run.state.progress
    if not run.state.augmented:
        run.stage.log({"iteration": t + 1, "phase": "train", "skipped": "no augmented tuple"})
        engine.print0(run.rt, f"[{run.name}] iteration {t + 1}: no augmented tuple, nothing to train on; skipped")
        return
    tic = time.time()
    batches, optimizer, scheduler = run.resumed_pass or iterative_run.iteration_pass(
        policy, run.state.augmented, t, cfg
    )
    if meta_learner is not None:
        loss_fn = metaapo_loss(cfg, policy, ref, meta_learner, run.rt)
    else:
        optimism = cfg.selm_alpha if run.baseline.selm else 0.0
        loss_fn = dpo.make_preference_loss(cfg, cfg.objective, policy, ref, run.rt, optimism=optimism)
    desc, extra = f"iteration {t + 1}/{cfg.iterations}", {"iteration": t + 1}
    training = engine.TrainingPass(
        run.stage,
        policy,
        optimizer,
        scheduler,
        batches,
        progress,
        desc,
        checkpoint_extras=run.checkpoint_state,
        log_extra=extra,
    )
    gate_vs_gain = []  # per buffered tuple: 1 - w and whether its online pair scored above its offline one
    for batch in training:  # line 13: the global batches of D_aug
        # lines 14-17: w = h(l_off) with the current theta, the Eq. 5 loss, one AdamW step on theta
        record, scores = training.step(batch, loss_fn)
        if meta_learner is not None:
            # line 18: the step's detached (l_off, l_on) go to the meta buffer
            l_off, l_on, features = (torch.cat(column) for column in zip(*scores))
            meta_learner.buffer.append(l_off, l_on, features)
            gate_vs_gain += zip((1 - meta_learner.weights(features)).tolist(), (l_on > l_off).tolist())
            if meta_learner.ready():  # lines 19-21: every T_meta policy steps, theta frozen, one Eq. 6 step on phi
                record.update(meta_learner.update())
        run.state.times["training_s"] += time.time() - tic  # counted before a checkpoint can carry it
        tic = time.time()
        training.end_step(record)  # logged; a checkpoint at the cadence; a stop signal ends the run here
    run.state.times["training_s"] += time.time() - tic
    dropped = meta_learner.buffer.steps if meta_learner is not None else 0
    if (
        meta_learner is not None
    ):  # leftover entries (< T_meta steps) are dropped: the next iteration has another reference
        meta_learner.buffer.clear()
    records = training.records
    if records:  # after a resume, the summary covers the steps run since
        means = {
            f"mean_{key}": float(np.mean([r[key] for r in records if key in r]))
            for key in ("loss", "l_off", "l_on", "w", "meta_loss")
            if any(key in r for r in records)
        }
        updates = sum("meta_loss" in r for r in records)
        summary = {"steps": len(records), "time_s": time.time() - tic, **means, "meta_updates": updates}
        if meta_learner is not None:  # how well 1 - w ranked the tuples whose online pair scored higher (l_on > l_off)
            gate_vs_gain = [x for part in engine.all_gather_objects(run.rt, gate_vs_gain) for x in part]
            summary["gate_auc_gain"] = meta.ranking_auc(*zip(*gate_vs_gain)) if gate_vs_gain else None
        run.stage.log({"iteration": t + 1, "phase": "train", **summary, "meta_steps_dropped": dropped})


def metaapo_loss(cfg: config.Config, policy, ref, meta_learner: meta.MetaController, rt: engine.Runtime):
    """Eq. 5 on one micro-batch of D_aug: (loss to backward, metric sums, the detached (l_off, l_on,
    h's input) of its tuples that have an online pair of their own, for the meta buffer)."""

    def loss(items, mask, batch_size, world):
        # (4, B) log-probs: chosen, rejected, online chosen, online rejected
        split = dpo.online_split(items, rt)  # agreed by every rank: each forward is a round of FSDP2 collectives
        logps, lengths = dpo.pair_forward(policy, items, rt, online=True, split=split)
        ref_logps = None
        if ref is not None:
            with torch.no_grad():
                ref_logps = dpo.pair_forward(ref, items, rt, online=True, split=split)[0]
        online_out, l_on = dpo.objective_losses(cfg, logps, ref_logps, lengths, offset=2)
        offline_out, l_off = dpo.objective_losses(cfg, logps, ref_logps, lengths, offset=0)
        ratios = (logps - ref_logps) if ref_logps is not None else logps
        features = meta.meta_features(
            meta.meta_input_score(cfg.objective, cfg.beta, cfg.meta_input_beta, l_off, logps, ref_logps),
            ratios[0],
            ratios[1],
            inputs=cfg.meta_inputs,
        )
        w = meta_learner.loss_weights(features)  # Alg. 1 line 16: w = h(l_off), the current theta, fixed in Eq. 5
        fixed = torch.tensor(
            [-1.0 if item.weight_override is None else item.weight_override for item in items], device=w.device
        )
        w = torch.where(fixed >= 0, fixed, w)
        # Alg. 1 line 17: Eq. 5
        total = (losses.meta_weighted_loss(offline_out.losses, online_out.losses, w) * mask).sum()
        buffered = (mask > 0) & (fixed < 0)  # real tuples with a real online pair
        if not cfg.tied_in_meta_buffer:  # a diagnostic: tied tuples train in Eq. 5 but leave Eq. 6 alone
            buffered &= torch.tensor([item.online_chosen_ids != item.online_rejected_ids for item in items])
        scores = (l_off.detach()[buffered].cpu(), l_on.detach()[buffered].cpu(), features[buffered].cpu())
        n = mask.sum().item()
        metrics = {
            "loss": total.item() / batch_size,
            **dpo.pair_metrics(offline_out, mask),
            **dpo.pair_metrics(online_out, mask, "online_"),
            "l_off_sum": (l_off.detach() * mask).sum().item(),
            "l_off_count": n,
            "l_on_sum": (l_on.detach() * mask).sum().item(),
            "l_on_count": n,
            "w_sum": (w * mask).sum().item(),
            "w_count": n,
        }
        return total * world / batch_size, metrics, scores

    return loss


def annotate(
    run: iterative_run.IterativeRun,
    D_t: list[dpo.PolicyPair],
    sampled: list[int],
    generations: list,
    pieces: engine.Pieces,
) -> tuple[list, sample.PairStats]:
    """Alg. 1 lines 10-11: the reward model scores each sampled prompt's K answers; its best and
    worst are the online pair (SELM also ranks the offline pair's two answers with them). In
    pieces of PIECE prompts, kept as they finish; the reward model is loaded only if one is left."""
    rows = [run.raw[D_t[i].index] for i in sampled]
    pool = [((row.chosen, D_t[i].chosen_ids), (row.rejected, D_t[i].rejected_ids)) for i, row in zip(sampled, rows)]
    loaded = []  # the reward model, once a piece needs it

    def piece(k: int):
        if not loaded:
            loaded.append(engine.load_reward_model(config.reward_path(run.cfg), run.cfg, run.rt))
        part = slice(k * engine.PIECE, (k + 1) * engine.PIECE)
        offline = pool[part] if run.baseline is not None and run.baseline.selm else None
        return sample.make_online_pairs(
            [row.prompt for row in rows[part]], generations[part], loaded[0], offline=offline
        )

    parts = pieces.run("rewards", math.ceil(len(rows) / engine.PIECE), piece)
    loaded.clear()  # phase 2 does not need it
    engine.release_memory()
    return [pair for pairs, _ in parts for pair in pairs], sample.PairStats.combined([stats for _, stats in parts])


def unsampled_tuples(D_t: list[dpo.PolicyPair], selected: list[bool]) -> list[dpo.PolicyPair]:
    """The keep_unsampled ablation: the tuples the gate did not send, trained on their offline loss
    alone (w fixed at 1; their offline pair stands in for the online one, which gets weight 0)."""
    return [
        dataclasses.replace(
            D_t[i], online_chosen_ids=D_t[i].chosen_ids, online_rejected_ids=D_t[i].rejected_ids, weight_override=1.0
        )
        for i in range(len(D_t))
        if not selected[i]
    ]


def join_online_pairs(
    cfg: config.Config,
    D_t: list[dpo.PolicyPair],
    sampled: list[int],
    pairs,
    own: list[list[int]] | None = None,
    tied: list[list[int]] | None = None,
) -> list[dpo.PolicyPair]:
    """Each sampled tuple joined with its online pair (y_w^on, y_l^on). A tuple whose K rewards all
    tied has no pair: with `tied` (per sampled tuple its first answer y) it gets the pair (y, y), as
    the reference code's first-maximum / first-minimum pairing gives it, whose online loss is a
    constant (no gradient); without, it is dropped. `own`: per sampled tuple an answer of the
    policy's own (SELM)."""
    joined = []
    for j, (i, pair) in enumerate(zip(sampled, pairs)):
        room = cfg.max_len - len(D_t[i].prompt_ids)  # online answers obey max_len like offline ones
        if pair is not None:
            online = pair.chosen.token_ids[:room], pair.rejected.token_ids[:room]
        elif tied is not None:
            online = tied[j][:room], tied[j][:room]
        else:
            continue
        own_ids = own[j][:room] if own else None
        joined.append(
            dataclasses.replace(D_t[i], online_chosen_ids=online[0], online_rejected_ids=online[1], own_ids=own_ids)
        )
    return joined


# ==============================================================================================
# The stages before Algorithm 1: SFT (the toy) and the reward model (Eq. 1)


def run_sft(cfg: config.Config, rt: engine.Runtime, name: str = "sft") -> dict:
    """Supervised fine-tuning of cfg.model on cfg.sft_dataset: mean NLL of the response tokens of each
    global batch, in stage `name` (the Meta-Aligner's conditional SFT, experiments/meta_aligner, is another)."""
    examples, load_stats = data.load_sft(cfg.sft_dataset, None, cfg.skip_bad_rows)
    tokenized, stats = data.tokenize_sft(examples, data.load_tokenizer(cfg.model), cfg.max_prompt_len, cfg.max_len)
    engine.print0(rt, f"[{name}] {cfg.sft_dataset}: {load_stats.summary()}; tokenized: {stats.summary()}")
    if not tokenized:
        raise data.DataError(f"{cfg.sft_dataset}: no usable SFT example after tokenization ({stats.summary()})")
    stage = checkpoint.Stage(cfg, rt, name)
    latest = stage.start()
    model, tokenizer = engine.load_logprob_model(cfg.model, cfg, rt, trainable=True, from_config=cfg.init_from_config)
    batches = engine.epoch_batches(tokenized, cfg.sft_epochs, cfg.sft_batch_size, config.seed_for(cfg, "batches"))
    optimizer, scheduler, progress = checkpoint.prepare_pass(stage, latest, model, cfg.sft_lr, len(batches), cfg)

    def sft_loss(items, mask, n_tokens, world):
        batch = data.collate_sft(items, tokenizer.pad_token_id)
        logps = model(
            batch["input_ids"].to(rt.device),
            batch["attention_mask"].to(rt.device),
            batch["response_mask"].to(rt.device),
        )
        total = -(logps * mask).sum()
        return total * world / n_tokens, {"loss": total.item() / n_tokens}

    tokens = [sum(len(e.response_ids) for e in b) for b in batches]  # the loss is a mean over a global batch's tokens
    desc = f"{cfg.sft_epochs} epochs"
    engine.optimize(
        stage,
        model,
        optimizer,
        scheduler,
        batches,
        sft_loss,
        progress,
        desc,
        checkpoint_extras=engine.progress_state(progress),
        sizes=tokens,
    )
    engine.export_hf(model, model.lm, tokenizer, stage.model_dir, cfg, rt, prefix="lm.")
    summary = {"train_time_s": stage.elapsed_s(), "steps": progress.step}
    stage.finish(summary)
    return summary


def run_rm(cfg: config.Config, rt: engine.Runtime) -> dict:
    """Bradley-Terry reward model (Eq. 1) from the SFT model, one epoch over the offline pairs."""
    pairs, _ = dpo.train_pairs(
        cfg, rt, data.load_tokenizer(config.sft_path(cfg)), max_len=min(cfg.max_len, cfg.rm_max_len)
    )
    stage = checkpoint.Stage(cfg, rt, "rm")
    latest = stage.start()
    rm = engine.load_reward_model(config.sft_path(cfg), cfg, rt, trainable=True, init_head=True)
    batches = engine.epoch_batches(pairs, 1, cfg.rm_batch_size, config.seed_for(cfg, "reward model batches"))
    optimizer, scheduler, progress = checkpoint.prepare_pass(stage, latest, rm.model, cfg.rm_lr, len(batches), cfg)

    def rm_loss(items, mask, batch_size, world):
        batch = data.collate_preferences(items, rm.tokenizer.pad_token_id)
        rewards = (
            rm.model(input_ids=batch["input_ids"].to(rt.device), attention_mask=batch["attention_mask"].to(rt.device))
            .logits[:, 0]
            .float()
        )
        out = losses.bradley_terry_loss(rewards[: len(items)], rewards[len(items) :])
        total = (out.losses * mask).sum()
        return total * world / batch_size, {"loss": total.item() / batch_size, **dpo.pair_metrics(out, mask)}

    desc = f"{len(pairs)} pairs"
    engine.optimize(
        stage,
        rm.model,
        optimizer,
        scheduler,
        batches,
        rm_loss,
        progress,
        desc,
        checkpoint_extras=engine.progress_state(progress),
    )
    engine.export_hf(rm.model, rm.model, rm.tokenizer, stage.model_dir, cfg, rt)
    summary = {"train_time_s": stage.elapsed_s(), "steps": progress.step, "test_accuracy": None}
    if config.test_source(cfg) is None:
        engine.print0(
            rt,
            f"[rm] no held-out pairs (--dataset={cfg.dataset} has no {cfg.test_split} split; a single file is training "
            "data only): no accuracy measured; pass --test_dataset for one",
        )
    else:
        test, source = dpo.load_heldout(cfg, "the reward model's accuracy")
        summary.update(
            test_accuracy=reward_accuracy(rm, test), test_pairs=len(test), test_source=config.describe(source)
        )
        stage.log({"phase": "eval", **{k: summary[k] for k in ("test_accuracy", "test_pairs", "test_source")}})
        engine.print0(
            rt,
            f"[rm] preference accuracy on the {len(test)} held-out pairs of {config.describe(source)}: "
            f"{summary['test_accuracy']:.3f}",
        )
    stage.finish(summary)
    return summary


def reward_accuracy(rm: reward.RewardModel, pairs: list[data.PreferencePair]) -> float:
    """Fraction of pairs whose chosen answer gets the higher reward."""
    chosen = rm.score([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = rm.score([p.prompt for p in pairs], [p.rejected for p in pairs])
    return sum(c > r for c, r in zip(chosen, rejected)) / max(1, len(pairs))


# ==============================================================================================
# The results table (the toy's and the smollm2 preset's: a gold judge)


def evaluate_policy_gold(
    path: str, cfg: config.Config, rt: engine.Runtime, prompts: list[list[int]], messages: list[list[dict]]
) -> list[float]:
    """Gold-judge scores (the preset's) of eval_samples answers per held-out prompt, sampled as in training."""
    policy, tokenizer = engine.load_logprob_model(path, cfg, rt, trainable=False)
    generations = engine.distributed_generate(
        policy,
        tokenizer,
        prompts,
        path,
        cfg.eval_samples,
        cfg,
        rt,
        config.seed_for(cfg, "results table"),
        Path(cfg.out_dir),
        backend="transformers",
    )
    del policy
    engine.release_memory()
    return reward.gold_judge(cfg.preset).score(
        [m for m, g in zip(messages, generations) for _ in g], [x.text for g in generations for x in g]
    )


def results_table(cfg: config.Config, rt: engine.Runtime, rows: list[tuple[str, str]], summaries: dict) -> str:
    """Gold mean score and win rate against the first row (SFT) on held-out prompts, annotation
    ratio and time per phase."""
    tokenizer = data.load_tokenizer(rows[0][1])
    test, source = dpo.load_heldout(cfg, "the results table")
    test = test[: cfg.eval_prompts or len(test)]
    prompts = [data.encode_prompt(tokenizer, p.prompt) for p in test]
    scores = {label: evaluate_policy_gold(path, cfg, rt, prompts, [p.prompt for p in test]) for label, path in rows}
    base = scores[rows[0][0]]
    task = {"toy": "Toy", "smollm2": "SmolLM2"}[cfg.preset]
    lines = [
        f"{task} results: gold judge (0-10) on {len(test)} held-out prompts of {config.describe(source)} x "
        f"{cfg.eval_samples} samples at temperature {cfg.temperature}",
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
# Pipeline and entry point


def run_method(cfg: config.Config, rt: engine.Runtime, method: str) -> dict:
    """Run one stage, after checking its inputs; a finished stage is left as it is (its summary is
    returned): nothing here ever deletes or rewrites a finished model."""
    done = Path(cfg.out_dir) / config.stage_name(cfg, method) / "done.json"
    if done.exists():
        engine.print0(
            rt, f"[{done.parent.name}] already finished ({done}); left as it is (remove {done.parent} to run it again)"
        )
        checkpoint.Stage(cfg, rt, done.parent.name).drop_checkpoints()  # what a kill while it finished may have left
        return checkpoint.read_json(done)
    config.check_inputs(cfg, method)
    if method == "sft":
        return run_sft(cfg, rt)
    if method == "rm":
        return run_rm(cfg, rt)
    if method in config.OFFLINE_METHODS:
        return dpo.run_offline(cfg, rt, method)
    if method == "selective_dpo":
        return baselines.selective_dpo.run_selective_dpo(cfg, rt)
    if method == "ppo":
        return baselines.ppo.run_ppo(cfg, rt)
    return run_iterative(cfg, rt, method)


def ensure_stage(cfg: config.Config, rt: engine.Runtime, method: str) -> dict:
    """Run a stage unless it is done, then give a stop signal its chance; return its summary."""
    summary = run_method(cfg, rt, method)
    engine.release_memory()  # the stage's models died with it
    engine.check_stop(rt, f"stopped after the {config.stage_name(cfg, method)} stage; --resume goes on with the next")
    return summary


def run_pipeline(cfg: config.Config, rt: engine.Runtime) -> None:
    """Every stage MetaAPO needs, then the results table."""
    config.check_inputs(cfg, "pipeline")
    summaries = {}
    if cfg.init_from_config and not cfg.sft_model:
        summaries["SFT"] = ensure_stage(cfg, rt, "sft")
    if not cfg.reward_model:
        summaries["RM"] = ensure_stage(cfg, rt, "rm")
    if not cfg.policy:
        summaries["DPO"] = ensure_stage(cfg, rt, "dpo")
    summaries["MetaAPO"] = ensure_stage(cfg, rt, "metaapo")
    if cfg.preset in reward.GOLD_JUDGES:  # the toy and smollm2 presets: a program grades their task
        rows = [
            ("SFT", config.sft_path(cfg)),
            ("DPO", config.warm_policy_path(cfg)),
            ("MetaAPO", str(Path(cfg.out_dir) / config.stage_name(cfg, "metaapo") / "model")),
        ]
        table = results_table(cfg, rt, rows, summaries)
        if rt.main:
            (Path(cfg.out_dir) / "results.md").write_text(table + "\n")
        engine.print0(rt, "\n" + table)
    else:
        engine.print0(
            rt, f"done: {Path(cfg.out_dir) / config.stage_name(cfg, 'metaapo') / 'model'}; evaluate it with evaluate.py"
        )


def ensure_preset_assets(cfg: config.Config) -> None:
    """The toy's data, tokenizer and config, or the smollm2 preset's model folder and data, built
    unless cached (the model --model names must exist before anything reads its config)."""
    seed = cfg.seed if cfg.data_seed < 0 else cfg.data_seed
    if cfg.preset == "toy":
        toy.ensure_toy_assets(seed, regime=cfg.toy_regime)
    elif cfg.preset == "smollm2":
        smollm2.ensure_assets(seed)


def main(argv: list[str] | None = None) -> None:
    transformers.utils.logging.disable_progress_bar()  # our own bars are enough
    # e.g. "score.weight newly initialized" for the reward model, on purpose
    transformers.utils.logging.set_verbosity_error()
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(config.config_help(__doc__.strip().split("\n\n")[0]))
        return
    try:
        cfg = config.parse_config(argv)
    except config.ConfigError as err:
        raise SystemExit(f"train.py: {err}") from None
    if cfg.dry_run:
        if os.environ.get("RANK", "0") == "0":
            print(json.dumps(config.config_dict(cfg), indent=2))  # the resolved config first, as a run prints it
        try:
            ensure_preset_assets(cfg)
            return plan.dry_run(cfg, cfg.gpus or int(os.environ.get("WORLD_SIZE", 1)))
        except (config.ConfigError, data.DataError) as err:
            raise SystemExit(f"train.py: {err}") from None
    with checkpoint.entry_process(cfg) as rt:
        try:
            if rt.main:
                ensure_preset_assets(cfg)
            engine.barrier(rt)
            rt.sharded_gradients = plan.sharded_gradients(cfg, rt)  # reads the model's config: after the toy's exists
            engine.print0(rt, json.dumps(config.config_dict(cfg), indent=2))
            checkpoint.start_wandb(cfg, rt)
            started = time.time()
            if cfg.method == "pipeline":
                run_pipeline(cfg, rt)
            else:
                run_method(cfg, rt, cfg.method)
            engine.print0(rt, f"total time {time.time() - started:.0f}s")
        except engine.Stopped as err:
            engine.stop_exit(f"{err}; continue with the same command and --resume")
        except (config.ConfigError, engine.NonFiniteLoss, iterative_run.NothingTrained, data.DataError) as err:
            raise SystemExit(f"train.py: {err}") from None
        except Exception as err:
            if not engine.STOP_SIGNAL:
                raise
            engine.stop_exit(
                f"stopped by {signal.Signals(engine.STOP_SIGNAL[0]).name} ({type(err).__name__} on the way out: "
                f"{config._short(err)}); continue with the same command and --resume"
            )


if __name__ == "__main__":
    # run the imported module's main, so that what checkpoints pickle is train.X, which any
    # program can load, not __main__.X, which only `python train.py` could
    import train

    train.main()
