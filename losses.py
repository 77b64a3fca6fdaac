"""
Per-sequence log-probabilities and every preference objective.

Concern (SPEC sections 3 and 10); written in the losses.py issue:
- the fused per-sequence log-prob kernel: sum of the response tokens' log-probs from the final
  hidden states and the LM-head weight, a hand-written autograd Function in plain PyTorch (no
  Triton) that never materialises the [tokens, vocab] logits, and the thin wrapper module that
  runs trunk -> final norm -> kernel inside one forward so it can be the FSDP2 root;
- preference scores (Eq. 4, and Eq. A.9 for SimPO); the DPO, IPO, SimPO, KTO and SLiC-HF losses;
  the Bradley-Terry reward-model loss (Eq. 1); the meta-weighted loss (Eq. 5) and the meta loss
  (Eq. 6), all pure functions of log-prob tensors.

Run (once that issue lands)
    python losses.py            # self-check: the fused kernel against the naive one
    python losses.py --bench    # speed and memory table against naive and torch's own kernel
"""
