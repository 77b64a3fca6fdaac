"""data.py: loading both schemas, bad rows, tokenization through the chat template, truncation,
collation, chunking, the toy tokenizer and the toy task."""

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

import data
import toy
from data import (
    DataError,
    TokenizedPair,
    collate_preferences,
    collate_sequences,
    encode_prompt,
    encode_response,
    load_preferences,
    load_sft,
    split_into_slices,
    tokenize_preferences,
    tokenize_sft,
)
from toy import toy_gold_score


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def uf_row(prompt, chosen, rejected, **extra):
    """A row in the UltraFeedback-binarized schema."""
    return {
        "prompt": prompt,
        "prompt_id": extra.pop("prompt_id", f"id-{prompt}"),
        "chosen": [user(prompt), assistant(chosen)],
        "rejected": [user(prompt), assistant(rejected)],
        "messages": [user(prompt), assistant(chosen)],
        "score_chosen": 8.0,
        "score_rejected": 3.5,
        **extra,
    }


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The toy tokenizer after a save_pretrained / from_pretrained round trip."""
    path = tmp_path_factory.mktemp("tok")
    toy.build_toy_tokenizer().save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------
# Loading


def test_ultrafeedback_schema(tmp_path):
    path = write_lines(
        tmp_path / "uf.jsonl", [uf_row("ascending : b a", "a b", "b a"), uf_row("descending : c a", "c a", "a")]
    )
    pairs, stats = load_preferences(path)
    assert stats.rows == 2 and stats.bad_rows == 0
    first = pairs[0]
    assert first.prompt == [user("ascending : b a")]
    assert (first.chosen, first.rejected) == ("a b", "b a")
    assert (first.score_chosen, first.score_rejected) == (8.0, 3.5)
    assert first.prompt_id == "id-ascending : b a"
    assert first.where == f"{path}:1"


def test_plain_schema(tmp_path):
    path = write_lines(tmp_path / "plain.jsonl", [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}])
    (pair,), _ = load_preferences(path)
    assert pair.prompt == [user("What is 2+2?")]
    assert (pair.chosen, pair.rejected) == ("4", "5")
    assert pair.score_chosen is None and pair.prompt_id  # a stable id is derived from the prompt
    again, _ = load_preferences(path)
    assert again[0].prompt_id == pair.prompt_id


def test_conversational_prompt_list_with_single_message_responses(tmp_path):
    row = {
        "prompt": [{"role": "system", "content": "be brief"}, user("hi")],
        "chosen": [assistant("hello")],
        "rejected": [assistant("go away")],
    }
    (pair,), _ = load_preferences(write_lines(tmp_path / "conv.jsonl", [row]))
    assert pair.prompt == [{"role": "system", "content": "be brief"}, user("hi")]
    assert pair.chosen == "hello"


def test_multi_turn_keeps_earlier_turns_as_prompt(tmp_path):
    history = [user("first question"), assistant("first answer"), user("follow-up")]
    row = {
        "prompt": "first question",
        "chosen": history + [assistant("good")],
        "rejected": history + [assistant("bad")],
    }
    (pair,), _ = load_preferences(write_lines(tmp_path / "multi.jsonl", [row]))
    assert pair.prompt == history
    assert (pair.chosen, pair.rejected) == ("good", "bad")


def test_json_file_reads_like_jsonl(tmp_path):
    rows = [uf_row("ascending : b a", "a b", "b a"), {"prompt": "p", "chosen": "c", "rejected": "r"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    from_json, _ = load_preferences(tmp_path / "rows.json")
    from_jsonl, _ = load_preferences(write_lines(tmp_path / "rows.jsonl", rows))
    strip = lambda pairs: [(p.prompt, p.chosen, p.rejected, p.score_chosen, p.prompt_id) for p in pairs]  # noqa: E731
    assert strip(from_json) == strip(from_jsonl)
    assert from_json[1].where == f"{tmp_path / 'rows.json'}:item 2"


def test_blank_lines_are_ignored(tmp_path):
    path = write_lines(
        tmp_path / "gaps.jsonl",
        [uf_row("ascending : b a", "a b", "b a"), "", "   ", uf_row("ascending : c a", "a c", "c")],
    )
    pairs, _ = load_preferences(path)
    assert [p.where for p in pairs] == [f"{path}:1", f"{path}:4"]


def test_sft_rows(tmp_path):
    rows = [
        {"messages": [user("q1"), assistant("a1")]},
        {"prompt": "q2", "completion": "a2"},
        {"messages": [user("q3"), assistant("a3"), user("q4"), assistant("a4")]},
    ]
    examples, _ = load_sft(write_lines(tmp_path / "sft.jsonl", rows))
    assert [(e.prompt, e.response) for e in examples] == [
        ([user("q1")], "a1"),
        ([user("q2")], "a2"),
        ([user("q3"), assistant("a3"), user("q4")], "a4"),
    ]


BAD_ROWS = [
    ('{"prompt": "p", "chosen": "c", "rejected": ', "invalid JSON at column 44: Expecting value"),  # the line's end
    ('{"prompt": "p, "chosen"', "invalid JSON at column 17: Expecting ',' delimiter"),
    ('["a", "list"]', "expected a JSON object"),
    ({"prompt": "p", "chosen": "c"}, "missing key 'rejected'"),
    ({"chosen": "c", "rejected": "r"}, "missing key 'prompt'"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "'chosen' must be a string or a list of messages"),
    (
        {"prompt": "p", "chosen": [{"role": "assistant", "content": 3}], "rejected": "r"},
        "'chosen'[0] must be a {'role': str, 'content': str} message",
    ),
    ({"prompt": "p", "chosen": [user("p")], "rejected": "r"}, "last message of 'chosen' must have role 'assistant'"),
    ({"prompt": 5, "chosen": "c", "rejected": "r"}, "'prompt' must be a non-empty list"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "score_chosen": "high"}, "'score_chosen' must be a finite number"),
    ({"prompt": "   ", "chosen": "c", "rejected": "r"}, "empty prompt"),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "empty 'chosen' response"),
    ({"prompt": "p", "chosen": "c", "rejected": " \n"}, "empty 'rejected' response"),
    ({"chosen": [user("a"), assistant("c")], "rejected": [user("b"), assistant("r")]}, "different earlier turns"),
    ({"prompt": [user("p"), assistant("x")], "chosen": "c", "rejected": "r"}, "must end with a user message"),
]


@pytest.mark.parametrize("bad, problem", BAD_ROWS, ids=[problem for _, problem in BAD_ROWS])
def test_bad_row_error_names_file_line_and_problem(tmp_path, bad, problem):
    path = write_lines(
        tmp_path / "bad.jsonl", [uf_row("ascending : b a", "a b", "b a"), bad, uf_row("ascending : c a", "a c", "c")]
    )
    with pytest.raises(DataError) as err:
        load_preferences(path)
    assert str(err.value).startswith(f"{path}:2: ")
    assert problem in str(err.value)


def test_json_errors_name_the_column_first(tmp_path):
    """json's message "Unterminated string starting at" expects its position after it: the column
    goes first, so the error never reads "... starting at at column 27"."""
    path = tmp_path / "cut.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c')  # a last line cut mid-string, as a full disk leaves it
    ((where, error),) = list(data.iter_rows(path))
    assert str(error) == f"{path}:1: invalid JSON at column 27: Unterminated string starting"


def test_skip_bad_rows_skips_and_counts(tmp_path):
    lines = (
        [uf_row("ascending : b a", "a b", "b a")]
        + [bad for bad, _ in BAD_ROWS]
        + [uf_row("ascending : c a", "a c", "c")]
    )
    pairs, stats = load_preferences(write_lines(tmp_path / "bad.jsonl", lines), skip_bad_rows=True)
    assert [p.chosen for p in pairs] == ["a b", "a c"]
    assert stats.rows == 2 and stats.bad_rows == len(BAD_ROWS)
    assert "invalid JSON" in stats.bad_examples[0] and "bad rows skipped" in stats.summary()


def test_only_bad_rows_is_an_error_even_when_skipping(tmp_path):
    with pytest.raises(DataError, match="no usable rows"):
        load_preferences(write_lines(tmp_path / "bad.jsonl", ["{oops", {"prompt": "p"}]), skip_bad_rows=True)


def test_bad_sft_rows(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", [{"messages": [assistant("only an answer")]}])
    with pytest.raises(DataError, match=f"{path}:1: 'messages' holds only the assistant's turn"):
        load_sft(path)
    path = write_lines(tmp_path / "sft2.jsonl", [{"text": "no schema"}])
    with pytest.raises(DataError, match="an SFT row needs 'messages' or 'prompt' \\+ 'completion'"):
        load_sft(path)


def test_invalid_utf8_line_is_a_bad_row(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(uf_row("ascending : b a", "a b", "b a")).encode() + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=f"{path}:2: not valid UTF-8"):
        load_preferences(path)
    pairs, stats = load_preferences(path, skip_bad_rows=True)
    assert len(pairs) == 1 and stats.bad_rows == 1


def test_whole_file_problems(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such file or directory"):
        load_preferences(tmp_path / "missing.jsonl")
    monkeypatch.chdir(tmp_path)  # a relative path with a typo is not mistaken for a hub dataset id
    with pytest.raises(DataError, match="missing/file.jsonl: no such file or directory"):
        load_preferences("missing/file.jsonl")
    (tmp_path / "rows.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_preferences(tmp_path / "rows.csv")
    (tmp_path / "broken.json").write_text('[{"prompt": "p",\n "chosen": }]')
    with pytest.raises(DataError, match=f"{tmp_path / 'broken.json'}:2: invalid JSON"):
        load_preferences(tmp_path / "broken.json")
    (tmp_path / "object.json").write_text('{"prompt": "p"}')
    with pytest.raises(DataError, match="must hold a list of rows"):
        load_preferences(tmp_path / "object.json")


def test_directory_selects_the_split(tmp_path):
    (tmp_path / "data").mkdir()
    write_lines(tmp_path / "data" / "train_prefs-00000-of-00002.jsonl", [uf_row("ascending : b a", "a b", "b a")])
    write_lines(tmp_path / "data" / "train_prefs-00001-of-00002.jsonl", [uf_row("ascending : c a", "a c", "c")])
    write_lines(tmp_path / "data" / "test_prefs-00000-of-00001.jsonl", [uf_row("ascending : d a", "a d", "d")])
    train, _ = load_preferences(tmp_path, "train_prefs")
    test, _ = load_preferences(tmp_path, "test_prefs")
    assert [p.chosen for p in train] == ["a b", "a c"] and [p.chosen for p in test] == ["a d"]
    with pytest.raises(DataError, match="no .* file for split 'validation'"):
        load_preferences(tmp_path, "validation")


def test_hub_dataset_goes_through_snapshot_download(tmp_path, monkeypatch):
    """The hub path with huggingface_hub's download replaced by a local folder (no network here)."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, repo_type, allow_patterns):
        calls.append((repo_id, repo_type, allow_patterns))
        (tmp_path / "data").mkdir(exist_ok=True)
        write_lines(tmp_path / "data" / "train_prefs-00000-of-00001.jsonl", [uf_row("ascending : b a", "a b", "b a")])
        write_lines(tmp_path / "data" / "test_prefs-00000-of-00001.jsonl", [uf_row("ascending : c a", "a c", "c")])
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    pairs, _ = load_preferences("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")
    assert [p.chosen for p in pairs] == ["a b"]
    repo_id, repo_type, patterns = calls[0]
    assert (repo_id, repo_type) == ("HuggingFaceH4/ultrafeedback_binarized", "dataset")
    assert all("train_prefs" in pattern for pattern in patterns)

    def failing_download(**kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing_download)
    with pytest.raises(
        DataError,
        match=r"owner/name: the hub dataset \(split 'train'\) cannot be downloaded \(network unreachable\); pass a "
        "local file or directory instead, connect to the network, or set HF_HUB_OFFLINE=1",
    ):
        load_preferences("owner/name", "train")


