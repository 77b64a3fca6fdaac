"""
Evaluation: the toy reproduction tables, reward statistics, benchmark answer files, plots.

What it does
- `--compare`: the toy counterparts of the paper's Tables 1, 2 and 8. Runs (or reads the finished
  runs of) SFT, DPO, IPO, SimPO, Online DPO, SELM, ADPO, MetaAPO and its ablations (random,
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
- Reward statistics on test_prefs prompts (mean and std of the reward of generated answers, win
  rate against the dataset's chosen answers) and the implicit-reward preference accuracy
  (beta-scaled log-ratio margin > 0 on the test pairs).
- Plots (matplotlib, optional): the meta-learner curve h(l) after each iteration, sampled vs
  unsampled prompts (l_off against l_on - l_off), gold score and online reward over iterations.

Run
    python evaluate.py --compare                         # toy tables, 3 seeds (18 minutes on 2 CPU cores)
    python evaluate.py --compare --seeds=0,1,2,3,4
    python evaluate.py --plots=out/toy-seed0/metaapo     # PNGs in that directory, with the stage's config.json
    python evaluate.py --model=out/tulu8b-seed0/metaapo/model --name=metaapo-tulu8b --alpaca_eval=alpaca_eval.json \\
        --arena_hard=arena-hard/question.jsonl --mt_bench=mt_bench/question.jsonl --out=out/bench --generator=vllm
    python evaluate.py --model=PATH --reward_model=RM --reward_stats --reference=SFT     # on test_prefs
    torchrun --nproc_per_node 8 evaluate.py ...          # the same, generation and scoring sharded
Options not listed by `python evaluate.py --help` are train.py's config (--model, --generator,
--max_new_tokens, --dataset, --test_split, --reward_model, --reference, --beta, ...).

Deliberate simplifications
- Arena-Hard's token_len counts the policy tokenizer's tokens (the original uses tiktoken).
- The sampled / unsampled scatter regenerates online pairs for at most --scatter_prompts prompts
  of each kind with the iteration's starting policy, since unsampled prompts had none.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch

import data
import train
from meta import MetaController, MetaLearner
from sample import make_online_pairs

# (label, method, extra train.py arguments): the rows of the comparison
COMPARE_ROWS = [
    ("SFT", None, []),
    ("DPO", "dpo", []),
    ("IPO", "ipo", []),
    ("SimPO", "simpo", []),
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
]
ABLATIONS = {"MetaAPO"} | {label for label, _, extra in COMPARE_ROWS if extra}
# The comparison trains every method on the first 2400 offline pairs (the reward model on all
# 6000) so that 3 seeds x 13 methods fit in half an hour on 2 cores.
COMPARE_TRAIN_ARGS = ["--max_train_pairs=2400"]
# FastChat's MT-Bench temperatures per category; other categories get 0.7
MT_BENCH_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}


# ==============================================================================================
# Generation and scores shared by the evaluations


def load_generator(cfg: train.Config, rt: train.Runtime, model_path: str) -> tuple[object, object]:
    """(policy, tokenizer) for generate_answers; the policy is None with the vLLM generator, whose
    workers load the checkpoint themselves."""
    if cfg.generator == "vllm":
        from transformers import AutoTokenizer

        return None, AutoTokenizer.from_pretrained(model_path)
    return train.load_logprob_model(model_path, cfg, rt, trainable=False)


def generate_answers(cfg: train.Config, rt: train.Runtime, model_path: str, conversations: list[list[dict]], temperature: float,
                     seed: int, loaded: tuple | None = None) -> tuple[list[str], object]:
    """One answer per conversation (greedy at temperature 0), on every rank; and the tokenizer.
    `loaded`: (policy, tokenizer) from load_generator, kept by the caller for further calls;
    without it they are loaded here and released after."""
    policy, tokenizer = loaded or load_generator(cfg, rt, model_path)
    prompts = [data.encode_prompt(tokenizer, c) for c in conversations]
    answer_cfg = dataclasses.replace(cfg, temperature=temperature, top_p=cfg.top_p if temperature > 0 else 1.0)
    generations = train.distributed_generate(policy, tokenizer, prompts, model_path, 1, answer_cfg, rt, seed, Path(cfg.out_dir))
    if loaded is None:
        del policy
        train.release_memory()
    return [g[0].text for g in generations], tokenizer


def gold_scores(cfg: train.Config, rt: train.Runtime, model_path: str, cache: Path | None = None) -> list[float]:
    """Gold-judge scores of eval_samples answers per held-out toy prompt, cached in `cache`."""
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())
    from transformers import AutoTokenizer

    test, _ = data.load_preferences(cfg.dataset, cfg.test_split)
    test = test[: cfg.eval_prompts or len(test)]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    scores = train.evaluate_policy_gold(model_path, cfg, rt, [data.encode_prompt(tokenizer, p.prompt) for p in test], [p.prompt for p in test])
    if cache is not None and rt.main:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(scores))
    return scores


def win_rate(scores: list[float], baseline: list[float]) -> float:
    """Share of answers scoring above the baseline's answer to the same prompt (ties count half)."""
    return float(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline)]))


