"""evaluate.py: benchmark answer files (field by field), reward statistics and implicit-reward
accuracy, the comparison's aggregation and a small end-to-end --compare with plots."""

import builtins
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import config
import data
import engine
import evaluate
import losses
import toy
from conftest import TINY
from experiments import compare, dynamics
from sample import Generation

ROOT = Path(__file__).resolve().parent.parent
GENERATION = [
    "--max_new_tokens=6",
    "--max_prompt_len=16",
    "--max_len=40",
    "--generator=transformers",
    "--gen_batch_size=8",
]


def test_alpaca_eval_answers(toy_dir, tmp_path):
    questions = [
        {"instruction": "ascending : c a b", "output": "a b c", "generator": "gpt4_turbo", "dataset": "helpful_base"},
        {"instruction": "descending : d b", "output": "d b", "generator": "gpt4_turbo"},
    ]
    (tmp_path / "alpaca_eval.json").write_text(json.dumps(questions))
    evaluate.main(
        [
            f"--model={toy_dir}",
            "--name=tiny",
            f"--alpaca_eval={tmp_path / 'alpaca_eval.json'}",
            f"--out={tmp_path / 'out'}",
        ]
        + GENERATION
    )
    answers = json.loads((tmp_path / "out" / "alpaca_eval" / "tiny.json").read_text())
    assert len(answers) == 2
    for question, answer in zip(questions, answers):
        assert set(answer) == {"instruction", "output", "generator", "dataset"}
        assert answer["instruction"] == question["instruction"] and answer["generator"] == "tiny"
        assert isinstance(answer["output"], str)
    assert answers[0]["dataset"] == "helpful_base" and answers[1]["dataset"] == ""


def test_arena_hard_answers(toy_dir, tmp_path):
    questions = [
        {
            "question_id": "328c149ed45a41c0b9d6f14659e63599",
            "category": "arena-hard-v0.1",
            "cluster": "sorting",
            "turns": [{"content": "ascending : c a b"}],
        },
        {
            "question_id": "q2",
            "category": "arena-hard-v0.1",
            "cluster": "sorting",
            "turns": [{"content": "descending : j a"}],
        },
    ]
    (tmp_path / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    evaluate.main(
        [
            f"--model={toy_dir}",
            "--name=tiny",
            f"--arena_hard={tmp_path / 'question.jsonl'}",
            f"--out={tmp_path / 'out'}",
        ]
        + GENERATION
    )
    rows = [
        json.loads(line)
        for line in (tmp_path / "out" / "arena-hard" / "model_answer" / "tiny.jsonl").read_text().splitlines()
    ]
    tokenizer = AutoTokenizer.from_pretrained(toy_dir)
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions]
    for row in rows:
        assert set(row) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert (
            re.fullmatch(r"[0-9a-f]{32}", row["answer_id"])
            and row["model_id"] == "tiny"
            and isinstance(row["tstamp"], float)
        )
        (choice,) = row["choices"]
        assert choice["index"] == 0 and len(choice["turns"]) == 1
        turn = choice["turns"][0]
        assert isinstance(turn["content"], str) and turn["token_len"] == len(
            tokenizer(turn["content"], add_special_tokens=False)["input_ids"]
        )
    # greedy by default: the same answers again
    evaluate.main(
        [
            f"--model={toy_dir}",
            "--name=again",
            f"--arena_hard={tmp_path / 'question.jsonl'}",
            f"--out={tmp_path / 'out'}",
        ]
        + GENERATION
    )
    again = [
        json.loads(line)
        for line in (tmp_path / "out" / "arena-hard" / "model_answer" / "again.jsonl").read_text().splitlines()
    ]
    assert [r["choices"][0]["turns"][0]["content"] for r in again] == [
        r["choices"][0]["turns"][0]["content"] for r in rows
    ]


