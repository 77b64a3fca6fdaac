"""
Preference data: loading, chat templating, tokenization, batching, and the embedded toy task.

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
- Builds the embedded toy task (see "The toy task" below), cached under `out/toy/seed<N>/`.

Run
    python data.py                 # self-check: builds the toy task, prints sizes, one tokenized
                                   # example with its response mask, and length statistics
    python data.py --seed 1        # the same for another seed
There is nothing distributed in this file: under torchrun every rank loads the same files (rank 0
builds the toy assets first; see train.py) and takes its own share of each batch.

The toy task
    A prompt asks to sort 3-6 distinct letters from a-j: "ascending : f c h" -> "c f h",
    "descending : b e a d" -> "e d b a". The gold judge (toy_gold_score, below) reads the letters
    of a response in order, ignores punctuation and phrasing, and scores
    10 * (1 - edit distance to the correct answer / its length), minus a penalty for foreign
    tokens, on UltraFeedback's 0-10 scale. Answers are written by "writers": rule-based noisy
    solvers with their own rates and kinds of mistakes (data.toy_mistake lists them).
    Why it mimics the real setting (SPEC section 7); the numbers are seed 0's, measured with
    `python data.py` and the default `python train.py`:
    - SFT is well below the ceiling, and not only by sampling noise: the SFT demonstrations come
      from a teacher that answers in the plain style ("c f h"), makes random mistakes (neighbours
      swapped, stopping early) and has two habits: on lists of 5 or more letters it usually leaves
      out the last one, and it usually sorts descending prompts ascending. A policy that imitates
      it has systematic gaps that even its most likely answer shows: the demonstrations score 6.5
      (8.6 on ascending prompts, 4.4 on descending ones), and so does the SFT model.
    - The offline pairs come from other generators: four offline writers answer every training
      prompt in one shared style drawn per prompt, three of the four never used by the SFT
      teacher ("c , f , h", "[ c f h ]", "answer : c f h"; plain otherwise), with every kind of
      mistake, sorting the wrong way and hallucinated or substituted letters included, like
      UltraFeedback's completions from a pool of other models. The SFT model gives them far lower
      likelihood than its own samples: -5.2 nats per token for offline chosen answers (-6.9 in the
      other styles, -0.6 in the plain one) against -0.3 for its own samples.
    - The labels are noisy like AI-judge labels: the four answers are rated by the gold judge plus
      Gaussian noise (std 2), rounded to halves; chosen is the best rated, rejected a random one
      of the lower-rated rest (UltraFeedback's binarization). About 85% of the pairs agree with the
      gold judge, 8% are gold ties and 6.5% prefer the worse answer.
    - The annotating reward model is learned from these pairs (train.py --method rm): 0.75
      preference accuracy on the held-out pairs. On the DPO warm-up's own answers it agrees with
      the gold judge on 84% of the pairs the two tell apart, and its favourite of 4 answers scores
      9.2 where their mean is 8.2 (`evaluate.py --plots`, held-out table); but it barely tells a
      duplicated or hallucinated letter in the plain style from a correct answer, so online
      training can over-optimise it (measured, not hidden: that agreement falls to about two
      thirds as MetaAPO's policy moves). Evaluation uses the gold judge, the stand-in for the
      GPT-4o judge.
    - The tokenizer is a word-level `tokenizers` model wrapped as a PreTrainedTokenizerFast with a
      chat template and saved with save_pretrained; the model config is a tiny LlamaConfig
      (~0.6M parameters); the data is written as UltraFeedback-binarized jsonl and read back
      through the normal loader.
    - Everything is a function of the seed (Python's `random.Random`, no global state).
    The design was settled by measuring it (SFT, reward model, DPO and online rounds on this
    machine): with repeated letters or variable-length copy/reverse tasks the learned reward model
    could not tell right from wrong on the policy's own answers, and online training collapsed; a
    reward model trained on offline styles alone, or on pairs that seldom sort the wrong way,
    misjudged the SFT model's plain-style, wrong-way answers, and online training followed it.

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
import shutil
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
                        line = raw.decode("utf-8")
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


def split_into_chunks(items: list, n_chunks: int, seed: int) -> list[list]:
    """Shuffle with `seed`, then cut into `n_chunks` consecutive chunks of equal size (the first
    len(items) % n_chunks chunks hold one more item). Algorithm 1's D_1..D_T."""
    if n_chunks < 1 or n_chunks > len(items):
        raise ValueError(f"cannot split {len(items)} items into {n_chunks} chunks")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    size, extra = divmod(len(items), n_chunks)
    chunks, start = [], 0
    for c in range(n_chunks):
        end = start + size + (1 if c < extra else 0)
        chunks.append([items[i] for i in order[start:end]])
        start = end
    return chunks


