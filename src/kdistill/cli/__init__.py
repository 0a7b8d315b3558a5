"""The ``kdistill`` command line. Parsing, printing and exit codes only; the work lives in the library.

Exit codes: 0 success, 2 a user error (:class:`~kdistill.errors.KdistillError`, printed as one line; the
traceback only with ``--debug``), 1 anything unexpected, or a grid (``experiment``, ``demo --llm``) in which a
variant failed (each failure is recorded in its table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from kdistill import __version__
from kdistill.errors import KdistillError


def _quiet_libraries() -> None:
    """Keep the terminal for kdistill's own progress: no per-file progress bars or load reports from libraries."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


def _cmd_train(args: argparse.Namespace) -> int:
    from kdistill.config import load_config
    from kdistill.runs.run import run

    config = load_config(args.config, args.overrides)
    result = run(config)
    print(f"{config.mode} run complete in {result.seconds:.0f} s: {result.output_dir}")
    for key, value in result.metrics.items():
        print(f"  {key:<28}{value:.4f}")
    return 0


def _run_config_for(target: str, config_path: str | None, overrides: Sequence[str]):
    """A run directory's saved config (its task and data), or the config given with --config."""
    from kdistill.config import load_config

    run_dir = Path(target)
    if config_path is None and (run_dir / "config.yaml").is_file():
        return load_config(run_dir / "config.yaml", overrides)
    if config_path is None:
        raise KdistillError(f"{target} is not a run directory (no config.yaml); pass --config RUN.yaml for its data")
    return load_config(config_path, overrides)


def _model_dir(target: str) -> str:
    """A run directory's student, or the target itself (a model directory, hub id or packaged:NAME)."""
    from kdistill.runs.run import resolve_model_path, run_status

    path = Path(target)
    if (path / "run.json").is_file():
        if run_status(path) != "complete":
            raise KdistillError(f"{target} is not a complete run (status: {run_status(path)}); finish or resume it")
        return str(path / "student")
    return resolve_model_path(target, "model")


def _parts_with_model(config, model_path: str):
    """The config's task and data, with ``model_path`` as the (pretrained) model evaluated."""
    from kdistill.runs.parts import build_parts

    student = config.student.model_copy(update={"kind": "pretrained", "path": model_path})
    return build_parts(config.model_copy(update={"mode": "baseline", "teacher": None, "student": student}))


