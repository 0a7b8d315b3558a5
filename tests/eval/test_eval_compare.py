"""compare_models on tiny models: every figure against an independent computation, and the tables it prints."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_batch, make_causal_batch, make_tiny_bert, make_tiny_llama, make_tiny_lstm
from kdistill.core.views import SequenceView, TokenView
from kdistill.errors import InvalidArgumentError, ShapeMismatchError
from kdistill.eval import accuracy, count_parameters
from kdistill.eval.compare import (
    ModelEntry,
    compare_markdown,
    compare_models,
    format_compare_table,
    write_compare,
)

BATCHES = [make_batch(seed=0), make_batch(seed=1)]


def classification_accuracy(logits: list[list[torch.Tensor]], batches: list[dict]) -> dict[str, float]:
    predictions = [int(p) for heads in logits for p in heads[0].argmax(-1)]
    labels = [int(y) for batch in batches for y in batch["labels"]]
    return {"accuracy": accuracy(predictions, labels), "examples": float(len(labels))}


def reference_kl(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """KL(p_T‖p_S) per row in float64."""
    log_s = student - np.logaddexp.reduce(student, axis=-1, keepdims=True)
    log_t = teacher - np.logaddexp.reduce(teacher, axis=-1, keepdims=True)
    return (np.exp(log_t) * (log_t - log_s)).sum(-1)


def _logits(model: nn.Module, inputs: dict, key: str = "logits") -> np.ndarray:
    with torch.no_grad():
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return getattr(outputs, key).double().numpy()


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    teacher = make_tiny_bert()
    return {
        "teacher": teacher,
        "clone": copy.deepcopy(teacher),
        "small": make_tiny_bert(num_layers=2, hidden=16, seed=1),
        "lstm": make_tiny_lstm(seed=1),
    }


@pytest.fixture(scope="module")
def result(models) -> dict[str, Any]:
    return compare_models(
        ModelEntry("teacher", models["teacher"], role="teacher"),
        [ModelEntry(name, models[name]) for name in ("clone", "small", "lstm")],
        BATCHES,
        view=SequenceView(),
        task_metric=classification_accuracy,
        cka_layers={"small": [("layer 4", "layer 2"), ("layer 2", "layer 1")], "clone": [("layer 3", "layer 3")]},
        latency_repeats=3,
    )


def test_result_rows_and_ratios(result, models):
    rows = {row["name"]: row for row in result["models"]}
    assert [row["name"] for row in result["models"]] == ["teacher", "clone", "small", "lstm"]
    assert result["teacher"] == "teacher" and result["primary_metric"] == "accuracy"
    assert [row["role"] for row in result["models"]] == ["teacher", "student", "student", "student"]
    teacher_params = count_parameters(models["teacher"])
    for name, row in rows.items():
        assert row["params"] == count_parameters(models[name])
        assert row["compression"] == pytest.approx(teacher_params / row["params"])
        # the median of per-round ratios, every model timed in the same interleaved rounds, with its spread
        low, high = row["speedup_iqr"]
        assert low <= row["speedup"] <= high and row["latency_repeats"] == result["settings"]["latency_rounds"]
        assert row["size_bytes"] > 4 * row["params"]  # float32 data plus a header
        assert 0 < row["latency_p50_ms"] <= row["latency_p90_ms"]
        assert row["throughput"] > 0
    assert rows["small"]["compression"] > 1
    assert rows["teacher"]["speedup"] == 1.0 and result["settings"]["latency_interleaved"] is True
    assert result["settings"]["latency_rounds"] >= 3 and isinstance(result["warnings"], list)
    assert rows["teacher"]["agreement"] == 1.0 and rows["teacher"]["mean_kl"] == 0.0
    assert rows["clone"]["agreement"] == 1.0 and rows["clone"]["mean_kl"] == pytest.approx(0.0, abs=1e-6)


def test_quality_figures_match_an_independent_computation(result, models):
    rows = {row["name"]: row for row in result["models"]}
    labels = np.concatenate([b["labels"].numpy() for b in BATCHES])
    teacher = np.concatenate([_logits(models["teacher"], b) for b in BATCHES])  # (8, 3)
    for name in ("teacher", "small", "lstm"):
        student = np.concatenate([_logits(models[name], b) for b in BATCHES])
        row = rows[name]
        assert row["agreement"] == pytest.approx(float((student.argmax(-1) == teacher.argmax(-1)).mean()))
        assert row["mean_kl"] == pytest.approx(float(reference_kl(student, teacher).mean()), abs=1e-6)
        accuracy_value = float((student.argmax(-1) == labels).mean())
        assert row["metrics"] == {"accuracy": pytest.approx(accuracy_value), "examples": 8.0}
    kept = rows["small"]["metrics"]["accuracy"] / rows["teacher"]["metrics"]["accuracy"] * 100
    assert rows["small"]["metric_kept_pct"] == pytest.approx(kept)
    assert rows["small"]["mean_kl"] > 0


def test_cka_per_student(result):
    rows = {row["name"]: row for row in result["models"]}
    assert list(rows["small"]["cka"]) == ["layer 4->layer 2", "layer 2->layer 1"]
    assert all(0.0 <= value <= 1.0 for value in rows["small"]["cka"].values())
    assert rows["clone"]["cka"] == {"layer 3->layer 3": pytest.approx(1.0, abs=1e-6)}
    assert rows["lstm"]["cka"] is None and rows["teacher"]["cka"] is None


def test_result_is_strict_json_and_written_atomically(result, tmp_path):
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    json_path, md_path = write_compare(result, tmp_path / "out")
    assert json.loads(json_path.read_text()) == result
    assert "| teacher |" in md_path.read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["compare.json", "compare.md"]  # no .tmp left


def test_text_and_markdown_tables(result):
    table = format_compare_table(result)
    lines = table.splitlines()
    assert len(lines) == 2 + 4
    assert len({len(line) for line in lines}) == 1  # aligned: every line as wide as the header
    assert lines[0].split()[:5] == ["model", "role", "params", "size", "compression"]
    assert "accuracy" in lines[0] and "speed-up" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == ["teacher", "clone", "small", "lstm"]
    teacher_cells = re.split(r"\s{2,}", lines[2])  # cells are 2+ spaces apart; "83.6 KB" stays one cell
    assert teacher_cells[3].endswith("KB") and teacher_cells[4] == "1.00x"  # the teacher's size and compression
    markdown = compare_markdown(result)
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table_lines[:6]}) == 1
    assert "CKA with the teacher, small:" in markdown and "| layer 4->layer 2 |" in markdown


def test_token_view_counts_only_real_tokens():
    teacher, student = make_tiny_llama(), make_tiny_llama(num_layers=2, hidden=16, seed=1)
    batch = make_causal_batch()
    result = compare_models(
        ModelEntry("teacher", teacher, role="teacher"),
        [ModelEntry("student", student)],
        [batch],
        view=TokenView(),
        latency_repeats=1,
    )
    row = result["models"][1]
    mask = batch["attention_mask"].bool().numpy()
    t, s = _logits(teacher, batch)[mask], _logits(student, batch)[mask]  # (counted, V)
    assert row["agreement"] == pytest.approx(float((t.argmax(-1) == s.argmax(-1)).mean()))
    assert row["mean_kl"] == pytest.approx(float(reference_kl(s, t).mean()), abs=1e-5)
    assert row["metrics"] == {} and row["metric_kept_pct"] is None and result["primary_metric"] is None


@dataclass(frozen=True)
class QAView:
    """Two heads, start and end, as the QA view will have."""

    def logits(self, outputs: Any) -> list[torch.Tensor]:
        return [outputs.start_logits, outputs.end_logits]

    def kd_mask(self, batch: dict) -> torch.Tensor:
        return batch["attention_mask"][:, 0].bool()  # (B,): every example counts once per head


def test_multi_head_agreement_is_the_mean_over_heads():
    teacher, student = make_tiny_bert(task="qa"), make_tiny_bert(num_layers=2, hidden=16, seed=1, task="qa")
    batch = make_batch()
    result = compare_models(
        ModelEntry("teacher", teacher, role="teacher"), [ModelEntry("student", student)], [batch], view=QAView()
    )
    row = result["models"][1]
    agreements, kls = [], []
    for key in ("start_logits", "end_logits"):
        t, s = _logits(teacher, batch, key), _logits(student, batch, key)  # (B, T)
        agreements.append(float((t.argmax(-1) == s.argmax(-1)).mean()))
        kls.append(float(reference_kl(s, t).mean()))
    assert row["agreement"] == pytest.approx(sum(agreements) / 2)
    assert row["mean_kl"] == pytest.approx(sum(kls) / 2, abs=1e-5)


class Recorder(nn.Module):
    """Wraps a model and records the batch size of every call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.sizes: list[int] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        self.sizes.append(int(input_ids.shape[0]))
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_separate_inputs_and_latency_batch():
    teacher_batch, student_batch = make_batch(seq=12), make_batch(seq=6, seed=5, lengths=(6, 4, 6, 3))
    batches = [{"teacher": teacher_batch, "student": student_batch, "labels": teacher_batch["labels"]}]
    teacher, lstm = Recorder(make_tiny_bert(num_layers=2, hidden=16)), Recorder(make_tiny_lstm(seed=1))
    result = compare_models(
        ModelEntry("teacher", teacher, role="teacher"),
        [ModelEntry("lstm", lstm), ModelEntry("lstm-teacher-tokens", copy.deepcopy(lstm.model), inputs="teacher")],
        batches,
        view=SequenceView(),
        latency_batch_size=2,
        latency_repeats=2,
        cka_layers={"lstm": [("layer 2", "model.lstm")]},
    )
    assert 2 in lstm.sizes and 2 in teacher.sizes  # the latency batch: 2 examples of the first batch
    rows = {row["name"]: row for row in result["models"]}
    # the same LSTM fed the teacher's tokens: its logits come from the teacher's input_ids
    expected = _logits(lstm.model, teacher_batch)
    t = _logits(teacher.model, teacher_batch)
    assert rows["lstm-teacher-tokens"]["agreement"] == pytest.approx(
        float((t.argmax(-1) == expected.argmax(-1)).mean())
    )
    assert 0.0 <= rows["lstm"]["cka"]["layer 2->model.lstm"] <= 1.0  # mean-pooled: the tokenizations differ


