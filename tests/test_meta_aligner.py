"""The Meta-Aligner (a reconstruction, experiments/meta_aligner): the two-objective toy's exact gold scorers, its
conditioning text, its data, and the hypervolume, checked by hand."""

import math

import pytest

from experiments.meta_aligner import toy_multiobjective as mo


def test_gold_scorers_by_hand():
    prompt = "strict ascending : f c h i"  # n = 4, unsafe h and i (u = 2)
    assert mo.gold_scores(prompt, "c f h i") == (10.0, 0.0)  # helpful, every unsafe letter written
    assert mo.gold_scores(prompt, "c f h") == (7.5, 5.0)  # one unsafe letter left out: 10 / n helpfulness lost
    assert mo.gold_scores(prompt, "c f") == (5.0, 10.0)
    # j is not in the prompt (one substitution, one missing letter): a hallucinated unsafe letter counts as written
    assert mo.gold_scores(prompt, "c f j") == (5.0, 5.0)
    assert mo.gold_scores("lax descending : b a c", "c b a") == (10.0, 10.0)  # no unsafe letter: harmless is 10
    assert mo.gold_scores(prompt + " <w1> 7 <w2> 3", "c f h") == (7.5, 5.0)  # the condition is not part of x
    assert mo.hidden_utility(prompt, "c f") == pytest.approx(0.2 * 5.0 + 0.8 * 10.0)
    assert mo.hidden_utility("lax" + prompt[6:], "c f") == pytest.approx(0.8 * 5.0 + 0.2 * 10.0)
    with pytest.raises(ValueError, match="not a two-objective toy prompt"):
        mo.gold_scores("ascending : a b", "a b")


def test_condition_text_writes_each_weight_times_ten():
    assert mo.condition_text((0.7, 0.3)) == "<w1> 7 <w2> 3"
    assert mo.condition_text((0.04, 0.96)) == "<w1> 0 <w2> 10"
    assert mo.conditioned("lax ascending : a b", (0.5, 0.5)) == "lax ascending : a b <w1> 5 <w2> 5"
    assert mo.mo_parse_prompt("lax ascending : a b <w1> 5 <w2> 5") == ("lax", "ascending", ["a", "b"])


def test_hypervolume_by_hand():
    assert mo.hypervolume([(2.0, 3.0)]) == 6.0
    assert mo.hypervolume([(2.0, 3.0), (4.0, 1.0)]) == 2 * 3 + 2 * 1  # a staircase of two rectangles
    assert mo.hypervolume([(2.0, 3.0), (1.0, 1.0), (4.0, 1.0)]) == 8.0  # a dominated point adds nothing
    assert mo.hypervolume([(2.0, 3.0)], reference=(1.0, 1.0)) == 2.0
    assert mo.hypervolume([]) == 0.0


def test_the_oracle_front_and_the_hidden_utility_gap():
    rows = mo.make_mo_rows(0, {"train_prefs": 1500})
    prompts = [r["prompt"] for r in rows["train_prefs"]]
    front = mo.oracle_front(prompts)
    assert front[0][1] == 10.0 and front[-1][0] == 10.0  # the harmless end and the helpful end
    assert all(a[0] <= b[0] and a[1] >= b[1] for a, b in zip(front, front[1:]))  # a trade-off along the grid
    assert 70 < mo.hypervolume(front) < 85
    best = mo.oracle_utility(prompts)
    assert best["prompt_aware"] > best["best_fixed"] + 0.4  # the tag matters: no fixed weight serves both


def test_offline_rows_prefer_the_hidden_utility_and_store_gold():
    rows = mo.make_mo_rows(1, {"sft": 300, "train_prefs": 600})
    prefs = rows["train_prefs"]
    assert all(r["gold_chosen"] == list(mo.gold_scores(r["prompt"], r["chosen"][-1]["content"])) for r in prefs)
    better = [
        mo.hidden_utility(r["prompt"], r["chosen"][-1]["content"])
        > mo.hidden_utility(r["prompt"], r["rejected"][-1]["content"])
        for r in prefs
    ]
    assert sum(better) / len(better) > 0.6  # the noisy "human" mostly picks the intended trade-off
    omitted = {tag: [] for tag in mo.MO_TAGS}  # the SFT teacher omits more unsafe letters on strict prompts
    for r in rows["sft"]:
        tag, _, letters = mo.mo_parse_prompt(r["prompt"])
        unsafe = mo.MO_UNSAFE & set(letters)
        if unsafe:
            omitted[tag].append(len(unsafe - set(r["messages"][-1]["content"].split())) / len(unsafe))
    assert sum(omitted["strict"]) / len(omitted["strict"]) > sum(omitted["lax"]) / len(omitted["lax"]) + 0.15
    assert mo.make_mo_rows(1, {"train_prefs": 50}) == mo.make_mo_rows(1, {"train_prefs": 50})


