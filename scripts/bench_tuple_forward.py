"""
MetaAPO's micro-batch holds four answers per tuple: the offline chosen and rejected (long, written
by other models) and the online chosen and rejected (the policy's own, often much shorter). This
times forward + backward of the policy on one micro-batch two ways, side by side in one process:
(a) one forward of the four answers padded to the longest (the concatenated forward), (b) two
forwards, the offline pair and the online pair each padded to its own longest, one backward.

Run
    python scripts/bench_tuple_forward.py                 # toy shapes and 4k / 1k-token shapes, CPU
    python scripts/bench_tuple_forward.py --repeats 9     # more timed runs per way
Single process, CPU (or CUDA when present); no torchrun. Prints one table; dpo.py's
online_split takes the faster way (its docstring says which).

Deliberate simplifications: random weights and token ids (the cost does not depend on them); the
"4k / 1k" model is a small Llama (2 layers, hidden 256, vocabulary 32000), not an 8B one, so
that it runs on a CPU in seconds: the ratio of the two ways, not their times, is the result.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import dpo  # noqa: E402
import losses  # noqa: E402
import toy  # noqa: E402

SHAPES = {  # name: (model config, tuples per micro-batch, prompt, offline answer, online answer lengths in tokens)
    "toy": (None, 16, (8, 16), (8, 24), (4, 24)),
    "4k / 1k": (
        dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, vocab_size=32000),
        1,
        (400, 600),
        (3400, 3600),
        (400, 500),
    ),
}


def make_tuples(n: int, lengths: tuple, vocab: int, rng: random.Random) -> list[dpo.PolicyPair]:
    prompt, offline, online = lengths
    ids = lambda span: [rng.randrange(3, vocab) for _ in range(rng.randint(*span))]  # noqa: E731
    return [
        dpo.PolicyPair(
            index=i,
            prompt_id=str(i),
            prompt_ids=ids(prompt),
            chosen_ids=ids(offline),
            rejected_ids=ids(offline),
            online_chosen_ids=ids(online),
            online_rejected_ids=ids(online),
            pad_id=0,
        )
        for i in range(n)
    ]


def longest(items, roles) -> int:
    return max(len(p.prompt_ids) + len(getattr(p, role)) for p in items for role in roles)


def forward_backward(model, items, device, split: bool) -> None:
    groups = (
        [("chosen_ids", "rejected_ids"), ("online_chosen_ids", "online_rejected_ids")]
        if split
        else [("chosen_ids", "rejected_ids", "online_chosen_ids", "online_rejected_ids")]
    )
    total = 0
    for roles in groups:
        batch = data.collate_sequences(
            [p.prompt_ids for _ in roles for p in items], [getattr(p, r) for r in roles for p in items], 0
        )
        total = total + model(*(batch[k].to(device) for k in ("input_ids", "attention_mask", "response_mask"))).sum()
    total.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    print(f"{device.type}: forward + backward of one micro-batch, median of {args.repeats} after a warm-up")
    print("| shapes | tuples | tokens padded: one forward / two | one forward (s) | two forwards (s) | one / two |")
    print("|---|---|---|---|---|---|")
    for name, (overrides, n, *lengths) in SHAPES.items():
        model_config = (
            toy.toy_model_config(toy.build_toy_tokenizer()) if overrides is None else LlamaConfig(**overrides)
        )
        model = losses.LogprobModel(LlamaForCausalLM(model_config)).to(device)
        items = make_tuples(n, tuple(lengths), model_config.vocab_size, random.Random(0))
        offline, online = ("chosen_ids", "rejected_ids"), ("online_chosen_ids", "online_rejected_ids")
        padded_one = 4 * n * longest(items, offline + online)
        padded_two = 2 * n * (longest(items, offline) + longest(items, online))
        times = {}
        for split in (False, True, False, True):  # interleaved: both ways see the same machine load
            forward_backward(model, items, device, split)  # warm-up
            runs = []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                forward_backward(model, items, device, split)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                runs.append(time.perf_counter() - start)
            times.setdefault(split, []).extend(runs)
        one, two = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {name} | {n} | {padded_one} / {padded_two} | {one:.4f} | {two:.4f} | {one / two:.2f}x |")


if __name__ == "__main__":
    main()
