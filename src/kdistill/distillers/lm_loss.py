"""The token-level causal-LM distillation loss, as sums over counted next-token positions (plain or chunked).

:func:`causal_lm_loss_sums` returns *sums* and a *count*, not means: the caller (the Hugging Face integration, the
engine) divides by the global count of counted positions over all micro-batches and processes, which is what makes
gradient accumulation and data parallelism exact. Positions are counted with
:func:`kdistill.core.shift.counted_next_tokens`: the logits at ``t`` predict ``labels[t + 1]``.

Two paths compute the same numbers:

* plain: the student's and teacher's full logits ``(B, T, V)`` and the divergence on them;
* chunked: the final hidden states of both models and their LM-head weights through
  :func:`~kdistill.losses.chunked_divergence`, so that no ``(N, V)`` logits tensor exists, for the KD term and for
  the cross-entropy term (which runs ``chunk_size`` rows at a time under activation checkpointing).

Only torch is imported here; models are duck-typed Hugging Face causal LMs (``PreTrainedModel``, ``PeftModel``, or
either wrapped by DDP).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kdistill.core.shift import IGNORE_INDEX, counted_next_tokens, next_token_labels
from kdistill.errors import InvalidArgumentError, ShapeMismatchError
from kdistill.losses import chunked_divergence, token_cross_entropy
from kdistill.losses._common import VOCAB_POLICIES

# The inputs a causal LM's forward gets from a batch; labels are left out so the model computes no loss of its own.
MODEL_INPUT_KEYS: tuple[str, ...] = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


@dataclass
class LMHead:
    """A causal LM's output layer: ``logits = scale · (h @ weight.T + bias)``.

    Attributes:
        weight: ``(V, H)``, in ``nn.Linear`` layout (for tied embeddings, the input embedding matrix itself).
        bias: ``(V,)`` or None.
        scale: the model's logit scaling folded into one factor (Cohere's ``logit_scale`` multiplies, Granite's
            ``logits_scaling`` divides); 1.0 for most models.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0


@dataclass
class LMLossSums:
    """What :func:`causal_lm_loss_sums` computed for one batch.

    Attributes:
        kd_sum: 0-d tensor, the divergence summed over counted positions (no T², no weight); None when
            ``kd_weight == 0``.
        ce_sum: 0-d tensor, the student's next-token cross-entropy summed over counted positions; None when
            ``ce_weight == 0``.
        count: the number of counted next-token positions in the batch.
        student_logits: the student's logits ``(B, T, V_s)`` on the plain path (with grad); None on the chunked one.
    """

    kd_sum: torch.Tensor | None
    ce_sum: torch.Tensor | None
    count: int
    student_logits: torch.Tensor | None = None


