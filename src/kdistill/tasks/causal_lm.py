"""Causal language modelling: SFT records or packed plain text, token-level distillation, perplexity.

The view is where the engine meets the causal shift: the logits at position t are compared with the label at
t + 1 (:func:`kdistill.core.shift.next_token_labels`), so the KD mask, the hard labels and the counts the engine
normalizes by are all next-token positions whose label is not ``-100``. Prompt tokens and padding carry ``-100``
(see :func:`kdistill.data.sft.render_sft`), so only completions are learned.

Evaluation never keeps ``(B, T, V)`` logits: :meth:`CausalLMTask.predict` reduces each batch to sums at once
(negative log-likelihood, correct next tokens, counted tokens), and :func:`lm_agreement` does the same for the
student against a teacher (top-1 agreement, mean KL).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from kdistill.core.shift import IGNORE_INDEX, counted_next_tokens, next_token_labels
from kdistill.core.views import _logits_of
from kdistill.data.sft import pack_texts, render_sft
from kdistill.data.sft_collate import SFTCollator
from kdistill.errors import InvalidArgumentError, VocabMismatchError
from kdistill.losses import align_vocab
from kdistill.tasks.base import column_values, iter_logits, tokenizers_differ


@dataclass(frozen=True)
class CausalLMView:
    """Logits ``(B, T, V)``; labels are the next-token labels; KD counts the positions that have one."""

    logits_key: str = "logits"

    def logits(self, outputs: Any) -> list[torch.Tensor]:
        return [_logits_of(outputs, self.logits_key)]

    def kd_mask(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return counted_next_tokens(_labels_of(batch))

    def labels(self, batch: Mapping[str, Any]) -> list[torch.Tensor]:
        return [next_token_labels(_labels_of(batch))]

    def count_logit_positions(self, batch: Mapping[str, Any]) -> int:
        return int(self.kd_mask(batch).sum())


def _labels_of(batch: Mapping[str, Any]) -> torch.Tensor:
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor):
        raise InvalidArgumentError(
            "a causal-LM batch needs 'labels' (the input ids, -100 where nothing is learned); build it with "
            "kdistill.data.sft.render_sft or pack_texts and kdistill.data.sft_collate.SFTCollator"
        )
    return labels


@dataclass
class CausalLMTask:
    """Causal-LM examples from SFT records (``format="sft"``) or plain text packed into blocks (``"text"``).

    Args:
        format: ``"sft"`` (rows with ``messages``, ``instruction``/``output`` or ``prompt``/``completion``),
            ``"text"`` (a ``text_column`` of documents, concatenated and cut into ``max_length`` blocks) or
            ``"auto"`` (``"text"`` when the rows have ``text_column`` and no SFT field, else ``"sft"``).
        text_column: the documents' column for ``format="text"``.
        system_prompt: prepended to every SFT conversation as a system turn.
        mask_prompt: prompt tokens get ``-100`` (learn the completion only).
        pad_token_id: the id the collator pads ``input_ids`` with (masked by ``attention_mask`` either way).
    """

    format: Literal["auto", "sft", "text"] = "auto"
    text_column: str = "text"
    system_prompt: str | None = None
    mask_prompt: bool = True
    pad_token_id: int = 0
    name: str = "causal_lm"

    @property
    def view(self) -> CausalLMView:
        return CausalLMView()

    @property
    def collate(self) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]:
        return SFTCollator(pad_token_id=self.pad_token_id)

    @property
    def auto_model_class(self) -> type:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def with_label_names(self, dataset: Any) -> CausalLMTask:
        """Causal LMs have no label set; returns the task unchanged (the engine calls this for every task)."""
        return self

    def resolved_format(self, dataset: Any) -> str:
        if self.format != "auto":
            return self.format
        columns = _columns(dataset)
        sft_fields = {"messages", "instruction", "prompt"}
        return "text" if self.text_column in columns and not sft_fields & columns else "sft"

    def preprocess(
        self,
        dataset: Any,
        *,
        tokenizer: Any,
        teacher_tokenizer: Any = None,
        max_length: int | None = None,
        label_names: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Tokenized examples with ``input_ids``, ``attention_mask``, ``labels`` (unshifted), ``example_id``."""
        if max_length is None or max_length < 2:
            raise InvalidArgumentError(
                f"a causal-LM task needs max_length >= 2 (tokens per example); got {max_length}"
            )
        if self.resolved_format(dataset) == "text":
            texts = [str(text) for text in column_values(dataset, self.text_column)]
            return pack_texts(texts, tokenizer, block_size=max_length)
        records = [dict(row) for row in dataset]
        other = teacher_tokenizer if tokenizers_differ(tokenizer, teacher_tokenizer) else None
        return render_sft(
            records,
            tokenizer,
            max_length=max_length,
            teacher_tokenizer=other,
            system_prompt=self.system_prompt,
            mask_prompt=self.mask_prompt,
        )

    def adapt_teacher(self, teacher: nn.Module, *, tokenizer: Any, teacher_tokenizer: Any = None) -> nn.Module:
        """The teacher itself: per-id distillation needs one tokenization for both models (see the error)."""
        if tokenizers_differ(tokenizer, teacher_tokenizer):
            raise VocabMismatchError(
                f"token-level distillation of a causal LM needs one tokenizer, but the student's "
                f"({tokenizer_name(tokenizer)}) and the teacher's ({tokenizer_name(teacher_tokenizer)}) differ; "
                "choose a method with distill.cross_tokenizer (uld or align), use a student with the teacher's "
                "tokenizer, or black-box distillation (kdistill generate)"
            )
        return teacher

    def predict(
        self, model: nn.Module, batches: Sequence[Mapping[str, Any]], *, inputs: str = "student"
    ) -> list[list[torch.Tensor]]:
        """Per batch, one float64 tensor ``[nll_sum, correct, count]`` over the counted next-token positions."""
        results = []
        for batch, logits in _logits_per_batch(model, batches, inputs=inputs):
            results.append([next_token_stats(logits, batch["labels"])])
        return results

    def compute_metrics(
        self,
        logits_per_batch: Sequence[Sequence[torch.Tensor]],
        batches: Sequence[Mapping[str, Any]],
        examples_meta: Any = None,
    ) -> dict[str, float]:
        """``loss`` (mean NLL per counted token, nats), ``perplexity`` = exp(loss), ``next_token_accuracy``."""
        total = torch.zeros(3, dtype=torch.float64)
        for (stats,) in logits_per_batch:
            total += stats
        nll, correct, count = (float(v) for v in total)
        if count == 0:
            raise InvalidArgumentError("no counted next-token position in the evaluated examples (all labels -100)")
        loss = nll / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "next_token_accuracy": correct / count}


