"""
The two-objective toy task of the Meta-Aligner (a reconstruction: the paper's own tasks are not
public; this folder's README): the sorting toy of toy.py, where some
letters are unsafe, so that a response trades helpfulness (every letter, sorted) against
harmlessness (no unsafe letter), with exact gold scorers for both, and a context tag that carries
the trade-off a user intends.

- A prompt is "<tag> <task> : <letters>", e.g. "strict ascending : f c h i"; the tag, `strict` or
  `lax` (drawn 50/50), is ignored by both gold scorers. The unsafe letters are g, h, i, j.
- helpful(x, y) = toy.toy_gold_score of the untagged prompt: 10 (1 - edit distance to the sorted
  letters / n) - 2 per foreign token, so each omitted unsafe letter costs 10 / n.
- harmless(x, y) = 10 when x has no unsafe letter, else 10 (1 - |unsafe letters of x written in
  y| / u) (a hallucinated unsafe letter counts as written; floored at 0).
- The intended trade-off (the hidden utility) is w_user = (0.2, 0.8) on strict prompts and
  (0.8, 0.2) on lax ones: no fixed weight is best for both (the note's section 5.2).
- The SFT teacher is toy.py's teacher (its habits included) which leaves out each unsafe letter
  with probability 0.5 on strict prompts and 0.2 on lax ones, so the SFT policy shows diverse
  trade-offs. Offline preference rows: four writers (omission rates 0, 0.3, 0.7, 1.0, the first
  regime's mistakes), y+ the best under the hidden utility plus N(0, 1) noise, y- a random other
  one, with every answer's gold per objective stored.
- The training reward signal per objective is gold + N(0, 1) (the note's option (a), standing in
  for imperfect reward models), normalised by the offline rows' mean and std as RiC does.
- A condition on the weights w (Weights-In-Context) is written after the prompt, each weight
  rounded to 0.1 and written x10: "strict ascending : f c h i <w1> 7 <w2> 3".
- `pareto_front_oracle` enumerates, per prompt, a perfect sorter that chooses which unsafe letters
  to omit, and gives the oracle's front on the 11-point grid and its hypervolume (about 79; the
  continuous hull about 85), the reference the learned fronts are set beside.

Run
    python -m experiments.meta_aligner.toy_multiobjective
        # self-check: builds the data, prints the oracle's front and hypervolume, the hidden
        # utility's best fixed weight and the prompt-aware optimum
Nothing here is distributed: under torchrun rank 0 builds the data first, then every rank reads it.

Deliberate simplifications
- Two objectives (the note's three-objective variant with a "cheer" token is left out).
- Reward signals are noisy gold, not learned reward models (the note's option (a)).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
from pathlib import Path

import toy
from toy import (
    TOY_ALL_MISTAKES,
    TOY_GOLD_MAX,
    TOY_LETTERS,
    TOY_MAX_LETTERS,
    TOY_MIN_LETTERS,
    TOY_SFT_TEACHER,
    TOY_TASKS,
    ToyWriter,
    toy_gold_score,
    toy_solve,
)

MO_OBJECTIVES = ("helpful", "harmless")
MO_UNSAFE = frozenset("ghij")
MO_TAGS = ("strict", "lax")
MO_USER_WEIGHTS = {"strict": (0.2, 0.8), "lax": (0.8, 0.2)}  # the hidden utility's (helpful, harmless) weights
MO_TEACHER_OMITS = {"strict": 0.5, "lax": 0.2}  # the SFT teacher's chance to leave out each unsafe letter
MO_WRITER_OMITS = (0.0, 0.3, 0.7, 1.0)  # the four offline writers' chances
MO_HUMAN_NOISE = 1.0  # std of the noise on the hidden utility when the "human" picks y+
MO_REWARD_NOISE = 1.0  # std of the noise on gold that makes the training reward signal
MO_GRID = tuple((a / 10, 1 - a / 10) for a in range(11))  # RiC's 11-point grid of (w_helpful, w_harmless)
MO_CONDITION_TOKENS = ("<w1>", "<w2>")
MO_DIGITS = tuple(str(i) for i in range(11))  # a weight x10, rounded
# RiC's condition: a reward target per objective, a z-score rounded to 0.5 in [-4, 4]
MO_RIC_TOKENS = ("<r1>", "<r2>")
MO_RIC_VALUES = tuple(f"{v / 2:.1f}" for v in range(-8, 9))


def mo_prompt(tag: str, task: str, letters: list[str]) -> str:
    return f"{tag} {task} : {' '.join(letters)}"


def mo_parse_prompt(prompt: str) -> tuple[str, str, list[str]]:
    """(tag, task, letters) of a prompt, its condition (if any) ignored; ValueError when it is none."""
    words = prompt.split()
    for token in ("<w1>", "<r1>"):  # a condition, of either kind, follows the prompt
        if token in words:
            words = words[: words.index(token)]
    if len(words) < 4 or words[0] not in MO_TAGS or words[1] not in TOY_TASKS or words[2] != ":":
        raise ValueError(f"not a two-objective toy prompt: {prompt!r}")
    if any(w not in TOY_LETTERS for w in words[3:]):
        raise ValueError(f"not a two-objective toy prompt: {prompt!r}")
    return words[0], words[1], words[3:]


def helpful_score(prompt: str, response: str) -> float:
    """toy.toy_gold_score of the prompt without its tag (and condition)."""
    _, task, letters = mo_parse_prompt(prompt)
    return toy_gold_score(f"{task} : {' '.join(letters)}", response)


def harmless_score(prompt: str, response: str) -> float:
    """10 when the prompt has no unsafe letter, else 10 (1 - unsafe letters written / u), floored
    at 0: any unsafe letter written counts, a hallucinated one too."""
    _, _, letters = mo_parse_prompt(prompt)
    unsafe = MO_UNSAFE & set(letters)
    if not unsafe:
        return TOY_GOLD_MAX
    written = MO_UNSAFE & set(response.split())
    return max(0.0, TOY_GOLD_MAX * (1 - len(written) / len(unsafe)))


def gold_scores(prompt: str, response: str) -> tuple[float, float]:
    """(helpful, harmless) of a response, exact."""
    return helpful_score(prompt, response), harmless_score(prompt, response)


def hidden_utility(prompt: str, response: str) -> float:
    """The intended trade-off of the prompt's tag: w_user . gold."""
    tag = mo_parse_prompt(prompt)[0]
    return sum(w * g for w, g in zip(MO_USER_WEIGHTS[tag], gold_scores(prompt, response)))


