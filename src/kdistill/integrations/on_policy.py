"""On-policy steps (GKD, Agarwal et al., 2024): the student samples completions for a batch's prompts.

:func:`draw_on_policy` decides, from ``(seed, step)`` alone, whether an optimizer step is on-policy (so resumed runs
draw alike); :func:`sample_on_policy_batch` turns a batch's left-padded prompts into a new right-padded micro-batch
of ``prompt + sampled completion`` with the completion as labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdistill.core.shift import IGNORE_INDEX
from kdistill.distillers.lm_heads import unwrap_causal_lm
from kdistill.errors import InvalidArgumentError


def draw_on_policy(fraction: float, seed: int, step: int) -> bool:
    """Whether optimizer step ``step`` is on-policy: probability ``fraction``, drawn from a generator seeded by
    ``(seed, step)``."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return bool(torch.rand((), generator=generator) < fraction)


def sample_on_policy_batch(
    student: nn.Module,
    batch: Mapping[str, Any],
    processing_class: Any,
    *,
    max_new_tokens: int,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """A new micro-batch from the student's samples for ``batch``'s prompts.

    The student (unwrapped, in eval mode, without gradients, with its KV cache) samples for the whole batch of
    left-padded prompts at once, up to ``max_new_tokens`` tokens each at ``temperature`` from its full distribution
    (no top-k/top-p). Each row becomes ``prompt + completion`` up to and including the first EOS, right-padded;
    ``labels`` are the completion's tokens and ``-100`` on the prompt, after the first EOS and on padding.

    Raises:
        InvalidArgumentError: a batch without ``prompt_input_ids``/``prompt_attention_mask``, or with a separate
            teacher tokenization.
    """
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
    device = next(student.parameters()).device
    prompts, prompt_mask = prompts.to(device), prompt_mask.to(device)
    pad_id, eos_ids = special_ids(student, processing_class)
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            generated = student.generate(
                input_ids=prompts,
                attention_mask=prompt_mask,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                use_cache=True,  # the KV cache: each new token costs one position's forward, not the prefix's
                pad_token_id=pad_id,
                eos_token_id=eos_ids or None,
            )
    finally:
        student.train(was_training)
    completions = generated[:, prompts.shape[1] :]  # (B, new)
    return sequences_from_samples(prompts, prompt_mask, completions, pad_id, eos_ids)


def special_ids(model: nn.Module, processing_class: Any) -> tuple[int, list[int]]:
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


def sequences_from_samples(
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
