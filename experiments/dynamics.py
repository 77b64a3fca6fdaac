"""
The training dynamics of a finished MetaAPO stage, as the paper plots them (Fig. 2 left and
middle, Fig. 3 right): the meta-learner curve h(l) after every meta update (logged by train.py);
for every tuple of every iteration, l_off against the potential gain l_on - l_off, sampled vs
unsampled; and on the held-out prompts before and after each iteration, the reward model's mean
and std over generated answers (the gold score on the toy, and the reward model's agreement with
it) and the mean l_off of the held-out pairs. Written to <stage>/dynamics.json, printed as tables
and plotted (matplotlib, optional).

A toy regime's measured properties (--toy_properties: the SFT model's solve rates per kind,
the offline pairs' label noise, what the DPO warm-up leaves to learn; docs/toy.md) are here too.

Run (from the repository's root)
    python -m experiments.dynamics --plots=out/toy-seed0/metaapo   # dynamics.json, tables and PNGs there
    python -m experiments.dynamics --toy_properties --toy_regime=skill   # out/toy-skill-seed0/toy_properties.md
    torchrun --nproc_per_node 8 -m experiments.dynamics --plots=...    # generation and scoring sharded
experiments/compare.py calls make_plots on seed 0's MetaAPO.

Deliberate simplifications
- The sampled / unsampled scatter generates a fresh online pair for every tuple of an iteration
  (or --scatter_prompts of each kind) with the iteration's starting policy, since unsampled
  tuples had none; the gains are therefore those of new samples, not of the pairs trained on.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

import config
import data
import dpo
import engine
import iterative_run
import toy
import train
from experiments import experiment_parser, run_experiment
from meta import CURVE_GRID, MetaController, ranking_auc
from reward import toy_gold_judge, toy_gold_per_answer
from sample import make_online_pairs

# ==============================================================================================
# Reading a stage's records, and plots


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "experiments: the plots need matplotlib, an optional dependency: pip install matplotlib"
        ) from None
    return plt


def _save(figure, path: Path, plt, rt: engine.Runtime) -> Path:
    """Write the figure (the main rank only; every rank computed it, the data may need collectives)."""
    if rt.main:
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def read_metrics(stage: Path) -> list[dict]:
    return [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines() if line.strip()]


def meta_curve_history(stage: Path) -> list[dict]:
    """Fig. 3 right as a sequence: h on meta.CURVE_GRID after every meta update, as logged by train.py."""
    return [
        {"iteration": r["iteration"], "step": r["step"], "h": r["h_curve"]}
        for r in read_metrics(stage)
        if "h_curve" in r
    ]


# ==============================================================================================
# The dynamics: sampled and unsampled gains, held-out reward and l_off


def sampling_gains(cfg, rt, stage: Path, method: str, iteration: int, per_kind: int = 0) -> list[dict]:
    """Fig. 2 middle's points for one iteration: for every offline tuple of its D_t (or per_kind
    sampled and per_kind unsampled ones), l_off at gating time, whether the gate sent it to
    generation, and its potential gain l_on - l_off. The online pair is generated afresh for every
    tuple, sampled or not, with the iteration's starting policy, the reward model and the same
    reference as l_off (unsampled tuples had none); a tuple whose K fresh rewards all tie has no
    gain (tied), and on the toy each tuple's best fresh answer is judged (own_best_gold), for the
    gate diagnostics. Cached in iter<t>/gains.json."""
    cache = stage / f"iter{iteration}" / "gains.json"
    if cache.exists() and json.loads(cache.read_text()).get("key") == [per_kind, 2]:
        return json.loads(cache.read_text())["rows"]
    records = [json.loads(line) for line in (stage / f"iter{iteration}" / "gating.jsonl").read_text().splitlines()]
    if per_kind > 0:
        rng = np.random.default_rng(cfg.seed)
        kinds = [[r for r in records if r["selected"] == kind] for kind in (True, False)]
        records = [rows[i] for rows in kinds for i in sorted(rng.permutation(len(rows))[:per_kind])]
    policy_path, ref_path = iterative_run.iteration_paths(cfg, stage, method, iteration - 1)
    policy, tokenizer = engine.load_logprob_model(policy_path, cfg, rt, trainable=False)
    ref = engine.load_logprob_model(ref_path, cfg, rt, trainable=False)[0] if ref_path else None
    pairs, raw = dpo.load_pairs(cfg, rt, tokenizer, config.train_source(cfg))
    by_index = {p.index: p for p in pairs}
    items = [by_index[r["index"]] for r in records]
    generations = engine.distributed_generate(
        policy,
        tokenizer,
        [p.prompt_ids for p in items],
        policy_path,
        cfg.num_samples,
        cfg,
        rt,
        config.seed_for(cfg, "dynamics", iteration),
        stage,
    )
    rm = engine.load_reward_model(config.reward_path(cfg), cfg, rt)
    online, _ = make_online_pairs([raw[p.index].prompt for p in items], generations, rm)
    del rm
    best = [None] * len(items)  # the gold of each tuple's best fresh answer (toy)
    if cfg.preset == "toy":
        best = [max(gold) for gold in toy_gold_per_answer([raw[p.index].prompt for p in items], generations)]
    kept = []  # (gating record, the tuple with its fresh online pair); a prompt whose K rewards all tie has none
    for r, p, o in zip(records, items, online):
        if o is not None:
            room = cfg.max_len - len(p.prompt_ids)
            kept.append(
                (
                    r,
                    dataclasses.replace(
                        p, chosen_ids=o.chosen.token_ids[:room], rejected_ids=o.rejected.token_ids[:room]
                    ),
                )
            )
    online_scores = dpo.pair_scores(policy, ref, [p for _, p in kept], cfg, rt)
    del policy, ref
    engine.release_memory()
    l_on = {r["index"]: s.score for (r, _), s in zip(kept, online_scores)}
    rows = [
        {
            "index": r["index"],
            "selected": r["selected"],
            "w": r["w"],
            "l_off": r["l_off"],
            "l_on": l_on.get(r["index"]),
            "gain": l_on[r["index"]] - r["l_off"] if r["index"] in l_on else None,
            "tied": o is None,
            "own_best_gold": b,
        }
        for r, o, b in zip(records, online, best)
    ]
    if rt.main:
        cache.write_text(json.dumps({"key": [per_kind, 2], "rows": rows}))
    return rows


def heldout_point(cfg, rt, policy_path: str, ref_path: str | None, cache: Path) -> dict:
    """Fig. 2 left's measurements for one policy on the held-out split: the reward model's score of
    eval_samples answers per prompt (mean, std), the gold judge's on the toy, and the mean
    preference score l_off of the held-out pairs under (policy, ref). Cached in `cache`."""
    if cache.exists():
        return json.loads(cache.read_text())
    test, _ = dpo.load_heldout(cfg, "the held-out dynamics")
    test = test[: cfg.eval_prompts or len(test)]
    policy, tokenizer = engine.load_logprob_model(policy_path, cfg, rt, trainable=False)
    prompts = [data.encode_prompt(tokenizer, p.prompt) for p in test]
    generations = engine.distributed_generate(
        policy,
        tokenizer,
        prompts,
        policy_path,
        cfg.eval_samples,
        cfg,
        rt,
        config.seed_for(cfg, "results table"),
        Path(cfg.out_dir),
    )
    conversations = [p.prompt for p, answers in zip(test, generations) for _ in answers]
    answers = [a for per_prompt in generations for a in per_prompt]
    rm = engine.load_reward_model(config.reward_path(cfg), cfg, rt)
    rewards = rm.score(conversations, [a.text for a in answers], [a.finish_reason == "stop" for a in answers])
    del rm
    ref = engine.load_logprob_model(ref_path, cfg, rt, trainable=False)[0] if ref_path else None
    pairs, _ = dpo.load_pairs(cfg, rt, tokenizer, config.require_test_source(cfg, "the held-out dynamics"))
    scores = dpo.pair_scores(policy, ref, pairs[: len(test)], cfg, rt)
    del policy, ref
    engine.release_memory()
    point = {
        "prompts": len(test),
        "answers": len(answers),
        "reward_mean": float(np.mean(rewards)),
        "reward_std": float(np.std(rewards)),
        "l_off_mean": float(np.mean([s.score for s in scores])),
    }
    if cfg.preset == "toy":
        gold = toy_gold_judge().score(conversations, [a.text for a in answers])
        point.update(gold_mean=float(np.mean(gold)), **reward_model_fidelity(rewards, gold, cfg.eval_samples))
    if rt.main:
        cache.write_text(json.dumps(point))
    return point


def reward_model_fidelity(rewards: list[float], gold: list[float], per_prompt: int) -> dict:
    """How far the reward model can be trusted on the policy's own answers (toy): among answers
    to the same prompt that the gold judge and the reward model both tell apart, the share they
    order alike; and the gold score of the reward model's favourite answer of each prompt."""
    rewards, gold = np.asarray(rewards).reshape(-1, per_prompt), np.asarray(gold).reshape(-1, per_prompt)
    agree = total = 0
    for r, g in zip(rewards, gold):
        for i in range(per_prompt):
            for j in range(i + 1, per_prompt):
                if r[i] != r[j] and g[i] != g[j]:
                    total += 1
                    agree += (r[i] > r[j]) == (g[i] > g[j])
    return {
        "rm_gold_agreement": agree / total if total else float("nan"),
        "rm_pairs": total,
        "gold_of_rm_best": float(gold[np.arange(len(gold)), rewards.argmax(1)].mean()),
    }