def reward_signal(prompt: str, response: str, rng: random.Random) -> tuple[float, float]:
    """The training reward per objective: gold + N(0, MO_REWARD_NOISE), standing in for two
    imperfect reward models (the note's option (a)); evaluation uses gold itself."""
    return tuple(g + rng.gauss(0.0, MO_REWARD_NOISE) for g in gold_scores(prompt, response))


def reward_stats(rewards: list[tuple[float, ...]]) -> list[tuple[float, float]]:
    """(mean, std) per objective over the offline rows' rewards, RiC's all_reward_stat."""
    stats = []
    for i in range(len(rewards[0])):
        values = [r[i] for r in rewards]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        stats.append((mean, std or 1.0))
    return stats


def normalise(rewards: tuple[float, ...], stats: list[tuple[float, float]]) -> tuple[float, ...]:
    return tuple((r - mean) / std for r, (mean, std) in zip(rewards, stats))


def condition_text(weights: tuple[float, ...]) -> str:
    """The Weights-In-Context condition: each weight rounded to 0.1 and written x10,
    e.g. (0.7, 0.3) -> "<w1> 7 <w2> 3"."""
    tens = [round(10 * w) for w in weights]
    return " ".join(f"{token} {t}" for token, t in zip(MO_CONDITION_TOKENS, tens))


def conditioned(prompt: str, weights: tuple[float, ...]) -> str:
    return f"{prompt} {condition_text(weights)}"


def ric_condition_text(targets: tuple[float, ...]) -> str:
    """RiC's condition: each reward target (a z-score) clipped to [-4, 4] and rounded to 0.5,
    e.g. (1.26, -0.4) -> "<r1> 1.5 <r2> -0.5"."""
    values = [min(4.0, max(-4.0, round(2 * t) / 2)) for t in targets]
    return " ".join(f"{token} {v:.1f}" for token, v in zip(MO_RIC_TOKENS, values))


def ric_conditioned(prompt: str, targets: tuple[float, ...]) -> str:
    return f"{prompt} {ric_condition_text(targets)}"


def write_answer(writer: ToyWriter, omit: float, task: str, letters: list[str], rng: random.Random) -> str:
    """A writer's answer in the plain style, each unsafe letter left out with probability `omit`."""
    kept = [c for c in letters if c not in MO_UNSAFE or rng.random() >= omit]
    if not kept:  # a prompt of unsafe letters only: an empty answer is no answer; keep the first
        kept = letters[:1]
    return writer.write(task, kept, "plain", rng)


def mo_random_prompt(rng: random.Random) -> tuple[str, str, list[str]]:
    tag, task = rng.choice(MO_TAGS), rng.choice(TOY_TASKS)
    return tag, task, rng.sample(TOY_LETTERS, rng.randint(TOY_MIN_LETTERS, TOY_MAX_LETTERS))


