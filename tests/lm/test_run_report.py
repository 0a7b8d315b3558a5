"""``kdistill report`` on causal-LM runs of both backends and on an experiment grid: their numbers in the page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_run_backends import _config

from kdistill.cli import main
from kdistill.config import load_config
from kdistill.runs.experiment_table import write_comparison
from kdistill.runs.run import run


@pytest.mark.parametrize("backend", ["trainer", "engine"])
def test_report_of_a_causal_lm_run_shows_its_final_evaluation(tmp_path: Path, backend: str) -> None:
    config = _config(tmp_path, backend, training={"num_epochs": 1})
    result = run(load_config(data=config))
    assert main(["report", str(result.output_dir)]) == 0
    page = (result.output_dir / "report.html").read_text()
    markdown = (result.output_dir / "report.md").read_text()
    scores = json.loads((result.output_dir / "eval.json").read_text())
    assert "Final evaluation (eval.json)" in page
    for key in ("validation/perplexity", "validation/kl_to_teacher", "validation/teacher_agreement"):
        assert f"<th>{key}</th>" in page
        assert f"{scores[key]:.4g}" in page and f"{scores[key]:.4g}" in markdown


def test_report_of_an_experiment_grid_shows_its_table_figure_and_variants(tmp_path: Path) -> None:
    grid = tmp_path / "grid"
    rows = [
        {"variant": "kl", "validation/accuracy": 0.8125, "params": 1234},
        {"variant": "sft", "validation/accuracy": 0.6875, "params": 1234},
    ]
    write_comparison(rows, grid, ["validation/accuracy"], "Loss ablation", label="variant")
    for row in rows:  # each variant's own run directory with its eval.json
        (grid / row["variant"]).mkdir()
        (grid / row["variant"] / "eval.json").write_text(
            json.dumps({"validation": {"accuracy": row["validation/accuracy"]}})
        )
    assert main(["report", str(grid)]) == 0
    page = (grid / "report.html").read_text()
    assert "Experiment grid (experiment.csv)" in page and "data:image/png;base64," in page
    assert "<td>kl</td><td>0.8125</td>" in page and "<td>sft</td><td>0.6875</td>" in page
    assert page.count("<th>validation/accuracy</th>") == 2  # the grid's table and the variants' eval.json table


def test_report_of_a_directory_with_nothing_to_show_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to report" in err[0]
    assert not (tmp_path / "empty" / "report.html").exists()
