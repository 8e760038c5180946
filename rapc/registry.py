"""A name -> factory registry in the shape of timm's: one decorator, one lookup.

A registry is the only list of its names: config checks, CLI help, reports and tests read
it, in registration order (the order a user meets them in help texts and tables).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from rapc.errors import RapcError

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """Maps names to callables; an unknown name is a RapcError listing the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._info: dict[str, Mapping[str, Any]] = {}

    def register(self, name: str | None = None, **info: Any) -> Callable[[T], T]:
        """Register under ``name`` (default the function's name); ``info`` holds what the registry's
        readers need to know about the entry besides calling it (a scheme's channel axis, a study
        row's plot marker), so that knowledge sits beside the entry instead of in a second list."""

        def add(fn: T) -> T:
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = fn
            self._info[key] = MappingProxyType(dict(info))
            return fn

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise RapcError(f"unknown {self.kind} {name!r}; known: {', '.join(self._entries)}") from None

    def info(self, name: str) -> Mapping[str, Any]:
        """What was given at registration besides the entry itself (empty if nothing)."""
        self.get(name)
        return self._info[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)  # registration order: the order of the module that registers them

    def __len__(self) -> int:
        return len(self._entries)
