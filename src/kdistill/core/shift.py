"""The causal shift, defined once: the logits at position t predict the token at t + 1.

Every causal-LM loss, metric and count in kdistill goes through :func:`next_token_labels`, so a label is never
compared with the logits of its own position, and the count of counted positions (for global normalization)
is the count of next-token targets.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` shifted one position to the left, ``-100`` in the last column.

    ``next_token_labels(labels)[b, t]`` is the target of the logits at ``[b, t]``: ``labels[b, t + 1]``. A label of
    ``-100`` (prompt, padding) is not counted, and neither is the last position, which has no next token.

    Args:
        labels: ``(B, T)`` integer labels, ``-100`` where nothing is learned (HF convention: labels = input ids).
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[..., :-1] = labels[..., 1:]
    return shifted


def counted_next_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Bool ``(B, T)``: True where the logits at that position have a next-token target."""
    return next_token_labels(labels) != IGNORE_INDEX
