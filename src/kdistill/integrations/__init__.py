"""Integrations with other training frameworks: the Hugging Face ``Trainer`` one.

:class:`DistillationArguments` (:mod:`kdistill.integrations.arguments`) and :class:`DistillationTrainer`
(:mod:`kdistill.integrations.trainer`); on-policy sampling in :mod:`kdistill.integrations.on_policy`. Imported lazily,
so that ``import kdistill.integrations`` does not import transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DistillationArguments", "DistillationTrainer"]

_MODULES = {
    "DistillationArguments": "kdistill.integrations.arguments",
    "DistillationTrainer": "kdistill.integrations.trainer",
}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
