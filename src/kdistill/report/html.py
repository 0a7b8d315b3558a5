"""A run directory as one self-contained HTML page (and a markdown summary): did the distillation work?

:func:`build_report` reads what a run left behind —

* ``metrics.jsonl`` of the run itself and of its sub-runs (``run_dir/*/metrics.jsonl``: a demo writes
  ``teacher/``, ``student-distilled/``, ``student-baseline/``, ...): training lines (``train/<term>``,
  ``weight/<term>``, ``lr``) and eval lines (``eval/<metric>``), each with its ``step``;
* ``compare.json``, a :func:`kdistill.eval.compare_models` result;
* ``eval.json`` of the run and its sub-runs, and a grid's ``experiment.csv`` / ``experiment.png``
  (:mod:`kdistill.report.sections`);
* ``resolved_config.yaml``, else ``config.yaml``, else ``train_config.json``

— and writes ``report.html`` (summary, comparison table, plots, configuration; the plots are PNGs embedded as
base64 ``data:`` URIs and the CSS is inline, so the file can be mailed or attached as it is) and ``report.md``.
A missing piece leaves its section saying "not available"; only a directory with none of these is an error.
Plots are drawn on matplotlib ``Figure`` objects with the Agg canvas: matplotlib is imported when a report is
built, never when kdistill is, and the global pyplot backend of the caller (a notebook) is left alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdistill._io import atomic_write_text
from kdistill.errors import KdistillError
from kdistill.eval.compare_table import compare_markdown, compare_notes, compare_rows, compare_verdicts
from kdistill.report.sections import evaluation_table, grid_table

__all__ = ["build_report"]

_CONFIG_FILES = ("resolved_config.yaml", "config.yaml", "train_config.json")
_TEACHER_COLOR, _STUDENT_COLOR = "#4c72b0", "#dd8452"
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { border-bottom: 2px solid #4c72b0; padding-bottom: .3rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: right; }
th { background: #f0f3f8; }
td:first-child, th:first-child { text-align: left; }
tr.teacher td { background: #f7f9fc; font-weight: 600; }
pre { background: #f6f6f6; border: 1px solid #e2e2e2; padding: .8rem; overflow-x: auto; font-size: .85rem; }
img { max-width: 100%; height: auto; display: block; margin: .6rem 0 1.2rem; }
.na { color: #777; font-style: italic; }
.headline { font-size: 1.15rem; background: #eef4ea; border-left: 4px solid #55a868; padding: .6rem .9rem; }
"""


# ---------------------------------------------------------------- reading the run directory


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON object lines of a metrics.jsonl and how many lines could not be read (a run killed mid-write)."""
    records, skipped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def _load_runs(run_dir: Path) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Run label → metric records (the run itself first, then sub-runs by name), and notes on skipped lines."""
    runs: dict[str, list[dict[str, Any]]] = {}
    notes: list[str] = []
    files = [(run_dir.name or "run", run_dir / "metrics.jsonl")]
    files += [(sub.name, sub / "metrics.jsonl") for sub in sorted(run_dir.iterdir()) if sub.is_dir()]
    for label, path in files:
        if not path.is_file():
            continue
        records, skipped = _read_metrics(path)
        if skipped:
            notes.append(f"{skipped} unreadable line(s) skipped in {path}")
        if records:
            runs[label] = records
    return runs, notes


