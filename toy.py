"""
The embedded toy task (docs/toy.md): a task small enough that a ~1M-parameter Llama learns it on
2 CPU cores in seconds, with a programmatic gold judge, built to mimic the real setting. Its
prompts, the writers of its answers, its gold judge, the dataset (written in the
UltraFeedback-binarized schema and read back through data.py like real data), the tokenizer and
the model config, cached under `out/toy/seed<N>/`.

A prompt asks to sort 3-6 distinct letters from a-j: "ascending : f c h" -> "c f h",
"descending : b e a d" -> "e d b a". The gold judge (toy_gold_score, below) reads the letters
of a response in order, ignores punctuation and phrasing, and scores
10 * (1 - edit distance to the correct answer / its length), minus a penalty for foreign
tokens, on UltraFeedback's 0-10 scale. Answers are written by "writers": rule-based noisy
solvers with their own rates and kinds of mistakes (toy_mistake lists them).
Why it mimics the real setting (docs/toy.md has each property measured):
- SFT is well below the ceiling, and not only by sampling noise: the SFT demonstrations come
  from a teacher that answers in the plain style ("c f h"), makes random mistakes (neighbours
  swapped, stopping early) and has two habits: on lists of 5 or more letters it usually leaves
  out the last one, and it usually sorts descending prompts ascending.
- The offline pairs come from other generators: four offline writers answer every training
  prompt in one shared style drawn per prompt, three of the four never used by the SFT
  teacher ("c , f , h", "[ c f h ]", "answer : c f h"; plain otherwise), with every kind of
  mistake, like UltraFeedback's completions from a pool of other models, so the SFT model gives
  them far lower likelihood than its own samples.
- The labels are noisy like AI-judge labels: the four answers are rated by the gold judge plus
  Gaussian noise (std 2), rounded to halves; chosen is the best rated, rejected a random one
  of the lower-rated rest (UltraFeedback's binarization).
- The annotating reward model is learned from these pairs (train.py --method rm); it can be
  over-optimised by online training, as a real one can. Evaluation uses the gold judge, the
  stand-in for the GPT-4o judge.
- The tokenizer is a word-level `tokenizers` model wrapped as a PreTrainedTokenizerFast with a
  chat template and saved with save_pretrained; the model config is a tiny LlamaConfig
  (~0.6M parameters); the data is written as UltraFeedback-binarized jsonl and read back
  through the normal loader.
- Everything is a function of the seed (Python's `random.Random`, no global state).
Two regimes: `mismatch` (the default, above) and `skill` (--toy_regime=skill), built from the
paper's premise: the SFT teacher writes every list ascending, so descending prompts hold a skill
the policy lacks and the offline chosen answers have; the offline answers are close to the
policy's own styles; the same sizes otherwise (docs/toy.md#second-regime).

Run
    python toy.py                  # self-check: builds the toy task, prints sizes, one tokenized
                                   # example with its response mask, and length statistics
    python toy.py --seed 1         # the same for another seed
    python toy.py --regime skill   # the second regime (data in out/toy/skill-seed0)
Nothing here is distributed: under torchrun rank 0 builds the assets first (train.py), then every
rank reads them.

Deliberate simplifications
- One task (sorting letters) whose gold answer is computable; the writers' mistakes are rules,
  not a model's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from data import (
    collate_preferences,
    load_preferences,
    load_sft,
    tokenize_preferences,
    tokenize_sft,
    write_jsonl,
)

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


# The two regimes (docs/toy.md). `mismatch`, the first and the default: the SFT teacher
# answers in the plain style with two habits, the offline writers mostly in styles the policy never
# writes. `skill`, built from the paper's premise: a third of the prompts (descending ones) need a
# skill the SFT teacher never had, which the offline writers' chosen answers hold; the teacher and
# the offline writers share their styles (plain and comma, which the gold judge ignores), so the
# offline answers lie close to the policy's own and its aligned answers vary in ways gold ignores.
TOY_REGIMES = ("mismatch", "skill")
TOY_SKILL_DESCENDING = 1 / 3  # the share of prompts that need the skill (sorting descending)
TOY_SKILL_STYLES = ("plain", "comma")  # the SFT teacher's styles, drawn per answer
TOY_SKILL_FOREIGN = 0.1  # the share of offline prompts answered in a style the teacher never used
# It never sorts descending (it writes the letters ascending), errs on a sixth of its answers and
# leaves out the last letter of half its long lists: short ascending lists are aligned, long ones
# improvable by the policy's own samples, descending ones out of their reach.
TOY_SKILL_TEACHER = ToyWriter("teacher", 1 / 6, ("swap", "stop"), forgets_last=0.5, sorts_ascending=1.0)


# The gold judge: the stand-in for the paper's GPT-4o judge, rating offline answers (with noise) and evaluating
TOY_FOREIGN_TOKEN_PENALTY = 2.0  # gold points lost per token that is neither a letter nor punctuation
TOY_GOLD_MAX = 10.0  # a correct answer's score (UltraFeedback's 0-10 scale)


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
    score = (
        TOY_GOLD_MAX * max(0.0, 1.0 - edit_distance(answer, target) / len(target)) - TOY_FOREIGN_TOKEN_PENALTY * foreign
    )
    return max(0.0, score)


def toy_random_prompt(rng: random.Random, regime: str = "mismatch") -> tuple[str, list[str]]:
    if regime == "skill":
        task = "descending" if rng.random() < TOY_SKILL_DESCENDING else "ascending"
    else:
        task = rng.choice(TOY_TASKS)
    return task, rng.sample(TOY_LETTERS, rng.randint(TOY_MIN_LETTERS, TOY_MAX_LETTERS))


def make_toy_rows(seed: int, sizes: dict | None = None, regime: str = "mismatch") -> dict[str, list[dict]]:
    """The toy dataset of `regime` as rows: `sft` (messages schema) and `train_prefs` / `test_prefs`
    (UltraFeedback-binarized schema). Prompts are unique across all splits."""
    if regime not in TOY_REGIMES:
        raise ValueError(f"unknown toy regime {regime!r}; one of {TOY_REGIMES}")
    sizes = dict(TOY_SIZES if sizes is None else sizes)
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: dict[str, list[dict]] = {name: [] for name in sizes}
    for split, n in sizes.items():
        while len(rows[split]) < n:
            task, letters = toy_random_prompt(rng, regime)
            prompt = toy_prompt(task, letters)
            if prompt in seen:
                continue
            seen.add(prompt)
            prompt_id = hashlib.sha1(f"toy-{seed}-{prompt}".encode()).hexdigest()[:16]
            user = {"role": "user", "content": prompt}
            if split == "sft":
                if regime == "skill":
                    answer = TOY_SKILL_TEACHER.write(task, letters, rng.choice(TOY_SKILL_STYLES), rng)
                else:
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
            if regime == "skill":
                foreign = [x for x in TOY_OFFLINE_STYLES if x not in TOY_SKILL_STYLES]
                style = rng.choice(foreign if rng.random() < TOY_SKILL_FOREIGN else TOY_SKILL_STYLES)
            else:
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


def build_toy_tokenizer(extra_words: tuple[str, ...] = ()):
    """A word-level tokenizer built with the `tokenizers` library, wrapped as a
    PreTrainedTokenizerFast with a chat template; `extra_words` (e.g. toy_multiobjective.py's tags
    and condition tokens) come after the toy's own, so its ids stay as they are."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(TOY_SPECIAL_TOKENS) + list(TOY_TASKS) + list(TOY_STYLE_TOKENS) + list(TOY_LETTERS)
    words += [w for w in extra_words if w not in words]
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


