"""
Per-sequence log-probabilities and every preference objective.

What it does
- `sequence_logprobs`: for each sequence of a batch, the sum (or mean) of its response tokens'
  log-probs, computed from the final hidden states and the LM-head weight by a hand-written
  autograd Function that never materialises the [tokens, vocab] logits. Only response rows are
  selected (after the one-token shift) before any matmul; the vocabulary is processed in tiles
  whose logits are recomputed in backward; logsumexp, the target logit and every reduction of the
  gradients are fp32 whatever the input dtype (each bf16 gradient element is rounded once).
- `LogprobModel`: the thin wrapper that runs trunk -> final norm -> kernel inside one `forward`,
  so that under FSDP2 it can be the root module and the kernel sees the gathered head weight.
- The objectives, pure functions of per-sequence log-prob tensors with the equation (docs/algorithm.md) in the
  docstring, each returning per-pair losses and detached implicit rewards for logging: DPO (with
  cDPO label smoothing), IPO, SimPO, KTO, SLiC-HF, the Bradley-Terry reward-model loss (Eq. 1),
  the preference scores (Eq. 4 and A.9), the meta-weighted loss (Eq. 5) and the meta loss (Eq. 6).

Run
    python losses.py              # self-check: kernel against the naive logits path, small shapes
    python scripts/bench_kernel.py   # its speed and memory beside the naive path and torch's op
Nothing here is distributed; train.py normalises losses by the global pair count.

Deliberate simplifications
- The kernel is plain PyTorch: each vocabulary tile's logits are one matmul into an fp32 buffer
  (on CUDA a bf16 x bf16 -> fp32 matmul, on CPU an fp32 matmul), so a tile of the chunk_size x
  vocab budget costs chunk_size x vocab x 4 bytes; no Triton, no fused softmax in the matmul.
- In bf16 the backward keeps an fp32 (rows, hidden) accumulator for the hidden gradient and
  rounds each tile of the weight gradient once from an fp32 matmul output: about 3 x rows x
  hidden x 4 bytes more than a bf16 running sum (0.4 GiB at 8192 x 4096); the weight gradient's
  error is then within 1.3x of one rounding's (0.7x on CPU), where the running sum measured 2.9x
  (tests/test_losses.py).
"""

from __future__ import annotations

import argparse
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# The fused per-sequence log-prob kernel


def default_chunk_size(device: torch.device) -> int:
    """The kernel's working set, in rows of the vocabulary: it holds chunk_size x vocab fp32 logits
    at a time (see FusedTokenLogprobs). CPU: 512; 256 to 1024 measured within each other's noise
    in `python scripts/bench_kernel.py --chunk_sizes ...` (docs/benchmarks.md). CUDA: 256 (a 125 MiB logits buffer at
    V = 128256), not yet timed on a GPU: `scripts/gpu_check.sh` prints the table that should choose it."""
    return 256 if device.type == "cuda" else 512


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16 / fp16 / fp32 inputs; fp64 stays fp64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in the compute dtype (fp32, or fp64 for fp64 inputs). On CUDA
    cuBLAS reads bf16 / fp16 and writes fp32 directly (torch.mm out_dtype), so a long reduction is
    rounded once, to fp32; the CPU gets fp32 inputs (FusedTokenLogprobs upcasts them there)."""
    if a.dtype in (torch.float16, torch.bfloat16) and a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a @ b


def _vocab_tiles(rows: int, vocab: int, chunk_size: int) -> list[tuple[int, int]]:
    """Column ranges of the vocabulary such that a (rows, tile) logits block holds about
    chunk_size x vocab values."""
    width = max(1, min(vocab, chunk_size * vocab // max(1, rows)))
    return [(start, min(start + width, vocab)) for start in range(0, vocab, width)]


def _target_in_tile(targets: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows whose target lies in columns [start, end), each row's target column clamped into the
    tile): masks and gathers without a host-device synchronisation."""
    return (targets >= start) & (targets < end), (targets - start).clamp(0, end - start - 1)[:, None]


class FusedTokenLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] per row, without the (rows, vocab) logits.

    The vocabulary is cut into column tiles (_vocab_tiles); a tile's logits for every row are one
    matmul into an fp32 buffer. forward keeps a running logsumexp over the tiles and the target
    logit; it saves only the inputs and the per-row logsumexp. backward recomputes each tile's
    logits; d logp / d logits = onehot(target) - softmax, scaled by the incoming gradient; the
    tile's weight gradient is one matmul over all rows (each element rounded once, from fp32), the
    hidden gradient is summed over the tiles in fp32 and rounded once at the end.
    Tiling the vocabulary rather than the rows streams the (V, H) head once per pass instead of
    once per row chunk: for N < V rows that is V / N times less memory traffic for the same buffer.
    On CPU, bf16 / fp16 inputs are upcast to fp32 first (tests only; CUDA reads bf16 directly).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        # hidden (N, H), weight (V, H), targets (N,) -> token log-probs (N,), fp32 (fp64 for fp64 inputs)
        n, dtype = hidden.shape[0], _compute_dtype(hidden.dtype)
        h, w = (hidden, weight) if hidden.is_cuda else (hidden.to(dtype), weight.to(dtype))
        logsumexp = torch.full((n,), -math.inf, dtype=dtype, device=hidden.device)
        target_logit = torch.zeros(n, dtype=dtype, device=hidden.device)
        for start, end in _vocab_tiles(n, weight.shape[0], chunk_size):
            logits = _mm(h, w[start:end].t())  # (N, tile) fp32
            logsumexp = torch.logaddexp(logsumexp, torch.logsumexp(logits, dim=-1))
            inside, column = _target_in_tile(targets, start, end)
            target_logit = torch.where(inside, logits.gather(1, column).squeeze(1), target_logit)
            del logits
        ctx.save_for_backward(hidden, weight, targets, logsumexp)
        ctx.chunk_size = chunk_size
        return target_logit - logsumexp

    @staticmethod
    def backward(ctx, grad_logprobs):
        hidden, weight, targets, logsumexp = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = logsumexp.dtype
        h, w = (hidden, weight) if hidden.is_cuda else (hidden.to(dtype), weight.to(dtype))
        grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad = grad_logprobs.to(dtype)[:, None]  # (N, 1)
        for start, end in _vocab_tiles(hidden.shape[0], weight.shape[0], ctx.chunk_size):
            # softmax, then d logp / d logits scaled by grad, all in the one (N, tile) fp32 buffer
            grad_logits = _mm(h, w[start:end].t()).sub_(logsumexp[:, None]).exp_().mul_(-grad)
            inside, column = _target_in_tile(targets, start, end)
            grad_logits.scatter_add_(1, column, torch.where(inside[:, None], grad, 0.0))
            grad_logits = grad_logits.to(h.dtype)  # bf16 on CUDA: frees the fp32 buffer before the matmuls
            if need_hidden:
                grad_hidden += _mm(grad_logits, w[start:end])  # (N, H), summed over the tiles in fp32
            if need_weight:
                grad_weight[start:end] = _mm(grad_logits.t(), h)  # (tile, H): every row in one matmul
            del grad_logits
        return (grad_hidden.to(hidden.dtype) if need_hidden else None), grad_weight, None, None


def select_response_rows(hidden_states: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor):
    """The hidden state that predicts each response token, its target id and its sequence.

    hidden_states (B, T, H), input_ids (B, T), response_mask (B, T) with response_mask[b, t] = 1
    where input_ids[b, t] is a response token. Token t is predicted from position t - 1, so a
    response token at position 0 has no prediction and is an error.
    Returns rows (N, H), targets (N,), sequence index (N,).
    """
    if response_mask.shape != input_ids.shape or hidden_states.shape[:2] != input_ids.shape:
        raise ValueError(
            f"shapes disagree: hidden {tuple(hidden_states.shape)}, input_ids {tuple(input_ids.shape)}, response_mask "
            f"{tuple(response_mask.shape)}"
        )
    response_mask = response_mask.bool()
    if response_mask[:, 0].any():
        raise ValueError(
            "a response token at position 0 has no hidden state to predict it; every sequence needs a prompt"
        )
    mask = response_mask[:, 1:]  # (B, T-1): targets at positions 1..T-1
    rows = hidden_states[:, :-1][mask]  # (N, H)
    targets = input_ids[:, 1:][mask]  # (N,)
    sequence = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(mask)[mask]
    return rows, targets, sequence