# ==============================================================================================
# THE EMBEDDED TOY TASK (SPEC section 7; the module docstring describes it). Everything from here to
# the self-check defines it: prompts, the writers of its answers, its gold judge, the dataset, the
# tokenizer and the model config. The real-data code above never depends on it.
# ==============================================================================================

TOY_LETTERS = tuple("abcdefghij")
TOY_TASKS = ("ascending", "descending")
TOY_MIN_LETTERS, TOY_MAX_LETTERS = 3, 6  # distinct letters per prompt
TOY_LONG_LIST = 5  # lists this long trigger the SFT teacher's habit
TOY_OFFLINE_STYLES = ("plain", "comma", "bracket", "lead")
# Tokens a response may use besides letters; the gold judge ignores them.
TOY_STYLE_TOKENS = (",", "[", "]", "answer", ":")
TOY_SIZES = {"sft": 4000, "train_prefs": 6000, "test_prefs": 512}  # rows per split
TOY_LABEL_NOISE = 2.0  # std of the Gaussian noise added to gold scores when rating offline answers


def toy_prompt(task: str, letters: list[str]) -> str:
    return f"{task} : {' '.join(letters)}"


def toy_parse_prompt(prompt: str) -> tuple[str, list[str]]:
    """(task, letters) of a toy prompt; ValueError when `prompt` is not one."""
    words = prompt.split()
    if len(words) < 3 or words[0] not in TOY_TASKS or words[1] != ":" or any(w not in TOY_LETTERS for w in words[2:]):
        raise ValueError(f"not a toy prompt: {prompt!r}")
    return words[0], words[2:]


def toy_solve(task: str, letters: list[str]) -> list[str]:
    """The correct answer's letters: the prompt's letters sorted in the asked direction."""
    if task not in TOY_TASKS:
        raise ValueError(f"unknown toy task {task!r}")
    return sorted(letters, reverse=task == "descending")


def toy_render(letters: list[str], style: str) -> str:
    """Write an answer's letters in one of the surface styles."""
    if style == "plain":
        return " ".join(letters)
    if style == "comma":
        return " , ".join(letters)
    if style == "bracket":
        return "[ " + " ".join(letters) + " ]"
    if style == "lead":
        return "answer : " + " ".join(letters)
    raise ValueError(f"unknown style {style!r}")


