"""``kdistill cache RUN.yaml --out DIR``: run a run's teacher once over its training data, keep its top-k outputs.

The work (and its printed summary) is :func:`kdistill.runs.cache.cmd_cache`; this module holds the arguments.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``cache`` to the ``kdistill`` subcommands; its handler is :func:`run` (set as ``func``)."""
    parser = subparsers.add_parser(
        "cache", help="run a run's teacher once over its training data; keep its top-k outputs on disk (resumable)"
    )
    parser.add_argument("config", help="the run's YAML file (its data, task and teacher are used)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.limit.train=1000")
    parser.add_argument("--out", required=True, help="the cache directory (created; a rerun resumes it)")
    parser.add_argument("--k", default="64", help="log-probabilities kept per position: a number, or 'all'")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=1024, help="examples per shard")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Write (or resume) the cache; 0 on success."""
    # imported here so that `kdistill --help` does not import torch
    from kdistill.runs.cache import cmd_cache

    return cmd_cache(args)
