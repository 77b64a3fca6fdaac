"""
Selective DPO (Gao et al. 2025), as `glorgao/SelectiveDPO` runs it: reference DPO runs on the two
halves of the offline pairs over several seeds, each pair's difficulty its validation loss under
the runs that did not see it (averaged over evenly spaced checkpoints), and a final DPO run on the
easiest keep_ratio of the pairs, easy to hard.

Run
    python train.py --method=selective_dpo
    torchrun --nproc_per_node 8 train.py --method=selective_dpo --model tulu8b
Every run is a dpo.run_offline stage of its own under <out_dir>/selective_dpo/, resumable.

Deliberate simplifications
- The original's reference runs are LoRA runs; here they are full ones, like every stage.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import checkpoint
import config
import data
import dpo
import engine


def run_selective_dpo(cfg: config.Config, rt: engine.Runtime) -> dict:
    """Selective DPO (Gao et al. 2025, as `glorgao/SelectiveDPO` runs it): for each of
    selective_seeds random halvings of the pairs, a DPO run from the SFT model on each half whose
    model scores the other half's DPO loss at selective_checkpoints evenly spaced steps; each
    pair's difficulty is its mean over seeds and checkpoints; the keep_ratio easiest pairs are
    kept, and the final DPO run trains on them from the SFT model in ascending order of
    difficulty, easy to hard, without shuffling. (The original's reference runs are LoRA runs;
    here they are full ones, like every stage of this project.)"""
    started = time.time()
    pairs, _ = dpo.train_pairs(cfg, rt, data.load_tokenizer(config.sft_path(cfg)))
    difficulty: dict[int, list[float]] = {p.index: [] for p in pairs}
    for s in range(cfg.selective_seeds):
        order = engine.shuffled(list(range(len(pairs))), config.seed_for(cfg, "selective halves", s))
        halves = [sorted(order[0::2]), sorted(order[1::2])]
        for k in (0, 1):  # half k trains, the other half is scored
            name = f"selective_dpo/seed{s}-half{k}"
            if not checkpoint.Stage(cfg, rt, name).done:
                dpo.run_offline(
                    cfg,
                    rt,
                    "dpo",
                    name,
                    keep=lambda ps, mine=halves[k]: [ps[i] for i in mine],
                    validate=[pairs[i] for i in halves[1 - k]],
                )
                engine.release_memory()
            for losses_at_step in checkpoint.read_json(Path(cfg.out_dir) / name / "validation.json").values():
                for index, value in losses_at_step.items():
                    difficulty[int(index)].append(value)
    mean = {index: float(np.mean(values)) for index, values in difficulty.items()}
    # ascending mean loss: easy to hard
    easiest = sorted(pairs, key=lambda p: mean[p.index])[: max(1, round(cfg.keep_ratio * len(pairs)))]
    engine.print0(
        rt,
        f"[selective_dpo] keeping the {len(easiest)} easiest of {len(pairs)} pairs (mean DPO loss under the models "
        f"that did not see them, {cfg.selective_seeds} seeds x {cfg.selective_checkpoints} checkpoints), trained easy "
        "to hard",
    )
    if not checkpoint.Stage(cfg, rt, "selective_dpo/final").done:
        dpo.run_offline(cfg, rt, "dpo", "selective_dpo/final", keep=lambda ps: easiest, shuffle=False)
    out = Path(cfg.out_dir) / "selective_dpo"
    summary = {"train_time_s": time.time() - started, "kept": len(easiest)}
    if rt.main:
        engine.copy_tree(out / "final" / "model", out / "model")
        checkpoint.write_json(out / "done.json", summary)
    engine.barrier(rt)
    return summary
