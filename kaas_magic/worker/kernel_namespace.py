"""``kernels`` inside a cell, and what ``kaas.call`` runs."""

from __future__ import annotations

from ..backends.base import Session
from ..errors import KernelError
from ..isolation import report_state
from .kernel_library import KernelLibrary


class KernelNamespace:
    """``kernels`` inside a cell: ``kernels.vector_add(a, b)`` runs on this worker's device,
    and its result stays there, so a cell can chain kernels without a round trip."""

    def __init__(self, library: KernelLibrary, session: Session, user_specs, worker):
        self._library = library
        self._session = session
        self._worker = worker  # the Dask worker, named in errors
        self._user = {d["name"]: library.user_spec(d) for d in user_specs}
        self.states: dict[str, str] = {}
        self._chosen: dict[str, tuple] = {}  # name -> (spec, session), for this call

    def _spec(self, name: str):
        if name in self._user:
            return [self._user[name]]
        specs = self._library.specs().get(name)
        if not specs:
            known = sorted(set(self._library.specs()) | set(self._user))
            raise KernelError(f"unknown kernel {name!r}; known kernels: {', '.join(known)}")
        return specs

    def _session_for(self, name: str):
        """(spec, session) kernel ``name`` runs with in this call, chosen once."""
        chosen = self._chosen.get(name)
        if chosen is None:
            chosen = self._chosen[name] = self._choose(name)
        return chosen

    def _choose(self, name: str):
        specs = self._spec(name)
        current = self._session.offer.service.backend
        for spec in sorted(specs, key=lambda s: s.backend != current):
            sessions = self._library.sessions_for(spec.backend, prefer=self._session)
            if sessions:
                return spec, sessions[0]
        langs = ", ".join(s.language for s in specs)
        raise KernelError(f"kernel {name!r} ({langs}) cannot run on worker {self._worker.address}: "
                          f"no {' or '.join(s.backend for s in specs)} device here")

    def _compile(self, name: str) -> str:
        """The "compile" operation (Pool.register): kernel ``name`` compiled, or loaded from
        a cache, on this worker's device; returns how ("compiled", "disk", ...)."""
        spec, session = self._session_for(name)
        _, how = session.kernel(spec, report=report_state)
        self.states[name] = how
        return how

    def _launch_only_reads(self, name: str) -> bool:
        """Whether kernel ``name``'s launch only reads its host inputs while it runs (never
        writes or keeps them): they may be read-only views of shared memory."""
        try:
            _, session = self._session_for(name)
        except KernelError:
            return False  # the call itself says why
        return session.launch_only_reads_inputs

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            spec, session = self._session_for(name)
            result, how = session.call_kernel(spec, args, kwargs, report=report_state)
            self.states.setdefault(name, how)
            return result

        call.__name__ = name
        return call

    def _invoke(self, name: str, arguments: dict):
        """What ``kaas.call`` runs: ``arguments`` by parameter name, or a Python kernel's
        ``__args`` and ``__kwargs``. (Underscored, so that no kernel name is shadowed.)"""
        kernel = self.__getattr__(name)  # not getattr: a kernel may be named like an attribute here
        if "__args" in arguments:
            return kernel(*arguments["__args"], **arguments["__kwargs"])
        return kernel(**arguments)

    def __dir__(self):
        return sorted(set(self._library.specs()) | set(self._user))
