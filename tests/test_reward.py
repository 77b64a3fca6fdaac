"""reward.py: the toy task's gold judge, learned reward models (order, batching, truncation,
distributed scoring) and the scoring CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

from data import encode_prompt, encode_response
from reward import RewardModel, toy_gold_judge
from toy import edit_distance, toy_gold_score


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


# ---------------------------------------------------------------------------------------------
# Learned reward models

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    [{"role": "user", "content": p}]
    for p in ["ascending : c a b", "descending : a b", "ascending : j e f g h i", "descending : d c"]
]
RESPONSES = ["a b c", "b a", "e f g h i j", "[ d c ]"]


def test_scores_keep_the_input_order(toy_rm_dir):
    rm = RewardModel.from_pretrained(str(toy_rm_dir), batch_size=3, device="cpu")
    together = rm.score(PROMPTS, RESPONSES)
    alone = [rm.score([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES)]
    assert together == pytest.approx(alone, abs=1e-5)
    assert len(set(round(s, 6) for s in together)) == 4  # a random model still tells them apart


def test_same_scores_at_batch_sizes_1_and_8(toy_rm_dir):
    prompts, responses = PROMPTS * 3, RESPONSES[::-1] * 3  # different lengths in one batch
    scores = {
        bs: RewardModel.from_pretrained(str(toy_rm_dir), batch_size=bs, device="cpu").score(prompts, responses)
        for bs in (1, 8)
    }
    assert scores[1] == pytest.approx(scores[8], abs=1e-5)


def test_scores_the_chat_template_rendering(toy_rm_dir):
    rm = RewardModel.from_pretrained(str(toy_rm_dir), device="cpu")
    ids = rm.encode(PROMPTS[:1], RESPONSES[:1])[0]
    assert ids == encode_prompt(rm.tokenizer, PROMPTS[0]) + encode_response(rm.tokenizer, PROMPTS[0], RESPONSES[0])
    assert rm.tokenizer.convert_ids_to_tokens(ids)[-1] == "<eos>"
    direct = rm.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert rm.score(PROMPTS[:1], RESPONSES[:1])[0] == pytest.approx(direct, abs=1e-5)


def test_a_response_cut_at_the_length_limit_is_scored_without_eos(toy_rm_dir):
    """A generation cut at max_new_tokens is not a finished answer: no EOS is appended to it."""
    rm = RewardModel.from_pretrained(str(toy_rm_dir), device="cpu")
    complete, cut = rm.encode(PROMPTS[:2], RESPONSES[:2], complete=[True, False])
    assert (
        complete[-1] == rm.tokenizer.eos_token_id
        and cut
        == encode_prompt(rm.tokenizer, PROMPTS[1]) + rm.tokenizer(RESPONSES[1], add_special_tokens=False)["input_ids"]
    )
    scores = rm.score(PROMPTS[:2] * 2, RESPONSES[:2] * 2, complete=[True, True, False, False])
    assert scores[:2] != pytest.approx(scores[2:], abs=1e-4)  # the end of turn changes the score
    assert scores[3] == pytest.approx(rm.model(input_ids=torch.tensor([cut])).logits[0, 0].item(), abs=1e-5)
    with pytest.raises(ValueError, match="completeness flags"):
        rm.score(PROMPTS[:2], RESPONSES[:2], complete=[True])


def test_truncation_to_max_len(toy_rm_dir):
    rm = RewardModel.from_pretrained(str(toy_rm_dir), max_len=9, device="cpu")
    full = encode_prompt(rm.tokenizer, PROMPTS[2]) + encode_response(rm.tokenizer, PROMPTS[2], RESPONSES[2])
    assert len(full) > 9
    score = rm.score(PROMPTS[2:3], RESPONSES[2:3])[0]
    assert rm.truncated == 1
    assert score == pytest.approx(rm.model(input_ids=torch.tensor([full[:9]])).logits[0, 0].item(), abs=1e-5)


def test_reward_model_needs_one_label(toy_rm_dir):
    config = AutoConfig.from_pretrained(toy_rm_dir)
    config.num_labels = 2
    model = LlamaForSequenceClassification(config)
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardModel(model, AutoTokenizer.from_pretrained(toy_rm_dir))


def test_pad_token_id_is_always_the_tokenizers(toy_rm_dir):
    """HF pools the last token that is not config.pad_token_id; a stale value would pool the wrong token."""
    model = LlamaForSequenceClassification.from_pretrained(toy_rm_dir)
    tokenizer = AutoTokenizer.from_pretrained(toy_rm_dir)
    model.config.pad_token_id = tokenizer.pad_token_id + 1
    RewardModel(model, tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_a_checkpoint_without_score_head_is_refused(toy_dir):
    """A causal LM passed as reward model would silently get a random score head."""
    with pytest.raises(
        ValueError,
        match=f"{toy_dir}: not a reward model; the checkpoint has no weights for the score head \\(score.weight\\)",
    ):
        RewardModel.from_pretrained(str(toy_dir), device="cpu")


def test_gold_judge_has_the_reward_model_api():
    assert toy_gold_judge().score(PROMPTS, RESPONSES) == [10.0, 10.0, 10.0, 10.0]


def _score_distributed(rank, world_size, init_file, rm_dir, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        rm = RewardModel.from_pretrained(rm_dir, batch_size=2, device="cpu")
        prompts, responses = PROMPTS + PROMPTS[:1], RESPONSES + RESPONSES[:1]  # 5 items: uneven shares
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(rm.score(prompts, responses), f)
    finally:
        dist.destroy_process_group()


def test_two_process_scoring_returns_every_score_in_order(toy_rm_dir, tmp_path):
    mp.spawn(_score_distributed, args=(2, str(tmp_path / "init"), str(toy_rm_dir), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    single = RewardModel.from_pretrained(str(toy_rm_dir), device="cpu").score(
        PROMPTS + PROMPTS[:1], RESPONSES + RESPONSES[:1]
    )
    assert rank0 == rank1
    assert rank0 == pytest.approx(single, abs=1e-5)


def test_scoring_cli(toy_rm_dir, tmp_path):
    rows = [
        {"prompt": "ascending : c a b", "response": "a b c", "id": 1},
        {"prompt": [{"role": "user", "content": "descending : a b"}], "responses": ["b a", "a b", "b"]},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for model in ("toy-gold", str(toy_rm_dir)):
        result = subprocess.run(
            [
                sys.executable,
                "reward.py",
                "--model",
                model,
                "--input",
                str(tmp_path / "in.jsonl"),
                "--output",
                str(tmp_path / "out.jsonl"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert out[0]["id"] == 1 and isinstance(out[0]["reward"], float) and len(out[1]["rewards"]) == 3
        if model == "toy-gold":
            assert out[0]["reward"] == 10.0 and out[1]["rewards"] == [10.0, 0.0, 5.0]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "ascending : a b"}) + "\n")
    result = subprocess.run(
        [
            sys.executable,
            "reward.py",
            "--model",
            "toy-gold",
            "--input",
            str(tmp_path / "bad.jsonl"),
            "--output",
            str(tmp_path / "never.jsonl"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and f"{tmp_path / 'bad.jsonl'}:1: needs 'response'" in result.stderr
    assert not (tmp_path / "never.jsonl").exists()
