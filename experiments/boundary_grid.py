"""
The on-policy/static boundary method's grid on the toy (train.py --method=boundary; the method of
seed paper 004, "alignment-stage boundary"): does the boundary score point at the data source
that helps more at each iteration?

What it does
- Starting policies of three strengths x {DPO, SLiC-HF} x {the four fixed schedules (static or
  on-policy data in each of two iterations), the boundary method}; gold after each iteration,
  the boundary score before each, the on-policy / static gains at each decision and whether the
  boundary score pointed at the better source, the boundary method against the best fixed
  schedule; results.md, results.json and a plot of the boundary scores in the run directory.

Run (from the repository's root)
    python -m experiments.boundary_grid                 # out/boundary_grid; finished runs are reused
    python -m experiments.boundary_grid --starts=weak --objectives=dpo   # a part of the grid: 5 runs
    torchrun --nproc_per_node 2 -m experiments.boundary_grid   # generation and scoring sharded
Every run is a train.py stage: a stopped grid goes on with the same command and --resume.
docs/boundary_grid.md has the tables it made.

Deliberate simplifications
- One seed; costs are annotation ratios (reward-model calls per prompt), not seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

import config
import engine
import toy
import train
from experiments import experiment_parser, run_experiment
from experiments.compare import gold_scores
from experiments.dynamics import _pyplot, _save, read_metrics

# ==============================================================================================
# The grid: static or on-policy data per iteration

# (label, directory, how the starting policy is made): train.py arguments of its stage and the stage
BOUNDARY_STARTS = [
    ("weak SFT (2 epochs)", "weak", "sft", ["--sft_epochs=2"]),
    ("SFT (10 epochs, the default)", "sft", "sft", []),
    ("strong: SFT + DPO warm-up", "strong", "dpo", []),
]

BOUNDARY_SCHEDULES = ["off,off", "off,on", "on,off", "on,on", ""]  # "" = the boundary method's own choice

BOUNDARY_OBJECTIVES = ["dpo", "slic"]

# Two iterations as in the seed's experiments, over the first 2400 offline pairs (1200 per iteration)
BOUNDARY_TRAIN_ARGS = ["--method=boundary", "--iterations=2", "--max_train_pairs=2400"]


def boundary_grid(
    out: Path, rest: list[str], rt: engine.Runtime, starts: list[str] | None = None, objectives: list[str] | None = None
) -> dict:
    """Run (or read) every start x objective x schedule of the grid, or of the starts (their
    directory names: weak, sft, strong) and objectives given; return its results."""
    chosen = [s for s in BOUNDARY_STARTS if not starts or s[1] in starts]
    objectives = [o for o in BOUNDARY_OBJECTIVES if not objectives or o in objectives]
    started = time.time()
    shared = config.parse_config([f"--out_dir={out / 'sft'}", "--seed=0", *rest], later_wins=True)
    if rt.main:
        toy.ensure_toy_assets(0, regime=shared.toy_regime)
    engine.barrier(rt)
    train.ensure_stage(shared, rt, "sft")
    reward = train.ensure_stage(shared, rt, "rm")  # one annotator for every run, as the seed's PairRM
    models, sft_args = {}, {}
    for label, key, method, extra in chosen:
        # the DPO warm-up starts from (and is anchored to) the default SFT model, whose directory is not its own
        sft_args[label] = [f"--sft_model={out / 'sft' / 'sft' / 'model'}"] if method == "dpo" else []
        cfg = config.parse_config(
            [f"--out_dir={out / key}", "--seed=0", *extra, *sft_args[label], *rest], later_wins=True
        )
        train.ensure_stage(cfg, rt, method)
        models[label] = str(out / key / method / "model")
    base = config.parse_config([f"--out_dir={out}", "--seed=0", *rest], later_wins=True)
    gold = lambda path: float(np.mean(gold_scores(base, rt, path, Path(path).parent / "gold_scores.json")))  # noqa: E731
    runs = []
    for (label, key, _, _), objective in [(s, o) for s in chosen for o in objectives]:
        for schedule in BOUNDARY_SCHEDULES:
            cfg = config.parse_config(
                [
                    *BOUNDARY_TRAIN_ARGS,
                    f"--out_dir={out / key}",
                    "--seed=0",
                    f"--policy={models[label]}",
                    f"--objective={objective}",
                    f"--reward_model={out / 'sft' / 'rm' / 'model'}",
                    f"--schedule={schedule}",
                    *sft_args[label],
                    *rest,
                ],
                later_wins=True,
            )
            summary = train.ensure_stage(cfg, rt, "boundary")
            stage = out / key / config.stage_name(cfg, "boundary")
            boundary = [r for r in read_metrics(stage) if r.get("phase") == "boundary"]
            runs.append(
                {
                    "start": label,
                    "objective": objective,
                    "schedule": schedule or "boundary",
                    "time_s": summary["sampling_s"] + summary["training_s"],
                    "annotation_ratio": summary["annotation_ratio"],
                    "gold": [gold(models[label])] + [gold(str(stage / f"iter{t}" / "model")) for t in (1, 2)],
                    "boundary_score": [r["boundary_score"] for r in boundary],
                    "choice": [r["choice"] for r in boundary],
                    "probe_s": sum(r["time_s"] for r in boundary),
                }
            )
            engine.print0(
                rt,
                f"[boundary grid] {label}, {objective}, {schedule or 'boundary'}: gold "
                f"{' -> '.join(f'{g:.3f}' for g in runs[-1]['gold'])}, BS "
                f"{', '.join(f'{b:.3f}' for b in runs[-1]['boundary_score'])}",
            )
    return {
        "runs": runs,
        "reward_model_accuracy": reward.get("test_accuracy"),
        "minutes": (time.time() - started) / 60,
        "findings": boundary_findings(runs),
    }


def boundary_findings(runs: list[dict]) -> list[dict]:
    """Per start and objective, at each decision (iteration 1; iteration 2 after static or after
    on-policy data): the gold gains of on-policy and of static data, their ratio, the boundary
    score measured there and whether it pointed at the better source; and the boundary method's final
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
        fixed = [run(s) for s in BOUNDARY_SCHEDULES if s]
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
                "boundary_gold": run("boundary")["gold"][2],
                "boundary_choices": run("boundary")["choice"],
                "best_fixed": best["schedule"],
                "best_fixed_gold": best["gold"][2],
                "boundary_extra_s": run("boundary")["probe_s"],
            }
        )
    return findings


