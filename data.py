"""
Preference data: loading, chat templating, tokenization, batching.

What it does
- Loads preference rows from a .jsonl / .json / .parquet file, a directory of them, or a hub
  dataset id with a split (`HuggingFaceH4/ultrafeedback_binarized`, `train_prefs`), in either the
  UltraFeedback-binarized schema (`chosen` / `rejected` as [{role, content}] message lists, with
  `score_chosen` / `score_rejected`) or the plain schema (`prompt`, `chosen`, `rejected` strings).
  Earlier turns of a multi-turn conversation stay in the prompt.
- Tokenizes through the model's own chat template as TRL's DPO trainer does: prompt ids = the
  template with its generation prompt; response ids = the template's rendering of the whole
  conversation minus the prompt's ids (checked to be a prefix), so a response ends with what the
  template writes after an assistant turn; BOS exactly once (the template's, else the
  tokenizer's). Only response tokens are marked for the loss. Over-long prompts are dropped,
  over-long responses truncated, and both are counted. `end_of_turn_id` is the token generation
  stops on.
- Collates the sequences of a batch of prompts (offline chosen / rejected, and online chosen /
  rejected when present) into one right-padded batch with per-sequence response masks, so a single
  forward pass scores all of them.
- Splits a dataset into T consecutive chunks after a seeded shuffle (Algorithm 1's D_1..D_T).
The embedded toy task, whose data goes through this loader like real data, is toy.py.

Run
    python data.py                          # self-check: a row of each schema, parsed
    python data.py my_prefs.jsonl           # load a file, directory or hub id: its statistics
    python data.py HuggingFaceH4/ultrafeedback_binarized --split test_prefs
There is nothing distributed in this file: under torchrun every rank loads the same files and
takes its own share of each batch.

Deliberate simplifications
- Hub datasets are fetched file by file with huggingface_hub (no `datasets` dependency); parquet
  files need pyarrow, imported only when a parquet file is read.
- A response keeps everything the template writes after the turn (ChatML's newline after
  <|im_end|> included), as TRL does, while an online answer ends where generation stopped, at the
  end-of-turn token; the tests check prompt + response against the template's rendering of the
  whole conversation, token by token, for the toy tokenizer and for tokenizers carrying the real
  special tokens and templates of Llama-3.1-Tulu-3-8B-SFT, Qwen2.5 and Llama-3.1-Instruct.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """Bad input data. The message names the file, the line (or row) and the problem."""


# ----------------------------------------------------------------------------------------------
# Reading rows from files and the hub


def iter_rows(source: str | os.PathLike, split: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) for every row of `source`: a file, a directory, or a hub dataset id.

    `where` is "file:line" (jsonl), "file:item N" (json) or "file:row N" (parquet). A row that is
    not valid JSON is yielded as a DataError instead of a dict, so the caller decides whether to
    raise it or skip it; problems with a whole file (missing, unreadable) raise at once.
    """
    for path in resolve_files(source, split):
        if path.suffix == ".jsonl":
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, start=1):
                    where = f"{path}:{lineno}"
                    try:
                        line = raw.decode("utf-8").rstrip("\r\n")  # a cut line's error stays on its own line
                    except UnicodeDecodeError as err:
                        yield where, DataError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})")
                        continue
                    if not line.strip():
                        continue
                    try:
                        yield where, json.loads(line)
                    except json.JSONDecodeError as err:
                        # json's messages can end in "at" (their position follows): the column goes first
                        message = err.msg.removesuffix(" at")
                        yield where, DataError(f"{where}: invalid JSON at column {err.colno}: {message}")
        elif path.suffix == ".json":
            try:
                with open(path, encoding="utf-8") as f:
                    rows = json.load(f)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{err.lineno}: invalid JSON ({err.msg}); a .json file must hold one list of rows"
                ) from None
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not isinstance(rows, list):
                raise DataError(f"{path}: a .json file must hold a list of rows, got {type(rows).__name__}")
            for i, row in enumerate(rows, start=1):
                yield f"{path}:item {i}", row
        else:  # .parquet
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{path}: reading parquet files needs pyarrow (pip install pyarrow)") from None
            try:
                rows = pq.read_table(path).to_pylist()
            except Exception as err:  # pyarrow raises several types for a damaged file
                raise DataError(f"{path}: cannot read parquet file: {err}") from None
            for i, row in enumerate(rows, start=1):
                yield f"{path}:row {i}", row