def _load_compare(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "compare.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise KdistillError(f"{path} is not valid JSON ({error}); rerun the comparison to rewrite it") from error
    if not isinstance(result, dict) or not isinstance(result.get("models"), list):
        raise KdistillError(f"{path} is not a compare_models result: it has no 'models' list")
    return result


def _load_config(run_dir: Path) -> tuple[str, str] | None:
    for name in _CONFIG_FILES:
        path = run_dir / name
        if path.is_file():
            return name, path.read_text(encoding="utf-8", errors="replace")
    return None


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the records holding a finite number for it (no ``step``: the line index)."""
    steps, values = [], []
    for index, record in enumerate(records):
        value = _number(record.get(key))
        if value is not None:
            step = _number(record.get("step"))
            steps.append(step if step is not None else float(index))
            values.append(value)
    return steps, values


def _keys(records: Sequence[Mapping[str, Any]], prefix: str) -> list[str]:
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(prefix) and _number(value) is not None:
                keys[key] = None
    return list(keys)


# ---------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png_data_uri(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _loss_plot(label: str, records: Sequence[Mapping[str, Any]]) -> str | None:
    """Loss terms (``train/*``) over steps, and the term weights (``weight/*``) below when they were logged."""
    loss_keys, weight_keys = _keys(records, "train/"), _keys(records, "weight/")
    if not loss_keys:
        return None
    figure = _new_figure(7.5, 5.5 if weight_keys else 3.6)
    axes = figure.subplots(2 if weight_keys else 1, 1, sharex=True, squeeze=False)[:, 0]
    all_values: list[float] = []
    for key in loss_keys:
        steps, values = _series(records, key)
        all_values += values
        axes[0].plot(steps, values, label=key.removeprefix("train/"), linewidth=1.3)
    positive = [v for v in all_values if v > 0]
    if positive and len(positive) == len(all_values) and max(positive) / min(positive) > 100:
        axes[0].set_yscale("log")
    axes[0].set_title(f"{label}: loss terms")
    axes[0].set_ylabel("value")
    axes[0].legend(fontsize=7, loc="best")
    axes[0].grid(alpha=0.3)
    if weight_keys:
        for key in weight_keys:
            axes[1].plot(*_series(records, key), label=key.removeprefix("weight/"), linewidth=1.3)
        axes[1].set_ylabel("weight")
        axes[1].legend(fontsize=7, loc="best")
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return _png_data_uri(figure)


def _eval_plot(key: str, runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """One eval metric over steps, one line per run that logged it."""
    figure = _new_figure(7.5, 3.6)
    axes = figure.subplots()
    for label, records in runs.items():
        steps, values = _series(records, key)
        if steps:
            axes.plot(steps, values, marker="o", markersize=3, label=label, linewidth=1.3)
    axes.set_title(key)
    axes.set_xlabel("step")
    axes.set_ylabel(key.removeprefix("eval/"))
    axes.legend(fontsize=7, loc="best")
    axes.grid(alpha=0.3)
    return _png_data_uri(figure)


def _bars_plot(compare: Mapping[str, Any]) -> str | None:
    """Primary metric, size and p50 latency of the teacher and each student, side by side."""
    rows = compare.get("models") or []
    primary = compare.get("primary_metric")
    panels = []
    if primary:
        panels.append((primary, [_number((row.get("metrics") or {}).get(primary)) for row in rows]))
    sizes = [_number(row.get("size_bytes")) for row in rows]
    panels.append(("size (MB)", [None if v is None else v / 2**20 for v in sizes]))
    panels.append(("p50 latency (ms)", [_number(row.get("latency_p50_ms")) for row in rows]))
    panels = [(title, values) for title, values in panels if any(v is not None for v in values)]
    if not rows or not panels:
        return None
    names = [str(row.get("name", "?")) for row in rows]
    colors = [_TEACHER_COLOR if row.get("role") == "teacher" else _STUDENT_COLOR for row in rows]
    figure = _new_figure(3.4 * len(panels), 3.4)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (title, values) in zip(axes, panels, strict=True):
        heights = [0.0 if v is None else v for v in values]
        bars = axis.bar(range(len(names)), heights, color=colors)
        axis.bar_label(bars, labels=["n/a" if v is None else f"{v:.3g}" for v in values], fontsize=7)
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    return _png_data_uri(figure)


def _cka_plot(name: str, cka: Mapping[str, Any]) -> str | None:
    """Heatmap of CKA values, teacher layers as rows and student layers as columns (blank where not computed)."""
    import numpy as np

    cells = {}
    for pair, value in cka.items():
        teacher_layer, _, student_layer = str(pair).partition("->")
        if _number(value) is not None:
            cells[(teacher_layer.strip(), student_layer.strip())] = float(value)
    if not cells:
        return None
    teacher_layers = list(dict.fromkeys(t for t, _ in cells))
    student_layers = list(dict.fromkeys(s for _, s in cells))
    matrix = np.full((len(teacher_layers), len(student_layers)), np.nan)  # (teacher layers, student layers)
    for (t, s), value in cells.items():
        matrix[teacher_layers.index(t), student_layers.index(s)] = value
    figure = _new_figure(max(3.5, 1.1 * len(student_layers) + 2), max(2.6, 0.6 * len(teacher_layers) + 1.4))
    axes = figure.subplots()
    image = axes.imshow(np.ma.masked_invalid(matrix), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for (t, s), value in cells.items():
        color = "black" if value > 0.6 else "white"
        axes.text(
            student_layers.index(s), teacher_layers.index(t), f"{value:.2f}", ha="center", va="center", color=color
        )
    axes.set_xticks(range(len(student_layers)), student_layers, fontsize=8)
    axes.set_yticks(range(len(teacher_layers)), teacher_layers, fontsize=8)
    axes.set_xlabel(f"student ({name})")
    axes.set_ylabel("teacher")
    axes.set_title(f"linear CKA: teacher vs {name}", fontsize=10)
    figure.colorbar(image, ax=axes, shrink=0.85)
    return _png_data_uri(figure)


# ---------------------------------------------------------------- text pieces


def _headlines(compare: Mapping[str, Any]) -> list[str]:
    """One sentence per student: compression, speed-up, metric kept, agreement."""
    teacher = compare.get("teacher", "the teacher")
    primary = compare.get("primary_metric")
    sentences = []
    for row in compare.get("models") or []:
        if row.get("role") == "teacher":
            continue
        parts = []
        if _number(row.get("compression")) is not None:
            parts.append(f"{row['compression']:.2f}x fewer parameters")
        if _number(row.get("speedup")) is not None:
            spread = row.get("speedup_iqr") or []
            within = f", interquartile {spread[0]:.2f}-{spread[1]:.2f}" if len(spread) == 2 else ""
            parts.append(f"{row['speedup']:.2f}x speed-up (median over interleaved timings{within})")
        if _number(row.get("metric_kept_pct")) is not None and primary:
            parts.append(f"keeps {row['metric_kept_pct']:.1f}% of the teacher's {primary}")
        if _number(row.get("agreement")) is not None:
            parts.append(f"agrees with the teacher on {100 * row['agreement']:.1f}% of predictions")
        sentences.append(f"{row.get('name', '?')} vs {teacher}: " + (", ".join(parts) or "no figures available"))
    return sentences


def _runs_table(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """Per run: last step, final train/loss and the last value of each eval metric."""
    eval_keys = list(dict.fromkeys(key for records in runs.values() for key in _keys(records, "eval/")))
    header = ["run", "last step", "final train/loss", *eval_keys]
    cells = []
    for label, records in runs.items():
        steps = [s for s in (_number(r.get("step")) for r in records) if s is not None]
        loss = _series(records, "train/loss")[1]
        row = [label, str(int(max(steps))) if steps else "-", f"{loss[-1]:.4g}" if loss else "-"]
        for key in eval_keys:
            values = _series(records, key)[1]
            row.append(f"{values[-1]:.4g}" if values else "-")
        cells.append(row)
    return header, cells


def _html_table(header: Sequence[str], cells: Sequence[Sequence[str]], teacher_rows: Sequence[bool] = ()) -> str:
    head = "".join(f"<th>{html.escape(text)}</th>" for text in header)
    body = []
    for index, row in enumerate(cells):
        css = ' class="teacher"' if index < len(teacher_rows) and teacher_rows[index] else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(text)}</td>" for text in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _markdown_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    def line(texts: Sequence[str]) -> str:
        return "| " + " | ".join(text.replace("|", "\\|") for text in texts) + " |"

    return "\n".join([line(header), "|" + "|".join(["---"] * len(header)) + "|", *(line(row) for row in cells)])


def _na(text: str) -> str:
    return f'<p class="na">{html.escape(text)}</p>'


def _image(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


# ---------------------------------------------------------------- the report


def build_report(run_dir: str | Path, *, extra_compare: Mapping[str, Any] | None = None) -> Path:
    """Write ``run_dir/report.html`` (self-contained) and ``run_dir/report.md`` from what the run left behind.

    Args:
        run_dir: the run directory (see the module docstring for what is read).
        extra_compare: a :func:`~kdistill.eval.compare_models` result to report instead of ``run_dir/compare.json``
            (e.g. one computed just now and not yet written).

    Returns:
        The path of ``report.html``.

    Raises:
        KdistillError: ``run_dir`` is not a directory; it holds neither metrics records (in ``metrics.jsonl`` or a
            sub-run's) nor a comparison; or ``compare.json`` is unreadable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KdistillError(f"run directory {str(run_dir)!r} does not exist or is not a directory")
    runs, notes = _load_runs(run_dir)
    compare = dict(extra_compare) if extra_compare is not None else _load_compare(run_dir)
    evaluation, grid = evaluation_table(run_dir), grid_table(run_dir)
    if not runs and compare is None and evaluation is None and grid is None:
        raise KdistillError(
            f"nothing to report in {str(run_dir)!r}: no metrics.jsonl records, no eval.json (in it or in its "
            "sub-runs), no compare.json and no experiment.csv"
        )
    config = _load_config(run_dir)
    title = f"kdistill report: {run_dir.resolve().name}"

    # Summary
    summary_html, summary_md = [], []
    headlines = _headlines(compare) if compare else []
    if headlines:
        summary_html.append(f'<p class="headline">{html.escape(headlines[0])}</p>')
        summary_html.append("<ul>" + "".join(f"<li>{html.escape(h)}</li>" for h in headlines[1:]) + "</ul>")
        summary_md += [f"- {h}" for h in headlines]
        verdicts = compare_verdicts(compare)  # which students differ beyond noise, in words
        if verdicts:
            summary_html.append("<p>Beyond noise? (95% paired bootstrap intervals over the test examples)</p>")
            summary_html.append("<ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in verdicts) + "</ul>")
            summary_md += ["", "Beyond noise? (95% paired bootstrap intervals over the test examples)", ""]
            summary_md += [f"- {v}" for v in verdicts]
    else:
        reason = (
            "the comparison holds no student" if compare else "no comparison of teacher and students (compare.json)"
        )
        summary_html.append(_na(f"Headline not available: {reason}."))
        summary_md.append(f"- Headline not available: {reason}.")
    if runs:
        header, cells = _runs_table(runs)
        summary_html.append(_html_table(header, cells))
        summary_md += ["", _markdown_table(header, cells)]
    else:
        summary_html.append(_na("Training runs not available: no metrics.jsonl records."))
    for table in [evaluation, grid[0] if grid else None]:
        if table is not None:
            summary_html.append(f"<h3>{html.escape(table.title)}</h3>" + _html_table(table.header, table.cells))
            summary_md += ["", f"### {table.title}", "", _markdown_table(table.header, table.cells)]
    if grid and grid[1]:
        summary_html.append(_image(grid[1], "the experiment grid's metrics per variant"))
    summary_html += [_na(note) for note in notes]

    # Comparison
    if compare:
        header, cells = compare_rows(compare)
        teacher_rows = [row.get("role") == "teacher" for row in compare.get("models") or []]
        comparison_html = _html_table(header, cells, teacher_rows)
        settings = compare.get("settings") or {}
        if settings:
            described = ", ".join(f"{key}={value}" for key, value in settings.items())
            comparison_html += f"<p>Settings: {html.escape(described)}.</p>"
        notes_in_words = compare_notes(compare)
        if notes_in_words:
            comparison_html += "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes_in_words) + "</ul>"
        comparison_md = compare_markdown(compare)
    else:
        comparison_html = _na("Comparison not available: no compare.json in this run directory.")
        comparison_md = "Not available: no compare.json.\n"

    # Plots
    loss_images = [(label, _loss_plot(label, records)) for label, records in runs.items()]
    loss_html = "".join(_image(uri, f"loss terms of {label}") for label, uri in loss_images if uri)
    eval_keys = list(dict.fromkeys(key for records in runs.values() for key in _keys(records, "eval/")))
    eval_html = "".join(_image(_eval_plot(key, runs), f"{key} over steps") for key in eval_keys)
    bars = _bars_plot(compare) if compare else None
    cka_images = [
        (row.get("name", "?"), _cka_plot(str(row.get("name", "?")), row["cka"]))
        for row in (compare or {}).get("models") or []
        if isinstance(row.get("cka"), Mapping) and row["cka"]
    ]
    cka_html = "".join(_image(uri, f"CKA heatmap of {name}") for name, uri in cka_images if uri)
    plots_html = "".join(
        [
            "<h3>Loss terms</h3>",
            loss_html or _na("Loss curves not available: no train/* values in metrics.jsonl."),
            "<h3>Eval metrics</h3>",
            eval_html or _na("Eval curves not available: no eval/* lines in metrics.jsonl."),
            "<h3>Teacher vs students</h3>",
            _image(bars, "metric, size and latency per model") if bars else _na("Not available: no compare.json."),
            "<h3>CKA</h3>",
            cka_html or _na("CKA not available: the comparison computed no CKA (cka_layers)."),
        ]
    )

    # Configuration
    if config:
        config_html = f"<p>{html.escape(config[0])}</p><pre>{html.escape(config[1])}</pre>"
        config_md = f"From `{config[0]}`:\n\n```\n{config[1].rstrip()}\n```\n"
    else:
        config_html = _na(f"Configuration not available: none of {', '.join(_CONFIG_FILES)} in this run directory.")
        config_md = "Not available.\n"

    sections = [
        ("summary", "Summary", "".join(summary_html)),
        ("comparison", "Comparison", comparison_html),
        ("plots", "Plots", plots_html),
        ("config", "Configuration", config_html),
    ]
    body = "".join(f'<section id="{key}"><h2>{name}</h2>{content}</section>' for key, name, content in sections)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )
    report_path = atomic_write_text(run_dir / "report.html", page)
    markdown = "\n".join(
        [
            f"# {title}",
            "",
            "## Summary",
            "",
            *summary_md,
            "",
            "## Comparison",
            "",
            comparison_md,
            "## Configuration",
            "",
            config_md,
            "Plots: see report.html.",
            "",
        ]
    )
    atomic_write_text(run_dir / "report.md", markdown)
    return report_path
