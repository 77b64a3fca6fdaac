"""
The Meta-Aligner's comparison on the two-objective toy (a reconstruction; see meta_aligner.py
and this folder's README): each method's Pareto front over RiC's 11-point weight grid, i.e. the mean gold
(helpful, harmless) of one answer per held-out prompt conditioned on each grid weight; its
hypervolume (reference (0, 0), 0-10 scale) beside the oracle's, after stage 0 and after each
online iteration, over seeds with 95% t-intervals and each method's paired difference from
Meta-Aligner (lambda 0.5); auto mode (conditioned on g_phi(x)) against the model's best fixed grid
weight on the hidden utility of the prompt's tag; and how closely the policy obeys its condition.

Run (from the repository's root)
    python -m experiments.meta_aligner.pareto          # 3 seeds, every row: out/pareto/results.md, fronts.png
    python -m experiments.meta_aligner.pareto --seeds=0 --methods="RiC;Meta-Aligner, lambda 0.5"
    torchrun --nproc_per_node 2 -m experiments.meta_aligner.pareto   # the same numbers, generation sharded
Finished runs and evaluations in the directory are reused; a stopped comparison goes on with
--resume.

Deliberate simplifications
- Every seed shares one SFT model and one stage 0 per condition kind (built from data seed 0:
  they depend on the data only); the seeds vary the online stages (prompt order, weights,
  generation, reward noise) and the held-out answers. The seed spread is the online stage's.
- Fidelity is the note's: the mean |w^_helpful - w_helpful| of the answers' realised weights
  (softmax of their normalised gold / T_w) against the asked grid weight; with T_w = 0.1 realised
  weights are nearly one-hot, so even the oracle is far from 0; its value is printed beside.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

import data
import engine
from config import seed_for
from experiments import experiment_parser, run_experiment
from experiments.compare import paired_t_interval
from experiments.dynamics import _pyplot
from experiments.meta_aligner import meta_aligner as meal
from experiments.meta_aligner import toy_multiobjective as mo

PARETO_ROWS = [  # (label, aligner_method or None for the SFT model, extra arguments)
    ("SFT", None, []),
    ("RiC", "ric", []),
    ("Static-weight RS", "static", []),
    ("PRO-WIC (g_phi frozen)", "pro", []),
    ("Meta-Aligner, lambda 0.25", "meta_aligner", ["--aligner_relabel=0.25"]),
    ("Meta-Aligner, lambda 0.5", "meta_aligner", []),
    ("Meta-Aligner, lambda 1", "meta_aligner", ["--aligner_relabel=1"]),
]
REFERENCE_ROW = "Meta-Aligner, lambda 0.5"


def heldout_prompts(cfg) -> list[str]:
    rows = [row for _, row in data.iter_rows(cfg.dataset, cfg.test_split)]
    return [row["prompt"] for row in rows[: cfg.aligner_eval_prompts]]


EVAL_TOP_P = 0.9  # the note's evaluation sampling (temperature 1.0, the toy's)


def answers(cfg, rt, model_dir: Path, texts: list[str], seed: int) -> list[str]:
    """One sampled answer per text (the user's turn), on every rank, at top_p EVAL_TOP_P."""
    cfg = dataclasses.replace(cfg, top_p=EVAL_TOP_P)
    model, tokenizer = engine.load_logprob_model(str(model_dir), cfg, rt, trainable=False)
    ids = [data.encode_prompt(tokenizer, [{"role": "user", "content": text}]) for text in texts]
    out = engine.distributed_generate(model, tokenizer, ids, "", 1, cfg, rt, seed, model_dir, backend="transformers")
    del model
    engine.release_memory()
    return [g[0].text for g in out]


def condition(kind: str, prompt: str, weights: tuple[float, float]) -> str:
    if kind == "wic":
        return mo.conditioned(prompt, weights)
    if kind == "ric":
        return mo.ric_conditioned(prompt, meal.ric_targets(weights))
    return prompt  # the SFT model knows no condition


def realised_helpful(gold: list[tuple[float, float]], stats, temperature: float) -> np.ndarray:
    """w^_helpful of each answer from its normalised gold (the note's fidelity measure)."""
    normalised = torch.tensor([mo.normalise(g, stats) for g in gold], dtype=torch.float64)
    return meal.realised_weights(normalised, temperature)[:, 0].numpy()


def front_record(prompts: list[str], grid, gold_per_w: list[list[tuple[float, float]]], stats, temperature) -> dict:
    """Points, hypervolume, hidden utility per grid weight and fidelity of answers' gold per grid weight."""
    points = [tuple(float(np.mean([g[i] for g in gold])) for i in range(2)) for gold in gold_per_w]
    utility = [
        float(np.mean([sum(u * x for u, x in zip(mo.MO_USER_WEIGHTS[p.split()[0]], g)) for p, g in zip(prompts, gold)]))
        for gold in gold_per_w
    ]
    fidelity = [
        float(np.mean(np.abs(realised_helpful(gold, stats, temperature) - w[0]))) for w, gold in zip(grid, gold_per_w)
    ]
    best = int(np.argmax(utility))
    return {
        "points": points,
        "hypervolume": mo.hypervolume(points),
        "utility": utility,
        "best_fixed_weights": list(grid[best]),
        "best_fixed_utility": utility[best],
        "fidelity": float(np.mean(fidelity)) if len(grid) > 1 else None,
    }


def evaluate_model(cfg, rt, model_dir: Path, kind: str, weight_net: Path | None, stats, cache: Path) -> dict:
    """The front of one model (kind: wic, ric or none), and its auto mode when a weight net is given;
    cached in `cache`."""
    if cache.exists():
        return json.loads(cache.read_text())
    started = time.time()
    prompts = heldout_prompts(cfg)
    grid = mo.MO_GRID if kind != "none" else ((0.5, 0.5),)
    texts = [condition(kind, p, w) for w in grid for p in prompts]
    auto = None
    if weight_net is not None:
        tokenizer = data.load_tokenizer(model_dir)
        net = meal.WeightNet(len(tokenizer))
        net.load_state_dict(torch.load(weight_net, map_location="cpu"))
        with torch.no_grad():
            auto = net(*meal.prompt_tensors(tokenizer, prompts))
        texts += [mo.conditioned(p, tuple(w)) for p, w in zip(prompts, auto.tolist())]
    replies = answers(cfg, rt, model_dir, texts, seed_for(cfg, "aligner front"))
    gold = [mo.gold_scores(p, a) for p, a in zip(prompts * (len(grid) + (auto is not None)), replies)]
    n = len(prompts)
    per_w = [gold[k * n : (k + 1) * n] for k in range(len(grid))]
    record = front_record(prompts, grid, per_w, stats, cfg.aligner_weight_temperature)
    if auto is not None:
        auto_gold = gold[len(grid) * n :]
        record["auto_utility"] = float(
            np.mean(
                [sum(u * x for u, x in zip(mo.MO_USER_WEIGHTS[p.split()[0]], g)) for p, g in zip(prompts, auto_gold)]
            )
        )
        record["auto_point"] = [float(np.mean([g[i] for g in auto_gold])) for i in range(2)]
        for tag in mo.MO_TAGS:
            rows = [i for i, p in enumerate(prompts) if p.startswith(tag)]
            record[f"g_harmless_{tag}"] = float(auto[rows, 1].mean())
    record["seconds"] = time.time() - started
    if rt.main:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(record, indent=2))
    engine.barrier(rt)
    return record


