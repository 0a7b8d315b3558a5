"""Shared by the engine tests and the scripts they launch in subprocesses (SIGKILL, two processes)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_tiny_bert


def toy_examples(n: int = 48, vocab: int = 100, num_labels: int = 3, seed: int = 0, min_len: int = 3,
                 max_len: int = 12) -> list[dict]:  # fmt: skip
    """Variable-length token sequences with a label that depends on the tokens (so it can be learned)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": sum(ids) % num_labels})
    return examples


def confident(model: torch.nn.Module, scale: float = 30.0) -> torch.nn.Module:
    """Scale a random classifier head so the model has opinions (random tiny models predict near-uniformly)."""
    with torch.no_grad():
        model.classifier.weight.mul_(scale)
    return model


def teacher_and_student():
    """A 4-layer, 32-wide teacher with a confident head and a 2-layer, 16-wide student (4 heads each)."""
    teacher = confident(make_tiny_bert(num_layers=4, hidden=32, heads=4, seed=1))
    student = make_tiny_bert(num_layers=2, hidden=16, heads=4, seed=2)
    return teacher, student


def flat_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
