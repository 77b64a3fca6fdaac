"""
The toy counterparts of the paper's Tables 1, 2 and 8: every method trained over several seeds,
scored with the gold judge, set side by side with its paired difference from MetaAPO.

What it does
- Runs (or reads the finished runs of) SFT, DPO, IPO, KTO, SimPO, Selective DPO, PPO, Online DPO,
  SELM, ADPO, MetaAPO and its ablations (random, threshold and all sampling; uniform and fixed
  weighting; all offline samples; the unscaled meta input) and the rows at MetaAPO's annotation
  ratio (equal budget), for several seeds; scores every model with the gold judge on the held-out
  prompts; writes results.md and results.json: gold mean +- std over seeds, win rate against SFT,
  annotation ratio, sampling and training time, and every row's paired difference from MetaAPO
  with 95% intervals (gold: a bootstrap over seeds and held-out prompts; annotation ratio and
  time: t-intervals over seeds). The data, the SFT model and the reward model are shared by all
  seeds (the paper's fixed starting point); each seed has its own DPO warm-up and runs. Seed 0's
  MetaAPO dynamics (dynamics.py) join the report.
- --equal_steps: every iterative method at the same policy steps per iteration (results-equal_steps.*).
- --model=smollm2: the same rows on the smollm2 preset's task (no SFT stage: the model is SFT'd).

Run (from the repository's root)
    python -m experiments.compare                       # toy tables, 3 seeds (out/compare)
    python -m experiments.compare --seeds=0,1,2,3,4 --methods=MetaAPO,DPO
    python -m experiments.compare --toy_regime=skill    # the toy's second regime (out/compare-skill)
    python -m experiments.compare --model=smollm2 --seeds=0,1 \
        "--methods=DPO,MetaAPO,Online DPO at MetaAPO's ratio,w/ random sampling at MetaAPO's ratio"
    torchrun --nproc_per_node 2 -m experiments.compare ...   # the same numbers, generation and scoring sharded
Every run is a train.py stage: a stopped comparison goes on with the same command and --resume.
docs/results.md has the tables it made, with their dates.

Deliberate simplifications
- Gold is the task's programmatic judge; real models are compared with the benchmarks' own
  judges on evaluate.py's answer files.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

import config
import data
import dpo
import engine
import evaluate
import meta
import toy
import train
from experiments import experiment_parser, run_experiment
from experiments.dynamics import _pyplot, _save, dynamics_markdown, make_plots, read_metrics

# ==============================================================================================
# The rows, and the gold judge's scores

# (label, method, extra train.py arguments): the rows of the comparison
COMPARE_ROWS = [
    ("SFT", None, []),
    ("DPO", "dpo", []),
    ("IPO", "ipo", []),
    ("KTO", "kto", []),
    ("SimPO", "simpo", []),
    ("Selective DPO", "selective_dpo", []),
    ("PPO", "ppo", []),
    ("Online DPO", "online_dpo", []),
    ("Iterative DPO (authors' script: from SFT, reference fixed)", "iterative_dpo", []),
    ("SELM", "selm", []),
    ("ADPO", "adpo", []),
    ("ADPO (selected offline pairs, the authors' merge, inferred)", "adpo", ["--adpo_offline=selected"]),
    ("MetaAPO", "metaapo", []),
    ("w/ random sampling", "metaapo", ["--sampling=random"]),
    ("w/ threshold sampling", "metaapo", ["--sampling=threshold"]),
    ("w/ all sampling", "metaapo", ["--sampling=all"]),
    ("w/ uniform weighting", "metaapo", ["--weighting=uniform"]),
    ("w/o meta-learner (fixed weights)", "metaapo", ["--weighting=fixed"]),
    ("w/ all offline samples", "metaapo", ["--keep_unsampled"]),
    ("w/ unscaled meta input (reference code)", "metaapo", ["--meta_input_beta=1"]),
    ("w/ tied tuples dropped (--tied_samples=drop)", "metaapo", ["--tied_samples=drop"]),
    # the meta-learner's drift (docs/results.md): each predicted to move MetaAPO toward the fixed weights
    ("w/ a meta update every 16 steps (the reference code's)", "metaapo", ["--meta_interval=16"]),
    ("w/ meta learning rate 5e-4", "metaapo", ["--meta_lr=5e-4"]),
    (
        "w/o meta-learner, unscaled input (the reference code's fixed variant)",
        "metaapo",
        ["--weighting=fixed", "--meta_input_beta=1"],
    ),
    ("w/ tied tuples out of the meta buffer (diagnostic)", "metaapo", ["--tied_in_meta_buffer=false"]),
    ("Online DPO, tied prompts dropped", "online_dpo", ["--tied_samples=drop"]),
    # at equal annotation budget: calibrated, per seed, to the ratio MetaAPO measured ({metaapo_ratio})
    ("w/ random sampling at MetaAPO's ratio", "metaapo", ["--sampling=random", "--random_ratio={metaapo_ratio}"]),
    (
        "w/ threshold sampling at MetaAPO's ratio",
        "metaapo",
        ["--sampling=threshold", "--threshold_ratio={metaapo_ratio}"],
    ),
    ("Online DPO at MetaAPO's ratio", "online_dpo", ["--prompt_ratio={metaapo_ratio}"]),
    # the budget curve: random gating at 25 / 50 / 75 % (100 % is all sampling)
    ("w/ random sampling at 25%", "metaapo", ["--sampling=random", "--random_ratio=0.25"]),
    ("w/ random sampling at 75%", "metaapo", ["--sampling=random", "--random_ratio=0.75"]),
]

ABLATIONS = {"MetaAPO"} | {label for label, method, extra in COMPARE_ROWS if method == "metaapo" and extra}
# gold against annotation ratio: random gating's curve, with MetaAPO and the calibrated rows on it
BUDGET_CURVE = [
    ("w/ random sampling at 25%", 0.25),
    ("w/ random sampling", 0.5),
    ("w/ random sampling at 75%", 0.75),
    ("w/ all sampling", 1.0),
]
AT_METAAPO_RATIO = [label for label, _, extra in COMPARE_ROWS if any("{metaapo_ratio}" in a for a in extra)]

# The comparison trains every method on the first 3000 offline pairs (the shared reward model on
# all 6000, as in the default run): 1000 per iteration, so MetaAPO takes about 38 policy steps and 4-5 meta
# updates per iteration (docs/results.md gives each grid's time).
COMPARE_TRAIN_ARGS = ["--max_train_pairs=3000"]


def gold_scores(cfg: config.Config, rt: engine.Runtime, model_path: str, cache: Path | None = None) -> list[float]:
    """Gold-judge scores of eval_samples answers per held-out toy prompt, cached in `cache`."""
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())
    test, _ = dpo.load_heldout(cfg, "the gold evaluation")
    test = test[: cfg.eval_prompts or len(test)]
    tokenizer = data.load_tokenizer(model_path)
    scores = train.evaluate_policy_gold(
        model_path, cfg, rt, [data.encode_prompt(tokenizer, p.prompt) for p in test], [p.prompt for p in test]
    )
    if cache is not None and rt.main:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(scores))
    return scores


# ==============================================================================================
# Paired differences and their intervals

# Student's t quantile t(0.975, df) for df = 1..30 (a normal quantile beyond): the 95% t-interval
T_975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def interval(mean: float, low: float, high: float) -> dict:
    """A difference with its 95% interval; resolved when the interval excludes 0."""
    return {"mean": float(mean), "low": float(low), "high": float(high), "resolved": bool(low > 0 or high < 0)}


def paired_bootstrap(
    scores: list[list[float]], baseline: list[list[float]], samples_per_prompt: int, draws: int = 2000, seed: int = 0
) -> dict:
    """Mean paired difference (scores - baseline) with a 95% two-level bootstrap interval: seeds
    resampled with replacement, then held-out prompts within each drawn seed. scores[s] holds one
    seed's gold scores, prompt-major with samples_per_prompt answers per prompt, as is baseline[s]."""
    per_prompt = np.stack(
        [(np.asarray(a) - np.asarray(b)).reshape(-1, samples_per_prompt).mean(1) for a, b in zip(scores, baseline)]
    )
    n_seeds, n_prompts = per_prompt.shape  # (S, P) differences of per-prompt means
    rng = np.random.default_rng(seed)
    means = np.empty(draws)
    for k in range(draws):
        seeds = rng.integers(n_seeds, size=n_seeds)
        prompts = rng.integers(n_prompts, size=(n_seeds, n_prompts))
        means[k] = per_prompt[seeds[:, None], prompts].mean()
    return interval(per_prompt.mean(), *np.percentile(means, [2.5, 97.5]))


