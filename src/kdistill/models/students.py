"""Students: cut from the teacher, shrunk from its config, recurrent, or loaded from disk.

* :func:`from_teacher` — the teacher's class and config with fewer blocks; the embeddings, the chosen blocks and
  the head copied as initialization (DistilBERT's recipe). BERT-like encoders and Llama/Qwen-like decoders.
* :func:`shrink` — the teacher's architecture at new sizes, randomly initialized.
* :class:`~kdistill.models.birnn.BiRNNClassifier` — a bidirectional LSTM/GRU for sequence or token classification
  (Tang et al. 2019), over the teacher's vocabulary (its embeddings copied when the sizes agree) or a
  :class:`WordTokenizer`'s.
* :func:`build_student` — one entry point naming any of these (and ``"pretrained"``: a model saved on disk).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.data.word_tokenizer import WordTokenizer
from kdistill.errors import InvalidArgumentError, KdistillError, UnknownNameError
from kdistill.features import find_block_list
from kdistill.models.birnn import BiRNNClassifier, BiRNNConfig
from kdistill.models.loading import load_model

STUDENT_KINDS: tuple[str, ...] = ("from_teacher", "shrink", "bilstm", "bigru", "pretrained")
# task name → the transformers Auto class a "pretrained" student is loaded with
AUTO_CLASSES: dict[str, str] = {
    "sequence": "AutoModelForSequenceClassification",
    "token": "AutoModelForTokenClassification",
    "qa": "AutoModelForQuestionAnswering",
    "causal_lm": "AutoModelForCausalLM",
}


# ---------------------------------------------------------------- transformer students


def from_teacher(teacher: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A student of the teacher's class keeping only the blocks ``layers``, initialized from the teacher.

    The student's config is the teacher's with ``num_hidden_layers = len(layers)`` (and per-layer config lists such
    as ``layer_types`` cut to the kept blocks). Every weight outside the block list (embeddings, pooler, final norm,
    classification head or LM head) is copied; student block ``j`` gets teacher block ``layers[j]``.

    Args:
        teacher: a Hugging Face model (``bert``/``roberta``/... encoders, ``llama``/``qwen2``/... causal LMs, with or
            without a task head).
        layers: 0-based teacher block indices, e.g. ``[0, 5]`` (distinct; kept in the order given).

    Returns:
        the student, on the teacher's device and dtype, in training mode.

    Raises:
        InvalidArgumentError: ``layers`` empty, repeated, or an index outside ``0..L-1`` (naming it and the teacher's
            layer count ``L``); a teacher without a ``config``.
    """
    config = _config_of(teacher, "from_teacher")
    blocks_path, count = find_block_list(teacher)
    chosen = _check_layers(layers, count, type(teacher).__name__)
    student_config = copy.deepcopy(config)
    student_config.num_hidden_layers = len(chosen)
    for key, value in _per_layer_lists(config, count).items():
        setattr(student_config, key, type(value)(value[index] for index in chosen))
    student = _build(type(teacher), student_config, _dtype_of(teacher))
    new_index = {teacher_index: student_index for student_index, teacher_index in enumerate(chosen)}
    prefix = blocks_path + "."
    state: dict[str, torch.Tensor] = {}
    for key, tensor in teacher.state_dict().items():
        if key.startswith(prefix):
            block, _, rest = key[len(prefix) :].partition(".")
            if int(block) not in new_index:
                continue
            key = f"{prefix}{new_index[int(block)]}.{rest}"
        state[key] = tensor
    result = student.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise KdistillError(
            f"copying {type(teacher).__name__} weights into its cut-down copy failed: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if getattr(teacher, "generation_config", None) is not None and hasattr(student, "generation_config"):
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.to(_device_of(teacher))


def shrink(
    teacher_or_config: Any,
    *,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    num_heads: int | None = None,
    intermediate_size: int | None = None,
    seed: int = 0,
    model_class: type[nn.Module] | None = None,
) -> nn.Module:
    """The teacher's architecture (class, vocabulary, head) at new sizes, randomly initialized with ``seed``.

    Sizes left None keep the teacher's, except ``intermediate_size``, which scales with ``hidden_size`` when only
    the latter changes. Grouped-query models keep their query-to-key/value head ratio where it divides the new
    head count (else one key/value head per query head); ``head_dim`` follows ``hidden_size / num_heads``.

    Args:
        teacher_or_config: a Hugging Face model, or a config (then the class is ``model_class``, else the config's
            ``architectures[0]``, else ``AutoModel``).
        num_layers: transformer blocks.
        hidden_size: model width; divisible by the number of heads.
        num_heads: attention heads.
        intermediate_size: feed-forward width (only for configs that have one).
        seed: seed of the random initialization (the global random state is left untouched).
        model_class: the class to build when ``teacher_or_config`` is a config.

    Raises:
        InvalidArgumentError: a size that is not a positive integer, ``hidden_size`` not divisible by the heads
            (naming both), or ``intermediate_size`` for a config without one.
    """
    import transformers

    if isinstance(teacher_or_config, transformers.PretrainedConfig):
        config = copy.deepcopy(teacher_or_config)
        cls = model_class or _class_from_config(config)
        dtype = torch.get_default_dtype()
    else:
        config = copy.deepcopy(_config_of(teacher_or_config, "shrink"))
        cls = model_class or type(teacher_or_config)
        dtype = _dtype_of(teacher_or_config)
    for name, value in (
        ("num_layers", num_layers),
        ("hidden_size", hidden_size),
        ("num_heads", num_heads),
        ("intermediate_size", intermediate_size),
    ):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InvalidArgumentError(f"shrink: {name} must be a positive integer, got {value!r}")
    old_layers = int(config.num_hidden_layers)
    old_hidden, old_heads = int(config.hidden_size), int(config.num_attention_heads)
    new_hidden = hidden_size or old_hidden
    new_heads = num_heads or old_heads
    if new_hidden % new_heads:
        raise InvalidArgumentError(
            f"shrink: hidden_size {new_hidden} is not divisible by num_heads {new_heads}; choose sizes that divide"
        )
    if num_layers is not None:
        for key, value in _per_layer_lists(config, old_layers).items():
            setattr(config, key, type(value)(value[index % len(value)] for index in range(num_layers)))
        config.num_hidden_layers = num_layers
    config.hidden_size, config.num_attention_heads = new_hidden, new_heads
    has_intermediate = isinstance(getattr(config, "intermediate_size", None), int)
    if intermediate_size is not None and not has_intermediate:
        raise InvalidArgumentError(f"shrink: {type(config).__name__} has no intermediate_size to set")
    if intermediate_size is not None:
        config.intermediate_size = intermediate_size
    elif has_intermediate and new_hidden != old_hidden:
        config.intermediate_size = max(1, round(config.intermediate_size * new_hidden / old_hidden))
    old_kv = getattr(config, "num_key_value_heads", None)
    if isinstance(old_kv, int) and new_heads != old_heads:
        group = max(old_heads // old_kv, 1)
        config.num_key_value_heads = new_heads // group if new_heads % group == 0 else new_heads
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = new_hidden // new_heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(cls, config, dtype)


def _config_of(model: Any, what: str) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise InvalidArgumentError(
            f"{what}: the teacher ({type(model).__name__}) has no Hugging Face config with num_hidden_layers"
        )
    return config


def _check_layers(layers: Sequence[int], count: int, name: str) -> list[int]:
    chosen = list(layers)
    if not chosen:
        raise InvalidArgumentError(f"layers is empty; pick 0-based blocks of the teacher ({name} has {count} layers)")
    for position, index in enumerate(chosen):
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
            raise InvalidArgumentError(
                f"layers[{position}] = {index!r} is not a block of the teacher: {name} has {count} layers, "
                f"indexed 0..{count - 1}"
            )
    if len(set(chosen)) != len(chosen):
        raise InvalidArgumentError(f"layers {chosen} repeat a block; each teacher block can be copied once")
    return chosen


def _per_layer_lists(config: Any, count: int) -> dict[str, list[Any] | tuple[Any, ...]]:
    """Config entries holding one value per block (``layer_types``, ``no_rope_layers``, ...)."""
    return {
        key: value
        for key, value in vars(config).items()
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == count
    }


def _class_from_config(config: Any) -> type[nn.Module]:
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel._model_mapping[type(config)]


def _dtype_of(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.get_default_dtype()


def _device_of(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build(cls: type[nn.Module], config: Any, dtype: torch.dtype) -> nn.Module:
    with _default_dtype(dtype):
        model = cls(config)
    return model.to(dtype)


def uniform_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """``student_layers`` teacher blocks spread evenly, the last one included: 12 → 6 gives [1, 3, 5, 7, 9, 11]."""
    if not 1 <= student_layers <= teacher_layers:
        raise InvalidArgumentError(
            f"num_layers must be between 1 and the teacher's {teacher_layers} layers, got {student_layers}"
        )
    return [round((index + 1) * teacher_layers / student_layers) - 1 for index in range(student_layers)]


# ---------------------------------------------------------------- one entry point


def build_student(
    kind: str,
    teacher: nn.Module | None,
    *,
    layers: Sequence[int] | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    num_heads: int | None = None,
    intermediate_size: int | None = None,
    rnn: str | None = None,
    embedding_dim: int | None = None,
    vocab: Any = "teacher",
    task: str = "sequence",
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    dropout: float = 0.1,
    pooling: str = "mean",
    path: str | Path | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build a student by kind.

    Args:
        kind: ``"from_teacher"`` (``layers``, or ``num_layers`` spread evenly with :func:`uniform_layers`),
            ``"shrink"`` (``num_layers``/``hidden_size``/``num_heads``/``intermediate_size``), ``"bilstm"`` /
            ``"bigru"`` (a :class:`BiRNNClassifier`), or ``"pretrained"`` (a model saved at ``path``).
        teacher: the teacher model (unused by ``"pretrained"``).
        layers: ``from_teacher``: 0-based teacher blocks to keep.
        num_layers: blocks (``from_teacher``, ``shrink``) or recurrent layers (BiRNN, default 1).
        hidden_size: width (``shrink``) or per-direction state size (BiRNN, default 300).
        num_heads: ``shrink``: attention heads.
        intermediate_size: ``shrink``: feed-forward width.
        rnn: BiRNN cell, ``"lstm"`` or ``"gru"``; must agree with ``kind`` when given.
        embedding_dim: BiRNN word-vector size; defaults to the teacher's embedding size when ``vocab="teacher"``
            (its embeddings are then copied), else 300.
        vocab: BiRNN vocabulary: ``"teacher"`` (the teacher's token ids), a :class:`WordTokenizer` (its own ids),
            or an int vocabulary size.
        task: ``"sequence"`` or ``"token"`` for a BiRNN; the Auto class of ``"pretrained"``
            (``"sequence"``, ``"token"``, ``"qa"``, ``"causal_lm"``).
        num_labels: classes; BiRNN default: the teacher's ``config.num_labels``.
        label_names: BiRNN class names (stored in its config).
        dropout: BiRNN dropout.
        pooling: BiRNN pooling for sequence tasks, ``"mean"`` or ``"max"``.
        path: ``"pretrained"``: the directory to load (a Hugging Face model or a saved BiRNN).
        seed: seed of random initialization (``shrink``, BiRNN).

    Raises:
        UnknownNameError: an unknown ``kind`` (listing the kinds) or ``task``.
        InvalidArgumentError: a missing or contradictory argument, naming it.
    """
    if kind not in STUDENT_KINDS:
        raise UnknownNameError(f"unknown student kind {kind!r}; known kinds: {', '.join(STUDENT_KINDS)}")
    if kind == "pretrained":
        return _load_pretrained(path, task, num_labels)
    if teacher is None:
        raise InvalidArgumentError(f"student kind {kind!r} needs the teacher model")
    if hasattr(teacher, "peft_config") and hasattr(teacher, "merge_and_unload"):
        # a LoRA-tuned teacher: the student starts from the tuned weights (the adapter merged into a copy; the
        # teacher itself keeps its adapter)
        teacher = copy.deepcopy(teacher).merge_and_unload()
    if kind == "from_teacher":
        if layers is None:
            if num_layers is None:
                raise InvalidArgumentError("student kind 'from_teacher' needs layers (or num_layers)")
            layers = uniform_layers(find_block_list(teacher)[1], num_layers)
        return from_teacher(teacher, layers)
    if kind == "shrink":
        return shrink(
            teacher,
            num_layers=num_layers,
            hidden_size=hidden_size,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            seed=seed,
        )
    cell = "lstm" if kind == "bilstm" else "gru"
    if rnn is not None and rnn != cell:
        raise InvalidArgumentError(f"rnn={rnn!r} contradicts student kind {kind!r} (which uses {cell!r})")
    return _build_birnn(
        teacher,
        cell=cell,
        vocab=vocab,
        task=task,
        num_labels=num_labels,
        label_names=label_names,
        embedding_dim=embedding_dim,
        hidden_size=hidden_size or 300,
        num_layers=num_layers or 1,
        dropout=dropout,
        pooling=pooling,
        seed=seed,
    )


def _build_birnn(
    teacher: nn.Module,
    *,
    cell: str,
    vocab: Any,
    task: str,
    num_labels: int | None,
    label_names: Sequence[str] | None,
    embedding_dim: int | None,
    hidden_size: int,
    num_layers: int,
    dropout: float,
    pooling: str,
    seed: int,
) -> BiRNNClassifier:
    teacher_config = getattr(teacher, "config", None)
    teacher_embedding = None
    pad_token_id = 0
    if isinstance(vocab, str) and vocab == "teacher":
        get_embeddings = getattr(teacher, "get_input_embeddings", None)
        teacher_embedding = get_embeddings() if callable(get_embeddings) else None
        if not isinstance(teacher_embedding, nn.Embedding):
            raise InvalidArgumentError("vocab='teacher' needs a teacher with get_input_embeddings()")
        vocab_size = teacher_embedding.num_embeddings
        pad_token_id = getattr(teacher_config, "pad_token_id", None) or 0
        embedding_dim = embedding_dim or teacher_embedding.embedding_dim
    elif isinstance(vocab, WordTokenizer):
        vocab_size, pad_token_id = vocab.vocab_size, vocab.pad_token_id
    elif isinstance(vocab, int) and not isinstance(vocab, bool):
        vocab_size = vocab
    else:
        raise InvalidArgumentError(f"vocab must be 'teacher', a WordTokenizer or a vocabulary size, got {vocab!r}")
    if num_labels is None:
        num_labels = len(label_names) if label_names else getattr(teacher_config, "num_labels", None)
        if num_labels is None:
            raise InvalidArgumentError("num_labels is needed: the teacher's config does not say how many labels")
    config = BiRNNConfig(
        vocab_size=vocab_size,
        num_labels=num_labels,
        embedding_dim=embedding_dim or 300,
        hidden_size=hidden_size,
        num_layers=num_layers,
        rnn=cell,
        dropout=dropout,
        pooling=pooling,
        task=task,
        pad_token_id=pad_token_id,
        label_names=list(label_names) if label_names is not None else None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BiRNNClassifier(config)
    if teacher_embedding is not None and teacher_embedding.embedding_dim == config.embedding_dim:
        with torch.no_grad():
            model.embedding.weight.copy_(teacher_embedding.weight.detach().float())
    return model


def _load_pretrained(path: str | Path | None, task: str, num_labels: int | None) -> nn.Module:
    """A saved model (Hugging Face, or a kdistill BiRNN) through the one loader (:mod:`kdistill.models.loading`)."""
    import transformers  # imported when a pretrained student is asked for

    if path is None:
        raise InvalidArgumentError("student kind 'pretrained' needs path (a directory saved with save_pretrained)")
    if task not in AUTO_CLASSES:
        raise UnknownNameError(
            f"unknown task {task!r} for a pretrained student; known tasks: {', '.join(AUTO_CLASSES)}"
        )
    auto_class = getattr(transformers, AUTO_CLASSES[task])
    return load_model(str(path), auto_class, "path", num_labels=num_labels)
