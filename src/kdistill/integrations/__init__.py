"""Integrations with other training frameworks; :mod:`kdistill.integrations.hf` is the Hugging Face ``Trainer`` one.

Imported lazily, so that ``import kdistill.integrations`` does not import transformers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DistillationArguments", "DistillationTrainer"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kdistill.integrations import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
