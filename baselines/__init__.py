"""
Methods the paper compares MetaAPO with that need more than an offline objective (dpo.py) or
Algorithm 1's iteration structure (train.py): OpenRLHF-style PPO, Selective DPO's reference runs,
and seed 004's alignment-stage boundary. Each file is one method on the engine (fsdp.py,
checkpoint.py); `python train.py --method=ppo | selective_dpo | stage` runs them.
"""