def test_realised_weights_relabel_and_best_of_k_by_hand():
    import torch

    from experiments.meta_aligner import meta_aligner as meal

    realised = meal.realised_weights(torch.tensor([[1.0, 0.8]]))  # softmax((1, 0.8) / 0.1) = softmax(10, 8)
    assert realised[0, 0].item() == pytest.approx(1 / (1 + math.exp(-2)))
    moved = meal.relabel(torch.tensor([[0.2, 0.8]]), torch.tensor([[1.0, 0.0]]), 0.5)
    assert moved.tolist() == [[pytest.approx(0.6), pytest.approx(0.4)]]  # halfway toward what was realised
    assert meal.relabel(torch.tensor([[0.2, 0.8]]), torch.tensor([[1.0, 0.0]]), 0.0).tolist() == [
        [pytest.approx(0.2), pytest.approx(0.8)]
    ]  # lambda = 0: the asked weights stay (PRO's static labels)
    rewards = torch.tensor([[1.0, -1.0], [0.0, 1.0], [1.0, -1.0]])
    assert meal.best_of_k(torch.tensor([0.9, 0.1]), rewards) == 0  # first of the tied best
    assert meal.best_of_k(torch.tensor([0.2, 0.8]), rewards) == 1
    explored = meal.explore(torch.tensor([[0.5, 0.5]] * 1000), 0.1, torch.Generator().manual_seed(0))
    assert torch.allclose(explored.sum(-1), torch.ones(1000)) and 0.45 <= explored[:, 0].min().item()
    assert explored[:, 0].max().item() <= 0.55 and explored[:, 0].std().item() > 0.01


def test_the_weight_net_moves_toward_its_buffers_targets():
    """The meta step's direction on a hand-made case: prompts whose kept samples realised more
    harmlessness pull g_phi(x) toward harmless, one Adam step at a time, every T_meta steps."""
    import torch

    from experiments.meta_aligner import meta_aligner as meal

    learner = meal.WeightLearner(vocab_size=8, interval=2)
    ids, mask = torch.tensor([[1, 2, 3], [1, 4, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    before = learner.weights(ids, mask)[:, 1]
    learner.append(ids[:1], mask[:1], torch.tensor([[0.1, 0.9]]))
    assert not learner.ready()
    learner.append(ids[1:, :2], mask[1:, :2], torch.tensor([[0.1, 0.9]]))  # a shorter prompt: padded in the update
    assert learner.ready()
    record = learner.update()
    after = learner.weights(ids, mask)[:, 1]
    assert (after > before).all() and record["weight_net_updates"] == 1 and not learner.buffer
    assert meal.kl_to(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.5, 0.5]])).item() == pytest.approx(0.0)


def test_assets_load_through_the_normal_loaders_and_the_condition_is_in_the_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    import data

    assets = mo.ensure_mo_assets(0, tmp_path, {"sft": 40, "train_prefs": 40, "test_prefs": 8})
    tokenizer = AutoTokenizer.from_pretrained(assets.base)
    text = mo.conditioned("strict ascending : f c h i", (0.7, 0.3))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.split()) and tokenizer.unk_token_id not in ids  # one id per word, none unknown
    prefs, _ = data.load_preferences(assets.train_prefs)
    sft, _ = data.load_sft(assets.sft)
    assert len(prefs) == 40 and len(sft) == 40 and prefs[0].prompt[-1]["content"].startswith(mo.MO_TAGS)
    assert mo.ensure_mo_assets(0, tmp_path, {"sft": 40, "train_prefs": 40, "test_prefs": 8}) == assets  # cached


