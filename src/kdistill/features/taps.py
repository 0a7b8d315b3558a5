"""Capture named features of a model during its ordinary forward pass, with forward hooks and no model edits.

Two steps, because attention maps and logits come out of the forward's outputs rather than from a hook::

    with FeatureTap(model, {"h2": "layer 2", "att2": "layer 2"}, feature_kinds={"att2": "attention"}) as tap:
        outputs = model(**inputs, **tap.model_kwargs)  # model_kwargs asks for output_attentions when needed
        features = tap.collect(outputs)  # {"h2": (B, T, H), "att2": (B, heads, T, T)}

:func:`extract_features` does all of it in one call. Hooks are registered in ``__enter__`` and removed in
``__exit__``, also when the forward raises. Captured tensors are the model's own tensors (neither detached nor
copied), so a student's features keep their graph; run the teacher under ``torch.no_grad()`` yourself.

Attention maps exist only with eager attention. When an attention feature is requested and the model runs
another implementation (``sdpa``, flash), the tap switches it to ``"eager"`` with ``set_attn_implementation`` for
the duration of the block and restores it on exit; a model that cannot switch gets a :class:`FeatureSpecError`
telling the user to load it with ``attn_implementation="eager"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from kdistill.features.layers import FeatureSource, FeatureSpecError, resolve_feature

FeatureSpec = str | int | FeatureSource
Adaptor = Callable[[Mapping[str, Any], Any], Mapping[str, torch.Tensor]]


def model_kwargs_for(sources: Mapping[str, FeatureSource] | Iterable[FeatureSource]) -> dict[str, Any]:
    """Keyword arguments the forward needs so that ``sources`` can be collected: ``output_attentions`` or nothing.

    Hidden states never need ``output_hidden_states=True``: hooks capture exactly the requested ones.
    """
    values = sources.values() if isinstance(sources, Mapping) else sources
    return {"output_attentions": True} if any(source.kind == "attention" for source in values) else {}


def _first_tensor(value: Any) -> torch.Tensor | None:
    """``value`` if a tensor, else the first tensor in a tuple, list or mapping (``ModelOutput``), depth first."""
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _input_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """A module's main input: the first positional tensor, else the ``hidden_states`` keyword, else a lone tensor."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    positional = [arg for arg in args if isinstance(arg, torch.Tensor)]
    if positional:
        return positional[0]
    keyword = [value for value in kwargs.values() if isinstance(value, torch.Tensor)]
    return keyword[0] if len(keyword) == 1 else None


def _output_field(outputs: Any, name: str) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return getattr(outputs, name, None)


