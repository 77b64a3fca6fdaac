"""
Every optimisation in the project: config and presets, distributed setup, FSDP2 sharding, SFT,
reward-model training (Eq. 1), the offline baselines, the MetaAPO loop (Algorithm 1), the online
baselines, and checkpoint save / resume.

Concern (SPEC sections 2, 4, 5, 6, 10); written in the train.py issue:
- one config dataclass, `--key=value` overrides, presets by `--model` (tulu8b, qwen7b, toy, or
  any HF id / local path), `--method` (sft, rm, dpo, ipo, kto, simpo, slic, selective_dpo,
  metaapo and its ablations, online_dpo, selm, adpo);
- torchrun or a plain single process; FSDP2 (`fully_shard` per decoder block, then the root);
- `python train.py` with no arguments runs the whole toy pipeline (SFT -> reward model -> DPO
  warm-up -> MetaAPO) on the embedded task from data.py and prints a results table.

Run (once that issue lands)
    python train.py                                         # the toy pipeline, CPU, minutes
    torchrun --nproc_per_node 8 train.py --model tulu8b     # the paper's Llama-3.1-8B run
"""