def test_reward_signal_is_noisy_gold_normalised_by_offline_statistics():
    import random

    rng = random.Random(0)
    prompt, answer = "lax ascending : f c h i", "c f h"
    signals = [mo.reward_signal(prompt, answer, rng) for _ in range(4000)]
    gold = mo.gold_scores(prompt, answer)
    for i in range(2):
        values = [s[i] for s in signals]
        assert abs(sum(values) / len(values) - gold[i]) < 0.06  # unbiased, noise std 1
    stats = mo.reward_stats([(1.0, 4.0), (3.0, 4.0)])
    assert stats == [(2.0, 1.0), (4.0, 1.0)]  # a constant objective gets std 1, not a division by zero
    assert mo.normalise((3.0, 5.0), stats) == (1.0, 1.0)


def test_offline_answers_are_conditioned_on_the_trade_off_they_realised():
    from experiments.meta_aligner import meta_aligner as meal

    prefs = mo.make_mo_rows(0, {"train_prefs": 200})["train_prefs"]
    rows, stats, realised = meal.conditional_rows(prefs, seed=0)
    assert len(rows) == 2 * len(prefs) and len(stats) == 2 and realised.shape == (len(rows), 2)
    tens = []
    for row, (pref, key) in zip(rows, [(p, k) for p in prefs for k in ("chosen", "rejected")]):
        words = row["prompt"].split()
        assert (
            row["prompt"].startswith(pref["prompt"] + " <w1> ")
            and row["messages"][-1]["content"] == (pref[key][-1]["content"])
        )
        tens.append((int(words[words.index("<w1>") + 1]), pref, key))
        assert int(words[words.index("<w1>") + 1]) + int(words[words.index("<w2>") + 1]) in (9, 10, 11)

    # an answer that wrote every unsafe letter realised helpfulness: its helpful weight is mostly above one
    # that left them all out (the reward signal is noisy, so compare the two groups' means)
    def unsafe_written(pref, key):
        _, _, letters = mo.mo_parse_prompt(pref["prompt"])
        unsafe = mo.MO_UNSAFE & set(letters)
        return unsafe and unsafe <= set(pref[key][-1]["content"].split())

    def none_written(pref, key):
        _, _, letters = mo.mo_parse_prompt(pref["prompt"])
        unsafe = mo.MO_UNSAFE & set(letters)
        return unsafe and not unsafe & set(pref[key][-1]["content"].split())

    kept = [t for t, p, k in tens if unsafe_written(p, k)]
    omitted = [t for t, p, k in tens if none_written(p, k)]
    assert kept and omitted and sum(kept) / len(kept) > sum(omitted) / len(omitted) + 2


def test_rics_map_goals_and_rejection_as_its_code():
    import random

    import torch

    from experiments.meta_aligner import meta_aligner as meal

    assert meal.ric_targets((1.0, 0.0)) == pytest.approx((4.3, -4.3))
    half = meal.ric_targets((0.5, 0.5))  # w / |w|_2 = 0.707 each
    assert half[0] == pytest.approx(0.5**0.5 * 8.6 - 4.3) and half[0] == half[1]
    rng = random.Random(0)
    for _ in range(50):
        goals = meal.ric_sample_goals(2, rng)
        assert sorted(goals)[1] == meal.RIC_HIGH and meal.RIC_LOW <= min(goals) <= meal.RIC_HIGH
    rewards = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    # quantile 0.75 of each column: 1.0 and 1.0 (sorted 0 0 0 1 2 and 0 0 0 1 3, position 3)
    assert meal.ric_keep(rewards, 0.75) == [False, True, True, True, True]
    assert meal.ric_keep(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]), 0.5) == [False, True, True]
    assert mo.ric_condition_text((1.26, -0.4)) == "<r1> 1.5 <r2> -0.5"
    assert mo.ric_condition_text((9.0, -5.0)) == "<r1> 4.0 <r2> -4.0"
    assert mo.mo_parse_prompt("lax ascending : a b <r1> 1.5 <r2> -0.5")[2] == ["a", "b"]


# ----------------------------------------------------------------------------------------------
# The online loop on the engine: resume after a kill, and one process against two

TINY_MO = [
    "--sft_epochs=1",
    "--aligner_offline_epochs=1",
    "--aligner_weight_fit_epochs=2",
    "--aligner_batch_size=4",
    "--aligner_weight_interval=2",  # rounds of 8 prompts, 2 policy steps each
    "--aligner_samples=2",
    "--deterministic",
]


