"""Causal-LM distillation: the next-token shift, the token-level loss (plain, chunked, from a teacher cache, across
tokenizers), SFT data, generation.

Submodules import torch and transformers; this package itself does not, so ``kdistill --help`` stays fast:
the names below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IGNORE_INDEX": "kdistill.lm.shift",
    "counted_next_tokens": "kdistill.lm.shift",
    "next_token_labels": "kdistill.lm.shift",
    "SFTCollator": "kdistill.lm.data",
    "render_sft": "kdistill.lm.data",
    "pack_texts": "kdistill.lm.data",
    "chatterbot_dialogs": "kdistill.lm.data",
    "load_sft_records": "kdistill.lm.data",
    "causal_lm_loss_sums": "kdistill.lm.loss",
    "cached_lm_loss_sums": "kdistill.lm.loss",
    "cross_tokenizer_loss_sums": "kdistill.lm.cross",
    "generate_dataset": "kdistill.lm.generate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kdistill.lm' has no attribute {name!r}")
