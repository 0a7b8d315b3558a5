"""DistillationTrainer on tiny Llama and Qwen: the logged loss, exact accumulation, policies, PEFT, resume, saving.

References are recomputed here with :func:`kdistill.distillers.lm_loss.causal_lm_loss_sums` on the same batches (whose
own values are checked against float64 in tests/lm/test_loss.py), or read back from what the trainer wrote to disk.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import make_tiny_llama, make_tiny_qwen
from kdistill.distillers.lm_loss import causal_lm_loss_sums
from kdistill.errors import InvalidArgumentError, VocabMismatchError
from kdistill.integrations import DistillationArguments, DistillationTrainer

SEQ = 10
FAMILIES = {"llama": make_tiny_llama, "qwen": make_tiny_qwen}


def _examples(n: int = 8, vocab: int = 120, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Pre-padded examples of length SEQ with different numbers of counted tokens (lengths and prompts differ)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = 3 + (i * 5) % (SEQ - 2)  # 3..10
        prompt = i % 3
        ids = torch.randint(5, vocab, (SEQ,), generator=generator)
        mask = (torch.arange(SEQ) < length).long()
        ids = ids * mask
        labels = ids.masked_fill(mask == 0, -100)
        labels[:prompt] = -100
        prompt_ids = torch.zeros(4, dtype=torch.long)  # left-padded prompt of at least one token
        prompt_ids[4 - max(prompt, 1) :] = ids[: max(prompt, 1)]
        examples.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "labels": labels,
                "prompt_input_ids": prompt_ids,
                "prompt_attention_mask": (prompt_ids != 0).long(),
            }
        )
    return examples


def _stack(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


def _models(family: str = "llama", student_vocab: int = 128) -> tuple[nn.Module, nn.Module]:
    make = FAMILIES[family]
    teacher = make(num_layers=2, hidden=32, heads=4, kv_heads=2, seed=0)
    student = make(num_layers=1, hidden=16, heads=4, kv_heads=2, vocab=student_vocab, seed=1)
    return student, teacher


def _args(tmp_path: Path, **overrides: Any) -> DistillationArguments:
    options: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "report_to": [],
        "max_steps": 2,
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "logging_steps": 1,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "seed": 0,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
    }
    options.update(overrides)
    return DistillationArguments(**options)


def _trainer(student: nn.Module, teacher: Any, args: DistillationArguments, **kwargs: Any) -> DistillationTrainer:
    kwargs.setdefault("train_dataset", _examples())
    kwargs.setdefault("data_collator", _stack)
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, **kwargs)


def _train_logs(trainer: DistillationTrainer) -> list[dict[str, float]]:
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------- training and the logged loss


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize(
    ("loss", "kwargs"),
    [
        ("forward_kl", None),
        ("reverse_kl", None),
        ("skewed_forward_kl", {"skew": 0.1}),
        ("skewed_reverse_kl", {"skew": 0.1}),
        ("generalized_jsd", {"beta": 0.5}),
        ("total_variation", None),
    ],
)
def test_trains_with_each_divergence(tmp_path: Path, family: str, loss: str, kwargs: dict | None) -> None:
    student, teacher = _models(family)
    before = _params(student)
    args = _args(tmp_path, kd_loss=loss, kd_kwargs=kwargs, hard_weight=0.5, temperature=2.0)
    logs = _train_logs(_trainer(student, teacher, args))
    assert len(logs) == 2
    for entry in logs:
        assert torch.isfinite(torch.tensor(entry["loss"]))
        assert entry["kd_loss"] >= 0 and entry["ce_loss"] > 0
        assert entry["loss"] == pytest.approx(4.0 * entry["kd_loss"] + 0.5 * entry["ce_loss"], rel=1e-5)
    assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters())
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training


@pytest.mark.parametrize("chunked", [False, True])
def test_bf16_autocast_step_is_close_to_float32(tmp_path: Path, chunked: bool) -> None:
    """bf16 mixed precision (CPU autocast here; the code path CUDA takes) gives the float32 loss to bf16 precision."""
    losses = {}
    for bf16 in (False, True):
        student, teacher = _models("llama")
        args = _args(tmp_path / str(bf16), max_steps=1, bf16=bf16, chunked_loss=chunked, chunk_size=8, hard_weight=0.5)
        losses[bf16] = _train_logs(_trainer(student, teacher, args, train_dataset=_examples(4)))[0]["loss"]
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)


def test_sft_without_a_teacher_logs_the_mean_token_cross_entropy(tmp_path: Path) -> None:
    student, _ = _models("llama")
    reference = copy.deepcopy(student)
    examples = _examples(4)
    logs = _train_logs(_trainer(student, None, _args(tmp_path, max_steps=1, kd_weight=0.0, hard_weight=1.0),
                                train_dataset=examples))  # fmt: skip
    batch = _stack(examples)
    with torch.no_grad():
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    targets = batch["labels"][:, 1:]
    counted = targets != -100
    nll = -logits[:, :-1].log_softmax(-1)[counted].gather(-1, targets[counted][:, None]).sum()
    assert logs[0]["loss"] == pytest.approx(float(nll) / int(counted.sum()), rel=1e-5)
    with pytest.raises(InvalidArgumentError, match="teacher_model is required when kd_weight"):
        _trainer(student, None, _args(tmp_path))


@pytest.mark.parametrize("chunked", [False, True])
def test_logged_loss_equals_the_library_on_the_same_batch(tmp_path: Path, chunked: bool) -> None:
    student, teacher = _models("qwen")
    reference_student = copy.deepcopy(student)
    examples = _examples(4)
    args = _args(tmp_path, max_steps=1, kd_loss="generalized_jsd", kd_kwargs={"beta": 0.3}, temperature=1.5,
                 hard_weight=0.25, kd_weight=2.0, chunked_loss=chunked, chunk_size=5)  # fmt: skip
    logs = _train_logs(_trainer(student, teacher, args, train_dataset=examples))
    sums = causal_lm_loss_sums(
        reference_student, teacher, _stack(examples), divergence="generalized_jsd", temperature=1.5,
        hard_weight=0.25, kd_kwargs={"beta": 0.3},
    )  # fmt: skip
    expected = (2.0 * 1.5**2 * sums.kd_sum + 0.25 * sums.hard_sum) / sums.count
    assert logs[0]["loss"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert logs[0]["kd_loss"] == pytest.approx(float(sums.kd_sum.detach()) / sums.count, rel=1e-5)
    assert logs[0]["ce_loss"] == pytest.approx(float(sums.hard_sum.detach()) / sums.count, rel=1e-5)


def test_accumulation_4x2_equals_1x8(tmp_path: Path) -> None:
    examples = _examples(8)
    counts = [int((e["labels"][1:] != -100).sum()) for e in examples]
    assert len(set(counts)) > 3  # a per-micro-batch mean would weight these differently
    results = []
    for batch, accumulation in ((8, 1), (2, 4)):
        student, teacher = _models()
        args = _args(tmp_path / f"{batch}", max_steps=1, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=accumulation, hard_weight=0.5, learning_rate=1.0)  # fmt: skip
        logs = _train_logs(_trainer(student, teacher, args, train_dataset=examples))
        results.append((logs[0]["loss"], _params(student)))
    (loss_full, params_full), (loss_accumulated, params_accumulated) = results
    assert loss_accumulated == pytest.approx(loss_full, rel=1e-5)
    initial = _params(_models()[0])
    updates = {name: value - initial[name] for name, value in params_full.items()}
    # relative to the largest update: a small tensor's update is below the float32 spacing of its parameters
    scale = max(update.abs().max() for update in updates.values())
    assert scale > 1e-3
    for name, update in updates.items():
        error = (params_accumulated[name] - initial[name] - update).abs().max()
        assert error <= 1e-5 * scale, name


@pytest.mark.parametrize("vocab_policy", ["truncate", "pad"])
def test_vocab_policies_train(tmp_path: Path, vocab_policy: str) -> None:
    student, teacher = _models(student_vocab=120)
    logs = _train_logs(_trainer(student, teacher, _args(tmp_path, vocab_policy=vocab_policy, hard_weight=1.0)))
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)


def test_vocab_error_is_raised_before_training(tmp_path: Path) -> None:
    student, teacher = _models(student_vocab=120)
    with pytest.raises(VocabMismatchError, match=r"120.*128"):
        _trainer(student, teacher, _args(tmp_path))


# ---------------------------------------------------------------- chunked, PEFT


def test_chunked_loss_gives_the_same_loss_and_gradients(tmp_path: Path) -> None:
    batch = _stack(_examples(4))
    results = []
    for chunked in (False, True):
        student, teacher = _models()
        trainer = _trainer(student, teacher, _args(tmp_path, chunked_loss=chunked, chunk_size=3, hard_weight=1.0))
        student.train()
        loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=torch.tensor(17))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}))
    (plain_loss, plain_grads), (chunked_loss, chunked_grads) = results
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-5, atol=0)
    for name, grad in plain_grads.items():
        assert (chunked_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max().clamp_min(1e-12), name


def test_lora_student_trains_only_its_adapters(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    student, teacher = _models()
    before = _params(student)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = _trainer(student, teacher, _args(tmp_path, learning_rate=0.1), peft_config=config)
    assert isinstance(trainer.model, peft.PeftModel)
    adapters_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    _train_logs(trainer)
    changed = {
        n for n, p in trainer.model.named_parameters() if "lora_" in n and not torch.equal(p, adapters_before[n])
    }
    assert changed
    base = trainer.model.get_base_model()
    for name, value in before.items():  # the base weights did not move
        assert torch.equal(base.get_parameter(name), value), name
    # save_model writes the adapter; reloading it onto a fresh base gives identical logits
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = peft.PeftModel.from_pretrained(_models()[0], str(tmp_path / "adapter")).eval()
    batch = _stack(_examples(2))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trainer.model(**inputs).logits)


def test_peft_teacher_is_used_with_its_adapters(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    student, teacher = _models()
    config = peft.LoraConfig(r=4, lora_alpha=64, target_modules=["v_proj", "down_proj"], init_lora_weights=False)
    peft_teacher = peft.get_peft_model(teacher, config)
    trainer = _trainer(student, peft_teacher, _args(tmp_path, max_steps=1), train_dataset=_examples(4))
    assert trainer.teacher is peft_teacher
    logs = _train_logs(trainer)
    batch = _stack(_examples(4))
    fresh = _models()[0]
    with_adapters = causal_lm_loss_sums(fresh, peft_teacher, batch)
    with peft_teacher.disable_adapter():
        without = causal_lm_loss_sums(fresh, peft_teacher, batch)
    assert logs[0]["kd_loss"] == pytest.approx(float(with_adapters.kd_sum.detach()) / with_adapters.count, rel=1e-5)
    assert logs[0]["kd_loss"] != pytest.approx(float(without.kd_sum.detach()) / without.count, rel=1e-4)


# ---------------------------------------------------------------- on-policy


def test_on_policy_loss_is_computed_on_the_students_samples(tmp_path: Path) -> None:
    student, teacher = _models()
    reference_student = copy.deepcopy(student)
    args = _args(tmp_path, max_steps=1, on_policy_fraction=1.0, on_policy_max_new_tokens=5, hard_weight=0.5)
    trainer = _trainer(student, teacher, args, train_dataset=_examples(4))
    logs = _train_logs(trainer)
    (batch,) = trainer.last_on_policy_batches
    assert batch["input_ids"].shape[1] <= 4 + 5
    sums = causal_lm_loss_sums(reference_student, teacher, batch, hard_weight=0.5)
    assert sums.count > 0
    assert logs[0]["loss"] == pytest.approx(float((sums.kd_sum + 0.5 * sums.hard_sum) / sums.count), rel=1e-5)
    # labels: the completions only; every row ends at its first EOS (id 2) or after max_new_tokens
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        learned = ids[labels != -100]
        assert 1 <= learned.numel() <= 5 and (learned[:-1] != 2).all()
        assert bool((labels[mask == 0] == -100).all())


def test_on_policy_generation_is_batched_cached_and_its_share_logged(tmp_path: Path) -> None:
    student, teacher = _models()
    calls: list[dict[str, Any]] = []
    generate = student.generate

    def recording_generate(**kwargs: Any) -> torch.Tensor:
        calls.append({"rows": kwargs["input_ids"].shape[0], "use_cache": kwargs.get("use_cache")})
        return generate(**kwargs)

    student.generate = recording_generate
    args = _args(tmp_path, max_steps=2, per_device_train_batch_size=2, on_policy_fraction=1.0,
                 on_policy_max_new_tokens=4, logging_steps=1)  # fmt: skip
    logs = _train_logs(_trainer(student, teacher, args, train_dataset=_examples(4)))
    assert calls == [{"rows": 2, "use_cache": True}] * 2  # one call per micro-batch, all its prompts at once
    assert len(logs) == 2
    for record in logs:
        assert 0.0 < record["on_policy_generation_share"] <= 1.0
        assert record["on_policy_generation_seconds"] > 0.0
    off_policy = _train_logs(_trainer(*_models(), _args(tmp_path / "off", max_steps=1)))
    assert "on_policy_generation_share" not in off_policy[0]


# ---------------------------------------------------------------- checkpoints, saving, logging


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    student, teacher = _models()
    common = {"max_steps": 4, "per_device_train_batch_size": 2, "hard_weight": 0.5, "optim": "adamw_torch"}
    _train_logs(_trainer(student, teacher, _args(tmp_path / "full", **common)))
    interrupted_student, teacher2 = _models()
    args = _args(tmp_path / "cut", save_strategy="steps", save_steps=2, **common)
    _trainer(interrupted_student, teacher2, args).train()
    checkpoint = tmp_path / "cut" / "out" / "checkpoint-2"
    assert checkpoint.is_dir()
    resumed_student, teacher3 = _models()
    _trainer(resumed_student, teacher3, args).train(resume_from_checkpoint=str(checkpoint))
    for name, value in _params(student).items():
        torch.testing.assert_close(resumed_student.get_parameter(name), value, rtol=1e-6, atol=1e-6)


def test_save_model_reloads_with_identical_logits(tmp_path: Path) -> None:
    student, teacher = _models()
    trainer = _trainer(student, teacher, _args(tmp_path))
    _train_logs(trainer)
    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "student")).eval()
    assert not any("teacher" in p.name for p in (tmp_path / "student").iterdir())
    batch = _stack(_examples(3))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    for name, value in student.state_dict().items():  # the weights are bit-identical
        assert torch.equal(reloaded.state_dict()[name], value), name
    student.eval()
    with torch.no_grad():  # the reloaded config may pick another attention kernel: float rounding only
        torch.testing.assert_close(reloaded(**inputs).logits, student(**inputs).logits, rtol=1e-5, atol=1e-6)


def test_tensorboard_writes_events(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    student, teacher = _models()
    args = _args(tmp_path, report_to=["tensorboard"])  # transformers 5 writes to output_dir/runs/...
    _train_logs(_trainer(student, teacher, args))
    assert list((tmp_path / "out").rglob("events.out.tfevents.*"))


def test_teacher_loaded_from_a_path(tmp_path: Path) -> None:
    student, teacher = _models()
    teacher.save_pretrained(tmp_path / "teacher")
    trainer = _trainer(student, str(tmp_path / "teacher"), _args(tmp_path, max_steps=1, teacher_dtype="float64"))
    assert trainer.teacher.dtype == torch.float64 and not trainer.teacher.training
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    _train_logs(trainer)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kd_loss": "hidden_mse"}, r"kd_loss='hidden_mse' is not a registered divergence; choose one of .*kl"),
        ({"kd_loss": "nope"}, r"not a registered divergence.*reverse_kl"),
        ({"kd_weight": 0.0, "hard_weight": 0.0}, "both 0"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"vocab_policy": "clip"}, "vocab_policy='clip'"),
        ({"chunk_size": 0}, "chunk_size must be an int ≥ 1"),
        ({"on_policy_fraction": 1.5}, r"on_policy_fraction must be in \[0, 1\]"),
        ({"kd_loss": "generalized_jsd", "kd_kwargs": {"skew": 0.1}}, "kd_kwargs"),
        ({"teacher_dtype": "int8"}, "teacher_dtype='int8'"),
    ],
)
def test_argument_validation(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        _args(tmp_path, **overrides)


@pytest.mark.parametrize(
    ("old", "new", "value"),
    [("loss", "kd_loss", "reverse_kl"), ("ce_weight", "hard_weight", 0.5), ("scale_kd_by_t2", "t2_scaling", False),
     ("divergence_kwargs", "kd_kwargs", {"beta": 0.5})],
)  # fmt: skip
def test_old_argument_names_are_refused_with_the_new_name(tmp_path: Path, old: str, new: str, value: Any) -> None:
    with pytest.raises(InvalidArgumentError, match=rf"DistillationArguments\({old}=\.\.\.\) is now {new}=.*{new}="):
        _args(tmp_path, **{old: value})
