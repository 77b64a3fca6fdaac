"""
The methods the paper compares MetaAPO with, beyond the offline objectives (dpo.py): the online
and hybrid baselines' rules inside Algorithm 1's iteration (online.py: online_dpo, selm, adpo,
boundary), the on-policy/static boundary method's measurement (boundary.py), Selective DPO's reference runs
(selective_dpo.py) and OpenRLHF-style PPO (ppo.py). Each file is one concern on the engine
(engine.py, checkpoint.py); `python train.py --method=NAME` runs them.
"""