def sequence_logprobs(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_size: int | None = None,
    average: bool = False,
) -> torch.Tensor:
    """Sum (average=True: mean, for SimPO) of the response tokens' log-probs per sequence, (B,) fp32.

    hidden_states are the final hidden states after the final norm (B, T, H); lm_head_weight is
    the (V, H) output embedding, tied or not. A sequence without response tokens gets 0.
    """
    rows, targets, sequence = select_response_rows(hidden_states, input_ids, response_mask)
    token_logprobs = FusedTokenLogprobs.apply(
        rows, lm_head_weight, targets, chunk_size or default_chunk_size(rows.device)
    )
    batch = input_ids.shape[0]
    total = torch.zeros(batch, dtype=token_logprobs.dtype, device=rows.device).index_add(0, sequence, token_logprobs)
    if average:
        count = torch.zeros_like(total).index_add_(0, sequence, torch.ones_like(token_logprobs))
        total = total / count.clamp(min=1)
    return total


def token_logprobs(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Each response token's log-prob in place, (B, T) fp32 (0 elsewhere), by the same fused
    kernel: what PPO's per-token ratios and KL penalty need."""
    rows, targets, _ = select_response_rows(hidden_states, input_ids, response_mask)
    values = FusedTokenLogprobs.apply(rows, lm_head_weight, targets, chunk_size or default_chunk_size(rows.device))
    out = values.new_zeros(input_ids.shape)
    out[:, 1:][response_mask[:, 1:].bool()] = values
    return out


def naive_sequence_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """The reference: full fp32 log_softmax over (B, T, V) logits, gather, masked sum (or mean)."""
    logits = logits[:, :-1].to(_compute_dtype(logits.dtype))
    logprobs = torch.log_softmax(logits, dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)  # (B, T-1)
    mask = response_mask[:, 1:].to(logprobs.dtype)
    total = (logprobs * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


# Config attributes of HF models whose logits are not simply hidden @ head.T. The kernel would
# silently compute something else for them, so the wrapper refuses them.
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": lambda v: v is not None,  # Gemma 2 / 3: tanh soft-capping
    "logit_scale": lambda v: v is not None and v != 1.0,  # Cohere: logits multiplied by it
    "logits_scaling": lambda v: v is not None and v != 1.0,  # Granite: logits divided by it
}


class LogprobModel(nn.Module):
    """A causal LM whose forward returns per-sequence response log-probs.

    Runs the trunk (with its final norm) and the fused kernel inside one forward, so the module
    can be the FSDP2 root: outside the root's forward the head weight is only a shard, inside it
    is the gathered weight the kernel needs. `lm` stays the plain HF model (save_pretrained,
    generate).
    """

    def __init__(self, lm: nn.Module, chunk_size: int | None = None):
        super().__init__()
        config = lm.config
        for attr, transforms in LOGIT_TRANSFORMS.items():
            value = getattr(config, attr, None)
            if transforms(value):
                raise NotImplementedError(
                    f"{config.model_type}: {attr}={value} changes the logits; the fused log-prob kernel only computes "
                    "hidden @ lm_head.T"
                )
        head = lm.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise NotImplementedError(f"{type(lm).__name__} has no output embedding weight for the fused kernel")
        if getattr(head, "bias", None) is not None:
            raise NotImplementedError(
                f"{type(lm).__name__}: the LM head has a bias; the fused kernel computes hidden @ lm_head.T only"
            )
        self.lm = lm
        self.chunk_size = chunk_size

    def forward(
        self, input_ids, attention_mask, response_mask, average: bool = False, per_token: bool = False
    ) -> torch.Tensor:
        """(B,) per-sequence sums (means with average=True); (B, T) per-token log-probs with per_token=True."""
        hidden = self.lm.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        if per_token:
            return token_logprobs(
                hidden, self.lm.get_output_embeddings().weight, input_ids, response_mask, self.chunk_size
            )
        return sequence_logprobs(
            hidden, self.lm.get_output_embeddings().weight, input_ids, response_mask, self.chunk_size, average
        )


# ----------------------------------------------------------------------------------------------
# Objectives. Inputs are per-sequence log-prob tensors of shape (B,); outputs are per-pair.


class PairLoss(NamedTuple):
    losses: torch.Tensor  # (B,) per pair; train.py sums and divides by the global pair count
    chosen_rewards: torch.Tensor  # (B,) detached implicit rewards, for logging
    rejected_rewards: torch.Tensor


def dpo_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """Delta = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)] (Eq. 3)."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def preference_score(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1) -> torch.Tensor:
    """Eq. 4: l(x, y_w, y_l) = log sigmoid(beta * Delta), in (-inf, 0]; higher = the policy agrees
    more with the preference. L_DPO = -E[l]. Differentiable; detach it where docs/algorithm.md says so."""
    return F.logsigmoid(beta * dpo_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def simpo_score(policy_chosen_mean, policy_rejected_mean, beta: float = 2.5, gamma: float = 0.6) -> torch.Tensor:
    """Eq. A.9: log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma), taking the
    length-normalised log-probs (sequence_logprobs(..., average=True)). No reference model."""
    return F.logsigmoid(beta * (policy_chosen_mean - policy_rejected_mean) - gamma)


def dpo_loss(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1, label_smoothing: float = 0.0
) -> PairLoss:
    """Eq. 3: -log sigmoid(beta * Delta). With label_smoothing eps (conservative DPO), the label is
    flipped with probability eps: -(1 - eps) log sigmoid(beta Delta) - eps log sigmoid(-beta Delta)."""
    logits = beta * dpo_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return PairLoss(
        losses, (beta * (policy_chosen - ref_chosen)).detach(), (beta * (policy_rejected - ref_rejected)).detach()
    )


def ipo_loss(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1, chosen_len=None, rejected_len=None
) -> PairLoss:
    """IPO (Azar et al. 2024): (Delta - 1/(2 beta))^2. Delta is the margin of SUMMED log-ratios, as
    in IPO's Eq. 17 and the MetaAPO reference code; TRL divides each log-ratio by its response's
    token count first, which passing the lengths (`chosen_len`, `rejected_len`, (B,)) reproduces."""
    if chosen_len is not None:
        policy_chosen, ref_chosen = policy_chosen / chosen_len.clamp(min=1), ref_chosen / chosen_len.clamp(min=1)
        policy_rejected, ref_rejected = (
            policy_rejected / rejected_len.clamp(min=1),
            ref_rejected / rejected_len.clamp(min=1),
        )
    losses = (dpo_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected) - 1 / (2 * beta)) ** 2
    return PairLoss(
        losses, (beta * (policy_chosen - ref_chosen)).detach(), (beta * (policy_rejected - ref_rejected)).detach()
    )


def simpo_loss(policy_chosen_mean, policy_rejected_mean, beta: float = 2.5, gamma: float = 0.6) -> PairLoss:
    """SimPO (Meng et al. 2024): -l_SimPO, the negated Eq. A.9 score; rewards beta * mean log-prob."""
    losses = -simpo_score(policy_chosen_mean, policy_rejected_mean, beta, gamma)
    return PairLoss(losses, (beta * policy_chosen_mean).detach(), (beta * policy_rejected_mean).detach())


def slic_loss(policy_chosen, policy_rejected, delta: float = 1.0, nll_weight: float = 0.1, chosen_len=None) -> PairLoss:
    """SLiC-HF (Zhao et al. 2023): max(0, delta - (log pi(y_w|x) - log pi(y_l|x))) + lambda * NLL(y_w).
    NLL(y_w) = -log pi(y_w|x) summed over its tokens, as in SLiC-HF; with `chosen_len` (B,) it is
    the per-token mean instead, as TRL's CPO trainer takes it (there pooled over the micro-batch's
    tokens; here per sequence). No reference model; the rewards are the log-probs."""
    nll = -policy_chosen if chosen_len is None else -policy_chosen / chosen_len.clamp(min=1)
    losses = torch.relu(delta - (policy_chosen - policy_rejected)) + nll_weight * nll
    return PairLoss(losses, policy_chosen.detach(), policy_rejected.detach())


def kto_reference_kl(policy_mismatched, ref_mismatched, mask=None, sum_over_ranks=None) -> torch.Tensor:
    """KTO's reference point z0: the batch estimate of KL(pi || pi_ref), from log-probs of
    responses paired with another prompt of the batch, clamped at 0 and detached (a scalar).
    `mask` (0 for padding) leaves padding out of the mean; `sum_over_ranks` (an all-reduce of a tensor)
    makes it the mean over every rank's examples."""
    mask = torch.ones_like(policy_mismatched) if mask is None else mask
    totals = torch.stack([((policy_mismatched - ref_mismatched) * mask).sum(), mask.sum()])
    if sum_over_ranks is not None:
        totals = sum_over_ranks(totals)
    return (totals[0] / totals[1].clamp(min=1)).clamp(min=0).detach()


