"""``kdistill params MODEL``: a model's parameter tree with counts and shares."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``params`` to the ``kdistill`` subcommands; its handler is :func:`run` (set as ``func``)."""
    parser = subparsers.add_parser("params", help="parameter tree of a model with counts and shares")
    parser.add_argument("model", help="a model directory, hub id, packaged:NAME or run directory")
    parser.add_argument("--depth", type=int, default=2)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the model (a run directory's student) and print its tree to ``--depth``; 0 on success."""
    # imported here so that `kdistill --help` does not import torch
    from kdistill.errors import InvalidArgumentError
    from kdistill.models.loading import load_any_model
    from kdistill.models.params import format_parameter_tree, parameter_tree
    from kdistill.runs.targets import model_dir

    if args.depth < 0:
        raise InvalidArgumentError(f"--depth must be >= 0 (0: the whole model, 1: its children), got {args.depth}")
    model = load_any_model(model_dir(args.model))
    print(format_parameter_tree(parameter_tree(model, args.depth)))
    return 0