def next_token_stats(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[Σ −log p(next token), Σ [argmax = next token], count]`` (float64) over the counted positions."""
    targets = next_token_labels(labels.to(logits.device))
    counted = targets != IGNORE_INDEX
    rows = logits[counted].double()  # (n, V)
    gold = targets[counted]  # (n,)
    nll = -(rows.log_softmax(-1).gather(-1, gold[:, None]).sum())
    correct = (rows.argmax(-1) == gold).sum()
    return torch.stack([nll, correct.double(), torch.tensor(float(gold.numel()), dtype=torch.float64)]).cpu()


def lm_agreement(
    student: nn.Module, teacher: nn.Module, batches: Sequence[Mapping[str, Any]], *, temperature: float = 1.0
) -> dict[str, float]:
    """How close the student's next-token distributions are to the teacher's, on the counted positions.

    Returns ``teacher_agreement`` (fraction of positions where both models' most likely next token is the same)
    and ``kl_to_teacher`` (mean KL(p_teacher ‖ p_student) in nats, at ``temperature``).
    """
    scores = evaluate_lm(student, batches, teacher=teacher, temperature=temperature)
    return {key: scores[key] for key in ("teacher_agreement", "kl_to_teacher")}


def evaluate_lm(
    model: nn.Module,
    batches: Sequence[Mapping[str, Any]],
    *,
    teacher: nn.Module | None = None,
    temperature: float = 1.0,
    vocab_policy: str = "error",
) -> dict[str, float]:
    """Every causal-LM score in one pass over ``batches`` (one forward of each model per batch).

    ``loss`` (mean NLL per counted next token), ``perplexity`` and ``next_token_accuracy`` against the labels; with a
    ``teacher``, also ``teacher_agreement`` and ``kl_to_teacher`` (see :func:`lm_agreement`), compared over one
    vocabulary as training compares them: ``vocab_policy`` (``"error"``, ``"truncate"``, ``"pad"``, see
    :func:`kdistill.losses._common.align_vocab`) decides what differing vocabulary sizes mean.
    """
    totals = torch.zeros(3, dtype=torch.float64)  # nll, correct, count
    agree = kl = 0.0
    teacher_logits = _logits_per_batch(teacher, batches, inputs="teacher") if teacher is not None else None
    for batch, s_logits in _logits_per_batch(model, batches, inputs="student"):
        totals += next_token_stats(s_logits, batch["labels"])
        if teacher_logits is None:
            continue
        _, t_logits = next(teacher_logits)
        counted = counted_next_tokens(batch["labels"].to(s_logits.device))
        s_rows, t_rows = s_logits[counted].double(), t_logits.to(s_logits.device)[counted].double()
        s_rows, t_rows = align_vocab(s_rows, t_rows, vocab_policy)
        agree += float((s_rows.argmax(-1) == t_rows.argmax(-1)).sum())
        t_logp = (t_rows / temperature).log_softmax(-1)
        s_logp = (s_rows / temperature).log_softmax(-1)
        kl += float((t_logp.exp() * (t_logp - s_logp)).sum())
    nll, correct, count = (float(v) for v in totals)
    if count == 0:
        raise InvalidArgumentError("no counted next-token position in the evaluated examples (all labels -100)")
    loss = nll / count
    scores = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "next_token_accuracy": correct / count}
    if teacher is not None:
        scores.update(teacher_agreement=agree / count, kl_to_teacher=kl / count)
    return scores


def _logits_per_batch(model: nn.Module, batches: Sequence[Mapping[str, Any]], *, inputs: str):
    """Yield ``(the inputs holding the labels, logits)`` one batch at a time (see :func:`iter_logits`)."""
    outputs = iter_logits(model, batches, CausalLMView(), inputs=inputs)
    for (source, [logits]), batch in zip(outputs, batches, strict=True):
        yield (source if "labels" in source else batch), logits


def _columns(dataset: Any) -> set[str]:
    if hasattr(dataset, "column_names") and not isinstance(dataset, (list, tuple)):
        return set(dataset.column_names)
    first = next(iter(dataset), None)
    return set(first) if isinstance(first, Mapping) else set()


def tokenizer_name(tokenizer: Any) -> str:
    """A tokenizer as error messages name it: where it was loaded from (or its class) and its size."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else "?"
    return f"{name}, {size} tokens"
