"""
Evaluation: gold / reward-model win rates, reward statistics, benchmark answer exports, plots.

Concern (SPEC sections 5, 8 and 9); written in the evaluate.py issue:
- the toy reproduction: every method and ablation over several seeds, gold mean score, win rate
  against SFT, annotation ratio and time per phase, written to results.md / results.json;
- real models: AlpacaEval 2, Arena-Hard and MT-Bench answer files from the user's question files,
  reward-model statistics and implicit-reward preference accuracy on test_prefs;
- plots (matplotlib optional): meta-learner curves, sampled vs unsampled scatter, reward over
  iterations.

Run (once that issue lands)
    python evaluate.py --compare
"""