MO_WRITERS = tuple(
    ToyWriter(f"writer{k}", 0.3, TOY_ALL_MISTAKES, sorts_ascending=0.1) for k in range(len(MO_WRITER_OMITS))
)


def make_mo_rows(seed: int, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """`sft` rows (messages schema; the teacher's answers) and `train_prefs` / `test_prefs` rows
    (UltraFeedback-binarized schema, with "gold_chosen" / "gold_rejected": (helpful, harmless)).
    Prompts are unique across the splits. The two preference splits are drawn together, each new
    prompt going to test_prefs with its share of the two, so the held-out prompts come from the
    training prompts' population (a split drawn after another finds its short prompts used up);
    the SFT prompts come after. A prompt whose four answers agree is kept in test_prefs (pair
    (y, y): evaluation needs the prompt only) and skipped in train_prefs (a pair needs two
    different answers)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: dict[str, list[dict]] = {name: [] for name in sizes}
    preference = [name for name in ("test_prefs", "train_prefs") if name in sizes]
    test_share = sizes.get("test_prefs", 0) / max(1, sum(sizes[name] for name in preference))

    def new_prompt() -> tuple[str, str, list[str], str]:
        while True:
            tag, task, letters = mo_random_prompt(rng)
            prompt = mo_prompt(tag, task, letters)
            if prompt not in seen:
                seen.add(prompt)
                return tag, task, letters, prompt

    while any(len(rows[name]) < sizes[name] for name in preference):
        _, task, letters, prompt = new_prompt()
        open_splits = [name for name in preference if len(rows[name]) < sizes[name]]
        split = (
            open_splits[0] if len(open_splits) == 1 else "test_prefs" if rng.random() < test_share else "train_prefs"
        )
        user = {"role": "user", "content": prompt}
        answers = [write_answer(w, omit, task, letters, rng) for w, omit in zip(MO_WRITERS, MO_WRITER_OMITS)]
        noisy = [hidden_utility(prompt, a) + rng.gauss(0.0, MO_HUMAN_NOISE) for a in answers]
        best = max(range(len(answers)), key=lambda i: noisy[i])
        others = [i for i in range(len(answers)) if answers[i] != answers[best]]
        if not others and split != "test_prefs":
            continue
        worst = rng.choice(others) if others else best
        rows[split].append(
            {
                "prompt": prompt,
                "chosen": [user, {"role": "assistant", "content": answers[best]}],
                "rejected": [user, {"role": "assistant", "content": answers[worst]}],
                "gold_chosen": list(gold_scores(prompt, answers[best])),
                "gold_rejected": list(gold_scores(prompt, answers[worst])),
            }
        )
    while len(rows.get("sft", ())) < sizes.get("sft", 0):
        tag, task, letters, prompt = new_prompt()
        answer = write_answer(TOY_SFT_TEACHER, MO_TEACHER_OMITS[tag], task, letters, rng)
        user = {"role": "user", "content": prompt}
        rows["sft"].append({"prompt": prompt, "messages": [user, {"role": "assistant", "content": answer}]})
    return rows


MO_SIZES = {"sft": 4000, "train_prefs": 6000, "test_prefs": 512}  # rows per split, as the first toy's


def ensure_mo_assets(seed: int = 0, out_dir: str | os.PathLike = "out/toy_mo", sizes: dict | None = None):
    """The two-objective toy's data (jsonl), tokenizer (the toy's words, the tags and the condition
    tokens and digits) and model config under <out_dir>/seed<N>, unless already cached (the
    manifest records the seed, the sizes and a hash of this file and toy.py; toy.build_cached_assets)."""
    code = hashlib.sha1(Path(__file__).read_bytes() + Path(toy.__file__).read_bytes()).hexdigest()
    manifest = {"seed": seed, "sizes": dict(MO_SIZES if sizes is None else sizes), "code_sha1": code}
    words = MO_TAGS + MO_CONDITION_TOKENS + MO_DIGITS + MO_RIC_TOKENS + MO_RIC_VALUES
    return toy.build_cached_assets(
        Path(out_dir) / f"seed{seed}", manifest, lambda: make_mo_rows(seed, manifest["sizes"]), words
    )


# ----------------------------------------------------------------------------------------------
# Fronts and hypervolume


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float] = (0.0, 0.0)) -> float:
    """The area dominated by `points` (both objectives maximised) above `reference`, exact."""
    area, covered = 0.0, reference[1]
    for x, y in sorted(set(points), key=lambda p: (-p[0], -p[1])):
        if x > reference[0] and y > covered:
            area += (x - reference[0]) * (y - covered)
            covered = y
    return area


def oracle_choice(letters: list[str], weights: tuple[float, float]) -> tuple[float, float]:
    """Gold of the best answer a perfect sorter can give under `weights`: it leaves out k of the
    u unsafe letters, choosing k to maximise w . (helpful, harmless) (ties: fewer left out)."""
    n, u = len(letters), len(MO_UNSAFE & set(letters))

    def gold(k: int) -> tuple[float, float]:
        return max(0.0, TOY_GOLD_MAX * (1 - k / n)), TOY_GOLD_MAX if u == 0 else TOY_GOLD_MAX * k / u

    best = max(range(u + 1), key=lambda k: (round(sum(w * g for w, g in zip(weights, gold(k))), 9), -k))
    return gold(best)


def oracle_hull_hypervolume(prompts: list[str]) -> float:
    """The hypervolume (reference (0, 0)) of the oracle's continuous hull: every mean point it
    reaches under any weight, mixtures included. Each prompt switches between leaving out none and
    all of its u unsafe letters at one weight (helpful weight n / (n + u)), so the front's vertices
    are the oracle's fronts between consecutive switches; the area is under the line through them."""
    parsed = [mo_parse_prompt(p)[2] for p in prompts]
    switches = sorted({len(ls) / (len(ls) + len(MO_UNSAFE & set(ls))) for ls in parsed})
    bounds = [0.0, *switches, 1.0]
    weights = [((a + b) / 2, 1 - (a + b) / 2) for a, b in zip(bounds, bounds[1:])]
    vertices = sorted(set(oracle_front(prompts, weights)))  # helpful ascending, harmless descending
    area = vertices[0][0] * vertices[0][1]
    for (xa, ya), (xb, yb) in zip(vertices, vertices[1:]):
        area += (xb - xa) * (ya + yb) / 2
    return area


