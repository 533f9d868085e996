"""Which of a notebook's variables a cell sends (Pool.run_cell), chosen when the call
starts and narrowed once the call is routed to a backend."""

from __future__ import annotations

from ..errors import KaasError


class CellInputs:
    """What Pool.run_cell sends: ``names``, or the names the cell reads that ``namespace``
    defines, less ``exclude`` and the names the routed backend injects (``xp``, ``device``
    ...). Routing needs the inputs (a call goes where its kept data is) before the backend
    is known: it sees every candidate, then :meth:`for_backend` drops the injected ones."""

    def __init__(self, code: str, namespace: dict, names, exclude, filename: str | None, line_offset: int):
        from ..cellcode import analyse

        self.explicit = names is not None
        if names is None:
            reads = analyse(code, filename or "<kaas-cell>", line_offset).reads
            skip = set(exclude)
            self.names = [n for n in sorted(reads) if n in namespace and n not in skip]
        else:
            self.names = list(names)
            missing = [n for n in self.names if n not in namespace]
            if missing:
                raise KaasError(f"--in names variables that are not defined: {', '.join(missing)}")
        # Their values now: a call in the background sends what the cell saw when it started.
        self.values = {n: namespace[n] for n in self.names}

    def candidates(self) -> dict:
        return dict(self.values)

    def for_backend(self, backend: str) -> dict:
        if self.explicit:
            return self.candidates()
        from .. import backends

        injected = set(backends.injected_names(backend))
        return {n: v for n, v in self.values.items() if n not in injected}
