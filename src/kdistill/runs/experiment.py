"""``kdistill experiment GRID.yaml``: variants of one base run, run in order, compared in one table.

A grid file names a base run and the variants to try on it::

    title: KD loss ablation            # optional (default: "Experiment: <grid file name>")
    base: run.yaml                     # a run YAML (relative to the grid file) or an inline mapping of one
    output_dir: runs/ablation          # variant NAME runs in output_dir/NAME (default: runs/<grid file name>)
    metrics: [accuracy]                # eval.json columns; "accuracy" means every split's accuracy
    variants:
      kl:     {distill.kd_loss: forward_kl}
      rkl:    {distill.kd_loss: reverse_kl, distill.kd_weight: 0.9, distill.hard_weight: 0.1}
      labels: {mode: baseline}          # the same student trained on the labels alone (no distillation)
      as_is:  {}                        # the base unchanged

Each variant is a mapping of dotted keys to values. A pair ``key: value`` is turned into the ``key=value``
override that ``kdistill train run.yaml key=value`` takes and applied by the same machinery
(:func:`kdistill.config.load_config`), so a value replaces what the base holds there (a mapping replaces a
mapping; it is not merged) and an error is the same one-liner, prefixed with the variant's name. Paths inside the
base (``data.files``, ``teacher.path``) are read relative to the working directory, as by ``kdistill train``.

Why the checks happen where they do:

* :func:`load_grid` builds and validates every variant's :class:`~kdistill.config.RunConfig` and resolves the
  names a run would only look up once its models are loaded (losses, schedules) and checks that local data files
  exist, so a typo in the last variant fails before the first one trains.
* :func:`plan_grid` (called by :func:`run_grid` before any training) compares each variant's directory with its
  config: a complete run of the same config is skipped (the grid is resumable), an unfinished one is resumed from
  its newest checkpoint, and a directory holding something else is an error — nothing is ever overwritten.
* :func:`run_grid` records a variant that fails while running, with its error, and goes on with the next one.

:func:`write_experiment` turns the results into rows for :func:`kdistill.runs.experiment_table.write_comparison`,
which writes ``experiment.md``, ``experiment.csv`` and ``experiment.png`` (the command line is
:mod:`kdistill.cli.experiment`).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from safetensors import safe_open

from kdistill._io import check_dir_target
from kdistill.config import ConfigError, RunConfig, load_config, parse_overrides
from kdistill.config.loader import read_yaml_mapping
from kdistill.errors import KdistillError
from kdistill.losses import LOSSES
from kdistill.runs.experiment_table import ComparisonPaths, format_cell, is_number, write_comparison
from kdistill.runs.records import config_difference, run_status
from kdistill.runs.run import run
from kdistill.schedules import make_schedule, make_temperature_schedule

# format_cell and write_comparison are re-exported: the LLM demo writes its table through this module
__all__ = ["ComparisonPaths", "Grid", "Variant", "VariantResult", "count_saved_parameters", "format_cell",
           "load_grid", "plan_grid", "run_grid", "write_comparison", "write_experiment"]  # fmt: skip

GRID_KEYS = ("title", "base", "output_dir", "metrics", "variants")
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
Action = Literal["run", "skip", "resume"]


@dataclass(frozen=True)
class Variant:
    """One variant: its name, its overrides as ``key=value`` strings (as the CLI takes them), its resolved config."""

    name: str
    overrides: tuple[str, ...]
    config: RunConfig

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


@dataclass(frozen=True)
class Grid:
    """A validated grid: every variant's config is built, so running it can only fail inside a run."""

    title: str
    output_dir: Path
    metrics: tuple[str, ...] | None  # None: every numeric metric found in the variants' eval.json
    variants: tuple[Variant, ...]
    base_overrides: tuple[str, ...] = ()  # applied to the base of every variant (from the command line)
    source: Path | None = None  # the grid file


