"""Features by name: hidden states, attention maps, logits or any module's output, captured with forward hooks.

See :mod:`kdistill.features.layers` for the spec grammar (``"layer N"``, ``"embeddings"``, ``"last"``,
``"logits"``, module paths with an optional ``":input"``) and :mod:`kdistill.features.taps` for the capture.
"""

from kdistill.features.layers import FeatureSource, FeatureSpecError, find_block_list, num_layers, resolve_feature
from kdistill.features.taps import FeatureTap, extract_features, model_kwargs_for

__all__ = [
    "FeatureSource",
    "FeatureSpecError",
    "FeatureTap",
    "extract_features",
    "find_block_list",
    "model_kwargs_for",
    "num_layers",
    "resolve_feature",
]