def oracle_record(cfg) -> dict:
    """The oracle (a perfect sorter choosing which unsafe letters to leave out) on the same prompts."""
    prompts = heldout_prompts(cfg)
    per_w = [[mo.oracle_choice(mo.mo_parse_prompt(p)[2], w) for p in prompts] for w in mo.MO_GRID]
    stats = meal.offline_stats(meal.shared_dir(cfg) / meal.STAGE_WIC)
    record = front_record(prompts, mo.MO_GRID, per_w, stats, cfg.aligner_weight_temperature)
    record["prompt_aware_utility"] = mo.oracle_utility(prompts)["prompt_aware"]
    record["hull_hypervolume"] = mo.oracle_hull_hypervolume(prompts)
    return record


def run_row(out: Path, seed: int, method: str | None, extra: list[str], rest: list[str], rt) -> dict:
    """One row for one seed: its runs (made when missing) and the evaluation of every checkpoint,
    stage 0 first: {"checkpoints": [record per checkpoint], "train_time_s": online stage's time}."""
    args = [f"--seed={seed}", "--data_seed=0", f"--out_dir={out / f'seed{seed}'}"]
    args += [f"--aligner_shared_dir={out / 'shared'}", *rest, *extra]
    cfg = meal.mo_config(args + ([f"--aligner_method={method}"] if method else []), later_wins=True)
    evals = Path(cfg.out_dir) / "eval"
    if method is None:
        stats = meal.offline_stats(meal.ensure_offline(cfg, rt))
        sft = meal.shared_dir(cfg) / meal.STAGE_SFT / "model"  # ensure_offline made it
        return {"checkpoints": [evaluate_model(cfg, rt, sft, "none", None, stats, evals / "sft.json")]}
    summary = meal.ensure_online(cfg, rt)
    engine.release_memory()
    offline = meal.shared_dir(cfg) / meal.offline_stage(cfg)
    stats = meal.offline_stats(offline)
    kind = "ric" if method == "ric" else "wic"
    has_net = method in ("pro", "meta_aligner")
    # stage 0 is shared: the WIC one is evaluated with its fitted g_phi for every WIC row
    stage0_net = offline / "weight_net.pt" if kind == "wic" else None
    checkpoints = [evaluate_model(cfg, rt, offline / "model", kind, stage0_net, stats, evals / f"{offline.name}.json")]
    name = meal.online_stage_name(cfg)
    for t in range(1, cfg.aligner_iterations + 1):
        directory = Path(cfg.out_dir) / name / f"iter{t}"
        weight_net = directory / "weight_net.pt" if has_net else None
        checkpoints.append(evaluate_model(cfg, rt, directory, kind, weight_net, stats, evals / f"{name}-iter{t}.json"))
    return {"checkpoints": checkpoints, "train_time_s": summary["train_time_s"], "summary": summary}


