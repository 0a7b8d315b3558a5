"""Reading a run config: YAML (safe_load only), dotted ``key=value`` overrides, and one-line errors."""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kdistill.config.schema import RunConfig
from kdistill.errors import KdistillError


class ConfigError(KdistillError, ValueError):
    """A run config that cannot be used; the message names the file, the key or the value."""


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """Parse dotted overrides: ``["training.learning_rate=3e-5"]`` → ``[(["training", "learning_rate"], 3e-5)]``.

    Values are read as YAML scalars/lists (``3e-5``, ``true``, ``null``, ``[0, 5]``); anything else stays a string.
    """
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. training.learning_rate=3e-5)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append(([part for part in key.strip().split(".") if part], value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for path, value in parse_overrides(overrides):
        node = data
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {'.'.join(path)}: {part!r} holds a value, not a section")
            node = node[part]
        node[path[-1]] = value
    return data


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(key, line)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (two variants of one name would silently merge)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        except TypeError:  # an unhashable key; construct_mapping reports it
            pass
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_yaml_mapping(file: Path, what: str) -> dict[str, Any]:
    """A YAML file's top-level mapping; every problem (missing, invalid, empty, a key given twice) is one line."""
    if not file.is_file():
        raise ConfigError(f"{what} {file} does not exist")
    try:
        loaded = yaml.load(file.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except _DuplicateKey as error:
        raise ConfigError(f"{file}: key {error.key!r} appears twice (line {error.line})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{file} is not valid YAML{where}: {problem}") from None
    if loaded is None:
        raise ConfigError(f"{file} is empty")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{file} must hold a mapping of settings at the top, got {type(loaded).__name__}")
    return loaded


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *,
                data: dict[str, Any] | None = None) -> RunConfig:  # fmt: skip
    """Read ``path`` (or use ``data``), apply ``overrides``, validate; every problem is one :class:`ConfigError`."""
    if data is None:
        if path is None:
            raise ConfigError("no config file given")
        data = read_yaml_mapping(Path(path), "config file")
    data = apply_overrides(copy.deepcopy(data), overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, data)) from None


def format_validation_error(error: ValidationError, data: dict[str, Any], schema: type[BaseModel] = RunConfig) -> str:
    """The first problem as one line: the dotted key, what is wrong, and for unknown keys the closest valid one
    (looked up in ``schema``, the model that was validated)."""
    first = error.errors()[0]
    location = [str(part) for part in first["loc"]]
    key = ".".join(location) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        parent = _model_at(schema, location[:-1])
        known = sorted(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(location[-1], known, n=1)
        hint = f"; did you mean {'.'.join([*location[:-1], close[0]])!r}?" if close else ""
        return f"unknown key {key!r}{hint} (valid here: {', '.join(known)})"
    if kind == "missing":
        return f"missing required key {key!r}"
    message = first["msg"].removeprefix("Value error, ")
    if "input" in first and kind not in ("model_type",) and not isinstance(first["input"], dict):
        return f"{key}: {message} (got {first['input']!r})"
    return f"{key}: {message}"


def _model_at(model: type[BaseModel], path: list[str]) -> type[BaseModel] | None:
    for part in path:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        for arg in list(candidates):
            candidates.extend(getattr(arg, "__args__", ()))
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML (saved in the run directory)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
