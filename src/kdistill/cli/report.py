"""``kdistill report RUN_DIR``: a self-contained HTML report of a run directory."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``report`` to the ``kdistill`` subcommands; its handler is :func:`run` (set as ``func``)."""
    parser = subparsers.add_parser("report", help="write a self-contained HTML report of a run directory")
    parser.add_argument("run_dir")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the report and print its path; 0 on success."""
    # imported here so that `kdistill --help` does not import matplotlib or torch
    from kdistill.report.html import build_report

    path = build_report(args.run_dir)
    print(f"report written to {path}")
    return 0
