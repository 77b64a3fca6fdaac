"""
On-policy generation and online pair construction.

Concern (SPEC sections 2, 4, 5 and 10); written in the sample.py / reward.py issue:
- one API: prompt token ids -> K responses each (token ids, text, finish reason), with
  temperature, top-p, max new tokens and a seed;
- the vLLM backend (GPU): one child process per rank between training phases, token-id prompts,
  `max_tokens` always set, per-rank seeds, results reassembled in the original order; vLLM is
  imported lazily and only here;
- the transformers `generate` backend (CPU and tests): left padding, top_k=0, stop at EOS,
  synced_gpus when sharded;
- best / worst pairs from reward-model scores (the SELM variant adds the offline answers to the
  ranking pool).

Run (once that issue lands)
    python sample.py --model PATH --prompts F.jsonl --n 8 ...   # also the vLLM worker
"""
