"""
Meta-Aligner (seed 003, Xu et al. 2026, arXiv 2604.24178), RECONSTRUCTED: the paper's method text
is not public (only its abstract); every choice below comes from the research note
(shared/research/meta-aligner.md, its M1), which rebuilds it from the abstract and from the
systems it descends from (PRO's prompt -> weight network, RiC's conditioning and rejection
sampling, MetaAPO's alternating meta updates). Choices the note marks [R] are marked here too.

This file holds, so far, the preference-weight net and its updates (the meta-learner of the
abstract's bi-level framework):
- `WeightNet` g_phi(x): the prompt's token embeddings, mean-pooled, through a 32 -> 64 -> m MLP
  and a softmax: preference weights on the simplex [R: PRO's lightweight adapter, scaled down].
- `realised_weights`: the trade-off a response realised, softmax(R(x, y) / T_w) of its
  normalised rewards (PRO's Eq. 7 applied to the policy's own sample; T_w = 0.1 as PRO).
- `relabel`: a kept sample's target moved from the weights it was asked for toward the trade-off
  it realised, w~ = normalise((1 - lambda) w + lambda w^) [R: lambda = 0 is PRO's static labels,
  1 RiC's hindsight relabelling].
- `best_of_k`: rejection sampling, the sample with the highest scalarised reward w . R [R].
- `explore`: (1 - eps) g_phi(x) + eps Dirichlet(1) [R].
- `WeightLearner`: g_phi with its Adam optimiser and a buffer of (prompt, w~); `fit` is PRO's
  offline KL fit; `update` one Adam step on the buffer's mean KL(w~ || g_phi(x)) every T_meta
  policy steps, then the buffer is cleared (MetaAPO's alternating, first-order meta step).

Run
    python meta_aligner.py     # self-check: g_phi learns the toy's tag-dependent weights from
                               # hand-made targets (strict -> harmless, lax -> helpful)

- RiC's pieces for its baseline: the inference map from weights to reward targets, the online
  goals, and MORS's quantile rejection (read in RiC's code).
- `conditional_rows`: stage 0's data, every offline answer conditioned on the trade-off it
  realised (RiC's hindsight labels, written as PRO-style weights: Weights-In-Context).

Deliberate simplifications
- The policy-side loop (conditional SFT, K samples under the condition, the online iterations)
  and the baselines are not written yet (issue 25 in progress).
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

import toy_multiobjective as mo

WEIGHT_TEMPERATURE = 0.1  # T_w of the realised-weight map (PRO's appendix)


class WeightNet(nn.Module):
    """g_phi(x): mean-pooled token embeddings -> MLP -> softmax over the m objectives."""

    def __init__(self, vocab_size: int, objectives: int = 2, width: int = 32, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, objectives))

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(self.embed.weight.dtype).unsqueeze(-1)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.softmax(self.mlp(pooled), dim=-1)


def realised_weights(rewards: torch.Tensor, temperature: float = WEIGHT_TEMPERATURE) -> torch.Tensor:
    """w^(x, y) = softmax(R(x, y) / T_w) per row of normalised rewards (B, m)."""
    return torch.softmax(rewards / temperature, dim=-1)


def relabel(asked: torch.Tensor, realised: torch.Tensor, strength: float) -> torch.Tensor:
    """w~ = normalise((1 - lambda) w + lambda w^): the target moved toward the realised trade-off."""
    moved = (1 - strength) * asked + strength * realised
    return moved / moved.sum(-1, keepdim=True)


def best_of_k(weights: torch.Tensor, rewards: torch.Tensor) -> int:
    """The index of the sample with the highest w . R among K (rewards (K, m)); the first on ties."""
    scores = (rewards * weights).sum(-1).tolist()
    best = 0
    for k, score in enumerate(scores):  # explicit, so that ties keep the first
        if score > scores[best]:
            best = k
    return best


def explore(weights: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """(1 - eps) w + eps d, d ~ Dirichlet(1, ..., 1) per row, drawn from `generator`."""
    if eps <= 0:
        return weights
    exponential = -torch.log(torch.rand(weights.shape, generator=generator, dtype=torch.float64)).to(weights.dtype)
    dirichlet = exponential / exponential.sum(-1, keepdim=True)
    return (1 - eps) * weights + eps * dirichlet


def kl_to(target: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(target || predicted), both on the simplex."""
    return (target * (target.clamp(min=1e-12).log() - predicted.clamp(min=1e-12).log())).sum(-1).mean()