@dataclass(frozen=True)
class VariantResult:
    """What became of one variant; ``metrics``, ``seconds`` and ``params`` are read from its run directory."""

    name: str
    status: Literal["complete", "skipped", "failed"]  # skipped: complete from an earlier call, not rerun
    output_dir: Path
    overrides: tuple[str, ...]
    metrics: dict[str, float]
    seconds: float | None = None  # run.json's duration of the whole run
    params: int | None = None  # parameters stored in student/*.safetensors
    error: str | None = None


# ---------------------------------------------------------------- loading


def load_grid(path: str | Path | None = None, overrides: Sequence[str] = (), *, data: Mapping[str, Any] | None = None,
              output_dir: str | Path | None = None) -> Grid:  # fmt: skip
    """Read and validate a grid: every variant's run config is built and checked before anything runs.

    Args:
        path: the grid YAML file (a relative ``base`` path is read relative to it).
        overrides: dotted ``key=value`` overrides applied to the base of every variant, before the variant's own.
        data: the grid as a mapping instead of a file (``base`` paths are then relative to the working directory).
        output_dir: replaces the grid's ``output_dir``.

    Raises:
        ConfigError: the grid, the base or a variant is invalid; the message names the variant and the key.
    """
    if data is None:
        if path is None:
            raise ConfigError("no grid file given")
        file = Path(path)
        data = read_yaml_mapping(file, "grid file")
        root, stem = file.parent, file.stem
    else:
        file, root, stem = None, Path.cwd(), "grid"
    unknown = [key for key in data if key not in GRID_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), GRID_KEYS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"grid: unknown key {unknown[0]!r}{hint} (valid: {', '.join(GRID_KEYS)})")
    title = data.get("title") or f"Experiment: {stem}"
    if not isinstance(title, str):
        raise ConfigError(f"grid: title must be a string, got {title!r}")
    out = output_dir if output_dir is not None else data.get("output_dir") or Path("runs") / stem
    out = check_dir_target(out, "--output-dir" if output_dir is not None else "the grid's output_dir")
    metrics = _metrics_setting(data.get("metrics"))
    base = _base_mapping(data.get("base"), root)
    for item in overrides:
        if _is_output_dir(parse_overrides([item])[0][0]):
            raise ConfigError(f"override {item!r}: the grid sets each variant's output_dir (use --output-dir)")
    variants_data = data.get("variants")
    if not isinstance(variants_data, dict) or not variants_data:
        raise ConfigError("grid: 'variants' must be a mapping of variant names to overrides, e.g. {kl: {}}")
    variants = []
    for name, spec in variants_data.items():
        if not isinstance(name, str) or not VARIANT_NAME.match(name):
            raise ConfigError(f"grid: variant name {name!r} must be letters, digits, '_', '.', '+' or '-' (it "
                              f"names a directory)")  # fmt: skip
        variants.append(_build_variant(name, spec, base, tuple(overrides), out / name))
    return Grid(title, out, metrics, tuple(variants), tuple(overrides), file)


def _build_variant(name: str, spec: Any, base: dict[str, Any], base_overrides: tuple[str, ...],
                   directory: Path) -> Variant:  # fmt: skip
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ConfigError(f"variant {name!r}: must be a mapping of dotted keys to values, e.g. "
                          f"{{distill.kd_loss: reverse_kl}}, got {spec!r}")  # fmt: skip
    own = []
    for key, value in spec.items():
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"variant {name!r}: key {key!r} must be a dotted name such as distill.kd_weight")
        if _is_output_dir([part for part in key.strip().split(".") if part]):
            raise ConfigError(f"variant {name!r}: output_dir is set by the grid (its output_dir/{name}); remove it")
        own.append(_override_string(name, key.strip(), value))
    data = copy.deepcopy(base)
    data["output_dir"] = str(directory)
    try:
        config = load_config(data=data, overrides=[*base_overrides, *own])
        _check_names(config)
    except KdistillError as error:
        raise ConfigError(f"variant {name!r}: {error}") from None
    return Variant(name, tuple(own), config)