def kto_loss(
    policy,
    ref,
    desirable,
    reference_kl,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PairLoss:
    """KTO (Ethayarajh et al. 2024), unpaired: r = log pi(y|x) - log pi_ref(y|x) per example;
    desirable:   lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable: lambda_U * (1 - sigmoid(beta * (z0 - r)))
    with z0 = kto_reference_kl(...). `desirable` is a bool tensor (B,). The rewards are returned
    as (beta * r where desirable else nan, beta * r where undesirable else nan)."""
    ratio = policy - ref
    desirable = desirable.bool()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - reference_kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (reference_kl - ratio))),
    )
    rewards = (beta * ratio).detach()
    nan = torch.full_like(rewards, float("nan"))
    return PairLoss(losses, torch.where(desirable, rewards, nan), torch.where(desirable, nan, rewards))


def selm_optimism(policy_own, ref_own, alpha: float = 0.001, beta: float = 0.1) -> torch.Tensor:
    """SELM's optimism term (Zhang et al. 2024), added per pair to the DPO loss:
    alpha * beta * (log pi(y|x) - log pi_ref(y|x)) on an answer y the policy itself gave (summed
    log-probs); minimising it lowers the likelihood of the policy's own answer, which pushes
    exploration."""
    return alpha * beta * (policy_own - ref_own)


