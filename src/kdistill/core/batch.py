"""What of a batch a model's forward takes: kdistill's own keys (labels, cached teacher outputs, ...) dropped."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

#: batch keys that kdistill adds and no model's forward takes
NON_MODEL_KEYS = frozenset(
    {"labels", "task", "teacher_logits", "teacher_topk", "student", "teacher", "example_id", "idx"}
)


def model_inputs(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``inputs`` that ``model.forward`` takes by name (labels and kdistill's own keys dropped)."""
    params = inspect.signature(model.forward).parameters
    named = {name for name, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not named and hasattr(model, "get_base_model"):  # a peft model's forward(*args, **kwargs) passes them on
        return model_inputs(model.get_base_model(), inputs)
    return {k: v for k, v in inputs.items() if k in named and k not in NON_MODEL_KEYS}
