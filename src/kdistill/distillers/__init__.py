"""Distillers and the objective they optimize."""

from kdistill.core.views import SequenceView, TokenView, infer_view
from kdistill.distillers.core import (
    Distiller,
    MultiTeacherDistiller,
    StudentModule,
    SupervisedTrainer,
    build_projection,
    freeze,
    model_inputs,
)
from kdistill.distillers.cross import AlignedKD, CrossTokenizerDistiller
from kdistill.distillers.kd_terms import (
    ChunkedKD,
    DenseKD,
    Ensemble,
    HeadStates,
    KDStrategy,
    Logits,
    MixtureKD,
    TopK,
    TopKKD,
)
from kdistill.distillers.multitask import MultiTaskDistiller
from kdistill.distillers.objective import Match, Objective, Stage, TermValue, expand_layer_map, normalized_loss

__all__ = [
    "AlignedKD",
    "ChunkedKD",
    "CrossTokenizerDistiller",
    "DenseKD",
    "Distiller",
    "Ensemble",
    "HeadStates",
    "KDStrategy",
    "Logits",
    "Match",
    "MixtureKD",
    "MultiTaskDistiller",
    "MultiTeacherDistiller",
    "Objective",
    "SequenceView",
    "Stage",
    "StudentModule",
    "SupervisedTrainer",
    "TermValue",
    "TokenView",
    "TopK",
    "TopKKD",
    "build_projection",
    "expand_layer_map",
    "freeze",
    "infer_view",
    "model_inputs",
    "normalized_loss",
]
