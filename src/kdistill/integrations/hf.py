"""Token-level causal-LM distillation inside the Hugging Face ``Trainer``: :class:`DistillationTrainer`.

The trainer is a ``transformers.Trainer`` whose ``compute_loss`` is
:func:`kdistill.distillers.lm_loss.causal_lm_loss_sums`:

``loss = (kd_weight · T² · KD_sum + ce_weight · CE_sum) / N``

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
cached top-k log-probabilities, and the KD term is :func:`kdistill.distillers.lm_loss.cached_lm_loss_sums`
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

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

from kdistill.core.shift import IGNORE_INDEX, counted_next_tokens
from kdistill.distillers.lm_cross import CROSS_TOKENIZER_METHODS, cross_tokenizer_loss_sums
from kdistill.distillers.lm_loss import (
    LMLossSums,
    cached_lm_loss_sums,
    causal_lm_loss_sums,
    lm_head_of,
    unwrap_causal_lm,
)
from kdistill.errors import InvalidArgumentError, VocabMismatchError
from kdistill.losses._common import VOCAB_POLICIES

_TEACHER_DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")


def _divergence_names() -> list[str]:
    from kdistill.losses import LOSSES

    return LOSSES.names(kind="divergence")


@dataclass
class DistillationArguments(transformers.TrainingArguments):
    """``TrainingArguments`` plus the distillation options of :class:`DistillationTrainer`.

    ``remove_unused_columns`` defaults to False here: ``labels`` and the prompt columns used for on-policy
    generation must reach ``compute_loss`` although the model's forward does not take them all.

    Args:
        loss: a divergence registered in :data:`kdistill.losses.LOSSES` (or one of its aliases).
        temperature: softmax temperature of the divergence (> 0).
        kd_weight: weight of the KD term (≥ 0).
        ce_weight: weight of the student's next-token cross-entropy on the labels (≥ 0; not both weights 0).
        scale_kd_by_t2: multiply the KD term by T² (Hinton et al.), so its gradients keep their size when T changes.
        divergence_kwargs: extra arguments of the divergence, e.g. ``{"beta": 0.5}`` or ``{"skew": 0.1}``.
        vocab_policy: ``"error"``, ``"truncate"`` or ``"pad"`` when student and teacher vocabularies differ.
        chunked_loss: compute the loss from final hidden states and LM heads ``chunk_size`` positions at a time,
            never materializing ``(tokens, vocab)`` logits (same values and gradients; far less memory).
        chunk_size: positions per chunk of the chunked loss.
        on_policy_fraction: λ of GKD (Agarwal et al., 2024): the probability that an optimizer step trains on
            sequences the student samples from the batch's prompts instead of the dataset's completions.
        on_policy_max_new_tokens: the most tokens the student samples per prompt.
        on_policy_temperature: the sampling temperature of the student's generations.
        teacher_dtype: dtype of the teacher (``"auto"``, ``"float32"``, ``"bfloat16"``, ...) when it is loaded from
            a path or hub id, or cast when it is given as a model; None keeps the loader's default or the model's.
        teacher_cache: a ``kdistill cache`` directory whose top-k teacher outputs stand in for the teacher (no
            ``teacher_model`` then). Training examples must carry ``cache_index``, their row in the cache
            (:func:`kdistill.cache.batches.with_cache_index` on the cached examples, in the cached order). The cache's
            temperature must be ``temperature``; on-policy steps are refused (the teacher never scored the
            student's samples).
        cache_leftover: what the teacher is outside its cached top-k: ``"renormalize"`` (compare on the top-k
            support) or ``"uniform"`` (the leftover mass spread over the other ids); see
            :mod:`kdistill.losses.sparse`.
        cross_tokenizer: ``"uld"`` or ``"align"`` when the teacher has another tokenizer (batches then carry its
            tokenization in ``batch["teacher"]``; ``"align"`` also needs ``completion_offsets``, from
            ``render_sft(..., offsets=True)``); see :mod:`kdistill.distillers.lm_cross`. The KD term is then the ULD
            distance, so ``loss``, ``divergence_kwargs`` and ``vocab_policy`` do not apply (the last two are refused
            if set); ``kd_weight`` and ``scale_kd_by_t2`` apply as usual. Not available with ``chunked_loss`` (the ULD
            distance sorts whole probability rows), on-policy steps (the student's samples have no teacher
            tokenization) or ``teacher_cache`` (a cache holds ids of the teacher's vocabulary and no completion
            offsets).
    """

    loss: str = field(default="forward_kl", metadata={"help": "Registered divergence name (or alias)."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature (> 0)."})
    kd_weight: float = field(default=1.0, metadata={"help": "Weight of the KD term."})
    ce_weight: float = field(default=0.0, metadata={"help": "Weight of the next-token cross-entropy term."})
    scale_kd_by_t2: bool = field(default=True, metadata={"help": "Multiply the KD term by T²."})
    divergence_kwargs: dict[str, Any] | None = field(default=None, metadata={"help": "Divergence arguments."})
    vocab_policy: str = field(default="error", metadata={"help": "error, truncate or pad."})
    chunked_loss: bool = field(default=False, metadata={"help": "Chunked loss from hidden states."})
    chunk_size: int = field(default=1024, metadata={"help": "Positions per chunk of the chunked loss."})
    on_policy_fraction: float = field(default=0.0, metadata={"help": "GKD λ: share of on-policy steps."})
    on_policy_max_new_tokens: int = field(default=64, metadata={"help": "Max new tokens of on-policy samples."})
    on_policy_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (on-policy)."})
    teacher_dtype: str | None = field(default=None, metadata={"help": "Teacher dtype (auto, bfloat16, ...)."})
    teacher_cache: str | None = field(default=None, metadata={"help": "kdistill cache directory (no teacher)."})
    cache_leftover: str = field(default="renormalize", metadata={"help": "renormalize or uniform."})
    cross_tokenizer: str | None = field(
        default=None, metadata={"help": "uld or align: a teacher with another tokenizer (None: one tokenizer)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: labels and prompt columns must reach compute_loss."}
    )

    def __post_init__(self) -> None:
        self._check_distillation_options()
        super().__post_init__()

    def _check_distillation_options(self) -> None:
        from kdistill.losses import LOSSES

        known = _divergence_names()
        if not isinstance(self.loss, str) or self.loss not in LOSSES or LOSSES.entry(self.loss).kind != "divergence":
            raise InvalidArgumentError(
                f"loss={self.loss!r} is not a registered divergence; choose one of {', '.join(known)}"
            )
        for name in ("temperature", "kd_weight", "ce_weight", "on_policy_fraction", "on_policy_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
        if self.temperature <= 0:
            raise InvalidArgumentError(f"temperature must be > 0, got {self.temperature!r}")
        if self.kd_weight < 0 or self.ce_weight < 0:
            raise InvalidArgumentError(
                f"kd_weight and ce_weight must be ≥ 0, got kd_weight={self.kd_weight!r} and "
                f"ce_weight={self.ce_weight!r}"
            )
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise InvalidArgumentError("kd_weight and ce_weight are both 0, so there is nothing to train on")
        if self.vocab_policy not in VOCAB_POLICIES:
            raise InvalidArgumentError(
                f"vocab_policy={self.vocab_policy!r} is not one of {', '.join(map(repr, VOCAB_POLICIES))}"
            )
        for name in ("chunk_size", "on_policy_max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be an int ≥ 1, got {value!r}")
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            raise InvalidArgumentError(f"on_policy_fraction must be in [0, 1], got {self.on_policy_fraction!r}")
        if self.on_policy_temperature <= 0:
            raise InvalidArgumentError(f"on_policy_temperature must be > 0, got {self.on_policy_temperature!r}")
        if self.teacher_dtype is not None and self.teacher_dtype not in _TEACHER_DTYPES:
            raise InvalidArgumentError(
                f"teacher_dtype={self.teacher_dtype!r} is not one of {', '.join(_TEACHER_DTYPES)} or None"
            )
        from kdistill.losses.sparse import LEFTOVER_POLICIES

        if self.cache_leftover not in LEFTOVER_POLICIES:
            raise InvalidArgumentError(
                f"cache_leftover={self.cache_leftover!r} is not one of {', '.join(map(repr, LEFTOVER_POLICIES))}"
            )
        if self.teacher_cache is not None and self.on_policy_fraction > 0:
            raise InvalidArgumentError(
                f"on_policy_fraction={self.on_policy_fraction!r} cannot be used with teacher_cache: the cache holds "
                "the teacher's outputs on the dataset's completions, and it never scored the student's own samples; "
                "set on_policy_fraction=0 or run the teacher live"
            )
        if self.cross_tokenizer is not None:
            self._check_cross_tokenizer()
        if self.divergence_kwargs is not None:
            if not isinstance(self.divergence_kwargs, Mapping):
                raise InvalidArgumentError(
                    f"divergence_kwargs must be a dict such as {{'beta': 0.5}}, got {self.divergence_kwargs!r}"
                )
            self._check_divergence_kwargs()

    def _check_cross_tokenizer(self) -> None:
        """What ``cross_tokenizer`` cannot be combined with, refused by name (each would be silently wrong)."""
        if self.cross_tokenizer not in CROSS_TOKENIZER_METHODS:
            raise InvalidArgumentError(
                f"cross_tokenizer={self.cross_tokenizer!r} is not one of "
                f"{', '.join(map(repr, CROSS_TOKENIZER_METHODS))} or None"
            )
        why = {
            "chunked_loss": "the ULD distance sorts whole probability rows, so it needs the logits; set "
            "chunked_loss=False",
            "on_policy_fraction": "the student's samples have no teacher tokenization to compare with; set "
            "on_policy_fraction=0",
            "teacher_cache": "a cache holds ids of the teacher's vocabulary and no completion offsets; run the "
            "teacher live",
            "divergence_kwargs": "the KD term is the ULD distance, which takes none; remove them",
            "vocab_policy": "it maps one shared vocabulary's ids, and the two vocabularies have no shared ids; "
            "leave it at 'error'",
        }
        given = {
            "chunked_loss": self.chunked_loss,
            "on_policy_fraction": self.on_policy_fraction > 0,
            "teacher_cache": self.teacher_cache is not None,
            "divergence_kwargs": bool(self.divergence_kwargs),
            "vocab_policy": self.vocab_policy != "error",
        }
        for name, used in given.items():
            if used:
                raise InvalidArgumentError(
                    f"{name}={getattr(self, name)!r} cannot be used with cross_tokenizer={self.cross_tokenizer!r}: "
                    f"{why[name]}"
                )

    def _check_divergence_kwargs(self) -> None:
        """Call the divergence once on a 1 × 2 example so that a wrong keyword fails here, not at the first step."""
        from kdistill.errors import KdistillError
        from kdistill.losses import LOSSES

        fn = LOSSES.get(self.loss)
        try:
            fn(torch.zeros(1, 2), torch.zeros(1, 2), **dict(self.divergence_kwargs or {}))
        except TypeError as error:
            raise InvalidArgumentError(
                f"divergence_kwargs={dict(self.divergence_kwargs or {})!r} do not fit loss={self.loss!r}: {error}"
            ) from None
        except KdistillError as error:
            raise InvalidArgumentError(f"divergence_kwargs of loss={self.loss!r}: {error}") from None


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
    :func:`kdistill.distillers.lm_loss.cached_lm_loss_sums`).

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
        cached = args.teacher_cache is not None or _is_cached_collate(kwargs.get("data_collator"))
        if cached:
            _check_cached_setup(model, teacher_model, args, kwargs)
        elif teacher_model is None and args.kd_weight != 0.0:
            raise InvalidArgumentError(
                "teacher_model is required when kd_weight != 0: a causal LM or a path / hub id to load one, or "
                "teacher_cache (kd_weight=0 with ce_weight > 0 trains on the labels alone, SFT, without a teacher)"
            )
        if peft_config is not None:
            model = _wrap_with_peft(model, peft_config)
        teacher = None if teacher_model is None else _load_teacher(teacher_model, args.teacher_dtype)
        if teacher is not None and args.cross_tokenizer is None:
            _check_vocabularies(model, teacher, args.vocab_policy)
        if args.chunked_loss:  # refuse models the chunked path cannot handle before any step
            lm_head_of(model)
            if teacher is not None:
                lm_head_of(teacher)
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = _default_collator(
                model, kwargs.get("processing_class"), with_prompts=args.on_policy_fraction > 0
            )
        if args.teacher_cache is not None:
            kwargs["data_collator"] = _cached_collator(kwargs["data_collator"], args)
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
        """``(kd_weight · T² · KD_sum + ce_weight · CE_sum) / N`` for one micro-batch.

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
                divergence=args.loss,
                temperature=args.temperature,
                leftover_policy=args.cache_leftover,
                kd_weight=args.kd_weight,
                ce_weight=args.ce_weight,
                chunked=args.chunked_loss,
                chunk_size=args.chunk_size,
                divergence_kwargs=args.divergence_kwargs,
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
                ce_weight=args.ce_weight,
            )
            return self._finish_loss(model, sums, return_outputs, num_items_in_batch)
        if args.kd_weight != 0:
            _check_one_tokenization(inputs)
        sums = causal_lm_loss_sums(
            model,
            self.teacher,
            inputs,
            divergence=args.loss,
            temperature=args.temperature,
            kd_weight=args.kd_weight,
            ce_weight=args.ce_weight,
            vocab_policy=args.vocab_policy,
            chunked=args.chunked_loss,
            chunk_size=args.chunk_size,
            teacher_inputs=inputs.get("teacher"),
            divergence_kwargs=args.divergence_kwargs,
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
        kd_factor = args.kd_weight * (args.temperature**2 if args.scale_kd_by_t2 else 1.0)
        terms = []
        if sums.kd_sum is not None:
            terms.append(kd_factor * sums.kd_sum)
        if sums.ce_sum is not None:
            terms.append(args.ce_weight * sums.ce_sum)
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
            self._record_terms(sums.kd_sum, sums.ce_sum, sums.count)
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
                if args.ce_weight != 0:
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
        if args.on_policy_fraction <= 0:
            return False
        if args.on_policy_fraction >= 1:
            return True
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + self.state.global_step)
        return bool(torch.rand((), generator=generator) < args.on_policy_fraction)

    def on_policy_batch(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """A new micro-batch from the student's samples for ``batch``'s prompts.

        The student (unwrapped, in eval mode, without gradients) samples up to ``on_policy_max_new_tokens`` tokens
        per left-padded prompt at ``on_policy_temperature`` from its full distribution (no top-k/top-p). Each row
        becomes ``prompt + completion`` up to and including the first EOS, right-padded; ``labels`` are the
        completion's tokens and ``-100`` on the prompt, after the first EOS and on padding.
        """
        args: DistillationArguments = self.args  # type: ignore[assignment]
        prompts, prompt_mask = batch.get("prompt_input_ids"), batch.get("prompt_attention_mask")
        if not isinstance(prompts, torch.Tensor) or not isinstance(prompt_mask, torch.Tensor):
            raise InvalidArgumentError(
                "on_policy_fraction > 0 needs 'prompt_input_ids' and 'prompt_attention_mask' (left-padded prompts) "
                "in every batch; SFTCollator(with_prompts=True) provides them"
            )
        if "teacher" in batch:
            raise InvalidArgumentError(
                "on-policy steps need student and teacher to share a tokenizer, but the batch has a separate "
                "'teacher' tokenization; set on_policy_fraction=0"
            )
        student = self.accelerator.unwrap_model(self.model)
        device = next(student.parameters()).device
        prompts, prompt_mask = prompts.to(device), prompt_mask.to(device)
        pad_id, eos_ids = _special_ids(student, self.processing_class)
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad():
                generated = student.generate(
                    input_ids=prompts,
                    attention_mask=prompt_mask,
                    do_sample=True,
                    temperature=args.on_policy_temperature,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=args.on_policy_max_new_tokens,
                    pad_token_id=pad_id,
                    eos_token_id=eos_ids or None,
                )
        finally:
            student.train(was_training)
        completions = generated[:, prompts.shape[1] :]  # (B, new)
        return _sequences_from_samples(prompts, prompt_mask, completions, pad_id, eos_ids)


# ---------------------------------------------------------------- helpers


def _device_of(inputs: Mapping[str, Any]) -> torch.device | None:
    value = inputs.get("input_ids")
    return value.device if isinstance(value, torch.Tensor) else None


def _is_cached_collate(collator: Any) -> bool:
    from kdistill.cache.batches import CachedTeacherCollate

    return isinstance(collator, CachedTeacherCollate)


def _first_example(dataset: Any) -> Any:
    try:
        return dataset[0] if dataset is not None and len(dataset) else None
    except (TypeError, KeyError, IndexError):  # an iterable dataset: checked at its first batch instead
        return None


def _check_cached_setup(model: nn.Module, teacher_model: Any, args: DistillationArguments, kwargs: dict) -> None:
    """What a run from a teacher cache needs, checked before the Trainer exists (names the argument)."""
    from kdistill.cache.batches import CACHE_INDEX

    if teacher_model is not None:
        raise InvalidArgumentError(
            "teacher_model and a teacher cache were both given; the cache stands in for the teacher, pass one"
        )
    if args.on_policy_fraction > 0:
        raise InvalidArgumentError(
            f"on_policy_fraction={args.on_policy_fraction!r} cannot be used with a teacher cache: the teacher never "
            "scored the student's own samples; set on_policy_fraction=0 or run the teacher live"
        )
    collator = kwargs.get("data_collator")
    if _is_cached_collate(collator):
        if args.teacher_cache is not None:
            raise InvalidArgumentError(
                "data_collator is already a CachedTeacherCollate and teacher_cache is set too; give one of them"
            )
        if collator.leftover_policy != args.cache_leftover:
            raise InvalidArgumentError(
                f"the CachedTeacherCollate has leftover_policy={collator.leftover_policy!r} but "
                f"cache_leftover={args.cache_leftover!r}; they must agree"
            )
    for name in ("train_dataset", "eval_dataset"):
        example = _first_example(kwargs.get(name))
        if isinstance(example, Mapping) and CACHE_INDEX not in example:
            raise InvalidArgumentError(
                f"{name} example 0 has no {CACHE_INDEX!r}: with a teacher cache every example names its row in the "
                "cache (kdistill.cache.batches.with_cache_index on the cached examples, in the cached order)"
                + (
                    "; the cache holds the training examples only, so evaluate without it"
                    if name == "eval_dataset"
                    else ""
                )
            )
    reader = collator.reader if _is_cached_collate(collator) else _open_cache(args.teacher_cache)
    manifest = reader.manifest
    if not math.isclose(float(manifest["temperature"]), float(args.temperature)):
        from kdistill.cache import CacheMismatchError

        raise CacheMismatchError(
            f"cache manifest field 'temperature' is {float(manifest['temperature'])!r} but the arguments have "
            f"temperature={float(args.temperature)!r}"
        )
    head = unwrap_causal_lm(model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    vocab = int(manifest["vocab_size"])
    if isinstance(weight, torch.Tensor) and weight.shape[0] != vocab and args.vocab_policy == "error":
        raise VocabMismatchError(
            f"student vocabulary has {weight.shape[0]} entries but the cache's teacher vocabulary has {vocab} "
            "(manifest vocab_size); set vocab_policy='truncate' or 'pad' if token ids agree on the shared part"
        )


def _open_cache(directory: str) -> Any:
    from kdistill.cache import CacheIncompleteError, CacheReader

    reader = CacheReader(directory)
    if not reader.is_complete():
        raise CacheIncompleteError(f"teacher_cache: the cache at {directory} is missing shards; rerun kdistill cache")
    return reader


def _cached_collator(collator: Any, args: DistillationArguments) -> Any:
    """``collator`` plus each batch's cached teacher outputs (``batch["teacher_topk"]``)."""
    from kdistill.cache.batches import CachedTeacherCollate

    assert args.teacher_cache is not None
    reader = _open_cache(args.teacher_cache)
    return CachedTeacherCollate(collator, reader, per_token=True, leftover_policy=args.cache_leftover)


def _wrap_with_peft(model: nn.Module, peft_config: Any) -> nn.Module:
    try:
        import peft
    except ImportError as error:  # pragma: no cover - peft is installed with the test extras
        raise InvalidArgumentError(f"peft_config needs the peft package: {error}") from None
    if isinstance(model, peft.PeftModel):
        raise InvalidArgumentError(
            "model is already a PeftModel and peft_config was given too; pass one of them, not both"
        )
    return peft.get_peft_model(model, peft_config)


def _load_teacher(teacher: nn.Module | str | os.PathLike[str], teacher_dtype: str | None) -> nn.Module:
    """Load (or take) the teacher, cast it to ``teacher_dtype``, freeze it and put it in eval mode."""
    dtype = None if teacher_dtype in (None, "auto") else getattr(torch, teacher_dtype)
    if isinstance(teacher, (str, os.PathLike)):
        load_kwargs: dict[str, Any] = {}
        if teacher_dtype is not None:
            load_kwargs["dtype"] = dtype if dtype is not None else "auto"
        teacher = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(teacher), **load_kwargs)
    elif not isinstance(teacher, nn.Module):
        raise InvalidArgumentError(
            f"teacher_model must be a causal LM or a path / hub id, got {type(teacher).__name__}"
        )
    elif dtype is not None:
        teacher = teacher.to(dtype)
    teacher.requires_grad_(False)
    return teacher.eval()


def _check_vocabularies(student: nn.Module, teacher: nn.Module, vocab_policy: str) -> None:
    """With ``vocab_policy="error"``, differing LM-head sizes fail here, before the first step."""
    if vocab_policy != "error":
        return
    sizes = []
    for model in (student, teacher):
        head = unwrap_causal_lm(model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return  # no LM head to compare: the loss reports a mismatch at the first batch
        sizes.append(weight.shape[0])
    if sizes[0] != sizes[1]:
        raise VocabMismatchError(
            f"student vocabulary has {sizes[0]} entries but teacher vocabulary has {sizes[1]}; if the two "
            "tokenizers differ, set cross_tokenizer='uld' or 'align' (batches with the teacher's own tokenization), "
            "or vocab_policy='truncate' or 'pad' if token ids agree on the shared part"
        )


def _check_one_tokenization(inputs: Mapping[str, Any]) -> None:
    """A batch whose teacher tokenization has other positions than the student's needs ``cross_tokenizer``."""
    teacher_inputs = inputs.get("teacher")
    if not isinstance(teacher_inputs, Mapping):
        return
    teacher_ids, student_ids = teacher_inputs.get("input_ids"), inputs.get("input_ids")
    if (
        isinstance(teacher_ids, torch.Tensor)
        and isinstance(student_ids, torch.Tensor)
        and teacher_ids.shape != student_ids.shape
    ):
        raise VocabMismatchError(
            f"the batch holds the teacher's own tokenization ({tuple(teacher_ids.shape)} ids against the student's "
            f"{tuple(student_ids.shape)}): teacher and student tokenize differently; set cross_tokenizer='uld' or "
            "'align'"
        )


def _special_ids(model: nn.Module, processing_class: Any) -> tuple[int, list[int]]:
    """The pad id and the EOS ids for generation: from the tokenizer, else the generation config, else the config."""
    core = unwrap_causal_lm(model)
    sources = [processing_class, getattr(core, "generation_config", None), getattr(core, "config", None)]
    eos: list[int] = []
    pad: int | None = None
    for source in sources:
        if source is None:
            continue
        if not eos:
            value = getattr(source, "eos_token_id", None)
            eos = [value] if isinstance(value, int) else [v for v in (value or []) if isinstance(v, int)]
        if pad is None and isinstance(getattr(source, "pad_token_id", None), int):
            pad = source.pad_token_id
    if pad is None:
        if not eos:
            raise InvalidArgumentError(
                "neither a pad_token_id nor an eos_token_id is set (tokenizer, generation config, model config); "
                "on-policy generation needs one to pad finished samples"
            )
        pad = eos[0]
    return pad, eos


def _sequences_from_samples(
    prompts: torch.Tensor,
    prompt_mask: torch.Tensor,
    completions: torch.Tensor,
    pad_id: int,
    eos_ids: Sequence[int],
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` from left-padded prompts and sampled completions."""
    rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    eos = torch.tensor(list(eos_ids), dtype=completions.dtype, device=completions.device)
    for prompt, mask, completion in zip(prompts, prompt_mask, completions, strict=True):
        prompt_tokens = prompt[mask.bool()]
        is_eos = torch.isin(completion, eos) if eos.numel() else torch.zeros_like(completion, dtype=torch.bool)
        stop = int(is_eos.nonzero()[0, 0]) + 1 if bool(is_eos.any()) else completion.shape[0]
        rows.append((prompt_tokens, completion[:stop]))
    length = max(p.shape[0] + c.shape[0] for p, c in rows)
    batch_size = len(rows)
    device, dtype = prompts.device, prompts.dtype
    input_ids = torch.full((batch_size, length), pad_id, dtype=dtype, device=device)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long, device=device)
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long, device=device)
    for row, (prompt_tokens, completion) in enumerate(rows):
        n_prompt, n_total = prompt_tokens.shape[0], prompt_tokens.shape[0] + completion.shape[0]
        input_ids[row, :n_prompt] = prompt_tokens
        input_ids[row, n_prompt:n_total] = completion
        attention_mask[row, :n_total] = 1
        labels[row, n_prompt:n_total] = completion
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "prompt_input_ids": prompts,
        "prompt_attention_mask": prompt_mask,
    }


def _default_collator(model: nn.Module, processing_class: Any, *, with_prompts: bool) -> Any:
    """:class:`kdistill.data.sft_collate.SFTCollator` with the tokenizer's (or the model's) pad id."""
    pad_id: int | None = getattr(processing_class, "pad_token_id", None)
    if not isinstance(pad_id, int):
        config = getattr(unwrap_causal_lm(model), "config", None)
        pad_id = getattr(config, "pad_token_id", None)
        if not isinstance(pad_id, int):
            eos = getattr(config, "eos_token_id", None)
            pad_id = eos if isinstance(eos, int) else 0
    from kdistill.data.sft_collate import SFTCollator

    return SFTCollator(pad_token_id=pad_id, with_prompts=with_prompts)
