"""Tokenization through the real chat templates of Llama-3.1-Tulu-3-8B-SFT, Qwen2.5-Instruct and
Llama-3.1-8B-Instruct (tests/chat_tokenizers.py), token by token: prompt ids = the template with
its generation prompt, response ids = the rest of the template's rendering of the conversation
(TRL's way), BOS exactly once, the end-of-turn token generation stops on, and the same ids for
the reward model."""

import json

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForSequenceClassification

import chat_tokenizers
from data import (
    DataError,
    encode_prompt,
    encode_response,
    end_of_turn_id,
    load_preferences,
    load_tokenizer,
    tokenize_preferences,
)
from reward import RewardModel
from sample import stop_token_ids

USER_1, ANSWER_1, USER_2, ANSWER_2 = "ascending : c a b", "a b c", "descending : c a b", "c b a"
ONE_TURN = [{"role": "user", "content": USER_1}]
TWO_TURNS = ONE_TURN + [{"role": "assistant", "content": ANSWER_1}, {"role": "user", "content": USER_2}]

QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
LLAMA_SYSTEM = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n<|eot_id|>"
)
# (rendered prompt of ONE_TURN, of TWO_TURNS, the answer as the template closes it); BOS shown where the ids hold it
EXPECTED = {
    "tulu3": (
        f"<|begin_of_text|><|user|>\n{USER_1}\n<|assistant|>\n",
        f"<|begin_of_text|><|user|>\n{USER_1}\n<|assistant|>\n{ANSWER_1}<|end_of_text|>\n<|user|>\n{USER_2}\n<|assistant|>\n",
        "{}<|end_of_text|>",
    ),
    "qwen2.5": (
        f"{QWEN_SYSTEM}<|im_start|>user\n{USER_1}<|im_end|>\n<|im_start|>assistant\n",
        f"{QWEN_SYSTEM}<|im_start|>user\n{USER_1}<|im_end|>\n<|im_start|>assistant\n{ANSWER_1}<|im_end|>\n"
        f"<|im_start|>user\n{USER_2}<|im_end|>\n<|im_start|>assistant\n",
        "{}<|im_end|>\n",
    ),
    "llama3.1-instruct": (
        f"{LLAMA_SYSTEM}<|start_header_id|>user<|end_header_id|>\n\n{USER_1}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        f"{LLAMA_SYSTEM}<|start_header_id|>user<|end_header_id|>\n\n{USER_1}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{ANSWER_1}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{USER_2}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "{}<|eot_id|>",
    ),
}
FAMILIES = list(EXPECTED)


def strings(tokenizer, ids):
    return [tokenizer.decode([i]) for i in ids]


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_and_response_token_by_token(family):
    tokenizer = chat_tokenizers.build(family)
    one, two, answer = EXPECTED[family]
    for messages, prompt, response in ((ONE_TURN, one, ANSWER_1), (TWO_TURNS, two, ANSWER_2)):
        prompt_ids = encode_prompt(tokenizer, messages)
        response_ids = encode_response(tokenizer, messages, response)
        assert strings(tokenizer, prompt_ids) == chat_tokenizers.pieces(prompt, family)
        assert strings(tokenizer, response_ids) == chat_tokenizers.pieces(answer.format(response), family)
        # the two together are the template's rendering of the whole conversation
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        bos = (
            [tokenizer.bos_token_id]
            if tokenizer.bos_token_id is not None and not full.startswith(tokenizer.bos_token)
            else []
        )
        assert prompt_ids + response_ids == bos + tokenizer(full, add_special_tokens=False)["input_ids"]
        # BOS exactly once where the family has one: added for Tulu 3 (its template writes none), the template's own
        # for Llama-3.1
        assert (prompt_ids + response_ids).count(tokenizer.bos_token_id) == (
            1 if tokenizer.bos_token_id is not None else 0
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_end_of_turn_and_stop_tokens(family):
    tokenizer = chat_tokenizers.build(family)
    spec = chat_tokenizers.FAMILIES[family]
    turn = tokenizer.convert_tokens_to_ids(spec["end_of_turn"])
    assert end_of_turn_id(tokenizer) == turn
    config = GenerationConfig(eos_token_id=tokenizer.convert_tokens_to_ids(spec["generation_eos"]))
    stops = stop_token_ids(tokenizer, config)
    assert (
        stops[0] == turn
        and set(stops) == {turn, tokenizer.eos_token_id, *config.eos_token_id}
        and len(stops) == len(set(stops))
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_an_unfinished_answer_has_no_end_of_turn(family):
    tokenizer = chat_tokenizers.build(family)
    ids = encode_response(tokenizer, ONE_TURN, "a b", complete=False)
    assert strings(tokenizer, ids) == list("a b")


def test_a_tokenizer_without_pad_token_gets_its_reserved_one(tmp_path):
    tokenizer = chat_tokenizers.build("llama3.1-instruct")
    assert tokenizer.pad_token is None  # as Llama-3.1-Instruct's
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == "<|finetune_right_pad_id|>" and loaded.chat_template == tokenizer.chat_template


def test_a_template_whose_prompt_is_not_a_prefix_names_the_row(tmp_path):
    tokenizer = chat_tokenizers.build("qwen2.5")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'bot: ' }}{% endif %}"
    )
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": USER_1, "chosen": ANSWER_1, "rejected": "a c b"}) + "\n")
    pairs, _ = load_preferences(path)
    with pytest.raises(DataError, match=f"{path}:1: the chat template failed: .*not, token by token, a prefix"):
        tokenize_preferences(pairs, tokenizer, 512, 1024)


@pytest.mark.parametrize("family", FAMILIES)
def test_offline_pairs_and_the_reward_model_read_the_same_ids(family, tmp_path):
    tokenizer = chat_tokenizers.build(family)
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps(
            {
                "chosen": TWO_TURNS + [{"role": "assistant", "content": ANSWER_2}],
                "rejected": TWO_TURNS + [{"role": "assistant", "content": "a b c"}],
            }
        )
        + "\n"
    )
    (pair,), _ = tokenize_preferences(load_preferences(path)[0], tokenizer, 512, 1024)
    assert pair.prompt_ids == encode_prompt(tokenizer, TWO_TURNS)  # the earlier turns stay in the prompt
    assert pair.chosen_ids == encode_response(tokenizer, TWO_TURNS, ANSWER_2)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    rm = RewardModel(LlamaForSequenceClassification(config).eval(), load_tokenizer_of(tokenizer, tmp_path))
    assert rm.encode([TWO_TURNS], [ANSWER_2]) == [pair.prompt_ids + pair.chosen_ids]


def load_tokenizer_of(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    return load_tokenizer(tmp_path / "tokenizer")