def heldout_dynamics(cfg, rt, stage: Path, method: str) -> list[dict]:
    """heldout_point for the starting policy (with iteration 1's reference) and the policy after
    each iteration (with the reference that iteration trained against)."""
    iterations = sorted(int(p.parent.name[4:]) for p in stage.glob("iter*/model"))
    points = [
        {
            "iteration": 0,
            **heldout_point(
                cfg, rt, *iterative_run.iteration_paths(cfg, stage, method, 0), stage / "heldout_start.json"
            ),
        }
    ]
    for t in iterations:
        ref_path = iterative_run.iteration_paths(cfg, stage, method, t - 1)[1]
        points.append(
            {
                "iteration": t,
                **heldout_point(
                    cfg, rt, str(stage / f"iter{t}" / "model"), ref_path, stage / f"iter{t}" / "heldout.json"
                ),
            }
        )
    return points


def summarise_gains(rows: list[dict]) -> dict:
    """Fig. 2 middle in numbers: where sampled and unsampled tuples lie; and the gate diagnostics
    over every tuple: how well 1 - w ranks those whose fresh K rewards all tie, those whose best
    fresh answer is below gold 10 (toy), and those with a positive gain l_on - l_off (AUC)."""
    gate = [1 - r["w"] for r in rows if r.get("w") is not None]
    with_w = [r for r in rows if r.get("w") is not None]
    diagnostics = {
        "tied": float(np.mean([r.get("tied", False) for r in rows])) if rows else None,
        "auc_tied": ranking_auc(gate, [r.get("tied", False) for r in with_w]),
        "auc_below_gold": ranking_auc(
            [1 - r["w"] for r in with_w if r.get("own_best_gold") is not None],
            [r["own_best_gold"] < toy.TOY_GOLD_MAX for r in with_w if r.get("own_best_gold") is not None],
        ),
        "auc_gain": ranking_auc(
            [1 - r["w"] for r in with_w if r["gain"] is not None],
            [r["gain"] > 0 for r in with_w if r["gain"] is not None],
        ),
    }
    rows = [r for r in rows if r["gain"] is not None]
    summary = {"gate": diagnostics}
    for kind, name in ((True, "sampled"), (False, "unsampled")):
        chosen = [r for r in rows if r["selected"] == kind]
        summary[name] = {
            "tuples": len(chosen),
            "mean_l_off": float(np.mean([r["l_off"] for r in chosen])) if chosen else None,
            "mean_gain": float(np.mean([r["gain"] for r in chosen])) if chosen else None,
            "positive_gain": float(np.mean([r["gain"] > 0 for r in chosen])) if chosen else None,
        }
    if len(rows) > 2:
        summary["corr_l_off_gain"] = float(np.corrcoef([r["l_off"] for r in rows], [r["gain"] for r in rows])[0, 1])
    return summary


