"""The client's kernels: the shipped library, those this client registered, and which
spec and target a kernel call uses."""

from __future__ import annotations

import concurrent.futures
import io
from typing import TYPE_CHECKING, Any

from .. import config as kaas_config
from ..protocol import CALL_RESULT, COMPILE_HOW

if TYPE_CHECKING:
    from ..pool_status import KernelTable


class KernelRegistry:
    """Kernels known to one pool. ``registered`` (name -> KernelSpec) go with every call
    that uses them; the library is read on first use."""

    def __init__(self, control):
        self._control = control
        self.registered: dict = {}  # kernels this client registered: name -> KernelSpec
        self._library: dict | None = None  # the shipped kernels, read on first use

    def library(self) -> dict:
        if self._library is None:
            from ..kernelspec import load_library

            self._library = load_library()
        return self._library

    def specs(self, name: str) -> list:
        if name in self.registered:
            return [self.registered[name]]
        specs = self.library().get(name)
        if not specs:
            from ..kernelspec import KernelError

            known = sorted(set(self.library()) | set(self.registered))
            raise KernelError(f"unknown kernel {name!r}; known kernels: {', '.join(known)}")
        return specs

    def route(self, specs: list, target: str | None, backend: str | None, fallback: bool | None):
        """Pick (spec, target): a real device first, then a simulator, then a stand-in;
        waits for a pool still warming up (see Router.kernel_choice)."""
        if fallback is None:
            fallback = bool(kaas_config.get("fallback"))
        router = self._control.router
        while True:
            choice = router.kernel_choice(specs, target, backend, fallback)
            if choice is not None:
                return choice
            if not router.warming():
                raise router.kernel_unavailable(specs, target, backend, fallback)
            self._control.wait_ready()

    def call(self, submit, name: str, args: tuple, kwargs: dict, *, target, backend, fallback, keep, timeout,
             retries, t_start: float, watch=None) -> Any:
        """Pool.call: bind the arguments to the kernel's signature and send the call
        (``submit``: the call path's)."""
        from ..kernelspec import bind  # not at import: kernelspec imports the backends

        specs = self.specs(name)
        spec, target = self.route(specs, target, backend, fallback)
        if spec.params is not None:
            # Fails here, naming the argument, before anything is sent. The arguments then
            # travel by parameter name (an error sending one names it).
            inputs = bind(spec, args, kwargs).values
        else:  # a Python kernel taking any arguments
            inputs = {"__args": args, "__kwargs": kwargs}
        body = {"op": "call", "kernel": name, "kernels": [spec.to_dict()] if spec.origin == "user" else [],
                "filename": f"<kaas call {name}>"}
        result = submit(body, target, inputs, [CALL_RESULT], backend=spec.backend, fallback=True, worker=None,
                        stdout=io.StringIO(), stderr=None, keep=keep, progress=None, timeout=timeout,
                        retries=retries, t_start=t_start, watch=watch)
        return result.outputs[CALL_RESULT]

    def register(self, operation, source: str, language: str, *, signature, name, target, fallback, line_offset):
        """Pool.register: compile on one warm worker, then on every other that could serve
        the kernel's calls, at once (``operation``: Pool._operation, sending the "compile"
        operation); a failure registers nothing."""
        from ..kernelspec import spec_from_source

        spec = spec_from_source(source, language, signature=signature, name=name,
                                targets=(target,) if target else (), line_offset=line_offset)
        previous = self.registered.get(spec.name)
        self.registered[spec.name] = spec
        compile_here = dict(op="compile", target=None, inputs={}, output=COMPILE_HOW, kernel=spec.name,
                            kernels=[spec.to_dict()], backend=spec.backend, fallback=True,
                            filename=f"<kaas register {spec.name}>")
        try:
            chosen, compile_here["target"] = self.route([spec], target, None, fallback)
            result = operation(**compile_here)
            # Then on every other worker that could serve its calls, at once, so that no
            # call pays for a compile.
            others = {route.address for route, service, _ in self._control.router.candidates(
                compile_here["target"], spec.backend, True, None)} - {result.record.worker}
            if others:
                with concurrent.futures.ThreadPoolExecutor(len(others)) as ex:
                    list(ex.map(lambda w: operation(**compile_here, worker=w), sorted(others)))
        except BaseException:
            if previous is None:
                del self.registered[spec.name]
            else:
                self.registered[spec.name] = previous
            raise
        return spec, result.record

    def table(self, status) -> "KernelTable":
        """Every kernel known, and where each is compiled (from the pool's status)."""
        from ..pool_status import KernelTable

        compiled: dict[str, list] = {}
        for worker in status.workers:
            for row in worker.get("kernels", []):
                compiled.setdefault(row["name"], []).append({"worker": worker.get("name"), **row})
        specs = [s for specs in self.library().values() for s in specs] + list(self.registered.values())
        return KernelTable(specs, compiled)

