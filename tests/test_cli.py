from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kdistill.cli import main
from kdistill.losses import LOSSES
from kdistill.runs.demo import run_demo


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
def test_quick_demo_runs_offline_end_to_end(tmp_path, capsys):
    """The demo's whole path on the real MiniLM and the real tweets, with tiny step counts."""
    result = run_demo(tmp_path / "demo", quick=True, cache_dir=str(tmp_path / "cache"))
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "demo" / "compare.json").read_text())
    names = [row["name"] for row in written["models"]]
    assert names == ["teacher (MiniLM-L6)", "student-2l-distilled", "student-2l-baseline", "bilstm-distilled"]
    rows = {row["name"]: row for row in written["models"]}
    assert rows["student-2l-distilled"]["params"] < rows["teacher (MiniLM-L6)"]["params"]
    assert rows["student-2l-distilled"]["cka"] and rows["bilstm-distilled"]["latency_p50_ms"] > 0
    assert "student-2l-baseline" in out and "report:" in out
    assert "transfer set: 64 unlabelled rows" in out and "data.transfer is left out of training" in out
    assert "beyond noise" in out  # the verdicts, in words
    # the same trimmed vocabulary for every student, so one set of inputs feeds them all
    records = [rows[name]["vocabulary"] for name in names[1:]]
    assert all(record == records[0] for record in records) and records[0]["of"] == 30522
    assert (
        json.loads((tmp_path / "demo" / "bilstm-distilled" / "student" / "config.json").read_text())["embedding_dim"]
        == 128
    )
    assert (tmp_path / "demo" / "report.html").is_file()
    for name in ("student-2l-distilled", "student-2l-baseline", "bilstm-distilled"):
        assert json.loads((tmp_path / "demo" / name / "run.json").read_text())["status"] == "complete"
    assert result["demo"]["quick"] is True
    # a second run keeps the finished runs and the cached teacher
    run_demo(tmp_path / "demo", quick=True, cache_dir=str(tmp_path / "cache"))
    assert capsys.readouterr().out.count("already complete, kept") == 3


@pytest.mark.slow
def test_quick_llm_demo_runs_offline_end_to_end(tmp_path, capsys):
    """The LLM demo's whole path on the real SmolLM2 and the real dialogs, with tiny step counts."""
    import csv

    assert main(["demo", "--llm", "--quick", "--out", str(tmp_path / "llm")]) == 0
    out = tmp_path / "llm"
    rows = {row["model"]: row for row in csv.DictReader((out / "llm_demo.csv").open())}
    assert {"teacher (30 layers)", "student, untrained (6 layers)", "sft", "forward_kl", "jsd"} <= set(rows)
    for variant in ("sft", "forward_kl", "reverse_kl", "jsd", "kl+ce"):
        scores = json.loads((out / variant / "eval.json").read_text())
        assert float(rows[variant]["perplexity"]) == pytest.approx(scores["test/perplexity"])
        assert float(rows[variant]["teacher_agreement"]) == pytest.approx(scores["test/teacher_agreement"])
    assert float(rows["teacher (30 layers)"]["params"]) > 2.5 * float(rows["sft"]["params"])
    assert "| forward_kl |" in capsys.readouterr().out
