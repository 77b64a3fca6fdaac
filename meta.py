"""
The meta-learner, Bernoulli gating and the meta buffer: everything of MetaAPO that is not the policy.

What it does (docs/algorithm.md: the meta-learner, Eq. 6 and its update, the ablations)
- `MetaLearner` h_phi: features -> weight in (0, 1). Linear(1 -> 100) -> tanh -> Linear(100 -> 1)
  -> sigmoid, every weight 0.1 and every bias 0, so h(l) = sigmoid(10 tanh(0.1 l)): h(0) = 0.5,
  increasing, near 0 for strongly negative preference scores. Ablations: depth 5 (three more
  100 -> 100 tanh layers, weights 1/100 so that it starts near the depth-2 curve) and the `multi`
  input (l_off with the chosen and rejected log-ratios).
- `gate`: Algorithm 1 lines 7-12 as an explicit loop. For each offline tuple, w = h(l_off) and
  u ~ U(0, 1) from a seeded generator; the prompt goes to generation when u > w. Ablations:
  `random` (u < --random_ratio), `threshold` (l_off < tau, or tau calibrated to a share), `all`.
- `MetaBuffer`: the detached (l_off, l_on, features) of each policy step, appended explicitly.
- `MetaController.update`: every T_meta policy steps, ONE AdamW step (lr 5e-3, weight decay 1e-4,
  gradient-norm clip 1.0) on the mean Eq. 6 gradient over the whole buffer, then the buffer is
  cleared: what the reference implementation's DeepSpeed engine does with its 8 accumulated
  chunks (docs/algorithm.md#meta-update). In a distributed run every rank buffers its own share, the
  meta-learner is replicated, and the gradients are summed across ranks and divided by the
  global entry count, so every rank keeps the same phi, the phi a single process gets on the
  union of the shares. After each update, h on a fixed grid (CURVE_GRID) is returned for the log.
- Loss weights for Eq. 5: `meta` (h), `uniform` (0.5), `fixed` (sigmoid(l_off), no training).
- `state_dict` / `load_state_dict` cover the meta-learner, its optimizer, the buffer and the
  gating generator, so a resumed run continues exactly.

Run
    python meta.py        # self-check: trains h on a synthetic buffer where online pairs beat
                          # offline ones below l = -1.5 and not above (one AdamW step per update,
                          # as in training), prints the learned curve beside the initial one
Distributed use is through train.py (torchrun); the tests run the update on 2 gloo processes.

Deliberate simplifications
- The initialisation makes all 100 hidden units identical, and gradient descent keeps them so:
  the network behaves like a single tanh unit. This is the specified (and the reference
  implementation's) initialisation, kept as is.
- Gating is deterministic given the generator state and the list of scores: for identical
  decisions on every rank, train.py gives every rank the same scores and the same seed.
"""

from __future__ import annotations

import argparse
import copy
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

from losses import meta_loss, preference_score

SAMPLING_MODES = ("meta", "random", "threshold", "all")
WEIGHTING_MODES = ("meta", "uniform", "fixed")
INPUT_MODES = ("score", "multi")