def mean_interval(values: list[float]) -> dict:
    """Mean over seeds with its 95% t-interval (the interval is None with one seed)."""
    found = paired_t_interval(values, [0.0] * len(values))
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "interval": found}


def aggregate(per_seed: dict[str, list[dict]], oracle: dict) -> dict:
    rows = {}
    reference = [r["checkpoints"][-1]["hypervolume"] for r in per_seed.get(REFERENCE_ROW, [])]
    for label, runs in per_seed.items():
        final = [r["checkpoints"][-1] for r in runs]
        hv = [f["hypervolume"] for f in final]
        row = {
            "hypervolume": mean_interval(hv),
            "of_oracle": float(np.mean(hv)) / oracle["hypervolume"],
            "of_hull": float(np.mean(hv)) / oracle["hull_hypervolume"],
            "per_iteration": [
                mean_interval([r["checkpoints"][t]["hypervolume"] for r in runs])
                for t in range(len(runs[0]["checkpoints"]))
            ],
            "best_fixed_utility": mean_interval([f["best_fixed_utility"] for f in final]),
            "fidelity": mean_interval([f["fidelity"] for f in final]) if final[0]["fidelity"] is not None else None,
            "per_seed_hypervolume": hv,
            "train_time_s": mean_interval([r["train_time_s"] for r in runs]) if "train_time_s" in runs[0] else None,
        }
        if "auto_utility" in final[0]:
            row["auto_utility"] = mean_interval([f["auto_utility"] for f in final])
            row["auto_minus_best_fixed"] = paired_t_interval(
                [f["auto_utility"] for f in final], [f["best_fixed_utility"] for f in final]
            )
            for tag in mo.MO_TAGS:  # per checkpoint: g_phi's drift across the iterations
                row[f"g_harmless_{tag}"] = [
                    float(np.mean([r["checkpoints"][t][f"g_harmless_{tag}"] for r in runs]))
                    for t in range(len(runs[0]["checkpoints"]))
                ]
        if reference and label != REFERENCE_ROW and len(hv) == len(reference):
            row["vs_reference"] = paired_t_interval(hv, reference)
        rows[label] = row
    return rows


