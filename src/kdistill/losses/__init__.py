"""Loss library: pure tensor functions (torch only), checked against float64 references in the tests."""

from kdistill.losses._common import VOCAB_POLICIES, align_vocab
from kdistill.losses.chunked import chunked_divergence
from kdistill.losses.cross_tokenizer import (
    align_by_offsets,
    aligned_distillation_loss,
    aligned_distillation_loss_batch,
    uld_loss,
)
from kdistill.losses.divergences import (
    forward_kl,
    generalized_jsd,
    logit_mse,
    reverse_kl,
    skewed_forward_kl,
    skewed_reverse_kl,
    soft_cross_entropy,
    token_cross_entropy,
    total_variation,
)
from kdistill.losses.features import attention_kl, attention_mse, cosine, fsp, hidden_mse, nst, pkd
from kdistill.losses.registry import LOSSES, check_kd_kwargs, get_loss, register_loss
from kdistill.losses.sparse import sparse_divergence

__all__ = [
    "LOSSES",
    "VOCAB_POLICIES",
    "align_by_offsets",
    "align_vocab",
    "aligned_distillation_loss",
    "aligned_distillation_loss_batch",
    "attention_kl",
    "attention_mse",
    "check_kd_kwargs",
    "chunked_divergence",
    "cosine",
    "forward_kl",
    "fsp",
    "generalized_jsd",
    "get_loss",
    "hidden_mse",
    "logit_mse",
    "nst",
    "pkd",
    "register_loss",
    "reverse_kl",
    "skewed_forward_kl",
    "skewed_reverse_kl",
    "soft_cross_entropy",
    "sparse_divergence",
    "token_cross_entropy",
    "total_variation",
    "uld_loss",
]
