"""Name registries: the one place where a name in a config becomes a function or class.

A :class:`Registry` maps names (and aliases) to objects. Looking up an unknown name raises
:class:`~kdistill.errors.UnknownNameError` listing the known names and the closest match, so a typo in a YAML
file gets a one-line answer. Registering a user's own function is one call::

    from kdistill.losses import LOSSES
    LOSSES.register("my_kl", my_kl, kind="divergence")
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from kdistill.errors import InvalidArgumentError, UnknownNameError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered object: its canonical name, the object, its kind (e.g. ``"divergence"``) and aliases."""

    name: str
    obj: T
    kind: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


class Registry(Generic[T]):
    """A case-sensitive map from names and aliases to objects of one family (losses, schedules, ...)."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}

    def register(
        self,
        name: str,
        obj: T | None = None,
        *,
        kind: str = "",
        aliases: tuple[str, ...] | list[str] = (),
        overwrite: bool = False,
    ) -> Any:
        """Register ``obj`` under ``name`` (and ``aliases``); without ``obj``, return a decorator."""
        if obj is None:

            def decorator(fn: T) -> T:
                self.register(name, fn, kind=kind, aliases=aliases, overwrite=overwrite)
                return fn

            return decorator
        for key in (name, *aliases):
            if not isinstance(key, str) or not key:
                raise InvalidArgumentError(f"{self.family} names must be non-empty strings, got {key!r}")
            if key in self and not overwrite:
                raise InvalidArgumentError(
                    f"{self.family} name {key!r} is already registered; pass overwrite=True to replace it"
                )
        if overwrite:
            self._drop(name)
        entry = Entry(name=name, obj=obj, kind=kind, aliases=tuple(aliases))
        self._entries[name] = entry
        for alias in aliases:
            self._aliases[alias] = name
        return obj

    def _drop(self, key: str) -> None:
        canonical = self._aliases.pop(key, key)
        old = self._entries.pop(canonical, None)
        if old is not None:
            for alias in old.aliases:
                self._aliases.pop(alias, None)

    def entry(self, name: str) -> Entry[T]:
        """The entry registered under ``name`` or one of its aliases."""
        canonical = self._aliases.get(name, name)
        if canonical in self._entries:
            return self._entries[canonical]
        known = self.names(include_aliases=True)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownNameError(f"unknown {self.family} {name!r}; {hint}known: {', '.join(known)}")

    def get(self, name: str) -> T:
        """The object registered under ``name``; unknown names raise :class:`UnknownNameError`."""
        return self.entry(name).obj

    def resolve(self, name_or_obj: str | T) -> T:
        """A registered object by name, or ``name_or_obj`` itself when it is already a callable/object."""
        return self.get(name_or_obj) if isinstance(name_or_obj, str) else name_or_obj

    def names(self, kind: str | None = None, *, include_aliases: bool = False) -> list[str]:
        """Registered names, optionally only those of one ``kind``, sorted."""
        names = [n for n, e in self._entries.items() if kind is None or e.kind == kind]
        if include_aliases:
            names += [a for a, n in self._aliases.items() if kind is None or self._entries[n].kind == kind]
        return sorted(names)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, {self.names()})"
