"""build_report on a fake run directory: sections, embedded PNGs, no external assets, graceful gaps, clear errors."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from conftest import make_batch, make_tiny_bert, make_tiny_lstm
from kdistill.core.views import SequenceView
from kdistill.errors import KdistillError
from kdistill.eval import accuracy
from kdistill.eval.compare import ModelEntry, compare_models, write_compare
from kdistill.report import build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_PREFIX = "data:image/png;base64,"


class PageParser(HTMLParser):
    """Headings by level, every <img> src, and every attribute that could load or link something."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: dict[str, list[str]] = {"h1": [], "h2": [], "h3": []}
        self.images: list[str] = []
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.tags: list[str] = []
        self._heading: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attributes = dict(attrs)
        if tag in self.headings:
            self._heading = tag
            self.headings[tag].append("")
        if tag == "img":
            self.images.append(attributes.get("src") or "")
        for name, value in attrs:
            if name in ("src", "href", "srcset", "action", "data") and not (value or "").startswith(DATA_PREFIX):
                self.links.append((tag, name, value or ""))

    def handle_endtag(self, tag):
        if tag == self._heading:
            self._heading = None

    def handle_data(self, data):
        if self._heading:
            self.headings[self._heading][-1] += data


def _parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _write_metrics(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def _train_records(steps: int, scale: float, evals: bool = True) -> list[dict]:
    records = []
    for step in range(1, steps + 1):
        records.append(
            {
                "step": step,
                "epoch": 0,
                "lr": 1e-3,
                "train/loss": scale / step,
                "train/kd": 0.5 * scale / step,
                "train/hidden:layer 4->layer 2": 0.1 * scale / step,
                "weight/kd": min(1.0, step / 4),
            }
        )
        if evals and step % 4 == 0:
            records.append({"step": step, "epoch": 0, "eval/accuracy": 0.5 + 0.05 * step / 4})
    return records


def _classification_accuracy(logits, batches):
    predictions = [int(p) for heads in logits for p in heads[0].argmax(-1)]
    return {"accuracy": accuracy(predictions, [int(y) for b in batches for y in b["labels"]])}


@pytest.fixture(scope="module")
def compare_result() -> dict:
    return compare_models(
        ModelEntry("teacher", make_tiny_bert(), role="teacher"),
        [
            ModelEntry("student-distilled", make_tiny_bert(num_layers=2, hidden=16, seed=1)),
            ModelEntry("lstm", make_tiny_lstm()),
        ],
        [make_batch(seed=0), make_batch(seed=1)],
        view=SequenceView(),
        task_metric=_classification_accuracy,
        cka_layers={"student-distilled": [(f"layer {t}", f"layer {s}") for t in (2, 4) for s in (1, 2)]},
        latency_repeats=2,
    )


@pytest.fixture
def run_dir(tmp_path, compare_result) -> Path:
    directory = tmp_path / "demo-run"
    _write_metrics(directory / "metrics.jsonl", _train_records(8, 2.0))
    _write_metrics(directory / "teacher" / "metrics.jsonl", _train_records(8, 1.0))
    _write_metrics(directory / "student-distilled" / "metrics.jsonl", _train_records(12, 3.0))
    write_compare(compare_result, directory)
    (directory / "config.yaml").write_text("task: classification\nstudent:\n  layers: 2  # <tiny> & cheap\n")
    return directory


def test_full_report_sections_and_embedded_images(run_dir, tmp_path):
    path = build_report(run_dir)
    assert path == run_dir / "report.html"
    page = _parse(path)
    assert page.headings["h1"] == ["kdistill report: demo-run"]
    assert page.headings["h2"] == ["Summary", "Comparison", "Plots", "Configuration"]
    assert page.headings["h3"] == ["Loss terms", "Eval metrics", "Teacher vs students", "CKA"]
    # 3 loss plots (run + 2 sub-runs), 1 eval metric, 1 bar chart, 1 CKA heatmap (only one student has CKA)
    assert len(page.images) == 3 + 1 + 1 + 1
    for src in page.images:
        assert src.startswith(DATA_PREFIX)
        assert base64.b64decode(src[len(DATA_PREFIX) :], validate=True).startswith(PNG_MAGIC)
    assert page.links == []  # nothing loads from outside the file
    assert "script" not in page.tags and "link" not in page.tags
    text = path.read_text()
    assert "not available" not in text.lower()
    assert "student-distilled vs teacher" in text and "fewer parameters" in text
    assert "&lt;tiny&gt; &amp; cheap" in text  # the config, escaped
    # one PNG out to a file: a real image with a size
    png = tmp_path / "plot.png"
    png.write_bytes(base64.b64decode(page.images[-1][len(DATA_PREFIX) :]))
    with Image.open(png) as image:
        width, height = image.size
        assert image.format == "PNG" and width > 0 and height > 0


def test_markdown_summary(run_dir):
    build_report(run_dir)
    markdown = (run_dir / "report.md").read_text()
    assert markdown.startswith("# kdistill report: demo-run")
    for heading in ("## Summary", "## Comparison", "## Configuration"):
        assert heading in markdown
    assert "| teacher | teacher |" in markdown and "| student-distilled | student |" in markdown
    assert "| demo-run | 8 |" in markdown and "| student-distilled | 12 |" in markdown  # runs: last steps
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".tmp")) == []


