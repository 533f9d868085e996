"""kaas-magic settings, declared in ``kaas.yaml`` and merged into Dask's config system.

``kaas.yaml`` is the only source of defaults, and :func:`get` the one way to read a
setting, on both sides: in the notebook ``get("pool.concurrency")`` reads Dask's config
(so ``dask.config.set`` and ``DASK_KAAS__*`` variables count); on a worker
``get("pool.concurrency", snapshot)`` reads the :func:`snapshot` the client sent it. A key
that ``kaas.yaml`` does not declare is a programming error: :class:`UndeclaredSetting`.

Loaded on first use rather than at ``%load_ext`` time, because importing dask costs ~0.3 s.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_DEFAULTS = Path(__file__).with_name("kaas.yaml")


class UndeclaredSetting(LookupError):
    """A kaas setting was read (or set) that kaas.yaml does not declare."""


@functools.cache
def defaults() -> dict:
    """The ``kaas`` section of kaas.yaml, as declared (do not modify)."""
    import yaml

    with open(_DEFAULTS) as f:
        return yaml.safe_load(f)["kaas"]


@functools.cache
def declared() -> frozenset[str]:
    """Every dotted key kaas.yaml declares, sections included (``"pool"``, ``"pool.concurrency"``)."""
    keys: list[str] = []  # (this module's set() is dask.config.set's)

    def walk(node: dict, prefix: str) -> None:
        for name, value in node.items():
            keys.append(prefix + name)
            if isinstance(value, dict):
                walk(value, f"{prefix}{name}.")

    walk(defaults(), "")
    return frozenset(keys)


def _check(key: str) -> None:
    if key not in declared():
        raise UndeclaredSetting(
            f"kaas setting {key!r} is not declared in {_DEFAULTS.name}: declare it there, "
            "with its default and a comment, before reading it")


@functools.cache
def _load_defaults() -> None:
    import dask.config

    dask.config.update_defaults({"kaas": defaults()})
    # DASK_KAAS__* variables set after dask was imported must still win over the file;
    # re-read only those (a full refresh() would drop values set with dask.config.set).
    env = dask.config.collect_env()
    if "kaas" in env:
        dask.config.update(dask.config.config, {"kaas": env["kaas"]}, priority="new")


_MISSING = object()


def _walk(node: Any, key: str) -> Any:
    """``key``'s value in nested dicts, whichever of '-' and '_' a level spells it with."""
    for part in key.split("."):
        if not isinstance(node, Mapping):
            return _MISSING
        if part in node:
            node = node[part]
            continue
        alt = part.replace("-", "_") if "-" in part else part.replace("_", "-")
        if alt not in node:
            return _MISSING
        node = node[alt]
    return node


def get(key: str, snapshot: Mapping | None = None) -> Any:
    """A setting, e.g. ``get("pool.concurrency")`` reads ``kaas.pool.concurrency``.

    ``snapshot``: a :func:`snapshot` (on a worker); keys it lacks read kaas.yaml's default.
    Without one, Dask's current config. Raises :class:`UndeclaredSetting` for a key
    kaas.yaml does not declare.
    """
    if key not in declared():
        _check(key)
    if snapshot is None:
        import dask.config

        _load_defaults()
        # Read on every call: straight from Dask's dict (dask.config.get's key normalising
        # costs more than the rest of a lookup).
        value = _walk(dask.config.config.get("kaas"), key)
        if value is _MISSING:
            value = dask.config.get(f"kaas.{key}", default=_MISSING)
    elif isinstance(snapshot, Mapping):
        value = _walk(snapshot, key)
    else:  # get(key, default) is not how to read a setting: kaas.yaml holds every default
        raise TypeError(f"config.get({key!r}, snapshot): snapshot must be a config.snapshot() "
                        f"dict, not {type(snapshot).__name__}")
    return _walk(defaults(), key) if value is _MISSING else value


def snapshot() -> dict:
    """The whole ``kaas`` section, as sent to workers so they share the client's settings:
    a deep copy, which later dask.config.set calls leave as it is."""
    import copy

    import dask.config

    _load_defaults()
    return copy.deepcopy(dict(dask.config.get("kaas")))


def set(**settings: Any):
    """``kaas.config.set(fallback=True)``: context manager or global, like dask.config.set.

    Underscores in keyword names stand for dashes (``warmup_timeout`` -> ``warmup-timeout``);
    dotted names reach into sections (``**{"pool.concurrency": 8}``).
    """
    import dask.config

    _load_defaults()
    keys = {k: k.replace("_", "-") for k in settings}
    for key in keys.values():
        _check(key)
    return dask.config.set({f"kaas.{keys[k]}": v for k, v in settings.items()})


def scheduler_address() -> str | None:
    return os.environ.get("KAAS_SCHEDULER_ADDRESS") or get("scheduler-address")