# ==============================================================================================
# A toy regime's properties, measured before any method is compared on it (docs/toy.md#properties)

TOY_KINDS = ("aligned", "improvable", "skill")


def toy_prompt_kind(prompt: str) -> str:
    """aligned: an ascending list of fewer than toy.TOY_LONG_LIST letters; improvable: a longer one
    (the SFT teacher's habit of leaving out the last letter); skill: a descending prompt."""
    task, letters = toy.toy_parse_prompt(prompt)
    if task == "descending":
        return "skill"
    return "improvable" if len(letters) >= toy.TOY_LONG_LIST else "aligned"


def regime_properties(cfg, rt, prompts: int = 600) -> dict:
    """What a toy regime must show (docs/toy.md#properties), measured on the first `prompts` tuples of D_1 (the slice
    MetaAPO's first iteration gates), with the SFT model, the reward model and the DPO warm-up:
    - per prompt kind, for the SFT model and the warm-up: the share of prompts whose K answers
      hold a correct one (gold 10), their mean gold, and the offline chosen answers' mean gold;
    - the SFT model's log-likelihood per token of the offline chosen answers and of its own answers;
    - h at initialisation on l_off (warm-up against the SFT reference): its 5 / 50 / 95 percentiles
      with the scaled (Eq. 4) and the unscaled (reference code) input, and how well 1 - h ranks
      the skill prompts and the prompts whose own best answer is below gold 10 (AUC);
    - among the warm-up's online pairs (the reward model's best and worst of K): the share of
      prompts whose K rewards all tie, and of pairs whose two answers the gold judge ties."""
    tokenizer = data.load_tokenizer(config.warm_policy_path(cfg))
    offline, raw = dpo.train_pairs(cfg, rt, tokenizer)
    items = data.split_into_slices(offline, cfg.iterations, config.seed_for(cfg, "slices"))[0][:prompts]
    conversations = [raw[p.index].prompt for p in items]
    texts = [c[-1]["content"] for c in conversations]
    kinds = [toy_prompt_kind(t) for t in texts]
    gold_judge = toy_gold_judge()
    chosen_gold = gold_judge.score(conversations, [raw[p.index].chosen for p in items])
    sft, _ = engine.load_logprob_model(config.sft_path(cfg), cfg, rt, trainable=False)
    warm, _ = engine.load_logprob_model(config.warm_policy_path(cfg), cfg, rt, trainable=False)
    ref, _ = engine.load_logprob_model(config.reference_path(cfg), cfg, rt, trainable=False)
    scores = dpo.pair_scores(warm, ref, items, cfg, rt)
    del ref
    unscaled = dataclasses.replace(cfg, meta_input_beta=1.0)
    inputs = {
        "scaled": [s.meta_input for s in scores],
        "unscaled": [s.meta_input for s in dpo.pair_scores(warm, sft, items, unscaled, rt)]
        if cfg.objective == "dpo"
        else None,
    }
    h0 = MetaController(cfg.meta_depth, "score")
    h = {
        name: h0.weights(torch.tensor(values).view(-1, 1)).tolist() if values is not None else None
        for name, values in inputs.items()
    }
    properties = {"prompts": len(items), "kinds": {k: kinds.count(k) / len(kinds) for k in TOY_KINDS}}
    rm = engine.load_reward_model(config.reward_path(cfg), cfg, rt)
    own_best = {}
    for name, model, path in (("sft", sft, config.sft_path(cfg)), ("warm-up", warm, config.warm_policy_path(cfg))):
        generations = engine.distributed_generate(
            model,
            tokenizer,
            [p.prompt_ids for p in items],
            path,
            cfg.num_samples,
            cfg,
            rt,
            config.seed_for(cfg, "toy properties"),
            Path(cfg.out_dir),
        )
        gold = toy_gold_per_answer(conversations, generations)
        own_best[name] = [max(g) for g in gold]
        properties[name] = {
            kind: {
                "solved_by_own_K": float(
                    np.mean([max(g) == toy.TOY_GOLD_MAX for g, k in zip(gold, kinds) if k == kind])
                ),
                "own_gold": float(np.mean([np.mean(g) for g, k in zip(gold, kinds) if k == kind])),
                "offline_chosen_gold": float(np.mean([c for c, k in zip(chosen_gold, kinds) if k == kind])),
            }
            for kind in TOY_KINDS
        }
        if name == "sft":  # log-likelihood per token of offline chosen answers and of the model's own
            own = [
                dataclasses.replace(p, chosen_ids=g[0].token_ids, rejected_ids=g[1].token_ids)
                for p, g in zip(items, generations)
            ]
            offline_lp = [
                s.chosen_logratio / len(p.chosen_ids) for s, p in zip(dpo.pair_scores(sft, None, items, cfg, rt), items)
            ]
            own_lp = [
                s.chosen_logratio / max(1, len(p.chosen_ids))
                for s, p in zip(dpo.pair_scores(sft, None, own, cfg, rt), own)
            ]
            properties["sft_nats_per_token"] = {
                "offline_chosen": float(np.mean(offline_lp)),
                "own": float(np.mean(own_lp)),
            }
        else:  # the warm-up's online pairs, as MetaAPO's first iteration would annotate them
            pairs, stats = make_online_pairs(conversations, generations, rm)
            gold_ties = [
                gold_judge.score([c, c], [o.chosen.text, o.rejected.text])
                for c, o in zip(conversations, pairs)
                if o is not None
            ]
            properties["warm-up"]["all_rewards_tie"] = stats.all_equal / len(items)
            properties["warm-up"]["pairs_gold_tie"] = (
                float(np.mean([a == b for a, b in gold_ties])) if gold_ties else None
            )
            properties["warm-up"]["pairs_gold_tie_aligned"] = float(
                np.mean(
                    [
                        a == b
                        for (a, b), k in zip(gold_ties, [k for k, o in zip(kinds, pairs) if o is not None])
                        if k == "aligned"
                    ]
                )
            )
    del sft, warm, rm
    engine.release_memory()
    for name, weights in h.items():
        if weights is None:
            continue
        gate = [1 - w for w in weights]  # the probability of sending the tuple to generation
        properties[f"h_{name}"] = {
            "p5_p50_p95": [float(np.percentile(weights, q)) for q in (5, 50, 95)],
            "auc_skill": ranking_auc(gate, [k == "skill" for k in kinds]),
            "auc_below_gold_max": ranking_auc(gate, [b < toy.TOY_GOLD_MAX for b in own_best["warm-up"]]),
        }
    properties["l_off_p5_p50_p95"] = [float(np.percentile(inputs["scaled"], q)) for q in (5, 50, 95)]
    return properties