def test_parquet_needs_pyarrow_or_reads_rows(tmp_path):
    path = tmp_path / "rows.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(DataError, match="needs pyarrow"):
            load_preferences(path)
        return
    pq.write_table(pa.Table.from_pylist([uf_row("ascending : b a", "a b", "b a")]), path)
    (pair,), _ = load_preferences(path)
    assert pair.chosen == "a b" and pair.where == f"{path}:row 1"


# ---------------------------------------------------------------------------------------------
# Tokenization


def test_tokenizer_round_trip(tokenizer):
    built = toy.build_toy_tokenizer()
    text = "<|user|> descending : j a e <|assistant|> j e a <eos>"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == built(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(tokenizer("c , f , h")["input_ids"]) == "c , f , h"
    assert tokenizer.chat_template == toy.TOY_CHAT_TEMPLATE
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "<eos>", "<unk>")
    assert len(tokenizer) == len(toy.TOY_SPECIAL_TOKENS) + len(toy.TOY_TASKS) + len(toy.TOY_STYLE_TOKENS) + len(
        toy.TOY_LETTERS
    )
    assert tokenizer.convert_ids_to_tokens(tokenizer("zebra")["input_ids"]) == ["<unk>"]


def test_prompt_and_response_match_the_chat_template(tokenizer):
    conversation = [user("ascending : c a b"), assistant("a b"), user("descending : c a b")]
    prompt_ids = encode_prompt(tokenizer, conversation)
    response_ids = encode_response(tokenizer, conversation, "c b a")
    full = tokenizer.apply_chat_template(conversation + [assistant("c b a")], tokenize=False)
    assert prompt_ids + response_ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(prompt_ids)[-1] == "<|assistant|>"
    assert response_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response_ids, skip_special_tokens=True) == "c b a"


