"""``kdistill losses [--kind KIND]``: the registered loss functions, one a line, with their kind and aliases."""

from __future__ import annotations

import argparse

KINDS = ("divergence", "hard", "feature", "cross_tokenizer")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``losses`` to the ``kdistill`` subcommands; its handler is :func:`run` (set as ``func``)."""
    parser = subparsers.add_parser("losses", help="list the registered loss functions")
    parser.add_argument("--kind", choices=list(KINDS), help="only losses of this kind")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Print each loss's name, kind, first docstring line and aliases; 0."""
    # imported here so that `kdistill --help` does not import torch
    from kdistill.losses import LOSSES

    for name in LOSSES.names(kind=args.kind):
        entry = LOSSES.entry(name)
        doc = (entry.obj.__doc__ or "").strip().splitlines()[0] if entry.obj.__doc__ else ""
        aliases = f" (aliases: {', '.join(entry.aliases)})" if entry.aliases else ""
        print(f"{name:<22}{entry.kind:<17}{doc}{aliases}")
    return 0
