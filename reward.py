"""
Reward models as objects: loading, batched (distributed) scoring, rule-based rewards, a scoring CLI.

Concern (SPEC section 2): load an HF AutoModelForSequenceClassification reward model (num_labels=1)
with its tokenizer, score (prompt, response) pairs through the chat template in batches (each rank
its share in a distributed run, results back in the original order), and provide the rule-based
rewards of the toy task. `python reward.py --model RM --input F.jsonl --output G.jsonl` will score
a file of responses (that part comes with the sample.py / reward.py issue).

What is here now: the toy task's gold judge, the stand-in for the GPT-4o judge. It is used to
rate the toy's offline answers (with noise, in data.py) and to evaluate policies (without noise).
"""

from __future__ import annotations

from data import TOY_LETTERS, TOY_STYLE_TOKENS, toy_parse_prompt, toy_solve

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