def test_mt_bench_answers_two_turns_at_fastchat_temperatures(toy_dir, tmp_path, monkeypatch):
    questions = [
        {"question_id": 81, "category": "writing", "turns": ["ascending : c a b", "descending : c a b"]},
        {"question_id": 111, "category": "math", "turns": ["ascending : e d", "ascending : f g"]},
    ]
    (tmp_path / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    calls, loads = [], []
    real, real_load = evaluate.generate_answers, engine.load_logprob_model

    def recording(cfg, rt, model_path, conversations, temperature, seed, loaded=None):
        calls.append(([list(c) for c in conversations], temperature))
        return real(cfg, rt, model_path, conversations, temperature, seed, loaded)

    def counting_load(path, *args, **kwargs):
        loads.append(path)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate_answers", recording)
    monkeypatch.setattr(engine, "load_logprob_model", counting_load)
    evaluate.main(
        [f"--model={toy_dir}", "--name=tiny", f"--mt_bench={tmp_path / 'question.jsonl'}", f"--out={tmp_path / 'out'}"]
        + GENERATION
    )
    rows = [
        json.loads(line)
        for line in (tmp_path / "out" / "mt_bench" / "model_answer" / "tiny.jsonl").read_text().splitlines()
    ]
    assert [r["question_id"] for r in rows] == [81, 111]
    for row in rows:
        assert set(row) == {"question_id", "answer_id", "model_id", "choices", "tstamp"} and row["model_id"] == "tiny"
        assert row["choices"][0]["index"] == 0 and len(row["choices"][0]["turns"]) == 2
        assert all(isinstance(t, str) for t in row["choices"][0]["turns"])
    assert sorted(t for _, t in calls) == [0.0, 0.0, 0.7, 0.7]  # math greedy, writing 0.7, both turns
    second_turn_writing = next(c for c, t in calls if t == 0.7 and len(c[0]) == 3)[0]
    assert [m["role"] for m in second_turn_writing] == ["user", "assistant", "user"]
    assert second_turn_writing[1]["content"] == rows[0]["choices"][0]["turns"][0]
    assert loads == [str(toy_dir)]  # the policy is loaded once for the four generate calls


def test_vllm_generator_loads_no_policy_and_answers_through_the_workers(fake_vllm, toy_dir, tmp_path, monkeypatch):
    """N2: with the vLLM generator the workers load the checkpoint themselves, so evaluate.py loads
    no policy (None), and the real distributed_generate (which releases the trainer's memory before
    a child starts) must take that None; the answers come from the vLLM stand-in's child process."""

    def no_policy(*args, **kwargs):
        raise AssertionError("the policy was loaded for the vLLM generator")

    monkeypatch.setattr(engine, "load_logprob_model", no_policy)
    (tmp_path / "alpaca_eval.json").write_text(json.dumps([{"instruction": "ascending : b a"}] * 3))
    evaluate.main(
        [
            f"--model={toy_dir}",
            f"--alpaca_eval={tmp_path / 'alpaca_eval.json'}",
            f"--out={tmp_path / 'eval'}",
            "--generator=vllm",
            "--max_new_tokens=4",
            f"--out_dir={tmp_path / 'run'}",
        ]
    )
    answers = json.loads((tmp_path / "eval" / "alpaca_eval" / f"{toy_dir.name}.json").read_text())
    calls = [json.loads(line) for line in (fake_vllm / "gpu0.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and all(a["output"].startswith("t") for a in answers)  # the stand-in's texts
    assert sum(len(c["prompts"]) for c in calls) == 3 and calls[0]["llm"]["model"] == str(toy_dir)


def test_benchmark_answers_get_4096_new_tokens_unless_told(toy_dir, tmp_path, monkeypatch):
    (tmp_path / "alpaca_eval.json").write_text(json.dumps([{"instruction": "ascending : b a"}]))
    seen = []

    def recording(cfg, rt, model_path, conversations, temperature, seed, loaded=None):
        seen.append(cfg.max_new_tokens)
        return [Generation([2], "a b", "stop") for _ in conversations], None

    monkeypatch.setattr(evaluate, "generate_answers", recording)
    evaluate.main([f"--model={toy_dir}", f"--alpaca_eval={tmp_path / 'alpaca_eval.json'}", f"--out={tmp_path}"])
    evaluate.main(
        [
            f"--model={toy_dir}",
            f"--alpaca_eval={tmp_path / 'alpaca_eval.json'}",
            f"--out={tmp_path}",
            "--max_new_tokens=64",
        ]
    )
    assert seen == [4096, 64]


def test_bad_alpaca_eval_file_names_file_and_item(toy_dir, tmp_path):
    (tmp_path / "alpaca_eval.json").write_text(
        json.dumps([{"instruction": "ascending : b a"}, {"output": "no instruction"}])
    )
    with pytest.raises(
        SystemExit,
        match=f"evaluate.py: {tmp_path / 'alpaca_eval.json'}:item 2: an AlpacaEval question needs an 'instruction' "
        "string",
    ):
        evaluate.main(
            [f"--model={toy_dir}", f"--alpaca_eval={tmp_path / 'alpaca_eval.json'}", f"--out={tmp_path}"] + GENERATION
        )


@pytest.mark.parametrize(
    "model, name",
    [
        ("allenai/Llama-3.1-Tulu-3-8B-SFT", "Llama-3.1-Tulu-3-8B-SFT"),
        ("out/tulu8b-seed0/metaapo/model", "metaapo"),
        ("/ckpt/qwen-sft/", "qwen-sft"),
        ("model", "model"),
    ],
)
def test_default_name(model, name):
    assert evaluate.default_name(model) == name


def test_bad_question_file_names_file_and_line(toy_dir, tmp_path):
    (tmp_path / "question.jsonl").write_text(
        json.dumps({"question_id": 1, "turns": [{"content": "x"}]}) + "\n" + json.dumps({"turns": []}) + "\n"
    )
    with pytest.raises(SystemExit, match=f"evaluate.py: {tmp_path / 'question.jsonl'}:2: an Arena-Hard question needs"):
        evaluate.main(
            [f"--model={toy_dir}", f"--arena_hard={tmp_path / 'question.jsonl'}", f"--out={tmp_path}"] + GENERATION
        )


def test_reward_statistics_and_implicit_accuracy(toy_dir, toy_rm_dir, tmp_path):
    reference = tmp_path / "reference"
    torch.manual_seed(5)
    LlamaForCausalLM(toy.toy_model_config(AutoTokenizer.from_pretrained(toy_dir))).save_pretrained(reference)
    AutoTokenizer.from_pretrained(toy_dir).save_pretrained(reference)
    rows = toy.make_toy_rows(0, {"test_prefs": 12})["test_prefs"]
    data.write_jsonl(tmp_path / "set" / "test_prefs.jsonl", rows)
    evaluate.main(
        [
            f"--model={toy_dir}",
            f"--reward_model={toy_rm_dir}",
            f"--reference={reference}",
            "--reward_stats",
            f"--dataset={tmp_path / 'set'}",
            "--test_split=test_prefs",
            f"--out={tmp_path / 'out'}",
            "--temperature=1.0",
        ]
        + GENERATION
    )
    stats = json.loads((tmp_path / "out" / "reward_stats.json").read_text())
    assert stats["prompts"] == 12 and stats["pairs"] == 12
    assert np.isfinite(stats["reward_mean"]) and stats["reward_std"] >= 0 and 0 <= stats["win_rate_vs_chosen"] <= 1
    # the implicit accuracy against a naive computation with the HF models
    policy, ref = LlamaForCausalLM.from_pretrained(toy_dir), LlamaForCausalLM.from_pretrained(reference)
    tokenizer = AutoTokenizer.from_pretrained(toy_dir)
    pairs, _ = data.tokenize_preferences(data.load_preferences(tmp_path / "set", "test_prefs")[0], tokenizer, 16, 40)
    batch = data.collate_preferences(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        lp = losses.naive_sequence_logprobs(
            policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["input_ids"],
            batch["response_mask"],
        )
        lr = losses.naive_sequence_logprobs(
            ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["input_ids"],
            batch["response_mask"],
        )
    n = len(pairs)
    expected = ((lp[:n] - lr[:n]) > (lp[n:] - lr[n:])).float().mean().item()
    assert stats["implicit_reward_accuracy"] == pytest.approx(expected)


def test_win_rate_counts_ties_half():
    assert evaluate.win_rate([3.0, 1.0, 2.0, 5.0], [1.0, 2.0, 2.0, 5.0]) == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)


def test_paired_t_interval_by_hand():
    diff = compare.paired_t_interval([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])  # mean 2, sd 1, n 3: 2 +- 4.303 / sqrt(3)
    assert diff["mean"] == pytest.approx(2.0) and diff["low"] == pytest.approx(2 - 4.303 / 3**0.5, abs=1e-3)
    assert diff["high"] == pytest.approx(2 + 4.303 / 3**0.5, abs=1e-3) and not diff["resolved"]
    assert compare.paired_t_interval([3.0, 3.1, 2.9, 3.05, 2.95], [1.0] * 5)["resolved"]  # df 4: t = 2.776
    assert compare.paired_t_interval([0.9, 1.1], [1.0, 1.0])["mean"] == pytest.approx(0.0, abs=1e-12)
    assert compare.paired_t_interval([1.0], [0.0]) is None  # one seed: no interval


def test_paired_bootstrap_over_seeds_and_prompts():
    rng = np.random.default_rng(0)
    base = [rng.uniform(0, 10, 400 * 2).tolist() for _ in range(3)]  # 3 seeds, 400 prompts x 2 samples
    same = compare.paired_bootstrap(base, base, 2)
    assert same == {"mean": 0.0, "low": 0.0, "high": 0.0, "resolved": False}
    shifted = compare.paired_bootstrap([[x + 1.0 for x in b] for b in base], base, 2)
    assert shifted["mean"] == pytest.approx(1.0) and shifted["low"] == pytest.approx(1.0) and shifted["resolved"]
    # a real effect of 0.3 under per-answer noise of std 2: resolved, and the interval covers it
    noisy = [[x + 0.3 + rng.normal(0, 2) for x in b] for b in base]
    effect = compare.paired_bootstrap(noisy, base, 2)
    assert effect["low"] < 0.3 < effect["high"] and effect["resolved"]
    # seeds that disagree (one +1, one -1, one 0) leave the difference unresolved however many prompts
    split = compare.paired_bootstrap([[x + d for x in b] for b, d in zip(base, (1.0, -1.0, 0.0))], base, 2)
    assert split["low"] < 0 < split["high"] and not split["resolved"]


def test_results_markdown_tables():
    def stat(mean, std):
        return {"mean": mean, "std": std}

    rows = {
        label: {
            "method": method,
            "args": extra,
            "gold": stat(8.0 + i / 10, 0.05),
            "win_rate": stat(0.5 + i / 100, 0.01),
            "annotation_ratio": stat(0.5, 0.1) if method in ("metaapo", "online_dpo") else None,
            "sampling_s": stat(10.0, 1.0) if method in ("metaapo", "online_dpo") else None,
            "training_s": stat(5.0, 0.5),
            "per_seed": [],
        }
        for i, (label, method, extra) in enumerate(compare.COMPARE_ROWS)
    }
    rows["MetaAPO"]["per_seed"] = [{"steps": 30}, {"steps": 32}]  # the equal-budget table's steps column
    rows["DPO"]["vs_metaapo"] = {
        "gold": compare.interval(-0.6, -0.8, -0.4),
        "annotation_ratio": compare.interval(-0.5, -0.6, -0.4),
        "time_s": compare.interval(-5.0, -12.0, 2.0),
    }
    text = compare.results_markdown(
        {"seeds": [0, 1, 2], "train_args": ["--max_train_pairs=2400"], "minutes": 12.3, "rows": rows}, [], Path("out")
    )
    assert (
        "## Methods (the paper's Table 1)" in text
        and "## MetaAPO ablations (Table 2)" in text
        and "## Time (Table 8)" in text
    )
    assert "| DPO | 8.100 ± 0.050 | 51.0 ± 1.0% | - |" in text
    i = [label for label, _, _ in compare.COMPARE_ROWS].index("MetaAPO")
    assert f"| MetaAPO | {8.0 + i / 10:.3f} ± 0.050 | {50 + i:.1f} ± 1.0% | 50.0 ± 10.0% |" in text
    ablations = text[text.index("Table 2") : text.index("Table 8")]
    assert "w/ random sampling" in ablations and "Online DPO" not in ablations
    assert "| Online DPO | 10 ± 1 | 5 ± 0 | 15 |" in text
    at_budget = text[text.index("## At equal annotation budget") :]
    assert "| 50.0 ± 10.0% | 31 |" in at_budget and "| 50.0 ± 10.0% | - |" in at_budget  # no steps recorded: -
    # bold: resolved; no prompt bootstrap nor held-out halves recorded here: -
    assert "| DPO | **-0.600 [-0.800, -0.400]** | - | - | **-50.0 [-60.0, -40.0]** | -5 [-12, +2] |" in text


def test_plots_use_the_stages_own_config(tmp_path):
    """--plots reads the run's config.json; only keys given on the command line change it."""
    trained = config.parse_config(
        [
            "--model=Qwen/Qwen2.5-0.5B-Instruct",
            "--seed=3",
            "--num_samples=4",
            "--beta=0.05",
            "--betas=0.8,0.9",
            "--objective=ipo",
            f"--reward_model={tmp_path / 'rm'}",
            "--out_dir=somewhere/else",
        ]
    )
    stage = tmp_path / "run" / "metaapo"
    stage.mkdir(parents=True)
    (stage / "config.json").write_text(json.dumps({**config.config_dict(trained), "stage": "metaapo"}))
    cfg = dynamics.stage_config(stage, ["--seed=7", "--eval_prompts", "5"])
    assert (cfg.model, cfg.num_samples, cfg.beta, cfg.objective, cfg.reward_model) == (
        "Qwen/Qwen2.5-0.5B-Instruct",
        4,
        0.05,
        "ipo",
        str(tmp_path / "rm"),
    )
    assert cfg.betas == (0.8, 0.9) and (cfg.seed, cfg.eval_prompts) == (7, 5)
    assert cfg.out_dir == str(tmp_path / "run") and cfg.preset == ""  # the run directory is where the stage lies
    with pytest.raises(SystemExit, match="no config.json there"):
        dynamics.stage_config(tmp_path, [])


def test_only_the_main_rank_writes_a_plot(tmp_path):
    pytest.importorskip("matplotlib")
    plt = dynamics._pyplot()
    for rank in (1, 0):
        figure, axis = plt.subplots()
        axis.plot([0, 1], [1, 0])
        dynamics._save(figure, tmp_path / "plot.png", plt, engine.Runtime(rank=rank, world=2))
        assert (tmp_path / "plot.png").exists() is (rank == 0)


def test_missing_matplotlib_is_a_clear_message(monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit, match="the plots need matplotlib, an optional dependency: pip install matplotlib"):
        dynamics._pyplot()


def test_compare_end_to_end_with_plots(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(compare, "COMPARE_TRAIN_ARGS", [])
    out = tmp_path / "compare"
    args = [
        "--seeds=0,1",
        "--methods=DPO,MetaAPO",
        f"--out={out}",
        "--scatter_prompts=8",
        "--eval_prompts=24",
        "--meta_interval=2",
    ] + [a for a in TINY if not a.startswith("--eval_prompts")]
    compare.main(args)
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and list(results["rows"]) == ["SFT", "DPO", "MetaAPO"]
    for label in ("DPO", "MetaAPO"):
        row = results["rows"][label]
        assert len(row["per_seed"]) == 2 and 0 <= row["gold"]["mean"] <= 10 and row["gold"]["std"] >= 0
        assert row["gold"]["mean"] == pytest.approx(np.mean([r["gold"] for r in row["per_seed"]]))
    assert 0 < results["rows"]["MetaAPO"]["annotation_ratio"]["mean"] <= 1
    assert (out / "shared" / "rm" / "done.json").exists() and (
        out / "seed1" / "metaapo-meta_interval_2" / "done.json"
    ).exists()
    assert not (out / "seed1" / "sft").exists()  # the SFT model is shared
    text = (out / "results.md").read_text()
    for plot in ("meta_curves.png", "sampling_scatter.png", "heldout_dynamics.png", "h_drift.png"):
        assert (out / plot).exists() and (out / plot).stat().st_size > 1000 and f"]({plot})" in text
    # h's drift: h(0) after each iteration, mean and std over the seeds' own curves, and h at the end
    metaapo = results["rows"]["MetaAPO"]
    per_seed_h0 = [r["h0_after_iteration"] for r in metaapo["per_seed"]]
    iterations = len(list((out / "seed0" / "metaapo-meta_interval_2").glob("iter*")))
    assert len(per_seed_h0) == 2 and all(len(h0) == iterations for h0 in per_seed_h0)
    assert metaapo["h0_after_iteration"] == pytest.approx(np.mean(per_seed_h0, axis=0).tolist())
    assert metaapo["h0_std_after_iteration"] == pytest.approx(np.std(per_seed_h0, axis=0).tolist())
    assert len(metaapo["h_curve_at_end"]) == len(compare.meta.CURVE_GRID)
    assert "h0_after_iteration" not in results["rows"]["DPO"] and "## The meta-learner's h(0)" in text
    # DPO against MetaAPO, paired over the two seeds; MetaAPO is not compared with itself
    vs = results["rows"]["DPO"]["vs_metaapo"]
    assert (
        vs["gold"]["low"] <= vs["gold"]["mean"] <= vs["gold"]["high"] and "vs_metaapo" not in results["rows"]["MetaAPO"]
    )
    gold = lambda label, seed: json.loads((out / f"seed{seed}" / "eval" / f"{label}.json").read_text())  # noqa: E731
    assert vs["gold"]["mean"] == pytest.approx(
        np.mean([np.mean(gold("dpo", s)) - np.mean(gold("metaapo-meta_interval_2", s)) for s in (0, 1)])
    )
    assert vs["annotation_ratio"]["mean"] == pytest.approx(-results["rows"]["MetaAPO"]["annotation_ratio"]["mean"])
    assert (
        "## Differences from MetaAPO, paired by seed" in text and "| DPO |" in text.split("Differences from MetaAPO")[1]
    )
    # the dynamics of seed 0's MetaAPO: one h curve per meta update, every tuple of every iteration placed, held-out
    # points
    measured = results["dynamics"]
    records = [
        json.loads(line)
        for line in (out / "seed0" / "metaapo-meta_interval_2" / "metrics.jsonl").read_text().splitlines()
    ]
    assert sum(measured["meta_updates"].values()) == sum("h_curve" in r for r in records) > 0
    gating = [
        json.loads(line)
        for line in (out / "seed0" / "metaapo-meta_interval_2" / "iter1" / "gating.jsonl").read_text().splitlines()
    ]
    sampling = measured["sampling"]["1"]
    assert sampling["sampled"]["tuples"] <= min(
        8, sum(r["selected"] for r in gating)
    )  # --scatter_prompts=8 of each kind
    gate = sampling["gate"]  # how well 1 - w ranks tied, below-gold and gaining tuples (AUC), over fresh answers
    assert set(gate) == {"tied", "auc_tied", "auc_below_gold", "auc_gain"}
    assert all(v is None or 0 <= v <= 1 for v in gate.values()) and "### Gate diagnostics" in text
    generate = [r for r in records if r.get("phase") == "generate"]
    trained = [r for r in records if r.get("phase") == "train"]
    assert all("gate_auc_tied" in r for r in generate) and generate
    assert all("gate_auc_gain" in r for r in trained) and trained
    assert [p["iteration"] for p in measured["heldout"]] == [0, 1, 2]
    assert all(
        {"reward_mean", "reward_std", "l_off_mean", "gold_mean", "rm_gold_agreement"} <= set(p)
        for p in measured["heldout"]
    )
    assert "### Held-out prompts over iterations (Fig. 2 left)" in text
    # a second call reads the finished runs instead of training again
    before = (out / "seed0" / "metaapo-meta_interval_2" / "done.json").stat().st_mtime
    compare.main(args)
    assert (out / "seed0" / "metaapo-meta_interval_2" / "done.json").stat().st_mtime == before
    # --plots alone: the stage's config.json supplies its data, models and seed (the command line has none of them)
    stage = out / "seed0" / "metaapo-meta_interval_2"
    for plot in ("meta_curves.png", "sampling_scatter.png", "heldout_dynamics.png"):
        (stage / plot).unlink()
    dynamics.main([f"--plots={stage}", "--scatter_prompts=4"])
    for plot in ("meta_curves.png", "sampling_scatter.png", "heldout_dynamics.png"):
        assert (stage / plot).stat().st_size > 1000


def test_rows_at_metaapos_ratio_are_calibrated_per_seed_and_equal_steps_reach_iterative_rows(tmp_path, monkeypatch):
    """compare() gives each seed's calibrated rows that seed's MetaAPO annotation ratio, and
    --equal_steps' step count to the iterative methods only (the runs themselves are stubbed)."""
    ran = []
    ratios = {0: 0.61234, 1: 0.58}

    def fake_stage(cfg, rt, method):
        ran.append((cfg.seed, method, cfg))
        return {"annotation_ratio": ratios[cfg.seed] if method == "metaapo" else 0.5, "steps": 10}

    monkeypatch.setattr(compare.train, "ensure_stage", fake_stage)
    monkeypatch.setattr(compare, "gold_scores", lambda *args: [5.0, 6.0, 7.0, 8.0])
    monkeypatch.setattr(compare.toy, "ensure_toy_assets", lambda *args, **kwargs: None)
    rows = [r for r in compare.COMPARE_ROWS if r[0] in ("SFT", "DPO", "MetaAPO", *compare.AT_METAAPO_RATIO)]
    results = compare.compare([0, 1], tmp_path, rows, [], engine.Runtime(), equal_steps=63)
    by = {(seed, config.stage_name(cfg, method)): cfg for seed, method, cfg in ran}
    for seed, ratio in ((0, "0.612"), (1, "0.58")):
        assert by[seed, f"metaapo-sampling_random-random_ratio_{ratio}-steps_per_iteration_63"].random_ratio == float(
            ratio
        )
        assert by[seed, f"metaapo-sampling_threshold-threshold_ratio_{ratio}-steps_per_iteration_63"]
        assert by[seed, f"online_dpo-prompt_ratio_{ratio}-steps_per_iteration_63"].prompt_ratio == float(ratio)
        assert by[seed, "dpo"].steps_per_iteration == 0  # an offline method is not iterative
    assert set(compare.AT_METAAPO_RATIO) <= set(results["rows"]) and results["equal_steps"] == 63
    text = compare.results_markdown(results, [], tmp_path)
    assert "## At equal annotation budget" in text and "| Online DPO at MetaAPO's ratio |" in text


def test_the_experiments_have_commands_of_their_own():
    """evaluate.py evaluates a model; an experiment flag given to it names the experiment's command,
    and each experiment's --help lists its own flags, then the config keys (the Meta-Aligner's too)."""
    with pytest.raises(SystemExit, match=r"--compare is an experiment: python -m experiments.compare"):
        evaluate.main(["--compare", "--seeds=0"])
    with pytest.raises(SystemExit, match=r"--pareto is an experiment: python -m experiments.meta_aligner.pareto"):
        evaluate.main(["--pareto"])
    import subprocess
    import sys

    for module, own, key in (
        ("experiments.compare", "--equal_steps", "--meta_interval="),
        ("experiments.boundary_grid", "--out", "--schedule="),
        ("experiments.dynamics", "--toy_properties", "--toy_regime="),
        ("experiments.meta_aligner.pareto", "--methods", "--aligner_relabel="),
    ):
        shown = subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert shown.returncode == 0 and own in shown.stdout and key in shown.stdout, module
        assert shown.stdout.index(own) < shown.stdout.index(key), module


def test_held_out_half_coverage_and_the_meta_learner_drift(tmp_path):
    """A t-interval from half the seeds holds the other half's mean about as often as it should on
    well-behaved draws, and far less when the halves differ systematically; h(0) after each
    iteration is read from the logged h curves (the last update of an iteration wins, an iteration
    without an update keeps the value before it)."""
    rng = np.random.default_rng(0)
    calibrated = np.mean([compare.held_out_half_coverage(list(rng.normal(0, 1, 10)), 50)["share"] for _ in range(100)])
    assert 0.8 < calibrated < 0.95
    # one seed far from the rest: a half without it gives a narrow interval that misses the other half's mean
    outlier = compare.held_out_half_coverage([0.0, 0.001, -0.001, 0.0, 0.002, -0.002, 0.0, 1.0], 200)
    assert outlier["share"] < 0.7 and outlier["seeds"] == 8
    assert compare.held_out_half_coverage([0.1, 0.2, 0.3]) is None  # too few seeds to halve
    stage = tmp_path / "metaapo"
    stage.mkdir()
    zero = list(compare.meta.CURVE_GRID).index(0.0)
    curve = lambda h0: [0.1] * zero + [h0]  # noqa: E731
    records = [
        {"iteration": 1, "step": 4, "h_curve": curve(0.55)},
        {"iteration": 1, "step": 8, "h_curve": curve(0.6)},
        {"iteration": 3, "step": 20, "h_curve": curve(0.7)},
    ]
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert compare.h_at_zero(compare.h_curves(stage, 3)) == [0.6, 0.6, 0.7]
    assert compare.h_curves(stage, 3) == [curve(0.6), curve(0.6), curve(0.7)]
    assert compare.h_curves(tmp_path / "a stand-in's run", 2) == [None, None]


def test_methods_names_rows_whose_labels_hold_commas():
    iterative = "Iterative DPO (authors' script: from SFT, reference fixed)"
    assert compare.selected_labels(f"MetaAPO,{iterative},Online DPO") == ["Online DPO", iterative, "MetaAPO"]
    assert compare.selected_labels("") == [label for label, _, _ in compare.COMPARE_ROWS]
    # a label that begins another one, up to its comma, is not selected by the longer one
    assert compare.selected_labels("MetaAPO,Online DPO, tied prompts dropped") == [
        "MetaAPO",
        "Online DPO, tied prompts dropped",
    ]
    with pytest.raises(SystemExit, match=r"no row is called \['Iterative DPO'\]"):
        compare.selected_labels("MetaAPO,Iterative DPO")
