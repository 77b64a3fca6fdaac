"""
Evaluation of a trained model: benchmark answer files, reward statistics and the implicit-reward
accuracy.

What it does
- Benchmark answer files from the question files a user supplies, in each benchmark's own format:
  AlpacaEval 2 (`[{"instruction", "output", "generator", "dataset"}]`), Arena-Hard v0.1
  (`model_answer/<name>.jsonl` with question_id / answer_id / model_id / choices / tstamp) and
  MT-Bench (FastChat's `model_answer/<name>.jsonl`, two turns, FastChat's temperatures per
  category). Every question file is checked before any answer is generated. The judging itself
  (GPT-4o) is the benchmarks' own tools.
- Reward statistics on test_prefs prompts (mean and std of the reward of generated answers, win
  rate against the dataset's chosen answers) and the implicit-reward preference accuracy
  (beta-scaled log-ratio margin > 0 on the test pairs).
The comparisons over many runs (the toy's tables, the boundary grid, training dynamics, the
Meta-Aligner's fronts) are experiments/, each with its own command (experiments/README.md).

Run
    python evaluate.py --model=out/tulu8b-seed0/metaapo/model --name=metaapo-tulu8b --alpaca_eval=alpaca_eval.json \\
        --arena_hard=arena-hard/question.jsonl --mt_bench=mt_bench/question.jsonl --out=out/bench --generator=vllm
    python evaluate.py --model=PATH --reward_model=RM --reward_stats --reference=SFT     # on test_prefs
    torchrun --nproc_per_node 8 evaluate.py ...          # the same, generation and scoring sharded
`python evaluate.py --help` lists its own options and, after them, train.py's config, whose keys it
takes too (--model, --generator, --dataset, --test_split, --reward_model, --reference, ...).
Benchmark answers get up to 4096 new tokens (the paper's B.5) unless --max_new_tokens is given.

Deliberate simplifications
- Arena-Hard's token_len counts the policy tokenizer's tokens (the original uses tiktoken).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

import checkpoint
import config
import data
import dpo
import engine
import iterative_run
from sample import Generation

# ==============================================================================================
# Answers of one model

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


def load_generator(cfg: config.Config, rt: engine.Runtime, model_path: str) -> tuple[object, object]:
    """(policy, tokenizer) for generate_answers; the policy is None with the vLLM generator, whose
    workers load the checkpoint themselves."""
    if cfg.generator == "vllm":
        return None, data.load_tokenizer(model_path)
    return engine.load_logprob_model(model_path, cfg, rt, trainable=False)


def generate_answers(
    cfg: config.Config,
    rt: engine.Runtime,
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
    generations = engine.distributed_generate(
        policy, tokenizer, prompts, model_path, 1, answer_cfg, rt, seed, Path(cfg.out_dir)
    )
    if loaded is None:
        del policy
        engine.release_memory()
    return [g[0] for g in generations], tokenizer


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


def alpaca_eval_answers(cfg, rt, model_path: str, questions: list[dict], name: str, temperature: float) -> list[dict]:
    """AlpacaEval 2: the question file is a list of {"instruction", ...}; the answers keep its order."""
    answers, _ = generate_answers(
        cfg, rt, model_path, [[{"role": "user", "content": q["instruction"]}] for q in questions], temperature, cfg.seed
    )
    return [
        {"instruction": q["instruction"], "output": a.text, "generator": name, "dataset": q.get("dataset", "")}
        for q, a in zip(questions, answers)
    ]


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
    engine.release_memory()
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


def win_rate(scores: list[float], baseline: list[float]) -> float:
    """Share of answers scoring above the baseline's answer to the same prompt (ties count half)."""
    return float(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline)]))


def reward_statistics(cfg, rt, model_path: str, reward_path: str, pairs: list[data.PreferencePair]) -> dict:
    """Reward of one generated answer per test prompt: mean, std, and the share beating the
    dataset's chosen answer."""
    answers, _ = generate_answers(cfg, rt, model_path, [p.prompt for p in pairs], cfg.temperature, cfg.seed)
    rm = engine.load_reward_model(reward_path, cfg, rt)
    generated = rm.score(
        [p.prompt for p in pairs], [a.text for a in answers], [a.finish_reason == "stop" for a in answers]
    )
    chosen = rm.score([p.prompt for p in pairs], [p.chosen for p in pairs])
    del rm
    engine.release_memory()
    return {
        "prompts": len(pairs),
        "reward_mean": float(np.mean(generated)),
        "reward_std": float(np.std(generated)),
        "win_rate_vs_chosen": win_rate(generated, chosen),
        "chosen_reward_mean": float(np.mean(chosen)),
    }