# ---------------------------------------------------------------- models


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside DDP/accelerate wrappers (``.module``) and PEFT (``get_base_model()``).

    PEFT's LoRA layers live inside the base model's modules, so running the returned model's submodules still uses
    the adapters.
    """
    seen = 0
    while seen < 8:  # wrappers nest a few levels at most
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "config"):
            model = model.module  # DistributedDataParallel, DataParallel
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile
        else:
            break
    return model


def lm_head_of(model: nn.Module) -> LMHead:
    """The output layer of a causal LM as an :class:`LMHead`, for computing logits from final hidden states.

    Works for untied and tied embeddings (``get_output_embeddings()`` is the shared module), through PEFT and DDP
    wrappers, and with a PEFT ``modules_to_save`` copy of the head (the active copy is used).

    Raises:
        InvalidArgumentError: the model has no output embeddings, has LoRA on its LM head, or post-processes its
            logits in a way the chunked path cannot reproduce (``config.final_logit_softcapping``, Gemma 2).
    """
    core = unwrap_causal_lm(model)
    config = getattr(core, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        raise InvalidArgumentError(
            f"config.final_logit_softcapping={softcap} (Gemma 2 style) caps the logits after the LM head, which the "
            "chunked loss does not reproduce; use the plain path (chunked_loss=False / chunked=False)"
        )
    get_head = getattr(core, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise InvalidArgumentError(
            f"{type(core).__name__} has no output embeddings (get_output_embeddings() is None); the chunked loss "
            "needs a causal LM with an LM head"
        )
    if hasattr(head, "modules_to_save") and hasattr(head, "active_adapters"):  # PEFT modules_to_save copy
        active = [name for name in head.active_adapters if name in head.modules_to_save]
        if active and not getattr(head, "disable_adapters", False):
            head = head.modules_to_save[active[0]]
        else:
            head = head.original_module
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise InvalidArgumentError(
            "the LM head carries PEFT adapter layers (lm_head in target_modules); the chunked loss uses the head's "
            "weight directly and would ignore them: leave lm_head out of target_modules or use the plain path"
        )
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise InvalidArgumentError(
            f"the output embeddings of {type(core).__name__} ({type(head).__name__}) have no 2-D weight"
        )
    bias = getattr(head, "bias", None)
    scale = 1.0
    logit_scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    if isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
        scale *= float(logit_scale)
    logits_scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if isinstance(logits_scaling, (int, float)) and not isinstance(logits_scaling, bool):
        scale /= float(logits_scaling)
    return LMHead(weight=weight, bias=bias if isinstance(bias, torch.Tensor) else None, scale=scale)


def _decoder_of(core: nn.Module) -> nn.Module:
    """The decoder body (embeddings, blocks, final norm) of a causal LM: ``get_decoder()`` or the base-model prefix."""
    get_decoder = getattr(core, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is core:
        prefix = getattr(core, "base_model_prefix", "model")
        decoder = getattr(core, prefix, None)
    if not isinstance(decoder, nn.Module) or decoder is core:
        raise InvalidArgumentError(
            f"cannot find the decoder body of {type(core).__name__} (neither get_decoder() nor its base-model "
            "prefix attribute); the chunked loss needs the final hidden states before the LM head"
        )
    return decoder


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return False


def model_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a batch a causal LM's forward takes (no labels, no prompt columns)."""
    return {key: inputs[key] for key in MODEL_INPUT_KEYS if inputs.get(key) is not None}


