"""kaas-magic settings, declared in ``kaas.yaml`` and merged into Dask's config system.

Loaded on first use rather than at ``%load_ext`` time, because importing dask costs ~0.3 s.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

_DEFAULTS = Path(__file__).with_name("kaas.yaml")


@functools.cache
def _load_defaults() -> None:
    import dask.config
    import yaml

    with open(_DEFAULTS) as f:
        defaults = yaml.safe_load(f)
    dask.config.update_defaults(defaults)
    # DASK_KAAS__* variables set after dask was imported must still win over the file;
    # re-read only those (a full refresh() would drop values set with dask.config.set).
    env = dask.config.collect_env()
    if "kaas" in env:
        dask.config.update(dask.config.config, {"kaas": env["kaas"]}, priority="new")


def get(key: str, default: Any = None) -> Any:
    """Read a setting, e.g. ``get("pool.concurrency")`` reads ``kaas.pool.concurrency``."""
    import dask.config

    _load_defaults()
    # Read on every call: straight from Dask's dict when the keys are spelt as in
    # kaas.yaml (dask.config.get's key normalising costs more than the rest of a lookup).
    node = dask.config.config.get("kaas")
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return dask.config.get(f"kaas.{key}", default=default)
        node = node[part]
    return node


def snapshot() -> dict:
    """The whole ``kaas`` section, as sent to workers so they share the client's settings."""
    import dask.config

    _load_defaults()
    return dict(dask.config.get("kaas"))


def set(**settings: Any):
    """``kaas.config.set(fallback=True)``: context manager or global, like dask.config.set.

    Underscores in keyword names stand for dashes (``warmup_timeout`` -> ``warmup-timeout``).
    """
    import dask.config

    _load_defaults()
    return dask.config.set({f"kaas.{k.replace('_', '-')}": v for k, v in settings.items()})


def scheduler_address() -> str | None:
    return os.environ.get("KAAS_SCHEDULER_ADDRESS") or get("scheduler-address")
