"""Placeholder: being written (chunked divergence)."""

def chunked_divergence(*args, **kwargs):
    raise NotImplementedError