# ==============================================================================================
# The toy comparison


def seed_args(out: Path, seed: int, train_args: list[str]) -> list[str]:
    """train.py arguments of one seed of the comparison: its own runs, the shared data, SFT and reward model."""
    return [f"--seed={seed}", "--data_seed=0", f"--out_dir={out / f'seed{seed}'}", f"--sft_model={out / 'shared' / 'sft' / 'model'}",
            f"--reward_model={out / 'shared' / 'rm' / 'model'}", *train_args]


def compare(seeds: list[int], out: Path, rows: list[tuple], train_args: list[str], rt: train.Runtime) -> dict:
    """Run or read every row's run for every seed, score the models, aggregate over seeds."""
    started = time.time()
    shared_args = [f"--out_dir={out / 'shared'}", "--seed=0", *train_args]
    shared = train.parse_config(shared_args)
    if rt.main:
        data.ensure_toy_assets(0)
    train.barrier(rt)
    stage_times = {"SFT": train.ensure_stage(shared, rt, "sft"), "RM": train.ensure_stage(shared, rt, "rm")}
    sft = str(out / "shared" / "sft" / "model")
    per_seed: dict[str, list[dict]] = {label: [] for label, _, _ in rows}
    for seed in seeds:
        args = seed_args(out, seed, train_args)
        base = train.parse_config(args)  # --seed=seed is among args
        baseline = gold_scores(base, rt, sft, out / f"seed{seed}" / "eval" / "sft.json")
        for label, method, extra in rows:
            if method is None:
                per_seed[label].append({"gold": float(np.mean(baseline)), "win": 0.5, **{k: v for k, v in stage_times["SFT"].items() if k == "train_time_s"}})
                continue
            cfg = train.parse_config(args + [f"--method={method}", *extra])
            summary = train.ensure_stage(cfg, rt, method)
            name = train.stage_name(cfg, method)
            scores = gold_scores(base, rt, str(Path(cfg.out_dir) / name / "model"), out / f"seed{seed}" / "eval" / f"{name}.json")
            per_seed[label].append({"gold": float(np.mean(scores)), "win": win_rate(scores, baseline), **summary})
            train.print0(rt, f"[compare] seed {seed} {label}: gold {np.mean(scores):.3f}, win rate vs SFT {win_rate(scores, baseline):.1%}")
    results = {"seeds": seeds, "train_args": train_args, "shared": stage_times, "minutes": (time.time() - started) / 60, "rows": {}}
    for label, method, extra in rows:
        runs = per_seed[label]

        def stat(key):
            values = [r[key] for r in runs if key in r]
            return {"mean": float(np.mean(values)), "std": float(np.std(values))} if values else None

        results["rows"][label] = {"method": method, "args": extra, "gold": stat("gold"), "win_rate": stat("win"),
                                  "annotation_ratio": stat("annotation_ratio"), "sampling_s": stat("sampling_s"),
                                  "training_s": stat("training_s") or stat("train_time_s"), "per_seed": runs}
    return results


