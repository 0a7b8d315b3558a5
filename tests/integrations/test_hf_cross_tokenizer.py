"""DistillationTrainer with a teacher that tokenizes differently (cross_tokenizer="uld" / "align"): a few steps bring
the student closer to the teacher (measured on the weights written to disk), and what cannot work is refused by name.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lm"))
from test_cross_tokenizer_loss import (
    TEACHER_VOCAB,
    WORDS,
    cross_batch,
    make_bpe_chat_tokenizer,
    make_student,
    make_teacher,
    trainer_for,
)

from conftest import LLAMA_VOCAB, make_tiny_chat_tokenizer
from kdistill.data.sft import render_sft
from kdistill.data.sft_collate import SFTCollator
from kdistill.distillers.lm_cross import cross_tokenizer_loss_sums
from kdistill.errors import InvalidArgumentError, VocabMismatchError
from kdistill.integrations import DistillationArguments, DistillationTrainer


def records(n: int) -> list[dict]:
    rng = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        pick = torch.randint(len(WORDS), (6,), generator=rng).tolist()
        prompt, reply = " ".join(WORDS[i] for i in pick[:2]), " ".join(WORDS[i] for i in pick[2:])
        out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]})
    return out


def kd_per_token(student, teacher, batch, method: str) -> float:
    with torch.no_grad():
        sums = cross_tokenizer_loss_sums(student.eval(), teacher, batch, method=method)
    return float(sums.kd_sum) / sums.count


@pytest.mark.parametrize("method", ["uld", "align"])
def test_a_few_steps_bring_the_saved_student_closer_to_the_teacher(tmp_path: Path, method: str) -> None:
    train = render_sft(
        records(16), make_tiny_chat_tokenizer(), teacher_tokenizer=make_bpe_chat_tokenizer(), offsets=True
    )
    batch = SFTCollator(pad_token_id=0)(train)
    student, teacher = make_student(), make_teacher()
    before = kd_per_token(student, teacher, batch, method)
    trainer = trainer_for(
        tmp_path,
        student,
        teacher,
        method,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=12,
        learning_rate=3e-2,
        logging_steps=4,
        seed=0,
    )
    trainer.train_dataset = train
    trainer.data_collator = SFTCollator(pad_token_id=0, teacher_pad_token_id=make_bpe_chat_tokenizer().pad_token_id)
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    after = kd_per_token(saved, teacher, batch, method)
    assert after < 0.7 * before, (before, after)
    logged = [entry["kd_loss"] for entry in trainer.state.log_history if "kd_loss" in entry]
    assert len(logged) == 3 and logged[-1] < logged[0]


def test_a_teacher_with_another_vocabulary_and_no_method_is_refused_naming_both_sizes(tmp_path: Path) -> None:
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(VocabMismatchError, match=rf"{LLAMA_VOCAB} entries .* {TEACHER_VOCAB}.*cross_tokenizer="):
        DistillationTrainer(model=make_student(), teacher_model=make_teacher(), args=args)


def test_a_batch_with_another_tokenization_and_no_method_is_refused(tmp_path: Path) -> None:
    student = make_student()
    teacher = make_student(seed=5)  # the same vocabulary size: only the batch tells the tokenizations apart
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    with pytest.raises(VocabMismatchError, match="tokenize differently; set cross_tokenizer"):
        trainer.compute_loss(student, cross_batch(offsets=False))


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"chunked_loss": True}, "chunked_loss"),
        ({"on_policy_fraction": 0.5}, "on_policy_fraction"),
        ({"teacher_cache": "somewhere"}, "teacher_cache"),
        ({"kd_kwargs": {"beta": 0.5}}, "kd_kwargs"),
        ({"vocab_policy": "pad"}, "vocab_policy"),
    ],
)
def test_what_cross_tokenizer_cannot_be_combined_with_is_refused_by_name(tmp_path: Path, options, field) -> None:
    with pytest.raises(InvalidArgumentError, match=rf"^{field}=.* cannot be used with cross_tokenizer='uld'"):
        DistillationArguments(output_dir=str(tmp_path), cross_tokenizer="uld", kd_loss="jsd", **options)


def test_an_unknown_method_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"cross_tokenizer='dtw' is not one of 'uld', 'align'"):
        DistillationArguments(output_dir=str(tmp_path), cross_tokenizer="dtw")


def test_align_needs_offsets_and_the_teachers_tokenization(tmp_path: Path) -> None:
    student, teacher = make_student(), make_teacher()
    trainer = trainer_for(tmp_path, student, teacher, "align")
    with pytest.raises(InvalidArgumentError, match=r"needs inputs\['completion_offsets'\].*offsets=True"):
        trainer.compute_loss(student, cross_batch(offsets=False))
    batch = cross_batch()
    del batch["teacher"]
    with pytest.raises(InvalidArgumentError, match="needs the teacher's own tokenization in 'teacher'"):
        trainer.compute_loss(student, batch)


@pytest.mark.parametrize("method", ["uld", "align"])
def test_accumulation_two_by_two_updates_like_one_batch_of_four(tmp_path: Path, method: str) -> None:
    """The KD sum is divided by the step's count of its units (paired positions or aligned groups, one per student
    token here) and the CE sum by the step's student tokens, so rows of different lengths weigh alike however the step
    is cut into micro-batches (a per-micro-batch mean would not)."""
    replies = ["hi", "good you", "i like you", "yes no thanks how what name love"]  # every split unequal
    rows = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": r}]} for r in replies]
    train = render_sft(rows, make_tiny_chat_tokenizer(), teacher_tokenizer=make_bpe_chat_tokenizer(), offsets=True)
    counts = [sum(label != -100 for label in example["labels"][1:]) for example in train]
    assert len(set(counts)) == 4 and all(a + b != sum(counts) - a - b for a in counts for b in counts if a != b)
    weights = []
    for size, accumulation in ((4, 1), (2, 2)):
        student = make_student().double()
        trainer = trainer_for(
            tmp_path / f"{size}", student, make_teacher().double(), method, per_device_train_batch_size=size,
            gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.5, optim="sgd",
            max_grad_norm=0.0, hard_weight=0.5, seed=0,
        )  # fmt: skip
        trainer.train_dataset = train
        trainer.data_collator = SFTCollator(pad_token_id=0, teacher_pad_token_id=0)
        trainer.train()
        weights.append(torch.cat([p.detach().reshape(-1) for p in student.parameters()]))
    start = torch.cat([p.detach().reshape(-1) for p in make_student().double().parameters()])
    assert not torch.allclose(weights[0], start)
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-9, atol=1e-11)