def toy_mistake(kind: str, task: str, letters: list[str], answer: list[str], rng: random.Random) -> list[str]:
    """Apply one kind of mistake to an answer; returns a new list.

    swap: two neighbours exchanged. dup: a letter written twice. drop: a letter left out.
    stop: the answer ends early. last: the last letter left out (the SFT teacher's habit on long
    lists). reverse: sorted the wrong way. copy: the letters left unsorted.
    extra: a letter that is not in the prompt inserted where it would sort (a hallucinated item).
    sub: a letter replaced by one that is not in the prompt (a wrong item).
    """
    out = list(answer)
    n = len(out)
    absent = [c for c in TOY_LETTERS if c not in letters]
    if kind == "swap" and n >= 2:
        i = rng.randrange(n - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    elif kind == "dup":
        i = rng.randrange(n)
        out.insert(i, out[i])
    elif kind == "drop" and n >= 2:
        del out[rng.randrange(n)]
    elif kind == "stop" and n >= 2:
        out = out[: rng.randrange(1, n)]
    elif kind == "last" and n >= 2:
        out = out[:-1]
    elif kind == "reverse":
        out = out[::-1]
    elif kind == "copy":
        out = list(letters)
    elif kind == "extra" and absent:
        out = sorted(out + [rng.choice(absent)], reverse=task == "descending")
    elif kind == "sub" and absent:
        out[rng.randrange(n)] = rng.choice(absent)
    return out


@dataclass(frozen=True)
class ToyWriter:
    """A rule-based noisy solver standing in for one LLM: how often it errs, which mistakes it
    makes (drawn uniformly), and a systematic habit on long lists."""

    name: str
    error_rate: float  # probability that an answer holds a mistake
    mistakes: tuple[str, ...]
    second_mistake: float = 0.0  # probability that an erroneous answer holds a second mistake
    forgets_last: float = 0.0  # probability of leaving out the last letter of a long list
    sorts_ascending: float = 0.0  # probability of sorting a descending prompt ascending (the wrong way)

    def write(self, task: str, letters: list[str], style: str, rng: random.Random) -> str:
        answer = toy_solve(
            "ascending" if task == "descending" and rng.random() < self.sorts_ascending else task, letters
        )
        if len(letters) >= TOY_LONG_LIST and rng.random() < self.forgets_last:
            answer = toy_mistake("last", task, letters, answer, rng)
        elif rng.random() < self.error_rate:
            answer = toy_mistake(rng.choice(self.mistakes), task, letters, answer, rng)
            if rng.random() < self.second_mistake:
                answer = toy_mistake(rng.choice(self.mistakes), task, letters, answer, rng)
        return toy_render(answer, style)


TOY_ALL_MISTAKES = ("swap", "dup", "drop", "stop", "reverse", "copy", "extra", "extra", "sub", "sub")
# The SFT teacher always answers in the plain style; its mistakes are the ones the policy inherits.
# Two habits are more likely than not: it leaves out the last letter of long lists, and it sorts
# descending prompts ascending. So the SFT policy's most likely answer to a long list or a
# descending prompt is wrong: a systematic gap, not just sampling noise, with room to improve
# (the teacher scores about 6.6 of 10 under the gold judge: 8.6 on ascending, 4.5 on descending).
TOY_SFT_TEACHER = ToyWriter("teacher", 0.25, ("swap", "stop"), forgets_last=0.55, sorts_ascending=0.6)
# The offline writers (UltraFeedback's pool of other models) answer a prompt in one shared style,
# drawn per prompt, and make every kind of mistake at their own rates.
TOY_OFFLINE_WRITERS = (
    ToyWriter("strong", 0.4, TOY_ALL_MISTAKES, sorts_ascending=0.05),
    ToyWriter("medium", 0.6, TOY_ALL_MISTAKES, sorts_ascending=0.2),
    ToyWriter("weak", 0.8, TOY_ALL_MISTAKES, second_mistake=0.5, sorts_ascending=0.5),
    ToyWriter("average", 0.6, TOY_ALL_MISTAKES, sorts_ascending=0.2),
)


# The gold judge: the stand-in for the paper's GPT-4o judge, rating offline answers (with noise) and evaluating
TOY_FOREIGN_TOKEN_PENALTY = 2.0  # gold points lost per token that is neither a letter nor punctuation


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance between two sequences (insertions, deletions, substitutions)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def toy_gold_score(prompt: str, response: str) -> float:
    """The toy task's gold judge, on UltraFeedback's 0-10 scale.

    Reads the letters of the response in order, ignoring the punctuation and phrasing of the
    writers' styles (",", "[", "]", "answer", ":"), and scores
        10 * max(0, 1 - edit_distance(letters, correct answer) / len(correct answer))
    minus 2 points per foreign token (a task word or anything else that is not part of an answer),
    floored at 0. A correct answer in any style scores 10; an empty answer scores 0.
    """
    task, letters = toy_parse_prompt(prompt)
    target = toy_solve(task, letters)
    words = response.split()
    answer = [w for w in words if w in TOY_LETTERS]
    foreign = sum(w not in TOY_LETTERS and w not in TOY_STYLE_TOKENS for w in words)
    score = 10.0 * max(0.0, 1.0 - edit_distance(answer, target) / len(target)) - TOY_FOREIGN_TOKEN_PENALTY * foreign
    return max(0.0, score)


def toy_random_prompt(rng: random.Random) -> tuple[str, list[str]]:
    task = rng.choice(TOY_TASKS)
    return task, rng.sample(TOY_LETTERS, rng.randint(TOY_MIN_LETTERS, TOY_MAX_LETTERS))


def make_toy_rows(seed: int, sizes: dict | None = None) -> dict[str, list[dict]]:
    """The toy dataset as rows: `sft` (messages schema) and `train_prefs` / `test_prefs`
    (UltraFeedback-binarized schema). Prompts are unique across all splits."""
    sizes = dict(TOY_SIZES if sizes is None else sizes)
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: dict[str, list[dict]] = {name: [] for name in sizes}
    for split, n in sizes.items():
        while len(rows[split]) < n:
            task, letters = toy_random_prompt(rng)
            prompt = toy_prompt(task, letters)
            if prompt in seen:
                continue
            seen.add(prompt)
            prompt_id = hashlib.sha1(f"toy-{seed}-{prompt}".encode()).hexdigest()[:16]
            user = {"role": "user", "content": prompt}
            if split == "sft":
                answer = TOY_SFT_TEACHER.write(task, letters, "plain", rng)
                rows[split].append(
                    {
                        "prompt_id": prompt_id,
                        "prompt": prompt,
                        "messages": [user, {"role": "assistant", "content": answer}],
                    }
                )
                continue
            # Rate four offline answers with a noisy judge, then binarize like UltraFeedback:
            # chosen = best rated, rejected = a random one of the lower rated, different rest.
            style = rng.choice(TOY_OFFLINE_STYLES)
            answers = [w.write(task, letters, style, rng) for w in TOY_OFFLINE_WRITERS]
            ratings = [
                min(10.0, max(0.0, round(2 * (toy_gold_score(prompt, a) + rng.gauss(0.0, TOY_LABEL_NOISE))) / 2))
                for a in answers
            ]
            best = max(range(len(answers)), key=lambda i: (ratings[i], -i))
            lower = [i for i in range(len(answers)) if ratings[i] < ratings[best] and answers[i] != answers[best]]
            if not lower:
                continue  # no preference to record (the prompt stays used)
            worst = rng.choice(lower)
            chosen = [user, {"role": "assistant", "content": answers[best]}]
            rejected = [user, {"role": "assistant", "content": answers[worst]}]
            rows[split].append(
                {
                    "prompt": prompt,
                    "prompt_id": prompt_id,
                    "chosen": chosen,
                    "rejected": rejected,
                    "messages": chosen,
                    "score_chosen": ratings[best],
                    "score_rejected": ratings[worst],
                }
            )
    return rows


# A word-level vocabulary: every token of the task is one word, so the model is tiny.
TOY_SPECIAL_TOKENS = ("<pad>", "<unk>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>")
TOY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' }}{%- if "
    "message['role'] == 'assistant' -%}{{ eos_token + ' ' }}{%- endif -%}{%- endfor -%}{%- if add_generation_prompt "
    "-%}{{ '<|assistant|> ' }}{%- endif -%}"
)


