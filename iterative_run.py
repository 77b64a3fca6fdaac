"""
The bookkeeping around Algorithm 1's loop (train.py's run_iterative): the tokenized D_off and its
slices D_1..D_T, the meta-learner, the stage directory, the policy and reference of each
iteration, phase 1's record (gating.jsonl, the annotation ratio, the counts), the export at an
iteration's end, and the IterationState every checkpoint records, from which a resumed run
continues at the iteration, phase and step it reached.

Run
    Nothing to run on its own: train.py's run_iterative drives it (python train.py, or under
    torchrun, where every rank keeps the same slices and its own share of the meta buffer).

Deliberate simplifications
- Each iteration reloads the policy from the previous iteration's HF export and starts a fresh
  AdamW and LR schedule, as the reference implementation does (see iteration_pass).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import baselines.online
import checkpoint
import config
import data
import dpo
import engine
import meta


def iteration_paths(cfg: config.Config, stage_dir: Path, method: str, t: int) -> tuple[str, str | None]:
    """(policy at the start of iteration t, its reference); t counts from 0; `stage_dir` is the
    method's stage directory.

    metaapo, adpo: the reference lags one iteration, as in the reference implementation:
    iteration 1 uses the SFT model, iteration 2 the warm-up policy, iteration 3 the output of
    iteration 1. online_dpo, selm: the reference is the policy at the start of the iteration.
    iterative_dpo (the authors' script): starts from the SFT model, the reference fixed at it.
    Both are always read from disk, so a resumed run sees exactly what an uninterrupted one saw.
    """
    from_sft = method != "metaapo" and baselines.online.BASELINES[method].from_sft
    first = config.sft_path(cfg) if from_sft else config.warm_policy_path(cfg)
    starts = [first] + [str(stage_dir / f"iter{i}" / "model") for i in range(1, cfg.iterations + 1)]
    if cfg.objective in ("simpo", "slic"):  # objectives without a reference model
        return starts[t], None
    if from_sft:
        return starts[t], config.reference_path(cfg)
    if method == "metaapo" or baselines.online.BASELINES[method].reference_lags:
        return starts[t], config.reference_path(cfg) if t == 0 else starts[t - 1]
    return starts[t], starts[t]


@dataclass
class IterationState:
    """What a checkpoint of an iterative method records besides model and optimizer."""

    iteration: int = 0  # 0-based iteration in progress
    progress: engine.Progress = field(
        default_factory=engine.Progress
    )  # position in phase 2 (and the stage's step count)
    augmented: list | None = None  # D_aug of this iteration, once phase 1 is done
    meta: dict | None = None  # MetaController.state_dict()
    times: dict = field(default_factory=lambda: {"sampling_s": 0.0, "training_s": 0.0})
    ratios: list = field(default_factory=list)  # annotation ratio per iteration

    def saved(self) -> dict:
        """What checkpoints record (Progress as a dict, so a checkpoint needs no class of this file to read it)."""
        return {**vars(self), "progress": dataclasses.asdict(self.progress)}

    @classmethod
    def restored(cls, saved: dict) -> IterationState:
        if not saved:
            return cls()
        return cls(**{**{k: v for k, v in saved.items() if k != "loop"}, "progress": engine.saved_progress(saved)})


def iteration_pass(policy, augmented: list, t: int, cfg: config.Config):
    """Phase 2's global batches over D_aug and its AdamW and schedule, fresh each iteration as in
    the reference implementation: (batches, optimizer, scheduler)."""
    epochs = cfg.epochs
    if cfg.steps_per_iteration:  # equal steps: as many (reshuffled) epochs as it takes, cut at the count
        epochs = max(1, math.ceil(cfg.steps_per_iteration / max(1, math.ceil(len(augmented) / cfg.batch_size))))
    batches = engine.epoch_batches(augmented, epochs, cfg.batch_size, config.seed_for(cfg, "phase 2 batches", t))
    if cfg.steps_per_iteration:
        batches = batches[: cfg.steps_per_iteration]
    optimizer = engine.make_optimizer(policy, cfg.lr, cfg)
    return batches, optimizer, engine.make_scheduler(optimizer, len(batches), cfg)


class IterativeRun:
    """What surrounds Algorithm 1's loop: the tokenized D_off and its slices D_1..D_T, the
    meta-learner, the stage directory, and the IterationState every checkpoint records. Checkpoints
    are written between the phases and inside phase 2; a resumed run continues at the
    iteration, phase and step its last checkpoint reached, with this rank's own share of the meta
    buffer."""

    def __init__(self, cfg: config.Config, rt: engine.Runtime, method: str):
        self.cfg, self.rt, self.method, self.name = cfg, rt, method, config.stage_name(cfg, method)
        self.baseline = baselines.online.baseline_for(cfg, method)  # None: MetaAPO
        self.tokenizer = data.load_tokenizer(iteration_paths(cfg, Path(), method, 0)[0])  # the first policy's
        offline, self.raw = dpo.train_pairs(cfg, rt, self.tokenizer)
        if cfg.iterations > len(offline):
            raise config.ConfigError(
                f"--iterations={cfg.iterations}: only {len(offline)} usable offline pairs, fewer than one per iteration"
            )
        self.stage = checkpoint.Stage(cfg, rt, self.name)
        self.latest = self.stage.start()
        # D_off shuffled with the seed, cut into D_1..D_T
        self.slices = data.split_into_slices(offline, cfg.iterations, config.seed_for(cfg, "slices"))
        self.meta = None
        if method == "metaapo":
            self.meta = meta.MetaController(
                cfg.meta_depth,
                cfg.meta_inputs,
                cfg.meta_lr,
                cfg.meta_interval,
                cfg.sampling,
                cfg.weighting,
                cfg.threshold,
                cfg.random_ratio,
                cfg.threshold_ratio,
                seed=cfg.seed,
                device=rt.device,
                weight_decay=cfg.meta_weight_decay,
                grad_clip=cfg.meta_grad_clip,
            )
        saved = checkpoint.read_pickle(self.latest / "state.pt")["iteration_state"] if self.latest else {}
        self.state = IterationState.restored(saved)
        self.resumed_pass = None  # (batches, optimizer, scheduler) restored inside phase 2

    def load_models(self, t: int):
        """(policy, reference or None, the policy's path) of iteration t; resuming inside it, also
        the optimizer, schedule and meta-learner as its checkpoint left them."""
        policy_path, ref_path = iteration_paths(self.cfg, self.stage.dir, self.method, t)
        policy, _ = engine.load_logprob_model(policy_path, self.cfg, self.rt, trainable=True)
        ref = engine.load_logprob_model(ref_path, self.cfg, self.rt, trainable=False)[0] if ref_path else None
        if self.latest is not None:
            self.resume_inside(t, policy)
        else:
            progress = engine.Progress(step=self.state.progress.step)
            self.state = dataclasses.replace(self.state, iteration=t, progress=progress, augmented=None, meta=None)
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
        meta_learner = self.meta
        return {
            "iteration_state": {**self.state.saved(), "meta": meta_learner.state_dict() if meta_learner else None},
            "rank_local": {"meta_buffer": meta_learner.buffer.state_dict()} if meta_learner is not None else None,
        }

    def phase_one_pieces(self, t: int) -> engine.Pieces:
        """Where iteration t's phase 1 keeps its work as it finishes (until its result is in a checkpoint)."""
        where = f"[{self.name}] stopped during iteration {t + 1}'s phase 1"
        return engine.Pieces(self.stage.dir / f"iter{t + 1}" / "phase1", self.rt, where)

    def checkpoint_between_phases(self) -> None:
        """A state-only checkpoint: the policy is still the one on disk that the iteration started from."""
        self.stage.save_checkpoint(self.state.progress.step, None, None, None, self.checkpoint_state())

    def record_sampling(
        self,
        t: int,
        scores: list[dpo.PairScores] | None,
        selected: list[bool],
        w: list[float],
        sampled: list[int],
        pairs: list,
        pair_stats,
        augmented: list,
        boundary: dict | None,
        tic: float,
    ) -> None:
        """Phase 1's record: per-tuple decisions in iter<t>/gating.jsonl (for experiments/dynamics.py),
        the annotation ratio (reward-model calls per offline tuple, in units of K), the counts, and
        the gate's diagnostics over the sampled tuples (gate_diagnostics)."""
        cfg, D_t = self.cfg, self.slices[t]
        if self.rt.main:
            paired = {i for i, pair in zip(sampled, pairs) if pair is not None}
            data.write_jsonl(
                self.stage.dir / f"iter{t + 1}" / "gating.jsonl",
                [
                    {
                        "index": item.index,
                        "prompt_id": item.prompt_id,
                        "l_off": scores[i].score if scores else None,
                        "h_input": scores[i].meta_input if scores else None,
                        "w": w[i] if w else None,
                        "selected": selected[i],
                        "paired": i in paired,
                    }
                    for i, item in enumerate(D_t)
                ],
            )
        keeps_ties = (self.baseline is None or self.baseline.keeps_ties) and cfg.tied_samples == "keep"
        tied_kept = pair_stats.all_equal if keeps_ties else 0
        selm = (cfg.num_samples + 2) / cfg.num_samples if self.baseline is not None and self.baseline.selm else 1.0
        ratio = len(sampled) / max(1, len(D_t)) * selm
        if boundary:  # the probe's reward-model calls count too
            ratio += boundary["annotations"] / (len(D_t) * cfg.num_samples)
        nan_mean = lambda values: float(np.mean(values)) if values else float("nan")  # noqa: E731
        self.stage.log(
            {
                "iteration": t + 1,
                "phase": "generate",
                "tuples": len(D_t),
                "selected": len(sampled),
                "annotation_ratio": ratio,
                "pairs": pair_stats.pairs,
                "pairs_all_equal": pair_stats.all_equal,  # prompts whose K rewards all tied
                "tied_kept": tied_kept,  # of those, tuples kept with a zero-gradient (y, y) online pair
                "truncated_candidates": pair_stats.truncated_candidates,
                "augmented": len(augmented),
                "mean_l_off": nan_mean([s.score for s in scores or []]),
                "mean_w": nan_mean(w),
                "mean_online_reward": nan_mean(pair_stats.rewards),
                "offline_chosen": pair_stats.offline_chosen,
                "offline_rejected": pair_stats.offline_rejected,
                "time_s": time.time() - tic,
                **(self.gate_diagnostics(sampled, w, pairs) if w else {}),
            }
        )
        engine.print0(
            self.rt,
            f"[{self.name}] iteration {t + 1}: generated for {len(sampled)}/{len(D_t)} prompts ({ratio:.1%}), "
            f"{pair_stats.pairs} online pairs, {pair_stats.all_equal} prompts whose rewards all tied "
            + ("(kept with a zero-gradient (y, y) pair)" if keeps_ties else "(dropped)"),
        )
        self.state.times["sampling_s"] += time.time() - tic
        self.state.ratios.append(ratio)

    def gate_diagnostics(self, sampled: list[int], w: list[float], pairs: list) -> dict:
        """How well 1 - w (the chance of being sent to generation) ranks, among the tuples the gate
        sent, those whose K rewards all tied (nothing to learn online). AUC, 0.5 = chance; over
        sampled tuples only, the others have no answers. experiments/dynamics.py measures this and
        more (answers below the gold judge's maximum, online gains) over every tuple."""
        gate = [1 - w[i] for i in sampled]
        return {"gate_auc_tied": meta.ranking_auc(gate, [pair is None for pair in pairs])}

    def end_iteration(self, t: int, policy) -> None:
        """Export the policy after iteration t: the next iteration starts from it and, one later,
        uses it as its reference, so it keeps the master weights' precision (at lr 5e-7 an
        iteration's progress is mostly below bf16's resolution). Then a checkpoint between the phases."""
        engine.export_hf(
            policy,
            policy.lm,
            self.tokenizer,
            self.stage.dir / f"iter{t + 1}" / "model",
            self.cfg,
            self.rt,
            prefix="lm.",
            dtype=engine.MASTER_DTYPE if t + 1 < self.cfg.iterations else None,
        )
        if self.meta is not None and self.rt.main:
            torch.save(self.meta.state_dict(), self.stage.dir / f"iter{t + 1}" / "meta_learner.pt")
        progress = engine.Progress(step=self.state.progress.step)
        self.state = dataclasses.replace(self.state, iteration=t + 1, progress=progress, augmented=None)
        self.resumed_pass = None  # it holds the optimizer: gone before the next iteration loads its models
        self.checkpoint_between_phases()

    def finish(self) -> dict:
        stage = self.stage
        if self.latest is not None:  # resumed after the last iteration (stopped while finishing): what it had kept
            self.resume_inside(self.cfg.iterations, None)
        if self.state.progress.step == 0:
            raise NothingTrained(
                f"[{self.name}] trained no step in {self.cfg.iterations} iterations: no offline tuple gave an "
                f"augmented one (selected and with an online pair whose rewards differ; see {stage.metrics_path}); the "
                "stage is not marked done"
            )
        if self.rt.main:
            engine.copy_tree(stage.dir / f"iter{self.cfg.iterations}" / "model", stage.model_dir)
            if self.meta is not None:
                torch.save(self.meta.state_dict(), stage.dir / "meta_learner.pt")
        engine.barrier(self.rt)
        summary = {
            "steps": self.state.progress.step,  # policy steps over all iterations
            "annotation_ratio": float(np.mean(self.state.ratios)) if self.state.ratios else 0.0,
            **self.state.times,
            "total_s": self.stage.elapsed_s(),
        }
        stage.log({"phase": "done", **summary})
        stage.finish(summary)
        return summary


class NothingTrained(RuntimeError):
    """A stage that would end without a single optimizer step; nothing is marked done."""
