"""Token-level causal-LM distillation inside the Hugging Face ``Trainer``: :class:`DistillationTrainer`.

The trainer is a ``transformers.Trainer`` whose ``compute_loss`` is
:func:`kdistill.distillers.lm_loss.causal_lm_loss_sums`:

``loss = (kd_weight · T² · KD_sum + hard_weight · CE_sum) / N``

where both sums run over the counted next-token positions of the micro-batch (``labels[t + 1] != -100``) and ``N``
is the number of such positions over *all* micro-batches of the optimizer step (and all processes). So gradient
accumulation 4 × 2 gives exactly the update of 1 × 8, and two processes that of one: a per-micro-batch mean, as
``Trainer`` computes for models without loss kwargs, would give short micro-batches too much weight.

How that fits the Trainer of transformers 5.x: ``Trainer.get_batch_samples`` collects the micro-batches of one
optimizer step and counts ``num_items_in_batch`` for them; its own count uses ``labels[..., 1:]`` only when it
recognizes the model's loss as a causal-LM loss, and only when the model accepts loss kwargs. This class overrides
``get_batch_samples`` to always count with :func:`kdistill.core.shift.counted_next_tokens` (summed over processes
unless ``average_tokens_across_devices=False``), sets ``loss_is_scaled_for_ga = True`` (so ``training_step`` does
not divide by the accumulation steps again) and multiplies the loss by the number of processes, because DDP
averages gradients.

The teacher is kept out of ``self.model``: it is never wrapped by DDP/accelerate, never saved, frozen and in eval
mode, and moved to the student's device at the first loss computation.

Offline distillation: with ``teacher_cache`` (a directory written by ``kdistill cache``) there is no teacher at all.
The data collator is wrapped in :class:`kdistill.cache.batches.CachedTeacherCollate`, each batch carries the teacher's
cached top-k log-probabilities, and the KD term is :func:`kdistill.distillers.lm_cached.cached_lm_loss_sums`
(:func:`~kdistill.losses.sparse.sparse_divergence` over the cached support, plain or chunked). Only the KD term
changes: the CE term, the count and its normalization are those of the live path, so a ``k = V`` cache trains the
student as the live teacher does.

A teacher with another tokenizer: with ``cross_tokenizer`` (``"uld"`` or ``"align"``) each batch carries the teacher's
own tokenization of the same records (``batch["teacher"]``, from :func:`kdistill.data.sft.render_sft`) and the KD term
is :func:`kdistill.distillers.lm_cross.cross_tokenizer_loss_sums`: the ULD distance between sorted next-token
probabilities, positions paired in order (``"uld"``) or by the completion characters they are about to emit
(``"align"``). Its sum is divided by the same count N (the student's counted next tokens), so accumulation stays exact
here too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import transformers
from torch import nn

from kdistill.core.shift import counted_next_tokens
from kdistill.distillers.lm_cached import cached_lm_loss_sums
from kdistill.distillers.lm_cross import cross_tokenizer_loss_sums
from kdistill.distillers.lm_heads import lm_head_of
from kdistill.distillers.lm_loss import LMLossSums, causal_lm_loss_sums
from kdistill.errors import InvalidArgumentError
from kdistill.integrations.arguments import DistillationArguments
from kdistill.integrations.on_policy import draw_on_policy, sample_on_policy_batch
from kdistill.integrations.trainer_setup import (
    cached_collator,
    check_cached_setup,
    check_one_tokenization,
    check_vocabularies,
    default_collator,
    is_cached_collate,
    load_teacher,
    wrap_with_peft,
)


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that distills a causal-LM teacher into the student (``model``) token by token.

    Args:
        model: the student causal LM (a ``PreTrainedModel`` or a ``PeftModel``).
        teacher_model: the teacher: a model, or a path / hub id loaded with ``AutoModelForCausalLM.from_pretrained``
            (``dtype`` from ``args.teacher_dtype``). It is frozen, put in eval mode, kept out of ``self.model`` (never
            wrapped, never saved) and moved to the student's device when the loss first needs it. A ``PeftModel``
            teacher (a LoRA-tuned teacher) is used as it is, adapters active. None only with ``kd_weight=0``:
            supervised fine-tuning on the labels alone (the baseline a distillation is compared with), or with a
            teacher cache (``args.teacher_cache``, or a :class:`~kdistill.cache.batches.CachedTeacherCollate` as
            ``data_collator``), whose outputs stand in for the teacher.
        args: :class:`DistillationArguments` (a default one when None).
        peft_config: a ``peft`` config (e.g. ``LoraConfig``); the student is wrapped with ``peft.get_peft_model``
            and only the adapters train. ``save_model`` then writes the adapter (reload it with
            ``PeftModel.from_pretrained(base_model, output_dir)``, or merge with ``trainer.model.merge_and_unload()``
            before ``save_pretrained`` to get a plain model).
        **kwargs: the other ``Trainer`` arguments (``train_dataset``, ``eval_dataset``, ``data_collator``,
            ``processing_class``, ``callbacks``, ...). Without a ``data_collator``, batches are padded by
            :class:`kdistill.data.sft_collate.SFTCollator` (with the prompts when ``on_policy_fraction > 0``).

    Batches carry ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on prompt and padding), optionally
    ``prompt_input_ids``/``prompt_attention_mask`` (left-padded prompts, needed for on-policy steps) and ``teacher``
    (the teacher's own ``input_ids``/``attention_mask`` over the same positions; with ``args.cross_tokenizer``, the
    teacher's own tokenization of the same records, with its ``labels`` and, for ``"align"``, ``completion_offsets``)
    or ``teacher_topk`` (the teacher's cached top-k outputs, see
    :func:`kdistill.distillers.lm_cached.cached_lm_loss_sums`).

    Attributes:
        teacher: the frozen teacher model (None for SFT without a teacher).
        last_on_policy_batches: the micro-batches built from the student's samples in the latest on-policy step
            (``input_ids``, ``attention_mask``, ``labels``), or None before any.

    Raises:
        InvalidArgumentError: ``args`` that are not :class:`DistillationArguments`, a missing teacher, a student that
            is already a ``PeftModel`` together with ``peft_config``, or a model the chunked loss cannot handle.
        VocabMismatchError: differing student and teacher vocabularies with ``vocab_policy="error"`` and no
            ``cross_tokenizer`` (before training starts; the message names both sizes and suggests
            ``cross_tokenizer``), or a batch whose teacher tokenization differs from the student's without it.
        CacheMismatchError: a teacher cache written at another temperature (the message names the field).
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the step's global count itself

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | str | os.PathLike[str] | None = None,
        args: DistillationArguments | None = None,
        peft_config: Any | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = DistillationArguments(output_dir="trainer_output")
        if not isinstance(args, DistillationArguments):
            raise InvalidArgumentError(
                f"args must be DistillationArguments (TrainingArguments plus the distillation options), got "
                f"{type(args).__name__}"
            )
        if model is None:
            raise InvalidArgumentError("model (the student) is required; model_init is not supported")
        cached = args.teacher_cache is not None or is_cached_collate(kwargs.get("data_collator"))
        if cached:
            check_cached_setup(model, teacher_model, args, kwargs)
        elif teacher_model is None and args.kd_weight != 0.0:
            raise InvalidArgumentError(
                "teacher_model is required when kd_weight != 0: a causal LM or a path / hub id to load one, or "
                "teacher_cache (kd_weight=0 with hard_weight > 0 trains on the labels alone, SFT, without a teacher)"
            )
        if peft_config is not None:
            model = wrap_with_peft(model, peft_config)
        teacher = None if teacher_model is None else load_teacher(teacher_model, args.teacher_dtype)
        if teacher is not None and args.cross_tokenizer is None:
            check_vocabularies(model, teacher, args.vocab_policy)
        if args.chunked_loss:  # refuse models the chunked path cannot handle before any step
            lm_head_of(model)
            if teacher is not None:
                lm_head_of(teacher)
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = default_collator(
                model, kwargs.get("processing_class"), with_prompts=args.on_policy_fraction > 0
            )
        if args.teacher_cache is not None:
            kwargs["data_collator"] = cached_collator(kwargs["data_collator"], args)
        super().__init__(model=model, args=args, **kwargs)
        self.teacher = teacher
        self.last_on_policy_batches: list[dict[str, torch.Tensor]] | None = None
        # [KD sum, CE sum, counted positions] of the training micro-batches since the last log
        self._term_totals = torch.zeros(3, dtype=torch.float64)

    # ---------------------------------------------------------------- the loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """``(kd_weight · T² · KD_sum + hard_weight · CE_sum) / N`` for one micro-batch.

        In training ``N`` is ``num_items_in_batch`` as :meth:`get_batch_samples` counts it: the counted next-token
        positions of every micro-batch of the optimizer step, summed over processes (the loss is then multiplied by
        the number of processes, since DDP averages gradients). In evaluation (or when ``num_items_in_batch`` is
        None) ``N`` is this batch's own count, so the loss is the batch's mean per counted token. With
        ``cross_tokenizer`` the KD sum is the ULD distance summed over paired positions or aligned groups
        (:func:`kdistill.distillers.lm_cross.cross_tokenizer_loss_sums`) and ``N`` is still the student's count.
        """
        args: DistillationArguments = self.args  # type: ignore[assignment]
        if "teacher_topk" in inputs:  # the teacher's outputs read from a cache: the teacher does not run
            sums = cached_lm_loss_sums(
                model,
                inputs,
                inputs["teacher_topk"],
                divergence=args.kd_loss,
                temperature=args.temperature,
                leftover_policy=args.cache_leftover,
                kd_weight=args.kd_weight,
                hard_weight=args.hard_weight,
                chunked=args.chunked_loss,
                chunk_size=args.chunk_size,
                kd_kwargs=args.kd_kwargs,
            )
            return self._finish_loss(model, sums, return_outputs, num_items_in_batch)
        if self.teacher is None and args.kd_weight != 0:
            raise InvalidArgumentError(
                "kd_weight != 0 but there is no teacher and the batch carries no cached teacher outputs "
                "('teacher_topk'); was this batch collated without the cache?"
            )
        self._teacher_to(_device_of(inputs))
        if args.cross_tokenizer is not None:
            sums = cross_tokenizer_loss_sums(
                model,
                self.teacher,
                inputs,
                method=args.cross_tokenizer,
                temperature=args.temperature,
                kd_weight=args.kd_weight,
                hard_weight=args.hard_weight,
            )
            return self._finish_loss(model, sums, return_outputs, num_items_in_batch)
        if args.kd_weight != 0:
            check_one_tokenization(inputs)
        sums = causal_lm_loss_sums(
            model,
            self.teacher,
            inputs,
            divergence=args.kd_loss,
            temperature=args.temperature,
            kd_weight=args.kd_weight,
            hard_weight=args.hard_weight,
            vocab_policy=args.vocab_policy,
            chunked=args.chunked_loss,
            chunk_size=args.chunk_size,
            teacher_inputs=inputs.get("teacher"),
            kd_kwargs=args.kd_kwargs,
        )
        return self._finish_loss(model, sums, return_outputs, num_items_in_batch)

    def _finish_loss(
        self,
        model: nn.Module,
        sums: LMLossSums,
        return_outputs: bool,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Weight the sums, divide by the step's global count (or the batch's own), record the terms."""
        args: DistillationArguments = self.args  # type: ignore[assignment]
        kd_factor = args.kd_weight * (args.temperature**2 if args.t2_scaling else 1.0)
        terms = []
        if sums.kd_sum is not None:
            terms.append(kd_factor * sums.kd_sum)
        if sums.hard_sum is not None:
            terms.append(args.hard_weight * sums.hard_sum)
        total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        training = model.training and num_items_in_batch is not None
        if training:
            divisor = num_items_in_batch
            if isinstance(divisor, torch.Tensor):
                divisor = divisor.to(total.device).clamp_min(1)
            else:
                divisor = max(int(divisor), 1)  # type: ignore[arg-type]
            loss = total / divisor
            if args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes
            self._record_terms(sums.kd_sum, sums.hard_sum, sums.count)
        else:
            loss = total / max(sums.count, 1)
        if return_outputs:
            outputs = {} if sums.student_logits is None else {"logits": sums.student_logits}
            return loss, outputs
        return loss

    def _teacher_to(self, device: torch.device | None) -> None:
        if device is None or self.teacher is None:
            return
        parameter = next(self.teacher.parameters(), None)
        if parameter is not None and parameter.device != device:
            self.teacher.to(device)

    def _record_terms(self, kd_sum: torch.Tensor | None, ce_sum: torch.Tensor | None, count: int) -> None:
        """Accumulate the terms on their device (no synchronization per micro-batch); read at the next log."""
        reference = kd_sum if kd_sum is not None else ce_sum
        assert reference is not None  # at least one weight is nonzero
        if self._term_totals.device != reference.device:
            self._term_totals = self._term_totals.to(reference.device)
        zero = reference.new_zeros((), dtype=torch.float64)
        values = [zero if t is None else t.detach().to(torch.float64) for t in (kd_sum, ce_sum)]
        self._term_totals += torch.stack([*values, zero + count])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``kd_loss`` and ``ce_loss`` (mean per counted token since the last log, unweighted) to training logs."""
        if "loss" in logs:
            totals = self._term_totals
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals.to(self.args.device), reduction="sum")
            kd_total, ce_total, count = (float(v) for v in totals.cpu())
            args: DistillationArguments = self.args  # type: ignore[assignment]
            if count > 0:
                if args.kd_weight != 0:
                    logs["kd_loss"] = kd_total / count
                if args.hard_weight != 0:
                    logs["ce_loss"] = ce_total / count
            self._term_totals = torch.zeros(3, dtype=torch.float64)
        super().log(logs, start_time)

    # ---------------------------------------------------------------- normalization and on-policy steps

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device
    ) -> tuple[list[Any], torch.Tensor | None]:
        """The micro-batches of one optimizer step, and their count of counted next-token positions.

        With probability ``on_policy_fraction`` (drawn from a generator seeded by ``(seed, global_step)``, so runs
        and resumed runs draw alike) the step is on-policy: every micro-batch is replaced by the student's samples
        for its prompts (see :meth:`on_policy_batch`) *before* counting, so the normalization stays exact over the
        step's generated sequences too.
        """
        batches: list[Any] = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if batches and self._draw_on_policy():
            batches = [self.on_policy_batch(batch) for batch in batches]
            self.last_on_policy_batches = batches
        if not batches or not all(isinstance(b, Mapping) and "labels" in b for b in batches):
            return batches, None
        count = sum(int(counted_next_tokens(batch["labels"]).sum()) for batch in batches)
        num_items = torch.tensor(count, dtype=torch.long, device=device)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            num_items = self.accelerator.reduce(num_items, reduction="sum")
        return batches, num_items

    def _draw_on_policy(self) -> bool:
        args: DistillationArguments = self.args  # type: ignore[assignment]
        return draw_on_policy(args.on_policy_fraction, args.seed, self.state.global_step)

    def on_policy_batch(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """A new micro-batch from the student's samples for ``batch``'s prompts (see
        :func:`kdistill.integrations.on_policy.sample_on_policy_batch`)."""
        args: DistillationArguments = self.args  # type: ignore[assignment]
        return sample_on_policy_batch(
            self.accelerator.unwrap_model(self.model),
            batch,
            self.processing_class,
            max_new_tokens=args.on_policy_max_new_tokens,
            temperature=args.on_policy_temperature,
        )


def _device_of(inputs: Mapping[str, Any]) -> torch.device | None:
    value = inputs.get("input_ids")
    return value.device if isinstance(value, torch.Tensor) else None
