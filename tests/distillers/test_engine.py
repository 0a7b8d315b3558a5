"""The distillation engine end to end on tiny models: matches, projections, accumulation, teachers, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from support import confident, flat_state, teacher_and_student, toy_examples
from transformers import AutoModelForSequenceClassification

from kdistill.data import PadCollator
from kdistill.distillers import (
    Distiller,
    Match,
    MultiTaskDistiller,
    MultiTeacherDistiller,
    Objective,
    Stage,
    SupervisedTrainer,
    expand_layer_map,
)
from kdistill.distillers.kd_terms import mixture_logits
from kdistill.distillers.multitask import TaskBatches
from kdistill.errors import InvalidArgumentError, KdistillError, ShapeMismatchError
from kdistill.training import TrainConfig, train
from kdistill.training.checkpoint import checkpoint_dirs, latest_checkpoint

collate = PadCollator()


def config(tmp_path, **overrides) -> TrainConfig:
    values = {
        "output_dir": str(tmp_path / "run"),
        "batch_size": 8,
        "learning_rate": 3e-3,
        "log_every": 1,
        "progress": False,
        "log_with": (),
        "max_grad_norm": None,
        "weight_decay": 0.0,
        "lr_scheduler": "constant",
    }
    values.update(overrides)
    return TrainConfig(**values)


def term_value(distiller: Distiller, name: str, batch) -> float:
    """A term's mean over its units on one batch, with the distiller's current student."""
    distiller.module.eval()
    with torch.no_grad():
        terms = distiller.compute_terms(distiller.module, batch, {name: 1.0}, 0, 1)
        counts = distiller.count_units(batch)
    term = terms[name]
    return float(term.total) / counts[term.unit]


def kdistill_hooks(model: torch.nn.Module) -> list[str]:
    """Hooks of ours left on any module (transformers installs its own output-capturing hooks; those may stay)."""
    return [
        f"{name}: {hook.__qualname__}"
        for name, module in model.named_modules()
        for hook in [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        if getattr(hook, "__module__", "").startswith("kdistill")
    ]


MATCH_KINDS = [
    Match(teacher="layer 4", student="layer 2", loss="hidden_mse", projection="linear"),
    Match(teacher="layer 2", student="layer 1", loss="cosine", projection="mlp"),
    Match(teacher="layer 4", student="layer 2", loss="pkd", projection="linear"),
    Match(teacher="layer 4", student="layer 2", loss="nst"),
    Match(teacher="embeddings", student="embeddings", feature="embeddings", loss="hidden_mse", projection="linear"),
    Match(teacher="layer 4", student="layer 2", feature="attention", loss="attention_mse"),
    Match(teacher="layer 3", student="layer 1", feature="attention", loss="attention_kl"),
    Match(teacher="logits", student="logits", feature="logits", loss="logit_mse"),
    Match(
        teacher="bert.encoder.layer.3.output",
        student="bert.encoder.layer.1.output",
        loss="hidden_mse",
        projection="linear",
    ),
]


@pytest.mark.parametrize("match", MATCH_KINDS, ids=lambda m: f"{m.loss}-{m.feature}-{m.projection}")
def test_each_match_moves_the_student_toward_the_teacher(tmp_path, match):
    teacher, student = teacher_and_student()
    objective = Objective(kd_weight=0.0, hard_weight=0.0, matches=[match])
    distiller = Distiller(student, teacher, objective)
    data = toy_examples(32)
    probe = collate(data[:16])
    distiller.setup(probe)
    before = term_value(distiller, match.name, probe)
    train(distiller, data, config(tmp_path, max_steps=25))
    after = term_value(distiller, match.name, probe)
    assert after < 0.8 * before, (before, after)
    assert kdistill_hooks(student) == [] and kdistill_hooks(teacher) == []


def test_kd_and_hard_terms_train_and_teacher_stays_frozen(tmp_path):
    teacher, student = teacher_and_student()
    teacher_before = flat_state(teacher)
    objective = Objective(
        kd_loss="forward_kl",
        kd_weight=0.7,
        hard_weight=0.3,
        temperature=2.0,
        matches=expand_layer_map("uniform", 4, 2, loss="hidden_mse", projection="linear"),
    )
    distiller = Distiller(student, teacher, objective)
    data = toy_examples(32)
    probe = collate(data[:16])
    distiller.setup(probe)
    before = term_value(distiller, "kd", probe)
    result = train(distiller, data, config(tmp_path, max_steps=30))
    assert term_value(distiller, "kd", probe) < before
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for key, value in flat_state(teacher).items():
        assert torch.equal(value, teacher_before[key]), key
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 30 and {"train/kd", "train/hard", "train/hidden:layer 4->layer 2"} <= logged[-1].keys()
    assert logged[-1]["weight/kd"] == 0.7 and logged[-1]["samples_per_second"] > 0
    # the logged loss is the weighted sum of the logged terms
    last = logged[-1]
    expected = sum(last[f"weight/{name}"] * last[f"train/{name}"] for name in objective.term_names)
    assert math.isclose(last["train/loss"], expected, rel_tol=1e-6)
    assert result.global_step == 30


def test_projections_are_saved_beside_the_student_never_inside(tmp_path):
    teacher, student = teacher_and_student()
    objective = Objective(matches=[Match(teacher="layer 4", student="layer 2", projection="linear")])
    distiller = Distiller(student, teacher, objective)
    train(distiller, toy_examples(16), config(tmp_path, max_steps=2))
    run = tmp_path / "run"
    saved = load_file(str(run / "student" / "model.safetensors"))
    assert not any("projection" in key for key in saved)
    reloaded = AutoModelForSequenceClassification.from_pretrained(run / "student")
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, student.state_dict()[key])
    projections = load_file(str(run / "projections.safetensors"))
    assert set(projections) == {"hidden:layer 4->layer 2/weight", "hidden:layer 4->layer 2/bias"}
    assert projections["hidden:layer 4->layer 2/weight"].shape == (32, 16)


@pytest.mark.parametrize("lengths", ["variable", "fixed"])
def test_gradient_accumulation_equals_one_large_batch(tmp_path, lengths):
    """4 micro-batches of 2 give the update of one batch of 8, padding and all (global normalization).

    Plain SGD, so the update is the learning rate times the gradient: AdamW's first step is nearly sign(g), which
    turns float noise in a gradient that is almost zero into a visible difference and would test nothing more."""
    data = toy_examples(8, min_len=3, max_len=12 if lengths == "variable" else 3)
    finals = []
    for batch_size, accumulation in ((8, 1), (2, 4)):
        teacher, student = teacher_and_student()
        objective = Objective(
            kd_weight=0.6,
            hard_weight=0.4,
            temperature=2.0,
            matches=[
                Match(teacher="layer 4", student="layer 2", projection="linear"),
                Match(teacher="layer 4", student="layer 2", feature="attention", loss="attention_mse"),
                Match(teacher="layer 2", student="layer 1", loss="pkd", projection="linear"),
            ],
        )
        distiller = Distiller(student, teacher, objective)
        train(
            distiller,
            data,
            config(
                tmp_path / f"b{batch_size}",
                max_steps=1,
                batch_size=batch_size,
                gradient_accumulation_steps=accumulation,
                learning_rate=1.0,
                optimizer="sgd",
                sgd_momentum=0.0,
            ),
        )
        finals.append((flat_state(student), {k: v.clone() for k, v in distiller.projections_state().items()}))
    (student_a, proj_a), (student_b, proj_b) = finals
    for key in student_a:
        torch.testing.assert_close(student_a[key], student_b[key], rtol=1e-5, atol=1e-6)
    for key in proj_a:
        torch.testing.assert_close(proj_a[key], proj_b[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(v, teacher_and_student()[1].state_dict()[k]) for k, v in student_a.items())


def test_size_mismatch_without_projection_names_both_sizes():
    teacher, student = teacher_and_student()
    distiller = Distiller(student, teacher, Objective(matches=[Match(teacher="layer 4", student="layer 2")]))
    with pytest.raises(ShapeMismatchError, match=r"hidden:layer 4->layer 2.*16.*32"):
        distiller.setup(collate(toy_examples(4)))


def test_bad_match_specs_fail_before_training():
    teacher, student = teacher_and_student()
    with pytest.raises(KdistillError, match="layer 7"):
        Distiller(student, teacher, Objective(matches=[Match(teacher="layer 7", student="layer 1")])).setup(
            collate(toy_examples(4))
        )
    with pytest.raises(KdistillError, match="unknown loss 'hiden_mse'; did you mean 'hidden_mse'"):
        Match(teacher="layer 1", student="layer 1", loss="hiden_mse")
    with pytest.raises(InvalidArgumentError, match="layer_map names teacher layer 9; the teacher has 4"):
        expand_layer_map([[9, 1]], 4, 2)
    with pytest.raises(InvalidArgumentError, match="projection 'conv'"):
        Match(teacher="layer 1", student="layer 1", projection="conv")


def test_layer_map_shorthands():
    uniform = expand_layer_map("uniform", 12, 4, loss="cosine")
    assert [(m.teacher, m.student) for m in uniform] == [
        ("layer 3", "layer 1"),
        ("layer 6", "layer 2"),
        ("layer 9", "layer 3"),
        ("layer 12", "layer 4"),
    ]
    assert all(m.loss == "cosine" for m in uniform)
    assert [(m.teacher, m.student) for m in expand_layer_map("last", 12, 4)] == [("layer 12", "layer 4")]
    explicit = expand_layer_map([[0, 0], {"teacher": 8, "student": 2}], 12, 4)
    assert [(m.teacher, m.student) for m in explicit] == [("layer 0", "layer 0"), ("layer 8", "layer 2")]


def test_stages_and_schedules_drive_the_weights():
    match = Match(teacher="layer 4", student="layer 2", name="h")
    objective = Objective(
        kd_weight={"name": "linear", "start": 1.0, "end": 0.0},
        hard_weight=0.5,
        matches=[match],
        stages=[Stage(steps=10, weights={"kd": 0.0, "hard": 0.0}), Stage(steps=None, weights={"matches": 0.0})],
    )
    assert objective.weights(0, 30) == {"kd": 0.0, "hard": 0.0, "h": 1.0}
    assert objective.weights(9, 30) == {"kd": 0.0, "hard": 0.0, "h": 1.0}
    # second stage: the match is off, kd follows its own schedule over the whole run, hard its base weight
    assert objective.weights(10, 30) == {"kd": pytest.approx(1 - 10 / 30), "hard": 0.5, "h": 0.0}
    with pytest.raises(InvalidArgumentError, match="'kd_typo', which is not a term"):
        Objective(stages=[Stage(steps=None, weights={"kd_typo": 1.0})])


def test_progressive_distillation_trains_matches_first_then_logits(tmp_path):
    teacher, student = teacher_and_student()
    objective = Objective(
        kd_weight=1.0,
        matches=[Match(teacher="layer 4", student="layer 2", projection="linear", name="h")],
        stages=[Stage(steps=3, weights={"kd": 0.0}), Stage(steps=None, weights={"h": 0.0})],
    )
    result = train(Distiller(student, teacher, objective), toy_examples(16), config(tmp_path, max_steps=6))
    steps = [r for r in result.history if "train/loss" in r]
    assert all("train/h" in r and "train/kd" not in r for r in steps[:3])
    assert all("train/kd" in r and "train/h" not in r for r in steps[3:])


def test_multi_teacher_mixture_matches_a_float64_reference():
    teacher_a, student = teacher_and_student()
    teacher_b = teacher_and_student()[0]
    distiller = MultiTeacherDistiller(student, [teacher_a, teacher_b], Objective(), weights=[3.0, 1.0])
    logits_a, logits_b = torch.randn(5, 3), torch.randn(5, 3)
    weights = distiller.teacher_weights  # normalized: [0.75, 0.25]
    mixture = mixture_logits([logits_a, logits_b], weights, 2.0)
    reference = 0.75 * torch.softmax(logits_a.double() / 2, -1) + 0.25 * torch.softmax(logits_b.double() / 2, -1)
    torch.testing.assert_close(torch.softmax(mixture.double() / 2, -1), reference, rtol=1e-6, atol=1e-7)
    # confidence weighting: per example, each teacher weighted by its probability of the gold label
    labels = torch.tensor([0, 1, 2, 0, 1])
    mixture = mixture_logits([logits_a, logits_b], weights, 1.0, "confidence", labels)
    p_a, p_b = torch.softmax(logits_a.double(), -1), torch.softmax(logits_b.double(), -1)
    w_a = 0.75 * p_a[range(5), labels]
    w_b = 0.25 * p_b[range(5), labels]
    reference = (w_a[:, None] * p_a + w_b[:, None] * p_b) / (w_a + w_b)[:, None]
    torch.testing.assert_close(torch.softmax(mixture.double(), -1), reference, rtol=1e-6, atol=1e-7)


def test_multi_teacher_distillation_trains(tmp_path):
    teacher_a, student = teacher_and_student()
    from conftest import make_tiny_bert

    teacher_b = make_tiny_bert(num_layers=2, hidden=24, heads=4, seed=5)
    objective = Objective(
        kd_weight=1.0,
        temperature=2.0,
        matches=[
            Match(teacher="layer 4", student="layer 2", projection="linear", teacher_index=0, name="a"),
            Match(teacher="layer 2", student="layer 2", projection="linear", teacher_index=1, name="b"),
        ],
    )
    distiller = MultiTeacherDistiller(student, [teacher_a, teacher_b], objective, combine="confidence")
    data = toy_examples(32)
    probe = collate(data[:16])
    distiller.setup(probe)
    before = {name: term_value(distiller, name, probe) for name in ("kd", "a", "b")}
    train(distiller, data, config(tmp_path, max_steps=25))
    after = {name: term_value(distiller, name, probe) for name in ("kd", "a", "b")}
    assert all(after[n] < before[n] for n in before), (before, after)


def test_multi_task_distillation_with_a_shared_body(tmp_path):
    from conftest import make_tiny_bert

    teacher_a = confident(make_tiny_bert(num_layers=4, hidden=32, seed=1, num_labels=3))
    teacher_b = confident(make_tiny_bert(num_layers=4, hidden=32, seed=3, num_labels=2))
    student_a = make_tiny_bert(num_layers=2, hidden=16, seed=2, num_labels=3)
    student_b = make_tiny_bert(num_layers=2, hidden=16, seed=4, num_labels=2)
    student_b.bert = student_a.bert  # one body, two heads
    data = {"three": toy_examples(40, num_labels=3, seed=1), "two": toy_examples(10, num_labels=2, seed=2)}
    batches = TaskBatches(data, {"three": collate, "two": collate}, batch_size=8, tau=1.0, seed=0)
    share = sum(batches.task_of(i) == "three" for i in range(400)) / 400
    assert abs(share - 0.8) < 0.06  # proportional to dataset size at tau = 1
    distillers = {
        "three": Distiller(student_a, teacher_a, Objective(kd_weight=1.0, temperature=2.0)),
        "two": Distiller(student_b, teacher_b, Objective(kd_weight=1.0, temperature=2.0)),
    }
    multi = MultiTaskDistiller(distillers, batches.sample_batches())
    probes = batches.sample_batches()
    multi.setup(None)
    before = {t: term_value(distillers[t], "kd", probes[t]) for t in data}
    result = train(multi, batches, config(tmp_path, max_steps=30, batch_size=1), collate_fn=TaskBatches.collate)
    after = {t: term_value(distillers[t], "kd", probes[t]) for t in data}
    assert all(after[t] < before[t] for t in data), (before, after)
    assert any("train/two/kd" in r for r in result.history) and any("train/three/kd" in r for r in result.history)
    assert student_b.bert is student_a.bert


def test_supervised_trainer_is_the_no_teacher_baseline(tmp_path):
    _, student = teacher_and_student()
    data = toy_examples(32)
    distiller = SupervisedTrainer(student)
    probe = collate(data)
    distiller.setup(probe)
    before = term_value(distiller, "hard", probe)
    train(distiller, data, config(tmp_path, max_steps=30))
    assert term_value(distiller, "hard", probe) < before
    assert distiller.teachers == []


def test_ema_self_distillation_moves_the_teacher_toward_the_student(tmp_path):
    _, student = teacher_and_student()
    distiller = Distiller(student, "ema", Objective(kd_weight=1.0, hard_weight=1.0), ema_decay=0.5)
    initial = flat_state(distiller.teachers[0])
    train(distiller, toy_examples(16), config(tmp_path, max_steps=3))
    ema, now = flat_state(distiller.teachers[0]), flat_state(student)
    key = "classifier.weight"
    assert not torch.equal(ema[key], initial[key])
    assert (ema[key] - now[key]).norm() < (initial[key] - now[key]).norm()
    assert not distiller.teachers[0].training


def test_self_distillation_deeper_layers_teach_shallower(tmp_path):
    from conftest import make_tiny_bert

    match = Match(teacher="layer 4", student="layer 2", loss="cosine", weight=5.0)
    data = toy_examples(32)
    probe = collate(data[:16])
    # the deeper layer is the teacher: detached, so only the layers up to 2 receive the match's gradient
    student = make_tiny_bert(num_layers=4, hidden=16, seed=2)
    distiller = Distiller(student, "self", Objective(kd_weight=0.0, hard_weight=0.0, matches=[match]))
    module = distiller.setup(probe)
    terms = distiller.compute_terms(module, probe, {match.name: 1.0}, 0, 1)
    terms[match.name].total.backward()
    layers = student.bert.encoder.layer
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in layers[3].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layers[1].parameters())
    student.zero_grad(set_to_none=True)
    # trained on hard labels, layers drift apart; with the self-match they stay closer
    distances = {}
    for name, matches in (("hard only", []), ("hard + self", [match])):
        student = make_tiny_bert(num_layers=4, hidden=16, seed=2)
        distiller = Distiller(student, "self", Objective(kd_weight=0.0, hard_weight=1.0, matches=matches))
        train(distiller, data, config(tmp_path / name.replace(" ", ""), max_steps=25))
        probe_distiller = Distiller(student, "self", Objective(kd_weight=0.0, hard_weight=0.0, matches=[match]))
        probe_distiller.setup(probe)
        distances[name] = term_value(probe_distiller, match.name, probe)
    assert distances["hard + self"] < 0.8 * distances["hard only"], distances


def test_cached_teacher_logits_replace_the_live_teacher(tmp_path):
    teacher, student_a = teacher_and_student()
    student_b = teacher_and_student()[1]
    data = toy_examples(16)
    with torch.no_grad():
        cached = [
            dict(ex, teacher_logits=teacher(**{k: v for k, v in collate([ex]).items() if k != "labels"}).logits[0])
            for ex in data
        ]
    live = Distiller(student_a, teacher, Objective(kd_weight=1.0, temperature=2.0))
    offline = Distiller(student_b, None, Objective(kd_weight=1.0, temperature=2.0))
    train(live, data, config(tmp_path / "live", max_steps=4, batch_size=4))
    train(offline, cached, config(tmp_path / "cached", max_steps=4, batch_size=4))
    for key, value in flat_state(student_a).items():
        torch.testing.assert_close(value, flat_state(student_b)[key], rtol=1e-5, atol=1e-6)


def test_checkpoints_keep_the_last_k_and_ignore_cut_short_ones(tmp_path):
    teacher, student = teacher_and_student()
    distiller = Distiller(
        student, teacher, Objective(matches=[Match(teacher="layer 4", student="layer 2", projection="linear")])
    )
    train(distiller, toy_examples(32), config(tmp_path, max_steps=7, save_every=2, keep_last=2))
    run = tmp_path / "run"
    assert [p.name for p in checkpoint_dirs(run)] == ["step-00000004", "step-00000006"]
    latest = latest_checkpoint(run)
    assert {
        "student",
        "projections.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng-0.pt",
        "trainer_state.json",
    } <= {p.name for p in latest.iterdir()}
    # a checkpoint cut short: a temp dir, and a step dir without its state file
    (run / "checkpoints" / ".tmp-step-00000008").mkdir()
    (run / "checkpoints" / "step-00000009").mkdir()
    assert latest_checkpoint(run) == latest
    with pytest.raises(KdistillError, match="already holds checkpoints"):
        train(distiller, toy_examples(32), config(tmp_path, max_steps=7))


def test_early_stopping_and_best_checkpoint(tmp_path):
    teacher, student = teacher_and_student()
    scores = iter([0.5, 0.7, 0.6, 0.6, 0.6, 0.9])
    result = train(
        Distiller(student, teacher, Objective()),
        toy_examples(32),
        config(tmp_path, max_steps=20, eval_every=2, metric_for_best="score", early_stopping_patience=3),
        eval_fn=lambda model: {"score": next(scores)},
    )
    # evaluations at steps 2, 4, 6, 8, 10: best at 4, then three without improvement → stop at 10
    assert result.stopped_early and result.global_step == 10
    assert result.best_metric == 0.7 and result.best_step == 4
    info = json.loads((tmp_path / "run" / "best" / "info.json").read_text())
    assert info["step"] == 4
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()


def test_train_config_rejects_bad_values():
    with pytest.raises(InvalidArgumentError, match="gradient_accumulation_steps must be a positive integer, got 0"):
        TrainConfig(gradient_accumulation_steps=0)
    with pytest.raises(InvalidArgumentError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(InvalidArgumentError, match="early_stopping_patience needs metric_for_best"):
        TrainConfig(early_stopping_patience=2)


def test_bf16_mixed_precision_runs_on_cpu(tmp_path):
    teacher, student = teacher_and_student()
    objective = Objective(
        kd_weight=1.0, hard_weight=0.5, matches=[Match(teacher="layer 4", student="layer 2", projection="linear")]
    )
    distiller = Distiller(student, teacher, objective)
    result = train(distiller, toy_examples(16), config(tmp_path, max_steps=3, mixed_precision="bf16"))
    assert next(teacher.parameters()).dtype == torch.bfloat16
    assert next(student.parameters()).dtype == torch.float32
    assert all(math.isfinite(v) for r in result.history for k, v in r.items() if k.startswith("train/"))


def test_grouping_by_length_is_a_seeded_permutation_with_less_padding():
    from kdistill.training.loop import EpochSampler

    lengths = [3 + (7 * i) % 46 for i in range(500)]
    grouped = EpochSampler(500, seed=1, lengths=lengths, batch_size=16)
    order = list(grouped)
    assert sorted(order) == list(range(500)) and order == list(EpochSampler(500, 1, lengths=lengths, batch_size=16))
    grouped.set_epoch(1)
    assert list(grouped) != order  # another epoch, another order

    def padded(order: list[int]) -> int:
        return sum(max(lengths[i] for i in order[k : k + 16]) * len(order[k : k + 16]) for k in range(0, 500, 16))

    shuffled = list(EpochSampler(500, seed=1))
    assert padded(order) < 0.75 * padded(shuffled)
    with pytest.raises(InvalidArgumentError, match="3 lengths for 500 examples"):
        EpochSampler(500, 1, lengths=[1, 2, 3])


def test_fused_adamw_is_the_default_and_makes_the_same_update(tmp_path, monkeypatch):
    made: list[object] = []
    plain_adamw = torch.optim.AdamW

    def recording_adamw(*args, **kwargs):
        made.append(kwargs.get("fused"))
        return plain_adamw(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    matches = expand_layer_map("uniform", 4, 2, loss="hidden_mse", projection="linear")
    objective = Objective(kd_loss="forward_kl", kd_weight=0.5, hard_weight=0.5, temperature=2.0, matches=matches)
    students = {}
    for fused in (True, False):
        teacher, student = teacher_and_student()  # dropout on, uneven lengths; 2 epochs of weight decay and clipping
        cfg = config(tmp_path / str(fused), num_epochs=2, fused_optimizer=fused, weight_decay=0.01, max_grad_norm=1.0)
        train(Distiller(student, teacher, objective), toy_examples(24), cfg)
        students[fused] = flat_state(student)
    assert made == [True, None]  # fused on the CPU by default; torch's default (for-loop) implementation when off
    for name, value in students[False].items():
        torch.testing.assert_close(students[True][name], value, rtol=1e-5, atol=1e-6, msg=name)