def implicit_accuracy(cfg, rt, model_path: str, reference_path: str) -> dict:
    """Share of test pairs with beta * [log pi/pi_ref(y_w) - log pi/pi_ref(y_l)] > 0."""
    policy, tokenizer = engine.load_logprob_model(model_path, cfg, rt, trainable=False)
    ref = engine.load_logprob_model(reference_path, cfg, rt, trainable=False)[0]
    pairs, _ = dpo.load_pairs(
        cfg, rt, tokenizer, config.require_test_source(cfg, "--reward_stats' implicit-reward accuracy")
    )
    scores = dpo.pair_scores(policy, ref, pairs, dataclasses.replace(cfg, objective="dpo"), rt)
    del policy, ref
    engine.release_memory()
    return {
        "pairs": len(pairs),
        "implicit_reward_accuracy": float(np.mean([s.chosen_logratio > s.rejected_logratio for s in scores])),
    }


# ==============================================================================================
# Command line


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
        epilog="Every other --key=value is train.py's config:\n\n" + config.config_help("").split("\n\n", 2)[2],
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


def run_benchmarks(args, cfg: config.Config, rest: list[str], rt: engine.Runtime) -> None:
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
    # answers get the paper's 4096 (B.5) unless told
    given = any(arg.split("=")[0] == "--max_new_tokens" for arg in rest)
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
        engine.print0(rt, json.dumps(stats, indent=2))
    if not written and rt.main:
        raise SystemExit("evaluate.py: nothing to do; give a benchmark question file or --reward_stats")
    for path in written:
        engine.print0(rt, f"wrote {path}")


def run_program(
    program: str,
    args: argparse.Namespace,
    rest: list[str],
    work: Callable[[argparse.Namespace, config.Config, list[str], engine.Runtime], object],
    cls: type[config.Config] = config.Config,
) -> None:
    """The frame of a command that trains or evaluates stages (this file, every experiment): its
    own flags `args` parsed, `rest` is the config (cls: Config, or an experiment's subclass),
    checked here; the process (signals, ranks) started; work(args, cfg, rest, rt) run; a bad input
    or a stop ends in one line naming the program (a stopped run goes on with --resume)."""
    try:
        cfg = config.parse_config(rest, cls=cls)
    except config.ConfigError as err:
        raise SystemExit(f"{program}: {err}") from None
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    with checkpoint.entry_process(cfg) as rt:
        try:
            checkpoint.start_wandb(cfg, rt)
            work(args, cfg, rest, rt)
        except engine.Stopped as err:
            engine.stop_exit(f"{err}; the finished runs are kept: the same command with --resume goes on", program)
        except (config.ConfigError, engine.NonFiniteLoss, iterative_run.NothingTrained, data.DataError) as err:
            raise SystemExit(f"{program}: {err}") from None


# the experiments this command once ran, and the command that runs each now
EXPERIMENT_COMMANDS = {
    "--compare": "python -m experiments.compare",
    "--boundary_grid": "python -m experiments.boundary_grid",
    "--stage_grid": "python -m experiments.boundary_grid",
    "--pareto": "python -m experiments.meta_aligner.pareto",
    "--plots": "python -m experiments.dynamics --plots=STAGE_DIR",
    "--toy_properties": "python -m experiments.dynamics --toy_properties",
}


def main(argv: list[str] | None = None) -> None:
    args, rest = build_parser().parse_known_args(argv)
    for arg in rest:
        if arg.split("=")[0] in EXPERIMENT_COMMANDS:
            raise SystemExit(
                f"evaluate.py: {arg.split('=')[0]} is an experiment: {EXPERIMENT_COMMANDS[arg.split('=')[0]]}"
            )
    run_program("evaluate.py", args, rest, run_benchmarks)


if __name__ == "__main__":
    main()
