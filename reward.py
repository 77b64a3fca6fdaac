"""
Reward models as objects: loading, batched (distributed) scoring, rule-based rewards, a scoring CLI.

What it does
- `RewardModel`: an HF AutoModelForSequenceClassification checkpoint with one label (the output
  of `train.py --method rm`, or any such hub model) and its tokenizer. `score(prompts, responses)`
  renders each (conversation, response) pair through the tokenizer's chat template exactly as
  data.py does for training (prompt with its generation prompt, then the answer ending with the
  template's end of turn, none for an answer cut at the length limit), truncates it to
  `max_len` tokens, and scores in right-padded batches sorted by length; results come back in the
  original order. In a distributed run each rank scores a strided share and the scores are
  gathered, so every rank gets all of them. `from_pretrained` refuses a checkpoint without score
  head weights (a causal LM would get a random head), and the model pools by the tokenizer's pad id.
- `RuleReward`: a plain function of (prompt text, response text) behind the same `score` API;
  `gold_judge(preset)` wraps the gold judge of the toy's task (`toy.toy_gold_score`) or of the
  smollm2 preset's (`smollm2.gold_score`), each part of its task's definition: the stand-in for
  the GPT-4o judge.

Run
    python reward.py --model out/toy_rm --input F.jsonl --output G.jsonl   # a trained reward model
    python reward.py --model toy-gold --input F.jsonl --output G.jsonl      # the toy's gold judge (smollm2-gold)
    torchrun --nproc_per_node 8 reward.py --model RM --input F.jsonl --output G.jsonl
Input rows: `prompt` (a string or a message list) and `response` (a string) or `responses` (a
list of strings); the output repeats each row with `reward` or `rewards` added.

Deliberate simplifications
- Truncation keeps the first `max_len` tokens (the prompt and the start of the response), like
  the tokenizer's default; pairs are counted when cut. The model pools the last non-padding token,
  as HF sequence-classification models do.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

import smollm2
from data import (
    DataError,
    collate_sequences,
    encode_prompt,
    encode_response,
    iter_rows,
    load_tokenizer,
    write_jsonl,
)
from toy import toy_gold_score

# ----------------------------------------------------------------------------------------------
# Rule-based rewards


class RuleReward:
    """A rule-based reward: fn(last user message, response text) -> float, with RewardModel's API."""

    def __init__(self, fn: Callable[[str, str], float], name: str):
        self.fn, self.name = fn, name

    def score(self, prompts: list[list[dict]], responses: list[str], complete: list[bool] | None = None) -> list[float]:
        """`complete` is accepted for RewardModel's API; a rule judges the text as it is."""
        return [self.fn(prompt[-1]["content"], response) for prompt, response in zip(prompts, responses)]


GOLD_JUDGES = {"toy": toy_gold_score, "smollm2": smollm2.gold_score}  # the presets whose task a program grades


def gold_judge(preset: str = "toy") -> RuleReward:
    """The gold judge of a preset's task (the toy's, or the smollm2 preset's), 0-10."""
    return RuleReward(GOLD_JUDGES[preset], f"{preset}-gold")


def toy_gold_judge() -> RuleReward:
    return gold_judge("toy")


def gold_per_answer(conversations: list[list[dict]], generations: list[list], preset: str = "toy") -> list[list[float]]:
    """The gold score of every generated answer (objects with .text) of every prompt of a preset's task."""
    judge = gold_judge(preset)
    return [judge.score([c] * len(g), [a.text for a in g]) for c, g in zip(conversations, generations)]


def toy_gold_per_answer(conversations: list[list[dict]], generations: list[list]) -> list[list[float]]:
    return gold_per_answer(conversations, generations, "toy")


# ----------------------------------------------------------------------------------------------
# Learned reward models


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def require_reward_head(path, model, loading_info: dict) -> None:
    """Stop when from_pretrained(..., output_loading_info=True) had to initialise the score head:
    the checkpoint is not a reward model (e.g. a causal LM), and its scores would be random."""
    prefix = model.base_model_prefix + "."
    head = sorted(key for key in loading_info["missing_keys"] if not key.startswith(prefix))
    if head:
        raise ValueError(
            f"{path}: not a reward model; the checkpoint has no weights for the score head ({', '.join(head)}), which "
            "would be randomly initialised. Pass a sequence-classification checkpoint with one label (train.py "
            "--method rm)"
        )


