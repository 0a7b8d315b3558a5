"""``kdistill demo [--llm]``: the main job on its embedded default, offline (runs, comparison, report)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``demo`` to the ``kdistill`` subcommands; its handler is :func:`run` (set as ``func``)."""
    parser = subparsers.add_parser("demo", help="the main job on its embedded default, offline")
    parser.add_argument("--out", help="directory for the runs and the report (default: runs/demo or runs/demo-llm)")
    parser.add_argument("--quick", action="store_true", help="a much smaller run (for a smoke test)")
    parser.add_argument(
        "--llm", action="store_true", help="LLM distillation: SmolLM2-135M-Instruct into 6 of its layers, a loss grid"
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo (the demos print their own progress and tables); 1 when a variant of the LLM grid failed."""
    # imported here so that `kdistill --help` does not import torch
    if args.llm:
        from kdistill.runs.demo_llm import run_llm_demo

        summary = run_llm_demo(args.out or "runs/demo-llm", quick=args.quick)
        return 1 if summary.get("failed") else 0
    from kdistill.runs.demo import run_demo

    run_demo(args.out or "runs/demo", quick=args.quick)
    return 0
