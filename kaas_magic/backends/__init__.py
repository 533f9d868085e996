"""Backends, one module each, behind the interface in :mod:`kaas_magic.backends.base`.

Which backends exist, and what each serves, is :mod:`kaas_magic.backends.registry`: the
``kaas_magic.backends`` entry points (this package's own, and any another package
installs). Modules here import their frameworks only inside functions, so importing this
package on the notebook side stays cheap.
"""

from __future__ import annotations

from . import registry
from .base import Backend, Offer, Session
from .registry import UnknownBackend, injected_names, names


def load(name: str) -> type[Backend]:
    """The backend class named ``name`` (raises :class:`UnknownBackend`)."""
    return registry.load(name)


__all__ = ["Backend", "Offer", "Session", "UnknownBackend", "load", "injected_names", "names", "registry"]