def resolve_files(source: str | os.PathLike, split: str | None = None) -> list[Path]:
    """The data files behind `source`: the file itself, the files of a directory that belong to
    `split`, or the files of `split` downloaded from the hub dataset `source`."""
    path = Path(source)
    if path.is_file():
        if path.suffix not in DATA_EXTENSIONS:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {DATA_EXTENSIONS}")
        return [path]
    if path.is_dir():
        return split_files(path, split)
    looks_like_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(source)) and path.suffix not in DATA_EXTENSIONS
    if looks_like_hub_id:
        return split_files(download_hub_dataset(str(source), split), split)
    raise DataError(f"{source}: no such file or directory, and not a hub dataset id of the form owner/name")


def split_files(directory: Path, split: str | None) -> list[Path]:
    """Data files under `directory` that belong to `split`: named `<split>.ext` or `<split>-*.ext`
    (the hub's `data/train_prefs-00000-of-00001.parquet`), or inside a folder named `<split>`."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in DATA_EXTENSIONS)
    if split is not None:
        files = [
            p
            for p in files
            if p.stem == split or p.name.startswith(split + "-") or split in p.relative_to(directory).parts[:-1]
        ]
    if not files:
        found = sorted(p.name for p in directory.rglob("*") if p.is_file())[:20]
        raise DataError(f"{directory}: no {'/'.join(DATA_EXTENSIONS)} file for split {split!r}; found {found}")
    return files


def download_hub_dataset(repo_id: str, split: str | None) -> Path:
    """Download the files of one split of a hub dataset (cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download

    patterns = [f"*{split}*{ext}" for ext in DATA_EXTENSIONS] if split else [f"*{ext}" for ext in DATA_EXTENSIONS]
    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type="dataset", allow_patterns=patterns))
    except Exception as err:  # network, authentication, missing repository: all end the same way
        reason = " ".join(str(err).split())[:300]
        raise DataError(
            f"{repo_id}: the hub dataset (split {split!r}) cannot be downloaded ({reason}); pass a local file or "
            "directory instead, connect to the network, or set HF_HUB_OFFLINE=1 with it in the local cache"
        ) from None


# ----------------------------------------------------------------------------------------------
# Parsing and validating rows


@dataclass
class PreferencePair:
    prompt: list[dict]  # the conversation before the response; its last message is the user's
    chosen: str
    rejected: str
    score_chosen: float | None = None
    score_rejected: float | None = None
    prompt_id: str = ""
    where: str = ""  # file:line it came from, for error messages


@dataclass
class SFTExample:
    prompt: list[dict]
    response: str
    prompt_id: str = ""
    where: str = ""


