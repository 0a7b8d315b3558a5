"""Token-level causal-LM distillation inside the Hugging Face ``Trainer``: :class:`DistillationTrainer`.

The trainer optimizes the engine's :class:`~kdistill.distillers.Objective` (``args.objective()``): the KD term and the
hard-label term, their weights and the temperature on schedules over the optimizer steps, and ``stages``. Per
micro-batch the loss is :func:`kdistill.distillers.normalized_loss`, the engine's own normalization:

``loss = Σ_term weight(step) · term_sum / N_term``   (the KD sum × T(step)² by ``Objective.kd_value``)

where each sum runs over its units in the micro-batch and ``N_term`` counts those units over *all* micro-batches of
the optimizer step (and all processes): the counted next-token positions (``labels[t + 1] != -100``) for the KD and
hard-label terms, or for a teacher with another tokenizer the KD term's paired positions / aligned groups
(``"aligned_pairs"``). So gradient accumulation 4 × 2 gives exactly the update of 1 × 8, and two processes that of
one: a per-micro-batch mean, as ``Trainer`` computes for models without loss kwargs, would give short micro-batches
too much weight.

How that fits the Trainer of transformers 5.x: ``Trainer.get_batch_samples`` collects the micro-batches of one
optimizer step and counts ``num_items_in_batch`` for them. This class overrides it to count every unit before any
forward (:meth:`DistillationTrainer.unit_counts`, summed over processes unless
``average_tokens_across_devices=False``), returns the counted next tokens as ``num_items_in_batch``, sets
``loss_is_scaled_for_ga = True`` (so ``training_step`` does not divide by the accumulation steps again) and multiplies
the loss by the number of processes, because DDP averages gradients.

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
(``"align"``), divided by the step's count of those pairs or groups, as the engine's cross-tokenizer KD term is.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import transformers
from torch import nn

from kdistill.core.shift import counted_next_tokens
from kdistill.distillers.kd_terms import ChunkedKD, DenseKD, KDStrategy, TopKKD
from kdistill.distillers.lm_cached import cached_lm_loss_sums
from kdistill.distillers.lm_cross import LMAlignedKD, cross_tokenizer_loss_sums
from kdistill.distillers.lm_heads import lm_head_of
from kdistill.distillers.lm_loss import causal_lm_loss_sums
from kdistill.distillers.objective import Objective, TermValue, normalized_loss
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
from kdistill.tasks.causal_lm import CausalLMView

CAUSAL_LM_VIEW = CausalLMView()  # what the KD strategies count a causal-LM batch's positions with


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
        objective = args.objective()
        cached = args.teacher_cache is not None or is_cached_collate(kwargs.get("data_collator"))
        if cached:
            check_cached_setup(model, teacher_model, args, kwargs)
        elif teacher_model is None and "kd" in objective.active_terms():
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
        self.objective = objective
        # how the KD term is computed (kdistill.distillers.kd_terms), the engine's strategies over causal LMs
        self.kd_strategy = lm_kd_strategy(objective, args, cached=cached)
        self.last_on_policy_batches: list[dict[str, torch.Tensor]] | None = None
        # the latest optimizer step's count of counted next tokens and its units of every kind (see unit_counts)
        self._step_counts: tuple[torch.Tensor, dict[str, float]] | None = None
        # [KD sum, hard sum, KD units, hard units] of the training micro-batches since the last log
        self._term_totals = torch.zeros(4, dtype=torch.float64)
        # on-policy steps since the last log: seconds spent generating and seconds in all (generation, forward,
        # backward, optimizer), measured from the start of one step's get_batch_samples to the start of the next
        self._on_policy_clock = OnPolicyClock()

    # ---------------------------------------------------------------- the loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """``Σ weight · term sum / N_unit`` for one micro-batch (by :func:`~kdistill.distillers.normalized_loss`).

        The terms are the objective's (:meth:`DistillationArguments.objective`): ``"kd"`` (× T² by
        :meth:`~kdistill.distillers.Objective.kd_value`) and ``"hard"``, with their weights and the temperature at
        the current optimizer step (schedules and stages). In training ``N_unit`` is each term's unit counted by
        :meth:`get_batch_samples` over every micro-batch of the optimizer step and summed over processes (the loss is
        then multiplied by the number of processes, since DDP averages gradients): the counted next-token positions,
        or with ``cross_tokenizer`` the KD term's paired positions or aligned groups. A ``num_items_in_batch`` that
        does not come from :meth:`get_batch_samples` is taken as the step's count of next tokens (other units are the
        batch's own). In evaluation (or when ``num_items_in_batch`` is None) the counts are this batch's own, so the
        loss is the batch's mean per unit.
        """
        args: DistillationArguments = self.args  # type: ignore[assignment]
        step, total_steps = self.state.global_step, max(self.state.max_steps, self.state.global_step + 1, 1)
        weights = self.objective.weights(step, total_steps)
        temperature = float(self.objective.temperature(step, total_steps))
        kd_weight, hard_weight = weights.get("kd", 0.0), weights.get("hard", 0.0)
        strategy = self.kd_strategy
        if "teacher_topk" in inputs:  # the teacher's outputs read from a cache: the teacher does not run
            used: KDStrategy = (
                strategy if isinstance(strategy, TopKKD) else lm_kd_strategy(self.objective, args, cached=True)
            )
            sums = cached_lm_loss_sums(
                model, inputs, inputs["teacher_topk"], divergence=self.objective.kd_loss, temperature=temperature,
                leftover_policy=args.cache_leftover, kd_weight=kd_weight, hard_weight=hard_weight,
                chunked=args.chunked_loss, chunk_size=args.chunk_size, kd_kwargs=self.objective.kd_kwargs,
                strategy=used,
            )  # fmt: skip
        elif self.teacher is None and kd_weight != 0:
            raise InvalidArgumentError(
                "kd_weight != 0 but there is no teacher and the batch carries no cached teacher outputs "
                "('teacher_topk'); was this batch collated without the cache?"
            )
        elif args.cross_tokenizer is not None:
            self._teacher_to(_device_of(inputs))
            used = strategy
            sums = cross_tokenizer_loss_sums(
                model, self.teacher, inputs, method=args.cross_tokenizer, temperature=temperature,
                kd_weight=kd_weight, hard_weight=hard_weight,
                strategy=used,
            )  # fmt: skip
        else:
            self._teacher_to(_device_of(inputs))
            if kd_weight != 0:
                check_one_tokenization(inputs)
            used = strategy
            sums = causal_lm_loss_sums(
                model, self.teacher, inputs, divergence=self.objective.kd_loss, temperature=temperature,
                kd_weight=kd_weight, hard_weight=hard_weight, vocab_policy=args.vocab_policy,
                chunked=args.chunked_loss, chunk_size=args.chunk_size, teacher_inputs=inputs.get("teacher"),
                kd_kwargs=self.objective.kd_kwargs, strategy=used,
            )  # fmt: skip
        terms: dict[str, TermValue] = {}
        if sums.kd_sum is not None:
            terms["kd"] = self.objective.kd_value(sums.kd_sum, temperature, used.unit)
        if sums.hard_sum is not None:
            terms["hard"] = TermValue(sums.hard_sum, "label_positions")
        own = self.unit_counts(inputs, with_kd=kd_weight != 0)
        if model.training and num_items_in_batch is not None:
            world = self.accelerator.num_processes if args.average_tokens_across_devices else 1
            loss = normalized_loss(terms, weights, self._counts_for(num_items_in_batch, own), world_size=world)
            self._record_terms(sums.kd_sum, sums.hard_sum, own[used.unit] if sums.kd_sum is not None else 0.0, own)
        else:
            loss = normalized_loss(terms, weights, own)
        if return_outputs:
            outputs = {} if sums.student_logits is None else {"logits": sums.student_logits}
            return loss, outputs
        return loss

    def unit_counts(self, batch: Mapping[str, Any], *, with_kd: bool = True) -> dict[str, float]:
        """The units each term of ``batch`` counts, from its labels (and offsets) alone, before any forward.

        ``"logit_positions"`` and ``"label_positions"``: the counted next-token positions; with ``cross_tokenizer``
        (and ``with_kd``) also ``"aligned_pairs"``, what the cross-tokenizer KD sum counts
        (:func:`kdistill.distillers.lm_cross.aligned_pair_count`).
        """
        tokens = float(counted_next_tokens(batch["labels"]).sum())
        counts = {"logit_positions": tokens, "label_positions": tokens}
        if with_kd:
            counts[self.kd_strategy.unit] = self.kd_strategy.count(batch, CAUSAL_LM_VIEW)
        return counts

    def _counts_for(self, num_items_in_batch: torch.Tensor | int, own: dict[str, float]) -> dict[str, float]:
        """The optimizer step's global unit counts for the loss (see :meth:`compute_loss`)."""
        if self._step_counts is not None and self._step_counts[0] is num_items_in_batch:
            return self._step_counts[1]
        tokens = float(num_items_in_batch)
        return {**own, "logit_positions": tokens, "label_positions": tokens}

    def _teacher_to(self, device: torch.device | None) -> None:
        if device is None or self.teacher is None:
            return
        parameter = next(self.teacher.parameters(), None)
        if parameter is not None and parameter.device != device:
            self.teacher.to(device)

    def _record_terms(
        self, kd_sum: torch.Tensor | None, hard_sum: torch.Tensor | None, kd_units: float, counts: Mapping[str, float]
    ) -> None:
        """Accumulate the unweighted sums (the KD one before T²) and their units on the sums' device; read at the next
        log, so there is no synchronization per micro-batch."""
        reference = kd_sum if kd_sum is not None else hard_sum
        assert reference is not None  # normalized_loss refused a step without terms
        if self._term_totals.device != reference.device:
            self._term_totals = self._term_totals.to(reference.device)
        zero = reference.new_zeros((), dtype=torch.float64)
        sums = [zero if t is None else t.detach().to(torch.float64) for t in (kd_sum, hard_sum)]
        hard_units = counts["label_positions"] if hard_sum is not None else 0.0
        self._term_totals += torch.stack([*sums, zero + kd_units, zero + hard_units])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ``kd_loss`` and ``ce_loss`` to training logs: each term's mean per unit since the last log, unweighted
        and without T²."""
        if "loss" in logs:
            totals = self._term_totals
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals.to(self.args.device), reduction="sum")
            kd_total, hard_total, kd_units, hard_units = (float(v) for v in totals.cpu())
            active = self.objective.active_terms()
            if "kd" in active and kd_units > 0:
                logs["kd_loss"] = kd_total / kd_units
            if "hard" in active and hard_units > 0:
                logs["ce_loss"] = hard_total / hard_units
            self._term_totals = torch.zeros(4, dtype=torch.float64)
            logs.update(self._on_policy_clock.report())
        super().log(logs, start_time)

    # ---------------------------------------------------------------- normalization and on-policy steps

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device
    ) -> tuple[list[Any], torch.Tensor | None]:
        """The micro-batches of one optimizer step, and their count of counted next-token positions.

        Every unit the step's terms count (:meth:`unit_counts`) is summed over the micro-batches and, unless
        ``average_tokens_across_devices=False``, over processes, before any forward; :meth:`compute_loss` divides by
        these counts.

        With probability ``on_policy_fraction`` (drawn from a generator seeded by ``(seed, global_step)``, so runs
        and resumed runs draw alike) the step is on-policy: every micro-batch is replaced by the student's samples
        for its prompts (see :meth:`on_policy_batch`) *before* counting, so the normalization stays exact over the
        step's generated sequences too.
        """
        on_policy = self._draw_on_policy()
        self._on_policy_clock.step_starts(on_policy)
        batches: list[Any] = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if batches and on_policy:
            started = time.perf_counter()
            batches = [self.on_policy_batch(batch) for batch in batches]
            self._on_policy_clock.generated(time.perf_counter() - started)
            self.last_on_policy_batches = batches
        if not batches or not all(isinstance(b, Mapping) and "labels" in b for b in batches):
            self._step_counts = None
            return batches, None
        with_kd = self.objective.weights(self.state.global_step, max(self.state.max_steps, 1)).get("kd", 0.0) != 0
        counts: dict[str, float] = {}
        for batch in batches:
            for unit, count in self.unit_counts(batch, with_kd=with_kd).items():
                counts[unit] = counts.get(unit, 0.0) + count
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            keys = sorted(counts)
            summed = torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=device)
            summed = self.accelerator.reduce(summed, reduction="sum")
            counts = dict(zip(keys, summed.tolist(), strict=True))
        num_items = torch.tensor(int(counts["label_positions"]), dtype=torch.long, device=device)
        self._step_counts = (num_items, counts)
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


class OnPolicyClock:
    """How much of the on-policy steps' time the student's sampling takes, reported with each training log.

    A step's time runs from the start of its ``get_batch_samples`` (where the samples are drawn) to the start of the
    next step's, or to the log that follows it; so it holds generation, forwards, backward and the optimizer step.
    """

    def __init__(self) -> None:
        self.generation = self.total = 0.0
        self.steps = 0
        self._started: float | None = None  # the current step's start, when it is on-policy

    def step_starts(self, on_policy: bool) -> None:
        now = time.perf_counter()
        if self._started is not None:
            self.total += now - self._started
        self._started = now if on_policy else None
        self.steps += int(on_policy)

    def generated(self, seconds: float) -> None:
        self.generation += seconds

    def report(self) -> dict[str, float]:
        """``on_policy_generation_seconds`` (per on-policy step) and ``on_policy_generation_share`` (of those
        steps' time) since the last report; nothing when no on-policy step ran."""
        if self._started is not None:  # the step just logged: count it up to now
            now = time.perf_counter()
            self.total, self._started = self.total + now - self._started, now
        if self.steps == 0 or self.total <= 0:
            self.generation = self.total = 0.0
            return {}
        logs = {
            "on_policy_generation_seconds": self.generation / self.steps,
            "on_policy_generation_share": min(self.generation / self.total, 1.0),
        }
        self.generation = self.total = 0.0
        self.steps = 0
        return logs


def _device_of(inputs: Mapping[str, Any]) -> torch.device | None:
    value = inputs.get("input_ids")
    return value.device if isinstance(value, torch.Tensor) else None


def lm_kd_strategy(objective: Objective, args: DistillationArguments, cached: bool) -> KDStrategy:
    """The KD strategy of a causal-LM run (:mod:`kdistill.distillers.kd_terms`): the cache's top-k, across
    tokenizers, chunked from hidden states and LM heads, or dense on the logits."""
    if cached:
        return TopKKD(objective.kd_loss, objective.kd_kwargs, chunk_size=args.chunk_size)
    if args.cross_tokenizer is not None:
        return LMAlignedKD(args.cross_tokenizer)
    if args.chunked_loss:
        return ChunkedKD(
            objective.kd_loss, objective.kd_kwargs, chunk_size=args.chunk_size, vocab_policy=args.vocab_policy
        )
    return DenseKD(objective.kd_loss, {**objective.kd_kwargs, "vocab_policy": args.vocab_policy})
