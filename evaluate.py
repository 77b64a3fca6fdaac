"""
Evaluation: the toy reproduction tables, reward statistics, benchmark answer files, plots.

What it does
- `--compare`: the toy counterparts of the paper's Tables 1, 2 and 8. Runs (or reads the finished
  runs of) SFT, DPO, IPO, KTO, SimPO, Selective DPO, PPO, Online DPO, SELM, ADPO, MetaAPO and its ablations (random,
  threshold and all sampling; uniform and fixed weighting; all offline samples) on the toy for
  several seeds, scores every model with the gold judge on the held-out prompts, and writes
  results.md and results.json: gold mean +- std over seeds, win rate against SFT, annotation
  ratio, sampling and training time. The toy data, the SFT model and the reward model are shared
  by all seeds (the paper's fixed starting point); each seed has its own DPO warm-up and runs.
- Benchmark answer files from the question files a user supplies, in each benchmark's own format:
  AlpacaEval 2 (`[{"instruction", "output", "generator", "dataset"}]`), Arena-Hard v0.1
  (`model_answer/<name>.jsonl` with question_id / answer_id / model_id / choices / tstamp) and
  MT-Bench (FastChat's `model_answer/<name>.jsonl`, two turns, FastChat's temperatures per
  category). The judging itself (GPT-4o) is the benchmarks' own tools.
- `--stage_grid`: seed 004's experiment on the toy (train.py --method=stage): starting policies of
  three strengths x {DPO, SLiC-HF} x {the four fixed schedules off/on x off/on, the stage method};
  gold after each iteration, the boundary score before each, the on-policy / static gains at each
  decision and whether the boundary score pointed at the better source, the stage method against
  the best fixed schedule; results.md, results.json and a plot of the boundary scores.
- Reward statistics on test_prefs prompts (mean and std of the reward of generated answers, win
  rate against the dataset's chosen answers) and the implicit-reward preference accuracy
  (beta-scaled log-ratio margin > 0 on the test pairs).
- Training dynamics of a finished stage (`--plots`; also seed 0's MetaAPO in `--compare`), the
  paper's Fig. 2 left and middle and Fig. 3 right, written to <stage>/dynamics.json, printed as
  tables and plotted (matplotlib, optional): the meta-learner curve h(l) after every meta update
  (logged by train.py); for every tuple of every iteration, l_off against the potential gain
  l_on - l_off, sampled vs unsampled; and on the held-out prompts before and after each
  iteration, the reward model's mean and std over generated answers (gold score on the toy) and
  the mean l_off of the held-out pairs.
- `--compare` also reports every row's paired difference from MetaAPO with 95% intervals (gold:
  a bootstrap over seeds and held-out prompts; annotation ratio and time: t-intervals over
  seeds), marking the differences these seeds resolve.

Run
    python evaluate.py --compare                         # toy tables, 3 seeds (25 minutes on 2 CPU cores)
    python evaluate.py --stage_grid                      # seed 004's grid: static or on-policy data per iteration
    python evaluate.py --compare --seeds=0,1,2,3,4
    python evaluate.py --plots=out/toy-seed0/metaapo     # dynamics.json, tables and PNGs there (the stage's config)
    python evaluate.py --model=out/tulu8b-seed0/metaapo/model --name=metaapo-tulu8b --alpaca_eval=alpaca_eval.json \\
        --arena_hard=arena-hard/question.jsonl --mt_bench=mt_bench/question.jsonl --out=out/bench --generator=vllm
    python evaluate.py --model=PATH --reward_model=RM --reward_stats --reference=SFT     # on test_prefs
    torchrun --nproc_per_node 8 evaluate.py ...          # the same, generation and scoring sharded
`python evaluate.py --help` lists its own options and, after them, train.py's config, whose keys it
takes too (--model, --generator, --dataset, --test_split, --reward_model, --reference, ...).
Benchmark answers get up to 4096 new tokens (the paper's B.5) unless --max_new_tokens is given.

Deliberate simplifications
- Arena-Hard's token_len counts the policy tokenizer's tokens (the original uses tiktoken).
- The sampled / unsampled scatter generates a fresh online pair for every tuple of an iteration
  (or --scatter_prompts of each kind) with the iteration's starting policy, since unsampled
  tuples had none; the gains are therefore those of new samples, not of the pairs trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

import checkpoint
import config
import data
import dpo
import fsdp
import train
from meta import CURVE_GRID, MetaController
from reward import toy_gold_judge
from sample import Generation, make_online_pairs

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
    ("SELM", "selm", []),
    ("ADPO", "adpo", []),
    ("MetaAPO", "metaapo", []),
    ("w/ random sampling", "metaapo", ["--sampling=random"]),
    ("w/ threshold sampling", "metaapo", ["--sampling=threshold"]),
    ("w/ all sampling", "metaapo", ["--sampling=all"]),
    ("w/ uniform weighting", "metaapo", ["--weighting=uniform"]),
    ("w/o meta-learner (fixed weights)", "metaapo", ["--weighting=fixed"]),
    ("w/ all offline samples", "metaapo", ["--keep_unsampled"]),
    ("w/ unscaled meta input (reference code)", "metaapo", ["--meta_input_beta=1"]),
]
ABLATIONS = {"MetaAPO"} | {label for label, _, extra in COMPARE_ROWS if extra}
# The comparison trains every method on the first 3000 offline pairs (the shared reward model on
# all 6000, as in the default run): 1000 per iteration, so MetaAPO takes about 30 policy steps and 3 meta
# updates per iteration, and 3 seeds x 18 rows fit in half an hour on 2 cores.
COMPARE_TRAIN_ARGS = ["--max_train_pairs=3000"]
ANSWER_MAX_NEW_TOKENS = 4096  # benchmark answers, as in the paper's B.5 (--max_new_tokens overrides it)
# FastChat's MT-Bench temperatures per category; other categories get 0.7
MT_BENCH_TEMPERATURE = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}


# ==============================================================================================
# Generation and scores shared by the evaluations


def load_generator(cfg: config.Config, rt: fsdp.Runtime, model_path: str) -> tuple[object, object]:
    """(policy, tokenizer) for generate_answers; the policy is None with the vLLM generator, whose
    workers load the checkpoint themselves."""
    if cfg.generator == "vllm":
        return None, data.load_tokenizer(model_path)
    return fsdp.load_logprob_model(model_path, cfg, rt, trainable=False)


def generate_answers(
    cfg: config.Config,
    rt: fsdp.Runtime,
    model_path: str,
    conversations: list[list[dict]],
    temperature: float,
    seed: int,
    loaded: tuple | None = None,
) -> tuple[list[Generation], object]:
    """One answer per conversation (greedy at temperature 0), on every rank; and the tokenizer.
    `loaded`: (policy, tokenizer) from load_generator, kept by the caller for further calls;
    without it they are loaded here and released after."""
    policy, tokenizer = loaded or load_generator(cfg, rt, model_path)
    prompts = [data.encode_prompt(tokenizer, c) for c in conversations]
    answer_cfg = dataclasses.replace(cfg, temperature=temperature, top_p=cfg.top_p if temperature > 0 else 1.0)
    generations = fsdp.distributed_generate(
        policy, tokenizer, prompts, model_path, 1, answer_cfg, rt, seed, Path(cfg.out_dir)
    )
    if loaded is None:
        del policy
        fsdp.release_memory()
    return [g[0] for g in generations], tokenizer


def gold_scores(cfg: config.Config, rt: fsdp.Runtime, model_path: str, cache: Path | None = None) -> list[float]:
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


def win_rate(scores: list[float], baseline: list[float]) -> float:
    """Share of answers scoring above the baseline's answer to the same prompt (ties count half)."""
    return float(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline)]))


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


