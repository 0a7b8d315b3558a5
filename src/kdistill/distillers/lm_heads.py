"""A causal LM's output layer and final hidden states, through PEFT, DDP, accelerate and ``torch.compile`` wrappers.

The chunked losses compute logits from these, ``chunk_size`` positions at a time, instead of asking the model for its
``(B, T, V)`` logits. Only torch is imported here; models are duck-typed Hugging Face causal LMs.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdistill.errors import InvalidArgumentError

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


def causal_lm_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
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
    kwargs = {**causal_lm_inputs(inputs), "use_cache": False}
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


def causal_lm_logits(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    return model(**causal_lm_inputs(inputs), use_cache=False).logits


def eval_teacher(teacher: nn.Module) -> None:
    if teacher.training:
        teacher.eval()


def scaled_head(head: LMHead, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
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
