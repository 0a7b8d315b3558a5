"""The table behind :data:`kdistill.losses.LOSSES`, in a module below every loss module.

:mod:`kdistill.losses.registry` imports the loss modules and registers the built-in losses into this table; the
losses that take a divergence by name (:mod:`~kdistill.losses.chunked`, :mod:`~kdistill.losses.cross_tokenizer`)
look the name up here when they are called. So no loss module imports the registry, which imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kdistill.registry import Registry

#: a loss function; divergences follow the contract of :mod:`kdistill.losses.divergences`
LossFn = Callable[..., Any]

#: config names → loss functions, each with its kind ("divergence", "hard", "feature", "cross_tokenizer")
LOSSES: Registry[LossFn] = Registry("loss")
