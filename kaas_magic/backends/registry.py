"""The one list of backends: found through the ``kaas_magic.backends`` entry points.

Each backend says what it is once, as class attributes of its :class:`~.base.Backend`
class: its ``name``, the kernel ``languages`` it compiles, the ``targets`` it can serve
(with the kinds of service for each), the targets it is the ``default_for``, and the
names it ``injected`` into cells. Everything else (the valid ``--backend`` names, a
target's default backend, a kernel language's backend and default targets, the names
never sent from the notebook) asks this module.

Cheap on purpose: listing names only reads entry-point metadata; a backend's class is
imported on the first question about it, and backend modules import their frameworks
only inside methods. Which backends a worker starts, and in which order, is the
``kaas.backends`` setting (kaas.yaml), not this module.

A package adds a backend by declaring, in its own ``pyproject.toml``::

    [project.entry-points."kaas_magic.backends"]
    toy = "kaas_toy:ToyBackend"
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterator

logger = logging.getLogger(__name__)

GROUP = "kaas_magic.backends"

# The package's own backends, as its pyproject.toml declares them: used as well when that
# metadata is missing (a source tree on sys.path, an install made before entry points).
BUILTIN: dict[str, str] = {
    "numpy": "kaas_magic.backends.numpy_backend:NumpyBackend",
    "cupy": "kaas_magic.backends.cupy_backend:CupyBackend",
    "jax": "kaas_magic.backends.jax_backend:JaxBackend",
    "opencl": "kaas_magic.backends.opencl_backend:OpenCLBackend",
    "qiskit": "kaas_magic.backends.qiskit_backend:QiskitBackend",
}


class UnknownBackend(KeyError):
    """No backend of that name is installed."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class BackendInfo:
    """What a backend declares about itself (its class attributes), checked."""

    name: str
    cls: type
    languages: tuple[str, ...]
    targets: tuple[tuple[str, tuple[str, ...]], ...]  # (target, kinds), in declared order
    default_for: tuple[str, ...]
    injected: tuple[str, ...]

    def serves(self, target: str) -> tuple[str, ...]:
        """The kinds of service this backend can give ``target`` (empty: none)."""
        return dict(self.targets).get(target, ())


_lock = threading.RLock()


@functools.cache
def _locations() -> dict[str, str]:
    """name -> "module:attribute", without importing any backend."""
    found = dict(BUILTIN)
    try:
        from importlib.metadata import entry_points

        points = entry_points(group=GROUP)
    except Exception:  # noqa: BLE001 - broken metadata must not break the built-ins
        logger.warning("kaas: could not read the %s entry points", GROUP, exc_info=True)
        points = ()
    for point in points:
        known = found.get(point.name)
        if known is None:
            found[point.name] = point.value
        elif known != point.value:
            logger.warning("kaas: ignoring backend entry point %s = %s: the name is taken by %s",
                           point.name, point.value, known)
    return found


def refresh() -> None:
    """Forget what was found, so that backends installed since are seen."""
    with _lock:
        for cached in (_locations, info, infos, languages, _defaults, injected_names):
            cached.cache_clear()


def names() -> tuple[str, ...]:
    """Every installed backend's name (the package's own first). Imports no backend."""
    return tuple(_locations())


def _location(name: str) -> str:
    where = _locations().get(name)
    if where is None:
        refresh()  # installed since the first look?
        where = _locations().get(name)
    if where is None:
        raise UnknownBackend(f"no kaas backend named {name!r}; installed: {', '.join(names())}")
    return where


def load(name: str) -> type:
    """The backend class registered as ``name`` (imports its module, not its framework)."""
    return info(name).cls


