"""kdistill: knowledge distillation for NLP models."""

from typing import Any

from kdistill._version import __version__
from kdistill.errors import KdistillError

__all__ = ["DistillationArguments", "DistillationTrainer", "KdistillError", "__version__"]

_LAZY = {
    "DistillationArguments": "kdistill.integrations.arguments",
    "DistillationTrainer": "kdistill.integrations.trainer",
}


def __getattr__(name: str) -> Any:
    """The Hugging Face integration, imported on first use so that ``import kdistill`` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdistill' has no attribute {name!r}")