def test_response_mask_covers_exactly_the_response_and_eos(tokenizer, tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl", [uf_row("ascending : c a b", "a b c", "a b"), uf_row("descending : a b", "b a", "a b")]
    )
    pairs, _ = load_preferences(path)
    tokenized, stats = tokenize_preferences(pairs, tokenizer, max_prompt_len=16, max_len=40)
    assert stats.kept == 2 and stats.truncated_responses == 0
    batch = collate_preferences(tokenized, tokenizer.pad_token_id)
    assert batch["n_roles"] == 2 and batch["input_ids"].shape[0] == 4
    for row in range(4):
        ids, mask = batch["input_ids"][row], batch["response_mask"][row]
        tokens = tokenizer.convert_ids_to_tokens(ids[mask].tolist())
        assert tokens[-1] == "<eos>"
        before = tokenizer.convert_ids_to_tokens(ids[: int(mask.nonzero()[0])].tolist())
        assert before[-1] == "<|assistant|>" and "<eos>" not in before
    # row order is [chosen x B, rejected x B]
    assert tokenizer.decode(batch["input_ids"][0][batch["response_mask"][0]], skip_special_tokens=True) == "a b c"
    assert tokenizer.decode(batch["input_ids"][2][batch["response_mask"][2]], skip_special_tokens=True) == "a b"


