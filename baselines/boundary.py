"""
The on-policy/static boundary method (the alignment-stage boundary of seed paper 004): before
each iteration, the current policy's answers to a few probe prompts are compared by the reward
model with the pairs' static answers; their win share, the boundary score BS, decides the
iteration's data: on-policy pairs at or above boundary_threshold (the fine-tuning stage), the
static pairs below (the injection stage).

Run
    python train.py --method=boundary                      # online DPO's iterations with the boundary
    python train.py --method=boundary --schedule=off,on,on  # a fixed schedule (BS still measured)
The iterations themselves are Algorithm 1's structure (train.py); this file is the measurement.

Deliberate simplifications
- A comparison counts as a vote for the answer with the higher reward (P(a > b) = sigmoid(r(a) -
  r(b)) read at 0.5); ties count half.
"""

from __future__ import annotations

import math
import time

import config
import engine


def boundary_score(own: list[list[float]], static: list[list[float]]) -> tuple[float, int, int, int]:
    """The boundary score from reward-model scores, per prompt its on-policy answers' and its
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
    cfg: config.Config,
    rt: engine.Runtime,
    policy,
    tokenizer,
    policy_path: str,
    D_t: list,
    raw: list,
    stage,
    t: int,
    pieces: engine.Pieces,
) -> dict:
    """The alignment-stage boundary, measured before iteration t on the first probe_ratio of
    D_t's (shuffled) prompts: probe_samples answers of the current policy per prompt, each compared
    with each static answer (the pair's chosen and rejected) by the reward model; the boundary
    score BS is the share of comparisons the on-policy answers win (ties count half). BS >=
    boundary_threshold: the fine-tuning stage, train on on-policy pairs; below: the injection stage,
    train on the static pairs. --schedule overrides the choice (BS is still measured and logged).
    Its generation and scores are pieces of the iteration's phase 1 (`pieces`)."""
    tic = time.time()
    probe = D_t[: max(1, math.ceil(cfg.probe_ratio * len(D_t)))]
    generations = engine.distributed_generate(
        policy,
        tokenizer,
        [p.prompt_ids for p in probe],
        policy_path,
        cfg.probe_samples,
        cfg,
        rt,
        config.seed_for(cfg, "boundary probe", t),
        stage.dir,
        pieces=pieces,
        name="boundary-generation",
    )
    statics = [(raw[p.index].chosen, raw[p.index].rejected) for p in probe]

    def score_probe(_: int) -> list[float]:
        rm = engine.load_reward_model(config.reward_path(cfg), cfg, rt)
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
    on_policy = schedule[t] == "on" if schedule else score >= cfg.boundary_threshold
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
    engine.print0(
        rt,
        f"[{stage.name}] iteration {t + 1}: boundary score {score:.3f} ({wins} wins, {ties} ties in {comparisons}) -> "
        f"{record['choice']} data ({record['by']})",
    )
    return record
