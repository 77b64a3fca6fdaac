"""The toy task's gold judge (reward.toy_gold_score)."""

import pytest

from reward import edit_distance, toy_gold_score


@pytest.mark.parametrize("response", ["a c f", "a , c , f", "[ a c f ]", "answer : a c f"])
def test_correct_answer_scores_10_in_every_style(response):
    assert toy_gold_score("ascending : f a c", response) == 10.0


def test_descending_is_a_different_answer():
    assert toy_gold_score("descending : f a c", "f c a") == 10.0
    assert toy_gold_score("descending : f a c", "a c f") == pytest.approx(10 * (1 - 2 / 3))


def test_partial_credit_is_edit_distance_over_answer_length():
    prompt = "ascending : e b d a"  # answer: a b d e
    assert toy_gold_score(prompt, "a b d") == pytest.approx(7.5)  # last letter left out
    assert toy_gold_score(prompt, "a b b d e") == pytest.approx(7.5)  # a letter written twice
    assert toy_gold_score(prompt, "a b c d e") == pytest.approx(7.5)  # a hallucinated letter
    assert toy_gold_score(prompt, "b a d e") == pytest.approx(5.0)  # neighbours swapped: two edits


def test_empty_or_hopeless_answers_score_0():
    assert toy_gold_score("ascending : b a c", "") == 0.0
    assert toy_gold_score("ascending : b a c", "j i h g f e d") == 0.0


def test_foreign_tokens_cost_two_points_each():
    assert toy_gold_score("ascending : b a c", "a b c ascending") == pytest.approx(8.0)
    assert toy_gold_score("ascending : b a c", "a b c <unk> <unk>") == pytest.approx(6.0)


def test_rejects_a_prompt_that_is_not_a_toy_prompt():
    with pytest.raises(ValueError, match="not a toy prompt"):
        toy_gold_score("sort these please", "a b")
    with pytest.raises(ValueError, match="not a toy prompt"):
        toy_gold_score("ascending : a b z", "a b")


def test_edit_distance():
    assert edit_distance([], []) == 0
    assert edit_distance(list("abc"), list("abc")) == 0
    assert edit_distance(list("abc"), list("ac")) == 1
    assert edit_distance(list("kitten"), list("sitting")) == 3
    assert edit_distance([], list("xy")) == 2