def test_long_prompts_dropped_and_long_responses_truncated(tokenizer, tmp_path):
    rows = [
        uf_row("ascending : a b", "a b", "b a"),  # prompt 6 tokens, responses 3 tokens
        uf_row("ascending : f a b c d e", "a b c d e f", "a b"),  # prompt 10 tokens
        uf_row("descending : a b c", "c , b , a", "c b a"),
    ]  # prompt 7, chosen 6 tokens
    pairs, _ = load_preferences(write_lines(tmp_path / "p.jsonl", rows))
    tokenized, stats = tokenize_preferences(pairs, tokenizer, max_prompt_len=8, max_len=12)
    assert stats.dropped_long_prompt == 1 and stats.kept == 2
    assert stats.truncated_responses == 1  # "c , b , a <eos>" needs 6 > 12 - 7
    long = tokenized[1]
    assert long.index == 2
    assert len(long.prompt_ids) + len(long.chosen_ids) == 12
    assert long.chosen_ids[-1] != tokenizer.eos_token_id  # truncation loses EOS
    assert long.rejected_ids[-1] == tokenizer.eos_token_id
    assert "1 dropped (prompt > max_prompt_len)" in stats.summary()
    with pytest.raises(ValueError, match="max_prompt_len < max_len"):
        tokenize_preferences(pairs, tokenizer, max_prompt_len=12, max_len=12)


