"""
The research record's code: comparisons over many train.py runs, their tables and plots, and a
second algorithm (the Meta-Aligner). Nothing outside experiments/ imports it; it builds on the
algorithm and the engine one way (tests/test_repo.py checks both).

Run (from the repository's root; each experiment is a module with its own flags, then train.py's)
    python -m experiments.compare                       # the toy's Tables 1 / 2 / 8 over seeds
    python -m experiments.boundary_grid                 # the on-policy/static boundary method's grid
    python -m experiments.dynamics --plots=out/toy-seed0/metaapo   # a MetaAPO stage's dynamics
    python -m experiments.meta_aligner.pareto           # the Meta-Aligner's Pareto fronts
    torchrun --nproc_per_node 2 -m experiments.compare ...          # the same, generation and scoring sharded
experiments/README.md lists each one's question and the document its results are in.

Deliberate simplifications
- `run_experiment` below parses an experiment's own flags and hands the rest to
  evaluate.run_program, the frame evaluate.py runs in (config, process, one-line errors).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import config
import engine
import evaluate


def experiment_parser(program: str, doc: str, cls: type[config.Config] = config.Config) -> argparse.ArgumentParser:
    """An experiment's argparse parser: its module docstring's first paragraph as description,
    the config (train.py's, or an experiment's subclass `cls`) listed after its own flags: every
    other --key=value is a config key."""

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    return argparse.ArgumentParser(
        prog=f"python -m {program}",
        description=doc.strip().split("\n\n")[0],
        formatter_class=Formatter,
        epilog="Every other --key=value is a config key:\n\n" + config.config_help("", cls).split("\n\n", 2)[2],
    )


def run_experiment(
    program: str,
    parser: argparse.ArgumentParser,
    work: Callable[[argparse.Namespace, config.Config, list[str], engine.Runtime], object],
    argv: list[str] | None = None,
    cls: type[config.Config] = config.Config,
) -> None:
    """Parse an experiment's own flags; the rest is the config, and evaluate.run_program (the frame
    evaluate.py runs in too) checks it, starts the process and runs work(args, cfg, rest, rt)."""
    args, rest = parser.parse_known_args(argv)
    evaluate.run_program(program, args, rest, work, cls)
