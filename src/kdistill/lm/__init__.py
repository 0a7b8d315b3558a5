"""Causal-LM distillation: the next-token shift, the token-level loss (plain and chunked), SFT data, generation."""

from kdistill.lm.shift import IGNORE_INDEX, counted_next_tokens, next_token_labels

__all__ = ["IGNORE_INDEX", "counted_next_tokens", "next_token_labels"]