def final_hidden_states(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The last hidden state ``(B, T, H)`` of a causal LM (the input of its LM head), without the ``(B, T, V)`` logits.

    When the model's forward takes ``logits_to_keep`` (Llama, Qwen, Mistral, Gemma, ... in transformers ≥ 4.45) the
    whole wrapped model is called with ``logits_to_keep=1``, so the LM head runs on one position per row and the
    decoder's output is taken by a forward hook: the call goes through every wrapper (DDP's gradient
    synchronization, accelerate's autocast, PEFT's adapters). Otherwise the decoder body is called directly (PEFT's
    LoRA layers still apply, since they live inside it).

    Args:
        model: a causal LM, possibly wrapped by PEFT, DDP or accelerate.
        inputs: a batch with ``input_ids`` and ``attention_mask`` (other keys are ignored).
    """
    core = unwrap_causal_lm(model)
    decoder = _decoder_of(core)
    kwargs = {**model_inputs(inputs), "use_cache": False}
    if not _accepts(core, "logits_to_keep"):
        output = decoder(**kwargs)
        return output[0] if isinstance(output, tuple) else output.last_hidden_state
    captured: list[torch.Tensor] = []

    def keep_output(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder.register_forward_hook(keep_output)
    try:
        model(**kwargs, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise InvalidArgumentError(
            f"the decoder of {type(core).__name__} ran {len(captured)} times in one forward; cannot tell which "
            "output is the final hidden state"
        )
    return captured[0]


def _logits(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    return model(**model_inputs(inputs), use_cache=False).logits


def _eval_teacher(teacher: nn.Module) -> None:
    if teacher.training:
        teacher.eval()


# ---------------------------------------------------------------- the loss


def causal_lm_loss_sums(
    student: nn.Module,
    teacher: nn.Module | None,
    inputs: Mapping[str, Any],
    *,
    divergence: str | Callable[..., torch.Tensor] = "forward_kl",
    temperature: float | torch.Tensor = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    vocab_policy: str = "error",
    chunked: bool = False,
    chunk_size: int = 1024,
    teacher_inputs: Mapping[str, Any] | None = None,
    divergence_kwargs: Mapping[str, Any] | None = None,
    teacher_outputs: torch.Tensor | None = None,
) -> LMLossSums:
    """The KD and CE terms of token-level causal-LM distillation, summed over counted next-token positions.

    Counted positions are ``counted_next_tokens(inputs["labels"])``: the logits at ``t`` count when
    ``labels[t + 1] != -100``. The teacher runs under ``torch.no_grad()`` in eval mode. The divergence divides both
    logits by ``temperature``; no T² factor is applied here (the caller does, if it wants to). The weights only
    decide which terms are computed (a zero weight skips its term, and ``kd_weight == 0`` skips the teacher).

    Args:
        student: the student causal LM (its parameters get gradients).
        teacher: the teacher causal LM; may be None when ``teacher_outputs`` is given on the plain path or
            ``kd_weight == 0``.
        inputs: ``input_ids``, ``attention_mask`` and ``labels`` ``(B, T)`` (``-100`` = not learned).
        divergence: a divergence registered in :data:`~kdistill.losses.LOSSES` (or a callable with that contract).
        temperature: softmax temperature of the divergence (> 0).
        kd_weight: a zero skips the KD term (``kd_sum`` is None).
        ce_weight: a zero skips the CE term (``ce_sum`` is None).
        vocab_policy: ``"error"``, ``"truncate"`` or ``"pad"`` when the vocabularies differ.
        chunked: compute from final hidden states and LM heads ``chunk_size`` positions at a time (no ``(N, V)``
            logits; ``student_logits`` is then None).
        chunk_size: positions per chunk on the chunked path.
        teacher_inputs: the teacher's own ``input_ids``/``attention_mask`` when they differ from the student's; they
            must have the same ``(B, T)`` positions.
        divergence_kwargs: extra arguments of the divergence, e.g. ``{"beta": 0.5}`` or ``{"skew": 0.1}``.
        teacher_outputs: precomputed teacher results, used instead of running the teacher: its logits
            ``(B, T, V_t)`` on the plain path, its final hidden states ``(B, T, H_t)`` on the chunked path (the
            teacher's LM head is still taken from ``teacher``).

    Returns:
        An :class:`LMLossSums`.

    Raises:
        InvalidArgumentError: missing labels, a bad option, or a model the chunked path cannot handle.
        ShapeMismatchError: labels or teacher inputs/outputs of the wrong shape.
        VocabMismatchError: differing vocabularies with ``vocab_policy="error"`` (the message names both sizes).
    """
    labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise InvalidArgumentError(
            "inputs must carry 'labels' of shape (batch, sequence) with -100 where nothing is learned"
        )
    input_ids = inputs.get("input_ids")
    if isinstance(input_ids, torch.Tensor) and input_ids.shape != labels.shape:
        raise ShapeMismatchError(
            f"labels have shape {tuple(labels.shape)} but input_ids {tuple(input_ids.shape)}; they must agree"
        )
    if vocab_policy not in VOCAB_POLICIES:
        raise InvalidArgumentError(
            f"vocab_policy={vocab_policy!r} is not one of {', '.join(map(repr, VOCAB_POLICIES))}"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be a positive int, got {chunk_size!r}")
    want_kd, want_ce = kd_weight != 0, ce_weight != 0
    if want_kd and teacher is None and (chunked or teacher_outputs is None):
        raise InvalidArgumentError("teacher is None but the KD term (kd_weight != 0) needs a teacher")
    if teacher_inputs is not None:
        teacher_ids = teacher_inputs.get("input_ids")
        if isinstance(teacher_ids, torch.Tensor) and teacher_ids.shape != labels.shape:
            raise ShapeMismatchError(
                f"teacher_inputs['input_ids'] has shape {tuple(teacher_ids.shape)} but the student's labels "
                f"{tuple(labels.shape)}; teacher and student must see the same positions"
            )
    teacher_inputs = inputs if teacher_inputs is None else teacher_inputs
    mask = counted_next_tokens(labels)  # (B, T)
    targets = next_token_labels(labels)  # (B, T)
    count = int(mask.sum())
    kwargs = dict(divergence_kwargs or {})
    if chunked:
        return _chunked_sums(
            student, teacher, inputs, teacher_inputs, mask, targets, count, divergence, temperature,
            vocab_policy, chunk_size, kwargs, teacher_outputs, want_kd, want_ce,
        )  # fmt: skip

    student_logits = _logits(student, inputs)  # (B, T, V_s)
    kd_sum = ce_sum = None
    if want_kd:
        if teacher_outputs is None:
            assert teacher is not None
            _eval_teacher(teacher)
            with torch.no_grad():
                teacher_logits = _logits(teacher, teacher_inputs)  # (B, T, V_t)
        else:
            teacher_logits = teacher_outputs.detach()
        if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
            raise ShapeMismatchError(
                f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} "
                "differ before the vocabulary dimension"
            )
        loss_fn = _resolve(divergence)
        kd_sum = loss_fn(
            student_logits, teacher_logits, mask, temperature=temperature, reduction="sum",
            vocab_policy=vocab_policy, **kwargs,
        )  # fmt: skip
    if want_ce:
        ce_sum = token_cross_entropy(student_logits, targets, reduction="sum")
    return LMLossSums(kd_sum=kd_sum, ce_sum=ce_sum, count=count, student_logits=student_logits)


def _resolve(divergence: str | Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    from kdistill.losses.chunked import _resolve_divergence  # one place validates names and kinds

    return _resolve_divergence(divergence)


def _scaled(head: LMHead, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Hidden states, weight and bias with the logit scale folded into the (cheaper) hidden side and the bias.

    The weight and bias are cast to the hidden states' dtype (under autocast the decoder may return bf16 while the
    parameters are float32); the casts are differentiable, so gradients still reach the parameters.
    """
    weight = head.weight if head.weight.dtype == hidden.dtype else head.weight.to(hidden.dtype)
    bias = head.bias
    if bias is not None and bias.dtype != hidden.dtype:
        bias = bias.to(hidden.dtype)
    if head.scale != 1.0:
        hidden = hidden * head.scale
        bias = None if bias is None else bias * head.scale
    return hidden, weight, bias


def _chunked_sums(
    student: nn.Module,
    teacher: nn.Module | None,
    inputs: Mapping[str, Any],
    teacher_inputs: Mapping[str, Any],
    mask: torch.Tensor,
    targets: torch.Tensor,
    count: int,
    divergence: str | Callable[..., torch.Tensor],
    temperature: float | torch.Tensor,
    vocab_policy: str,
    chunk_size: int,
    divergence_kwargs: dict[str, Any],
    teacher_outputs: torch.Tensor | None,
    want_kd: bool,
    want_ce: bool,
) -> LMLossSums:
    student_head = lm_head_of(student)
    student_hidden, student_weight, student_bias = _scaled(student_head, final_hidden_states(student, inputs))
    kd_sum = ce_sum = None
    if want_kd:
        assert teacher is not None
        teacher_head = lm_head_of(teacher)
        if teacher_outputs is None:
            _eval_teacher(teacher)
            with torch.no_grad():
                teacher_hidden = final_hidden_states(teacher, teacher_inputs)  # (B, T, H_t)
        else:
            teacher_hidden = teacher_outputs.detach()
        teacher_hidden, teacher_weight, teacher_bias = _scaled(teacher_head, teacher_hidden)
        kd_sum = chunked_divergence(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight.detach(),
            mask,
            divergence=divergence,
            chunk_size=chunk_size,
            temperature=temperature,
            reduction="sum",
            vocab_policy=vocab_policy,
            student_head_bias=student_bias,
            teacher_head_bias=None if teacher_bias is None else teacher_bias.detach(),
            **divergence_kwargs,
        )
    if want_ce:
        ce_sum = chunked_cross_entropy(
            student_hidden, student_weight, targets, bias=student_bias, chunk_size=chunk_size
        )
    return LMLossSums(kd_sum=kd_sum, ce_sum=ce_sum, count=count, student_logits=None)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``token_cross_entropy(hidden @ weight.T + bias, targets, reduction="sum")`` without the ``(N, V)`` logits.

    The counted rows (``targets != -100``) are taken ``chunk_size`` at a time; each chunk's logits and
    cross-entropy run under activation checkpointing, so the forward pass keeps only the chunk's hidden rows and
    the backward pass recomputes one chunk's logits at a time.

    Args:
        hidden: ``(..., H)`` final hidden states (logit scale already folded in).
        weight: ``(V, H)`` LM-head weight.
        targets: ``(...)`` next-token targets, ``-100`` where not counted (already shifted).
        bias: optional ``(V,)``.
        chunk_size: rows per chunk.
    """
    if targets.shape != hidden.shape[:-1]:
        raise ShapeMismatchError(
            f"targets have shape {tuple(targets.shape)} but hidden states {tuple(hidden.shape)} need "
            f"{tuple(hidden.shape[:-1])}"
        )
    flat_targets = targets.reshape(-1)
    counted = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)  # (n_counted,)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, counted)  # (n_counted, H)
    row_targets = flat_targets.index_select(0, counted)  # (n_counted,)
    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    total: torch.Tensor | None = None
    for start in range(0, max(rows.shape[0], 1), chunk_size):
        chunk_rows, chunk_targets = rows[start : start + chunk_size], row_targets[start : start + chunk_size]
        if track:
            part = checkpoint(_chunk_cross_entropy, chunk_rows, weight, bias, chunk_targets, use_reentrant=False)
        else:
            part = _chunk_cross_entropy(chunk_rows, weight, bias, chunk_targets)
        total = part if total is None else total + part
    assert total is not None
    return total


def _chunk_cross_entropy(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    logits = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())  # (chunk, V)
    return token_cross_entropy(logits, targets, reduction="sum")


# ---------------------------------------------------------------- the KD term from a teacher-output cache


def cached_lm_loss_sums(
    student: nn.Module,
    inputs: Mapping[str, Any],
    teacher_topk: Mapping[str, Any],
    *,
    divergence: str | Callable[..., torch.Tensor] = "forward_kl",
    temperature: float = 1.0,
    leftover_policy: str = "renormalize",
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunked: bool = False,
    chunk_size: int = 1024,
    divergence_kwargs: Mapping[str, Any] | None = None,
) -> LMLossSums:
    """:func:`causal_lm_loss_sums` with the teacher read from a cache: its top-k log-probabilities per position.

    ``teacher_topk`` is what :class:`kdistill.cache.batches.CachedTeacherCollate` adds to a batch: ``heads`` (one for a
    causal LM) of ``ids`` / ``logprobs`` ``(B, T, k)``, ``leftover`` and ``mask`` ``(B, T)``, and the cache's
    ``temperature``. The KD term is :func:`kdistill.losses.sparse.sparse_divergence` over the counted next-token
    positions, and those positions must be exactly the ones the cache holds: the cache was written through
    :class:`~kdistill.tasks.causal_lm.CausalLMView`, whose ``kd_mask`` is :func:`counted_next_tokens` of the same
    labels, so any difference means the cache belongs to other data or another ``max_length``, and is refused.
    The CE term and the count are those of the live path, so the caller normalizes both paths alike.

    On the chunked path the student's logits are never built: with ``leftover_policy="renormalize"`` only the
    student's logits at the chunk's cached ids are computed (``hidden @ weight[ids].T``; renormalizing over the k
    ids cancels the logsumexp over V), with ``"uniform"`` one chunk's ``(chunk, V)`` logits at a time (the
    leftover mass is spread over every other id, so the whole row takes part). Each chunk runs under activation
    checkpointing, like :func:`chunked_cross_entropy`.

    Args:
        student: the student causal LM.
        inputs: ``input_ids``, ``attention_mask`` and ``labels`` ``(B, T)``.
        teacher_topk: the batch's cached teacher outputs (see above).
        divergence: a registered divergence name or a callable with the divergence contract.
        temperature: the student's temperature; it must equal the cache's (its log-probabilities are at it).
        leftover_policy: ``"renormalize"`` or ``"uniform"`` (see :mod:`kdistill.losses.sparse`).
        kd_weight, ce_weight: a zero skips its term.
        chunked, chunk_size: as in :func:`causal_lm_loss_sums`.
        divergence_kwargs: extra arguments of the divergence (``beta``, ``skew``).

    Raises:
        InvalidArgumentError: a temperature other than the cache's, a malformed ``teacher_topk``, cached ids outside
            the student's vocabulary, or a model the chunked path cannot handle.
        ShapeMismatchError: cached positions that are not the batch's counted next-token positions (the message
            names both counts and shapes).
    """
    from kdistill.losses.sparse import LEFTOVER_POLICIES, sparse_divergence

    labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise InvalidArgumentError(
            "inputs must carry 'labels' of shape (batch, sequence) with -100 where nothing is learned"
        )
    if leftover_policy not in LEFTOVER_POLICIES:
        raise InvalidArgumentError(
            f"leftover_policy={leftover_policy!r} is not one of {', '.join(map(repr, LEFTOVER_POLICIES))}"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidArgumentError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if "teacher" in inputs:
        raise InvalidArgumentError(
            "the batch has both cached teacher outputs and a separate teacher tokenization ('teacher'); a cache "
            "holds ids of the student's own vocabulary, so teacher and student must share one tokenizer"
        )
    mask = counted_next_tokens(labels)  # (B, T)
    targets = next_token_labels(labels)  # (B, T)
    count = int(mask.sum())
    want_kd, want_ce = kd_weight != 0, ce_weight != 0
    head = _cached_head(teacher_topk, mask, temperature) if want_kd else None
    kwargs = dict(divergence_kwargs or {})
    fn = _resolve(divergence)
    if not chunked:
        student_logits = _logits(student, inputs)  # (B, T, V)
        kd_sum = ce_sum = None
        if head is not None:
            _check_cached_ids(head["ids"], mask, student_logits.shape[-1])
            kd_sum = sparse_divergence(
                student_logits, head["ids"], head["logprobs"], head.get("leftover"), mask, divergence=fn,
                temperature=temperature, leftover_policy=leftover_policy, reduction="sum", **kwargs,
            )  # fmt: skip
        if want_ce:
            ce_sum = token_cross_entropy(student_logits, targets, reduction="sum")
        return LMLossSums(kd_sum=kd_sum, ce_sum=ce_sum, count=count, student_logits=student_logits)

    student_head = lm_head_of(student)
    hidden, weight, bias = _scaled(student_head, final_hidden_states(student, inputs))
    kd_sum = ce_sum = None
    if head is not None:
        _check_cached_ids(head["ids"], mask, weight.shape[0])
        kd_sum = chunked_sparse_divergence(
            hidden, weight, head["ids"], head["logprobs"], head.get("leftover"), mask, bias=bias, divergence=fn,
            temperature=temperature, leftover_policy=leftover_policy, chunk_size=chunk_size, **kwargs,
        )  # fmt: skip
    if want_ce:
        ce_sum = chunked_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=chunk_size)
    return LMLossSums(kd_sum=kd_sum, ce_sum=ce_sum, count=count, student_logits=None)


def _cached_head(teacher_topk: Mapping[str, Any], mask: torch.Tensor, temperature: float) -> dict[str, Any]:
    """The one head of a causal LM's cached outputs, checked against the batch's counted positions."""
    heads = teacher_topk.get("heads") if isinstance(teacher_topk, Mapping) else None
    if not isinstance(heads, (list, tuple)) or len(heads) != 1 or not isinstance(heads[0], Mapping):
        found = len(heads) if isinstance(heads, (list, tuple)) else type(heads).__name__
        raise InvalidArgumentError(
            f"teacher_topk must hold 'heads': a list of one dict (a causal LM has one head), got {found}"
        )
    head = heads[0]
    for key in ("ids", "logprobs", "mask"):
        if not isinstance(head.get(key), torch.Tensor):
            raise InvalidArgumentError(f"teacher_topk head 0 has no tensor {key!r}")
    cached_temperature = teacher_topk.get("temperature")
    if cached_temperature is not None and not math.isclose(float(cached_temperature), float(temperature)):
        raise InvalidArgumentError(
            f"the cache's temperature is {float(cached_temperature)!r} but the loss uses temperature="
            f"{float(temperature)!r}; the cached log-probabilities are at the cache's temperature only"
        )
    cached_mask = head["mask"].to(device=mask.device, dtype=torch.bool)
    if cached_mask.shape != mask.shape or head["ids"].shape[:-1] != mask.shape:
        raise ShapeMismatchError(
            f"the cached teacher outputs cover positions of shape {tuple(cached_mask.shape)} (ids "
            f"{tuple(head['ids'].shape)}) but the batch's labels have shape {tuple(mask.shape)}"
        )
    if not torch.equal(cached_mask, mask):
        where = (cached_mask != mask).nonzero()[0].tolist()
        raise ShapeMismatchError(
            f"the cache holds {int(cached_mask.sum())} positions of this batch but its labels count {int(mask.sum())} "
            f"next-token positions (first difference at row {where[0]}, position {where[1]}); was the cache written "
            "with other data, labels or max_length?"
        )
    return dict(head)


def _check_cached_ids(ids: torch.Tensor, mask: torch.Tensor, vocab: int) -> None:
    """Cached ids on counted positions must be ids of the student's vocabulary (``0..V-1``)."""
    counted = ids[mask.to(ids.device)]
    if counted.numel() and int(counted.max()) >= vocab:
        raise InvalidArgumentError(
            f"the cache holds teacher id {int(counted.max())} but the student's vocabulary has {vocab} entries; "
            "the cache must come from a teacher with the student's tokenizer"
        )