class MetaLearner(nn.Module):
    """h_phi: (B, n_features) -> (B,) weights in (0, 1)."""

    def __init__(self, depth: int = 2, inputs: str = "score", width: int = 100):
        super().__init__()
        if depth < 2:
            raise ValueError(f"meta-learner depth must be >= 2 linear layers, got {depth}")
        if inputs not in INPUT_MODES:
            raise ValueError(f"meta-learner inputs must be one of {INPUT_MODES}, got {inputs!r}")
        self.inputs = inputs
        layers: list[nn.Module] = [nn.Linear(1 if inputs == "score" else 3, width), nn.Tanh()]
        for _ in range(depth - 2):
            layers += [nn.Linear(width, width), nn.Tanh()]
        layers += [nn.Linear(width, 1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                # 0.1 for the input and output layers (docs/algorithm.md#meta-learner); a hidden
                # (width x width) layer gets 1/width, so it maps tanh(a) to tanh(tanh(a)) and the deep
                # ablation starts near the depth-2 curve instead of a step (0.1 there would multiply
                # by 10 per layer)
                hidden = layer.in_features == layer.out_features == width
                nn.init.constant_(layer.weight, 1.0 / width if hidden else 0.1)
                nn.init.zeros_(layer.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


def meta_input_score(
    objective: str,
    beta: float,
    meta_input_beta: float,
    score: torch.Tensor,
    policy: torch.Tensor,
    ref: torch.Tensor | None,
    offset: int = 0,
) -> torch.Tensor:
    """h's input for the pairs in rows offset, offset + 1 of the (rows, B) log-probs `policy` and
    `ref` (docs/algorithm.md#meta-learner): Eq. 4's score with meta_input_beta in place of beta
    (1.0 = the reference code's unscaled log sigmoid(Delta)). Under the default (0: beta), and
    for simpo (Eq. A.9 already holds its beta), the score itself."""
    if objective == "simpo" or meta_input_beta in (0.0, beta):
        return score
    return preference_score(policy[offset], policy[offset + 1], ref[offset], ref[offset + 1], meta_input_beta)


def meta_features(
    offline_scores, chosen_logratios=None, rejected_logratios=None, inputs: str = "score"
) -> torch.Tensor:
    """The meta-learner's input, detached: (B, 1) = [l_off], or (B, 3) = [l_off, log pi/pi_ref(y_w),
    log pi/pi_ref(y_l)] for the `multi` ablation."""
    if inputs == "score":
        return offline_scores.detach().float()[:, None]
    if chosen_logratios is None or rejected_logratios is None:
        raise ValueError("the 'multi' meta-learner input needs the chosen and rejected log-ratios")
    return torch.stack([offline_scores, chosen_logratios, rejected_logratios], dim=1).detach().float()


class GateDecision(NamedTuple):
    weights: torch.Tensor  # (n,) w = h(l_off) used for the decision
    draws: torch.Tensor  # (n,) u ~ U(0, 1)
    selected: torch.Tensor  # (n,) bool: the prompt gets K fresh responses


def gate(
    offline_scores: torch.Tensor,
    weights: torch.Tensor,
    mode: str,
    generator: torch.Generator,
    threshold: float = math.log(0.5),
    random_ratio: float = 0.5,
    threshold_ratio: float = 0.0,
) -> GateDecision:
    """Algorithm 1 lines 7-12: decide, tuple by tuple, which prompts go to online generation.

    meta: u > w (the lower the weight, the likelier the prompt is generated); random: u <
    random_ratio; threshold: l_off < tau (default log 0.5: the policy prefers the rejected answer),
    or with threshold_ratio > 0, tau calibrated to send that share of the tuples: those of lowest
    l_off (ties by position); all: every prompt. The draws are taken in every mode so the
    generator advances the same way.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling mode must be one of {SAMPLING_MODES}, got {mode!r}")
    draws = torch.rand(len(offline_scores), generator=generator, dtype=torch.float64)
    if mode == "threshold" and threshold_ratio > 0:
        lowest = sorted(range(len(offline_scores)), key=lambda i: offline_scores[i].item())
        calibrated = set(lowest[: round(threshold_ratio * len(offline_scores))])
    selected = []
    for score, weight, u in zip(offline_scores.tolist(), weights.tolist(), draws.tolist()):
        if mode == "meta":
            selected.append(u > weight)
        elif mode == "random":
            selected.append(u < random_ratio)
        elif mode == "threshold" and threshold_ratio > 0:
            selected.append(len(selected) in calibrated)
        elif mode == "threshold":
            selected.append(score < threshold)
        else:
            selected.append(True)
    return GateDecision(weights.detach().cpu(), draws, torch.tensor(selected, dtype=torch.bool))


def ranking_auc(scores: list[float], labels: list[bool]) -> float | None:
    """How well `scores` rank the True labels above the False ones: the probability that a random
    True item scores higher than a random False one, ties counting half (the Mann-Whitney AUC);
    0.5 = no better than chance. None when either class is empty. Gate diagnostics use it with
    scores 1 - w, the gate's probability of sending a tuple to generation."""
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    if not positives or not negatives:
        return None
    ordered = sorted(scores)
    rank = {}  # a score's mean 1-based rank among all scores (tied scores share it)
    i = 0
    while i < len(ordered):
        j = i
        while j < len(ordered) and ordered[j] == ordered[i]:
            j += 1
        rank[ordered[i]] = (i + 1 + j) / 2
        i = j
    rank_sum = sum(rank[s] for s in positives)
    return (rank_sum - len(positives) * (len(positives) + 1) / 2) / (len(positives) * len(negatives))


class MetaBuffer:
    """Detached (l_off, l_on, features) of recent policy steps: Algorithm 1's B_meta."""

    def __init__(self):
        self.offline_scores: list[float] = []
        self.online_scores: list[float] = []
        self.features: list[list[float]] = []
        self.steps = 0  # policy steps appended since the last clear

    def append(self, offline_scores: torch.Tensor, online_scores: torch.Tensor, features: torch.Tensor) -> None:
        """Append one policy step's scores (this rank's share of the batch)."""
        for offline, online, feature in zip(offline_scores.tolist(), online_scores.tolist(), features.tolist()):
            self.offline_scores.append(offline)
            self.online_scores.append(online)
            self.features.append(feature)
        self.steps += 1

    def __len__(self) -> int:
        return len(self.offline_scores)

    def clear(self) -> None:
        self.offline_scores, self.online_scores, self.features, self.steps = [], [], [], 0

    def state_dict(self) -> dict:
        return {
            "offline_scores": list(self.offline_scores),
            "online_scores": list(self.online_scores),
            "features": [list(f) for f in self.features],
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.offline_scores = list(state["offline_scores"])
        self.online_scores = list(state["online_scores"])
        self.features = [list(f) for f in state["features"]]
        self.steps = state["steps"]


# A fixed grid of preference scores on which h is logged after every meta update (metrics.jsonl)
# and plotted (evaluate.py): the curve of Fig. 3 right, update by update.
CURVE_GRID = (-8.0, -6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.75, -0.5, -0.25, 0.0)


class MetaController:
    """The meta-learner with its optimizer, buffer and gating generator."""

    def __init__(
        self,
        depth: int = 2,
        inputs: str = "score",
        lr: float = 5e-3,
        interval: int = 8,
        sampling: str = "meta",
        weighting: str = "meta",
        threshold: float = math.log(0.5),
        random_ratio: float = 0.5,
        threshold_ratio: float = 0.0,
        seed: int = 0,
        device: str | torch.device = "cpu",
        weight_decay: float = 1e-4,
        grad_clip: float = 1.0,
    ):
        if weighting not in WEIGHTING_MODES:
            raise ValueError(f"weighting mode must be one of {WEIGHTING_MODES}, got {weighting!r}")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling mode must be one of {SAMPLING_MODES}, got {sampling!r}")
        self.learner = MetaLearner(depth, inputs).to(device)
        # the reference implementation's meta optimizer: AdamW, lr 5e-3, weight decay 1e-4, clip 1.0
        self.optimizer = torch.optim.AdamW(self.learner.parameters(), lr=lr, weight_decay=weight_decay)
        self.grad_clip = grad_clip
        self.buffer = MetaBuffer()
        self.generator = torch.Generator().manual_seed(seed)
        self.interval, self.sampling, self.weighting = interval, sampling, weighting
        self.threshold, self.random_ratio, self.threshold_ratio = threshold, random_ratio, threshold_ratio
        self.device = torch.device(device)
        self.updates = 0  # optimizer steps of phi so far

    @torch.no_grad()
    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """w for gating and for Eq. 5: h_phi(features), or sigmoid(l_off) for the `fixed` ablation."""
        if self.weighting == "fixed":
            return torch.sigmoid(features[:, 0])
        return self.learner(features.to(self.device))

    def loss_weights(self, features: torch.Tensor) -> torch.Tensor:
        """Eq. 5's w per tuple, a constant: meta and fixed use `weights`, uniform uses 0.5."""
        if self.weighting == "uniform":
            return torch.full((features.shape[0],), 0.5, device=features.device)
        return self.weights(features).to(features.device)

    def gate(self, offline_scores: torch.Tensor, features: torch.Tensor) -> GateDecision:
        """Gating for a list of offline tuples: w = h(features), and l_off for the threshold ablation."""
        return gate(
            offline_scores.cpu(),
            self.weights(features).cpu(),
            self.sampling,
            self.generator,
            self.threshold,
            self.random_ratio,
            self.threshold_ratio,
        )

    @torch.no_grad()
    def curve(self, grid=CURVE_GRID) -> list[float]:
        """h on a grid of scores (the `multi` input with both log-ratios at 0)."""
        scores = torch.tensor(grid, dtype=torch.float32)
        features = (
            scores[:, None] if self.learner.inputs == "score" else torch.stack([scores, 0 * scores, 0 * scores], 1)
        )
        return self.weights(features).cpu().tolist()

    def ready(self) -> bool:
        return self.buffer.steps >= self.interval

    def update(self) -> dict:
        """Eq. 6 on the buffer: ONE AdamW step on the gradient of the mean meta loss over every
        rank's entries (clipped to grad_clip), then clear the buffer.

        The reference implementation computes this mean in 8 accumulated chunks inside a DeepSpeed
        engine, which is still one optimizer step per update (docs/algorithm.md#meta-update). Collective in a
        distributed run: every rank must call it at the same policy step. Returns the meta loss
        and statistics over all ranks' entries, and h on CURVE_GRID after the step.
        """
        if self.weighting == "fixed":  # the heuristic is never trained
            self.buffer.clear()
            return {}
        n_inputs = self.learner.net[0].in_features
        features = torch.tensor(self.buffer.features, dtype=torch.float32, device=self.device).reshape(
            len(self.buffer), n_inputs
        )
        offline = torch.tensor(self.buffer.offline_scores, dtype=torch.float32, device=self.device)
        online = torch.tensor(self.buffer.online_scores, dtype=torch.float32, device=self.device)
        parameters = list(self.learner.parameters())
        self.optimizer.zero_grad(set_to_none=False)
        weights = self.learner(features)
        loss = meta_loss(weights, offline, online).sum()  # this rank's entries; divided by the global count below
        loss.backward()
        # one all-reduce: gradient sums, then loss, count, l_off, l_on, online-better and h sums over the entries
        sums = torch.stack(
            [
                loss.detach(),
                torch.tensor(float(len(offline)), device=self.device),
                offline.sum(),
                online.sum(),
                (online > offline).float().sum(),
                weights.detach().sum(),
            ]
        )
        flat = torch.cat([p.grad.flatten() for p in parameters] + [sums])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat)
        totals = flat[-len(sums) :].tolist()
        count = totals[1]
        grad_norm = 0.0
        if count > 0:
            offset = 0
            for p in parameters:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p) / count)
                offset += p.numel()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, self.grad_clip))
            self.optimizer.step()
            self.updates += 1
        self.buffer.clear()
        n = max(count, 1.0)
        return {
            "meta_loss": totals[0] / n,
            "meta_entries": int(count),
            "meta_l_off": totals[2] / n,
            "meta_l_on": totals[3] / n,
            "meta_online_better": totals[4] / n,
            "meta_h_before": totals[5] / n,
            "meta_grad_norm": grad_norm,
            "meta_updates": self.updates,
            "h_curve": self.curve(),
        }

    def state_dict(self) -> dict:
        return {
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "buffer": self.buffer.state_dict(),
            "generator": self.generator.get_state(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        state = copy.deepcopy(state)  # the optimizer would otherwise share state tensors with the source
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        self.generator.set_state(state["generator"])
        self.updates = state["updates"]


# ----------------------------------------------------------------------------------------------
# Self-check


def main() -> None:
    parser = argparse.ArgumentParser(description="Train h on a synthetic buffer and print the learned curve.")
    parser.add_argument(
        "--updates",
        type=int,
        default=60,
        help="meta-learner updates (one AdamW step each, on T_meta policy steps' entries)",
    )
    parser.add_argument("--crossover", type=float, default=-1.5, help="online pairs beat offline ones below this score")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    controller = MetaController(seed=args.seed)
    initial = controller.curve()
    batch = 128
    for _ in range(args.updates):
        for _ in range(controller.interval):  # one policy step's scores
            offline = -torch.rand(batch) * 6  # l_off in (-6, 0]
            gain = torch.where(offline < args.crossover, 0.5, -0.5) + 0.2 * torch.randn(batch)
            online = torch.clamp(offline + gain, max=0.0)
            controller.buffer.append(offline, online, meta_features(offline))
        stats = controller.update()
    learned = controller.curve()
    print(
        f"synthetic buffer: l_off ~ U(-6, 0); l_on - l_off ~ +0.5 below l = {args.crossover}, -0.5 above (noise 0.2); "
        f"{args.updates} updates of {controller.interval} x {batch} entries; last meta loss {stats['meta_loss']:.3f}"
    )
    print("   l_off   h initial   h learned")
    for score, a, b in zip(CURVE_GRID, initial, learned):
        print(f"  {score:6.2f}   {a:9.3f}   {b:9.3f}")
    print("h is low where online pairs beat offline ones (generate, weight online) and high where they do not.")


if __name__ == "__main__":
    main()