def build_toy_tokenizer():
    """A word-level tokenizer built with the `tokenizers` library, wrapped as a
    PreTrainedTokenizerFast with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(TOY_SPECIAL_TOKENS) + list(TOY_TASKS) + list(TOY_STYLE_TOKENS) + list(TOY_LETTERS)
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<eos>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = TOY_CHAT_TEMPLATE
    return tokenizer


def toy_model_config(tokenizer):
    """The tiny LlamaConfig shared by the toy policy and reward model (~0.6M parameters)."""
    from transformers import LlamaConfig

    vocab_size = 8 * math.ceil(len(tokenizer) / 8)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


@dataclass
class ToyAssets:
    root: Path
    sft: Path  # jsonl, messages schema
    train_prefs: Path  # jsonl, UltraFeedback-binarized schema
    test_prefs: Path
    base: Path  # tokenizer + LlamaConfig (no weights): what `--model toy` starts SFT from


def toy_asset_paths(root: Path) -> ToyAssets:
    return ToyAssets(root, root / "sft.jsonl", root / "train_prefs.jsonl", root / "test_prefs.jsonl", root / "base")


def ensure_toy_assets(seed: int = 0, out_dir: str | os.PathLike = "out/toy", sizes: dict | None = None) -> ToyAssets:
    """Build the toy dataset, tokenizer and config for `seed` unless already cached.

    The cache lives in `<out_dir>/seed<seed>/`; its manifest records the seed, the sizes and a hash
    of the code that generated it (this file, gold judge included), so an edit rebuilds the cache
    instead of silently reusing stale data. The build goes to a temporary directory that is renamed into place,
    so an interrupted build never leaves a half-written cache.
    """
    root = Path(out_dir) / f"seed{seed}"
    code = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()
    manifest = {"seed": seed, "sizes": dict(TOY_SIZES if sizes is None else sizes), "code_sha1": code}
    assets = toy_asset_paths(root)
    manifest_path = root / "manifest.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text()) == manifest:
        return assets
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".seed{seed}-", dir=root.parent))
    try:
        rows = make_toy_rows(seed, manifest["sizes"])
        built = toy_asset_paths(tmp)
        for split in ("sft", "train_prefs", "test_prefs"):
            write_jsonl(getattr(built, split), rows[split])
        tokenizer = build_toy_tokenizer()
        tokenizer.save_pretrained(built.base)
        toy_model_config(tokenizer).save_pretrained(built.base)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if root.exists():
            shutil.rmtree(root)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished the same build first: keep its copy if it is current
            if not (manifest_path.exists() and json.loads(manifest_path.read_text()) == manifest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return assets


# ----------------------------------------------------------------------------------------------
# Self-check


def _length_stats(values: list[int]) -> str:
    values = sorted(values)
    median, p95 = values[len(values) // 2], values[int(0.95 * (len(values) - 1))]
    return f"min {values[0]:3d}  median {median:3d}  p95 {p95:3d}  max {values[-1]:3d}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default="out/toy")
    parser.add_argument("--max_prompt_len", type=int, default=16)
    parser.add_argument("--max_len", type=int, default=40)
    args = parser.parse_args()

    from transformers import AutoConfig, AutoTokenizer

    assets = ensure_toy_assets(args.seed, args.out_dir)
    tokenizer = AutoTokenizer.from_pretrained(assets.base)
    config = AutoConfig.from_pretrained(assets.base)
    print(
        f"toy assets in {assets.root}: tokenizer with {len(tokenizer)} tokens, {config.model_type} config (hidden "
        f"{config.hidden_size}, {config.num_hidden_layers} layers, vocab {config.vocab_size})"
    )

    sft, sft_load = load_sft(assets.sft)
    prefs, pref_load = load_preferences(assets.train_prefs)
    test, _ = load_preferences(assets.test_prefs)
    print(f"sizes: sft {len(sft)}, train_prefs {len(prefs)}, test_prefs {len(test)}")

    sft_tok, sft_stats = tokenize_sft(sft, tokenizer, args.max_prompt_len, args.max_len)
    pref_tok, pref_stats = tokenize_preferences(prefs, tokenizer, args.max_prompt_len, args.max_len)
    print(f"sft tokenization: {sft_stats.summary()}")
    print(f"train_prefs tokenization: {pref_stats.summary()}")

    pair = pref_tok[0]
    batch = collate_preferences([pair], tokenizer.pad_token_id)
    print("\none tokenized pair (row 1 = chosen, row 2 = rejected); ^ marks response-mask tokens:")
    for row in range(2):
        tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][row].tolist())
        marks = ["^" * len(t) if m else " " * len(t) for t, m in zip(tokens, batch["response_mask"][row].tolist())]
        print("  " + " ".join(tokens) + "\n  " + " ".join(marks))

    print("\nlengths in tokens:")
    print(f"  prompt            {_length_stats([len(p.prompt_ids) for p in pref_tok])}")
    print(f"  chosen response   {_length_stats([len(p.chosen_ids) for p in pref_tok])}")
    print(f"  rejected response {_length_stats([len(p.rejected_ids) for p in pref_tok])}")
    print(f"  sft response      {_length_stats([len(e.response_ids) for e in sft_tok])}")

    def gold(p, text):
        return toy_gold_score(p.prompt[-1]["content"], text)

    agree = sum(gold(p, p.chosen) > gold(p, p.rejected) for p in prefs)
    ties = sum(gold(p, p.chosen) == gold(p, p.rejected) for p in prefs)
    print(
        f"\noffline labels vs the gold judge: {agree / len(prefs):.1%} agree, {ties / len(prefs):.1%} tie, "
        f"{(len(prefs) - agree - ties) / len(prefs):.1%} prefer the worse answer"
    )
    print(
        "gold mean: SFT demonstrations "
        f"{sum(toy_gold_score(e.prompt[-1]['content'], e.response) for e in sft) / len(sft):.2f}, "
        f"offline chosen {sum(gold(p, p.chosen) for p in prefs) / len(prefs):.2f}, "
        f"offline rejected {sum(gold(p, p.rejected) for p in prefs) / len(prefs):.2f}  (0-10 scale)"
    )
    parsed = [(toy_parse_prompt(e.prompt[-1]["content"]), e.response.split()) for e in sft]
    long = [(letters, answer) for (_, letters), answer in parsed if len(letters) >= TOY_LONG_LIST]
    forgot = sum(answer in (sorted(letters)[:-1], sorted(letters, reverse=True)[:-1]) for letters, answer in long)
    descending = [answer for (task, _), answer in parsed if task == "descending"]
    upward = sum(len(answer) > 1 and answer == sorted(answer) for answer in descending)
    print(
        f"SFT teacher's habits: {forgot / len(long):.1%} of its answers to lists of {TOY_LONG_LIST}+ letters leave out "
        f"the last letter; {upward / len(descending):.1%} of its answers to descending prompts are sorted ascending"
    )
    offline_plain = sum(all(w in TOY_LETTERS for w in text.split()) for p in prefs for text in (p.chosen, p.rejected))
    print(
        f"offline answers in the SFT teacher's plain style: {offline_plain / (2 * len(prefs)):.1%} (SFT "
        "demonstrations: 100%)"
    )


if __name__ == "__main__":
    main()