def _fmt(stat, percent: bool = False, digits: int = 3) -> str:
    if stat is None:
        return "-"
    if percent:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}%"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def results_markdown(results: dict, plots: list[Path], out: Path) -> str:
    rows = results["rows"]
    main = [label for label in rows if label not in ABLATIONS or label == "MetaAPO"]
    n = len(results["seeds"])
    lines = [f"# Toy reproduction ({n} seed{'s' if n != 1 else ''}: {', '.join(map(str, results['seeds']))})", "",
             f"Made by `python evaluate.py --compare --seeds={','.join(map(str, results['seeds']))}` in {results['minutes']:.1f} minutes. "
             f"Gold judge (0-10) on the held-out prompts; mean ± std over seeds. Training arguments: `{' '.join(results['train_args']) or '-'}`. "
             "The SFT and reward models are shared by all seeds; every method that generates starts from its seed's DPO warm-up, "
             "whose time is not included in its row.", "",
             "## Methods (the paper's Table 1)", "", "| method | gold mean | win rate vs SFT | annotation ratio |", "|---|---|---|---|"]
    lines += [f"| {label} | {_fmt(rows[label]['gold'])} | {_fmt(rows[label]['win_rate'], True)} | {_fmt(rows[label]['annotation_ratio'], True)} |" for label in main]
    lines += ["", "## MetaAPO ablations (Table 2)", "", "| variant | gold mean | win rate vs SFT | annotation ratio |", "|---|---|---|---|"]
    lines += [f"| {label} | {_fmt(rows[label]['gold'])} | {_fmt(rows[label]['win_rate'], True)} | {_fmt(rows[label]['annotation_ratio'], True)} |"
              for label in rows if label in ABLATIONS]
    lines += ["", "## Time (Table 8), seconds on this machine", "", "| method | sampling | training | overall | annotation ratio |", "|---|---|---|---|---|"]
    for label in rows:
        sampling, training = rows[label]["sampling_s"], rows[label]["training_s"]
        overall = (sampling["mean"] if sampling else 0.0) + (training["mean"] if training else 0.0)
        lines.append(f"| {label} | {_fmt(sampling, digits=0)} | {_fmt(training, digits=0)} | {overall:.0f} | {_fmt(rows[label]['annotation_ratio'], True)} |")
    if plots:
        lines += ["", "## Plots (seed " + str(results["seeds"][0]) + ", MetaAPO)", ""] + [f"![{p.stem}]({p.relative_to(out)})" for p in plots]
    return "\n".join(lines) + "\n"


# ==============================================================================================
# Benchmark answer files


def alpaca_eval_answers(cfg, rt, model_path: str, questions_path: str, name: str, temperature: float) -> list[dict]:
    """AlpacaEval 2: the question file is a list of {"instruction", ...}; the answers keep its order."""
    questions = _read_questions(questions_path, lambda q: None if isinstance(q, dict) and isinstance(q.get("instruction"), str)
                                else "an AlpacaEval question needs an 'instruction' string")
    answers, _ = generate_answers(cfg, rt, model_path, [[{"role": "user", "content": q["instruction"]}] for q in questions], temperature, cfg.seed)
    return [{"instruction": q["instruction"], "output": a, "generator": name, "dataset": q.get("dataset", "")} for q, a in zip(questions, answers)]


def _read_questions(path: str, check) -> list[dict]:
    questions = []
    for where, row in data.iter_rows(path):
        if isinstance(row, data.DataError):
            raise row
        problem = check(row)
        if problem:
            raise data.DataError(f"{where}: {problem}")
        questions.append(row)
    return questions


def arena_hard_answers(cfg, rt, model_path: str, questions_path: str, name: str, temperature: float) -> list[dict]:
    """Arena-Hard v0.1: question rows {"question_id", "turns": [{"content"}], ...}; answer rows as
    its gen_answer.py writes them."""
    questions = _read_questions(questions_path, lambda q: None if isinstance(q, dict) and "question_id" in q and isinstance(q.get("turns"), list)
                                and q["turns"] and all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in q["turns"])
                                else "an Arena-Hard question needs 'question_id' and 'turns': [{'content': str}]")
    conversations = [[{"role": "user", "content": q["turns"][0]["content"]}] for q in questions]
    answers, tokenizer = generate_answers(cfg, rt, model_path, conversations, temperature, cfg.seed)
    return [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex, "model_id": name,
             "choices": [{"index": 0, "turns": [{"content": a, "token_len": len(tokenizer(a, add_special_tokens=False)["input_ids"])}]}],
             "tstamp": time.time()} for q, a in zip(questions, answers)]


