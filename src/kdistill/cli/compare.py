"""``kdistill compare``: teacher against students on a run's data (metric, agreement, size, latency, CKA)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``compare`` to the ``kdistill`` subcommands; its handler is :func:`run` (set as ``func``)."""
    parser = subparsers.add_parser("compare", help="teacher vs students: metric, agreement, size, latency, CKA")
    parser.add_argument("--teacher", required=True, help="run directory or model directory")
    parser.add_argument("--student", action="append", required=True, help="run or model directory (repeatable)")
    parser.add_argument("--data", required=True, help="a run YAML or run directory giving the task and data")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=None, help="at most this many examples")
    parser.add_argument("--out", help="directory for compare.json / compare.md")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the data config")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Compare, print the table and write ``compare.json``/``compare.md`` into ``--out``; 0 on success."""
    # imported here so that `kdistill --help` does not import torch
    from kdistill.eval.compare import format_compare_table, write_compare
    from kdistill.runs.compare import compare_targets

    result = compare_targets(
        args.teacher, args.student, args.data, split=args.split, limit=args.limit, overrides=args.overrides
    )
    print(format_compare_table(result))
    if args.out:
        write_compare(result, args.out)
        print(f"written to {args.out}/compare.json and compare.md")
    return 0