def boundary_grid_markdown(results: dict, plot: Path | None) -> str:
    """results.md of --boundary_grid. Costs are annotation ratios (reward-model calls per prompt, in
    units of K), not seconds: on a shared machine the runs' times say more about their neighbours."""
    lines = [
        "# The boundary method's grid on the toy: static or on-policy data per iteration",
        "",
        f"Made by `python -m experiments.boundary_grid` ({results['minutes']:.1f} minutes in its last invocation, "
        "which",
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
        chosen = ", ".join(r["choice"]) if r["schedule"] == "boundary" else "-"
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
        "## The boundary method against the best fixed schedule",
        "",
        "| start | objective | its choices | its gold | best fixed | that one's gold |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {f['start']} | {f['objective']} | {', '.join(f['boundary_choices'])} | {f['boundary_gold']:.3f} | "
        f"{f['best_fixed']} | {f['best_fixed_gold']:.3f} |"
        for f in results["findings"]
    ]
    if plot:
        lines += ["", f"![boundary scores]({plot.name})"]
    return "\n".join(lines) + "\n"


def plot_boundary_scores(results: dict, path: Path, plt, rt) -> Path:
    """BS before each iteration: every run, coloured by its start, dashed for SLiC-HF."""
    figure, axis = plt.subplots(figsize=(6, 4))
    colours = dict(zip([s[0] for s in BOUNDARY_STARTS], ["tab:red", "tab:blue", "tab:green"]))
    for r in results["runs"]:
        axis.plot(
            [1, 2],
            r["boundary_score"],
            marker="o",
            color=colours[r["start"]],
            alpha=0.6,
            linestyle="--" if r["objective"] == "slic" else "-",
            label=r["start"] if r["schedule"] == "boundary" and r["objective"] == "dpo" else None,
        )
    axis.axhline(0.5, color="gray", linewidth=0.8)
    axis.set_xticks([1, 2])
    axis.set_xlabel("before iteration")
    axis.set_ylabel("boundary score (on-policy win share)")
    axis.legend(fontsize=7)
    return _save(figure, path, plt, rt)


def run_boundary_grid(args, cfg: config.Config, rest: list[str], rt: engine.Runtime) -> None:
    out = Path(args.out)
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    unknown = set(split(args.starts)) - {s[1] for s in BOUNDARY_STARTS} | set(split(args.objectives)) - set(
        BOUNDARY_OBJECTIVES
    )
    if unknown:
        raise SystemExit(
            f"experiments.boundary_grid: unknown --starts or --objectives {sorted(unknown)}; starts: "
            f"{[s[1] for s in BOUNDARY_STARTS]}, objectives: {BOUNDARY_OBJECTIVES}"
        )
    results = boundary_grid(out, rest, rt, split(args.starts), split(args.objectives))
    plot = None
    try:
        plot = plot_boundary_scores(results, out / "boundary_scores.png", _pyplot(), rt)
    except SystemExit as err:  # no matplotlib: the tables stand without the plot
        engine.print0(rt, str(err))
    if rt.main:
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(boundary_grid_markdown(results, plot))
    engine.print0(rt, (out / "results.md").read_text() if rt.main else "")


def main(argv: list[str] | None = None) -> None:
    parser = experiment_parser("experiments.boundary_grid", __doc__)
    parser.add_argument("--out", default="out/boundary_grid", help="run directory; finished runs in it are reused")
    parser.add_argument("--starts", default="", help="a part of the grid: comma-separated starts (weak, sft, strong)")
    parser.add_argument("--objectives", default="", help="a part of the grid: comma-separated objectives (dpo, slic)")
    run_experiment("experiments.boundary_grid", parser, run_boundary_grid, argv)


if __name__ == "__main__":
    main()
