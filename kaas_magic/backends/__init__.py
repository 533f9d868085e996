"""Backends, one module each, behind the interface in :mod:`kaas_magic.backends.base`.

Modules here import their frameworks only inside functions, so importing this package on
the notebook side stays cheap.
"""

from __future__ import annotations

import functools
import importlib

from .base import Backend, Offer, Session

_MODULES = {
    "numpy": "numpy_backend",
    "cupy": "cupy_backend",
    "jax": "jax_backend",
    "opencl": "opencl_backend",
    "qiskit": "qiskit_backend",
}


def load(name: str) -> type[Backend]:
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return module.BACKEND


@functools.lru_cache(maxsize=None)  # asked for every %%kaas cell
def injected_names(name: str) -> tuple[str, ...]:
    """Names a backend injects into every cell (never sent from the notebook)."""
    return load(name).session_class.injected


__all__ = ["Backend", "Offer", "Session", "load", "injected_names"]