def test_logits_that_do_not_line_up_are_an_error():
    with pytest.raises(ShapeMismatchError, match="same positions"):
        compare_models(
            ModelEntry("teacher", make_tiny_llama(num_layers=2, hidden=16), role="teacher"),
            [ModelEntry("student", make_tiny_llama(num_layers=2, hidden=16, seed=1))],
            [{"teacher": make_causal_batch(seq=12), "student": make_causal_batch(seq=8)}],
            view=TokenView(),
        )


def test_argument_errors(models):
    teacher = ModelEntry("teacher", models["teacher"], role="teacher")
    small = ModelEntry("small", models["small"])
    with pytest.raises(InvalidArgumentError, match="at least one batch"):
        compare_models(teacher, [small], [], view=SequenceView())
    with pytest.raises(InvalidArgumentError, match="unique"):
        compare_models(teacher, [small, ModelEntry("small", models["lstm"])], BATCHES, view=SequenceView())
    with pytest.raises(InvalidArgumentError, match="role='teacher'"):
        compare_models(teacher, [ModelEntry("t2", models["clone"], role="teacher")], BATCHES, view=SequenceView())
    with pytest.raises(InvalidArgumentError, match=r"cka_layers names \['nobody'\]"):
        compare_models(teacher, [small], BATCHES, view=SequenceView(), cka_layers={"nobody": [("layer 1", "layer 1")]})
    with pytest.raises(InvalidArgumentError, match="latency_batch_size"):
        compare_models(teacher, [small], BATCHES, view=SequenceView(), latency_batch_size=0)
    with pytest.raises(InvalidArgumentError, match="role must be"):
        ModelEntry("x", models["small"], role="assistant")
    with pytest.raises(InvalidArgumentError, match="inputs must be"):
        ModelEntry("x", models["small"], inputs="other")