def paired_t_interval(values: list[float], baseline: list[float]) -> dict | None:
    """Mean paired difference over seeds with a 95% t-interval (None with fewer than 2 seeds)."""
    differences = np.asarray(values, dtype=float) - np.asarray(baseline, dtype=float)
    if len(differences) < 2:
        return None
    t = T_975[len(differences) - 2] if len(differences) <= len(T_975) + 1 else 1.960
    half = t * differences.std(ddof=1) / np.sqrt(len(differences))
    return interval(differences.mean(), differences.mean() - half, differences.mean() + half)


def held_out_half_coverage(differences: list[float], splits: int = 200, seed: int = 0) -> dict | None:
    """How often a 95% t-interval from one half of the seeds contains the other half's mean paired
    difference, over random splits (None with fewer than 4 seeds). Two independent halves differ by
    sqrt(2) standard errors' worth of noise, so a calibrated interval holds it about 83% of the time
    with many seeds, more with few since t widens (88% with halves of 5, simulated on normal
    draws); far less says the interval is narrower than the seeds' spread."""
    values = np.asarray(differences, dtype=float)
    if len(values) < 4:
        return None
    rng = np.random.default_rng(seed)
    inside = []
    for _ in range(splits):
        order = rng.permutation(len(values))
        first, second = values[order[: len(values) // 2]], values[order[len(values) // 2 :]]
        ci = paired_t_interval(first.tolist(), [0.0] * len(first))
        inside.append(ci["low"] <= second.mean() <= ci["high"])
    return {"share": float(np.mean(inside)), "splits": splits, "seeds": len(values)}


# ==============================================================================================
# The toy Tables 1, 2 and 8 over seeds (--compare)


def seed_args(out: Path, seed: int, train_args: list[str]) -> list[str]:
    """train.py arguments of one seed of the comparison: its own runs, the shared data, SFT and
    reward model (a real model's preset, smollm2, has no SFT stage: its model is the SFT model)."""
    trains_sft = config.parse_config(train_args, later_wins=True).init_from_config
    return [
        f"--seed={seed}",
        "--data_seed=0",
        f"--out_dir={out / f'seed{seed}'}",
        *([f"--sft_model={out / 'shared' / 'sft' / 'model'}"] if trains_sft else []),
        f"--reward_model={out / 'shared' / 'rm' / 'model'}",
        *train_args,
    ]


def compare(
    seeds: list[int], out: Path, rows: list[tuple], train_args: list[str], rt: engine.Runtime, equal_steps: int = 0
) -> dict:
    """Run or read every row's run for every seed, score the models, aggregate over seeds.
    equal_steps > 0: every iterative method takes that many policy steps per iteration."""
    started = time.time()
    # the shared SFT and reward model are the default run's (COMPARE_TRAIN_ARGS' data cut is for the methods only)
    shared_args = [f"--out_dir={out / 'shared'}", "--seed=0", *[a for a in train_args if a not in COMPARE_TRAIN_ARGS]]
    shared = config.parse_config(shared_args, later_wins=True)
    if rt.main:
        train.ensure_preset_assets(shared)
    engine.barrier(rt)
    stage_times = {"SFT": train.ensure_stage(shared, rt, "sft")} if shared.init_from_config else {}
    stage_times["RM"] = train.ensure_stage(shared, rt, "rm")
    sft = config.sft_path(shared)
    per_seed: dict[str, list[dict]] = {label: [] for label, _, _ in rows}
    gold: dict[str, list[list[float]]] = {label: [] for label, _, _ in rows}  # per seed, every answer's gold score
    for seed in seeds:
        args = seed_args(out, seed, train_args)
        base = config.parse_config(args, later_wins=True)  # --seed=seed is among args
        # the warm-up every generating method starts from
        train.ensure_stage(config.parse_config(args + ["--method=dpo"], later_wins=True), rt, "dpo")
        baseline = gold_scores(base, rt, sft, out / f"seed{seed}" / "eval" / "sft.json")
        for label, method, extra in rows:
            if method is None:
                per_seed[label].append(
                    {
                        "gold": float(np.mean(baseline)),
                        "win": 0.5,
                        **{k: v for k, v in stage_times.get("SFT", {}).items() if k == "train_time_s"},
                    }
                )
                gold[label].append(baseline)
                continue
            if label in AT_METAAPO_RATIO:  # equal budget: this seed's MetaAPO ratio
                if not per_seed.get("MetaAPO"):
                    raise SystemExit(f"experiments.compare: the row {label!r} needs the MetaAPO row (--methods)")
                ratio = f"{per_seed['MetaAPO'][-1]['annotation_ratio']:.3f}"
                extra = [a.replace("{metaapo_ratio}", ratio) for a in extra]
            if equal_steps and method in config.ITERATIVE_METHODS:
                extra = [*extra, f"--steps_per_iteration={equal_steps}"]
            cfg = config.parse_config(args + [f"--method={method}", *extra], later_wins=True)
            summary = train.ensure_stage(cfg, rt, method)
            name = config.stage_name(cfg, method)
            scores = gold_scores(
                base, rt, str(Path(cfg.out_dir) / name / "model"), out / f"seed{seed}" / "eval" / f"{name}.json"
            )
            per_seed[label].append(
                {"gold": float(np.mean(scores)), "win": evaluate.win_rate(scores, baseline), **summary}
            )
            if method == "metaapo":  # h after each iteration's last meta update: the meta-learner's drift
                curves = h_curves(Path(cfg.out_dir) / name, cfg.iterations)
                if all(curves):
                    per_seed[label][-1]["h_curve_after_iteration"] = curves
                    per_seed[label][-1]["h0_after_iteration"] = h_at_zero(curves)
            gold[label].append(scores)
            engine.print0(
                rt,
                f"[compare] seed {seed} {label}: gold {np.mean(scores):.3f}, win rate vs SFT "
                f"{evaluate.win_rate(scores, baseline):.1%}",
            )
    results = {
        "seeds": seeds,
        "preset": shared.preset,
        "train_args": train_args,
        "equal_steps": equal_steps,
        "shared": stage_times,
        "minutes": (time.time() - started) / 60,
        "rows": {},
    }
    for label, method, extra in rows:
        runs = per_seed[label]

        def stat(key, runs=runs):
            values = [r[key] for r in runs if key in r]
            return {"mean": float(np.mean(values)), "std": float(np.std(values))} if values else None

        results["rows"][label] = {
            "method": method,
            "args": extra,
            "gold": stat("gold"),
            "win_rate": stat("win"),
            "annotation_ratio": stat("annotation_ratio"),
            "sampling_s": stat("sampling_s"),
            "training_s": stat("training_s") or stat("train_time_s"),
            "per_seed": runs,
        }
        drift = [r["h0_after_iteration"] for r in runs if "h0_after_iteration" in r]
        if drift and len(drift) == len(runs):  # every seed's h was updated: mean and std over seeds
            results["rows"][label]["h0_after_iteration"] = np.mean(drift, axis=0).tolist()
            results["rows"][label]["h0_std_after_iteration"] = np.std(drift, axis=0).tolist()
            last = [r["h_curve_after_iteration"][-1] for r in runs]
            results["rows"][label]["h_curve_at_end"] = np.mean(last, axis=0).tolist()
    if "MetaAPO" in per_seed:
        eval_samples = config.parse_config(seed_args(out, seeds[0], train_args), later_wins=True).eval_samples
        for label, _, _ in rows:
            if label != "MetaAPO":
                results["rows"][label]["vs_metaapo"] = differences(
                    per_seed[label], per_seed["MetaAPO"], gold[label], gold["MetaAPO"], eval_samples
                )
    return results


def h_curves(stage: Path, iterations: int) -> list[list[float] | None]:
    """h on meta.CURVE_GRID after the last meta update of each iteration (None: h was never
    updated, as with --weighting=fixed or uniform), from the h curves train.py logs; an iteration
    without an update keeps the curve before it."""
    if not (stage / "metrics.jsonl").exists():  # a run made elsewhere, or a stand-in's
        return [None] * iterations
    after = {r["iteration"]: r["h_curve"] for r in read_metrics(stage) if "h_curve" in r}  # the last wins
    last, curves = None, []
    for t in range(1, iterations + 1):
        last = after.get(t, last)
        curves.append(last)
    return curves


def h_at_zero(curves: list[list[float] | None]) -> list[float | None]:
    """h(0) of each of h_curves' curves (None where h was never updated)."""
    zero = list(meta.CURVE_GRID).index(0.0)
    return [curve[zero] if curve else None for curve in curves]


def overall_time(run: dict) -> float:
    """A run's sampling plus training seconds (an offline method's train_time_s)."""
    return run.get("sampling_s", 0.0) + run.get("training_s", run.get("train_time_s", 0.0))


def differences(
    runs: list[dict],
    reference: list[dict],
    scores: list[list[float]],
    reference_scores: list[list[float]],
    samples_per_prompt: int,
) -> dict:
    """A row minus MetaAPO, paired by seed: gold, annotation ratio and overall time with t-intervals
    over the seeds' paired differences, and how often one half of the seeds' gold interval holds
    the other half's mean (held_out_half_coverage). The two-level bootstrap over seeds and held-out
    prompts is kept beside (gold_prompt_bootstrap): with few seeds it cannot see between-seed
    variance it never sampled, so its interval is narrower than the seeds warrant."""
    ratio = [r.get("annotation_ratio", 0.0) for r in runs]
    gold = [r["gold"] for r in runs]
    reference_gold = [r["gold"] for r in reference]
    return {
        "gold": paired_t_interval(gold, reference_gold),
        "gold_held_out_half": held_out_half_coverage([a - b for a, b in zip(gold, reference_gold)]),
        "gold_prompt_bootstrap": paired_bootstrap(scores, reference_scores, samples_per_prompt),
        "annotation_ratio": paired_t_interval(ratio, [r["annotation_ratio"] for r in reference]),
        "time_s": paired_t_interval([overall_time(r) for r in runs], [overall_time(r) for r in reference]),
    }


def _fmt(stat, percent: bool = False, digits: int = 3) -> str:
    if stat is None:
        return "-"
    if percent:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}%"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _fmt_interval(diff: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    if diff is None:
        return "-"
    text = f"{scale * diff['mean']:+.{digits}f} [{scale * diff['low']:+.{digits}f}, {scale * diff['high']:+.{digits}f}]"
    return f"**{text}**" if diff["resolved"] else text


TITLES = {"toy": "Toy reproduction", "smollm2": "SmolLM2-135M comparison"}


def results_markdown(results: dict, plots: list[Path], out: Path) -> str:
    rows = results["rows"]
    main = [label for label in rows if label not in ABLATIONS or label == "MetaAPO"]
    n = len(results["seeds"])
    lines = [
        f"# {TITLES.get(results.get('preset', 'toy'), 'Comparison')} ({n} seed{'s' if n != 1 else ''}: "
        f"{', '.join(map(str, results['seeds']))})",
        "",
        f"Made by `python -m experiments.compare --seeds={','.join(map(str, results['seeds']))}"
        f"{''.join(f' {a}' for a in results['train_args'] if a not in COMPARE_TRAIN_ARGS)}` in "
        f"{results['minutes']:.1f} minutes. Gold judge (0-10) on the held-out prompts; mean ± std over seeds. Training "
        f"arguments: `{' '.join(results['train_args']) or '-'}`. The SFT and reward models are shared by all seeds; "
        "every method that generates starts from its seed's DPO warm-up, whose time is not included in its row.",
        "",
        "## Methods (the paper's Table 1)",
        "",
        "| method | gold mean | win rate vs SFT | annotation ratio |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {label} | {_fmt(rows[label]['gold'])} | {_fmt(rows[label]['win_rate'], True)} | "
        f"{_fmt(rows[label]['annotation_ratio'], True)} |"
        for label in main
    ]
    lines += [
        "",
        "## MetaAPO ablations (Table 2)",
        "",
        "| variant | gold mean | win rate vs SFT | annotation ratio |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {label} | {_fmt(rows[label]['gold'])} | {_fmt(rows[label]['win_rate'], True)} | "
        f"{_fmt(rows[label]['annotation_ratio'], True)} |"
        for label in rows
        if label in ABLATIONS
    ]
    lines += [
        "",
        "## Time (Table 8), seconds on this machine",
        "",
        "| method | sampling | training | overall | annotation ratio |",
        "|---|---|---|---|---|",
    ]
    for label in rows:
        sampling, training = rows[label]["sampling_s"], rows[label]["training_s"]
        overall = (sampling["mean"] if sampling else 0.0) + (training["mean"] if training else 0.0)
        lines.append(
            f"| {label} | {_fmt(sampling, digits=0)} | {_fmt(training, digits=0)} | {overall:.0f} | "
            f"{_fmt(rows[label]['annotation_ratio'], True)} |"
        )
    at_budget = [label for label in ["MetaAPO", *AT_METAAPO_RATIO] + [b for b, _ in BUDGET_CURVE] if label in rows]
    if len(at_budget) > 1:
        lines += [
            "",
            "## At equal annotation budget",
            "",
            "The rows calibrated per seed to MetaAPO's measured annotation ratio, and random gating's budget curve "
            "(25 / 50 / 75 / 100 %). Δ gold: the row minus MetaAPO, paired by seed, 95% interval.",
            "",
            "| row | gold mean | annotation ratio | policy steps per seed | Δ gold vs MetaAPO |",
            "|---|---|---|---|---|",
        ]
        for label in at_budget:
            row = rows[label]
            steps = [r["steps"] for r in row["per_seed"] if "steps" in r]
            steps_cell = f"{np.mean(steps):.0f}" if steps else "-"
            lines.append(
                f"| {label} | {_fmt(row['gold'])} | {_fmt(row['annotation_ratio'], True)} | {steps_cell} | "
                f"{_fmt_interval(row.get('vs_metaapo', {}).get('gold'))} |"
            )
    compared = [label for label in rows if "vs_metaapo" in rows[label]]
    if compared:
        lines += [
            "",
            "## Differences from MetaAPO, paired by seed",
            "",
            "Row minus MetaAPO, with 95% t-intervals over the seeds' paired differences: gold, the annotation "
            "ratio and the overall time (sampling + training). **Bold**: the interval excludes 0, the difference "
            "is resolved; otherwise these seeds cannot tell the two apart. Beside the gold interval, the two-level "
            "bootstrap (seeds, then held-out prompts) the tables used before, narrower because it samples the "
            "held-out prompts but only the seeds it has; and how often a t-interval from half the seeds held the "
            "other half's mean difference (200 random halvings; about 88% for a calibrated interval on halves of 5 "
            "seeds).",
            "",
            "| method | Δ gold | Δ gold, seeds x prompts bootstrap | held-out half | Δ annotation ratio (points) | "
            "Δ overall time (s) |",
            "|---|---|---|---|---|---|",
        ]
        for label in compared:
            vs = rows[label]["vs_metaapo"]
            half = vs.get("gold_held_out_half")
            held = f"{half['share']:.0%}" if half else "-"
            lines.append(
                f"| {label} | {_fmt_interval(vs['gold'])} | {_fmt_interval(vs.get('gold_prompt_bootstrap'))} | "
                f"{held} | {_fmt_interval(vs['annotation_ratio'], 100, 1)} | {_fmt_interval(vs['time_s'], digits=0)} |"
            )
        halves = [rows[label]["vs_metaapo"].get("gold_held_out_half") for label in compared]
        halves = [h["share"] for h in halves if h]
        if halves:
            lines += [
                "",
                f"Held-out halves: over the {len(halves)} rows, a half's gold interval held the other half's mean "
                f"difference in {np.mean(halves):.0%} of the splits (row range {min(halves):.0%}-{max(halves):.0%}).",
            ]
    drifting = [label for label in rows if "h0_after_iteration" in rows[label]]
    if drifting:
        lines += [
            "",
            "## The meta-learner's h(0) after each iteration",
            "",
            "h at l = 0 after each iteration's last meta update, mean over seeds (0.5 at the start; the rows whose "
            "h is never updated are left out).",
            "",
            "| method | "
            + " | ".join(f"iteration {t + 1}" for t in range(len(rows[drifting[0]]["h0_after_iteration"])))
            + " |",
            "|---|" + "---|" * len(rows[drifting[0]]["h0_after_iteration"]),
        ]
        lines += [
            f"| {label} | " + " | ".join(f"{v:.3f}" for v in rows[label]["h0_after_iteration"]) + " |"
            for label in drifting
        ]
    if plots:
        lines += [
            "",
            f"## Plots (seed {results['seeds'][0]}'s MetaAPO; the budget curve and h's drift: every seed)",
            "",
        ] + [f"![{p.stem}]({p.relative_to(out)})" for p in plots]
    return "\n".join(lines) + "\n"


def equal_step_count(train_args: list[str]) -> int:
    """--equal_steps' policy steps per iteration: what one epoch over every tuple of D_t takes
    (all sampling's count when no pair is dropped), fixed by the data, not by any method's result."""
    cfg = config.parse_config(train_args, later_wins=True)
    pairs = min(cfg.max_train_pairs or toy.TOY_SIZES["train_prefs"], toy.TOY_SIZES["train_prefs"])
    return math.ceil(math.ceil(pairs / cfg.iterations) / cfg.batch_size)


def selected_labels(methods: str) -> list[str]:
    """The row labels --methods names, comma-separated (a label may hold a comma itself); every
    row when empty. A name that is no row's label is an error listing the labels."""
    labels = [label for label, _, _ in COMPARE_ROWS]
    if not methods:
        return labels
    rest, found = f",{methods},", set()
    for label in sorted(labels, key=len, reverse=True):  # the longest first: "Online DPO, tied ..." holds "Online DPO,"
        if f",{label}," in rest:
            found.add(label)
            rest = rest.replace(f",{label},", ",,")
    unknown = [name for name in rest.split(",") if name.strip()]
    if unknown:
        raise SystemExit(f"experiments.compare: --methods: no row is called {unknown}; the rows: {labels}")
    return [label for label in labels if label in found]


def run_compare(args, given: config.Config, rest: list[str], rt: engine.Runtime) -> None:
    """The tables over seeds, with seed 0's MetaAPO plots and training dynamics.
    --equal_steps: the iterative methods at equal policy steps per iteration, written apart
    (results-equal_steps.*; the offline rows are shared)."""
    # out/compare, out/compare-skill (the toy's second regime), out/compare-smollm2
    task = f"-{given.preset}" if given.preset != "toy" else ""
    task = f"-{given.toy_regime}" if given.toy_regime != "mismatch" else task
    out = Path(args.out or f"out/compare{task}")
    rows = [r for r in COMPARE_ROWS if r[0] in selected_labels(args.methods) or r[0] == "SFT"]
    steps = equal_step_count(COMPARE_TRAIN_ARGS + rest) if args.equal_steps else 0
    results = compare([int(s) for s in args.seeds.split(",")], out, rows, COMPARE_TRAIN_ARGS + rest, rt, steps)
    suffix = "-equal_steps" if steps else ""
    plots, dynamics = [], None
    seed = results["seeds"][0]
    plot_cfg = config.parse_config(
        seed_args(out, seed, COMPARE_TRAIN_ARGS + rest) + ([f"--steps_per_iteration={steps}"] if steps else []),
        later_wins=True,
    )
    metaapo = out / f"seed{seed}" / config.stage_name(plot_cfg, "metaapo")  # the MetaAPO row's directory
    if (metaapo / "done.json").exists():
        try:
            for plot in make_plots(plot_cfg, rt, metaapo, args.scatter_prompts):
                named = out / f"{plot.stem}{suffix}{plot.suffix}"
                if rt.main:
                    shutil.copy(plot, named)
                plots.append(named)
            if any(label in results["rows"] for label, _ in BUDGET_CURVE):
                plots.append(plot_budget_curve(results, out / f"budget_curve{suffix}.png", _pyplot(), rt))
            if any("h0_after_iteration" in row for row in results["rows"].values()):
                plots.append(plot_h_drift(results, out / f"h_drift{suffix}.png", _pyplot(), rt))
        except SystemExit as err:  # no matplotlib: the tables stand without the plots
            engine.print0(rt, str(err))
        dynamics = json.loads((metaapo / "dynamics.json").read_text())
    if rt.main:
        (out / f"results{suffix}.json").write_text(json.dumps({**results, "dynamics": dynamics}, indent=2))
        text = results_markdown(results, plots, out)
        if dynamics:
            text += f"\n## Training dynamics (seed {seed}, MetaAPO)\n\n" + dynamics_markdown(dynamics)
        (out / f"results{suffix}.md").write_text(text)
    engine.print0(rt, (out / f"results{suffix}.md").read_text() if rt.main else "")


def plot_budget_curve(results: dict, path: Path, plt, rt: engine.Runtime) -> Path:
    """Gold against annotation ratio: random gating at 25-100 % (mean ± std over seeds), with
    MetaAPO's point and its interval, and the rows calibrated to MetaAPO's ratio."""
    rows = results["rows"]
    figure, axis = plt.subplots(figsize=(6, 4))
    curve = [(rows[label]["annotation_ratio"], rows[label]["gold"]) for label, _ in BUDGET_CURVE if label in rows]
    axis.errorbar(
        [100 * r["mean"] for r, _ in curve],
        [g["mean"] for _, g in curve],
        yerr=[g["std"] for _, g in curve],
        marker="o",
        label="random gating",
    )
    for label, marker in [("MetaAPO", "*"), *[(label, "s") for label in AT_METAAPO_RATIO]]:
        if label in rows and rows[label]["annotation_ratio"]:
            row = rows[label]
            axis.errorbar(
                [100 * row["annotation_ratio"]["mean"]],
                [row["gold"]["mean"]],
                xerr=[100 * row["annotation_ratio"]["std"]],
                yerr=[row["gold"]["std"]],
                marker=marker,
                markersize=12 if marker == "*" else 6,
                linestyle="none",
                label=label,
            )
    axis.set_xlabel("annotation ratio (%)")
    axis.set_ylabel("gold mean (held-out)")
    axis.legend(fontsize=7)
    return _save(figure, path, plt, rt)


def plot_h_drift(results: dict, path: Path, plt, rt: engine.Runtime) -> Path:
    """The meta-learner's drift per row: h(0) after each iteration (mean ± std over seeds, from
    0.5 at the start), and h over the meta input at the end (mean over seeds) beside sigma(l), the
    fixed weights, which the untrained h approximates."""
    rows = results["rows"]
    drifting = [label for label in rows if "h0_after_iteration" in rows[label]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    fixed = meta.MetaController(2, "score", weighting="fixed").curve()  # sigma(l), about where h starts
    iterations = list(range(len(rows[drifting[0]]["h0_after_iteration"]) + 1))  # 0: before training
    for label in drifting:
        row = rows[label]
        left.errorbar(
            iterations,
            [0.5, *row["h0_after_iteration"]],
            yerr=[0.0, *row["h0_std_after_iteration"]],
            marker="o",
            capsize=3,
            label=label,
        )
        right.plot(meta.CURVE_GRID, row["h_curve_at_end"], marker=".", label=label)
    left.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    left.set_xticks(iterations)
    left.set_xlabel("iteration (0: before training)")
    left.set_ylabel("h(0)")
    left.set_title("h(0) after each iteration's last meta update")
    right.plot(meta.CURVE_GRID, fixed, color="gray", linestyle="--", label="sigma(l): the fixed weights, h's start")
    right.set_xlabel("meta input l (the offline pair's preference score)")
    right.set_ylabel("h(l): weight of the offline pair")
    right.set_title("h at the end of training")
    right.legend(fontsize=6)
    return _save(figure, path, plt, rt)


def build_parser():
    parser = experiment_parser("experiments.compare", __doc__)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--methods", default="", help="comma-separated row labels to run (empty: all)")
    parser.add_argument(
        "--out",
        default="",
        help="run directory (default out/compare, out/compare-skill for --toy_regime=skill, out/compare-smollm2 for "
        "--model=smollm2); finished runs in it are reused",
    )
    parser.add_argument(
        "--equal_steps",
        action="store_true",
        help="every iterative method takes the same policy steps per iteration (one epoch over all of D_t's tuples); "
        "results-equal_steps.md",
    )
    parser.add_argument(
        "--scatter_prompts",
        type=int,
        default=0,
        help="tuples of each kind (sampled, unsampled) per iteration in seed 0's MetaAPO scatter; 0 = all",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    run_experiment("experiments.compare", build_parser(), run_compare, argv)


if __name__ == "__main__":
    main()
