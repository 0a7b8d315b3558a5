"""``DistillationArguments``: ``transformers.TrainingArguments`` plus the distillation options, named like the YAML's.

Each distillation option has the name it has under ``distill:`` in a run's YAML (``kd_loss``, ``kd_weight``,
``hard_weight``, ``temperature``, ``t2_scaling``, ``kd_kwargs``, ...). The names these options had before
(``loss``, ``ce_weight``, ``scale_kd_by_t2``, ``divergence_kwargs``) are refused with the new name in the message.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import transformers

from kdistill.distillers.lm_cross import CROSS_TOKENIZER_METHODS
from kdistill.distillers.objective import Objective, Stage
from kdistill.errors import InvalidArgumentError, KdistillError
from kdistill.losses import LOSSES, check_kd_kwargs
from kdistill.losses._common import VOCAB_POLICIES
from kdistill.losses.sparse import LEFTOVER_POLICIES

TEACHER_DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")

#: the old argument names and the YAML's names that replaced them
RENAMED_ARGUMENTS: dict[str, str] = {
    "loss": "kd_loss",
    "ce_weight": "hard_weight",
    "scale_kd_by_t2": "t2_scaling",
    "divergence_kwargs": "kd_kwargs",
}


@dataclass
class DistillationArguments(transformers.TrainingArguments):
    """``TrainingArguments`` plus the distillation options of :class:`~kdistill.integrations.DistillationTrainer`.

    ``remove_unused_columns`` defaults to False here: ``labels`` and the prompt columns used for on-policy
    generation must reach ``compute_loss`` although the model's forward does not take them all.

    Args:
        kd_loss: a divergence registered in :data:`kdistill.losses.LOSSES` (or one of its aliases).
        temperature: softmax temperature of the divergence (> 0): a number or a schedule over the optimizer steps
            (``{"name": "linear", "start": 4.0, "end": 1.0}``, as ``distill.temperature`` in YAML, or its JSON text).
            Per-position temperatures (``flsw``, ``cwsm``) need both models' logits at every position and are
            refused here (the engine, :class:`~kdistill.distillers.Distiller`, has them).
        kd_weight: weight of the KD term (≥ 0), a number or a schedule.
        hard_weight: weight of the student's next-token cross-entropy on the labels (≥ 0), a number or a schedule;
            the two weights are not both 0 at every step.
        t2_scaling: multiply the KD term by T² (Hinton et al.), so its gradients keep their size when T changes.
        kd_kwargs: extra arguments of the divergence, e.g. ``{"beta": 0.5}`` or ``{"skew": 0.1}``.
        vocab_policy: ``"error"``, ``"truncate"`` or ``"pad"`` when student and teacher vocabularies differ.
        chunked_loss: compute the loss from final hidden states and LM heads ``chunk_size`` positions at a time,
            never materializing ``(tokens, vocab)`` logits (same values and gradients; far less memory).
        chunk_size: positions per chunk of the chunked loss.
        on_policy_fraction: λ of GKD (Agarwal et al., 2024): the probability that an optimizer step trains on
            sequences the student samples from the batch's prompts instead of the dataset's completions.
        on_policy_max_new_tokens: the most tokens the student samples per prompt.
        on_policy_temperature: the sampling temperature of the student's generations.
        teacher_dtype: dtype of the teacher (``"auto"``, ``"float32"``, ``"bfloat16"``, ...) when it is loaded from
            a path or hub id, or cast when it is given as a model; None keeps the loader's default or the model's.
        teacher_cache: a ``kdistill cache`` directory whose top-k teacher outputs stand in for the teacher (no
            ``teacher_model`` then). Training examples must carry ``cache_index``, their row in the cache
            (:func:`kdistill.cache.batches.with_cache_index` on the cached examples, in the cached order). The cache's
            temperature must be ``temperature``; on-policy steps are refused (the teacher never scored the
            student's samples).
        cache_leftover: what the teacher is outside its cached top-k: ``"renormalize"`` (compare on the top-k
            support) or ``"uniform"`` (the leftover mass spread over the other ids); see
            :mod:`kdistill.losses.sparse`.
        cross_tokenizer: ``"uld"`` or ``"align"`` when the teacher has another tokenizer (batches then carry its
            tokenization in ``batch["teacher"]``; ``"align"`` also needs ``completion_offsets``, from
            ``render_sft(..., offsets=True)``); see :mod:`kdistill.distillers.lm_cross`. The KD term is then the ULD
            distance, so ``kd_loss``, ``kd_kwargs`` and ``vocab_policy`` do not apply (the last two are refused
            if set); ``kd_weight`` and ``t2_scaling`` apply as usual. Not available with ``chunked_loss`` (the ULD
            distance sorts whole probability rows), on-policy steps (the student's samples have no teacher
            tokenization) or ``teacher_cache`` (a cache holds ids of the teacher's vocabulary and no completion
            offsets).
        stages: progressive distillation, as ``distill.stages``: ``{"steps": N or None, "weights": {"kd": ...,
            "hard": ...}}`` per stage, each weight a number or a schedule over the stage's own steps
            (:class:`~kdistill.distillers.Stage`).

    :meth:`objective` turns the options into the :class:`~kdistill.distillers.Objective` both backends optimize.

    Raises:
        InvalidArgumentError: a bad value (the message names the argument), or an old name (naming the new one).
    """

    kd_loss: str = field(default="forward_kl", metadata={"help": "Registered divergence name (or alias)."})
    # a number, or a schedule: a dict such as {"name": "linear", "start": 4.0, "end": 1.0} (or its JSON text)
    temperature: float | str | dict[str, Any] = field(default=1.0, metadata={"help": "Softmax temperature (> 0)."})
    kd_weight: float | str | dict[str, Any] = field(default=1.0, metadata={"help": "Weight of the KD term."})
    hard_weight: float | str | dict[str, Any] = field(
        default=0.0, metadata={"help": "Weight of the next-token cross-entropy term."}
    )
    t2_scaling: bool = field(default=True, metadata={"help": "Multiply the KD term by T²."})
    kd_kwargs: dict[str, Any] | None = field(default=None, metadata={"help": "Divergence arguments."})
    vocab_policy: str = field(default="error", metadata={"help": "error, truncate or pad."})
    chunked_loss: bool = field(default=False, metadata={"help": "Chunked loss from hidden states."})
    chunk_size: int = field(default=1024, metadata={"help": "Positions per chunk of the chunked loss."})
    on_policy_fraction: float = field(default=0.0, metadata={"help": "GKD λ: share of on-policy steps."})
    on_policy_max_new_tokens: int = field(default=64, metadata={"help": "Max new tokens of on-policy samples."})
    on_policy_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (on-policy)."})
    teacher_dtype: str | None = field(default=None, metadata={"help": "Teacher dtype (auto, bfloat16, ...)."})
    teacher_cache: str | None = field(default=None, metadata={"help": "kdistill cache directory (no teacher)."})
    cache_leftover: str = field(default="renormalize", metadata={"help": "renormalize or uniform."})
    cross_tokenizer: str | None = field(
        default=None, metadata={"help": "uld or align: a teacher with another tokenizer (None: one tokenizer)."}
    )
    stages: list[dict[str, Any]] | None = field(
        default=None, metadata={"help": "Progressive stages: [{'steps': N, 'weights': {'kd': 0.0}}, ...]."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: labels and prompt columns must reach compute_loss."}
    )

    def __post_init__(self) -> None:
        self._check_distillation_options()
        super().__post_init__()

    def _check_distillation_options(self) -> None:
        for name in ("temperature", "kd_weight", "hard_weight"):
            if isinstance(getattr(self, name), str):  # from a command line: a number or a schedule's JSON
                setattr(self, name, _schedule_from_text(name, getattr(self, name)))
        known = isinstance(self.kd_loss, str) and self.kd_loss in LOSSES
        if not known or LOSSES.entry(self.kd_loss).kind != "divergence":
            raise InvalidArgumentError(
                f"kd_loss={self.kd_loss!r} is not a registered divergence; choose one of "
                f"{', '.join(LOSSES.names(kind='divergence'))}"
            )
        for name in ("on_policy_fraction", "on_policy_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
        if self.vocab_policy not in VOCAB_POLICIES:
            raise InvalidArgumentError(
                f"vocab_policy={self.vocab_policy!r} is not one of {', '.join(map(repr, VOCAB_POLICIES))}"
            )
        for name in ("chunk_size", "on_policy_max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be an int ≥ 1, got {value!r}")
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            raise InvalidArgumentError(f"on_policy_fraction must be in [0, 1], got {self.on_policy_fraction!r}")
        if self.on_policy_temperature <= 0:
            raise InvalidArgumentError(f"on_policy_temperature must be > 0, got {self.on_policy_temperature!r}")
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise InvalidArgumentError(
                f"teacher_dtype={self.teacher_dtype!r} is not one of {', '.join(TEACHER_DTYPES)} or None"
            )
        if self.cache_leftover not in LEFTOVER_POLICIES:
            raise InvalidArgumentError(
                f"cache_leftover={self.cache_leftover!r} is not one of {', '.join(map(repr, LEFTOVER_POLICIES))}"
            )
        if self.teacher_cache is not None and not _is_number(self.temperature):
            raise InvalidArgumentError(
                f"temperature={self.temperature!r} cannot be a schedule with teacher_cache: the cached "
                "log-probabilities were computed at one temperature, the cache's; give that number"
            )
        if self.teacher_cache is not None and self.on_policy_fraction > 0:
            raise InvalidArgumentError(
                f"on_policy_fraction={self.on_policy_fraction!r} cannot be used with teacher_cache: the cache holds "
                "the teacher's outputs on the dataset's completions, and it never scored the student's own samples; "
                "set on_policy_fraction=0 or run the teacher live"
            )
        if self.cross_tokenizer is not None:
            self._check_cross_tokenizer()
        if self.kd_kwargs is not None:
            if not isinstance(self.kd_kwargs, Mapping):
                raise InvalidArgumentError(f"kd_kwargs must be a dict such as {{'beta': 0.5}}, got {self.kd_kwargs!r}")
            check_kd_kwargs(self.kd_loss, self.kd_kwargs)
        self._check_schedules()

    def _check_schedules(self) -> None:
        """Numbers in range, schedules that build, no per-position temperature, not both weights 0 throughout."""
        for name in ("temperature", "kd_weight", "hard_weight"):
            value = getattr(self, name)
            if _is_number(value):
                if not math.isfinite(value):
                    raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
                if value <= 0 if name == "temperature" else value < 0:
                    raise InvalidArgumentError(
                        f"{name} must be {'> 0' if name == 'temperature' else '≥ 0'}, got {value!r}"
                    )
            elif not isinstance(value, Mapping):
                raise InvalidArgumentError(
                    f"{name} must be a number or a schedule such as {{'name': 'linear', 'start': 1, 'end': 0}}, "
                    f"got {value!r}"
                )
        try:
            objective = self.objective()
        except KdistillError as error:
            raise InvalidArgumentError(f"the distillation schedule arguments: {error}") from None
        if objective.temperature.per_position is not None:
            raise InvalidArgumentError(
                f"temperature={self.temperature!r}: per-position temperatures (flsw, cwsm) need both models' logits "
                "at every position, which DistillationTrainer does not keep (its chunked path never builds them); "
                "give a number or a schedule, or use the engine (training.backend: engine)"
            )
        if not objective.active_terms():
            raise InvalidArgumentError("kd_weight and hard_weight are both 0, so there is nothing to train on")

    def objective(self) -> Objective:
        """The :class:`~kdistill.distillers.Objective` of these arguments (KD term, hard-label term, stages).

        ``vocab_policy`` stays apart (the LM losses take it as an argument), so ``kd_kwargs`` are the divergence's.
        """
        if self.stages is not None and not (
            isinstance(self.stages, (list, tuple)) and all(isinstance(stage, Mapping) for stage in self.stages)
        ):
            raise InvalidArgumentError(
                f"stages must be a list of dicts such as {{'steps': 10, 'weights': {{'kd': 0.0}}}}, got "
                f"{self.stages!r}"
            )
        stages = []
        for index, stage in enumerate(self.stages or []):
            unknown = sorted(set(stage) - {"steps", "weights"})
            if unknown:
                raise InvalidArgumentError(f"stages[{index}] has {unknown[0]!r}; a stage has 'steps' and 'weights'")
            stages.append(Stage(steps=stage.get("steps"), weights=dict(stage.get("weights") or {})))
        return Objective(
            kd_loss=self.kd_loss,
            kd_weight=self.kd_weight,
            hard_weight=self.hard_weight,
            temperature=self.temperature,
            t2_scaling=self.t2_scaling,
            kd_kwargs=self.kd_kwargs,
            stages=stages or None,
        )

    def _check_cross_tokenizer(self) -> None:
        """What ``cross_tokenizer`` cannot be combined with, refused by name (each would be silently wrong)."""
        if self.cross_tokenizer not in CROSS_TOKENIZER_METHODS:
            raise InvalidArgumentError(
                f"cross_tokenizer={self.cross_tokenizer!r} is not one of "
                f"{', '.join(map(repr, CROSS_TOKENIZER_METHODS))} or None"
            )
        why = {
            "chunked_loss": "the ULD distance sorts whole probability rows, so it needs the logits; set "
            "chunked_loss=False",
            "on_policy_fraction": "the student's samples have no teacher tokenization to compare with; set "
            "on_policy_fraction=0",
            "teacher_cache": "a cache holds ids of the teacher's vocabulary and no completion offsets; run the "
            "teacher live",
            "kd_kwargs": "the KD term is the ULD distance, which takes none; remove them",
            "vocab_policy": "it maps one shared vocabulary's ids, and the two vocabularies have no shared ids; "
            "leave it at 'error'",
        }
        given = {
            "chunked_loss": self.chunked_loss,
            "on_policy_fraction": self.on_policy_fraction > 0,
            "teacher_cache": self.teacher_cache is not None,
            "kd_kwargs": bool(self.kd_kwargs),
            "vocab_policy": self.vocab_policy != "error",
        }
        for name, used in given.items():
            if used:
                raise InvalidArgumentError(
                    f"{name}={getattr(self, name)!r} cannot be used with cross_tokenizer={self.cross_tokenizer!r}: "
                    f"{why[name]}"
                )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _schedule_from_text(name: str, text: str) -> float | dict[str, Any]:
    """A number or schedule given as text (a command line's ``--kd_weight '{"name": "linear", ...}'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {"name": text}  # a schedule's bare name, e.g. "flsw" (refused) or an unknown name (named by the error)
    if _is_number(value) or isinstance(value, dict):
        return value
    raise InvalidArgumentError(f"{name}={text!r} is neither a number nor a schedule dict")


def _refusing_old_names(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` that first refuses the old argument names, each with the name that replaced it."""

    @functools.wraps(init)
    def __init__(self: DistillationArguments, *args: Any, **kwargs: Any) -> None:
        for old, new in RENAMED_ARGUMENTS.items():
            if old in kwargs:
                raise InvalidArgumentError(
                    f"DistillationArguments({old}=...) is now {new}= (the name distill.{new} has in a run's YAML); "
                    f"pass {new}={kwargs[old]!r}"
                )
        init(self, *args, **kwargs)

    return __init__


DistillationArguments.__init__ = _refusing_old_names(DistillationArguments.__init__)  # type: ignore[method-assign]
