"""``kdistill compare``: teacher against students on a run's data (metric, agreement, size, latency, CKA).

::

    kdistill compare RUN_DIR [MORE_RUN_OR_MODEL_DIRS ...] [--cka]     # the run's own teacher and data
    kdistill compare --teacher T --student S [--student S2] --data RUN.yaml|RUN_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``compare`` to the ``kdistill`` subcommands; its handler is :func:`run` (set as ``func``)."""
    parser = subparsers.add_parser(
        "compare",
        help="teacher vs students: metric, agreement, size, latency, CKA",
        description="Compare a run's student with its teacher on the run's data (kdistill compare RUN_DIR), or a "
        "teacher with students on named data (--teacher, --student, --data). Written into the run directory, or "
        "into --out: compare.json and compare.md.",
    )
    parser.add_argument(
        "targets",
        nargs="*",
        metavar="RUN_DIR|key=value",
        help="a run directory, then more run or model directories compared as students; key=value items override "
        "the run's (or --data's) config",
    )
    parser.add_argument("--teacher", help="run or model directory (default with RUN_DIR: the run's own teacher)")
    parser.add_argument("--student", action="append", default=[], help="run or model directory (repeatable)")
    parser.add_argument("--data", help="a run YAML or run directory giving the task and data (with --teacher)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=None, help="at most this many examples")
    parser.add_argument("--cka", action="store_true", help="also the layer CKA of each student against the teacher")
    parser.add_argument("--out", help="directory for compare.json / compare.md (default: RUN_DIR)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Compare, print the table and write ``compare.json``/``compare.md``; 0 on success."""
    # imported here so that `kdistill --help` does not import torch
    from kdistill._io import check_dir_target
    from kdistill.errors import InvalidArgumentError
    from kdistill.eval.compare import compare_notes, compare_warnings, format_compare_table, write_compare
    from kdistill.runs.compare import compare_run, compare_targets

    overrides = [item for item in args.targets if "=" in item]
    targets = [item for item in args.targets if "=" not in item]
    if args.limit is not None and args.limit < 1:
        raise InvalidArgumentError(f"--limit must be >= 1, got {args.limit}")
    if args.data is None:
        if not targets:
            raise InvalidArgumentError(
                "name a run directory (kdistill compare RUN_DIR) or the teacher, students and data (--teacher, "
                "--student, --data)"
            )
        out = Path(args.out or targets[0])
        check_dir_target(out, "--out")
        result = compare_run(
            targets[0],
            [*targets[1:], *args.student],
            teacher=args.teacher,
            split=args.split,
            limit=args.limit,
            cka=args.cka,
            overrides=overrides,
        )
    else:
        students = [*targets, *args.student]
        if args.teacher is None or not students:
            raise InvalidArgumentError("--data compares --teacher with at least one --student; give both")
        out = Path(args.out) if args.out else None
        if out is not None:
            check_dir_target(out, "--out")
        result = compare_targets(
            args.teacher,
            students,
            args.data,
            split=args.split,
            limit=args.limit,
            cka=args.cka,
            overrides=overrides,
        )
    print(format_compare_table(result))
    for verdict in compare_notes(result):
        print(verdict)
    for warning in compare_warnings(result):
        print(f"warning: {warning}", file=sys.stderr)
    if out is not None:
        write_compare(result, out)
        print(f"written to {out}/compare.json and compare.md")
    return 0
