"""One registry behaviour for every extension point: passes, backends, analyses, observers,
importance criteria, channel rules and int8 lowering rules.

- ``register(name)`` is a decorator; a name already taken by another object is refused with a
  ConfigError naming its owner, while the same qualified name registering again (a module
  reloaded, a notebook cell run twice) replaces the old entry;
- before a listing, and before a lookup of a name not yet registered, the ``graphopt.plugins``
  entry points are imported (graphopt's own passes and backends are one), so a plugin's
  decorators have run by the time its name is asked for;
- ``get(name)`` of an unknown name is a ConfigError listing every registered name;
- a registry keyed by something other than a name (a module type, an op) is built with
  ``describe`` (how a message names a key) and read with ``find`` / ``find_type``, which answer
  None for a key nobody registered.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

from graphopt.errors import ConfigError
from graphopt.plugins import load_plugins

T = TypeVar("T")


def qualified_name(obj: object) -> str:
    """``module.QualName`` of a class or function (what identifies it across reloads)."""
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


class Registry(Generic[T]):
    """Named objects of one kind (``kind``: "pass", "backend", ...), in name order; with
    ``describe``, objects keyed by anything hashable (``describe(key)`` names a key in messages)."""

    def __init__(self, kind: str, plural: str | None = None, describe: Callable[[Any], str] | None = None):
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.describe = describe
        self._entries: dict[Any, T] = {}

    def add(self, name: Any, obj: T, owner: object | None = None) -> T:
        """Register ``obj`` under ``name``; ``owner`` (default ``obj``) is what identifies who
        registered it (a backend registers a checking wrapper of its own function)."""
        if self.describe is None and (not isinstance(name, str) or not name):
            raise ConfigError(f"a {self.kind} needs a non-empty name, got {name!r}")
        existing = self._entries.get(name)
        if existing is not None:
            taken, new = qualified_name(existing), qualified_name(owner if owner is not None else obj)
            if taken != new:
                if self.describe is not None:
                    raise ConfigError(f"a {self.kind} for {self.describe(name)} is already registered: {taken}")
                raise ConfigError(f"{self.kind} name {name!r} is taken by {taken}; choose another name")
        self._entries[name] = obj
        return obj

    def find(self, key: Any) -> T | None:
        """The entry for ``key``, or None (plugins are loaded before answering None)."""
        try:
            found = self._entries.get(key)
            if found is None:
                load_plugins()
                found = self._entries.get(key)
        except TypeError:   # an unhashable key (some fx targets) has no entry
            return None
        return found

    def find_type(self, cls: type) -> T | None:
        """The entry for ``cls`` or its nearest registered base class."""
        load_plugins()
        return next((self._entries[c] for c in cls.__mro__ if c in self._entries), None)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("name")``."""

        def decorate(obj: T) -> T:
            return self.add(name, obj)

        return decorate

    def get(self, name: str) -> T:
        if isinstance(name, str) and name in self._entries:   # found: no need to import every plugin
            return self._entries[name]
        entries = self.entries()
        if name not in entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; registered {self.plural}: "
                              f"{', '.join(entries) or '(none)'}")
        return entries[name]

    def entries(self) -> dict[Any, T]:
        """Every registered name and object, plugins loaded first, in name order (keyed
        registries: in registration order)."""
        load_plugins()
        return dict(self._entries) if self.describe is not None else dict(sorted(self._entries.items()))

    def names(self) -> list[str]:
        return list(self.entries())

    def __contains__(self, name: object) -> bool:
        return name in self.entries()

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries())

    def __len__(self) -> int:
        return len(self.entries())

    def __repr__(self) -> str:
        return f"<registry of {self.plural}: {', '.join(self._entries)}>"
