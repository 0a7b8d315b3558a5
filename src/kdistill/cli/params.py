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
    from kdistill._io import trimmed_vocabulary

    directory = model_dir(args.model)
    model = load_any_model(directory)
    print(format_parameter_tree(parameter_tree(model, args.depth)))
    record = trimmed_vocabulary(directory)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if record and embedding is not None:
        kept, of, width = int(record["kept"]), int(record["of"]), int(embedding.embedding_dim)
        total = sum(p.numel() for p in model.parameters())
        saved = (of - kept) * width
        print(
            f"vocabulary trimmed to {kept:,} of {of:,} word pieces: {saved:,} embedding parameters saved "
            f"({total:,} in all instead of {total + saved:,}, {(total + saved) / total:.2f}x fewer)"
        )
    return 0
