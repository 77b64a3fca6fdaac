"""The pieces of issue 24's comparisons: the toy's two regimes (their properties measured on
their data), the gates calibrated to an annotation budget, online DPO on a random share of the
prompts, equal policy steps per iteration, the authors' iterative DPO and ADPO, and the gate
diagnostics' AUC."""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

import config
import dpo
import iterative_run
import toy
from baselines.online import BASELINES, baseline_for, random_prompts
from config import ConfigError, parse_config
from meta import gate, ranking_auc

ROWS = {"sft": 3000, "train_prefs": 3000}


@pytest.fixture(scope="module")
def regimes():
    return {regime: toy.toy_data_properties(toy.make_toy_rows(0, ROWS, regime)) for regime in toy.TOY_REGIMES}


def test_the_skill_regime_holds_a_skill_only_the_offline_answers_have(regimes):
    skill, mismatch = regimes["skill"], regimes["mismatch"]
    # the SFT teacher never sorts descending; the offline writers' chosen answers mostly do
    assert skill["sft_solves_descending"] == 0.0 and skill["offline_chosen_solves_descending"] > 0.6
    assert mismatch["sft_solves_descending"] > 0.1  # the first regime's teacher only usually errs there
    assert 0.25 < skill["descending_share"] < 0.45  # about a third of the prompts need the skill
    assert skill["sft_gold_descending"] < 3 < 8 < skill["sft_gold_ascending"]


def test_the_skill_regime_writes_offline_answers_in_the_policys_own_styles(regimes):
    skill, mismatch = regimes["skill"], regimes["mismatch"]
    assert skill["teacher_styles"] == ["comma", "plain"] and mismatch["teacher_styles"] == ["plain"]
    assert skill["offline_in_teacher_styles"] > 0.85 and mismatch["offline_in_teacher_styles"] < 0.35
    # the two styles differ in tokens, not in gold: aligned answers vary in what the judge ignores
    prompt = "ascending : c a b"
    assert toy.toy_gold_score(prompt, "a b c") == toy.toy_gold_score(prompt, "a , b , c") == toy.TOY_GOLD_MAX


def test_the_first_regime_is_the_default_and_its_data_did_not_change():
    assert parse_config([]).toy_regime == "mismatch" and parse_config([]).dataset == "out/toy/seed0"
    skill = parse_config(["--toy_regime=skill"])
    assert skill.dataset == "out/toy/skill-seed0" and skill.out_dir == "out/toy-skill-seed0"
    assert toy.toy_root(0, "skill") == Path("out/toy/skill-seed0")
    # the first regime's rows, byte for byte as before the second regime was added (sha1 of commit 142110d's)
    rows = json.dumps(toy.make_toy_rows(0, {"sft": 200, "train_prefs": 200, "test_prefs": 50}))
    assert hashlib.sha1(rows.encode()).hexdigest() == "ea04edde5414cacd55c67feac938b8ea82492352"
    with pytest.raises(ConfigError, match="toy_regime"):
        parse_config(["--model=tulu8b", "--toy_regime=skill"])


def test_a_threshold_gate_calibrated_to_a_ratio_sends_that_share_of_lowest_scores():
    scores = torch.tensor([-0.1, -2.0, -0.5, -3.0, -0.2, -1.0, -0.7, -0.05])
    weights = torch.full((8,), 0.5)
    decision = gate(scores, weights, "threshold", torch.Generator().manual_seed(0), threshold_ratio=0.375)
    assert decision.selected.tolist() == [False, True, False, True, False, True, False, False]  # the 3 lowest
    fixed = gate(scores, weights, "threshold", torch.Generator().manual_seed(0), threshold=-0.6)
    assert fixed.selected.tolist() == (scores < -0.6).tolist()  # threshold_ratio 0: tau as given


