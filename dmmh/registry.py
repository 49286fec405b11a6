"""One registry mechanism for every kind of named component.

A :class:`Registry` maps names (and aliases) to constructors. Built-in components
register themselves when :mod:`dmmh` is imported; third-party packages add theirs
through an entry-point group (``dmmh.encoders``, ``dmmh.fusions``, ...), loaded
lazily the first time a registry is searched.

Example::

    from dmmh.registry import HASH_HEADS
    from dmmh.hashing import HashHead

    @HASH_HEADS.register("my_head", aliases=("mine",))
    class MyHead(HashHead):
        ...

    head = HASH_HEADS.create("my_head", in_dim=64, n_bits=32)
"""

from __future__ import annotations

import difflib
import fnmatch
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T", bound=Callable[..., Any])

__all__ = ["Registry", "UnknownComponentError", "ENCODERS", "FUSIONS", "HASH_HEADS", "LOSSES", "DATAMODULES"]


class UnknownComponentError(KeyError):
    """Raised for a name that no component is registered under; the message suggests close names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry:
    """Names → constructors for one kind of component (``kind``, e.g. "encoder").

    ``group`` is the entry-point group scanned for plugins: an entry point named ``foo``
    whose object is a callable is registered as ``foo``; a module entry point is simply
    imported (so it can register things itself with the decorator).
    """

    def __init__(self, kind: str, group: str | None = None):
        self.kind = kind
        self.group = group
        self._entries: dict[str, Callable[..., Any]] = {}
        self._aliases: dict[str, str] = {}
        self._plugins_loaded = group is None

    # -- registration -------------------------------------------------------------------------
    def register(
        self, name: str | None = None, *, aliases: Iterable[str] = (), override: bool = False
    ) -> Callable[[T], T]:
        """Decorator registering a class or factory under ``name`` (default: its ``__name__``)."""

        def deco(obj: T) -> T:
            self.add(name or obj.__name__, obj, aliases=aliases, override=override)
            return obj

        return deco

    def add(
        self, name: str, obj: Callable[..., Any], *, aliases: Iterable[str] = (), override: bool = False
    ) -> None:
        """Register ``obj`` under ``name`` and ``aliases``; a taken name is an error unless ``override``."""
        if not callable(obj):
            raise TypeError(f"{self.kind} {name!r}: {obj!r} is not callable")
        # iterated several times below (a generator would be used up); a lone string is one alias, not its letters
        aliases = (aliases,) if isinstance(aliases, str) else tuple(aliases)
        for key in (name, *aliases):
            if not isinstance(key, str) or not key:
                raise ValueError(f"{self.kind} names must be non-empty strings, got {key!r}")
            if not override and (key in self._entries or key in self._aliases):
                owner = self._entries.get(key) or self._entries[self._aliases[key]]
                raise ValueError(
                    f"{self.kind} name {key!r} is already registered (to {_qualname(owner)}); "
                    f"pass override=True to replace it"
                )
        if override:
            for key in (name, *aliases):
                self._aliases.pop(key, None)
            for alias in aliases:  # an alias that was a canonical name must not stay shadowed by the old entry
                if alias != name and alias in self._entries:
                    del self._entries[alias]  # (not via remove(): no plugin loading during registration)
                    for other in [a for a, c in self._aliases.items() if c == alias]:
                        del self._aliases[other]
        self._entries[name] = obj
        for alias in aliases:
            self._aliases[alias] = name

    def remove(self, name: str) -> None:
        """Unregister ``name`` and its aliases (used by tests and plugin reloads)."""
        canonical = self._resolve(name)
        del self._entries[canonical]
        for alias in [a for a, c in self._aliases.items() if c == canonical]:
            del self._aliases[alias]

    # -- lookup -------------------------------------------------------------------------------
    def get(self, name: str) -> Callable[..., Any]:
        """The constructor registered under ``name`` or one of its aliases."""
        return self._entries[self._resolve(name)]

    def create(self, name: str, /, **kwargs: Any) -> Any:
        """Build component ``name``; keyword arguments given as ``None`` are dropped, so that
        unset config values leave the component's own defaults in force."""
        return self.get(name)(**{k: v for k, v in kwargs.items() if v is not None})

    def list(self, pattern: str | None = None, *, aliases: bool = False) -> list[str]:
        """Sorted registered names, optionally filtered by a shell-style wildcard (``"clip_*"``)."""
        self._load_plugins()
        names = set(self._entries) | (set(self._aliases) if aliases else set())
        if pattern is not None:
            names = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        return sorted(names)

    def name_of(self, obj: Callable[..., Any]) -> str:
        """The canonical name ``obj`` (a class or an instance of one) is registered under."""
        target = obj if callable(obj) and isinstance(obj, type) else type(obj)
        for name, entry in self._entries.items():
            if entry is obj or entry is target:
                return name
        raise UnknownComponentError(f"{_qualname(target)} is not a registered {self.kind}")

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return isinstance(name, str) and (name in self._entries or name in self._aliases)

    def __iter__(self):
        return iter(self.list())

    def __len__(self) -> int:
        return len(self.list())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"

    # -- internals ----------------------------------------------------------------------------
    def _resolve(self, name: str) -> str:
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {type(name).__name__}")
        self._load_plugins()
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        known = self.list(aliases=True)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        if not close:  # case / separator slips: "CNN-Deep" -> "cnn_deep"
            folded = {k.lower().replace("-", "_"): k for k in known}
            close = [folded[k] for k in difflib.get_close_matches(name.lower().replace("-", "_"), folded, 3, 0.5)]
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownComponentError(
            f"unknown {self.kind} {name!r}{hint} (available: {', '.join(known) or 'none'}){self._plugin_hint()}"
        )

    def _plugin_hint(self) -> str:
        """How a component defined outside dmmh becomes known (e.g. in a fresh process loading a checkpoint)."""
        if self.group is None:
            return ""
        return (f". A {self.kind} defined outside dmmh is known only after the module that registers it is "
                f"imported, or when its package declares it under the {self.group!r} entry point")

    def _load_plugins(self, force: bool = False) -> None:
        if self._plugins_loaded and not force:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.group):
            if ep.name in self._entries or ep.name in self._aliases:
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not break dmmh
                import warnings

                warnings.warn(f"could not load {self.kind} plugin {ep.name!r} ({ep.value}): {exc}", stacklevel=2)
                continue
            if callable(obj) and ep.name not in self._entries:
                self.add(ep.name, obj)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


ENCODERS = Registry("encoder", "dmmh.encoders")
FUSIONS = Registry("fusion", "dmmh.fusions")
HASH_HEADS = Registry("hash head", "dmmh.hash_heads")
LOSSES = Registry("loss", "dmmh.losses")
DATAMODULES = Registry("datamodule", "dmmh.datamodules")
