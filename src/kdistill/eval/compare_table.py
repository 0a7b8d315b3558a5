"""The text, markdown and file forms of a :func:`kdistill.eval.compare.compare_models` result: the aligned table
the CLI prints, ``compare.md``, ``compare.json``, and the verdicts and warnings in words."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdistill._io import atomic_write_text
from kdistill.eval.significance import verdicts


def _finite(value: Any) -> Any:
    """``value`` with NaN/inf floats turned into None, recursively: the result must be strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _human_count(value: float | None) -> str:
    if value is None:
        return "-"
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.1f}{suffix}"
    return str(int(value))


def _human_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for limit, suffix in ((1024**3, "GB"), (1024**2, "MB"), (1024, "KB")):
        if value >= limit:
            return f"{value / limit:.1f} {suffix}"
    return f"{int(value)} B"


def _number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if 0 < abs(value) < 10**-digits:  # a tiny KL would otherwise print as 0.0000
        return f"{value:.1e}"
    return f"{value:.{digits}f}" if abs(value) < 10 else f"{value:.2f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _metric_names(result: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for row in result.get("models", []):
        for key in row.get("metrics") or {}:
            if key not in names:
                names.append(key)
    return names


def compare_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The comparison as a header and text cells, one row per model (shared by the text, markdown and HTML tables)."""
    metrics = _metric_names(result)
    header = ["model", "role", "params", "size", "compression", *metrics, "kept", "agreement", "mean KL"]
    header += ["p50 ms", "p90 ms", "examples/s", "speed-up"]
    cells: list[list[str]] = []
    for row in result.get("models", []):
        values = row.get("metrics") or {}
        kept = row.get("metric_kept_pct")
        cells.append(
            [
                str(row.get("name", "?")),
                str(row.get("role", "")),
                _human_count(row.get("params")),
                _human_bytes(row.get("size_bytes")),
                _times(row.get("compression")),
                *[_with_interval(values.get(name), (row.get("metrics_ci") or {}).get(name)) for name in metrics],
                "-" if kept is None else f"{kept:.1f}%",
                _number(row.get("agreement")),
                _number(row.get("mean_kl")),
                _number(row.get("latency_p50_ms"), 2),
                _number(row.get("latency_p90_ms"), 2),
                "-" if row.get("throughput") is None else f"{row['throughput']:.1f}",
                _speedup_cell(row),
            ]
        )
    return header, cells


def _with_interval(value: float | None, interval: Sequence[float] | None) -> str:
    """A metric with its 95% interval when there is one, ``0.7225 [0.703-0.742]``."""
    text = _number(value)
    if not interval or value is None:
        return text
    return f"{text} [{interval[0]:.3f}-{interval[1]:.3f}]"


def _speedup_cell(row: Mapping[str, Any]) -> str:
    """The speed-up with its interquartile range over the interleaved rounds, ``1.48x (1.41-1.55)``."""
    text = _times(row.get("speedup"))
    spread = row.get("speedup_iqr")
    if row.get("role") == "teacher" or not spread or None in spread:
        return text
    return f"{text} ({spread[0]:.2f}-{spread[1]:.2f})"


def compare_verdicts(result: Mapping[str, Any]) -> list[str]:
    """In words, for each pair of students: who is ahead on the primary metric and whether beyond noise."""
    significance = result.get("significance")
    if not significance:
        return []
    available = {pair["metric"] for pair in significance.get("pairs", [])}
    primary = result.get("primary_metric") or "accuracy"
    # entity F1 for token classification (its first metric is precision), else the primary metric, else accuracy
    metric = "f1" if "f1" in available else primary if primary in available else "accuracy"
    return verdicts(significance, metric)


def compare_notes(result: Mapping[str, Any]) -> list[str]:
    """The verdicts (:func:`compare_verdicts`), then what each trimmed vocabulary saved, one line each."""
    notes = compare_verdicts(result)
    for row in result.get("models", []):
        vocabulary, embedding, width = row.get("vocabulary"), row.get("embedding_params"), row.get("embedding_width")
        if not vocabulary or not embedding or not width:
            continue
        kept, of = int(vocabulary["kept"]), int(vocabulary["of"])
        untrimmed = embedding + (of - kept) * int(width)  # the same embedding with a row for every piece
        notes.append(
            f"{row['name']}: vocabulary trimmed to {kept:,} of {of:,} word pieces; its embedding holds "
            f"{_human_count(embedding)} of its {_human_count(row.get('params'))} parameters (untrimmed: "
            f"{_human_count(untrimmed)}, {_human_count(row.get('params', 0) + untrimmed - embedding)} in all)"
        )
    return notes


def compare_warnings(result: Mapping[str, Any]) -> list[str]:
    """What makes a comparison's timings doubtful, one line each (a busy CPU, a model whose latency varied)."""
    return [str(warning) for warning in result.get("warnings") or []]


def format_compare_table(result: Mapping[str, Any]) -> str:
    """An aligned plain-text table of a :func:`compare_models` result (what the CLI prints)."""
    header, cells = compare_rows(result)
    widths = [max(len(text) for text in column) for column in zip(header, *cells, strict=True)]

    def line(texts: list[str]) -> str:
        first = texts[0].ljust(widths[0])  # names left, numbers right
        rest = [text.rjust(width) for text, width in zip(texts[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    separator = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), separator, *(line(row) for row in cells)])


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _cka_markdown(result: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for row in result.get("models", []):
        if not row.get("cka"):
            continue
        lines += ["", f"CKA with the teacher, {row['name']}:", "", "| teacher -> student | CKA |", "|---|---:|"]
        lines += [f"| {_md_cell(pair)} | {_number(value)} |" for pair, value in row["cka"].items()]
    return lines


def compare_markdown(result: Mapping[str, Any]) -> str:
    """A markdown table of a :func:`compare_models` result, followed by each student's CKA values."""
    header, cells = compare_rows(result)
    header = [_md_cell(text) for text in header]
    cells = [[_md_cell(text) for text in row] for row in cells]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", ":---", *["---:"] * (len(header) - 2)]) + "|",
        *("| " + " | ".join(row) + " |" for row in cells),
    ]
    notes = [f"- {note}" for note in compare_notes(result)]
    notes += [f"> warning: {warning}" for warning in compare_warnings(result)]
    return "\n".join(lines + _cka_markdown(result) + (["", *notes] if notes else [])) + "\n"


def write_compare(result: Mapping[str, Any], directory: str | Path) -> tuple[Path, Path]:
    """Write ``compare.json`` (the result, strict JSON) and ``compare.md`` (its markdown table) into ``directory``.

    Both are written atomically (temporary file, then ``os.replace``), so a reader never sees half a file.

    Returns:
        The paths of ``compare.json`` and ``compare.md``.
    """
    directory = Path(directory)
    json_path = atomic_write_text(directory / "compare.json", json.dumps(_finite(result), indent=2, allow_nan=False))
    md_path = atomic_write_text(directory / "compare.md", "# Teacher vs students\n\n" + compare_markdown(result))
    return json_path, md_path
