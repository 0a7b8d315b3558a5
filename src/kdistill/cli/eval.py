"""``kdistill eval TARGET``: score a run's student (or any model) on one split of the run's data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``eval`` to the ``kdistill`` subcommands; its handler is :func:`run` (set as ``func``)."""
    parser = subparsers.add_parser("eval", help="score a run's student (or any model) on a split")
    parser.add_argument("target", help="a run directory, a model directory or hub id")
    parser.add_argument("--config", help="run YAML giving the task and data (default: the run's config.yaml)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--out", help="write the metrics to this JSON file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the config")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Evaluate the target, print its metrics and write them to ``--out``; 0 on success."""
    # imported here so that `kdistill --help` does not import torch
    from kdistill.runs.targets import evaluate_target

    path, metrics = evaluate_target(args.target, config_path=args.config, split=args.split, overrides=args.overrides)
    print(f"{path} on {args.split}:")
    for key, value in metrics.items():
        print(f"  {key:<20}{value:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2))
    return 0