def fmt(stat: dict | None, digits: int = 1) -> str:
    if stat is None:
        return "—"
    found = stat.get("interval")
    if found is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} [{found['low']:.{digits}f}, {found['high']:.{digits}f}]"


def diff(found: dict | None, digits: int = 1) -> str:
    if found is None:
        return "—"
    mark = " (resolved)" if found["resolved"] else ""
    return f"{found['mean']:+.{digits}f} [{found['low']:+.{digits}f}, {found['high']:+.{digits}f}]{mark}"


def results_markdown(results: dict) -> str:
    oracle, rows = results["oracle"], results["rows"]
    lines = [
        f"# Meta-Aligner (reconstructed) on the two-objective toy: seeds {results['seeds']}, "
        f"{results['minutes']:.1f} minutes",
        "",
        f"Oracle on the same {results['eval_prompts']} held-out prompts: hypervolume {oracle['hypervolume']:.1f} "
        f"on the 11-point grid, {oracle['hull_hypervolume']:.1f} for its continuous hull (any weight, mixtures "
        f"included; reference (0, 0)); hidden utility {oracle['best_fixed_utility']:.2f} at the best fixed weight, "
        f"{oracle['prompt_aware_utility']:.2f} prompt-aware; fidelity {oracle['fidelity']:.3f}.",
        "",
        "Hypervolume after the last online iteration (mean over seeds [95% t-interval]); the paired "
        f"difference from {REFERENCE_ROW} (resolved: the interval excludes 0); per checkpoint (stage 0, then each "
        "online iteration).",
        "",
        f"| method | hypervolume | of oracle (grid) | of oracle (hull) | vs {REFERENCE_ROW} | per checkpoint | "
        "seed std | online time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        per = " → ".join(f"{s['mean']:.1f}" for s in row["per_iteration"])
        time_s = f"{row['train_time_s']['mean']:.0f}" if row["train_time_s"] else "—"
        lines.append(
            f"| {label} | {fmt(row['hypervolume'])} | {row['of_oracle']:.0%} | {row['of_hull']:.0%} | "
            f"{diff(row.get('vs_reference'))} | "
            f"{per} | {row['hypervolume']['std']:.1f} | {time_s} |"
        )
    lines += [
        "",
        "Hidden utility (the tag's intended trade-off, 0-10): the best fixed grid weight of each model, auto mode "
        "(conditioned on g_phi(x)) and their paired difference; g_phi's mean harmless weight on strict and lax "
        "prompts per checkpoint; fidelity (mean |w^ - w| over the grid, lower obeys better).",
        "",
        "| method | best fixed weight | auto (g_phi(x)) | auto - best fixed | g_phi harmless: strict / lax "
        "| fidelity |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        g = "—"
        if "g_harmless_strict" in row:
            g = " → ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(row["g_harmless_strict"], row["g_harmless_lax"]))
        lines.append(
            f"| {label} | {fmt(row['best_fixed_utility'], 2)} | {fmt(row.get('auto_utility'), 2)} | "
            f"{diff(row.get('auto_minus_best_fixed'), 2)} | {g} | {fmt(row['fidelity'], 3)} |"
        )
    lines += ["", "![fronts](fronts.png)", ""]
    return "\n".join(lines)


def plot(results: dict, per_seed: dict[str, list[dict]], path: Path) -> None:
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    oracle = results["oracle"]["points"]
    left.plot([p[0] for p in oracle], [p[1] for p in oracle], "k--", marker="x", label="oracle")
    for label, runs in per_seed.items():
        points = runs[0]["checkpoints"][-1]["points"]
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        means = [s["mean"] for s in results["rows"][label]["per_iteration"]]
        stds = [s["std"] for s in results["rows"][label]["per_iteration"]]
        right.errorbar(range(len(means)), means, yerr=stds, marker="o", capsize=3, label=label)
    left.set(
        xlabel="helpful (gold)",
        ylabel="harmless (gold)",
        title=f"fronts after the last iteration (seed {results['seeds'][0]})",
    )
    right.set(
        xlabel="checkpoint (0 = stage 0)",
        ylabel="hypervolume",
        title="hypervolume per iteration (mean ± std over seeds)",
    )
    right.axhline(results["oracle"]["hypervolume"], color="k", linestyle="--", label="oracle")
    right.set_xticks(range(max(len(row["per_iteration"]) for row in results["rows"].values())))
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_pareto(args, cfg, rest: list[str], rt: engine.Runtime) -> None:
    """Every row over the seeds; results.md, results.json and fronts.png in the directory."""
    started = time.time()
    out = Path(args.out)
    wanted = [m.strip() for m in args.methods.split(";") if m.strip()] if args.methods else []
    rows = [r for r in PARETO_ROWS if not wanted or r[0] in wanted]
    unknown = set(wanted) - {r[0] for r in PARETO_ROWS}
    if unknown:
        raise SystemExit(
            f"experiments.meta_aligner.pareto: --methods: unknown rows {sorted(unknown)}; the rows: "
            f"{[r[0] for r in PARETO_ROWS]}"
        )
    seeds = [int(s) for s in args.seeds.split(",")]
    if rt.main:
        mo.ensure_mo_assets(0)
    engine.barrier(rt)
    per_seed: dict[str, list[dict]] = {label: [] for label, _, _ in rows}
    for seed in seeds:
        for label, method, extra in rows:
            per_seed[label].append(run_row(out, seed, method, extra, rest, rt))
            final = per_seed[label][-1]["checkpoints"][-1]
            engine.print0(rt, f"[pareto] seed {seed} {label}: hypervolume {final['hypervolume']:.1f}")
    cfg = meal.mo_config(["--data_seed=0", f"--aligner_shared_dir={out / 'shared'}", *rest], later_wins=True)
    oracle = oracle_record(cfg)
    results = {
        "seeds": seeds,
        "args": rest,
        "eval_prompts": len(heldout_prompts(cfg)),
        "minutes": (time.time() - started) / 60,
        "oracle": oracle,
    }
    results["rows"] = aggregate(per_seed, oracle)
    if rt.main:
        (out / "results.json").write_text(json.dumps({**results, "per_seed": per_seed}, indent=2))
        try:
            plot(results, per_seed, out / "fronts.png")
        except SystemExit as err:  # no matplotlib: the tables stand without the plot
            print(err)
        (out / "results.md").write_text(results_markdown(results))
        print(results_markdown(results))
        print(f"wrote {out / 'results.md'}")
    engine.barrier(rt)


def main(argv: list[str] | None = None) -> None:
    parser = experiment_parser("experiments.meta_aligner.pareto", __doc__, meal.AlignerConfig)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument(
        "--methods",
        default="",
        help="semicolon-separated row labels to run (empty: all), e.g. 'RiC;Meta-Aligner, lambda 0.5'",
    )
    parser.add_argument("--out", default="out/pareto", help="run directory; finished runs are reused")
    run_experiment("experiments.meta_aligner.pareto", parser, run_pareto, argv, meal.AlignerConfig)


if __name__ == "__main__":
    main()
