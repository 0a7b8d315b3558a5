"""Where a feature lives in a model: the transformer block list, and feature specs resolved to module paths.

A feature spec is a short string from a config or a layer map:

* ``"layer N"`` — for ``feature="hidden"``: the hidden state after transformer block ``N`` counting from 1, i.e.
  Hugging Face's ``hidden_states[N]``; ``"layer 0"`` (or ``"embeddings"``) is the embeddings output
  (``hidden_states[0]``), captured as the input of the first block. For ``feature="attention"``: the attention
  probabilities of block ``N`` (``attentions[N - 1]``), ``N >= 1``.
* ``"last"`` — ``"layer L"`` for a model with ``L`` blocks. As in Hugging Face's ``hidden_states[L]``, this is the
  base model's ``last_hidden_state``, so pre-norm models (Llama, Qwen, GPT-2) include their final norm; the raw
  output of the last block is the module path ``"model.layers.<L-1>"``.
* ``"logits"`` — the model's output logits.
* a dotted module path (``"bert.encoder.layer.3"``, ``"lstm"``) — that module's output (its first tensor when the
  output is a tuple or a ``ModelOutput``), or with the suffix ``":input"`` its input (first positional tensor, or
  the ``hidden_states`` keyword).

Nothing here edits a model; :mod:`kdistill.features.taps` captures resolved features with forward hooks.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from kdistill.errors import InvalidArgumentError

FeatureKind = Literal["hook", "attention", "logits"]
Capture = Literal["output", "input"]

FEATURE_KINDS: tuple[str, ...] = ("hidden", "attention")  # what a "layer N" spec can mean
SOURCE_KINDS: tuple[str, ...] = ("hook", "attention", "logits")
CAPTURES: tuple[str, ...] = ("output", "input")

# Block lists of common architectures, tried in order before the generic fallback.
KNOWN_BLOCK_PATHS: tuple[str, ...] = (
    "bert.encoder.layer",  # BERT heads
    "roberta.encoder.layer",
    "electra.encoder.layer",
    "deberta.encoder.layer",
    "encoder.layer",  # bare BertModel / RobertaModel
    "distilbert.transformer.layer",
    "transformer.layer",  # bare DistilBertModel
    "model.layers",  # Llama, Qwen, Mistral, Gemma, Phi heads
    "layers",  # bare LlamaModel and friends
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "h",  # bare GPT2Model
    "gpt_neox.layers",
    "model.decoder.layers",  # OPT, BART (decoder)
    "decoder.layers",
)

_LAYER_SPEC = re.compile(r"^layer[\s_]*(-?\d+)$", re.IGNORECASE)


class FeatureSpecError(InvalidArgumentError):
    """A feature spec does not resolve on a model, or a resolved feature could not be captured."""


@dataclass(frozen=True)
class FeatureSource:
    """A feature spec resolved against one model.

    Attributes:
        kind: ``"hook"`` (captured by a forward hook on ``path``), ``"attention"`` (picked from the model's
            ``outputs.attentions[layer - 1]``) or ``"logits"`` (the model's output logits).
        path: dotted module path of a ``"hook"`` source (``""`` is the model itself); empty for other kinds.
        capture: ``"output"`` (forward hook) or ``"input"`` (forward pre-hook) of the module at ``path``.
        layer: ``N`` of a ``"layer N"`` spec (``"embeddings"`` is 0, ``"last"`` is ``L``); None for paths and logits.
        spec: the spec as the user wrote it, for messages.
    """

    kind: FeatureKind
    path: str = ""
    capture: Capture = "output"
    layer: int | None = None
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise InvalidArgumentError(f"FeatureSource kind must be one of {SOURCE_KINDS}, got {self.kind!r}")
        if self.capture not in CAPTURES:
            raise InvalidArgumentError(f"FeatureSource capture must be one of {CAPTURES}, got {self.capture!r}")
        if self.kind == "attention" and (self.layer is None or self.layer < 1):
            raise InvalidArgumentError(f"an attention FeatureSource needs layer >= 1, got {self.layer!r}")


# ---------------------------------------------------------------- block list


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def find_block_list(model: nn.Module) -> tuple[str, int]:
    """The module path of the ``nn.ModuleList`` that holds the model's transformer blocks, and how many it holds.

    Known paths of common architectures are tried first (``bert.encoder.layer``, ``model.layers``,
    ``transformer.h``, ...); otherwise the largest ``nn.ModuleList`` whose children all share one class wins (the
    first one met on a tie).

    Raises:
        FeatureSpecError: the model has no such list (an LSTM, say); module paths still work for it.
    """
    for path in KNOWN_BLOCK_PATHS:
        module = _submodule(model, path)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, len(module)
    best_path, best_count = "", 0
    for path, module in model.named_modules():
        is_block_list = isinstance(module, nn.ModuleList) and len({type(child) for child in module}) == 1
        if is_block_list and len(module) > best_count:
            best_path, best_count = path, len(module)
    if best_count == 0:
        raise FeatureSpecError(
            f"{type(model).__name__} has no list of transformer blocks (an nn.ModuleList of one block class), "
            "so 'layer N' specs cannot be resolved; name features by module path instead (e.g. 'lstm')"
        )
    return best_path, best_count


def num_layers(model: nn.Module) -> int:
    """The number of transformer blocks ``L`` of ``model``; hidden-state specs run from ``layer 0`` to ``layer L``."""
    return find_block_list(model)[1]


def _final_hidden_path(model: nn.Module, blocks_path: str) -> str | None:
    """Path of the Hugging Face base model owning the blocks, whose ``last_hidden_state`` is ``hidden_states[L]``.

    None when there is no such base model (plain PyTorch models) or its config says the last hidden state is not
    tied to the final output (``tie_last_hidden_states=False``, some vision models): then ``layer L`` is the last
    block's output.
    """
    parts = blocks_path.split(".")
    for end in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:end])
        module = _submodule(model, prefix)
        is_base_model = (
            module is not None
            and hasattr(module, "config")
            and isinstance(getattr(module, "base_model_prefix", None), str)
            and getattr(module, "base_model", None) is module
        )
        if is_base_model:
            return None if getattr(module.config, "tie_last_hidden_states", None) is False else prefix
    return None


# ---------------------------------------------------------------- specs


def _unknown_path_error(model: nn.Module, path: str, spec: str) -> FeatureSpecError:
    names = [name for name, _ in model.named_modules() if name]
    close = difflib.get_close_matches(path, names, n=3, cutoff=0.6)
    if close:
        hint = "did you mean " + " or ".join(repr(name) for name in close) + "?"
    else:
        parts = path.split(".")
        parent = ""
        for end in range(len(parts) - 1, 0, -1):  # the deepest prefix that exists
            if _submodule(model, ".".join(parts[:end])) is not None:
                parent = ".".join(parts[:end])
                break
        children = [name for name, _ in (model.get_submodule(parent) if parent else model).named_children()]
        where = f"{parent!r}" if parent else "the model"
        hint = f"children of {where}: {', '.join(children) if children else '(none)'}"
    return FeatureSpecError(
        f"feature spec {spec!r}: {type(model).__name__} has no module {path!r}; {hint} "
        "(other specs: 'layer N', 'embeddings', 'last', 'logits')"
    )


def _layer_source(model: nn.Module, number: int, feature: str, spec: str) -> FeatureSource:
    blocks_path, count = find_block_list(model)
    low = 1 if feature == "attention" else 0
    if not low <= number <= count:
        what = "attention maps exist for" if feature == "attention" else "hidden states exist for"
        raise FeatureSpecError(
            f"feature spec {spec!r}: layer {number} is out of range; {type(model).__name__} has {count} layers, "
            f"so {feature} {what} layers {low}..{count}"
        )
    if feature == "attention":
        return FeatureSource(kind="attention", layer=number, spec=spec)
    if number == 0:  # the embeddings output is what enters the first block
        return FeatureSource(kind="hook", path=f"{blocks_path}.0", capture="input", layer=0, spec=spec)
    if number == count:
        final_path = _final_hidden_path(model, blocks_path)
        if final_path is not None:
            return FeatureSource(kind="hook", path=final_path, capture="output", layer=number, spec=spec)
    return FeatureSource(kind="hook", path=f"{blocks_path}.{number - 1}", capture="output", layer=number, spec=spec)


def resolve_feature(model: nn.Module, spec: str | int | FeatureSource, feature: str = "hidden") -> FeatureSource:
    """Resolve a feature spec (see the module docstring) against ``model``.

    Args:
        model: the model whose feature is wanted.
        spec: ``"layer N"`` (or the int ``N``), ``"embeddings"``, ``"last"``, ``"logits"``, or a dotted module path
            optionally suffixed ``":input"`` / ``":output"``; a :class:`FeatureSource` is returned as it is.
        feature: what ``"layer N"``, ``"embeddings"`` and ``"last"`` mean: ``"hidden"`` (hidden states, shape
            ``(B, T, H)``) or ``"attention"`` (attention probabilities, shape ``(B, heads, T, T)``).

    Raises:
        FeatureSpecError: a layer out of range (naming it and the model's layer count), an unknown module path
            (suggesting the closest module names), or a spec that makes no sense for ``feature``.
    """
    if isinstance(spec, FeatureSource):
        return spec
    if feature not in FEATURE_KINDS:
        raise FeatureSpecError(f"feature must be one of {FEATURE_KINDS}, got {feature!r}")
    if isinstance(spec, int) and not isinstance(spec, bool):
        return _layer_source(model, spec, feature, f"layer {spec}")
    if not isinstance(spec, str) or not spec.strip():
        raise FeatureSpecError(f"a feature spec must be a non-empty string or a layer number, got {spec!r}")
    text = spec.strip()
    if text.lower() == "logits":
        return FeatureSource(kind="logits", spec=spec)

    base, capture = text, "output"
    for suffix in CAPTURES:
        if text.lower().endswith(f":{suffix}"):
            base, capture = text[: -len(suffix) - 1].strip(), suffix
    layer_match = _LAYER_SPEC.match(base)
    named_layer = base.lower() in ("embeddings", "last")
    if layer_match or named_layer:
        if base != text:
            raise FeatureSpecError(
                f"feature spec {spec!r}: ':{capture}' applies to module paths only; the input of block N is "
                f"'layer N-1'"
            )
        if layer_match:
            number = int(layer_match.group(1))
        elif base.lower() == "embeddings":
            number = 0
        else:
            number = num_layers(model)
        if feature == "attention" and base.lower() == "embeddings":
            raise FeatureSpecError(
                f"feature spec {spec!r}: the embeddings have no attention map; use 'layer N', N >= 1"
            )
        return _layer_source(model, number, feature, spec)

    if not base or _submodule(model, base) is None:
        raise _unknown_path_error(model, base, spec)
    return FeatureSource(kind="hook", path=base, capture=capture, spec=spec)
