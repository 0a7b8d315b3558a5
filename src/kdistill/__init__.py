"""kdistill: knowledge distillation for NLP models."""

from kdistill.errors import KdistillError

__version__ = "0.1.0"

__all__ = ["KdistillError", "__version__"]