def regime_markdown(regime: str, p: dict) -> str:
    """regime_properties as the tables of docs/toy.md."""
    lines = [
        f"### Toy regime `{regime}`: {p['prompts']} prompts of D_1 "
        f"({', '.join(f'{k} {v:.0%}' for k, v in p['kinds'].items())})",
        "",
        "| policy | kind | own K hold a correct answer | own mean gold | offline chosen gold |",
        "|---|---|---|---|---|",
    ]
    for name in ("sft", "warm-up"):
        for kind in TOY_KINDS:
            k = p[name][kind]
            lines.append(
                f"| {name} | {kind} | {k['solved_by_own_K']:.1%} | {k['own_gold']:.2f} | "
                f"{k['offline_chosen_gold']:.2f} |"
            )
    nats = p["sft_nats_per_token"]
    w = p["warm-up"]
    lines += [
        "",
        f"SFT log-likelihood per token: offline chosen {nats['offline_chosen']:.2f}, its own answers "
        f"{nats['own']:.2f}. "
        f"l_off (warm-up vs SFT reference) 5/50/95%: {', '.join(f'{x:.3f}' for x in p['l_off_p5_p50_p95'])}. "
        f"The warm-up's K rewards all tie on {w['all_rewards_tie']:.1%} of prompts; of its online pairs, "
        f"{w['pairs_gold_tie']:.1%} are gold ties ({w['pairs_gold_tie_aligned']:.1%} on aligned prompts).",
        "",
        "| h at initialisation | 5 / 50 / 95% | AUC of 1 - h: skill prompts | AUC: own best below gold 10 |",
        "|---|---|---|---|",
    ]
    for name in ("scaled", "unscaled"):
        if f"h_{name}" in p:
            x = p[f"h_{name}"]
            auc = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            lines.append(
                f"| {name} input | {' / '.join(f'{v:.3f}' for v in x['p5_p50_p95'])} | {auc(x['auc_skill'])} | "
                f"{auc(x['auc_below_gold_max'])} |"
            )
    return "\n".join(lines) + "\n"


