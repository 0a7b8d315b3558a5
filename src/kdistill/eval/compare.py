"""Teacher versus students on the same batches: quality, agreement, size and speed in one JSON-able result.

::

    result = compare_models(
        ModelEntry("teacher", teacher, role="teacher"),
        [ModelEntry("distilled", student), ModelEntry("baseline", baseline)],
        batches,
        view=SequenceView(),
        task_metric=classification_accuracy,  # (per-batch logits lists, batches) -> {"accuracy": ...}
        cka_layers={"distilled": [("layer 4", "layer 2")]},
    )
    print(format_compare_table(result))
    write_compare(result, "runs/demo")  # compare.json + compare.md

The result is ``{"teacher": name, "primary_metric": name | None, "settings": {...}, "models": [row, ...]}`` with
the teacher's row first; each row holds ``name, role, path, params, size_bytes, compression, metrics,
metric_kept_pct, agreement, mean_kl, latency_p50_ms, latency_p90_ms, latency_mean_ms, throughput, speedup, cka``.
Values that cannot be computed (a ratio over 0) are None, never NaN, so the file is strict JSON.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from kdistill._io import trimmed_vocabulary
from kdistill.core.views import student_inputs, teacher_inputs
from kdistill.errors import InvalidArgumentError, ShapeMismatchError
from kdistill.eval.cka import layer_cka
from kdistill.eval.compare_table import (
    _finite,
    compare_markdown,
    compare_notes,
    compare_verdicts,
    compare_warnings,
    format_compare_table,
    write_compare,
)
from kdistill.eval.significance import paired_comparison, paired_count_comparison
from kdistill.eval.speed import (
    count_parameters,
    cpu_contention,
    evaluating,
    measure_latencies,
    measure_throughput,
    prepare_inputs,
    ratio_spread,
    size_on_disk,
    watching_cpu,
)
from kdistill.losses import forward_kl

__all__ = [
    "ModelEntry",
    "compare_markdown",
    "compare_models",
    "compare_notes",
    "compare_verdicts",
    "compare_warnings",
    "format_compare_table",
    "write_compare",
]

TaskMetric = Callable[[list[list[torch.Tensor]], list[dict]], Mapping[str, float]]
Outcomes = Callable[[list[list[torch.Tensor]], list[dict]], tuple[Sequence[int], Sequence[int]]]
SentenceCounts = Callable[[list[list[torch.Tensor]], list[dict]], Sequence[Sequence[int]]]

# Metric names (substrings) where lower is better: "kept" is then teacher / student instead of student / teacher.
_LOWER_IS_BETTER = ("perplexity", "ppl", "loss", "nll", "error")


class View(Protocol):
    """What :func:`compare_models` needs of a task view (``SequenceView``, ``TokenView``, a QA view, ...)."""

    def logits(self, outputs: Any) -> list[torch.Tensor]: ...

    def kd_mask(self, batch: Mapping[str, Any]) -> torch.Tensor | None: ...


@dataclass
class ModelEntry:
    """One model in a comparison.

    Attributes:
        name: its label in tables, plots and the ``cka_layers`` mapping; unique within a comparison.
        model: the model itself.
        path: where it is saved; its size is then the files under ``path``, otherwise its safetensors state.
        role: ``"teacher"`` or ``"student"``; :func:`compare_models` takes roles from argument positions and rejects
            a student entry marked ``"teacher"`` (swapped arguments).
        inputs: which of a batch's inputs it reads, ``"student"`` or ``"teacher"``, for batches that carry
            separate inputs per tokenizer; None follows the role.
    """

    name: str
    model: nn.Module
    path: str | None = None
    role: Literal["teacher", "student"] = "student"
    inputs: Literal["student", "teacher"] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidArgumentError(f"ModelEntry name must be a non-empty string, got {self.name!r}")
        if self.role not in ("teacher", "student"):
            raise InvalidArgumentError(
                f"ModelEntry {self.name!r}: role must be 'teacher' or 'student', got {self.role!r}"
            )
        if self.inputs not in ("student", "teacher", None):
            raise InvalidArgumentError(
                f"ModelEntry {self.name!r}: inputs must be 'student', 'teacher' or None, got {self.inputs!r}"
            )

    def inputs_of(self, batch: Mapping[str, Any], role: str) -> Mapping[str, Any]:
        """This model's inputs in ``batch`` (``role`` decides when :attr:`inputs` is None)."""
        key = self.inputs or role
        return teacher_inputs(batch) if key == "teacher" else student_inputs(batch)


# ---------------------------------------------------------------- running the models


def _forward_logits(entry: ModelEntry, role: str, batch: Mapping[str, Any], view: View) -> list[torch.Tensor]:
    """The view's logits per head for one batch, detached on the CPU (call under :func:`evaluating`)."""
    outputs = entry.model(**prepare_inputs(entry.model, entry.inputs_of(batch, role)))
    return [logits.detach().cpu() for logits in view.logits(outputs)]


