"""The ``kdistill`` command line: :func:`build_parser` and :func:`main`; one module per subcommand beside it.

Each subcommand module (``train``, ``eval``, ``compare``, ``params``, ``report``, ``demo``, ``losses``, ``cache``,
``generate``, ``experiment``) has ``add_parser(subparsers)`` and ``run(args) -> int`` and holds arguments and
printing only; the work lives in :mod:`kdistill.runs` and the library under it, imported inside ``run`` so that
``kdistill --help`` imports no torch.

Exit codes: 0 success, 2 a user error (:class:`~kdistill.errors.KdistillError`, printed as one line; the
traceback only with ``--debug``), 1 anything unexpected, or a grid (``experiment``, ``demo --llm``) in which a
variant failed (each failure is recorded in its table); 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from kdistill._version import __version__
from kdistill.cli import cache, compare, demo, experiment, generate, losses, params, report, train
from kdistill.cli import eval as evaluate
from kdistill.errors import KdistillError

__all__ = ["build_parser", "main"]

# in the order `kdistill --help` lists them
SUBCOMMANDS = (train, evaluate, compare, params, report, demo, losses, experiment, generate, cache)


def _quiet_libraries() -> None:
    """Keep the terminal for kdistill's own progress: no per-file progress bars or load reports from libraries."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:  # imported here: only a command that runs needs them, `kdistill --help` does not
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


def build_parser() -> argparse.ArgumentParser:
    """The ``kdistill`` parser with every subcommand; each sets ``func`` to its module's ``run``."""
    parser = argparse.ArgumentParser(prog="kdistill", description="Knowledge distillation for NLP models.")
    parser.add_argument("--version", action="version", version=f"kdistill {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand and return its exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug may come anywhere on the line (before or after the subcommand and its arguments)
    debug = "--debug" in argv
    argv = [item for item in argv if item != "--debug"]
    args, extra = parser.parse_known_args(argv)
    args.debug = debug
    # key=value overrides may come after the subcommand's options too (`train RUN.yaml --x 1 a.b=2`)
    stray = [item for item in extra if "=" in item and not item.startswith("-")]
    if stray and isinstance(getattr(args, "overrides", None), list):
        args.overrides.extend(stray)
    elif stray and isinstance(getattr(args, "targets", None), list):  # compare: overrides among its targets
        args.targets.extend(stray)
    else:
        stray = []
    unknown = [item for item in extra if item not in stray]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 2
    _quiet_libraries()
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