def toy_root(seed: int, regime: str = "mismatch", out_dir: str | os.PathLike = "out/toy") -> Path:
    """Where a regime's toy data for `seed` is cached: <out_dir>/seed<N> (mismatch) or <out_dir>/<regime>-seed<N>."""
    return Path(out_dir) / (f"seed{seed}" if regime == "mismatch" else f"{regime}-seed{seed}")


def ensure_toy_assets(
    seed: int = 0, out_dir: str | os.PathLike = "out/toy", sizes: dict | None = None, regime: str = "mismatch"
) -> ToyAssets:
    """Build the toy dataset of `regime`, tokenizer and config for `seed` unless already cached, in
    toy_root(seed, regime, out_dir); its manifest records the seed, the sizes and a hash of the
    code that generated it (this file, gold judge included), so an edit rebuilds the cache instead
    of silently reusing stale data (see build_cached_assets)."""
    code = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()
    manifest = {"seed": seed, "sizes": dict(TOY_SIZES if sizes is None else sizes), "code_sha1": code}
    if regime != "mismatch":  # the default regime's manifest names no regime (its cached assets stay valid)
        manifest["regime"] = regime
    return build_cached_assets(
        toy_root(seed, regime, out_dir), manifest, lambda: make_toy_rows(seed, manifest["sizes"], regime), ()
    )


