"""The loss registry: config names → loss functions.

Kinds: ``"divergence"`` (student vs teacher logits, see :mod:`kdistill.losses.divergences`), ``"hard"`` (logits vs
labels), ``"feature"`` (hidden states or attention maps, see :mod:`kdistill.losses.features`) and
``"cross_tokenizer"`` (logits over different vocabularies, see :mod:`kdistill.losses.cross_tokenizer`).

This module imports the loss modules and registers the built-in losses; the table itself lives in
:mod:`kdistill.losses._lookup`, below the loss modules, where those taking a divergence by name look it up.
"""

from __future__ import annotations

from typing import Any

import torch

from kdistill.errors import InvalidArgumentError, KdistillError
from kdistill.losses import cross_tokenizer as _xtok
from kdistill.losses import divergences as _div
from kdistill.losses import features as _feat
from kdistill.losses._lookup import LOSSES, LossFn

__all__ = ["LOSSES", "LossFn", "check_kd_kwargs", "get_loss", "register_loss"]

LOSSES.register("forward_kl", _div.forward_kl, kind="divergence", aliases=("kl", "kd_kl"))
LOSSES.register("reverse_kl", _div.reverse_kl, kind="divergence", aliases=("rkl",))
LOSSES.register("skewed_forward_kl", _div.skewed_forward_kl, kind="divergence", aliases=("skl",))
LOSSES.register("skewed_reverse_kl", _div.skewed_reverse_kl, kind="divergence", aliases=("srkl",))
LOSSES.register("generalized_jsd", _div.generalized_jsd, kind="divergence", aliases=("jsd",))
LOSSES.register("total_variation", _div.total_variation, kind="divergence", aliases=("tvd",))
LOSSES.register("soft_cross_entropy", _div.soft_cross_entropy, kind="divergence", aliases=("kd_ce",))
LOSSES.register("logit_mse", _div.logit_mse, kind="divergence", aliases=("kd_mse",))
LOSSES.register("token_cross_entropy", _div.token_cross_entropy, kind="hard", aliases=("ce", "cross_entropy"))

LOSSES.register("hidden_mse", _feat.hidden_mse, kind="feature", aliases=("hidden_states_mse", "hid_mse"))
LOSSES.register("cosine", _feat.cosine, kind="feature", aliases=("cos",))
LOSSES.register("pkd", _feat.pkd, kind="feature")
LOSSES.register("attention_mse", _feat.attention_mse, kind="feature", aliases=("att_mse",))
LOSSES.register("attention_kl", _feat.attention_kl, kind="feature")
LOSSES.register("nst", _feat.nst, kind="feature", aliases=("mmd",))
LOSSES.register("fsp", _feat.fsp, kind="feature")
# teacher and student with different tokenizers: sorted-probability distance (ULD), any vocabularies
LOSSES.register("uld", _xtok.uld_loss, kind="cross_tokenizer")


def get_loss(name: str | LossFn) -> LossFn:
    """The loss function registered under ``name`` (or ``name`` itself when it is callable)."""
    return LOSSES.resolve(name)


def register_loss(name: str, fn: LossFn | None = None, *, kind: str = "divergence", **kwargs: Any) -> Any:
    """Register a user's loss function; usable as ``register_loss("x", fn)`` or as a decorator.

    A divergence must follow the contract of :mod:`kdistill.losses.divergences`, so that the objective and
    :func:`~kdistill.losses.chunked_divergence` can call it like the built-in ones.
    """
    return LOSSES.register(name, fn, kind=kind, **kwargs)


def check_kd_kwargs(kd_loss: str | LossFn, kd_kwargs: dict[str, Any] | None) -> None:
    """Call the divergence once on a 1 × 2 example, so that a keyword it does not take (or a bad value) fails when
    the objective is built, not at the first step. Raises :class:`InvalidArgumentError` naming ``kd_kwargs``."""
    if not kd_kwargs:
        return
    fn = LOSSES.resolve(kd_loss)
    name = kd_loss if isinstance(kd_loss, str) else getattr(kd_loss, "__name__", "the loss")
    try:
        fn(torch.zeros(1, 2), torch.zeros(1, 2), **dict(kd_kwargs))
    except TypeError as error:
        raise InvalidArgumentError(f"kd_kwargs={dict(kd_kwargs)!r} do not fit kd_loss={name!r}: {error}") from None
    except KdistillError as error:
        raise InvalidArgumentError(f"kd_kwargs of kd_loss={name!r}: {error}") from None