def test_outcomes_give_every_model_an_interval_and_each_student_pair_a_verdict(models):
    from kdistill.eval.compare import compare_verdicts

    def outcomes(logits, batches):
        predictions = [int(p) for heads in logits for p in heads[0].argmax(-1)]
        return predictions, [int(y) for batch in batches for y in batch["labels"]]

    result = compare_models(
        ModelEntry("teacher", models["teacher"], role="teacher"),
        [ModelEntry(name, models[name]) for name in ("clone", "small")],
        BATCHES,
        view=SequenceView(),
        task_metric=classification_accuracy,
        outcomes=outcomes,
        latency_repeats=2,
        latency_budget_s=0.0,
        bootstrap_resamples=200,
    )
    significance = result["significance"]
    assert significance["examples"] == sum(len(batch["labels"]) for batch in BATCHES)
    rows = {row["name"]: row for row in result["models"]}
    low, high = rows["small"]["metrics_ci"]["accuracy"]
    assert low <= rows["small"]["metrics"]["accuracy"] <= high
    assert [(p["a"], p["b"]) for p in significance["pairs"] if p["metric"] == "accuracy"] == [("clone", "small")]
    assert len(compare_verdicts(result)) == 1 and "clone" in compare_verdicts(result)[0]
    assert f"[{low:.3f}-{high:.3f}]" in format_compare_table(result)