def _override_string(variant: str, key: str, value: Any) -> str:
    """``key=value`` as the CLI would take it; checked to parse back to exactly ``value``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf, allow_unicode=True).strip()
    if text.endswith("\n..."):  # a plain scalar ends its document explicitly
        text = text[: -len("\n...")].strip()
    item = f"{key}={text}"
    if parse_overrides([item])[0][1] != value:
        raise ConfigError(f"variant {variant!r}: {key}: the value {value!r} cannot be written as a key=value override")
    return item


def _is_output_dir(path: list[str]) -> bool:
    return path == ["output_dir"]


def _metrics_setting(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(m, str) and m.strip() for m in value):
        raise ConfigError(f"grid: metrics must be a list of metric names such as [accuracy], got {value!r}")
    return tuple(m.strip() for m in value)


def _base_mapping(value: Any, root: Path) -> dict[str, Any]:
    if value is None:
        raise ConfigError("grid: missing required key 'base' (a run YAML file or an inline run config)")
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        file = Path(value) if Path(value).is_absolute() else root / value
        return read_yaml_mapping(file, "base")
    raise ConfigError(f"grid: base must be a path to a run YAML or a mapping, got {value!r}")


def _check_names(config: RunConfig) -> None:
    """What a run would only find out after loading its models: names of losses and schedules, local data files."""
    for split, name in (config.data.files or {}).items():
        if not Path(name).is_file():
            raise ConfigError(f"data.files.{split}: the file {name} does not exist")
    if config.mode != "distill":
        return
    spec = config.distill
    LOSSES.entry(spec.kd_loss)
    make_schedule(spec.kd_weight)
    make_schedule(spec.hard_weight)
    make_temperature_schedule(spec.temperature)
    if spec.layer_map is not None:
        LOSSES.entry(spec.layer_map_loss)
        make_schedule(spec.layer_map_weight)
    for index, match in enumerate(spec.matches):
        try:
            LOSSES.entry(match.loss)
            make_schedule(match.weight)
        except KdistillError as error:
            raise ConfigError(f"distill.matches.{index}: {error}") from None


# ---------------------------------------------------------------- running


def plan_grid(grid: Grid) -> list[tuple[Variant, Action]]:
    """What :func:`run_grid` will do with each variant, decided from its directory before anything runs.

    ``skip``: a complete run of the same resolved config is there. ``resume``: an unfinished run (failed or cut
    short) of the same config is there; it continues from its newest checkpoint. ``run``: no directory, or an
    empty one.

    Raises:
        ConfigError: a directory holds a run of a different config, or files that are no run; nothing is
            overwritten, so the message says which key differs and asks to remove the directory.
    """
    plan: list[tuple[Variant, Action]] = []
    for variant in grid.variants:
        directory = variant.output_dir
        status = run_status(directory)
        if status is None:
            if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
                raise ConfigError(f"variant {variant.name!r}: {directory} exists and holds no run; remove it or "
                                  f"choose another output_dir")  # fmt: skip
            plan.append((variant, "run"))
            continue
        difference = config_difference(directory, variant.config.model_dump(mode="json"))
        if difference is not None:
            raise ConfigError(f"variant {variant.name!r}: {directory} holds a {status} run of a different config "
                              f"({difference}); remove it to run this variant again")  # fmt: skip
        plan.append((variant, "skip" if status == "complete" else "resume"))
    return plan


def run_grid(grid: Grid, *, log: Callable[[str], None] | None = None) -> list[VariantResult]:
    """Run the grid's variants in order and return what became of each (see :func:`plan_grid` for skips).

    A variant that fails while running is recorded as failed with its error (its run.json says so too) and the
    next one runs; only Ctrl-C stops the grid. The comparison table is written by :func:`write_experiment`.
    """
    say = log or (lambda message: None)
    plan = plan_grid(grid)
    results = []
    for index, (variant, action) in enumerate(plan, start=1):
        prefix = f"[{index}/{len(plan)}] {variant.name}"
        if action == "skip":
            say(f"{prefix}: already complete in {variant.output_dir}, skipped")
            results.append(_collect(variant, "skipped"))
            continue
        say(f"{prefix}: {'resuming' if action == 'resume' else 'running'} in {variant.output_dir}"
            f"{' (' + ', '.join(variant.overrides) + ')' if variant.overrides else ''}")  # fmt: skip
        config = variant.config.model_copy(update={"resume": True}) if action == "resume" else variant.config
        try:
            run(config)
        except Exception as error:  # recorded; the grid goes on
            message = str(error) if isinstance(error, KdistillError) else f"{type(error).__name__}: {error}"
            say(f"{prefix}: failed: {message}")
            results.append(VariantResult(variant.name, "failed", variant.output_dir, variant.overrides, {},
                                         error=message))  # fmt: skip
            continue
        results.append(_collect(variant, "complete"))
    return results


def _collect(variant: Variant, status: Literal["complete", "skipped"]) -> VariantResult:
    """A finished variant's numbers, read back from its directory (the same source for fresh and skipped runs)."""
    directory = variant.output_dir
    try:
        info = json.loads((directory / "run.json").read_text())
        scores = json.loads((directory / "eval.json").read_text()) if (directory / "eval.json").is_file() else {}
        params = count_saved_parameters(directory / "student")
    except (OSError, ValueError) as error:
        return VariantResult(variant.name, "failed", directory, variant.overrides, {},
                             error=f"its run directory cannot be read: {error}")  # fmt: skip
    metrics = {key: value for key, value in scores.items() if is_number(value)}
    seconds = info.get("seconds")
    return VariantResult(variant.name, status, directory, variant.overrides, metrics,
                         seconds if is_number(seconds) else None, params)  # fmt: skip