def _cmd_eval(args: argparse.Namespace) -> int:
    from kdistill.runs.parts import evaluate

    config = _run_config_for(args.target, args.config, args.overrides)
    path = _model_dir(args.target)
    parts = _parts_with_model(config, path)
    if not parts.has_split(args.split):
        raise KdistillError(f"the data has no {args.split!r} split (have: {', '.join(parts.eval_examples) or 'none'})")
    metrics = evaluate(parts, parts.student, split=args.split)
    print(f"{path} on {args.split}:")
    for key, value in metrics.items():
        print(f"  {key:<20}{value:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from kdistill.eval.compare import ModelEntry, compare_models, format_compare_table, write_compare
    from kdistill.runs.parts import compare_batches, load_model, load_tokenizer

    data_path = Path(args.data)
    config = _run_config_for(args.data, None if data_path.is_dir() else args.data, args.overrides)
    if config.task == "causal_lm":
        raise KdistillError(
            "kdistill compare covers classification, NER and QA runs; a causal-LM run's eval.json already holds "
            "perplexity, agreement and KL to its teacher, and `kdistill experiment` puts several runs in one table"
        )
    teacher_path = _model_dir(args.teacher)
    parts = _parts_with_model(config, teacher_path)
    task = parts.task
    students = []
    for target in args.student:
        path = _model_dir(target)
        name = Path(target).name or target
        model = load_model(
            path, task, f"student {target}", len(task.label_names) if getattr(task, "label_names", None) else None
        )
        students.append((name, model, path, load_tokenizer(path, f"student {target}")))
    batches, inputs = compare_batches(
        parts, parts.student_tokenizer, {n: t for n, _, _, t in students}, split=args.split, limit=args.limit
    )
    result = compare_models(
        ModelEntry("teacher", parts.student, teacher_path, role="teacher", inputs="teacher"),
        [ModelEntry(name, model, path, inputs=inputs[name]) for name, model, path, _ in students],
        batches,
        view=task.view,
        task_metric=lambda logits, b: task.compute_metrics(logits, b, parts.splits[args.split]),
    )
    print(format_compare_table(result))
    if args.out:
        write_compare(result, args.out)
        print(f"written to {args.out}/compare.json and compare.md")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from kdistill.models.params import format_parameter_tree, parameter_tree
    from kdistill.runs.parts import load_any_model

    model = load_any_model(_model_dir(args.model))
    print(format_parameter_tree(parameter_tree(model, args.depth)))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from kdistill.report.html import build_report

    path = build_report(args.run_dir)
    print(f"report written to {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.llm:
        from kdistill.runs.demo_llm import run_llm_demo

        summary = run_llm_demo(args.out or "runs/demo-llm", quick=args.quick)
        return 1 if summary.get("failed") else 0
    from kdistill.runs.demo import run_demo

    run_demo(args.out or "runs/demo", quick=args.quick)
    return 0


def _cmd_losses(args: argparse.Namespace) -> int:
    from kdistill.losses import LOSSES

    for name in LOSSES.names(kind=args.kind):
        entry = LOSSES.entry(name)
        doc = (entry.obj.__doc__ or "").strip().splitlines()[0] if entry.obj.__doc__ else ""
        aliases = f" (aliases: {', '.join(entry.aliases)})" if entry.aliases else ""
        print(f"{name:<22}{entry.kind:<17}{doc}{aliases}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdistill", description="Knowledge distillation for NLP models.")
    parser.add_argument("--version", action="version", version=f"kdistill {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="train a teacher, a baseline student, or distil, from a YAML run")
    train.add_argument("config", help="the run's YAML file")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. training.learning_rate=3e-5")
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser("eval", help="score a run's student (or any model) on a split")
    evaluate.add_argument("target", help="a run directory, a model directory or hub id")
    evaluate.add_argument("--config", help="run YAML giving the task and data (default: the run's config.yaml)")
    evaluate.add_argument("--split", default="validation")
    evaluate.add_argument("--out", help="write the metrics to this JSON file")
    evaluate.add_argument("overrides", nargs="*", help="dotted key=value overrides of the config")
    evaluate.set_defaults(func=_cmd_eval)

    compare = commands.add_parser("compare", help="teacher vs students: metric, agreement, size, latency, CKA")
    compare.add_argument("--teacher", required=True, help="run directory or model directory")
    compare.add_argument("--student", action="append", required=True, help="run or model directory (repeatable)")
    compare.add_argument("--data", required=True, help="a run YAML or run directory giving the task and data")
    compare.add_argument("--split", default="validation")
    compare.add_argument("--limit", type=int, default=None, help="at most this many examples")
    compare.add_argument("--out", help="directory for compare.json / compare.md")
    compare.add_argument("overrides", nargs="*", help="dotted key=value overrides of the data config")
    compare.set_defaults(func=_cmd_compare)

    params = commands.add_parser("params", help="parameter tree of a model with counts and shares")
    params.add_argument("model", help="a model directory, hub id, packaged:NAME or run directory")
    params.add_argument("--depth", type=int, default=2)
    params.set_defaults(func=_cmd_params)

    report = commands.add_parser("report", help="write a self-contained HTML report of a run directory")
    report.add_argument("run_dir")
    report.set_defaults(func=_cmd_report)

    demo = commands.add_parser("demo", help="the main job on its embedded default, offline")
    demo.add_argument("--out", help="directory for the runs and the report (default: runs/demo or runs/demo-llm)")
    demo.add_argument("--quick", action="store_true", help="a much smaller run (for a smoke test)")
    demo.add_argument(
        "--llm", action="store_true", help="LLM distillation: SmolLM2-135M-Instruct into 6 of its layers, a loss grid"
    )
    demo.set_defaults(func=_cmd_demo)

    losses = commands.add_parser("losses", help="list the registered loss functions")
    losses.add_argument(
        "--kind", choices=["divergence", "hard", "feature", "cross_tokenizer"], help="only losses of this kind"
    )
    losses.set_defaults(func=_cmd_losses)

    from kdistill.cli import experiment, generate
    from kdistill.runs.cache import add_cache_parser

    experiment.add_parser(commands)
    generate.add_parser(commands)
    add_cache_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
