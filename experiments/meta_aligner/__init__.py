"""
The Meta-Aligner (reconstructed from seed paper 003's abstract): a second alignment algorithm,
multi-objective with learned preference weights, on a two-objective toy, with its Pareto fronts.

Run (from the repository's root)
    python -m experiments.meta_aligner.meta_aligner     # one method, one seed
    python -m experiments.meta_aligner.pareto           # every method over 3 seeds: fronts, hypervolumes
Its README says what is reconstructed and why, with its results.
"""