def count_saved_parameters(directory: str | Path) -> int | None:
    """Number of values in the ``*.safetensors`` weights of a saved model (read from the headers; nothing loaded).

    Tied weights are stored once by ``save_pretrained``, so this is the model's parameter count. None when the
    directory holds no safetensors file, or only a LoRA adapter (``adapter_config.json``): the adapter's few
    weights are not the model's size, and its base model lives elsewhere.
    """
    files = sorted(Path(directory).glob("*.safetensors"))
    if (Path(directory) / "adapter_config.json").is_file():
        files = [file for file in files if not file.name.startswith("adapter_model")]
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is no dict
                total += math.prod(handle.get_slice(key).get_shape())
    return total


# ---------------------------------------------------------------- tables


def write_experiment(grid: Grid, results: Sequence[VariantResult]) -> ComparisonPaths:
    """The grid's comparison: one row per variant (overrides, metrics, run time, parameters, status)."""
    columns, unmatched = _metric_columns(grid.metrics, results)
    rows = []
    for result in results:
        row: dict[str, Any] = {"variant": result.name, "overrides": ", ".join(result.overrides) or "(base)"}
        row.update({column: result.metrics.get(column) for column in columns})
        row.update({"seconds": result.seconds, "params": result.params, "status": result.status})
        if result.error is not None:
            row["error"] = result.error
        rows.append(row)
    notes = []
    if grid.base_overrides:
        notes.append(f"Every variant: {', '.join(grid.base_overrides)}.")
    found = sorted({key for result in results for key in result.metrics})
    notes += [f"metric {name!r} is in no variant's eval.json (found: {', '.join(found) or 'none'})."
              for name in unmatched]  # fmt: skip
    return write_comparison(rows, grid.output_dir, columns, grid.title,
                            columns=["variant", "overrides", *columns, "seconds", "params", "status"],
                            notes=notes)  # fmt: skip


def _metric_columns(requested: Sequence[str] | None, results: Sequence[VariantResult]) -> tuple[list[str], list[str]]:
    """eval.json keys to show: a name matches itself and ``<split>/<name>``; also the names that matched nothing."""
    found = list(dict.fromkeys(key for result in results for key in result.metrics))
    if requested is None:
        return found, []
    columns, unmatched = [], []
    for name in requested:
        matches = [key for key in found if key == name or key.split("/", 1)[-1] == name]
        if not matches:
            unmatched.append(name)
            matches = [name]
        columns += [key for key in matches if key not in columns]
    return columns, unmatched if found else []
