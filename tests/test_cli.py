from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kdistill.cli import main
from kdistill.demo import DemoConfig, format_results, run_demo
from kdistill.losses import LOSSES


def test_losses_command_lists_every_divergence(capsys):
    assert main(["losses", "--kind", "divergence"]) == 0
    out = capsys.readouterr().out
    for name in LOSSES.names(kind="divergence"):
        assert name in out
    assert "hidden_mse" not in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: kdistill" in capsys.readouterr().out


def test_console_script_is_installed():
    done = subprocess.run([sys.executable, "-m", "kdistill.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("kdistill ")


@pytest.mark.slow
def test_demo_trains_teacher_and_students_on_real_tweets(tmp_path):
    cfg = DemoConfig(buckets=2**12, teacher_dim=32, student_dim=4, epochs=1, batch_size=256)
    results = run_demo(tmp_path / "demo", cfg)
    written = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert written["models"] == results["models"]
    assert written["train_examples"] + written["test_examples"] == 38158
    models = written["models"]
    assert set(models) == {"teacher", "student (labels only)", "student (distilled)"}
    majority_rate = 16186 / 38158  # "negative" is the largest class
    for row in models.values():
        assert row["accuracy"] > majority_rate + 0.05
    assert models["teacher"]["agreement_with_teacher"] == 1.0
    assert models["student (distilled)"]["compression"] > 4
    assert models["student (distilled)"]["params"] == models["student (labels only)"]["params"]
    table = format_results(results)
    assert "student (distilled)" in table and "accuracy" in table