@pytest.fixture(scope="module")
def mo_shared(tmp_path_factory):
    """A tiny two-objective toy and the stages before the online ones (SFT, stage 0), built once."""
    from engine import setup_distributed
    from experiments.meta_aligner import meta_aligner as meal

    root = tmp_path_factory.mktemp("mo")
    assets = mo.ensure_mo_assets(0, root / "data", {"sft": 64, "train_prefs": 64, "test_prefs": 8})
    args = [f"--dataset={assets.root}", f"--aligner_shared_dir={root / 'shared'}", *TINY_MO]
    cfg = meal.mo_config(args + [f"--out_dir={root / 'unused'}"])
    rt = setup_distributed(cfg)
    meal.ensure_offline(cfg, rt)
    assert (root / "shared" / "offline_wic" / "weight_net.pt").exists()
    return args


def aligner(args, out, **popen):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "experiments.meta_aligner.meta_aligner", *args, f"--out_dir={out}"]
    return subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def step_records(stage):
    import json

    lines = (stage / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["kept_helpful"]) for r in map(json.loads, lines) if "step" in r]


def same_weights(a, b, atol=0.0):
    import torch
    from safetensors.torch import load_file

    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for tensors in (left, right):  # a tied head may be written out or not (the sharded export writes it)
        tensors.setdefault("lm_head.weight", tensors["model.embed_tokens.weight"])
    assert left.keys() == right.keys()
    assert all(torch.allclose(left[k], right[k], atol=atol, rtol=0) for k in left)
    nets = [torch.load(p / "weight_net.pt") for p in (a, b)]
    assert all(torch.allclose(nets[0][k], nets[1][k], atol=atol, rtol=0) for k in nets[0])


def test_a_killed_online_run_resumes_to_the_uninterrupted_result(mo_shared, tmp_path, capsys):
    """SIGKILL mid-run (checkpoints every 3 steps, so mostly inside a round: its kept samples come
    back from the checkpoint); --resume finishes with the weights, g_phi and step records of the run
    that was never stopped."""
    import time

    from experiments.meta_aligner import meta_aligner as meal

    args = mo_shared + ["--aligner_prompts=32", "--aligner_iterations=2", "--save_every=3"]  # 16 steps
    meal.main(args + [f"--out_dir={tmp_path / 'whole'}"])  # in this process: the reference
    whole = tmp_path / "whole" / next(p.name for p in (tmp_path / "whole").iterdir() if p.name.startswith("online"))
    process = aligner(args, tmp_path / "killed")
    log = tmp_path / "killed" / whole.name / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if log.exists() and len([line for line in log.read_text().splitlines() if '"step"' in line]) >= 4:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    process.kill()
    process.communicate()
    killed = tmp_path / "killed" / whole.name
    assert not (killed / "done.json").exists() and list((killed / "checkpoints").glob("step-*"))
    meal.main(args + ["--resume", f"--out_dir={tmp_path / 'killed'}"])
    assert "resumed from" in capsys.readouterr().out
    assert step_records(killed) == step_records(whole) and len(step_records(whole)) == 16
    for t in (1, 2):
        same_weights(killed / f"iter{t}", whole / f"iter{t}")


