"""One small registry per extension point, plus entry-point plugin loading.

A registry maps a name (and its aliases) to a function or class. ``build`` turns a config node
such as ``{"name": "bilateral", "diameter": 9}`` into the built object, so a new dataset,
preprocessing step, augmentation, model or metric is one registered object plus a YAML entry.

fvcore's Registry has no aliases, close-match suggestions or build-from-config, and detectron2's
is the same class; this is about 80 lines, so it is written here rather than pulled in.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import entry_points
from typing import Any

logger = logging.getLogger(__name__)

PLUGIN_GROUP = "leukodet.plugins"


class RegistryError(KeyError):
    """An unknown or duplicate name; the message says which names are known."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class Registry:
    """Names -> objects for one extension point (e.g. ``PREPROCESS``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._objects: dict[str, Any] = {}
        self._aliases: dict[str, str] = {}

    def register(self, obj: Any = None, *, name: str | None = None, aliases: Iterable[str] = ()):
        """Register ``obj`` under ``name`` (default: its ``__name__``).

        Use as ``@REG.register()``, ``@REG.register(name="x", aliases=["y"])`` or
        ``REG.register(fn, name="x")``. Registering a different object under a taken name fails;
        registering the same object again is a no-op, so re-imports are harmless.
        """

        def add(target: Any) -> Any:
            key = name or target.__name__
            for label in (key, *aliases):
                taken = self._objects.get(self._aliases.get(label, label))
                if taken is not None and taken is not target:
                    raise RegistryError(f"{self.kind} {label!r} is already registered to {taken!r}")
            self._objects[key] = target
            for alias in aliases:
                self._aliases[alias] = key
            return target

        return add if obj is None else add(obj)

    def __contains__(self, name: str) -> bool:
        return self._aliases.get(name, name) in self._objects

    def names(self) -> list[str]:
        """Registered primary names, sorted."""
        return sorted(self._objects)

    def get(self, name: str) -> Any:
        """The object registered as ``name`` or an alias of it; unknown names list the choices."""
        key = self._aliases.get(name, name)
        if key in self._objects:
            return self._objects[key]
        known = sorted([*self._objects, *self._aliases])
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise RegistryError(
            f"unknown {self.kind} {name!r}.{hint} Known {self.kind} names: {', '.join(known) or '(none)'}"
        )

    def build(self, spec: str | Mapping[str, Any], **overrides: Any) -> Any:
        """Call the object named by ``spec`` with the rest of ``spec`` as keyword arguments.

        ``spec`` is a name, or a mapping with a ``name`` key (an OmegaConf node works too).
        """
        if isinstance(spec, str):
            name, params = spec, {}
        else:
            params = dict(spec)
            if "name" not in params:
                raise RegistryError(f"{self.kind} config {params!r} has no 'name' key; "
                                    f"choose one of: {', '.join(self.names())}")
            name = params.pop("name")
        params.update(overrides)
        target: Callable[..., Any] = self.get(name)
        try:
            return target(**params)
        except TypeError as err:
            raise TypeError(f"cannot build {self.kind} {name!r} with {params}: {err}") from err

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"


DATASETS = Registry("dataset")
PREPROCESS = Registry("preprocessing step")
AUGMENTATIONS = Registry("augmentation")
MODELS = Registry("model")
METRICS = Registry("metric")


def load_plugins(group: str = PLUGIN_GROUP) -> list[str]:
    """Import every entry point of ``group``; importing a plugin module registers its objects.

    An entry point may also name a callable, which is called with no arguments. Returns the
    names of the loaded entry points. A plugin that fails to import raises with its name.
    """
    loaded = []
    for entry in entry_points(group=group):
        try:
            obj = entry.load()
        except Exception as err:
            raise ImportError(f"leukodet plugin {entry.name!r} ({entry.value}) failed to load: {err}") from err
        if callable(obj) and not isinstance(obj, type):
            obj()
        loaded.append(entry.name)
        logger.info("loaded leukodet plugin %s from %s", entry.name, entry.value)
    return loaded