def mt_bench_answers(cfg, rt, model_path: str, questions_path: str, name: str) -> list[dict]:
    """MT-Bench: question rows {"question_id", "category", "turns": [str, str]}; both turns are
    answered, the second after the first answer, at FastChat's temperature for the category."""
    questions = _read_questions(questions_path, lambda q: None if isinstance(q, dict) and "question_id" in q and isinstance(q.get("turns"), list)
                                and q["turns"] and all(isinstance(t, str) for t in q["turns"])
                                else "an MT-Bench question needs 'question_id' and 'turns': [str, ...]")
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
            answers, _ = generate_answers(cfg, rt, model_path, [conversations[i] for i in indices], temperature, cfg.seed + turn, loaded)
            for i, answer in zip(indices, answers):
                conversations[i].append({"role": "assistant", "content": answer})
                turns[i].append(answer)
    del loaded
    train.release_memory()
    return [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex, "model_id": name, "choices": [{"index": 0, "turns": t}],
             "tstamp": time.time()} for q, t in zip(questions, turns)]


# ==============================================================================================
# Reward statistics and implicit-reward accuracy on test_prefs


def reward_statistics(cfg, rt, model_path: str, reward_path: str, pairs: list[data.PreferencePair]) -> dict:
    """Reward of one generated answer per test prompt: mean, std, and the share beating the
    dataset's chosen answer."""
    answers, _ = generate_answers(cfg, rt, model_path, [p.prompt for p in pairs], cfg.temperature, cfg.seed)
    rm = train.load_reward_model(reward_path, cfg, rt)
    generated = rm.score([p.prompt for p in pairs], answers)
    chosen = rm.score([p.prompt for p in pairs], [p.chosen for p in pairs])
    del rm
    train.release_memory()
    return {"prompts": len(pairs), "reward_mean": float(np.mean(generated)), "reward_std": float(np.std(generated)),
            "win_rate_vs_chosen": win_rate(generated, chosen), "chosen_reward_mean": float(np.mean(chosen))}


def implicit_accuracy(cfg, rt, model_path: str, reference_path: str) -> dict:
    """Share of test pairs with beta * [log pi/pi_ref(y_w) - log pi/pi_ref(y_l)] > 0."""
    policy, tokenizer = train.load_logprob_model(model_path, cfg, rt, trainable=False)
    ref = train.load_logprob_model(reference_path, cfg, rt, trainable=False)[0]
    pairs, _ = train.load_pairs(cfg, rt, tokenizer, cfg.test_split)
    scores = train.pair_scores(policy, ref, pairs, dataclasses.replace(cfg, objective="dpo"), rt)
    del policy, ref
    train.release_memory()
    return {"pairs": len(pairs), "implicit_reward_accuracy": float(np.mean([chosen > rejected for _, chosen, rejected in scores]))}


# ==============================================================================================
# Plots


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("evaluate.py: the plots need matplotlib, an optional dependency: pip install matplotlib") from None
    return plt