class FeatureTap:
    """A context manager that captures named features of ``model`` during the forward passes run inside it.

    Args:
        model: the model to tap; it is not modified (hooks only, and an attention implementation switched back).
        sources: feature name → spec (see :func:`~kdistill.features.resolve_feature`) or :class:`FeatureSource`.
        feature_kinds: what ``"layer N"`` specs mean: ``"hidden"`` or ``"attention"``, one for all names or a
            mapping name → kind (names left out are ``"hidden"``).

    Attributes:
        sources: the resolved sources, by name.
        features: name → captured tensor; hook features appear during the forward, attention maps and logits after
            :meth:`collect`. A module called several times in one forward keeps its last call.
    """

    def __init__(
        self,
        model: nn.Module,
        sources: Mapping[str, FeatureSpec],
        feature_kinds: str | Mapping[str, str] = "hidden",
    ) -> None:
        self.model = model
        kinds = feature_kinds if isinstance(feature_kinds, Mapping) else dict.fromkeys(sources, feature_kinds)
        unknown = sorted(set(kinds) - set(sources))
        if unknown:
            raise FeatureSpecError(f"feature_kinds names {unknown} that are not among the sources {sorted(sources)}")
        self.sources: dict[str, FeatureSource] = {
            name: resolve_feature(model, spec, kinds.get(name, "hidden")) for name, spec in sources.items()
        }
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._active = False
        self._restore_attn_implementation: str | None = None

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments to pass to the forward (``output_attentions=True`` when attention is requested)."""
        return model_kwargs_for(self.sources)

    def __enter__(self) -> FeatureTap:
        if self._active:
            raise FeatureSpecError("this FeatureTap is already active; nest two taps instead of entering one twice")
        self.features = {}
        self._active = True
        try:
            by_module: dict[tuple[str, str], list[str]] = {}
            for name, source in self.sources.items():
                if source.kind == "hook":
                    by_module.setdefault((source.path, source.capture), []).append(name)
            for (path, capture), names in by_module.items():
                module = self.model.get_submodule(path)
                if capture == "input":
                    hook = self._input_hook(path, names)
                    self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    self._handles.append(module.register_forward_hook(self._output_hook(path, names)))
            if any(source.kind == "attention" for source in self.sources.values()):
                self._switch_to_eager_attention()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._close()

    def _close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._restore_attn_implementation is not None:
            self.model.set_attn_implementation(self._restore_attn_implementation)
            self._restore_attn_implementation = None
        self._active = False

    def _output_hook(self, path: str, names: list[str]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is None:
                raise FeatureSpecError(
                    f"module {path!r} returned {type(output).__name__} with no tensor in it; pass an adaptor instead"
                )
            for name in names:
                self.features[name] = tensor

        return hook

    def _input_hook(self, path: str, names: list[str]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            tensor = _input_tensor(args, kwargs)
            if tensor is None:
                raise FeatureSpecError(
                    f"module {path!r} got no positional tensor and no 'hidden_states' keyword, so its input "
                    f"cannot be captured (keywords: {sorted(kwargs)}); pass an adaptor instead"
                )
            for name in names:
                self.features[name] = tensor

        return hook

    def _switch_to_eager_attention(self) -> None:
        config = getattr(self.model, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if current is None or current == "eager":  # not a Hugging Face model, or already eager
            return
        setter = getattr(self.model, "set_attn_implementation", None)
        if callable(setter):
            with contextlib.suppress(ValueError, ImportError, NotImplementedError):  # checked just below
                setter("eager")
        if getattr(config, "_attn_implementation", None) != "eager":
            raise FeatureSpecError(
                f"attention features need eager attention, but {type(self.model).__name__} uses {current!r} and "
                "cannot switch; load it with attn_implementation='eager'"
            )
        self._restore_attn_implementation = current

    def collect(self, outputs: Any) -> dict[str, torch.Tensor]:
        """Fill attention maps and logits from the forward's ``outputs`` and check every hook fired.

        Args:
            outputs: what the model's forward returned (a ``ModelOutput``, a mapping, or a logits tensor).

        Returns:
            :attr:`features`: name → tensor; attention maps are ``(B, heads, T, T)``, logits ``(..., V)``.

        Raises:
            FeatureSpecError: a hooked module did not run, or the outputs lack the attentions or logits needed.
        """
        for name, source in self.sources.items():
            if source.kind == "hook" and name not in self.features:
                raise FeatureSpecError(
                    f"feature {name!r} ({source.spec!r}): module {source.path!r} did not run during the forward"
                )
            if source.kind == "logits":
                logits = outputs if isinstance(outputs, torch.Tensor) else _output_field(outputs, "logits")
                if not isinstance(logits, torch.Tensor):
                    raise FeatureSpecError(
                        f"feature {name!r}: the model's outputs ({type(outputs).__name__}) have no 'logits' tensor; "
                        "pass an adaptor that returns it"
                    )
                self.features[name] = logits
            if source.kind == "attention":
                attentions = _output_field(outputs, "attentions") or ()
                layer = source.layer or 0
                if len(attentions) < layer or attentions[layer - 1] is None:
                    raise FeatureSpecError(
                        f"feature {name!r} ({source.spec!r}) needs attention map {layer} but the outputs hold "
                        f"{len(attentions)}; call the model with **tap.model_kwargs (output_attentions=True) inside "
                        "the tap, with eager attention"
                    )
                self.features[name] = attentions[layer - 1]
        return self.features


def extract_features(
    model: nn.Module,
    inputs: Mapping[str, Any],
    sources: Mapping[str, FeatureSpec],
    *,
    adaptor: Adaptor | None = None,
    feature_kinds: str | Mapping[str, str] = "hidden",
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run ``model(**inputs)`` once and return its outputs and the named features.

    Args:
        model: the model; call this under ``torch.no_grad()`` for a teacher.
        inputs: keyword arguments of the forward (``input_ids``, ``attention_mask``, ...).
        sources: feature name → spec, as for :class:`FeatureTap`.
        adaptor: optional ``(inputs, outputs) -> {name: tensor}`` for features no spec reaches (exotic models);
            its names are merged in and must not repeat a source's name.
        feature_kinds: as for :class:`FeatureTap`.

    Returns:
        ``(outputs, features)``: what the forward returned, and name → tensor.
    """
    with FeatureTap(model, sources, feature_kinds=feature_kinds) as tap:
        outputs = model(**{**inputs, **tap.model_kwargs})
        features = dict(tap.collect(outputs))
    if adaptor is not None:
        extra = adaptor(inputs, outputs)
        repeated = sorted(set(extra) & set(features))
        if repeated:
            raise FeatureSpecError(f"the adaptor returned feature names that the sources already use: {repeated}")
        features.update(extra)
    return outputs, features