def bradley_terry_loss(reward_chosen, reward_rejected) -> PairLoss:
    """Eq. 1, the reward-model loss: -log sigmoid(r(x, y_w) - r(x, y_l))."""
    return PairLoss(-F.logsigmoid(reward_chosen - reward_rejected), reward_chosen.detach(), reward_rejected.detach())


def meta_weighted_loss(offline_losses, online_losses, weights) -> torch.Tensor:
    """Eq. 5: w * L_pref(x, y_w, y_l) + (1 - w) * L_pref(x, y_w^on, y_l^on) per tuple, with
    w = h_phi(l_off) entering as a constant: no gradient reaches phi, nor theta through w."""
    weights = weights.detach()
    return weights * offline_losses + (1 - weights) * online_losses


def meta_loss(weights, offline_scores, online_scores) -> torch.Tensor:
    """Eq. 6 per buffer entry: -(h_phi(l_off) * l_off + (1 - h_phi(l_off)) * l_on), >= 0 since the
    scores are <= 0. `weights` = h_phi(l_off) carries the gradient to phi; the stored scores are
    constants. The gradient of the mean is E[(l_on - l_off) * grad h]: when online pairs score
    higher, the offline weight goes down."""
    offline_scores, online_scores = offline_scores.detach(), online_scores.detach()
    return -(weights * offline_scores + (1 - weights) * online_scores)


# ----------------------------------------------------------------------------------------------
# Self-check


def _check_against_naive(device: torch.device) -> None:
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4), (torch.bfloat16, 0.1)):
        batch, length, hidden_size, vocab = 3, 11, 16, 37
        hidden = torch.randn(batch, length, hidden_size, dtype=dtype, device=device, requires_grad=True)
        weight = torch.randn(vocab, hidden_size, dtype=dtype, device=device, requires_grad=True)
        input_ids = torch.randint(0, vocab, (batch, length), device=device)
        response_mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        response_mask[0, 4:] = True
        response_mask[1, 9:] = True  # sequence 2 has no response token
        coefficients = torch.randn(batch, dtype=_compute_dtype(dtype), device=device)
        ours = sequence_logprobs(hidden, weight, input_ids, response_mask, chunk_size=4)
        (ours * coefficients).sum().backward()
        grads = hidden.grad.clone(), weight.grad.clone()
        hidden.grad = weight.grad = None
        naive = naive_sequence_logprobs(hidden @ weight.t(), input_ids, response_mask)
        (naive * coefficients).sum().backward()
        errors = [
            (ours - naive).abs().max().item(),
            (grads[0] - hidden.grad).abs().max().item(),
            (grads[1] - weight.grad).abs().max().item(),
        ]
        status = "ok" if max(errors) < tol else "MISMATCH"
        print(
            f"  {str(dtype):15s} {device.type}: max |diff| value {errors[0]:.2e}, grad hidden {errors[1]:.2e}, grad "
            f"weight {errors[2]:.2e}  (tolerance {tol:g}) {status}"
        )
        if status != "ok":
            raise SystemExit(1)


def main() -> None:
    argparse.ArgumentParser(
        description="Self-check of the fused log-prob kernel against the naive logits path."
    ).parse_args()
    print("fused kernel vs naive log_softmax + gather (3 sequences, one without response tokens, chunks of 4 rows):")
    _check_against_naive(torch.device("cpu"))
    if torch.cuda.is_available():
        _check_against_naive(torch.device("cuda"))


if __name__ == "__main__":
    main()