def _check_messages(value: Any, key: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{key}' must be a non-empty list of {{role, content}} messages")
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise DataError(
                f"{where}: '{key}'[{i}] must be a {{'role': str, 'content': str}} message, got {message!r:.80}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _split_conversation(value: Any, key: str, where: str) -> tuple[list[dict], str]:
    """A response field as (earlier turns, response text): a plain string has no earlier turns; a
    message list must end with the assistant's message."""
    if isinstance(value, str):
        return [], value
    messages = _check_messages(value, key, where)
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message of '{key}' must have role 'assistant', got {messages[-1]['role']!r}"
        )
    return messages[:-1], messages[-1]["content"]


def _prompt_context(row: dict, where: str, earlier_turns: list[dict]) -> list[dict]:
    if earlier_turns:  # the conversation inside the message list is the full context
        prompt = earlier_turns
    elif "prompt" not in row:
        raise DataError(f"{where}: missing key 'prompt' (and the responses carry no earlier turns)")
    elif isinstance(row["prompt"], str):
        prompt = [{"role": "user", "content": row["prompt"]}]
    else:
        prompt = _check_messages(row["prompt"], "prompt", where)
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user message, got role {prompt[-1]['role']!r}")
    if not prompt[-1]["content"].strip():
        raise DataError(f"{where}: empty prompt")
    return prompt


def _prompt_id(row: dict, prompt: list[dict]) -> str:
    if isinstance(row.get("prompt_id"), str) and row["prompt_id"]:
        return row["prompt_id"]
    return hashlib.sha1(json.dumps(prompt, sort_keys=True).encode()).hexdigest()


def parse_preference_row(row: Any, where: str) -> PreferencePair:
    """Validate one preference row (UltraFeedback-binarized or plain schema)."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(f"{where}: missing key '{key}' (have {sorted(row)})")
        if not isinstance(row[key], (str, list)):
            raise DataError(f"{where}: '{key}' must be a string or a list of messages, got {type(row[key]).__name__}")
    chosen_turns, chosen = _split_conversation(row["chosen"], "chosen", where)
    rejected_turns, rejected = _split_conversation(row["rejected"], "rejected", where)
    if chosen_turns and rejected_turns and chosen_turns != rejected_turns:
        raise DataError(f"{where}: 'chosen' and 'rejected' have different earlier turns")
    prompt = _prompt_context(row, where, chosen_turns or rejected_turns)
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise DataError(f"{where}: empty '{key}' response")
    scores = {}
    for key in ("score_chosen", "score_rejected"):
        value = row.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise DataError(f"{where}: '{key}' must be a finite number, got {value!r:.40}")
        scores[key] = None if value is None else float(value)
    return PreferencePair(
        prompt, chosen, rejected, scores["score_chosen"], scores["score_rejected"], _prompt_id(row, prompt), where
    )


def parse_sft_row(row: Any, where: str) -> SFTExample:
    """Validate one SFT row: `messages` ending with the assistant's turn (UltraChat schema), or
    plain `prompt` and `completion` strings."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        turns, response = _split_conversation(_check_messages(row["messages"], "messages", where), "messages", where)
        if not turns:
            raise DataError(f"{where}: 'messages' holds only the assistant's turn; there is no prompt")
    elif "completion" in row:
        if not isinstance(row["completion"], str):
            raise DataError(f"{where}: 'completion' must be a string, got {type(row['completion']).__name__}")
        turns, response = [], row["completion"]
    else:
        raise DataError(f"{where}: an SFT row needs 'messages' or 'prompt' + 'completion' (have {sorted(row)})")
    prompt = _prompt_context(row, where, turns)
    if not response.strip():
        raise DataError(f"{where}: empty response")
    return SFTExample(prompt, response, _prompt_id(row, prompt), where)


@dataclass
class LoadStats:
    rows: int = 0  # rows kept
    bad_rows: int = 0  # rows skipped by skip_bad_rows
    bad_examples: list[str] = field(default_factory=list)  # the first few skipped rows' errors

    def summary(self) -> str:
        text = f"{self.rows} rows"
        if self.bad_rows:
            text += f", {self.bad_rows} bad rows skipped (first: {self.bad_examples[0]})"
        return text


def _load(parse, source, split, skip_bad_rows) -> tuple[list, LoadStats]:
    items, stats = [], LoadStats()
    for where, row in iter_rows(source, split):
        try:
            items.append(parse(row, where))
        except DataError as err:
            if not skip_bad_rows:
                raise
            stats.bad_rows += 1
            if len(stats.bad_examples) < 5:
                stats.bad_examples.append(str(err))
    stats.rows = len(items)
    if not items:
        raise DataError(f"{source} (split {split!r}): no usable rows ({stats.bad_rows} bad rows skipped)")
    return items, stats


def load_preferences(
    source: str | os.PathLike, split: str | None = None, skip_bad_rows: bool = False
) -> tuple[list[PreferencePair], LoadStats]:
    """Load preference pairs; a bad row raises DataError unless skip_bad_rows (then it is counted)."""
    return _load(parse_preference_row, source, split, skip_bad_rows)


def load_sft(
    source: str | os.PathLike, split: str | None = None, skip_bad_rows: bool = False
) -> tuple[list[SFTExample], LoadStats]:
    """Load SFT demonstrations; a bad row raises DataError unless skip_bad_rows."""
    return _load(parse_sft_row, source, split, skip_bad_rows)


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write rows as jsonl atomically (a temporary file, then rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(f.name, path)


# ----------------------------------------------------------------------------------------------
# Tokenization through the chat template


# Tokens a vocabulary may hold for padding, tried in order when the tokenizer names no pad token
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|endoftext|>", "<pad>")


def load_tokenizer(path: str | os.PathLike):
    """AutoTokenizer.from_pretrained with a pad token to batch with: its own, else a padding token
    its vocabulary reserves (Llama-3.1-Instruct has <|finetune_right_pad_id|> and no pad token),
    else EOS (then a reward model pools the token before a final EOS: give such a tokenizer a pad)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = next((t for t in PAD_CANDIDATES if t in vocab), tokenizer.eos_token)
    return tokenizer


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    """Token ids of rendered text, with BOS exactly once: the template's own when it writes one,
    else prepended when the tokenizer has one (Tulu 3's template does not write it), never twice."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the rendering holds the template's special tokens
    bos = tokenizer.bos_token_id
    return [bos] + ids if bos is not None and ids[:1] != [bos] else ids


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation so far through the model's chat template, ending with the
    assistant's generation prompt: what the policy, the reference, the reward model and the
    generator all read."""
    return _ids(tokenizer, _render(tokenizer, messages, True))


def encode_response(
    tokenizer, messages: list[dict], response: str, complete: bool = True, prompt_ids: list[int] | None = None
) -> list[int]:
    """Token ids of an assistant answer to `messages`, as TRL's DPO trainer takes them: the
    template's rendering of the conversation with the answer, minus the prompt's ids (checked to
    be a prefix), so the answer ends with whatever the template writes after a turn (EOS for
    Tulu, <|im_end|> and a newline for ChatML, <|eot_id|> for Llama-3 Instruct). An answer that
    is not complete (a generation cut at the length limit) gets no end of turn."""
    prompt_ids = encode_prompt(tokenizer, messages) if prompt_ids is None else prompt_ids
    if complete:
        full = _ids(tokenizer, _render(tokenizer, messages + [{"role": "assistant", "content": response}], False))
    else:
        full = _ids(tokenizer, _render(tokenizer, messages, True) + response)
    if full[: len(prompt_ids)] != prompt_ids:
        raise DataError(
            "the chat template's prompt with its generation prompt is not, token by token, a prefix of the "
            "conversation with the answer, so the answer's tokens cannot be cut off it"
        )
    return full[len(prompt_ids) :]


def _encode_pair_of(
    tokenizer, messages: list[dict], responses: list[str], where: str
) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, each response's ids), a template failure (roles that must alternate, an
    unsupported system turn, a prompt that is not a prefix, ...) reported at the row that caused it."""
    from jinja2 import TemplateError

    try:
        prompt_ids = encode_prompt(tokenizer, messages)
        return prompt_ids, [encode_response(tokenizer, messages, r, prompt_ids=prompt_ids) for r in responses]
    except (TemplateError, ValueError, TypeError, KeyError) as err:  # DataError is a ValueError
        if isinstance(err, DataError) and "has no chat template" in str(err):
            raise
        raise DataError(f"{where or 'a row'}: the chat template failed: {err}") from err


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn in the chat template (<|im_end|> for ChatML,
    <|eot_id|> for Llama-3 Instruct, EOS for Tulu 3 and the toy): generation stops on it."""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    special -= {
        tokenizer.unk_token_id,
        tokenizer.pad_token_id,
    }  # the probe's words may be unknown to a small vocabulary
    for token in encode_response(tokenizer, [{"role": "user", "content": "x"}], "y"):
        if token in special:
            return token
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"tokenizer {tokenizer.name_or_path!r}: its chat template ends a turn with no special token and it has no "
            "EOS"
        )
    return tokenizer.eos_token_id


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response tokens, ending with the template's end of turn unless truncated
    rejected_ids: list[int]
    index: int  # position in the loaded dataset, to join online pairs and meta-learner scores back
    prompt_id: str = ""
    online_chosen_ids: list[int] | None = None  # filled in by MetaAPO / online methods
    online_rejected_ids: list[int] | None = None


@dataclass
class TokenizedExample:
    prompt_ids: list[int]
    response_ids: list[int]
    index: int


@dataclass
class TokenizeStats:
    kept: int = 0
    dropped_long_prompt: int = 0  # prompt (with the generation prompt) longer than max_prompt_len
    dropped_identical: int = 0  # chosen == rejected after tokenization: no preference to learn
    truncated_responses: int = 0  # responses cut (losing EOS) to fit max_len

    def summary(self) -> str:
        return (
            f"{self.kept} kept, {self.dropped_long_prompt} dropped (prompt > max_prompt_len), {self.dropped_identical} "
            f"dropped (identical responses), {self.truncated_responses} responses truncated to max_len"
        )


def _check_lengths(max_prompt_len: int, max_len: int) -> None:
    if not 0 < max_prompt_len < max_len:
        raise ValueError(f"need 0 < max_prompt_len < max_len, got max_prompt_len={max_prompt_len}, max_len={max_len}")


def _fit(response_ids: list[int], room: int, stats) -> list[int]:
    if len(response_ids) > room:
        stats.truncated_responses += 1
        return response_ids[:room]
    return response_ids


def tokenize_preferences(
    pairs: list[PreferencePair], tokenizer, max_prompt_len: int, max_len: int, limit: int = 0
) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenize pairs through the chat template. `index` is the pair's position in `pairs`.
    limit > 0: stop once that many pairs are kept (the first `limit` usable ones; the statistics
    then count the rows read up to there)."""
    _check_lengths(max_prompt_len, max_len)
    out, stats = [], TokenizeStats()
    for index, pair in enumerate(pairs):
        if limit and len(out) == limit:
            break
        prompt_ids, (chosen, rejected) = _encode_pair_of(
            tokenizer, pair.prompt, [pair.chosen, pair.rejected], pair.where
        )
        if len(prompt_ids) > max_prompt_len:
            stats.dropped_long_prompt += 1
            continue
        room = max_len - len(prompt_ids)
        chosen, rejected = _fit(chosen, room, stats), _fit(rejected, room, stats)
        if chosen == rejected:
            stats.dropped_identical += 1
            continue
        out.append(TokenizedPair(prompt_ids, chosen, rejected, index, pair.prompt_id))
    stats.kept = len(out)
    return out, stats


def tokenize_sft(
    examples: list[SFTExample], tokenizer, max_prompt_len: int, max_len: int
) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize SFT demonstrations the same way as preference responses."""
    _check_lengths(max_prompt_len, max_len)
    out, stats = [], TokenizeStats()
    for index, example in enumerate(examples):
        prompt_ids, (response,) = _encode_pair_of(tokenizer, example.prompt, [example.response], example.where)
        if len(prompt_ids) > max_prompt_len:
            stats.dropped_long_prompt += 1
            continue
        out.append(TokenizedExample(prompt_ids, _fit(response, max_len - len(prompt_ids), stats), index))
    stats.kept = len(out)
    return out, stats


# ----------------------------------------------------------------------------------------------
# Batching


def collate_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad prompt+response sequences into one batch.

    Returns input_ids, attention_mask and response_mask, each (N, T). response_mask[i, t] = 1 where
    input_ids[i, t] is a response token, so its log-prob is read from the logits at position t-1.
    """
    assert len(prompts) == len(responses)
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    response_mask = torch.zeros((len(prompts), length), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, :n] = 1
        response_mask[i, len(p) : n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def collate_sft(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    return collate_sequences([e.prompt_ids for e in examples], [e.response_ids for e in examples], pad_id)


def collate_preferences(
    pairs: list[TokenizedPair], pad_id: int, online: bool = False, extra_roles: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """All sequences of a batch of B prompts in one concatenated batch, for one forward pass.

    Rows are ordered by role: [chosen x B, rejected x B] and, with online=True,
    [..., online chosen x B, online rejected x B], then each of `extra_roles` (attribute names of
    the pairs, e.g. SELM's own answer); so per-sequence log-probs of shape (n_roles * B,) reshape
    to (n_roles, B). `n_roles` is returned alongside the tensors.
    """
    roles = ["chosen_ids", "rejected_ids"]
    if online:
        missing = [p.index for p in pairs if p.online_chosen_ids is None or p.online_rejected_ids is None]
        if missing:
            raise ValueError(f"online=True but pairs {missing[:5]} have no online pair")
        roles += ["online_chosen_ids", "online_rejected_ids"]
    roles += list(extra_roles)
    prompts = [p.prompt_ids for _ in roles for p in pairs]
    responses = [getattr(p, role) for role in roles for p in pairs]
    batch = collate_sequences(prompts, responses, pad_id)
    batch["n_roles"] = len(roles)
    return batch


def split_into_slices(items: list, n_slices: int, seed: int) -> list[list]:
    """Shuffle with `seed`, then cut into `n_slices` consecutive slices of equal size (the first
    len(items) % n_slices slices hold one more item). Algorithm 1's D_1..D_T."""
    if n_slices < 1 or n_slices > len(items):
        raise ValueError(f"cannot split {len(items)} items into {n_slices} slices")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    size, extra = divmod(len(items), n_slices)
    slices, start = [], 0
    for k in range(n_slices):
        end = start + size + (1 if k < extra else 0)
        slices.append([items[i] for i in order[start:end]])
        start = end
    return slices


# ----------------------------------------------------------------------------------------------
# Self-check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help="a file, directory or hub id (default: two example rows)")
    parser.add_argument("--split", default=None, help="the split of a directory or hub dataset")
    args = parser.parse_args()
    if args.source is None:  # one row of each schema, as the loader reads them
        rows = [
            {"prompt": "ascending : b a", "chosen": "a b", "rejected": "b a"},
            {
                "chosen": [{"role": "user", "content": "descending : a c"}, {"role": "assistant", "content": "c a"}],
                "rejected": [{"role": "user", "content": "descending : a c"}, {"role": "assistant", "content": "a c"}],
                "score_chosen": 9.0,
                "score_rejected": 2.5,
            },
        ]
        with tempfile.TemporaryDirectory() as tmp:
            args.source = Path(tmp) / "pairs.jsonl"
            write_jsonl(args.source, rows)
            pairs, stats = load_preferences(args.source)
    else:
        pairs, stats = load_preferences(args.source, args.split)
    print(f"{args.source}: {stats.summary()}")
    for pair in pairs[:2]:
        print(f"  prompt {pair.prompt}\n  chosen {pair.chosen!r}\n  rejected {pair.rejected!r}")


if __name__ == "__main__":
    main()