def test_one_process_and_two_give_the_same_round(mo_shared, tmp_path):
    """Under torchrun on two processes, every rank generates its share of the round and receives
    every sample: the kept samples, the relabelled targets and g_phi's update are those of one
    process, and the policy's two steps agree to float tolerance."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_distributed import TORCHRUN_VARIABLES

    from experiments.meta_aligner import meta_aligner as meal

    args = mo_shared + ["--aligner_prompts=8", "--aligner_iterations=1"]
    meal.main(args + [f"--out_dir={tmp_path / 'one'}"])  # one process: this one
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "-m",
            "experiments.meta_aligner.meta_aligner",
            *args,
        ]
        + [f"--out_dir={tmp_path / 'two'}"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    one = next(p for p in (tmp_path / "one").iterdir() if p.name.startswith("online"))
    two = tmp_path / "two" / one.name
    left, right = step_records(one), step_records(two)
    assert [r[0] for r in left] == [r[0] for r in right] == [1, 2]
    assert [r[2] for r in left] == [r[2] for r in right]  # the same kept samples
    assert [r[1] for r in left] == pytest.approx([r[1] for r in right], abs=1e-5)
    same_weights(one / "iter1", two / "iter1", atol=1e-5)


def test_pareto_aggregates_fronts_over_seeds_by_hand():
    """pareto.py's numbers on hand-made answers: a front's points, hypervolume, hidden utility and
    fidelity; over seeds, the mean with its t-interval and the paired difference from the reference row."""
    from experiments.meta_aligner import pareto

    prompts = ["strict ascending : a g", "lax ascending : a g"]  # n = 2, one unsafe letter each
    grid = ((1.0, 0.0), (0.0, 1.0))
    # w = (1, 0): both answers write g (10, 0); w = (0, 1): both leave it out (5, 10)
    gold = [[(10.0, 0.0), (10.0, 0.0)], [(5.0, 10.0), (5.0, 10.0)]]
    record = pareto.front_record(prompts, grid, gold, [(0.0, 1.0), (0.0, 1.0)], 0.1)
    assert record["points"] == [(10.0, 0.0), (5.0, 10.0)] and record["hypervolume"] == 50.0
    # strict wants (0.2, 0.8): 2 then 9; lax wants (0.8, 0.2): 8 then 6
    assert record["utility"] == [pytest.approx(5.0), pytest.approx(7.5)] and record["best_fixed_weights"] == [0.0, 1.0]
    assert record["fidelity"] == pytest.approx(0.0)  # each answer realised exactly the weights asked
    runs = lambda hv: [{"checkpoints": [{**record, "hypervolume": h}], "train_time_s": 1.0} for h in hv]  # noqa: E731
    rows = pareto.aggregate(
        {"Static-weight RS": runs([50.0, 52.0, 54.0]), pareto.REFERENCE_ROW: runs([49.0, 50.0, 51.0])},
        {"hypervolume": 100.0, "hull_hypervolume": 104.0},
    )
    static = rows["Static-weight RS"]
    assert static["hypervolume"]["mean"] == pytest.approx(52.0) and static["of_oracle"] == pytest.approx(0.52)
    assert static["of_hull"] == pytest.approx(0.5)
    half = 4.303 * 2.0 / 3**0.5  # t(0.975, 2) * sample std / sqrt(3)
    assert static["hypervolume"]["interval"]["high"] == pytest.approx(52.0 + half, abs=1e-3)
    assert static["vs_reference"]["mean"] == pytest.approx(2.0) and "vs_reference" not in rows[pareto.REFERENCE_ROW]
    text = pareto.results_markdown(
        {
            "oracle": {**record, "prompt_aware_utility": 8.0, "hull_hypervolume": 104.0},
            "rows": rows,
            "seeds": [0, 1, 2],
            "minutes": 1.0,
            "eval_prompts": 2,
        }
    )
    assert "| Static-weight RS | 52.0 [" in text and "+2.0 [" in text


def test_the_held_out_prompts_come_from_the_training_population_and_the_hull_by_hand():
    """test_prefs is drawn with train_prefs, not after it: short prompts (few, since prompts are
    unique) are as common in both; a prompt whose four answers agree stays in test_prefs only.
    Harmlessness counts a hallucinated unsafe letter. The continuous hull's hypervolume by hand."""
    rows = mo.make_mo_rows(0, {"sft": 2000, "train_prefs": 6000, "test_prefs": 1000})
    short = {
        name: sum(len(mo.mo_parse_prompt(r["prompt"])[2]) == 3 for r in rows[name]) / len(rows[name])
        for name in ("train_prefs", "test_prefs")
    }
    assert abs(short["train_prefs"] - short["test_prefs"]) < 0.04, short  # drawn last, test_prefs had a third fewer
    same = [r for r in rows["test_prefs"] if r["chosen"] == r["rejected"]]
    assert same and not [r for r in rows["train_prefs"] if r["chosen"] == r["rejected"]]
    assert mo.harmless_score("strict ascending : a g b", "a b") == 10.0
    assert mo.harmless_score("strict ascending : a g b", "a b h") == 0.0  # h is not in the prompt: still written
    # one prompt with n = 2, u = 1: the oracle writes g (10, 0) or leaves it out (5, 10); the hull is the
    # segment between them: 5 x 10 + (10 - 5) x (10 + 0) / 2 = 75 (the 11-point grid's staircase: 50)
    assert mo.oracle_hull_hypervolume(["strict ascending : a g"]) == pytest.approx(75.0)
    assert mo.hypervolume(mo.oracle_front(["strict ascending : a g"])) == pytest.approx(50.0)
