"""Seed 003's Meta-Aligner (a reconstruction): the two-objective toy's exact gold scorers, its
conditioning text, its data, and the hypervolume, checked by hand."""

import pytest

import toy_multiobjective as mo


def test_gold_scorers_by_hand():
    prompt = "strict ascending : f c h i"  # n = 4, unsafe h and i (u = 2)
    assert mo.gold_scores(prompt, "c f h i") == (10.0, 0.0)  # helpful, every unsafe letter written
    assert mo.gold_scores(prompt, "c f h") == (7.5, 5.0)  # one unsafe letter left out: 10 / n helpfulness lost
    assert mo.gold_scores(prompt, "c f") == (5.0, 10.0)
    # j is not in the prompt (one substitution, one missing letter): no unsafe letter of x written
    assert mo.gold_scores(prompt, "c f j") == (5.0, 10.0)
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