def build_cached_assets(root: Path, manifest: dict, make_rows, extra_words: tuple[str, ...]) -> ToyAssets:
    """A toy's assets in `root` (the splits of make_rows() as jsonl, the toy tokenizer with
    `extra_words`, the model config), unless `root` holds them with the same manifest. The build
    goes to a temporary directory renamed into place, so an interrupted build never leaves a
    half-written cache."""
    assets = toy_asset_paths(root)
    manifest_path = root / "manifest.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text()) == manifest:
        return assets
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        rows = make_rows()
        built = toy_asset_paths(tmp)
        for split in ("sft", "train_prefs", "test_prefs"):
            write_jsonl(getattr(built, split), rows[split])
        tokenizer = build_toy_tokenizer(extra_words)
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
# The data's properties, measured (the self-check prints them; the tests assert them)


def toy_data_properties(rows: dict[str, list[dict]]) -> dict:
    """What a regime's rows hold, measured against the gold judge: the SFT demonstrations' gold by
    task, how often they (and the offline chosen answers) solve descending prompts, the offline
    labels' agreement with gold, and the share of offline answers in the SFT teacher's styles."""

    def text(message_list):
        return message_list[-1]["content"]

    def style(answer):
        words = answer.split()
        if words[:2] == ["answer", ":"]:
            return "lead"
        if words[:1] == ["["]:
            return "bracket"
        return "comma" if "," in words else "plain"

    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    sft = [(row["prompt"], text(row["messages"])) for row in rows["sft"]]
    prefs = [(row["prompt"], text(row["chosen"]), text(row["rejected"])) for row in rows["train_prefs"]]
    by_task = {task: [toy_gold_score(p, a) for p, a in sft if toy_parse_prompt(p)[0] == task] for task in TOY_TASKS}
    descending = [(p, c) for p, c, _ in prefs if toy_parse_prompt(p)[0] == "descending"]
    teacher_styles = {style(a) for _, a in sft}
    gold = [(toy_gold_score(p, c), toy_gold_score(p, r)) for p, c, r in prefs]
    return {
        "descending_share": mean([toy_parse_prompt(p)[0] == "descending" for p, _, _ in prefs]),
        "sft_gold": mean([g for scores in by_task.values() for g in scores]),
        "sft_gold_ascending": mean(by_task["ascending"]),
        "sft_gold_descending": mean(by_task["descending"]),
        "sft_solves_descending": mean([g == TOY_GOLD_MAX for g in by_task["descending"]]),
        "offline_chosen_solves_descending": mean([toy_gold_score(p, c) == TOY_GOLD_MAX for p, c in descending]),
        "offline_chosen_gold": mean([c for c, _ in gold]),
        "labels_agree": mean([c > r for c, r in gold]),
        "labels_tie": mean([c == r for c, r in gold]),
        "teacher_styles": sorted(teacher_styles),
        "offline_in_teacher_styles": mean([style(a) in teacher_styles for _, c, r in prefs for a in (c, r)]),
    }


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
    parser.add_argument("--regime", default="mismatch", choices=TOY_REGIMES)
    parser.add_argument("--out_dir", default="out/toy")
    parser.add_argument("--max_prompt_len", type=int, default=16)
    parser.add_argument("--max_len", type=int, default=40)
    args = parser.parse_args()

    from transformers import AutoConfig, AutoTokenizer

    assets = ensure_toy_assets(args.seed, args.out_dir, regime=args.regime)
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
    parsed = [
        (toy_parse_prompt(e.prompt[-1]["content"]), [w for w in e.response.split() if w in TOY_LETTERS]) for e in sft
    ]
    long = [(letters, answer) for (_, letters), answer in parsed if len(letters) >= TOY_LONG_LIST]
    forgot = sum(answer in (sorted(letters)[:-1], sorted(letters, reverse=True)[:-1]) for letters, answer in long)
    descending = [answer for (task, _), answer in parsed if task == "descending"]
    upward = sum(len(answer) > 1 and answer == sorted(answer) for answer in descending)
    print(
        f"SFT teacher's habits: {forgot / len(long):.1%} of its answers to lists of {TOY_LONG_LIST}+ letters leave out "
        f"the last letter; {upward / len(descending):.1%} of its answers to descending prompts are sorted ascending"
    )
    rows = {"sft": [json.loads(line) for line in open(assets.sft)]}
    rows["train_prefs"] = [json.loads(line) for line in open(assets.train_prefs)]
    properties = toy_data_properties(rows)
    print(
        f"regime {args.regime}: {properties['descending_share']:.1%} descending prompts; the SFT demonstrations solve "
        f"{properties['sft_solves_descending']:.1%} of them, the offline chosen answers "
        f"{properties['offline_chosen_solves_descending']:.1%}; offline answers in the SFT teacher's styles "
        f"({', '.join(properties['teacher_styles'])}): {properties['offline_in_teacher_styles']:.1%}"
    )


if __name__ == "__main__":
    main()
