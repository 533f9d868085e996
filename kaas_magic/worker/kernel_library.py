"""The kernels a worker runs: the shipped library (loaded once, built at warm-up on every
device that can run it), the kernels clients registered (parsed once), and which of this
worker's sessions run a backend's kernels."""

from __future__ import annotations

import logging
import threading

import cachetools

from ..backends.base import Session

logger = logging.getLogger(__name__)


class KernelLibrary:
    def __init__(self, sessions: dict[str, Session]):
        self._sessions = sessions  # the runtime's, filled in as backends warm up
        self._library: dict | None = None
        self._user_specs: cachetools.LRUCache = cachetools.LRUCache(512)  # see user_spec; under _lock
        self._lock = threading.Lock()

    def specs(self) -> dict:
        """The shipped library: kernel name -> its specs, one per language."""
        if self._library is None:
            from ..kernelspec import load_library

            self._library = load_library()
        return self._library

    def user_spec(self, described: dict):
        """A kernel a client registered, as sent with its calls: parsed once, not per call
        (the same text gives the same spec; its compiled form is keyed by base.compiled_key)."""
        from ..kernelspec import KernelSpec

        key = repr(described)
        with self._lock:
            spec = self._user_specs.get(key)
            if spec is not None:
                return spec
        spec = KernelSpec.from_dict(described)
        with self._lock:
            self._user_specs[key] = spec
        return spec

    def sessions_for(self, backend: str, prefer: Session | None = None) -> list[Session]:
        """This worker's sessions of ``backend``: ``prefer`` first, then real devices."""
        found = [s for r, s in self._sessions.items() if r.split("/")[2] == backend]
        found.sort(key=lambda s: (s is not prefer, s.offer.service.kind != "device"))
        return found

    def warm(self) -> None:
        """Compile every library kernel on every device that can run it, and launch each C
        kernel once on small inputs, so that first calls are warm."""
        from ..kernelspec import sample_arguments

        for specs in self.specs().values():
            for spec in specs:
                for session in {id(s): s for s in self.sessions_for(spec.backend)}.values():
                    try:
                        compiled, _ = session.kernel(spec)
                        if spec.language in ("opencl", "cuda") and spec.params:
                            with session.activate():
                                session.synchronize([session.launch(spec, compiled, sample_arguments(spec), {})])
                    except Exception:
                        logger.exception("kaas could not build library kernel %s on %s", spec.name, session.device)

    def info(self) -> list[dict]:
        """Each kernel's statistics (compiles, disk loads, cache hits, ...) per device."""
        rows, seen = [], set()
        for session in self._sessions.values():
            stats = session.kernel_stats()
            key = id(stats)
            if key in seen:
                continue
            seen.add(key)
            for name, st in stats.items():
                rows.append({"name": name, "device": session.device, **st})
        return rows
