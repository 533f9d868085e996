"""The KaaS side: the same tasks through the warm pool, as a notebook calls it."""

from __future__ import annotations

import io
import time
from typing import TYPE_CHECKING, Any

from ...targets import KIND_ORDER
from .tasks import Task

if TYPE_CHECKING:
    from ...client import Pool


def kaas_call(pool: "Pool", task: Task, worker: str | None = None) -> Any:
    """The task through the pool: ``Pool.call`` as a notebook calls it, or with ``worker``
    the same kernel call pinned to one worker (for the untimed warm-up)."""
    sink = io.StringIO()
    args = task.args
    if task.kernel is None:
        inputs = dict(zip("ab", args))
        return pool.run(task.cell, task.target, inputs=inputs, outputs=["c"], backend=task.backend,
                        fallback=task.fallback, worker=worker, stdout=sink).outputs["c"]
    if worker is None:
        return pool.call(task.kernel, *args, target=task.target, backend=task.backend,
                         fallback=task.fallback, **task.kwargs)
    return pool.run(f"__result = kernels.{task.kernel}(*__args, **__kwargs)", task.target,
                    inputs={"__args": args, "__kwargs": task.kwargs}, outputs=["__result"],
                    backend=task.backend, fallback=task.fallback, worker=worker,
                    stdout=sink).outputs["__result"]


def serving(pool: "Pool", task: Task) -> dict[str, str]:
    """Worker address -> the best kind of service it has for the task (none: not served)."""
    found: dict[str, str] = {}
    for route in pool.routes():
        for service in route.services:
            if service.target != task.target or service.backend != task.backend:
                continue
            if service.kind == "fallback" and not task.fallback:
                continue
            if route.address not in found or KIND_ORDER[service.kind] < KIND_ORDER[found[route.address]]:
                found[route.address] = service.kind
    return found


def checked(task: Task, output: Any) -> None:
    if not task.check(output):
        raise RuntimeError(f"KaaS {task.target} task gave a wrong result: {output!r:.200}")


def time_kaas(pool: "Pool", task: Task, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        output = kaas_call(pool, task)
        times.append(time.perf_counter() - started)
        checked(task, output)
    return times