class RewardModel:
    """A sequence-classification reward model (num_labels = 1) with its tokenizer."""

    def __init__(self, model, tokenizer, max_len: int = 4096, batch_size: int = 8, group=None):
        if model.config.num_labels != 1:
            raise ValueError(
                f"{model.config.name_or_path or type(model).__name__}: a reward model needs num_labels=1, got "
                f"{model.config.num_labels}"
            )
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad token; the reward model cannot batch")
        # HF pools the last token that is not config.pad_token_id: it must be the pad token the batches use
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        self.model, self.tokenizer = model, tokenizer
        self.max_len, self.batch_size = max_len, batch_size
        self.group = group  # the process group scores are gathered over (train.py's gloo group beside NCCL)
        self.truncated = 0  # pairs cut to max_len so far

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        max_len: int = 4096,
        batch_size: int = 8,
        device: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> RewardModel:
        from transformers import AutoModelForSequenceClassification

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, loading_info = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=1,
            dtype=dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32),
            output_loading_info=True,
        )
        require_reward_head(path, model, loading_info)
        return cls(model.to(device).eval(), load_tokenizer(path), max_len, batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(
        self, prompts: list[list[dict]], responses: list[str], complete: list[bool] | None = None
    ) -> list[list[int]]:
        """Token ids of each pair through the chat template, cut to max_len. A response that is not
        complete (cut at the generation limit) gets no EOS: it is scored as the unfinished answer it is."""
        sequences = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            prompt_ids = encode_prompt(self.tokenizer, prompt)
            ids = prompt_ids + encode_response(
                self.tokenizer, prompt, response, complete is None or complete[i], prompt_ids
            )
            if len(ids) > self.max_len:
                self.truncated += 1
                ids = ids[: self.max_len]
            sequences.append(ids)
        return sequences

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """Rewards of token sequences, in their order; on this rank only."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # less padding per batch
        scores = [0.0] * len(sequences)
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            # collate_sequences right-pads; every token is "response" here, the mask is unused
            tensors = collate_sequences([[] for _ in batch], [sequences[i] for i in batch], self.tokenizer.pad_token_id)
            logits = self.model(
                input_ids=tensors["input_ids"].to(self.device), attention_mask=tensors["attention_mask"].to(self.device)
            ).logits
            for i, value in zip(batch, logits[:, 0].float().tolist()):
                scores[i] = value
        self.model.train(was_training)
        return scores

    def score(self, prompts: list[list[dict]], responses: list[str], complete: list[bool] | None = None) -> list[float]:
        """Rewards of (conversation, response) pairs in their order; `complete[i]` False marks a
        response cut at the length limit (default: all complete). Collective when distributed:
        every rank passes the same full lists, scores a strided share, and gets every score."""
        if len(prompts) != len(responses) or (complete is not None and len(complete) != len(responses)):
            raise ValueError(
                f"{len(prompts)} prompts, {len(responses)} responses, {len(complete or responses)} completeness flags"
            )
        complete = [True] * len(responses) if complete is None else list(complete)
        rank, world = _distributed()
        if world == 1:
            return self.score_ids(self.encode(prompts, responses, complete))
        share = list(range(rank, len(prompts), world))
        # equal share sizes keep the number of forward calls equal on every rank (a sharded model needs it)
        filler = share[0] if share else 0
        padded = share + [filler] * (-(-len(prompts) // world) - len(share))
        scores = self.score_ids(
            self.encode([prompts[i] for i in padded], [responses[i] for i in padded], [complete[i] for i in padded])
        )
        gathered: list = [None] * world
        dist.all_gather_object(gathered, list(zip(share, scores[: len(share)])), group=self.group)
        result = [0.0] * len(prompts)
        for part in gathered:
            for i, value in part:
                result[i] = value
        return result


# ----------------------------------------------------------------------------------------------
# Scoring CLI


def _read_scoring_rows(path: str) -> tuple[list[dict], list[list[dict]], list[str], list[tuple[int, int | None]]]:
    """Rows of a file to score, flattened to (prompt, response) pairs with (row, position) keys."""
    rows, prompts, responses, keys = [], [], [], []
    for where, row in iter_rows(path):
        if isinstance(row, DataError):
            raise row
        if not isinstance(row, dict) or "prompt" not in row:
            raise DataError(f"{where}: a row to score needs 'prompt' and 'response' or 'responses'")
        prompt = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
        if not isinstance(prompt, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt
        ):
            raise DataError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")
        if isinstance(row.get("response"), str):
            texts, positions = [row["response"]], [None]
        elif isinstance(row.get("responses"), list) and all(isinstance(r, str) for r in row["responses"]):
            texts, positions = row["responses"], list(range(len(row["responses"])))
        else:
            raise DataError(f"{where}: needs 'response' (a string) or 'responses' (a list of strings)")
        for text, position in zip(texts, positions):
            prompts.append(prompt)
            responses.append(text)
            keys.append((len(rows), position))
        rows.append(row)
    return rows, prompts, responses, keys


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Score a jsonl file of responses with a reward model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="reward model path or hub id, or 'toy-gold' / 'smollm2-gold' for a preset's gold judge",
    )
    parser.add_argument("--input", required=True, help="jsonl/json rows with 'prompt' and 'response' or 'responses'")
    parser.add_argument("--output", required=True, help="jsonl written with 'reward' / 'rewards' added")
    parser.add_argument("--max_len", type=int, default=4096)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()

    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    try:
        rows, prompts, responses, keys = _read_scoring_rows(args.input)
        if args.model in (f"{preset}-gold" for preset in GOLD_JUDGES):
            scorer = gold_judge(args.model.removesuffix("-gold"))
        else:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
            scorer = RewardModel.from_pretrained(args.model, args.max_len, args.batch_size, device)
        scores = scorer.score(prompts, responses)
        for (row, position), value in zip(keys, scores):
            if position is None:
                rows[row]["reward"] = value
            else:
                rows[row].setdefault("rewards", [None] * len(rows[row]["responses"]))[position] = value
        if _distributed()[0] == 0:
            write_jsonl(args.output, rows)
            cut = f", {scorer.truncated} cut to {args.max_len} tokens" if isinstance(scorer, RewardModel) else ""
            print(f"scored {len(scores)} responses of {len(rows)} rows with {args.model}{cut} -> {Path(args.output)}")
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