# ==============================================================================================
# The toy comparison


def seed_args(out: Path, seed: int, train_args: list[str]) -> list[str]:
    """train.py arguments of one seed of the comparison: its own runs, the shared data, SFT and reward model."""
    return [
        f"--seed={seed}",
        "--data_seed=0",
        f"--out_dir={out / f'seed{seed}'}",
        f"--sft_model={out / 'shared' / 'sft' / 'model'}",
        f"--reward_model={out / 'shared' / 'rm' / 'model'}",
        *train_args,
    ]


def compare(seeds: list[int], out: Path, rows: list[tuple], train_args: list[str], rt: fsdp.Runtime) -> dict:
    """Run or read every row's run for every seed, score the models, aggregate over seeds."""
    started = time.time()
    # the shared SFT and reward model are the default run's (COMPARE_TRAIN_ARGS' data cut is for the methods only)
    shared_args = [f"--out_dir={out / 'shared'}", "--seed=0", *[a for a in train_args if a not in COMPARE_TRAIN_ARGS]]
    shared = config.parse_config(shared_args)
    if rt.main:
        data.ensure_toy_assets(0)
    fsdp.barrier(rt)
    stage_times = {"SFT": train.ensure_stage(shared, rt, "sft"), "RM": train.ensure_stage(shared, rt, "rm")}
    sft = str(out / "shared" / "sft" / "model")
    per_seed: dict[str, list[dict]] = {label: [] for label, _, _ in rows}
    gold: dict[str, list[list[float]]] = {label: [] for label, _, _ in rows}  # per seed, every answer's gold score
    for seed in seeds:
        args = seed_args(out, seed, train_args)
        base = config.parse_config(args)  # --seed=seed is among args
        train.ensure_stage(
            config.parse_config(args + ["--method=dpo"]), rt, "dpo"
        )  # the warm-up every generating method starts from
        baseline = gold_scores(base, rt, sft, out / f"seed{seed}" / "eval" / "sft.json")
        for label, method, extra in rows:
            if method is None:
                per_seed[label].append(
                    {
                        "gold": float(np.mean(baseline)),
                        "win": 0.5,
                        **{k: v for k, v in stage_times["SFT"].items() if k == "train_time_s"},
                    }
                )
                gold[label].append(baseline)
                continue
            cfg = config.parse_config(args + [f"--method={method}", *extra])
            summary = train.ensure_stage(cfg, rt, method)
            name = config.stage_name(cfg, method)
            scores = gold_scores(
                base, rt, str(Path(cfg.out_dir) / name / "model"), out / f"seed{seed}" / "eval" / f"{name}.json"
            )
            per_seed[label].append({"gold": float(np.mean(scores)), "win": win_rate(scores, baseline), **summary})
            gold[label].append(scores)
            fsdp.print0(
                rt,
                f"[compare] seed {seed} {label}: gold {np.mean(scores):.3f}, win rate vs SFT "
                f"{win_rate(scores, baseline):.1%}",
            )
    results = {
        "seeds": seeds,
        "train_args": train_args,
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
    if "MetaAPO" in per_seed:
        eval_samples = config.parse_config(seed_args(out, seeds[0], train_args)).eval_samples
        for label, _, _ in rows:
            if label != "MetaAPO":
                results["rows"][label]["vs_metaapo"] = differences(
                    per_seed[label], per_seed["MetaAPO"], gold[label], gold["MetaAPO"], eval_samples
                )
    return results


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
    """A row minus MetaAPO, paired by seed (and by held-out prompt for the gold score): gold with a
    prompts x seeds bootstrap interval; annotation ratio and overall time with t-intervals over seeds."""
    ratio = [r.get("annotation_ratio", 0.0) for r in runs]
    return {
        "gold": paired_bootstrap(scores, reference_scores, samples_per_prompt),
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


def results_markdown(results: dict, plots: list[Path], out: Path) -> str:
    rows = results["rows"]
    main = [label for label in rows if label not in ABLATIONS or label == "MetaAPO"]
    n = len(results["seeds"])
    lines = [
        f"# Toy reproduction ({n} seed{'s' if n != 1 else ''}: {', '.join(map(str, results['seeds']))})",
        "",
        f"Made by `python evaluate.py --compare --seeds={','.join(map(str, results['seeds']))}` in "
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
    compared = [label for label in rows if "vs_metaapo" in rows[label]]
    if compared:
        lines += [
            "",
            "## Differences from MetaAPO, paired by seed",
            "",
            "Row minus MetaAPO, with 95% intervals: the gold score by a two-level bootstrap (seeds, then held-out "
            "prompts within each seed), the annotation ratio and the overall time (sampling + training) by "
            "t-intervals over the seeds. **Bold**: the interval excludes 0, the difference is resolved; otherwise "
            "these seeds cannot tell the two apart.",
            "",
            "| method | Δ gold | Δ annotation ratio (points) | Δ overall time (s) |",
            "|---|---|---|---|",
        ]
        for label in compared:
            vs = rows[label]["vs_metaapo"]
            lines.append(
                f"| {label} | {_fmt_interval(vs['gold'])} | {_fmt_interval(vs['annotation_ratio'], 100, 1)} | "
                f"{_fmt_interval(vs['time_s'], digits=0)} |"
            )
    if plots:
        lines += ["", "## Plots (seed " + str(results["seeds"][0]) + ", MetaAPO)", ""] + [
            f"![{p.stem}]({p.relative_to(out)})" for p in plots
        ]
    return "\n".join(lines) + "\n"


# ==============================================================================================
# Seed 004's grid: static or on-policy data per iteration, from starting policies of three strengths

# (label, directory, how the starting policy is made): train.py arguments of its stage and the stage
STAGE_STARTS = [
    ("weak SFT (2 epochs)", "weak", "sft", ["--sft_epochs=2"]),
    ("SFT (10 epochs, the default)", "sft", "sft", []),
    ("strong: SFT + DPO warm-up", "strong", "dpo", []),
]
STAGE_SCHEDULES = ["off,off", "off,on", "on,off", "on,on", ""]  # "" = the stage method's own choice
STAGE_OBJECTIVES = ["dpo", "slic"]
# Two iterations as in the seed's experiments, over the first 2400 offline pairs (1200 per iteration)
STAGE_TRAIN_ARGS = ["--method=stage", "--iterations=2", "--max_train_pairs=2400"]


def stage_grid(out: Path, rest: list[str], rt: fsdp.Runtime) -> dict:
    """Run (or read) every start x objective x schedule of the grid; return its results."""
    started = time.time()
    if rt.main:
        data.ensure_toy_assets(0)
    fsdp.barrier(rt)
    shared = config.parse_config([f"--out_dir={out / 'sft'}", "--seed=0", *rest])
    train.ensure_stage(shared, rt, "sft")
    reward = train.ensure_stage(shared, rt, "rm")  # one annotator for every run, as the seed's PairRM
    starts, sft_args = {}, {}
    for label, key, method, extra in STAGE_STARTS:
        # the DPO warm-up starts from (and is anchored to) the default SFT model, whose directory is not its own
        sft_args[label] = [f"--sft_model={out / 'sft' / 'sft' / 'model'}"] if method == "dpo" else []
        cfg = config.parse_config([f"--out_dir={out / key}", "--seed=0", *extra, *sft_args[label], *rest])
        train.ensure_stage(cfg, rt, method)
        starts[label] = str(out / key / method / "model")
    base = config.parse_config([f"--out_dir={out}", "--seed=0", *rest])
    gold = lambda path: float(np.mean(gold_scores(base, rt, path, Path(path).parent / "gold_scores.json")))  # noqa: E731
    runs = []
    for (label, key, _, _), objective in [(s, o) for s in STAGE_STARTS for o in STAGE_OBJECTIVES]:
        for schedule in STAGE_SCHEDULES:
            cfg = config.parse_config(
                [
                    *STAGE_TRAIN_ARGS,
                    f"--out_dir={out / key}",
                    "--seed=0",
                    f"--policy={starts[label]}",
                    f"--objective={objective}",
                    f"--reward_model={out / 'sft' / 'rm' / 'model'}",
                    f"--schedule={schedule}",
                    *sft_args[label],
                    *rest,
                ]
            )
            summary = train.ensure_stage(cfg, rt, "stage")
            stage = out / key / config.stage_name(cfg, "stage")
            boundary = [r for r in read_metrics(stage) if r.get("phase") == "boundary"]
            runs.append(
                {
                    "start": label,
                    "objective": objective,
                    "schedule": schedule or "stage",
                    "time_s": summary["sampling_s"] + summary["training_s"],
                    "annotation_ratio": summary["annotation_ratio"],
                    "gold": [gold(starts[label])] + [gold(str(stage / f"iter{t}" / "model")) for t in (1, 2)],
                    "boundary_score": [r["boundary_score"] for r in boundary],
                    "choice": [r["choice"] for r in boundary],
                    "probe_s": sum(r["time_s"] for r in boundary),
                }
            )
            fsdp.print0(
                rt,
                f"[stage grid] {label}, {objective}, {schedule or 'stage'}: gold "
                f"{' -> '.join(f'{g:.3f}' for g in runs[-1]['gold'])}, BS "
                f"{', '.join(f'{b:.3f}' for b in runs[-1]['boundary_score'])}",
            )
    return {
        "runs": runs,
        "reward_model_accuracy": reward.get("test_accuracy"),
        "minutes": (time.time() - started) / 60,
        "findings": stage_findings(runs),
    }


def stage_findings(runs: list[dict]) -> list[dict]:
    """Per start and objective, at each decision (iteration 1; iteration 2 after static or after
    on-policy data): the gold gains of on-policy and of static data, their ratio, the boundary
    score measured there and whether it pointed at the better source; and the stage method's final
    score against the best fixed schedule's."""
    findings = []
    by = {(r["start"], r["objective"], r["schedule"]): r for r in runs}
    for start, objective in dict.fromkeys((r["start"], r["objective"]) for r in runs):
        run = lambda schedule, start=start, objective=objective: by[(start, objective, schedule)]  # noqa: E731
        points = [
            (
                "iteration 1",
                run("on,on")["gold"][1] - run("on,on")["gold"][0],
                run("off,off")["gold"][1] - run("off,off")["gold"][0],
                run("off,off")["boundary_score"][0],
            )
        ]
        for first in ("off", "on"):
            on, off = run(f"{first},on"), run(f"{first},off")
            points.append(
                (
                    f"iteration 2 after {'static' if first == 'off' else 'on-policy'} data",
                    on["gold"][2] - on["gold"][1],
                    off["gold"][2] - off["gold"][1],
                    off["boundary_score"][1],
                )
            )
        fixed = [run(s) for s in STAGE_SCHEDULES if s]
        best = max(fixed, key=lambda r: r["gold"][2])
        findings.append(
            {
                "start": start,
                "objective": objective,
                "points": [
                    {
                        "at": at,
                        "on_gain": on_gain,
                        "static_gain": off_gain,
                        "ratio": on_gain / off_gain if off_gain else float("nan"),
                        "better": "on-policy" if on_gain > off_gain else "static",
                        "boundary_score": bs,
                        "predicted": "on-policy" if bs >= 0.5 else "static",
                    }
                    for at, on_gain, off_gain, bs in points
                ],
                "stage_gold": run("stage")["gold"][2],
                "stage_choices": run("stage")["choice"],
                "best_fixed": best["schedule"],
                "best_fixed_gold": best["gold"][2],
                "stage_extra_s": run("stage")["probe_s"],
            }
        )
    return findings


def stage_grid_markdown(results: dict, plot: Path | None) -> str:
    """results.md of --stage_grid. Costs are annotation ratios (reward-model calls per prompt, in
    units of K), not seconds: on a shared machine the runs' times say more about their neighbours."""
    lines = [
        "# Seed 004's grid on the toy: static or on-policy data per iteration",
        "",
        f"Made by `python evaluate.py --stage_grid` ({results['minutes']:.1f} minutes in its last invocation, which",
        "reuses finished runs): DPO and SLiC-HF, two iterations of 1200 offline pairs each, from three starting",
        "policies; on-policy pairs are the reward",
        "model's best and worst of K = 8 answers, static pairs the offline ones; the boundary score BS is",
        "measured before every iteration on 3% of its prompts (4 answers each against the 2 static answers).",
        "Gold judge (0-10) on the held-out prompts; one seed.",
        "",
        "| start | objective | schedule | gold: start -> iter 1 -> iter 2 | BS before iter 1, 2 | data chosen | "
        "annotation ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        gold, bs = " -> ".join(f"{g:.3f}" for g in r["gold"]), ", ".join(f"{b:.3f}" for b in r["boundary_score"])
        chosen = ", ".join(r["choice"]) if r["schedule"] == "stage" else "-"
        lines.append(
            f"| {r['start']} | {r['objective']} | {r['schedule']} | {gold} | {bs} | {chosen} | "
            f"{r['annotation_ratio']:.1%} |"
        )
    lines += [
        "",
        "## At each decision: which data helped more, and what BS said",
        "",
        "| start | objective | decision | gain on-policy | gain static | on / static | better | BS | BS says |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in results["findings"]:
        for p in f["points"]:
            said = p["predicted"] + ("" if p["predicted"] == p["better"] else " (wrong)")
            lines.append(
                f"| {f['start']} | {f['objective']} | {p['at']} | {p['on_gain']:+.3f} | {p['static_gain']:+.3f} | "
                f"{p['ratio']:.2f} | {p['better']} | {p['boundary_score']:.3f} | {said} |"
            )
    lines += [
        "",
        "## The stage method against the best fixed schedule",
        "",
        "| start | objective | stage's choices | stage gold | best fixed | its gold |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {f['start']} | {f['objective']} | {', '.join(f['stage_choices'])} | {f['stage_gold']:.3f} | "
        f"{f['best_fixed']} | {f['best_fixed_gold']:.3f} |"
        for f in results["findings"]
    ]
    if plot:
        lines += ["", f"![boundary scores]({plot.name})"]
    return "\n".join(lines) + "\n"


def plot_boundary_scores(results: dict, path: Path, plt, rt) -> Path:
    """BS before each iteration: every run, coloured by its start, dashed for SLiC-HF."""
    figure, axis = plt.subplots(figsize=(6, 4))
    colours = dict(zip([s[0] for s in STAGE_STARTS], ["tab:red", "tab:blue", "tab:green"]))
    for r in results["runs"]:
        axis.plot(
            [1, 2],
            r["boundary_score"],
            marker="o",
            color=colours[r["start"]],
            alpha=0.6,
            linestyle="--" if r["objective"] == "slic" else "-",
            label=r["start"] if r["schedule"] == "stage" and r["objective"] == "dpo" else None,
        )
    axis.axhline(0.5, color="gray", linewidth=0.8)
    axis.set_xticks([1, 2])
    axis.set_xlabel("before iteration")
    axis.set_ylabel("boundary score (on-policy win share)")
    axis.legend(fontsize=7)
    return _save(figure, path, plt, rt)


# ==============================================================================================
# Benchmark answer files


def alpaca_eval_problem(q) -> str | None:
    if isinstance(q, dict) and isinstance(q.get("instruction"), str):
        return None
    return "an AlpacaEval question needs an 'instruction' string"


def arena_hard_problem(q) -> str | None:
    if (
        isinstance(q, dict)
        and "question_id" in q
        and isinstance(q.get("turns"), list)
        and q["turns"]
        and all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in q["turns"])
    ):
        return None
    return "an Arena-Hard question needs 'question_id' and 'turns': [{'content': str}]"


def mt_bench_problem(q) -> str | None:
    if (
        isinstance(q, dict)
        and "question_id" in q
        and isinstance(q.get("turns"), list)
        and q["turns"]
        and all(isinstance(t, str) for t in q["turns"])
    ):
        return None
    return "an MT-Bench question needs 'question_id' and 'turns': [str, ...]"


# flag: what a row of its question file must be (None: fine, else the problem)
QUESTION_CHECKS = {"alpaca_eval": alpaca_eval_problem, "arena_hard": arena_hard_problem, "mt_bench": mt_bench_problem}


def alpaca_eval_answers(cfg, rt, model_path: str, questions: list[dict], name: str, temperature: float) -> list[dict]:
    """AlpacaEval 2: the question file is a list of {"instruction", ...}; the answers keep its order."""
    answers, _ = generate_answers(
        cfg, rt, model_path, [[{"role": "user", "content": q["instruction"]}] for q in questions], temperature, cfg.seed
    )
    return [
        {"instruction": q["instruction"], "output": a.text, "generator": name, "dataset": q.get("dataset", "")}
        for q, a in zip(questions, answers)
    ]


def read_questions(path: str, check) -> list[dict]:
    """The rows of a question file, each passing `check` (a one-line error names the first that does not)."""
    questions = []
    for where, row in data.iter_rows(path):
        if isinstance(row, data.DataError):
            raise row
        problem = check(row)
        if problem:
            raise data.DataError(f"{where}: {problem}")
        questions.append(row)
    if not questions:
        raise data.DataError(f"{path}: no questions in the file")
    return questions


def arena_hard_answers(cfg, rt, model_path: str, questions: list[dict], name: str, temperature: float) -> list[dict]:
    """Arena-Hard v0.1: question rows {"question_id", "turns": [{"content"}], ...}; answer rows as
    its gen_answer.py writes them."""
    conversations = [[{"role": "user", "content": q["turns"][0]["content"]}] for q in questions]
    answers, tokenizer = generate_answers(cfg, rt, model_path, conversations, temperature, cfg.seed)
    return [
        {
            "question_id": q["question_id"],
            "answer_id": uuid.uuid4().hex,
            "model_id": name,
            "choices": [
                {
                    "index": 0,
                    "turns": [
                        {"content": a.text, "token_len": len(tokenizer(a.text, add_special_tokens=False)["input_ids"])}
                    ],
                }
            ],
            "tstamp": time.time(),
        }
        for q, a in zip(questions, answers)
    ]


def mt_bench_answers(cfg, rt, model_path: str, questions: list[dict], name: str) -> list[dict]:
    """MT-Bench: question rows {"question_id", "category", "turns": [str, str]}; both turns are
    answered, the second after the first answer, at FastChat's temperature for the category."""
    conversations = [[] for _ in questions]
    turns = [[] for _ in questions]
    loaded = load_generator(cfg, rt, model_path)  # once for every turn and temperature
    for turn in range(max(len(q["turns"]) for q in questions)):
        by_temperature: dict[float, list[int]] = {}
        for i, q in enumerate(questions):
            if turn < len(q["turns"]):
                by_temperature.setdefault(MT_BENCH_TEMPERATURE.get(q.get("category"), 0.7), []).append(i)
        for temperature, indices in sorted(by_temperature.items()):
            for i in indices:
                conversations[i].append({"role": "user", "content": questions[i]["turns"][turn]})
            answers, _ = generate_answers(
                cfg, rt, model_path, [conversations[i] for i in indices], temperature, cfg.seed + turn, loaded
            )
            for i, answer in zip(indices, answers):
                conversations[i].append({"role": "assistant", "content": answer.text})
                turns[i].append(answer.text)
    del loaded
    fsdp.release_memory()
    return [
        {
            "question_id": q["question_id"],
            "answer_id": uuid.uuid4().hex,
            "model_id": name,
            "choices": [{"index": 0, "turns": t}],
            "tstamp": time.time(),
        }
        for q, t in zip(questions, turns)
    ]


# ==============================================================================================
# Reward statistics and implicit-reward accuracy on test_prefs


def reward_statistics(cfg, rt, model_path: str, reward_path: str, pairs: list[data.PreferencePair]) -> dict:
    """Reward of one generated answer per test prompt: mean, std, and the share beating the
    dataset's chosen answer."""
    answers, _ = generate_answers(cfg, rt, model_path, [p.prompt for p in pairs], cfg.temperature, cfg.seed)
    rm = fsdp.load_reward_model(reward_path, cfg, rt)
    generated = rm.score(
        [p.prompt for p in pairs], [a.text for a in answers], [a.finish_reason == "stop" for a in answers]
    )
    chosen = rm.score([p.prompt for p in pairs], [p.chosen for p in pairs])
    del rm
    fsdp.release_memory()
    return {
        "prompts": len(pairs),
        "reward_mean": float(np.mean(generated)),
        "reward_std": float(np.std(generated)),
        "win_rate_vs_chosen": win_rate(generated, chosen),
        "chosen_reward_mean": float(np.mean(chosen)),
    }


def implicit_accuracy(cfg, rt, model_path: str, reference_path: str) -> dict:
    """Share of test pairs with beta * [log pi/pi_ref(y_w) - log pi/pi_ref(y_l)] > 0."""
    policy, tokenizer = fsdp.load_logprob_model(model_path, cfg, rt, trainable=False)
    ref = fsdp.load_logprob_model(reference_path, cfg, rt, trainable=False)[0]
    pairs, _ = dpo.load_pairs(
        cfg, rt, tokenizer, config.require_test_source(cfg, "--reward_stats' implicit-reward accuracy")
    )
    scores = dpo.pair_scores(policy, ref, pairs, dataclasses.replace(cfg, objective="dpo"), rt)
    del policy, ref
    fsdp.release_memory()
    return {
        "pairs": len(pairs),
        "implicit_reward_accuracy": float(np.mean([chosen > rejected for _, _, chosen, rejected in scores])),
    }


# ==============================================================================================
# Training dynamics: the paper's Fig. 2 left and middle and Fig. 3 right, measured on a finished
# stage (computed on every rank, since generation and scoring may be collective; cached in the
# stage's directory), then plotted and summarised in dynamics.json


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "evaluate.py: the plots need matplotlib, an optional dependency: pip install matplotlib"
        ) from None
    return plt


def _save(figure, path: Path, plt, rt: fsdp.Runtime) -> Path:
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


def _stage_paths(cfg, rt, stage: Path, method: str, t: int) -> tuple[str, str | None]:
    """(policy at the start of iteration t + 1, its reference), t counting from 0."""
    stage_obj = checkpoint.Stage(cfg, rt, stage.name)
    stage_obj.dir = stage
    return train.iteration_paths(cfg, stage_obj, method, t)


def sampling_gains(cfg, rt, stage: Path, method: str, iteration: int, per_kind: int = 0) -> list[dict]:
    """Fig. 2 middle's points for one iteration: for every offline tuple of its chunk (or per_kind
    sampled and per_kind unsampled ones), l_off at gating time, whether the gate sent it to
    generation, and its potential gain l_on - l_off. The online pair is generated afresh for every
    tuple, sampled or not, with the iteration's starting policy, the reward model and the same
    reference as l_off (unsampled tuples had none). Cached in iter<t>/gains.json."""
    cache = stage / f"iter{iteration}" / "gains.json"
    if cache.exists() and json.loads(cache.read_text())["per_kind"] == per_kind:
        return json.loads(cache.read_text())["rows"]
    records = [json.loads(line) for line in (stage / f"iter{iteration}" / "gating.jsonl").read_text().splitlines()]
    if per_kind > 0:
        rng = np.random.default_rng(cfg.seed)
        kinds = [[r for r in records if r["selected"] == kind] for kind in (True, False)]
        records = [rows[i] for rows in kinds for i in sorted(rng.permutation(len(rows))[:per_kind])]
    policy_path, ref_path = _stage_paths(cfg, rt, stage, method, iteration - 1)
    policy, tokenizer = fsdp.load_logprob_model(policy_path, cfg, rt, trainable=False)
    ref = fsdp.load_logprob_model(ref_path, cfg, rt, trainable=False)[0] if ref_path else None
    pairs, raw = dpo.load_pairs(cfg, rt, tokenizer, config.train_source(cfg))
    by_index = {p.index: p for p in pairs}
    items = [by_index[r["index"]] for r in records]
    generations = fsdp.distributed_generate(
        policy,
        tokenizer,
        [p.prompt_ids for p in items],
        policy_path,
        cfg.num_samples,
        cfg,
        rt,
        cfg.seed + 777 + iteration,
        stage,
    )
    rm = fsdp.load_reward_model(config.reward_path(cfg), cfg, rt)
    online, _ = make_online_pairs([raw[p.index].prompt for p in items], generations, rm)
    del rm
    kept = [
        (
            r,
            dataclasses.replace(
                p,
                chosen_ids=o.chosen.token_ids[: cfg.max_len - len(p.prompt_ids)],
                rejected_ids=o.rejected.token_ids[: cfg.max_len - len(p.prompt_ids)],
            ),
        )
        for r, p, o in zip(records, items, online)
        if o is not None
    ]  # a prompt whose K rewards all tie has no pair
    online_scores = dpo.pair_scores(policy, ref, [p for _, p in kept], cfg, rt)
    del policy, ref
    fsdp.release_memory()
    rows = [
        {"index": r["index"], "selected": r["selected"], "l_off": r["l_off"], "l_on": s[0], "gain": s[0] - r["l_off"]}
        for (r, _), s in zip(kept, online_scores)
    ]
    if rt.main:
        cache.write_text(json.dumps({"per_kind": per_kind, "rows": rows}))
    return rows


def heldout_point(cfg, rt, policy_path: str, ref_path: str | None, cache: Path) -> dict:
    """Fig. 2 left's measurements for one policy on the held-out split: the reward model's score of
    eval_samples answers per prompt (mean, std), the gold judge's on the toy, and the mean
    preference score l_off of the held-out pairs under (policy, ref). Cached in `cache`."""
    if cache.exists():
        return json.loads(cache.read_text())
    test, _ = dpo.load_heldout(cfg, "the held-out dynamics")
    test = test[: cfg.eval_prompts or len(test)]
    policy, tokenizer = fsdp.load_logprob_model(policy_path, cfg, rt, trainable=False)
    prompts = [data.encode_prompt(tokenizer, p.prompt) for p in test]
    generations = fsdp.distributed_generate(
        policy, tokenizer, prompts, policy_path, cfg.eval_samples, cfg, rt, cfg.seed + 4242, Path(cfg.out_dir)
    )
    conversations = [p.prompt for p, answers in zip(test, generations) for _ in answers]
    answers = [a for per_prompt in generations for a in per_prompt]
    rm = fsdp.load_reward_model(config.reward_path(cfg), cfg, rt)
    rewards = rm.score(conversations, [a.text for a in answers], [a.finish_reason == "stop" for a in answers])
    del rm
    ref = fsdp.load_logprob_model(ref_path, cfg, rt, trainable=False)[0] if ref_path else None
    pairs, _ = dpo.load_pairs(cfg, rt, tokenizer, config.require_test_source(cfg, "the held-out dynamics"))
    scores = dpo.pair_scores(policy, ref, pairs[: len(test)], cfg, rt)
    del policy, ref
    fsdp.release_memory()
    point = {
        "prompts": len(test),
        "answers": len(answers),
        "reward_mean": float(np.mean(rewards)),
        "reward_std": float(np.std(rewards)),
        "l_off_mean": float(np.mean([s[0] for s in scores])),
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
            **heldout_point(cfg, rt, *_stage_paths(cfg, rt, stage, method, 0), stage / "heldout_start.json"),
        }
    ]
    for t in iterations:
        ref_path = _stage_paths(cfg, rt, stage, method, t - 1)[1]
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
    """Fig. 2 middle in numbers: where sampled and unsampled tuples lie."""
    summary = {}
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
            chosen = [r for r in rows if r["selected"] == kind]
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
            f"evaluate.py: --plots={stage}: no config.json there; give a stage directory of a finished train.py run"
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
# CLI


def default_name(model: str) -> str:
    """The model's name in the answer files: the last part of its path or hub id
    (allenai/Llama-3.1-Tulu-3-8B-SFT -> Llama-3.1-Tulu-3-8B-SFT), or the stage's name for a
    train.py export (out/tulu8b-seed0/metaapo/model -> metaapo)."""
    path = Path(model)
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def build_parser() -> argparse.ArgumentParser:
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=Formatter,
        epilog="Every other --key=value is train.py's config:\n\n" + config.config_help().split("\n\n", 2)[2],
    )
    parser.add_argument("--compare", action="store_true", help="the toy comparison of every method over several seeds")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of --compare")
    parser.add_argument("--methods", default="", help="--compare: comma-separated row labels to run (empty: all)")
    parser.add_argument(
        "--compare_out", default="out/compare", help="--compare: run directory; finished runs in it are reused"
    )
    parser.add_argument(
        "--stage_grid", action="store_true", help="seed 004's grid: starts x {dpo, slic} x {4 fixed schedules, stage}"
    )
    parser.add_argument(
        "--stage_out", default="out/stage_grid", help="--stage_grid: run directory; finished runs in it are reused"
    )
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
    parser.add_argument("--name", default="", help="model name written into the benchmark answer files")
    parser.add_argument("--alpaca_eval", default="", help="AlpacaEval 2 question file (JSON list)")
    parser.add_argument("--alpaca_temperature", type=float, default=0.7, help="AlpacaEval 2 sampling temperature")
    parser.add_argument("--arena_hard", default="", help="Arena-Hard v0.1 question.jsonl")
    parser.add_argument(
        "--arena_temperature", type=float, default=0.0, help="Arena-Hard sampling temperature (0 = greedy)"
    )
    parser.add_argument("--mt_bench", default="", help="MT-Bench question.jsonl (FastChat)")
    parser.add_argument(
        "--reward_stats", action="store_true", help="reward statistics and implicit-reward accuracy on the test split"
    )
    parser.add_argument("--max_prompts", type=int, default=0, help="--reward_stats: test prompts used (0 = all)")
    parser.add_argument(
        "--out",
        default="",
        help="where answer files and statistics go (default: <model dir>/../eval, out/eval/<name> for a hub id)",
    )
    return parser


def run_compare(args, rest: list[str], rt: fsdp.Runtime) -> None:
    """--compare: the tables over seeds, with seed 0's MetaAPO plots and training dynamics."""
    out = Path(args.compare_out)
    rows = [r for r in COMPARE_ROWS if not args.methods or r[0] in args.methods.split(",") or r[0] == "SFT"]
    results = compare([int(s) for s in args.seeds.split(",")], out, rows, COMPARE_TRAIN_ARGS + rest, rt)
    plots, dynamics = [], None
    seed = results["seeds"][0]
    metaapo = out / f"seed{seed}" / "metaapo"
    if (metaapo / "done.json").exists():
        try:
            plot_cfg = config.parse_config(seed_args(out, seed, COMPARE_TRAIN_ARGS + rest))
            for plot in make_plots(plot_cfg, rt, metaapo, args.scatter_prompts):
                if rt.main:
                    shutil.copy(plot, out / plot.name)
                plots.append(out / plot.name)
        except SystemExit as err:  # no matplotlib: the tables stand without the plots
            fsdp.print0(rt, str(err))
        dynamics = json.loads((metaapo / "dynamics.json").read_text())
    if rt.main:
        (out / "results.json").write_text(json.dumps({**results, "dynamics": dynamics}, indent=2))
        text = results_markdown(results, plots, out)
        if dynamics:
            text += f"\n## Training dynamics (seed {seed}, MetaAPO)\n\n" + dynamics_markdown(dynamics)
        (out / "results.md").write_text(text)
    fsdp.print0(rt, (out / "results.md").read_text() if rt.main else "")


def run_stage_grid(args, rest: list[str], rt: fsdp.Runtime) -> None:
    out = Path(args.stage_out)
    results = stage_grid(out, rest, rt)
    plot = None
    try:
        plot = plot_boundary_scores(results, out / "boundary_scores.png", _pyplot(), rt)
    except SystemExit as err:  # no matplotlib: the tables stand without the plot
        fsdp.print0(rt, str(err))
    if rt.main:
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(stage_grid_markdown(results, plot))
    fsdp.print0(rt, (out / "results.md").read_text() if rt.main else "")


def run_benchmarks(args, cfg: config.Config, rest: list[str], rt: fsdp.Runtime) -> None:
    """Benchmark answer files and reward statistics of one model (--policy, else --model)."""
    model = cfg.policy or cfg.model
    if args.reward_stats and not cfg.reward_model:
        raise config.ConfigError("--reward_stats needs --reward_model")
    if args.alpaca_eval or args.arena_hard or args.mt_bench or args.reward_stats:
        config.check_model("--policy" if cfg.policy else "--model", model)
        for flag, path in (
            ("--reward_model", cfg.reward_model if args.reward_stats else ""),
            ("--reference", cfg.reference),
        ):
            if path:
                config.check_model(flag, path, reward=flag == "--reward_model")
    # every question file is read and checked before any answer is generated (or written)
    questions = {
        kind: read_questions(path, QUESTION_CHECKS[kind])
        for kind, path in (
            ("alpaca_eval", args.alpaca_eval),
            ("arena_hard", args.arena_hard),
            ("mt_bench", args.mt_bench),
        )
        if path
    }
    name = args.name or default_name(model)
    given = any(
        arg.split("=")[0] == "--max_new_tokens" for arg in rest
    )  # answers get the paper's 4096 (B.5) unless told
    answer_cfg = cfg if given else dataclasses.replace(cfg, max_new_tokens=ANSWER_MAX_NEW_TOKENS)
    out = Path(args.out) if args.out else Path(model).parent / "eval"
    if not args.out and not Path(model).exists():  # a hub id: not next to it
        out = Path("out") / "eval" / name
    written = []
    if args.alpaca_eval:
        answers = alpaca_eval_answers(answer_cfg, rt, model, questions["alpaca_eval"], name, args.alpaca_temperature)
        written.append(out / "alpaca_eval" / f"{name}.json")
        if rt.main:
            written[-1].parent.mkdir(parents=True, exist_ok=True)
            written[-1].write_text(json.dumps(answers, indent=2, ensure_ascii=False))
    if args.arena_hard:
        answers = arena_hard_answers(answer_cfg, rt, model, questions["arena_hard"], name, args.arena_temperature)
        written.append(out / "arena-hard" / "model_answer" / f"{name}.jsonl")
        if rt.main:
            data.write_jsonl(written[-1], answers)
    if args.mt_bench:
        answers = mt_bench_answers(answer_cfg, rt, model, questions["mt_bench"], name)
        written.append(out / "mt_bench" / "model_answer" / f"{name}.jsonl")
        if rt.main:
            data.write_jsonl(written[-1], answers)
    if args.reward_stats:
        test, _ = dpo.load_heldout(cfg, "--reward_stats")
        stats = reward_statistics(cfg, rt, model, cfg.reward_model, test[: args.max_prompts or len(test)])
        if cfg.reference:  # the implicit reward is a log-ratio against the reference the model was trained with
            stats.update(implicit_accuracy(cfg, rt, model, cfg.reference))
        written.append(out / "reward_stats.json")
        if rt.main:
            out.mkdir(parents=True, exist_ok=True)
            written[-1].write_text(json.dumps(stats, indent=2))
        fsdp.print0(rt, json.dumps(stats, indent=2))
    if not written and rt.main:
        raise SystemExit(
            "evaluate.py: nothing to do; give --compare, --plots, a benchmark question file or --reward_stats"
        )
    for path in written:
        fsdp.print0(rt, f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    args, rest = build_parser().parse_known_args(argv)
    try:
        cfg = config.parse_config(rest)
    except config.ConfigError as err:
        raise SystemExit(f"evaluate.py: {err}") from None
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    handlers = {signum: signal.signal(signum, fsdp.request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    deterministic = torch.are_deterministic_algorithms_enabled()
    rt = fsdp.setup_distributed(cfg)
    try:
        checkpoint.start_wandb(cfg, rt)
        if args.compare:
            run_compare(args, rest, rt)
        elif args.stage_grid:
            run_stage_grid(args, rest, rt)
        elif args.plots:
            stage = Path(args.plots)
            plots = make_plots(stage_config(stage, rest), rt, stage, args.scatter_prompts)
            fsdp.print0(rt, dynamics_markdown(json.loads((stage / "dynamics.json").read_text())) if rt.main else "")
            for plot in plots:
                fsdp.print0(rt, f"wrote {plot}")
        else:
            run_benchmarks(args, cfg, rest, rt)
    except fsdp.Stopped as err:
        print(
            f"evaluate.py: {err}; the finished runs are kept: the same command with --resume goes on",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(128 + fsdp.STOP_SIGNAL[0]) from None
    except (config.ConfigError, fsdp.NonFiniteLoss, train.NothingTrained, data.DataError) as err:
        raise SystemExit(f"evaluate.py: {err}") from None
    finally:
        if checkpoint.WANDB:
            checkpoint.WANDB.pop().finish()
        if rt.distributed:
            gc.collect()  # as train.py: what reference cycles hold goes while the process group exists
            torch.distributed.destroy_process_group()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        torch.use_deterministic_algorithms(deterministic)


if __name__ == "__main__":
    main()
