"""Evaluation: task metrics, teacher–student CKA, speed and size, and the teacher-versus-students comparison.

* :mod:`kdistill.eval.metrics` — accuracy, macro F1, entity F1, SQuAD EM/F1, perplexity (pure Python);
* :mod:`kdistill.eval.cka` — linear CKA and per-layer CKA between a teacher and a student;
* :mod:`kdistill.eval.speed` — latency, throughput, parameter count, size on disk;
* :mod:`kdistill.eval.compare` — :func:`compare_models`, its tables and ``compare.json``/``compare.md``.
"""

from kdistill.eval.cka import layer_cka, linear_cka
from kdistill.eval.compare import (
    ModelEntry,
    compare_markdown,
    compare_models,
    format_compare_table,
    write_compare,
)
from kdistill.eval.metrics import accuracy, entity_f1, macro_f1, perplexity, squad_scores
from kdistill.eval.speed import count_parameters, measure_latency, measure_throughput, size_on_disk

__all__ = [
    "ModelEntry",
    "accuracy",
    "compare_markdown",
    "compare_models",
    "count_parameters",
    "entity_f1",
    "format_compare_table",
    "layer_cka",
    "linear_cka",
    "macro_f1",
    "measure_latency",
    "measure_throughput",
    "perplexity",
    "size_on_disk",
    "squad_scores",
    "write_compare",
]