def chunked_sparse_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    leftover: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    divergence: str | Callable[..., torch.Tensor] = "forward_kl",
    temperature: float = 1.0,
    leftover_policy: str = "renormalize",
    chunk_size: int = 1024,
    **divergence_kwargs: Any,
) -> torch.Tensor:
    """``sparse_divergence(hidden @ weight.T + bias, ..., reduction="sum")`` without the ``(N, V)`` logits.

    The counted rows are taken ``chunk_size`` at a time. With ``"renormalize"`` a chunk computes the logits of the
    distinct ids its rows hold (at most ``chunk × k``, never more than V) and gathers each row's k of them, then
    calls :func:`~kdistill.losses.sparse.sparse_divergence` on those ``(chunk, k)`` logits with the identity ids
    ``0..k-1``, so the divergence keeps its one definition. With ``"uniform"`` a chunk's full ``(chunk, V)`` logits
    go to ``sparse_divergence`` with the cached ids. Each chunk runs under activation checkpointing: the backward
    pass recomputes one chunk's logits at a time.

    Args:
        hidden: ``(..., H)`` final hidden states (logit scale already folded in).
        weight: ``(V, H)`` LM-head weight; ``bias``: optional ``(V,)``.
        topk_ids, topk_logprobs: ``(..., k)`` cached ids and log-probabilities; ``leftover``: ``(...)`` or None.
        mask: bool ``(...)``, True = counted.
        temperature: a number (the cache's temperature).
    """
    from kdistill.losses.sparse import sparse_divergence

    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
        raise InvalidArgumentError("the chunked cached loss takes one temperature (a number), not one per position")
    lead = hidden.shape[:-1]
    if mask.shape != lead or topk_ids.shape[:-1] != lead or topk_logprobs.shape != topk_ids.shape:
        raise ShapeMismatchError(
            f"hidden states {tuple(hidden.shape)}, mask {tuple(mask.shape)}, cached ids {tuple(topk_ids.shape)} and "
            f"log-probabilities {tuple(topk_logprobs.shape)} must share their leading shape"
        )
    k = topk_ids.shape[-1]
    counted = mask.reshape(-1).nonzero().squeeze(1)  # (n,)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, counted)  # (n, H)
    ids = topk_ids.reshape(-1, k).index_select(0, counted.to(topk_ids.device)).to(rows.device).long()  # (n, k)
    logprobs = topk_logprobs.reshape(-1, k).index_select(0, counted.to(topk_logprobs.device)).to(rows.device)
    rest = None
    if leftover is not None:
        rest = leftover.reshape(-1).index_select(0, counted.to(leftover.device)).to(rows.device)  # (n,)
    options = dict(
        divergence=divergence, temperature=temperature, leftover_policy=leftover_policy, **divergence_kwargs
    )

    def chunk_sum(
        chunk_rows: torch.Tensor,
        head_weight: torch.Tensor,
        head_bias: torch.Tensor | None,
        chunk_ids: torch.Tensor,
        chunk_logprobs: torch.Tensor,
        chunk_rest: torch.Tensor | None,
    ) -> torch.Tensor:
        if leftover_policy == "renormalize":
            distinct, inverse = torch.unique(chunk_ids, return_inverse=True)  # (u,), (chunk, k)
            sub_weight = head_weight.index_select(0, distinct)  # (u, H)
            logits = chunk_rows @ sub_weight.t()  # (chunk, u)
            if head_bias is not None:
                logits = logits + head_bias.index_select(0, distinct)
            gathered = logits.gather(-1, inverse)  # (chunk, k): the student's logits at the cached ids
            identity = torch.arange(k, device=gathered.device).expand_as(inverse)
            return sparse_divergence(gathered, identity, chunk_logprobs, None, reduction="sum", **options)
        logits = (
            chunk_rows @ head_weight.t() if head_bias is None else torch.addmm(head_bias, chunk_rows, head_weight.t())
        )
        return sparse_divergence(logits, chunk_ids, chunk_logprobs, chunk_rest, reduction="sum", **options)

    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    total: torch.Tensor | None = None
    for start in range(0, max(rows.shape[0], 1), chunk_size):
        stop = start + chunk_size
        pieces = (rows[start:stop], weight, bias, ids[start:stop], logprobs[start:stop],
                  None if rest is None else rest[start:stop])  # fmt: skip
        part = checkpoint(chunk_sum, *pieces, use_reentrant=False) if track else chunk_sum(*pieces)
        total = part if total is None else total + part
    assert total is not None
    return total