class WeightLearner:
    """g_phi, its Adam optimiser (lr 5e-3, MetaAPO's meta learning rate [R]) and its buffer."""

    def __init__(self, vocab_size: int, objectives: int = 2, lr: float = 5e-3, interval: int = 8, seed: int = 0):
        torch.manual_seed(seed)
        self.net = WeightNet(vocab_size, objectives)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.interval = interval
        self.buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (ids, mask, w~) per step
        self.updates = 0

    @torch.no_grad()
    def weights(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids, mask)

    def step(self, input_ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> float:
        """One Adam step on the mean KL(targets || g_phi(x))."""
        loss = kl_to(targets, self.net(input_ids, mask))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def fit(self, input_ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, epochs: int, batch: int = 64):
        """PRO's offline fit (stage 0): KL to the preferred responses' realised weights."""
        generator = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            order = torch.randperm(len(targets), generator=generator)
            for start in range(0, len(order), batch):
                rows = order[start : start + batch]
                self.step(input_ids[rows], mask[rows], targets[rows])

    def append(self, input_ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> None:
        """One policy step's kept samples: their prompts and moved targets w~ (detached)."""
        self.buffer.append((input_ids.detach(), mask.detach(), targets.detach()))

    def ready(self) -> bool:
        return len(self.buffer) >= self.interval

    def update(self) -> dict:
        """The meta step: one Adam step on the buffer's mean KL(w~ || g_phi(x)), then the buffer is cleared."""
        width = max(ids.shape[1] for ids, _, _ in self.buffer)
        ids = torch.cat([F.pad(ids, (0, width - ids.shape[1])) for ids, _, _ in self.buffer])
        mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for _, m, _ in self.buffer])
        targets = torch.cat([t for _, _, t in self.buffer])
        loss = self.step(ids, mask, targets)
        self.buffer.clear()
        self.updates += 1
        return {"weight_net_loss": loss, "weight_net_updates": self.updates}


# ----------------------------------------------------------------------------------------------
# RiC (Yang et al. 2024), the baseline whose machinery the reconstruction reuses (read in its code)

RIC_LOW, RIC_HIGH = -4.3, 4.3  # about the extremes of 100k N(0, 1) draws, RiC's lo / hi
RIC_QUANTILE = 0.7  # MORS keeps a sample whose reward on any objective reaches this quantile


def ric_targets(weights: tuple[float, ...], low: float = RIC_LOW, high: float = RIC_HIGH) -> tuple[float, ...]:
    """RiC's inference map ('l2', what its evaluation.py calls): target_i = w_i / |w|_2 (high - low) + low."""
    norm = sum(w * w for w in weights) ** 0.5
    return tuple(w / norm * (high - low) + low for w in weights)


def ric_sample_goals(objectives: int, rng: random.Random, low: float = RIC_LOW, high: float = RIC_HIGH):
    """RiC's online targets: every objective drawn uniformly in [low, high], then every objective
    but the lowest set to high."""
    goals = [rng.uniform(low, high) for _ in range(objectives)]
    lowest = min(range(objectives), key=lambda i: goals[i])
    return tuple(g if i == lowest else high for i, g in enumerate(goals))


def ric_keep(rewards: torch.Tensor, quantile: float = RIC_QUANTILE) -> list[bool]:
    """MORS's rejection: keep a sample whose normalised reward on ANY objective is at or above that
    objective's `quantile` over the samples (rewards (N, m))."""
    thresholds = torch.quantile(rewards, quantile, dim=0)
    return (rewards >= thresholds).any(dim=1).tolist()


def conditional_rows(pref_rows: list[dict], seed: int) -> tuple[list[dict], list[tuple[float, float]]]:
    """Stage 0's conditional SFT data [R: RiC's offline stage with PRO's weights]: both answers of
    every offline row, each conditioned on the trade-off it realised, c(w^(x, y)) with w^ =
    softmax(normalised reward signal / T_w); and the normalisation statistics. Also returns the
    rows' order: chosen then rejected per offline row, in the rows' order."""
    rng = random.Random(seed)
    answers = [(row["prompt"], row[key][-1]["content"]) for row in pref_rows for key in ("chosen", "rejected")]
    rewards = [mo.reward_signal(prompt, answer, rng) for prompt, answer in answers]
    stats = mo.reward_stats(rewards)
    realised = realised_weights(torch.tensor([mo.normalise(r, stats) for r in rewards], dtype=torch.float64))
    rows = [
        {
            "prompt": mo.conditioned(prompt, tuple(w)),
            "messages": [
                {"role": "user", "content": mo.conditioned(prompt, tuple(w))},
                {"role": "assistant", "content": answer},
            ],
        }
        for (prompt, answer), w in zip(answers, realised.tolist())
    ]
    return rows, stats


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    # two "prompts" of token ids: tag 1 (strict) and tag 2 (lax), with a few shared letter ids
    generator = torch.Generator().manual_seed(0)
    tags = torch.randint(1, 3, (256,), generator=generator)
    ids = torch.cat([tags.view(-1, 1), torch.randint(3, 13, (256, 4), generator=generator)], dim=1)
    mask = torch.ones_like(ids)
    targets = torch.where(tags.view(-1, 1) == 1, torch.tensor([0.2, 0.8]), torch.tensor([0.8, 0.2]))
    learner = WeightLearner(vocab_size=16, interval=1)
    before = learner.weights(ids, mask)
    learner.fit(ids, mask, targets, epochs=20)
    after = learner.weights(ids, mask)
    for tag, name in ((1, "strict"), (2, "lax")):
        rows = tags == tag
        print(
            f"{name}: g_phi(x) before {before[rows].mean(0).tolist()} after {after[rows].mean(0).tolist()} "
            f"(target {targets[rows][0].tolist()})"
        )


if __name__ == "__main__":
    main()