def _save(figure, path: Path, plt, rt: train.Runtime) -> Path:
    """Write the figure (the main rank only; every rank computed it, the data may need collectives)."""
    if rt.main:
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_meta_curves(rt, stage: Path, plt) -> Path:
    """Fig. 3 right: h(l) at initialisation and after each iteration (the `multi` input is
    plotted with both log-ratios at 0)."""
    config = json.loads((stage / "config.json").read_text())
    depth, inputs = config.get("meta_depth", 2), config.get("meta_inputs", "score")
    scores = torch.linspace(-8, 0.5, 200)
    grid = scores[:, None] if inputs == "score" else torch.stack([scores, torch.zeros_like(scores), torch.zeros_like(scores)], 1)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    previous = MetaLearner(depth, inputs)(grid).detach()
    axis.plot(scores, previous, color="gray", label="initial")
    for path in sorted(stage.glob("iter*/meta_learner.pt"), key=lambda p: int(p.parent.name[4:])):
        controller = MetaController(depth, inputs)
        controller.load_state_dict(torch.load(path, weights_only=False))
        curve = controller.learner(grid).detach()
        unchanged = torch.equal(curve, previous)  # fewer than T_meta steps in that iteration: no meta update
        label = f"after {path.parent.name.replace('iter', 'iteration ')}" + (" (no meta update)" if unchanged else "")
        axis.plot(scores, curve, linestyle="--" if unchanged else "-", label=label)
        previous = curve
    axis.set_xlabel("offline preference score l_off")
    axis.set_ylabel("meta weight h(l_off)")
    axis.legend()
    return _save(figure, stage / "meta_curves.png", plt, rt)


