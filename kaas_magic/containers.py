"""Mapping a conversion over a value and the members of a plain container, one level down.

Neutral ground: the client (handles among a call's inputs) and the worker side (device
arrays among outputs) both use it, and neither imports the other's modules for it.
"""

from __future__ import annotations

from typing import Any


def map_containers(value: Any, convert) -> Any:
    """Apply ``convert`` to ``value`` and, one level down, to list/tuple/dict members."""
    if isinstance(value, list):
        return [convert(v) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(convert(v) for v in value)
    if isinstance(value, dict) and type(value) is dict:
        return {k: convert(v) for k, v in value.items()}
    return convert(value)