class _Agreement:
    """Running top-1 agreement and summed forward KL(teacher‖student) per head, over counted positions."""

    def __init__(self, name: str, vocab_policy: str) -> None:
        self.name = name
        self.vocab_policy = vocab_policy
        self.matches: list[float] = []
        self.kl_sums: list[float] = []
        self.counts: list[int] = []

    def add(
        self, index: int, t_heads: list[torch.Tensor], s_heads: list[torch.Tensor], mask: torch.Tensor | None
    ) -> None:
        if len(s_heads) != len(t_heads):
            raise ShapeMismatchError(
                f"model {self.name!r} has {len(s_heads)} logit heads but the teacher {len(t_heads)}"
            )
        if not self.counts:
            self.matches, self.kl_sums, self.counts = [0.0] * len(t_heads), [0.0] * len(t_heads), [0] * len(t_heads)
        for head, (t_logits, s_logits) in enumerate(zip(t_heads, s_heads, strict=True)):
            positions = t_logits.shape[:-1]
            if s_logits.shape[:-1] != positions:
                raise ShapeMismatchError(
                    f"batch {index}, head {head}: model {self.name!r} has logits {tuple(s_logits.shape)} but the "
                    f"teacher {tuple(t_logits.shape)}; agreement and KL need the same positions (same tokenization)"
                )
            counted = torch.ones(positions, dtype=torch.bool) if mask is None else mask.bool().cpu()
            if counted.shape != positions:
                raise ShapeMismatchError(
                    f"batch {index}, head {head}: the view's kd_mask has shape {tuple(counted.shape)} but the logits "
                    f"{tuple(t_logits.shape)} need a mask of shape {tuple(positions)}"
                )
            agree = t_logits.argmax(-1) == s_logits.argmax(-1)  # (...) ids compared, whatever the vocabularies
            self.matches[head] += float((agree & counted).sum())
            self.counts[head] += int(counted.sum())
            kl = forward_kl(s_logits, t_logits, counted, reduction="sum", vocab_policy=self.vocab_policy)
            self.kl_sums[head] += float(kl)

    def result(self) -> tuple[float | None, float | None]:
        """(agreement, mean KL), each averaged over heads; None when no position counted."""
        if not self.counts or min(self.counts) == 0:
            return None, None
        heads = len(self.counts)
        agreement = sum(m / c for m, c in zip(self.matches, self.counts, strict=True)) / heads
        mean_kl = sum(k / c for k, c in zip(self.kl_sums, self.counts, strict=True)) / heads
        return agreement, mean_kl


def _reduced(
    reduce_batch: Callable[[list[torch.Tensor], Mapping[str, Any]], list[torch.Tensor]] | None,
    heads: list[torch.Tensor],
    batch: Mapping[str, Any],
) -> list[torch.Tensor]:
    return heads if reduce_batch is None else reduce_batch(heads, batch)


def _slice_batch(batch: Mapping[str, Any], size: int) -> dict[str, Any]:
    """The first ``size`` examples of a batch: tensors sliced on dim 0, nested input dicts likewise."""
    sliced: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            sliced[key] = value[:size]
        elif isinstance(value, Mapping):
            sliced[key] = _slice_batch(value, size)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            sliced[key] = type(value)(v[:size] for v in value)
        else:
            sliced[key] = value
    return sliced


def _input_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return embedding if isinstance(embedding, nn.Module) else None


def _embedding_params(model: nn.Module) -> int | None:
    """The input embedding's parameters, None when there is no embedding."""
    embedding = _input_embedding(model)
    return None if embedding is None else sum(p.numel() for p in embedding.parameters())


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _kept_pct(metric: str, student_value: float | None, teacher_value: float | None) -> float | None:
    lower_is_better = any(word in metric.lower() for word in _LOWER_IS_BETTER)
    ratio = _ratio(teacher_value, student_value) if lower_is_better else _ratio(student_value, teacher_value)
    return None if ratio is None else 100.0 * ratio