def plot_sampling_scatter(cfg, rt, stage: Path, method: str, iteration: int, n: int, plt) -> Path:
    """Fig. 2 middle: l_off against l_on - l_off for sampled and unsampled prompts of one
    iteration, with online pairs regenerated from that iteration's starting policy."""
    records = [json.loads(line) for line in (stage / f"iter{iteration}" / "gating.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(cfg.seed)
    picks = {kind: [r for r in records if r["selected"] == kind] for kind in (True, False)}
    picks = {kind: [rows[i] for i in rng.permutation(len(rows))[:n]] for kind, rows in picks.items()}
    stage_obj = train.Stage(cfg, rt, stage.name)
    stage_obj.dir = stage
    policy_path, ref_path = train.iteration_paths(cfg, stage_obj, method, iteration - 1)
    policy, tokenizer = train.load_logprob_model(policy_path, cfg, rt, trainable=False)
    ref = train.load_logprob_model(ref_path, cfg, rt, trainable=False)[0] if ref_path else None
    pairs, raw = train.load_pairs(cfg, rt, tokenizer, cfg.train_split)
    by_index = {p.index: p for p in pairs}
    rm = train.load_reward_model(train.reward_path(cfg), cfg, rt)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for kind, color, label in ((False, "tab:orange", "unsampled"), (True, "tab:blue", "sampled")):
        items = [by_index[r["index"]] for r in picks[kind] if r["index"] in by_index]
        generations = train.distributed_generate(policy, tokenizer, [p.prompt_ids for p in items], policy_path, cfg.num_samples, cfg, rt,
                                                 cfg.seed + 777, stage, backend="transformers")
        online, _ = make_online_pairs([raw[p.index].prompt for p in items], generations, rm)
        kept = [(p, o) for p, o in zip(items, online) if o is not None]
        offline_scores = train.pair_scores(policy, ref, [p for p, _ in kept], cfg, rt)
        online_items = [dataclasses.replace(p, chosen_ids=o.chosen.token_ids[: cfg.max_len - len(p.prompt_ids)],
                                                  rejected_ids=o.rejected.token_ids[: cfg.max_len - len(p.prompt_ids)]) for p, o in kept]
        online_scores = train.pair_scores(policy, ref, online_items, cfg, rt)
        x = np.array([s[0] for s in offline_scores])
        axis.scatter(x, np.array([s[0] for s in online_scores]) - x, s=8, alpha=0.6, color=color, label=f"{label} ({len(kept)})")
    del policy, ref, rm
    train.release_memory()
    axis.axhline(0, color="gray", linewidth=0.8)
    axis.set_xlabel("offline preference score l_off")
    axis.set_ylabel("potential gain l_on - l_off")
    axis.set_title(f"iteration {iteration}")
    axis.legend()
    return _save(figure, stage / f"sampling_scatter_iter{iteration}.png", plt, rt)


def plot_over_iterations(cfg, rt, stage: Path, plt, toy: bool) -> Path:
    """Gold score (toy) and mean online reward per iteration."""
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    rewards = {r["iteration"]: r["mean_online_reward"] for r in records if r.get("phase") == "generate"}
    figure, axis = plt.subplots(figsize=(5, 3.5))
    iterations = sorted(rewards)
    axis.plot(iterations, [rewards[i] for i in iterations], marker="o", color="tab:green", label="mean reward of online answers")
    axis.set_xlabel("iteration")
    axis.set_xticks(iterations)
    axis.set_ylabel("reward-model score")
    if toy:
        exports = sorted(stage.glob("iter*/model"), key=lambda p: int(p.parent.name[4:]))
        gold = [float(np.mean(gold_scores(cfg, rt, str(p), p.parent / "gold_scores.json"))) for p in exports]
        twin = axis.twinx()
        twin.plot([int(p.parent.name[4:]) for p in exports], gold, marker="s", color="tab:purple", label="gold score after the iteration")
        twin.set_ylabel("gold score (0-10)")
        handles = axis.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        axis.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    else:
        axis.legend()
    return _save(figure, stage / "over_iterations.png", plt, rt)


def stage_config(stage: Path, argv: list[str]) -> train.Config:
    """The config a stage was trained with (its config.json), with the train.py keys given in
    `argv` on top. The run directory is the stage's parent, wherever it lies now."""
    path = stage / "config.json"
    if not path.exists():
        raise SystemExit(f"evaluate.py: --plots={stage}: no config.json there; give a stage directory of a finished train.py run")
    recorded = json.loads(path.read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(train.Config)}
    values = {key: tuple(value) if isinstance(defaults[key], tuple) else value for key, value in recorded.items() if key in defaults}
    cfg = train.Config(**{**values, "out_dir": str(stage.parent)})
    cfg.preset = recorded.get("preset", "")
    given = train.parse_config(argv)
    for arg in argv:
        key = arg[2:].partition("=")[0]
        if arg.startswith("--") and key in defaults:
            setattr(cfg, key, getattr(given, key))
    return cfg


def make_plots(cfg, rt, stage: Path, scatter_prompts: int) -> list[Path]:
    plt = _pyplot()
    config = json.loads((stage / "config.json").read_text())
    method = config["method"] if config["method"] != "pipeline" else "metaapo"
    plots = [plot_meta_curves(rt, stage, plt)] if list(stage.glob("iter*/meta_learner.pt")) else []
    iterations = sorted(int(p.parent.name[4:]) for p in stage.glob("iter*/gating.jsonl"))
    if iterations and scatter_prompts > 0:
        plots.append(plot_sampling_scatter(cfg, rt, stage, method, iterations[0], scatter_prompts, plt))
    plots.append(plot_over_iterations(cfg, rt, stage, plt, toy=config.get("preset") == "toy"))
    return plots


# ==============================================================================================
# CLI


def default_name(model: str) -> str:
    """The model's name in the answer files: the last part of its path or hub id
    (allenai/Llama-3.1-Tulu-3-8B-SFT -> Llama-3.1-Tulu-3-8B-SFT), or the stage's name for a
    train.py export (out/tulu8b-seed0/metaapo/model -> metaapo)."""
    path = Path(model)
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other --key=value options are train.py's config.")
    parser.add_argument("--compare", action="store_true", help="the toy comparison of every method over several seeds")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of --compare")
    parser.add_argument("--methods", default="", help="--compare: comma-separated row labels to run (default: all)")
    parser.add_argument("--compare_out", default="out/compare", help="--compare: run directory; finished runs in it are reused")
    parser.add_argument("--plots", default="", help="a finished metaapo stage directory to plot; its config.json is the config, --key=value options override it")
    parser.add_argument("--scatter_prompts", type=int, default=150, help="prompts of each kind in the sampled / unsampled scatter")
    parser.add_argument("--name", default="", help="model name written into the benchmark answer files")
    parser.add_argument("--alpaca_eval", default="", help="AlpacaEval 2 question file (JSON list)")
    parser.add_argument("--alpaca_temperature", type=float, default=0.7)
    parser.add_argument("--arena_hard", default="", help="Arena-Hard v0.1 question.jsonl")
    parser.add_argument("--arena_temperature", type=float, default=0.0)
    parser.add_argument("--mt_bench", default="", help="MT-Bench question.jsonl (FastChat)")
    parser.add_argument("--reward_stats", action="store_true", help="reward statistics and implicit-reward accuracy on the test split")
    parser.add_argument("--max_prompts", type=int, default=0, help="--reward_stats: test prompts used (0 = all)")
    parser.add_argument("--out", default="", help="where answer files and statistics go (default: <model dir>/../eval, out/eval/<name> for a hub id)")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = train.parse_config(rest)
    except train.ConfigError as err:
        raise SystemExit(f"evaluate.py: {err}") from None
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    rt = train.setup_distributed(cfg)
    try:
        if args.compare:
            out = Path(args.compare_out)
            rows = [r for r in COMPARE_ROWS if not args.methods or r[0] in args.methods.split(",") or r[0] == "SFT"]
            results = compare([int(s) for s in args.seeds.split(",")], out, rows, COMPARE_TRAIN_ARGS + rest, rt)
            plots = []
            seed = results["seeds"][0]
            metaapo = out / f"seed{seed}" / "metaapo"
            if (metaapo / "done.json").exists():
                try:
                    plot_cfg = train.parse_config(seed_args(out, seed, COMPARE_TRAIN_ARGS + rest))
                    for plot in make_plots(plot_cfg, rt, metaapo, args.scatter_prompts):
                        if rt.main:
                            shutil.copy(plot, out / plot.name)
                        plots.append(out / plot.name)
                except SystemExit as err:  # no matplotlib: the tables stand without the plots
                    train.print0(rt, str(err))
            if rt.main:
                (out / "results.json").write_text(json.dumps(results, indent=2))
                (out / "results.md").write_text(results_markdown(results, plots, out))
            train.print0(rt, (out / "results.md").read_text() if rt.main else "")
            return
        if args.plots:
            for plot in make_plots(stage_config(Path(args.plots), rest), rt, Path(args.plots), args.scatter_prompts):
                train.print0(rt, f"wrote {plot}")
            return
        model = cfg.policy or cfg.model  # the model to evaluate
        name = args.name or default_name(model)
        out = Path(args.out) if args.out else Path(model).parent / "eval"
        if not args.out and not Path(model).exists():  # a hub id: not next to it
            out = Path("out") / "eval" / name
        written = []
        if args.alpaca_eval:
            answers = alpaca_eval_answers(cfg, rt, model, args.alpaca_eval, name, args.alpaca_temperature)
            if rt.main:
                path = out / "alpaca_eval" / f"{name}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(answers, indent=2, ensure_ascii=False))
                written.append(path)
        if args.arena_hard:
            answers = arena_hard_answers(cfg, rt, model, args.arena_hard, name, args.arena_temperature)
            if rt.main:
                data.write_jsonl(out / "arena-hard" / "model_answer" / f"{name}.jsonl", answers)
                written.append(out / "arena-hard" / "model_answer" / f"{name}.jsonl")
        if args.mt_bench:
            answers = mt_bench_answers(cfg, rt, model, args.mt_bench, name)
            if rt.main:
                data.write_jsonl(out / "mt_bench" / "model_answer" / f"{name}.jsonl", answers)
                written.append(out / "mt_bench" / "model_answer" / f"{name}.jsonl")
        if args.reward_stats:
            test, _ = data.load_preferences(cfg.dataset, cfg.test_split, cfg.skip_bad_rows)
            if not cfg.reward_model:
                raise SystemExit("evaluate.py: --reward_stats needs --reward_model")
            stats = reward_statistics(cfg, rt, model, cfg.reward_model, test[: args.max_prompts or len(test)])
            if cfg.reference:  # the implicit reward is a log-ratio against the reference the model was trained with
                stats.update(implicit_accuracy(cfg, rt, model, cfg.reference))
            if rt.main:
                out.mkdir(parents=True, exist_ok=True)
                (out / "reward_stats.json").write_text(json.dumps(stats, indent=2))
                written.append(out / "reward_stats.json")
            train.print0(rt, json.dumps(stats, indent=2))
        if not written and rt.main:
            raise SystemExit("evaluate.py: nothing to do; give --compare, --plots, a benchmark question file or --reward_stats")
        for path in written:
            train.print0(rt, f"wrote {path}")
    finally:
        if rt.distributed:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