# ==============================================================================================
# Plots and tables


def plot_meta_curves(history: list[dict], initial: list[float], path: Path, plt, rt) -> Path:
    """Fig. 3 right, update by update: left, h over the score grid after each meta update (colour =
    update number, the last of each iteration drawn thick); right, h at a few scores against the
    update number, iteration boundaries dashed."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = plt.get_cmap("viridis")
    left.plot(CURVE_GRID, initial, color="gray", linewidth=2, label="initial")
    last_of_iteration = {r["iteration"]: k for k, r in enumerate(history)}
    for k, record in enumerate(history):
        final = last_of_iteration[record["iteration"]] == k
        left.plot(
            CURVE_GRID,
            record["h"],
            color=colours(k / max(1, len(history) - 1)),
            linewidth=2 if final else 0.7,
            label=f"after iteration {record['iteration']} ({k + 1} updates)" if final else None,
        )
    left.set_xlabel("offline preference score l_off")
    left.set_ylabel("meta weight h(l_off)")
    left.legend(fontsize=7)
    steps = list(range(len(history) + 1))
    for score in (-2.0, -1.0, -0.75, -0.5, -0.25, 0.0):
        column = CURVE_GRID.index(score)
        right.plot(steps, [initial[column]] + [r["h"][column] for r in history], marker=".", label=f"h({score:g})")
    for k in list(last_of_iteration.values())[:-1]:
        right.axvline(k + 1.5, color="gray", linestyle="--", linewidth=0.8)
    right.set_xlabel("meta update")
    right.set_ylabel("meta weight")
    right.legend(fontsize=7)
    return _save(figure, path, plt, rt)


def plot_sampling_scatter(gains: dict[int, list[dict]], path: Path, plt, rt) -> Path:
    """Fig. 2 middle for every iteration: l_off against the potential gain l_on - l_off."""
    figure, axes = plt.subplots(1, len(gains), figsize=(4.2 * len(gains), 3.6), squeeze=False)
    for axis, (iteration, rows) in zip(axes[0], sorted(gains.items())):
        for kind, colour, label in ((False, "tab:orange", "unsampled"), (True, "tab:blue", "sampled")):
            chosen = [r for r in rows if r["selected"] == kind and r["gain"] is not None]
            axis.scatter(
                [r["l_off"] for r in chosen],
                [r["gain"] for r in chosen],
                s=4,
                alpha=0.4,
                color=colour,
                label=f"{label} ({len(chosen)})",
            )
        axis.axhline(0, color="gray", linewidth=0.8)
        axis.set_xlabel("offline preference score l_off")
        axis.set_ylabel("potential gain l_on - l_off")
        axis.set_title(f"iteration {iteration}")
        axis.legend(fontsize=7)
    return _save(figure, path, plt, rt)


def plot_heldout(points: list[dict], path: Path, plt, rt) -> Path:
    """Fig. 2 left: on held-out prompts, the reward of generated answers (mean +- std; gold on the
    toy) and the mean offline preference score, before iteration 1 and after each iteration."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    iterations = [p["iteration"] for p in points]
    left.errorbar(
        iterations,
        [p["reward_mean"] for p in points],
        yerr=[p["reward_std"] for p in points],
        marker="o",
        capsize=3,
        color="tab:green",
        label="reward-model score of answers (mean +- std)",
    )
    left.set_xlabel("iteration (0 = starting policy)")
    left.set_xticks(iterations)
    left.set_ylabel("reward-model score")
    handles = [left.get_legend_handles_labels()[0][0]]
    if all("gold_mean" in p for p in points):
        twin = left.twinx()
        handles += twin.plot(
            iterations, [p["gold_mean"] for p in points], marker="s", color="tab:purple", label="gold score (0-10)"
        )
        twin.set_ylabel("gold score")
    left.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="lower right")
    right.plot(iterations, [p["l_off_mean"] for p in points], marker="o", color="tab:red")
    right.set_xlabel("iteration (0 = starting policy)")
    right.set_xticks(iterations)
    right.set_ylabel("mean l_off of held-out pairs")
    return _save(figure, path, plt, rt)


