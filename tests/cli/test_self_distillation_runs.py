"""Self-distillation from YAML: ``teacher: ema`` (a moving average of the student teaches it) and ``teacher: self``
(the student's deeper layers teach its shallower ones), checked against what the runs wrote to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_support import QUIET, save_tiny_bert, sentiment_rows, write_csv, write_yaml
from safetensors.torch import load_file

from kdistill.cli import main
from kdistill.distillers import Distiller


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("self-distill")
    student = save_tiny_bert(root / "student", num_labels=2, seed=3)
    train = write_csv(root / "train.csv", sentiment_rows(48, seed=1))
    valid = write_csv(root / "valid.csv", sentiment_rows(16, seed=2))
    data = f"{{files: {{train: {train}, validation: {valid}}}, label_names: [negative, positive]}}"
    return root, student, data


def _yaml(root: Path, name: str, body: str, *, out: str | None = None, training: str = "") -> Path:
    return write_yaml(
        root / f"{name}.yaml",
        f"""task: sequence_classification
{body}
training:
  batch_size: 8
  learning_rate: 3.0e-3
  lr_scheduler: constant
  max_steps: 6
{training}{QUIET}output_dir: {root / (out or name)}
""",
    )


def _ema_body(data: str, student: Path, decay: float = 0.5) -> str:
    return f"""data: {data}
teacher: ema
student: {{kind: pretrained, path: {student}}}
distill: {{kd_weight: 0.5, hard_weight: 0.5, temperature: 2.0, ema_decay: {decay}}}"""


def test_an_ema_teacher_follows_the_student_by_its_decay(world):
    root, student, data = world
    config = _yaml(root, "ema", _ema_body(data, student), training="  save_every: 1\n  keep_last: 10\n")
    assert main(["train", str(config)]) == 0
    out = root / "ema"
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    assert "validation/accuracy" in json.loads((out / "eval.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/kd" in r for r in records)
    # every checkpoint holds the student and its EMA teacher: ema_k = d·ema_{k-1} + (1 - d)·student_k, in float64
    steps = sorted((out / "checkpoints").glob("step-*"))
    assert len(steps) >= 3
    initial = load_file(str(student / "model.safetensors"))
    previous = {key: value.double() for key, value in initial.items()}
    moved = False
    for step in steps:
        ema = load_file(str(step / "extra-ema_teacher.safetensors"))
        now = load_file(str(step / "student" / "model.safetensors"))
        shared = [key for key in now if key in ema and key in previous]
        assert len(shared) > 10
        for key in shared:
            expected = 0.5 * previous[key] + 0.5 * now[key].double()
            torch.testing.assert_close(ema[key].double(), expected, rtol=1e-5, atol=1e-6, msg=f"{step.name} {key}")
        moved = moved or any(not torch.equal(ema[key], initial[key]) for key in shared)
        previous = {key: ema[key].double() for key in shared}
    assert moved


def test_an_ema_run_resumed_after_a_crash_ends_as_the_uninterrupted_run(world, monkeypatch):
    root, student, data = world
    training = "  save_every: 2\n"
    assert main(["train", str(_yaml(root, "ema-whole", _ema_body(data, student, 0.7), training=training))]) == 0
    broken = _yaml(root, "ema-broken", _ema_body(data, student, 0.7), training=training)
    original, calls = Distiller.after_step, []

    def crash_after_three_steps(self: Distiller) -> None:
        original(self)
        calls.append(1)
        if len(calls) == 3:  # after step 3, one step past the checkpoint at step 2
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(Distiller, "after_step", crash_after_three_steps)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["--debug", "train", str(broken)])
    monkeypatch.setattr(Distiller, "after_step", original)
    assert not (root / "ema-broken" / "student").exists()
    assert main(["train", str(broken), "resume=true"]) == 0
    whole = load_file(str(root / "ema-whole" / "student" / "model.safetensors"))
    resumed = load_file(str(root / "ema-broken" / "student" / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    for key in whole:  # the EMA teacher (the KD targets of steps 3-6) was restored from the checkpoint
        assert torch.equal(whole[key], resumed[key]), key


def test_a_self_teacher_trains_the_shallow_layer_toward_the_deep_one(world):
    root, student, data = world
    body = f"""data: {data}
teacher: self
student: {{kind: pretrained, path: {student}}}
distill:
  kd_weight: 0.0
  hard_weight: 1.0
  matches: [{{teacher: layer 4, student: layer 2, loss: hidden_mse, weight: 1.0, name: deep_to_shallow}}]"""
    assert main(["train", str(_yaml(root, "self", body, training="  log_every: 1\n"))]) == 0
    out = root / "self"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    matched = [r["train/deep_to_shallow"] for r in records if "train/deep_to_shallow" in r]
    assert len(matched) == 6 and all(value >= 0 for value in matched)
    assert "validation/accuracy" in json.loads((out / "eval.json").read_text())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "teacher: ema\nstudent: {kind: from_teacher, layers: [0]}",
            "student.kind 'from_teacher' builds the student from a teacher model",
        ),
        (
            "teacher: self\nstudent: {kind: pretrained, path: STUDENT}\n"
            "distill: {matches: [{teacher: layer 4, student: layer 2}]}",
            "distill.kd_weight must be 0 with teacher: self",
        ),
        (
            "teacher: self\nstudent: {kind: pretrained, path: STUDENT}\ndistill: {kd_weight: 0}",
            "teacher: self teaches through distill.matches",
        ),
        (
            "teacher: {kind: ema, path: STUDENT}\nstudent: {kind: pretrained, path: STUDENT}",
            "teacher.path cannot be used with teacher.kind 'ema'",
        ),
        (
            "teacher: ema\nstudent: {kind: pretrained, path: STUDENT}\ndistill: {teacher_cache: somewhere}",
            "distill.teacher_cache cannot be used with teacher: ema",
        ),
        (
            "teacher: ema\nstudent: {kind: pretrained, path: STUDENT}\nextra_teachers: [{path: STUDENT}]",
            "extra_teachers cannot be used with teacher: ema",
        ),
        (
            "mode: train_teacher\nteacher: ema\nstudent: {kind: pretrained, path: STUDENT}",
            "which only mode 'distill' uses",
        ),
        ("teacher: {fine_tune: true}", "teacher.path is required"),
    ],
)
def test_what_self_distillation_cannot_do_is_refused_in_one_line(world, capsys, body, message):
    root, student, data = world
    config = _yaml(root, "refused", f"data: {data}\n{body.replace('STUDENT', str(student))}")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (root / "refused").exists()


def test_kdistill_cache_refuses_a_teacher_that_is_the_student(world, capsys):
    root, student, data = world
    config = _yaml(root, "ema-cache", _ema_body(data, student))
    assert main(["cache", str(config), "--out", str(root / "cache")]) == 2
    err = capsys.readouterr().err
    assert "teacher: ema is the student itself" in err and "Traceback" not in err
    assert not (root / "cache").exists()