def compare_models(
    teacher: ModelEntry,
    students: Sequence[ModelEntry],
    batches: Sequence[Mapping[str, Any]],
    *,
    view: View,
    task_metric: TaskMetric | None = None,
    latency_batch: Mapping[str, Any] | None = None,
    latency_batch_size: int = 1,
    cka_layers: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    latency_repeats: int = 20,
    latency_max_repeats: int = 200,
    latency_budget_s: float = 2.0,
    vocab_policy: str = "error",
    reduce_batch: Callable[[list[torch.Tensor], Mapping[str, Any]], list[torch.Tensor]] | None = None,
    outcomes: Outcomes | None = None,
    num_labels: int | None = None,
    sentence_counts: SentenceCounts | None = None,
    bootstrap_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate a teacher and its students on the same batches.

    Args:
        teacher: the reference model; its row comes first and every ratio is relative to it.
        students: the models to compare with it (distilled, baseline, ...); names must be unique.
        batches: evaluation batches (the same for every model; batches with separate ``"student"``/``"teacher"``
            inputs feed each model by its entry's ``inputs``).
        view: the task view: ``view.logits(outputs)`` gives the heads, ``view.kd_mask(batch)`` the counted positions.
        task_metric: ``(per-batch logits lists, batches) -> {metric: value}``, called per model with, for each
            batch, the list of its heads' logits (CPU tensors, e.g. ``(B, C)``); the first metric of the teacher's
            result is the primary one (for "metric kept %").
        latency_batch: the batch timed for latency; default: the first ``latency_batch_size`` examples of the first
            batch.
        latency_batch_size: examples in the default latency batch.
        cka_layers: student name → ``(teacher spec, student spec)`` pairs for :func:`~kdistill.eval.cka.layer_cka`.
        latency_repeats: timed forwards per model at least (after 3 warm-up forwards); every model is timed in
            the same interleaved rounds (:func:`~kdistill.eval.speed.measure_latencies`), adding rounds up to
            ``latency_max_repeats`` while ``latency_budget_s`` seconds last.
        vocab_policy: passed to :func:`~kdistill.losses.forward_kl` when the vocabularies differ.
        reduce_batch: ``(heads, batch) -> heads`` applied to each batch's logits before ``task_metric`` keeps them
            (a causal LM's next-token statistics in place of its ``(B, T, V)`` logits); None keeps the logits.
        outcomes: ``(per-batch logits lists, batches) -> (predictions, labels)``, one class per example (a
            classification task's ``outcomes``): then every model's accuracy and macro F1 get a 95% paired bootstrap
            interval (``bootstrap_resamples``, seeded with ``seed``), each pair of students the interval of their
            difference and McNemar's test, under ``"significance"`` (see :mod:`kdistill.eval.significance`).
        num_labels: the classes ``0..num_labels-1`` for macro F1 in those intervals.
        sentence_counts: ``(per-batch logits lists, batches) -> per-sentence counts`` (a token-classification task's
            ``sentence_counts``): the same intervals for entity F1, precision, recall and word accuracy, resampled
            by sentence.

    Returns:
        A JSON-able dict (see the module docstring). ``agreement`` is the fraction of counted positions where
        the model's top-1 class equals the teacher's (averaged over heads); ``mean_kl`` is KL(p_T‖p_S) at
        temperature 1 in nats per counted position (averaged over heads); ``compression`` is teacher params /
        params; ``speedup`` the median over the interleaved rounds of the teacher's time / the model's, with
        ``speedup_iqr`` its interquartile range; ``latency_iqr_pct`` each model's spread; ``throughput`` examples per
        second over ``batches``; ``warnings`` what makes the timings doubtful (a busy CPU, a large spread).

    Raises:
        InvalidArgumentError: no batches, repeated names, bad sizes, or a ``cka_layers`` name that is not a student.
        ShapeMismatchError: a model whose logits do not line up with the teacher's.
    """
    if not batches:
        raise InvalidArgumentError("compare_models needs at least one batch, got none")
    if int(latency_batch_size) != latency_batch_size or latency_batch_size < 1:
        raise InvalidArgumentError(f"latency_batch_size must be an integer >= 1, got {latency_batch_size!r}")
    entries = [teacher, *students]
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"model names must be unique, got {names}")
    swapped = [entry.name for entry in students if entry.role == "teacher"]
    if swapped:
        raise InvalidArgumentError(f"students {swapped} have role='teacher'; pass the teacher as the first argument")
    unknown = sorted(set(cka_layers or {}) - {entry.name for entry in students})
    if unknown:
        raise InvalidArgumentError(
            f"cka_layers names {unknown}, which are not students; students: {[e.name for e in students]}"
        )
    timing_batch = latency_batch if latency_batch is not None else _slice_batch(batches[0], latency_batch_size)

    # Quality: all models run batch by batch, so only one batch of logits is held unless task_metric needs them all.
    roles = {entry.name: "teacher" if entry is teacher else "student" for entry in entries}
    stored: dict[str, list[list[torch.Tensor]]] = {entry.name: [] for entry in entries}
    agreements = {entry.name: _Agreement(entry.name, vocab_policy) for entry in students}
    with contextlib.ExitStack() as stack:
        for entry in entries:
            stack.enter_context(evaluating(entry.model))
        for index, batch in enumerate(batches):
            teacher_heads = _forward_logits(teacher, "teacher", batch, view)
            mask = view.kd_mask(batch)
            if task_metric is not None:
                stored[teacher.name].append(_reduced(reduce_batch, teacher_heads, batch))
            for entry in students:
                heads = _forward_logits(entry, "student", batch, view)
                agreements[entry.name].add(index, teacher_heads, heads, mask)
                if task_metric is not None:
                    stored[entry.name].append(_reduced(reduce_batch, heads, batch))

    # Speed: every model timed in the same rounds, interleaved, so load from elsewhere falls on all of them alike
    with watching_cpu() as usage:
        latencies, rounds = measure_latencies(
            {entry.name: (entry.model, entry.inputs_of(timing_batch, roles[entry.name])) for entry in entries},
            min_repeats=latency_repeats,
            max_repeats=max(latency_repeats, latency_max_repeats),
            budget_s=latency_budget_s,
        )
    warnings = [w for w in [cpu_contention(usage.get("others_share"))] if w]
    significance = None
    if sentence_counts is not None and task_metric is not None:
        counted = {entry.name: sentence_counts(stored[entry.name], list(batches)) for entry in entries}
        significance = paired_count_comparison(
            counted, compare=[entry.name for entry in students], resamples=bootstrap_resamples, seed=seed
        )
    elif outcomes is not None and task_metric is not None:
        predicted: dict[str, Sequence[int]] = {}
        labels: Sequence[int] = []
        for entry in entries:
            predicted[entry.name], labels = outcomes(stored[entry.name], list(batches))
        significance = paired_comparison(
            predicted,
            labels,
            num_labels=num_labels,
            compare=[entry.name for entry in students],
            resamples=bootstrap_resamples,
            seed=seed,
        )
    rows: list[dict[str, Any]] = []
    for entry in entries:
        role = roles[entry.name]
        agreement, mean_kl = (1.0, 0.0) if entry is teacher else agreements[entry.name].result()
        metrics = dict(task_metric(stored.pop(entry.name), list(batches))) if task_metric is not None else {}
        latency = latencies[entry.name]
        throughput = measure_throughput(entry.model, [entry.inputs_of(batch, role) for batch in batches])
        pairs = (cka_layers or {}).get(entry.name)
        cka = None
        if pairs:
            values = layer_cka(
                teacher.model,
                entry.model,
                batches,
                list(pairs),
                teacher_key=teacher.inputs or "teacher",
                student_key=entry.inputs or "student",
            )
            cka = {f"{t}->{s}": value for (t, s), value in values.items()}
        rows.append(
            {
                "name": entry.name,
                "role": role,
                "path": entry.path,
                "params": count_parameters(entry.model),
                "embedding_params": _embedding_params(entry.model),
                "vocabulary": trimmed_vocabulary(entry.path),
                "embedding_width": getattr(_input_embedding(entry.model), "embedding_dim", None),
                "size_bytes": size_on_disk(entry.path, entry.model),
                "metrics": {key: float(value) for key, value in metrics.items()},
                "agreement": agreement,
                "mean_kl": mean_kl,
                "latency_p50_ms": latency["p50_ms"],
                "latency_p90_ms": latency["p90_ms"],
                "latency_mean_ms": latency["mean_ms"],
                "latency_iqr_pct": latency["iqr_pct"],
                "latency_repeats": int(latency["repeats"]),
                "throughput": throughput,
                "cka": cka,
            }
        )

    reference = rows[0]
    primary = next(iter(reference["metrics"]), None)
    for row in rows:
        row["compression"] = _ratio(reference["params"], row["params"])
        spread = ratio_spread(rounds, reference["name"], row["name"])  # per-round teacher time / this model's
        row["speedup"] = spread["p50"]
        row["speedup_iqr"] = [spread["p25"], spread["p75"]]
        if row is not reference and row["latency_iqr_pct"] > 25.0:
            warnings.append(
                f"{row['name']}: its latency varied by {row['latency_iqr_pct']:.0f}% (interquartile range over "
                f"{row['latency_repeats']} interleaved rounds); its speed-up is uncertain"
            )
        row["metric_kept_pct"] = (
            _kept_pct(primary, row["metrics"].get(primary), reference["metrics"].get(primary)) if primary else None
        )
    settings = {
        "view": type(view).__name__,
        "batches": len(batches),
        "latency_batch_size": latency_batch_size if latency_batch is None else None,
        "latency_repeats": latency_repeats,
        "latency_rounds": len(rounds),
        "latency_interleaved": True,
        "cpu_used_by_others": usage.get("others_share"),
        "device": str(next(teacher.model.parameters(), torch.empty(0)).device),
        "torch_threads": torch.get_num_threads(),
    }
    result = {"teacher": teacher.name, "primary_metric": primary, "settings": settings, "models": rows}
    if significance is not None:
        for row in rows:
            row["metrics_ci"] = {k: v["ci"] for k, v in significance["models"][row["name"]].items()}
        result["significance"] = significance
    return _finite({**result, "warnings": warnings})
