"""Distillers: who teaches whom, on what features. Composition, not an inheritance chain.

A distiller owns the student (with its projections), the frozen teacher(s) and an :class:`Objective`; the
training loop asks it for three things per micro-batch: ``count_units(batch)`` (how many positions/examples each
term averages over, before any forward), ``compute_terms(module, batch, weights, step, total)`` (each active
term's sum), and ``after_step()`` (e.g. the EMA teacher's update). Everything else — accumulation, precision,
processes, checkpoints — is the loop's.

* :class:`Distiller` — one teacher (live, cached logits in the batch, an EMA copy of the student, or the student's
  own deeper layers with ``teacher="self"``), or several when built through :class:`MultiTeacherDistiller`;
* :class:`MultiTaskDistiller` — several tasks, each with its own distiller; batches name their task;
* :func:`SupervisedTrainer` — hard labels only: training a teacher, or the no-distillation baseline.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdistill.core.batch import model_inputs
from kdistill.core.views import (
    SequenceView,
    TokenView,
    attention_mask_of,
    infer_view,
    student_inputs,
    teacher_inputs,
)
from kdistill.distillers.kd_terms import DenseKD, Ensemble, KDStrategy, Logits, MixtureKD, Side, TopK, TopKKD
from kdistill.distillers.objective import Match, Objective, TermValue
from kdistill.errors import InvalidArgumentError, KdistillError, ShapeMismatchError
from kdistill.features import FeatureTap, resolve_feature
from kdistill.losses import token_cross_entropy

View = SequenceView | TokenView


def build_projection(kind: str, student_size: int, teacher_size: int) -> nn.Module:
    """A trainable map from the student's hidden size to the teacher's (saved beside the student, never in it)."""
    if kind == "linear":
        return nn.Linear(student_size, teacher_size)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(student_size, teacher_size), nn.GELU(), nn.Linear(teacher_size, teacher_size))
    raise InvalidArgumentError(f"projection {kind!r} is not 'linear' or 'mlp'")


class StudentModule(nn.Module):
    """The trainable part of a run: the student and its projections, in one module so data parallelism covers both.

    Its forward runs the student with taps on the requested features, applies each match's projection and returns
    ``(outputs, features)``.
    """

    def __init__(self, student: nn.Module, projections: nn.ModuleDict | None = None) -> None:
        super().__init__()
        self.student = student
        self.projections = projections if projections is not None else nn.ModuleDict()
        self.projection_targets: dict[str, str] = {}  # projection key -> feature name it maps

    def forward(self, inputs: Mapping[str, Any], sources: Mapping[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
        with FeatureTap(self.student, dict(sources)) as tap:
            outputs = self.student(**model_inputs(self.student, inputs), **tap.model_kwargs)
            tap.collect(outputs)
            features = dict(tap.features)
        for key, projection in self.projections.items():
            name = self.projection_targets[key]
            if name in features:
                features[name] = projection(features[name])
        return outputs, features


def _projection_key(match: Match) -> str:
    return "m" + str(abs(hash(match.name)) % 10**12)  # ModuleDict keys cannot hold dots or spaces


def _kind(match: Match) -> str:
    """What ``"layer N"`` means for the feature taps: attention maps, or hidden states for everything else."""
    return "attention" if match.feature == "attention" else "hidden"


def freeze(model: nn.Module) -> nn.Module:
    """Put a teacher in eval mode with no trainable parameter."""
    model.eval()
    model.requires_grad_(False)
    return model


class Distiller:
    """One student, one or more frozen teachers, one objective.

    Args:
        student: the model being trained (any ``nn.Module``; Hugging Face models work as they are).
        teacher: a frozen ``nn.Module``; a list of them (see :class:`MultiTeacherDistiller`); ``"ema"`` (an
            exponential moving average of the student, updated after every optimizer step: self-distillation);
            ``"self"`` (the student's own features, detached, teach its other layers); or None (no teacher:
            only hard labels, or cached ``teacher_logits`` / ``teacher_topk`` / ``teacher_features`` carried by
            each batch).
        objective: the weighted terms.
        view: which logits/labels/mask the task has; inferred from the student's logits when None.
        teacher_weights: multi-teacher: fixed weights of each teacher's distribution (default: equal).
        teacher_combine: multi-teacher: ``"fixed"`` or ``"confidence"`` (per example, each teacher weighted by the
            probability it gives the gold label).
        ema_decay: decay of the EMA teacher.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | Sequence[nn.Module] | str | None,
        objective: Objective,
        *,
        view: View | None = None,
        teacher_weights: Sequence[float] | None = None,
        teacher_combine: str = "fixed",
        ema_decay: float = 0.999,
    ) -> None:
        self.student = student
        self.objective = objective
        self.view = view
        self.teacher_mode = "live"
        if isinstance(teacher, str):
            if teacher not in ("ema", "self"):
                raise InvalidArgumentError(f"teacher {teacher!r} must be a model, a list of models, 'ema' or 'self'")
            self.teacher_mode = teacher
            self.teachers = [freeze(copy.deepcopy(student))] if teacher == "ema" else []
        elif teacher is None:
            self.teacher_mode = "none"
            self.teachers = []
        elif isinstance(teacher, nn.Module):
            self.teachers = [freeze(teacher)]
        else:
            self.teachers = [freeze(t) for t in teacher]
            if not self.teachers:
                raise InvalidArgumentError("teacher list is empty")
        if teacher_combine not in ("fixed", "confidence"):
            raise InvalidArgumentError(f"teacher_combine {teacher_combine!r} is not 'fixed' or 'confidence'")
        self.teacher_combine = teacher_combine
        n = max(len(self.teachers), 1)
        weights = list(teacher_weights) if teacher_weights is not None else [1.0 / n] * n
        if len(weights) != n or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise InvalidArgumentError(
                f"teacher_weights {weights} must be {n} non-negative numbers with a positive sum"
            )
        self.teacher_weights = [w / sum(weights) for w in weights]
        if not 0.0 <= ema_decay < 1.0:
            raise InvalidArgumentError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.ema_decay = ema_decay
        # the KD term's strategies (kdistill.distillers.kd_terms): live or in-batch teacher logits (several teachers
        # mixed into one distribution), and the teacher's cached top-k when a batch carries it
        self.kd_strategy: KDStrategy = (
            MixtureKD(objective.kd_loss, objective.kd_kwargs)
            if len(self.teachers) > 1
            else DenseKD(objective.kd_loss, objective.kd_kwargs)
        )
        self.cached_kd_strategy = TopKKD(objective.kd_loss, objective.kd_kwargs)
        for match in objective.matches:
            if self.teacher_mode in ("live", "ema") and not 0 <= match.teacher_index < len(self.teachers):
                raise InvalidArgumentError(
                    f"match {match.name!r} names teacher {match.teacher_index}; there are {len(self.teachers)}"
                )
        # with teacher=None, matches are served by cached teacher features in each batch (``teacher_features``,
        # from a teacher-output cache); a batch without them is refused in _teacher_forward, naming the match
        self.module: StudentModule | None = None
        self._student_sources: dict[str, Any] = {}
        self._teacher_sources: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ setup

    def setup(
        self,
        sample_batch: Mapping[str, Any],
        device: torch.device | str = "cpu",
        teacher_dtype: torch.dtype | None = None,
    ) -> StudentModule:
        """Resolve features, build projections from the shapes seen on ``sample_batch``, check every term once.

        Size mismatches that no projection resolves, and vocabularies that differ, fail here with both sizes named,
        before any optimizer step. Returns the trainable :class:`StudentModule`.
        """
        for teacher in self.teachers:
            teacher.to(device=device, dtype=teacher_dtype) if teacher_dtype else teacher.to(device)
        matches = self.objective.matches
        self._student_sources = {m.name: resolve_feature(self.student, m.student, _kind(m)) for m in matches}
        if self.teacher_mode == "self":
            self._self_sources = {
                "teacher::" + m.name: resolve_feature(self.student, m.teacher, _kind(m)) for m in matches
            }
        self._teacher_sources = []
        for index, teacher in enumerate(self.teachers):
            self._teacher_sources.append(
                {m.name: resolve_feature(teacher, m.teacher, _kind(m)) for m in matches if m.teacher_index == index}
            )
        module = StudentModule(self.student).to(device)
        batch = _to_device(sample_batch, device)
        with torch.no_grad():
            outputs, student_features = module(student_inputs(batch), self._all_student_sources())
            teacher_features, teacher_logits = self._teacher_forward(batch, student_features, need_logits=True)
        projections = nn.ModuleDict()
        for match in matches:
            if match.projection == "none":
                continue
            s_size, t_size = student_features[match.name].shape[-1], teacher_features[match.name].shape[-1]
            projections[_projection_key(match)] = build_projection(match.projection, s_size, t_size)
        module.projections = projections.to(device)
        self._projection_keys = {_projection_key(m): m.name for m in matches if m.projection != "none"}
        module.projection_targets = dict(self._projection_keys)
        self.module = module
        if self.view is None:
            self.view = infer_view(self._student_logits(outputs)[0])
        with torch.no_grad():
            _, student_features = self._student_forward(module, batch)
            weights = dict.fromkeys(self.objective.active_terms(), 1.0)
            self._terms_from(outputs, student_features, teacher_features, teacher_logits, batch, weights, 0, 1)
        return module

    def _all_student_sources(self) -> dict[str, Any]:
        sources = dict(self._student_sources)
        if self.teacher_mode == "self":
            sources.update(self._self_sources)
        return sources

    # ------------------------------------------------------------------ per micro-batch

    def count_units(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """How many units each kind of term averages over in this micro-batch (no forward pass needed)."""
        assert self.view is not None, "call setup() first"
        inputs = student_inputs(batch)
        mask = attention_mask_of(inputs)
        batch_size = _first_dim(inputs)
        counts = {"logit_positions": float(self.view.count_logit_positions(batch))}
        labels = self.view.labels(batch)
        counts["label_positions"] = float(sum(int((lab != -100).sum()) for lab in labels)) if labels else 0.0
        if mask is not None:
            per_example = mask.sum(-1)
            counts["positions"] = float(per_example.sum())
            counts["examples"] = float((per_example > 0).sum())
            counts["pairs"] = float(per_example.pow(2).sum())
        else:
            seq = inputs["input_ids"].shape[1] if isinstance(inputs.get("input_ids"), torch.Tensor) else 1
            counts["positions"] = float(batch_size * seq)
            counts["examples"] = float(batch_size)
            counts["pairs"] = float(batch_size * seq * seq)
        if self.kd_strategy.unit not in counts:
            counts[self.kd_strategy.unit] = self.kd_strategy.count(batch, self.view)
        return counts

    def compute_terms(
        self,
        module: nn.Module,
        batch: Mapping[str, Any],
        weights: Mapping[str, float],
        step: int,
        total_steps: int,
    ) -> dict[str, TermValue]:
        """Each term with a non-zero weight, as a sum over its units. ``module`` may be the DDP-wrapped one."""
        outputs, student_features = self._student_forward(module, batch)
        needs_teacher = any(weights.get(name, 0.0) != 0.0 for name in self.objective.term_names if name != "hard")
        teacher_features: dict[str, torch.Tensor] = {}
        teacher_logits = None
        if needs_teacher:
            need_logits = weights.get("kd", 0.0) != 0.0
            teacher_features, teacher_logits = self._teacher_forward(batch, student_features, need_logits)
        return self._terms_from(
            outputs, student_features, teacher_features, teacher_logits, batch, weights, step, total_steps
        )

    def after_step(self) -> None:
        """Called after each optimizer step: moves the EMA teacher toward the student."""
        if self.teacher_mode != "ema":
            return
        with torch.no_grad():
            for ema_param, param in zip(self.teachers[0].parameters(), self.student.parameters(), strict=True):
                ema_param.lerp_(param.detach().to(ema_param.dtype), 1.0 - self.ema_decay)

    # ------------------------------------------------------------------ internals

    def _student_forward(self, module: nn.Module, batch: Mapping[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
        outputs, features = module(student_inputs(batch), self._all_student_sources())
        return outputs, features

    def _student_logits(self, outputs: Any) -> list[torch.Tensor]:
        view = self.view or infer_view(outputs.logits if hasattr(outputs, "logits") else outputs)
        return view.logits(outputs)

    @torch.no_grad()
    def _teacher_forward(
        self, batch: Mapping[str, Any], student_features: Mapping[str, torch.Tensor], need_logits: bool
    ) -> tuple[dict[str, torch.Tensor], list[list[torch.Tensor]] | None]:
        """Teacher features per match, and each teacher's logits per head — live, or cached in the batch."""
        features: dict[str, torch.Tensor] = {}
        if self.teacher_mode == "self":
            for match in self.objective.matches:
                features[match.name] = student_features["teacher::" + match.name].detach()
            return features, None
        cached_features = batch.get("teacher_features") or {}
        if ("teacher_topk" in batch or cached_features) and all(
            match.name in cached_features for match in self.objective.matches
        ):  # the KD term reads the cached top-k (see _terms_from), the matches the cached features
            return {match.name: cached_features[match.name] for match in self.objective.matches}, None
        if "teacher_logits" in batch and not self.objective.matches:
            cached = batch["teacher_logits"]
            return features, [list(cached) if isinstance(cached, (list, tuple)) else [cached]]
        if not self.teachers:
            if self.objective.matches:
                missing = next(m.name for m in self.objective.matches if m.name not in cached_features)
                raise KdistillError(
                    f"match {missing!r} needs the teacher's features, but there is no teacher and the batch's "
                    f"cached teacher_features hold {sorted(cached_features)}; write the cache for this run's matches"
                )
            return features, None
        inputs = teacher_inputs(batch)
        all_logits: list[list[torch.Tensor]] = []
        for index, teacher in enumerate(self.teachers):
            sources = self._teacher_sources[index] if index < len(self._teacher_sources) else {}
            with FeatureTap(teacher, sources) as tap:
                outputs = teacher(**model_inputs(teacher, inputs), **tap.model_kwargs)
                tap.collect(outputs)
                features.update(tap.features)
            if need_logits:
                all_logits.append((self.view or infer_view(outputs.logits)).logits(outputs))
        return features, (all_logits if need_logits else None)

    def _terms_from(
        self,
        outputs: Any,
        student_features: Mapping[str, torch.Tensor],
        teacher_features: Mapping[str, torch.Tensor],
        teacher_logits: list[list[torch.Tensor]] | None,
        batch: Mapping[str, Any],
        weights: Mapping[str, float],
        step: int,
        total_steps: int,
    ) -> dict[str, TermValue]:
        terms: dict[str, TermValue] = {}
        student_logits = self._student_logits(outputs)
        if weights.get("kd", 0.0) != 0.0:
            terms["kd"] = self._kd_term(student_logits, teacher_logits, batch, step, total_steps)
        if weights.get("hard", 0.0) != 0.0:
            labels = self.view.labels(batch)
            if labels is None:
                raise KdistillError("the hard-label term has weight > 0 but the batch has no 'labels'")
            total = sum(
                token_cross_entropy(logits, lab, reduction="sum")
                for logits, lab in zip(student_logits, labels, strict=True)
            )
            terms["hard"] = TermValue(total, "label_positions")
        mask = attention_mask_of(student_inputs(batch))
        for match in self.objective.matches:
            if weights.get(match.name, 0.0) == 0.0:
                continue
            s_feature = student_features[match.name]
            t_feature = teacher_features[match.name]
            if (
                s_feature.shape[-1] != t_feature.shape[-1]
                and match.projection == "none"
                and match.loss not in ("nst", "mmd")
            ):
                raise ShapeMismatchError(
                    f"match {match.name!r}: student size {s_feature.shape[-1]} but teacher size {t_feature.shape[-1]}"
                    f" ({tuple(s_feature.shape)} vs {tuple(t_feature.shape)}); set projection: linear (or mlp)"
                )
            terms[match.name] = self.objective.match_term(match, s_feature, t_feature.to(s_feature.dtype), mask)
        return terms

    def _kd_term(
        self,
        student_logits: list[torch.Tensor],
        teacher_logits: list[list[torch.Tensor]] | None,
        batch: Mapping[str, Any],
        step: int,
        total_steps: int,
    ) -> TermValue:
        """The KD term, summed over the heads: live (or in-batch) teacher logits by :attr:`kd_strategy`, the
        teacher's cached top-k by :attr:`cached_kd_strategy`."""
        assert self.view is not None, "call setup() first"
        if teacher_logits is None and "teacher_topk" in batch:
            return self._cached_kd_term(student_logits, batch)
        if teacher_logits is None:
            raise KdistillError("the KD term has weight > 0 but there is no teacher and no cached teacher_logits")
        mask = self.view.kd_mask(batch)
        labels = self.view.labels(batch)
        total = None
        for head, s_logits in enumerate(student_logits):
            per_teacher = [logits[head] for logits in teacher_logits]
            temperature = self.objective.temperature_at(step, total_steps, s_logits, per_teacher[0])
            teacher: Side = Logits(per_teacher[0])
            if len(per_teacher) > 1:
                label = labels[head] if labels else None
                teacher = Ensemble(per_teacher, self.teacher_weights, self.teacher_combine, label)
            term = self.objective.kd_from(self.kd_strategy, Logits(s_logits), teacher, mask, temperature, batch)
            total = term.total if total is None else total + term.total
        assert total is not None  # at least one head
        return TermValue(total, self.kd_strategy.unit)

    def _cached_kd_term(self, student_logits: list[torch.Tensor], batch: Mapping[str, Any]) -> TermValue:
        """The KD term against the teacher's cached top-k outputs (``batch["teacher_topk"]``), at the cache's
        temperature, as a sum over the counted positions (× T² when configured)."""
        assert self.view is not None, "call setup() first"
        cached = batch["teacher_topk"]
        heads, temperature = cached["heads"], float(cached["temperature"])
        if len(heads) != len(student_logits):
            raise ShapeMismatchError(
                f"the cache holds {len(heads)} heads but the student's view gives {len(student_logits)} logits"
            )
        view_mask = self.view.kd_mask(batch)
        strategy = self.cached_kd_strategy
        total = None
        for s_logits, head in zip(student_logits, heads, strict=True):
            mask = head["mask"] if view_mask is None else head["mask"] & view_mask.bool()
            topk = TopK(head["ids"], head["logprobs"], head["leftover"], temperature, cached["leftover_policy"])
            term = self.objective.kd_from(strategy, Logits(s_logits), topk, mask, temperature, batch)
            total = term.total if total is None else total + term.total
        assert total is not None  # at least one head
        return TermValue(total, strategy.unit)

    def projections_state(self) -> dict[str, torch.Tensor]:
        """The projections' weights, keyed by match name, for saving beside the student."""
        if self.module is None:
            return {}
        state = {}
        for key, projection in self.module.projections.items():
            for param_name, tensor in projection.state_dict().items():
                state[f"{self._projection_keys[key]}/{param_name}"] = tensor.detach().cpu().contiguous()
        return state


class MultiTeacherDistiller(Distiller):
    """Several frozen teachers: their distributions combined by fixed weights or per-example confidence.

    Intermediate matches name their teacher with ``teacher_index``.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module],
        objective: Objective,
        *,
        weights: Sequence[float] | None = None,
        combine: str = "fixed",
        view: View | None = None,
    ) -> None:
        if isinstance(teachers, nn.Module) or len(teachers) < 1:
            raise InvalidArgumentError("MultiTeacherDistiller takes a list of teacher models")
        super().__init__(
            student, list(teachers), objective, view=view, teacher_weights=weights, teacher_combine=combine
        )


def SupervisedTrainer(student: nn.Module, *, view: View | None = None) -> Distiller:
    """Plain fine-tuning on hard labels (training a teacher, or the no-distillation baseline)."""
    return Distiller(student, None, Objective(kd_weight=0.0, hard_weight=1.0), view=view)


def _first_dim(inputs: Mapping[str, Any]) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return 1


def _to_device(batch: Any, device: torch.device | str) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