def stage_config(stage: Path, argv: list[str]) -> config.Config:
    """The config a stage was trained with (its config.json), with the train.py keys given in
    `argv` on top. The run directory is the stage's parent, wherever it lies now."""
    path = stage / "config.json"
    if not path.exists():
        raise SystemExit(
            f"experiments.dynamics: --plots={stage}: no config.json there; give a stage directory of a finished "
            "train.py run"
        )
    recorded = json.loads(path.read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(config.Config)}
    values = {
        key: tuple(value) if isinstance(defaults[key], tuple) else value
        for key, value in recorded.items()
        if key in defaults
    }
    cfg = config.Config(**{**values, "out_dir": str(stage.parent)})
    cfg.preset = recorded.get("preset", "")
    given = config.parse_config(argv)
    for arg in argv:
        key = arg[2:].partition("=")[0]
        if arg.startswith("--") and key in defaults:
            setattr(cfg, key, getattr(given, key))
    return cfg


def dynamics_markdown(summary: dict) -> str:
    """dynamics.json as tables: the numbers behind the paper's Fig. 2 left and middle and Fig. 3 right."""
    grid = summary["curve_grid"]
    shown = [-2.0, -1.0, -0.75, -0.5, -0.25, 0.0]  # where the toy's scores lie
    lines = [
        "### Meta-learner curve (Fig. 3 right): h at a few scores",
        "",
        "| after | meta updates | " + " | ".join(f"h({x:g})" for x in shown) + " |",
        "|---" * (len(shown) + 2) + "|",
        "| initialisation | - | " + " | ".join(f"{summary['h_initial'][grid.index(x)]:.3f}" for x in shown) + " |",
    ]
    curve = summary["h_initial"]
    for t, updates in summary["meta_updates"].items():
        curve = summary["h_after_iteration"].get(t, curve)  # an iteration without a meta update leaves h as it was
        lines.append(
            f"| iteration {t} | {updates} | " + " | ".join(f"{curve[grid.index(x)]:.3f}" for x in shown) + " |"
        )
    lines += [
        "",
        "### Sampled and unsampled tuples (Fig. 2 middle)",
        "",
        "| iteration | sampled | mean l_off: sampled / unsampled | mean gain l_on - l_off: sampled / unsampled | gain "
        "> 0: sampled / unsampled | corr(l_off, gain) |",
        "|---|---|---|---|---|---|",
    ]
    for t, part in summary["sampling"].items():
        a, b = part["sampled"], part["unsampled"]

        def pair(key, fmt, a=a, b=b):
            return " / ".join("-" if x[key] is None else format(x[key], fmt) for x in (a, b))

        lines.append(
            f"| {t} | {a['tuples']} of {a['tuples'] + b['tuples']} | {pair('mean_l_off', '.3f')} | "
            f"{pair('mean_gain', '+.3f')} | {pair('positive_gain', '.0%')} | "
            f"{part.get('corr_l_off_gain', float('nan')):+.2f} |"
        )
    gates = {t: part["gate"] for t, part in summary["sampling"].items() if "gate" in part}
    if gates:
        auc = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines += [
            "",
            "### Gate diagnostics: how well 1 - w ranks each kind of tuple (AUC, 0.5 = chance; fresh answers)",
            "",
            "| iteration | K rewards all tie | AUC: all tie | AUC: own best below gold 10 | AUC: l_on > l_off |",
            "|---|---|---|---|---|",
        ]
        for t, g in gates.items():
            tied = "-" if g["tied"] is None else f"{g['tied']:.1%}"
            lines.append(f"| {t} | {tied} | {auc(g['auc_tied'])} | {auc(g['auc_below_gold'])} | {auc(g['auc_gain'])} |")
    lines += [
        "",
        "### Held-out prompts over iterations (Fig. 2 left)",
        "",
        "| policy | reward mean | reward std | mean l_off | gold mean | RM-gold agreement | gold of RM's best answer |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in summary["heldout"]:
        name = "start (DPO warm-up)" if p["iteration"] == 0 else f"after iteration {p['iteration']}"
        toy = (
            [f"{p['gold_mean']:.3f}", f"{p['rm_gold_agreement']:.1%}", f"{p['gold_of_rm_best']:.3f}"]
            if "gold_mean" in p
            else ["-"] * 3
        )
        lines.append(
            f"| {name} | {p['reward_mean']:.3f} | {p['reward_std']:.3f} | {p['l_off_mean']:.3f} | "
            + " | ".join(toy)
            + " |"
        )
    return "\n".join(lines) + "\n"


def make_plots(cfg, rt, stage: Path, scatter_prompts: int) -> list[Path]:
    """Measure the stage's dynamics, write them to <stage>/dynamics.json, and plot them (needs
    matplotlib). scatter_prompts: tuples of each kind per iteration in the scatter (0 = all)."""
    saved = json.loads((stage / "config.json").read_text())
    method = saved["method"] if saved["method"] != "pipeline" else "metaapo"
    history = meta_curve_history(stage)
    initial = MetaController(
        saved.get("meta_depth", 2), saved.get("meta_inputs", "score"), weighting=saved.get("weighting", "meta")
    ).curve()
    iterations = sorted(int(p.parent.name[4:]) for p in stage.glob("iter*/gating.jsonl"))
    gains = {t: sampling_gains(cfg, rt, stage, method, t, scatter_prompts) for t in iterations}
    points = heldout_dynamics(cfg, rt, stage, method)
    after = {r["iteration"]: r["h"] for r in history}  # the last update of each iteration
    summary = {
        "curve_grid": list(CURVE_GRID),
        "h_initial": initial,
        "meta_updates": {t: sum(r["iteration"] == t for r in history) for t in iterations},
        "h_after_iteration": after,
        "sampling": {t: summarise_gains(rows) for t, rows in gains.items()},
        "heldout": points,
    }
    if rt.main:
        (stage / "dynamics.json").write_text(json.dumps(summary, indent=2))
    plt = _pyplot()
    plots = [plot_meta_curves(history, initial, stage / "meta_curves.png", plt, rt)] if history else []
    if gains:
        plots.append(plot_sampling_scatter(gains, stage / "sampling_scatter.png", plt, rt))
    plots.append(plot_heldout(points, stage / "heldout_dynamics.png", plt, rt))
    return plots


# ==============================================================================================
# A toy regime's properties (--toy_properties), and the command line


def run_toy_properties(cfg: config.Config, rt: engine.Runtime) -> dict:
    """The stages a regime's properties need (SFT, reward model, DPO warm-up; no method is
    compared), then regime_properties, written to <out_dir>/toy_properties.{json,md}."""
    if cfg.preset != "toy":
        raise SystemExit("experiments.dynamics: --toy_properties measures the toy task; leave --model at toy")
    if rt.main:
        toy.ensure_toy_assets(cfg.seed if cfg.data_seed < 0 else cfg.data_seed, regime=cfg.toy_regime)
    engine.barrier(rt)
    for stage in ("sft", "rm", "dpo"):
        train.ensure_stage(cfg, rt, stage)
    properties = regime_properties(cfg, rt)
    out = Path(cfg.out_dir)
    if rt.main:
        (out / "toy_properties.json").write_text(json.dumps(properties, indent=2))
        (out / "toy_properties.md").write_text(regime_markdown(cfg.toy_regime, properties))
    engine.print0(rt, regime_markdown(cfg.toy_regime, properties))
    return properties


def run(args, cfg: config.Config, rest: list[str], rt: engine.Runtime) -> None:
    if args.toy_properties:
        run_toy_properties(cfg, rt)
    elif args.plots:
        stage = Path(args.plots)
        plots = make_plots(stage_config(stage, rest), rt, stage, args.scatter_prompts)
        engine.print0(rt, dynamics_markdown(json.loads((stage / "dynamics.json").read_text())) if rt.main else "")
        for plot in plots:
            engine.print0(rt, f"wrote {plot}")
    else:
        raise SystemExit("experiments.dynamics: nothing to do; give --plots=STAGE_DIR or --toy_properties")


def main(argv: list[str] | None = None) -> None:
    parser = experiment_parser("experiments.dynamics", __doc__)
    parser.add_argument(
        "--plots",
        default="",
        help="a finished metaapo stage directory to plot; its config.json is the config, --key=value options override "
        "it",
    )
    parser.add_argument(
        "--scatter_prompts",
        type=int,
        default=0,
        help="--plots: tuples of each kind (sampled, unsampled) per iteration in the scatter; 0 = all",
    )
    parser.add_argument(
        "--toy_properties",
        action="store_true",
        help="measure the toy regime's properties with its SFT, reward model and DPO warm-up (trained if missing, in "
        "the run directory of the train.py keys given)",
    )
    run_experiment("experiments.dynamics", parser, run, argv)


if __name__ == "__main__":
    main()
