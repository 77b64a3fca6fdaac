"""
The online and hybrid baselines inside Algorithm 1's iteration: where they differ from MetaAPO.

train.py's `run_iterative` runs every iterative method through the same iteration (phase 1:
choose prompts, generate K answers, rank them with the reward model; phase 2: one epoch of
preference optimisation). MetaAPO chooses with its meta-learner and mixes offline and online
losses with its weights; a baseline does neither: it chooses with a rule of its own and trains
one objective on the pairs its own rule gives. Those two rules, and the few other things that
set a baseline apart, are written here, one small function each:

    method         prompts that get K answers              phase 2 trains on
    online_dpo     every prompt (or --prompt_ratio of      the online pairs
                   them, drawn at random)
    iterative_dpo  as online_dpo; the authors' script:     the online pairs
                   from the SFT model, pi_ref fixed at SFT
    selm           every prompt (offline answers ranked    the online pairs, with SELM's optimism term
                   with the K, the first answer its own)
    adpo           those whose DPO loss -l_off is below    D_t's offline pairs (or, --adpo_offline=
                   --adpo_threshold (l_off: Eq. 4)         selected, the selected tuples') and the online pairs
    boundary       all (on-policy) or none (static), by    the online pairs, or D_t's offline pairs
                   the boundary score (boundary.py)

Run
    python train.py --method=online_dpo    # (selm, adpo, boundary) after the toy's DPO warm-up
    torchrun --nproc_per_node 8 train.py --model tulu8b --method=selm
The boundary measurement itself is baselines/boundary.py.

Deliberate simplifications
- Every baseline trains with MetaAPO's phase 2 (one epoch over its pairs per iteration, a fresh
  AdamW and schedule each iteration, the same checkpoints) and its --objective.
- SELM's answer of its own (for the optimism term) is the first of its K samples; SELM's code
  takes a greedy one.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass

import config


def every_prompt(cfg: config.Config, D_t: list, l_off: list[float] | None, boundary: dict | None) -> list[bool]:
    return [True] * len(D_t)


def random_prompts(cfg: config.Config, D_t: list, l_off: list[float] | None, boundary: dict | None) -> list[bool]:
    """Each prompt with probability --prompt_ratio (1 = every prompt), its draw seeded by its own
    index: the same on every rank and after a resume."""
    if cfg.prompt_ratio >= 1:
        return every_prompt(cfg, D_t, l_off, boundary)
    return [
        random.Random(config.seed_for(cfg, "prompt subset", item.index)).random() < cfg.prompt_ratio for item in D_t
    ]


def adpo_uncertain_prompts(
    cfg: config.Config, D_t: list, l_off: list[float] | None, boundary: dict | None
) -> list[bool]:
    """ADPO generates where the policy is unsure: the tuples whose DPO loss -l_off is below a fixed threshold."""
    return [-score < cfg.adpo_threshold for score in l_off]


def boundary_prompts(cfg: config.Config, D_t: list, l_off: list[float] | None, boundary: dict | None) -> list[bool]:
    """Every prompt in a fine-tuning (on-policy) iteration, none in an injection (static) one."""
    return [boundary["choice"] == "on-policy"] * len(D_t)


def as_offline_pairs(joined: list) -> list:
    """The online pair of each joined tuple in the place of its (chosen, rejected): what a baseline's
    objective trains on."""
    return [
        dataclasses.replace(
            a,
            chosen_ids=a.online_chosen_ids,
            rejected_ids=a.online_rejected_ids,
            online_chosen_ids=None,
            online_rejected_ids=None,
        )
        for a in joined
    ]


def online_pairs(D_t: list, joined: list, selected: list[bool]) -> list:
    return as_offline_pairs(joined)


def offline_and_online_pairs(D_t: list, joined: list, selected: list[bool]) -> list:
    """ADPO: D_t's offline pairs, then the online ones."""
    return list(D_t) + as_offline_pairs(joined)


def selected_offline_and_online_pairs(D_t: list, joined: list, selected: list[bool]) -> list:
    """ADPO as the authors' merge_dataset_adpo builds it (inferred): the offline pairs of the
    selected tuples, then the online ones."""
    return [item for item, s in zip(D_t, selected) if s] + as_offline_pairs(joined)


def boundary_pairs(D_t: list, joined: list, selected: list[bool]) -> list:
    """On-policy pairs in a fine-tuning iteration, D_t's static pairs in an injection one."""
    return as_offline_pairs(joined) if any(selected) else list(D_t)


@dataclass(frozen=True)
class OnlineBaseline:
    """What sets one baseline's iteration apart from MetaAPO's."""

    select: Callable  # (cfg, D_t, l_off or None, boundary or None) -> which prompts get K answers
    training_pairs: Callable  # (D_t, the tuples joined with their online pair, selected) -> phase 2's pairs
    scores_offline: bool = False  # phase 1 measures l_off (Eq. 4) before choosing
    measures_boundary: bool = False  # phase 1 measures the boundary score (boundary.py) before choosing
    reference_lags: bool = False  # pi_ref one iteration behind, as MetaAPO's; else the iteration's start
    from_sft: bool = False  # starts from the SFT model, pi_ref fixed at SFT (else from the DPO warm-up)
    selm: bool = False  # offline answers ranked with the K, the first answer the policy's own, the optimism term
    # a prompt whose K rewards all tie trains a zero-gradient (y, y) pair (--tied_samples=keep), as the authors'
    # iterative DPO script's pairing gives it; else it is dropped
    keeps_ties: bool = False


BASELINES = {
    "online_dpo": OnlineBaseline(random_prompts, online_pairs, keeps_ties=True),
    "iterative_dpo": OnlineBaseline(random_prompts, online_pairs, from_sft=True, keeps_ties=True),
    "selm": OnlineBaseline(every_prompt, online_pairs, selm=True),
    "adpo": OnlineBaseline(adpo_uncertain_prompts, offline_and_online_pairs, scores_offline=True, reference_lags=True),
    "boundary": OnlineBaseline(boundary_prompts, boundary_pairs, measures_boundary=True),
}


def baseline_for(cfg: config.Config, method: str) -> OnlineBaseline | None:
    """The rules of `method` under cfg (None: MetaAPO); --adpo_offline=selected swaps ADPO's pairs."""
    baseline = BASELINES.get(method)
    if method == "adpo" and cfg.adpo_offline == "selected":
        return dataclasses.replace(baseline, training_pairs=selected_offline_and_online_pairs)
    return baseline