def oracle_front(prompts: list[str], grid=MO_GRID) -> list[tuple[float, float]]:
    """Per grid weight, the oracle's mean (helpful, harmless) over `prompts`."""
    points = []
    for weights in grid:
        golds = [oracle_choice(mo_parse_prompt(p)[2], weights) for p in prompts]
        points.append(tuple(sum(g[i] for g in golds) / len(golds) for i in range(2)))
    return points


def oracle_utility(prompts: list[str]) -> dict:
    """The hidden utility of the oracle conditioned on the best fixed grid weight, and on each
    prompt's own intended weight (prompt-aware)."""

    def utility(prompt: str, weights) -> float:
        tag, _, letters = mo_parse_prompt(prompt)
        return sum(w * g for w, g in zip(MO_USER_WEIGHTS[tag], oracle_choice(letters, weights)))

    fixed = {w: sum(utility(p, w) for p in prompts) / len(prompts) for w in MO_GRID}
    best = max(fixed, key=fixed.get)
    aware = sum(utility(p, MO_USER_WEIGHTS[mo_parse_prompt(p)[0]]) for p in prompts) / len(prompts)
    return {"best_fixed_weights": best, "best_fixed": fixed[best], "prompt_aware": aware}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=4000)
    args = parser.parse_args()
    rows = make_mo_rows(args.seed, {"sft": 2000, "train_prefs": args.prompts})
    prompts = [r["prompt"] for r in rows["train_prefs"]]
    front = oracle_front(prompts)
    print(f"oracle front over {len(prompts)} prompts (w_helpful: helpful, harmless):")
    for weights, point in zip(MO_GRID, front):
        print(f"  {weights[0]:.1f}: {point[0]:.2f}, {point[1]:.2f}")
    print(f"oracle hypervolume (reference (0, 0)): {hypervolume(front):.2f}")
    best = oracle_utility(prompts)
    print(
        f"hidden utility: best fixed weights {best['best_fixed_weights']} -> {best['best_fixed']:.2f}, "
        f"prompt-aware -> {best['prompt_aware']:.2f}"
    )
    sft = [gold_scores(r["prompt"], r["messages"][-1]["content"]) for r in rows["sft"]]
    print(
        f"SFT teacher's mean gold (helpful, harmless): {sum(s[0] for s in sft) / len(sft):.2f}, "
        f"{sum(s[1] for s in sft) / len(sft):.2f}"
    )
    chosen = [r["gold_chosen"] for r in rows["train_prefs"]]
    print(
        f"offline chosen mean gold: {sum(c[0] for c in chosen) / len(chosen):.2f}, "
        f"{sum(c[1] for c in chosen) / len(chosen):.2f}"
    )
    print(f"solved example: {prompts[0]!r} -> {' '.join(toy_solve(*mo_parse_prompt(prompts[0])[1:]))!r}")


if __name__ == "__main__":
    main()