def test_missing_pieces_say_not_available(tmp_path):
    directory = tmp_path / "bare"
    _write_metrics(directory / "metrics.jsonl", _train_records(5, 1.0, evals=False))
    with open(directory / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "train/lo')  # a run killed mid-write
    page = _parse(build_report(directory))
    assert page.headings["h2"] == ["Summary", "Comparison", "Plots", "Configuration"]
    assert len(page.images) == 1  # the loss curves only
    text = (directory / "report.html").read_text()
    for message in (
        "Comparison not available",
        "Eval curves not available",
        "CKA not available",
        "Configuration not available",
        "1 unreadable line(s) skipped",
    ):
        assert message in text


def test_comparison_alone_and_extra_compare(tmp_path, compare_result):
    directory = tmp_path / "compare-only"
    directory.mkdir()
    page = _parse(build_report(directory, extra_compare=compare_result))
    assert len(page.images) == 2  # bars and the CKA heatmap
    text = (directory / "report.html").read_text()
    assert "Training runs not available" in text and "Loss curves not available" in text
    write_compare(compare_result, directory)
    assert len(_parse(build_report(directory)).images) == 2  # the same from compare.json


def test_nothing_to_report_is_an_error_naming_the_directory(tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(KdistillError, match="empty-run"):
        build_report(empty)
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(KdistillError, match=r"no metrics\.jsonl records"):
        build_report(empty)
    with pytest.raises(KdistillError, match="does not exist"):
        build_report(tmp_path / "missing")
    (empty / "compare.json").write_text("{not json")
    with pytest.raises(KdistillError, match=r"compare\.json is not valid JSON"):
        build_report(empty)


def test_importing_kdistill_does_not_import_matplotlib():
    code = "import sys, kdistill, kdistill.eval, kdistill.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _outcomes(logits, batches):
    predictions = [int(p) for heads in logits for p in heads[0].argmax(-1)]
    return predictions, [int(y) for b in batches for y in b["labels"]]


def test_the_report_says_in_words_which_students_differ_beyond_noise(tmp_path):
    import html

    from kdistill.eval.compare import compare_verdicts

    result = compare_models(
        ModelEntry("teacher", make_tiny_bert(), role="teacher"),
        [
            ModelEntry("two-layer", make_tiny_bert(num_layers=2, hidden=16, seed=1)),
            ModelEntry("lstm", make_tiny_lstm()),
        ],
        [make_batch(seed=s, batch=16) for s in range(4)],
        view=SequenceView(),
        task_metric=_classification_accuracy,
        outcomes=_outcomes,
        latency_repeats=2,
    )
    verdicts = compare_verdicts(result)
    assert len(verdicts) == 1 and "two-layer" in verdicts[0] and "lstm" in verdicts[0]
    write_compare(result, tmp_path)
    text = build_report(tmp_path).read_text()
    assert "Beyond noise?" in text and html.escape(verdicts[0]) in text
    assert verdicts[0] in (tmp_path / "report.md").read_text()