def test_a_limit_keeps_the_first_usable_pairs_and_reads_no_further(tokenizer, tmp_path):
    """--max_train_pairs: the first N usable pairs, the same as the first N of all of them, without
    tokenizing the rest of the data (the statistics count the rows read)."""
    rows = [uf_row("ascending : f a b c d e", "a b c d e f", "a b")] + [
        uf_row(f"ascending : {a} {b}", f"{b} {a}", f"{a} {b}") for a, b in ("ba", "dc", "fe", "hg")
    ]
    pairs, _ = load_preferences(write_lines(tmp_path / "p.jsonl", rows))
    every, _ = tokenize_preferences(pairs, tokenizer, max_prompt_len=8, max_len=12)
    first, stats = tokenize_preferences(pairs, tokenizer, max_prompt_len=8, max_len=12, limit=2)
    assert first == every[:2] and [p.index for p in first] == [1, 2]
    assert stats.kept == 2 and stats.dropped_long_prompt == 1  # rows 0-2 read, 3 and 4 not


def test_pairs_identical_after_truncation_are_dropped(tokenizer, tmp_path):
    pairs, _ = load_preferences(write_lines(tmp_path / "p.jsonl", [uf_row("ascending : b a", "a b", "a b c")]))
    tokenized, stats = tokenize_preferences(
        pairs, tokenizer, max_prompt_len=7, max_len=8
    )  # prompt 6 tokens: room for 2
    assert tokenized == [] and stats.dropped_identical == 1


def test_tokenize_sft(tokenizer, tmp_path):
    examples, _ = load_sft(
        write_lines(tmp_path / "s.jsonl", [{"messages": [user("ascending : b a"), assistant("a b")]}])
    )
    (tokenized,), stats = tokenize_sft(examples, tokenizer, max_prompt_len=8, max_len=16)
    assert tokenizer.decode(tokenized.response_ids) == "a b <eos>" and stats.kept == 1
    batch = data.collate_sft([tokenized], tokenizer.pad_token_id)
    assert batch["response_mask"].sum() == 3


def test_tokenizer_without_chat_template_is_a_clear_error(tokenizer):
    bare = toy.build_toy_tokenizer()
    bare.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        encode_prompt(bare, [user("ascending : a b")])


def test_chat_template_failure_names_the_row(tmp_path):
    strict = toy.build_toy_tokenizer()
    strict.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system turn must come first') }}{% endif %}"
    )
    path = write_lines(tmp_path / "p.jsonl", [uf_row("ascending : b a", "a b", "b a")])
    pairs, _ = load_preferences(path)
    with pytest.raises(
        DataError, match=f"{tmp_path / 'p.jsonl'}:1: the chat template failed: a system turn must come first"
    ):
        tokenize_preferences(pairs, strict, max_prompt_len=8, max_len=16)
    examples, _ = load_sft(
        write_lines(tmp_path / "s.jsonl", [{"messages": [user("ascending : b a"), assistant("a b")]}])
    )
    with pytest.raises(DataError, match="s.jsonl:1: the chat template failed"):
        tokenize_sft(examples, strict, max_prompt_len=8, max_len=16)


