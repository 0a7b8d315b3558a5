"""``kdistill experiment GRID.yaml``: run variants of one base run and print their comparison table.

The grid is read, planned and run by :mod:`kdistill.runs.experiment`; this module parses and prints. Exit code 1
when a variant failed (its error is in the table), else 0.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``experiment`` to the ``kdistill`` subcommands; its handler is :func:`run` (set as ``func``)."""
    parser = subparsers.add_parser("experiment", help="run variants of one base run and write one comparison table")
    parser.add_argument("grid", help="the grid's YAML file (base run, output_dir, metrics, variants)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the base, for every variant")
    parser.add_argument("--output-dir", help="replaces the grid's output_dir")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Validate the grid, run it, write and print the table; 1 when a variant failed, else 0."""
    # imported here so that `kdistill --help` does not import torch
    from kdistill.runs.experiment import load_grid, run_grid, write_experiment

    grid = load_grid(args.grid, args.overrides, output_dir=getattr(args, "output_dir", None))
    results = run_grid(grid, log=print)
    paths = write_experiment(grid, results)
    print()
    print(paths.table)
    written = [paths.markdown, paths.csv, *([paths.png] if paths.png else [])]
    print(f"\nwritten: {', '.join(str(p) for p in written)}")
    failed = [r.name for r in results if r.status == "failed"]
    if failed:
        print(
            f"kdistill: {len(failed)} of {len(results)} variants failed: {', '.join(failed)} "
            f"(errors in {paths.markdown})",
            file=sys.stderr,
        )
        return 1
    return 0