@functools.cache
def info(name: str) -> BackendInfo:
    from ..targets import KINDS, TARGETS
    from .base import Backend

    where = _location(name)
    module_name, _, attribute = where.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in (attribute or "BACKEND").split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        raise TypeError(f"kaas backend {name!r} ({where}) is not a kaas_magic Backend class")
    if getattr(obj, "name", None) != name:
        raise TypeError(f"kaas backend {name!r} ({where}) calls itself {getattr(obj, 'name', None)!r}")
    targets = tuple((str(t), tuple(kinds)) for t, kinds in dict(obj.targets).items())
    for target, kinds in targets:
        if target not in TARGETS or not kinds or any(k not in KINDS for k in kinds):
            raise TypeError(f"kaas backend {name!r}: bad targets entry {target!r}: {kinds!r} "
                            f"(targets: {', '.join(TARGETS)}; kinds: {', '.join(KINDS)})")
    served = {t for t, _ in targets}
    default_for = tuple(obj.default_for)
    if not set(default_for) <= served:
        raise TypeError(f"kaas backend {name!r} is default for targets it does not serve: "
                        f"{', '.join(sorted(set(default_for) - served))}")
    return BackendInfo(name=name, cls=obj, languages=tuple(obj.languages), targets=targets,
                       default_for=default_for, injected=tuple(obj.injected))


@functools.cache
def infos() -> tuple[BackendInfo, ...]:
    """Every backend that loads; one that does not is left out (and logged)."""
    found = []
    for name in names():
        try:
            found.append(info(name))
        except Exception:  # noqa: BLE001 - a broken plug-in must not break the rest
            logger.warning("kaas: backend %r could not be loaded", name, exc_info=True)
    return tuple(found)


@functools.cache  # asked for every call
def injected_names(name: str) -> tuple[str, ...]:
    """Names a backend injects into every cell (never sent from the notebook). For a
    backend not installed here (a remote worker's plug-in), the names every backend injects."""
    try:
        return info(name).injected
    except UnknownBackend:
        from .base import Backend

        return Backend.injected


@functools.cache
def languages() -> Mapping[str, tuple[str, tuple[str, ...]]]:
    """language -> (its backend, the targets its kernels run on by default). Where two
    backends compile one language, the first in :func:`names` has it."""
    table: dict[str, tuple[str, tuple[str, ...]]] = {}
    for backend in infos():
        for language in backend.languages:
            table.setdefault(language, (backend.name, tuple(t for t, _ in backend.targets)))
    return MappingProxyType(table)


def default_backend(target: str) -> str:
    """The backend a call for ``target`` prefers among services of equal kind: the one
    that declares itself ``default_for`` it, else the first serving it as more than a
    stand-in, else the first serving it at all."""
    from ..targets import TARGETS

    if target not in TARGETS:
        raise KeyError(target)
    loaded = infos()
    for rule in (lambda b: target in b.default_for,
                 lambda b: any(k != "fallback" for k in b.serves(target)),
                 lambda b: bool(b.serves(target))):
        for backend in loaded:
            if rule(backend):
                return backend.name
    raise KeyError(target)


class Names(Sequence):
    """The installed backends' names, read when used (``in``, iteration), not at import."""

    def __getitem__(self, index):
        return names()[index]

    def __len__(self) -> int:
        return len(names())

    def __iter__(self) -> Iterator[str]:
        return iter(names())

    def __contains__(self, name: object) -> bool:
        if name in names():
            return True
        if isinstance(name, str):
            try:
                _location(name)  # looks again: installed since?
                return True
            except UnknownBackend:
                return False
        return False

    def __repr__(self) -> str:
        return repr(names())


class _LazyTable(Mapping):
    def __init__(self, make, what: str):
        self._make, self._what = make, what

    def __getitem__(self, key):
        return self._make()[key]

    def __iter__(self):
        return iter(self._make())

    def __len__(self) -> int:
        return len(self._make())

    def __repr__(self) -> str:
        return f"<{self._what}: {dict(self._make())!r}>"


@functools.cache
def _defaults() -> Mapping[str, str]:
    from ..targets import TARGETS

    table = {}
    for target in TARGETS:
        try:
            table[target] = default_backend(target)
        except KeyError:
            pass
    return MappingProxyType(table)


# Read-only mapping views of the tables, for code that indexes them by name.
DEFAULT_BACKEND: Mapping[str, str] = _LazyTable(_defaults, "default backend of each target")
LANGUAGES: Mapping[str, tuple[str, tuple[str, ...]]] = _LazyTable(languages, "kernel languages")