def test_random_gates_and_prompt_subsets_send_their_share():
    n = 20000
    decision = gate(torch.zeros(n), torch.zeros(n), "random", torch.Generator().manual_seed(0), random_ratio=0.3)
    assert abs(decision.selected.float().mean().item() - 0.3) < 0.01
    cfg = parse_config(["--prompt_ratio=0.4"])
    items = [
        dpo.PolicyPair(index=i, prompt_id=str(i), prompt_ids=[1], chosen_ids=[2], rejected_ids=[3]) for i in range(n)
    ]
    chosen = random_prompts(cfg, items, None, None)
    assert abs(sum(chosen) / n - 0.4) < 0.01
    assert random_prompts(cfg, items[5000:6000], None, None) == chosen[5000:6000]  # a prompt's draw is its own
    assert all(random_prompts(parse_config([]), items[:100], None, None))  # the default: every prompt
    assert BASELINES["online_dpo"].select is random_prompts


def test_equal_steps_cycle_through_reshuffled_epochs():
    cfg = parse_config(["--batch_size=4", "--steps_per_iteration=7"])
    items = list(range(10))  # 3 batches per epoch
    batches = iterative_run.iteration_pass(torch.nn.Linear(1, 1), items, 0, cfg)[0]
    assert len(batches) == 7 and sorted(x for b in batches[:3] for x in b) == items
    assert len(iterative_run.iteration_pass(torch.nn.Linear(1, 1), items, 0, parse_config(["--batch_size=4"]))[0]) == 3


def test_the_authors_iterative_dpo_starts_from_sft_with_a_fixed_reference(tmp_path):
    cfg = parse_config([f"--out_dir={tmp_path}"])
    starts = [iterative_run.iteration_paths(cfg, tmp_path / "s", "iterative_dpo", t) for t in range(3)]
    assert starts[0] == (config.sft_path(cfg), config.reference_path(cfg)) == (config.sft_path(cfg),) * 2
    assert starts[2] == (str(tmp_path / "s" / "iter2" / "model"), config.sft_path(cfg))  # the reference stays SFT
    online = iterative_run.iteration_paths(cfg, tmp_path / "s", "online_dpo", 0)
    assert online == (config.warm_policy_path(cfg),) * 2  # ours: from the warm-up, reference = the iteration's start


def test_adpo_as_the_authors_merge_trains_on_the_selected_offline_pairs_only():
    D_t = [
        dpo.PolicyPair(index=i, prompt_id=str(i), prompt_ids=[1], chosen_ids=[2], rejected_ids=[3]) for i in range(4)
    ]
    joined = [dataclasses.replace(D_t[1], online_chosen_ids=[5], online_rejected_ids=[6])]
    selected = [False, True, True, False]
    ours = baseline_for(parse_config([]), "adpo").training_pairs(D_t, joined, selected)
    authors = baseline_for(parse_config(["--adpo_offline=selected"]), "adpo").training_pairs(D_t, joined, selected)
    assert [p.index for p in ours] == [0, 1, 2, 3, 1] and [p.index for p in authors] == [1, 2, 1]
    assert authors[-1].chosen_ids == [5] and authors[-1].online_chosen_ids is None
    names = {config.stage_name(parse_config(["--adpo_offline=selected"]), "adpo")}
    names |= {config.stage_name(parse_config(["--prompt_ratio=0.6"]), "online_dpo")}
    names |= {config.stage_name(parse_config(["--sampling=random", "--random_ratio=0.25"]), "metaapo")}
    names |= {config.stage_name(parse_config(["--steps_per_iteration=63"]), "selm")}
    assert names == {
        "adpo-adpo_offline_selected",
        "online_dpo-prompt_ratio_0.6",
        "metaapo-sampling_random-random_ratio_0.25",
        "selm-steps_per_iteration_63",
    }


def test_ranking_auc_is_the_mann_whitney_statistic():
    assert ranking_auc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert ranking_auc([4, 3, 2, 1], [False, False, True, True]) == 0.0
    assert ranking_auc([1, 2, 2, 3], [False, True, False, True]) == 0.875  # a tie counts half
    assert ranking_auc([0.3] * 6, [True, False] * 3) == 0.5
    assert ranking_auc([1, 2], [True, True]) is None
    generator = torch.Generator().manual_seed(0)
    scores, labels = torch.rand(400, generator=generator), torch.rand(400, generator=generator) < 0.3
    pairs = [(a > b) + 0.5 * (a == b) for a, x in zip(scores, labels) if x for b, y in zip(scores, labels) if not y]
    assert ranking_auc(scores.tolist(), labels.tolist()) == pytest.approx(float(sum(pairs) / len(pairs)))
