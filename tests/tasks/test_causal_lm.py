from __future__ import annotations

import math

import pytest
import torch

from conftest import make_causal_batch, make_tiny_chat_tokenizer, make_tiny_llama, make_tiny_qwen
from kdistill.distillers import Distiller, Objective
from kdistill.errors import InvalidArgumentError, VocabMismatchError
from kdistill.tasks import TASKS, CausalLMTask, evaluate_lm, lm_agreement
from kdistill.training import TrainConfig, train

RECORDS = [
    {"messages": [{"role": "user", "content": "hello , how are you ?"}, {"role": "assistant", "content": "fine"}]},
    {"instruction": "say hi", "output": "hi , i am good . thanks"},
    {"prompt": "what is your name ?", "completion": "my name is a b c"},
    {"messages": [{"role": "user", "content": "do you like it ?"}, {"role": "assistant", "content": "yes i do"}]},
]


def reference_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counted next-token log-probs and their targets, shifted by hand in float64."""
    logp = logits[:, :-1].double().log_softmax(-1)  # position t predicts t + 1
    targets = labels[:, 1:]
    counted = targets != -100
    return logp[counted], targets[counted]


def reference_forward_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    counted = labels[:, 1:] != -100
    s = (student[:, :-1].double() / t).log_softmax(-1)[counted]
    p = (teacher[:, :-1].double() / t).log_softmax(-1)[counted]
    return float((p.exp() * (p - s)).sum())


@pytest.mark.parametrize("make_model", [make_tiny_llama, make_tiny_qwen])
def test_distiller_terms_are_next_token_sums(make_model) -> None:
    batch = make_causal_batch()
    batch["labels"][:, :3] = -100  # a masked prompt
    teacher = make_model()
    student = make_model(num_layers=2, hidden=16, heads=4, kv_heads=2, seed=1)
    task = TASKS.get("causal_lm")()
    distiller = Distiller(student, teacher, Objective(kd_weight=1.0, hard_weight=1.0, temperature=2.0), view=task.view)
    module = distiller.setup(batch)
    counts = distiller.count_units(batch)
    expected_count = int((batch["labels"][:, 1:] != -100).sum())
    assert counts["logit_positions"] == counts["label_positions"] == expected_count
    with torch.no_grad():
        terms = distiller.compute_terms(module, batch, {"kd": 1.0, "hard": 1.0}, 0, 1)
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hf_loss = student(**batch).loss  # transformers shifts internally: the mean over the same positions
    logp, targets = reference_next_token(s_logits, batch["labels"])
    ce = float(-logp.gather(-1, targets[:, None]).sum())
    assert float(terms["hard"].total) == pytest.approx(ce, rel=1e-5)
    assert float(terms["hard"].total) / expected_count == pytest.approx(float(hf_loss), rel=1e-5)
    kd = reference_forward_kl(s_logits, t_logits, batch["labels"], 2.0) * 4.0  # T² = 4
    assert float(terms["kd"].total) == pytest.approx(kd, rel=1e-4)  # float32 KL of near distributions


def test_metrics_and_agreement_match_references() -> None:
    tokenizer = make_tiny_chat_tokenizer()
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    examples = task.preprocess(RECORDS, tokenizer=tokenizer, max_length=32)
    batches = [task.collate(examples[:3]), task.collate(examples[3:])]
    model, teacher = make_tiny_llama(num_layers=2, seed=3), make_tiny_llama()
    scores = task.compute_metrics(task.predict(model, batches), batches)

    nll = correct = count = 0.0
    agree = kl = 0.0
    for batch in batches:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            logits, t_logits = model(**inputs).logits, teacher(**inputs).logits
        logp, targets = reference_next_token(logits, batch["labels"])
        t_logp, _ = reference_next_token(t_logits, batch["labels"])
        nll -= float(logp.gather(-1, targets[:, None]).sum())
        correct += float((logp.argmax(-1) == targets).sum())
        agree += float((logp.argmax(-1) == t_logp.argmax(-1)).sum())
        kl += float((t_logp.exp() * (t_logp - logp)).sum())
        count += targets.numel()
    assert scores["loss"] == pytest.approx(nll / count, rel=1e-9)
    assert scores["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-9)
    assert scores["next_token_accuracy"] == pytest.approx(correct / count)
    agreement = lm_agreement(model, teacher, batches)
    assert agreement["teacher_agreement"] == pytest.approx(agree / count)
    assert agreement["kl_to_teacher"] == pytest.approx(kl / count, rel=1e-6)
    assert lm_agreement(teacher, teacher, batches) == {"teacher_agreement": 1.0, "kl_to_teacher": 0.0}
    one_pass = evaluate_lm(model, batches, teacher=teacher)
    assert one_pass == pytest.approx({**scores, **agreement}, rel=1e-12)


def test_only_completions_are_learned() -> None:
    tokenizer = make_tiny_chat_tokenizer()
    task = CausalLMTask()
    examples = task.preprocess(RECORDS[:2], tokenizer=tokenizer, max_length=32)
    learned = [tokenizer.decode([t for t in ex["labels"] if t != -100]) for ex in examples]
    assert learned[0].startswith("fine") and "hello" not in learned[0]
    assert "good" in learned[1] and "say" not in learned[1]


def test_packed_text_format_is_chosen_for_a_text_column() -> None:
    tokenizer = make_tiny_chat_tokenizer()
    rows = [{"text": "the day is good and you are fine . " * 3}, {"text": "i like to go there . " * 4}]
    task = CausalLMTask()
    assert task.resolved_format(rows) == "text"
    examples = task.preprocess(rows, tokenizer=tokenizer, max_length=8)
    assert examples and all(len(ex["input_ids"]) == 8 and ex["labels"] == ex["input_ids"] for ex in examples)


def test_engine_distillation_lowers_the_kl_to_the_teacher(tmp_path) -> None:
    tokenizer = make_tiny_chat_tokenizer()
    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    examples = task.preprocess(RECORDS * 4, tokenizer=tokenizer, max_length=32)
    teacher = make_tiny_llama()
    student = make_tiny_llama(num_layers=2, seed=5)
    batches = [task.collate(examples[:8])]
    before = lm_agreement(student, teacher, batches)["kl_to_teacher"]
    distiller = Distiller(student, teacher, Objective(kd_weight=1.0, hard_weight=0.0, temperature=1.0), view=task.view)
    config = TrainConfig(
        output_dir=str(tmp_path / "run"),
        batch_size=4,
        num_epochs=8,
        learning_rate=1e-2,
        progress=False,
        log_with=(),
        lr_scheduler="constant",
    )
    train(distiller, examples, config, collate_fn=task.collate)
    after = lm_agreement(student, teacher, batches)["kl_to_teacher"]
    assert after < 0.5 * before


def test_different_tokenizers_and_bad_batches_are_refused() -> None:
    task = CausalLMTask()
    small = make_tiny_chat_tokenizer(vocab=60)
    with pytest.raises(VocabMismatchError, match="60 tokens"):
        task.adapt_teacher(make_tiny_llama(), tokenizer=small, teacher_tokenizer=make_tiny_chat_tokenizer())
    with pytest.raises(InvalidArgumentError, match="labels"):
        task.view.kd_mask({"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(InvalidArgumentError, match="max_length"):
        task.preprocess(RECORDS, tokenizer=small, max_length=1)
