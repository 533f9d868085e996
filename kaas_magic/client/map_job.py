"""What one map runs, and where it may: a kernel or code, the batch request's body, the
backend and kind of device the whole map is pinned to, and how each element of the
iterable becomes a batch item's inputs."""

from __future__ import annotations

import hashlib
import io
import sys
from typing import Any, Mapping

from .. import config as kaas_config
from ..errors import KaasUsageError


class MapJob:
    """A map's job, fixed when it starts: ``kind`` (kernel or code), the batch ``body``,
    the ``target``/``backend``/``service_kind`` every batch goes to, and ``pack``."""

    def __init__(self, pool, fn_or_code: str, target, backend, fallback, worker):
        self.worker = worker
        if fallback is None:
            fallback = bool(kaas_config.get("fallback"))
        registry = pool._registry
        # A bare name is a kernel's (code that is only a name would map nothing): an unknown
        # one fails here, naming it, as kaas.call does, not once per item as a NameError.
        if fn_or_code.isidentifier():
            specs = registry.specs(fn_or_code)
            self.spec, self.target = registry.route(specs, target, backend, fallback)
            self.backend, self.fallback = self.spec.backend, True  # the spec's target is the best there is
            self.kind = "kernel"
            self.what = f"kernel {fn_or_code}"
            self.body = {"op": "batch", "kernel": fn_or_code, "filename": f"<kaas map {fn_or_code}>",
                         "kernels": [self.spec.to_dict()] if self.spec.origin == "user" else [],
                         "outputs": [], "outputs_explicit": False}
            self.stdout = io.StringIO()
        else:
            from ..cellcode import analyse

            self.kind = "code"
            self.spec = None
            filename = f"<kaas map {hashlib.blake2b(fn_or_code.encode(), digest_size=8).hexdigest()}>"
            info = analyse(fn_or_code, filename, 0)  # SyntaxError here: nothing is sent
            self.target = target or "cpu"
            self.what = f"code on {self.target}"
            self.body = {"op": "batch", "code": fn_or_code, "filename": filename, "line_offset": 0, "value": True,
                         "outputs": sorted(info.writes), "outputs_explicit": False,
                         "kernels": ([k.to_dict() for k in registry.registered.values()]
                                     if "kernels" in info.reads else [])}
            self.backend, self.fallback = backend, fallback
            self.stdout = sys.stdout
        # One backend and one kind of device for the whole map (as a call would be routed):
        # real devices before simulators before stand-ins, the target's default backend first.
        route, service, _ = pool._control.route(self.target, self.backend, self.fallback, self.worker)
        self.backend, self.service_kind = service.backend, service.kind

    def slots(self, router) -> list:
        """(route, service, concurrency) of every worker that can serve the map now."""
        found = [c for c in router.candidates(self.target, self.backend, self.fallback, self.worker)
                 if c[1].kind == self.service_kind]
        return found

    def pack(self, element: Any) -> dict:
        """One element of the iterable as a batch item's inputs, serialised."""
        if self.kind == "kernel":
            if isinstance(element, Mapping):
                args, kwargs = (), dict(element)
            elif isinstance(element, tuple):
                args, kwargs = element, {}
            else:  # one argument
                args, kwargs = (element,), {}
            if self.spec.params is not None:
                from ..kernelspec import bind

                inputs = bind(self.spec, args, kwargs).values
            else:  # a Python kernel taking any arguments
                inputs = {"__args": args, "__kwargs": kwargs}
        else:
            if not isinstance(element, Mapping):
                raise KaasUsageError(f"a map over code takes a dict of inputs per item, not "
                                     f"{type(element).__name__}")
            inputs = dict(element)
        from .calls import _serialize_inputs

        return _serialize_inputs(inputs)[0]
