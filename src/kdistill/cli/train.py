"""``kdistill train RUN.yaml key=value ...``: train a teacher, a baseline student, or distil, from a YAML run."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``train`` to the ``kdistill`` subcommands; its handler is :func:`run` (set as ``func``)."""
    parser = subparsers.add_parser("train", help="train a teacher, a baseline student, or distil, from a YAML run")
    parser.add_argument("config", help="the run's YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. training.learning_rate=3e-5")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the config with its overrides, run it, print where it went and its metrics; 0 on success."""
    # imported here so that `kdistill --help` does not import torch
    from pathlib import Path

    from kdistill.config import load_config
    from kdistill.config.loader import read_yaml_mapping
    from kdistill.config.multitask import is_multitask, load_multitask_config
    from kdistill.runs.multitask import run_multitask
    from kdistill.runs.records import is_main_process
    from kdistill.runs.run import run as run_config

    data = read_yaml_mapping(Path(args.config), "config file")
    if is_multitask(data):  # a top-level `tasks:` list: one student body, a head per task
        multitask = load_multitask_config(args.config, args.overrides, data=data)
        result = run_multitask(multitask)
        mode = "multi-task"
    else:
        config = load_config(args.config, args.overrides, data=data)
        result = run_config(config)
        mode = config.mode
    if not is_main_process():  # the other processes of a launch trained beside it; the main one reports
        return 0
    print(f"{mode} run complete in {result.seconds:.0f} s: {result.output_dir}")
    width = max((len(key) for key in result.metrics), default=0) + 2
    for key, value in result.metrics.items():
        print(f"  {key:<{width}}{value:.4f}")
    return 0