# ---------------------------------------------------------------------------------------------
# Collation


def test_collate_sequences_right_pads():
    batch = collate_sequences([[5, 6], [7]], [[8, 9, 2], [2]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 8, 9, 2], [7, 2, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert batch["response_mask"].dtype == torch.bool


def test_collate_with_online_pairs_orders_roles():
    pairs = [
        TokenizedPair([1, 1], [10], [11], 0, online_chosen_ids=[12], online_rejected_ids=[13]),
        TokenizedPair([1], [20], [21], 1, online_chosen_ids=[22, 22], online_rejected_ids=[23]),
    ]
    batch = collate_preferences(pairs, pad_id=0, online=True)
    assert batch["n_roles"] == 4 and batch["input_ids"].shape == (8, 3)
    responses = [row[mask].tolist() for row, mask in zip(batch["input_ids"], batch["response_mask"])]
    assert responses == [[10], [20], [11], [21], [12], [22, 22], [13], [23]]
    pairs[1].online_rejected_ids = None
    with pytest.raises(ValueError, match="have no online pair"):
        collate_preferences(pairs, pad_id=0, online=True)


# ---------------------------------------------------------------------------------------------
# Chunking


def test_split_into_slices_is_a_seeded_partition():
    items = list(range(100))
    slices = split_into_slices(items, 3, seed=7)
    assert [len(c) for c in slices] == [34, 33, 33]
    assert sorted(x for c in slices for x in c) == items
    assert slices == split_into_slices(items, 3, seed=7)
    assert slices != split_into_slices(items, 3, seed=8)
    assert slices[0] != items[:34]  # shuffled
    flat = [x for c in slices for x in c]  # consecutive pieces of one shuffled order
    assert split_into_slices(items, 1, seed=7) == [flat]
    with pytest.raises(ValueError):
        split_into_slices(items[:2], 3, seed=0)


# ---------------------------------------------------------------------------------------------
# The toy task

SMALL = {"sft": 300, "train_prefs": 400, "test_prefs": 50}


def test_toy_rows_are_deterministic_for_a_seed():
    assert toy.make_toy_rows(3, SMALL) == toy.make_toy_rows(3, SMALL)
    assert toy.make_toy_rows(3, SMALL) != toy.make_toy_rows(4, SMALL)


def test_toy_assets_build_once_and_load_through_the_normal_paths(tmp_path):
    assets = toy.ensure_toy_assets(seed=1, out_dir=tmp_path, sizes=SMALL)
    assert assets.root == tmp_path / "seed1"
    built_at = os.path.getmtime(assets.train_prefs)
    assert toy.ensure_toy_assets(seed=1, out_dir=tmp_path, sizes=SMALL) == assets
    assert os.path.getmtime(assets.train_prefs) == built_at  # cached, not rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary build left

    sft, _ = load_sft(assets.sft)
    train, _ = load_preferences(assets.train_prefs)
    test, _ = load_preferences(assets.test_prefs)
    assert (len(sft), len(train), len(test)) == (300, 400, 50)
    prompts = [e.prompt[-1]["content"] for e in sft] + [p.prompt[-1]["content"] for p in train + test]
    assert len(set(prompts)) == len(prompts)  # no prompt shared between splits

    tokenizer = AutoTokenizer.from_pretrained(assets.base)
    config = AutoConfig.from_pretrained(assets.base)
    assert config.model_type == "llama" and config.vocab_size >= len(tokenizer)
    assert config.pad_token_id == tokenizer.pad_token_id and config.eos_token_id == tokenizer.eos_token_id
    model = LlamaForCausalLM(config)
    assert 3e5 < sum(p.numel() for p in model.parameters()) < 2e6
    pair, _ = tokenize_preferences(train[:4], tokenizer, max_prompt_len=16, max_len=40)
    batch = collate_preferences(pair, tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (*batch["input_ids"].shape, config.vocab_size)


def test_toy_assets_identical_across_builds_and_rebuilt_when_stale(tmp_path):
    a = toy.ensure_toy_assets(seed=2, out_dir=tmp_path / "a", sizes=SMALL)
    b = toy.ensure_toy_assets(seed=2, out_dir=tmp_path / "b", sizes=SMALL)
    for name in ("sft.jsonl", "train_prefs.jsonl", "test_prefs.jsonl", "base/tokenizer.json", "base/config.json"):
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes(), name
    manifest = json.loads((a.root / "manifest.json").read_text())
    manifest["code_sha1"] = "an older version"
    (a.root / "manifest.json").write_text(json.dumps(manifest))
    (a.root / "train_prefs.jsonl").write_text("stale\n")
    toy.ensure_toy_assets(seed=2, out_dir=tmp_path / "a", sizes=SMALL)
    assert (a.root / "train_prefs.jsonl").read_bytes() == (b.root / "train_prefs.jsonl").read_bytes()


def test_toy_task_has_the_properties_of_the_real_setting():
    rows = toy.make_toy_rows(0, {"sft": 2000, "train_prefs": 2000})

    def letters(text):
        return [w for w in text.split() if w in toy.TOY_LETTERS]

    # SFT demonstrations: plain style only, well below the ceiling, with two habits: mostly wrong on
    # long lists (the last letter left out) and on descending prompts (sorted ascending).
    sft = [(r["prompt"], r["messages"][1]["content"]) for r in rows["sft"]]
    assert all(all(w in toy.TOY_LETTERS for w in answer.split()) for _, answer in sft)
    gold = [toy_gold_score(prompt, answer) for prompt, answer in sft]
    assert 5.5 < sum(gold) / len(gold) < 7.5
    long = [(p, a) for p, a in sft if len(toy.toy_parse_prompt(p)[1]) >= toy.TOY_LONG_LIST]
    forgot = sum(
        letters(a) in (sorted(toy.toy_parse_prompt(p)[1])[:-1], sorted(toy.toy_parse_prompt(p)[1], reverse=True)[:-1])
        for p, a in long
    )
    assert forgot / len(long) > 0.5
    descending = [letters(a) for p, a in sft if p.startswith("descending")]
    assert sum(len(a) > 1 and a == sorted(a) for a in descending) / len(descending) > 0.5

    # Offline pairs: mostly other styles than the SFT data, noisy labels that are still mostly right,
    # and the wrong sorting direction among the mistakes the pairs teach.
    prefs = rows["train_prefs"]
    styled = sum(any(t in r["chosen"][1]["content"].split() for t in toy.TOY_STYLE_TOKENS) for r in prefs)
    assert 0.65 < styled / len(prefs) < 0.85
    wrong_way = [
        r
        for r in prefs
        if r["prompt"].startswith("descending")
        and (lambda a: len(a) > 1 and a == sorted(a))(letters(r["rejected"][1]["content"]))
    ]
    assert len(wrong_way) / len(prefs) > 0.05
    better = [
        toy_gold_score(r["prompt"], r["chosen"][1]["content"])
        - toy_gold_score(r["prompt"], r["rejected"][1]["content"])
        for r in prefs
    ]
    assert sum(b > 0 for b in better) / len(prefs) > 0.8
    assert 0.03 < sum(b < 0 for b in better) / len(prefs) < 0.15  # some labels prefer the worse answer
    assert all(r["score_chosen"] > r["score_rejected"] for r in prefs)
    assert all(r["chosen"][1]["content"] != r["rejected"][1]["content"] for r in prefs)
