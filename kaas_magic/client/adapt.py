"""Growing and shrinking the pool with its load: a Dask ``Adaptive`` driven by kaas's own
figures.

kaas's calls bypass the Dask scheduler (they go over direct links to the workers), so
Dask's own adaptive target, which counts tasks, sees nothing. :class:`KaasAdaptive` keeps
Dask's machinery (its periodic check, ``plan``/``requested``/``observed``, the cluster
manager's ``scale`` and ``scale_down``), so it works with ``LocalCluster`` and with any
cluster manager that supports ``adapt`` (dask-jobqueue, dask-kubernetes, Gateway), and
replaces the two decisions:

- ``target()``: every ``interval`` it asks each ready worker for its load
  (``kaas_adapt_load``: calls running and queued per device, its concurrency, whether a
  call is in flight, kept buffers, seconds idle) and adds the calls waiting on this client
  for a worker at all (a pool scaled to zero). :func:`decide`, a pure function of that
  window of samples, turns it into a worker count and a reason.
- ``workers_to_close()``/``scale_down()``: only workers idle for ``idle_after`` with no
  call in flight and no kept buffers; each is first taken out of this client's routing,
  then the worker itself is asked to retire (``kaas_retire``), which it accepts only with
  no call in flight and no kept buffer, and after which it refuses calls instead of
  running them. A worker that refuses to retire stays (and is routed to again).

Every scale-up and scale-down is written, with its reason, to :attr:`KaasAdaptive.events`
(``pool.adapt_log()``); the pool monitor shows the latest.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any

from distributed.deploy.adaptive import Adaptive

from .. import config as kaas_config
from ..errors import KaasUsageError
# The policy lives in adapt_policy (pure); its names are imported from here too.
from .adapt_policy import Decision, DeviceLoad, Policy, Sample, WorkerLoad, decide, queueing_for

if TYPE_CHECKING:
    from .pool import Pool

logger = logging.getLogger(__name__)

#: Events kept per adaptive object (each scale-up or -down, with its reason).
EVENTS_KEPT = 200


# -- the Dask side (the policy: see adapt_policy) --


def _parse_load(name: str, address: str, reply: Any) -> WorkerLoad | None:
    if not isinstance(reply, dict):
        return None
    devices = tuple(
        DeviceLoad(str(d.get("target", "")), int(d.get("running", 0)), int(d.get("queued", 0)),
                   int(d.get("concurrency", 1)))
        for d in reply.get("devices", ()) if isinstance(d, dict))
    return WorkerLoad(name, address, devices, int(reply.get("active", 0)), int(reply.get("kept", 0)),
                      float(reply.get("idle_s", 0.0)))


class KaasAdaptive(Adaptive):
    """Dask's ``Adaptive`` whose target comes from kaas's load (see the module's docstring).

    Made by ``cluster.adapt(Adaptive=KaasAdaptive, pool=pool, ...)`` (what :meth:`Pool.adapt`
    does). Policy options: those of :class:`Policy` (default ``kaas.adapt.*``).
    """

    def __init__(self, cluster=None, pool: "Pool | None" = None, interval=None, minimum: int | None = None,
                 maximum: int | float | None = None, wait_count: int = 1, scale_up_after: float | None = None,
                 idle_after: float | None = None, target_occupancy: float | None = None,
                 settle: float | None = None, **kwargs: Any):
        if pool is None:
            raise KaasUsageError("KaasAdaptive needs the kaas pool it scales: cluster.adapt(Adaptive=KaasAdaptive, "
                                 "pool=pool, ...), or simply pool.adapt(minimum, maximum)")
        self.pool = pool
        self.policy = Policy.configured(interval=interval, scale_up_after=scale_up_after, idle_after=idle_after,
                                        target_occupancy=target_occupancy, settle=settle)
        #: (time.time(), line) of every scale-up and scale-down, with its reason.
        self.events: collections.deque[tuple[float, str]] = collections.deque(maxlen=EVENTS_KEPT)
        self.samples: collections.deque[Sample] = collections.deque()
        self.decision: Decision | None = None
        # Retirements tried, and those a worker declined (a call reached it meanwhile).
        self.retirements = collections.Counter()
        self._events_lock = threading.Lock()
        super().__init__(cluster, interval=self.policy.interval, minimum=minimum, maximum=maximum,
                         wait_count=wait_count, **kwargs)

    # -- what the workers say --

    async def _on_control_loop(self, coro):
        control = self.pool._control
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is control.loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, control.loop))

    async def sample(self) -> Sample:
        """Every ready worker's load now, and the calls waiting on this client for one."""
        control = self.pool._control

        async def ask_all():
            async def ask(route):
                try:
                    reply = await asyncio.wait_for(control.call(route.address, "kaas_adapt_load"), timeout=2)
                except Exception:  # slow or gone: left out of this sample
                    return None
                return _parse_load(route.name, route.address, reply)

            routes = [r for r in control.router.routes() if r.ready]
            return [w for w in await asyncio.gather(*(ask(r) for r in routes)) if w is not None]

        workers = await self._on_control_loop(ask_all())
        return Sample(time.monotonic(), tuple(workers), control.pending_demand())

    async def target(self) -> int:
        sample = await self.sample()
        self.samples.append(sample)
        while self.samples and self.samples[0].t < sample.t - self.policy.window:
            self.samples.popleft()
        current = len(self.plan)
        self.decision = decide(list(self.samples), current, self.policy, self.minimum, self.maximum,
                               int(kaas_config.get("pool.concurrency")))
        return self.decision.desired

    # -- acting on it --

    def note(self, line: str) -> None:
        with self._events_lock:
            self.events.append((time.time(), line))
        logger.info("kaas autoscaling: %s", line)

    async def scale_up(self, n):
        reason = self.decision.reason if self.decision and self.decision.reason else f"scale to {n} workers"
        self.note(reason)
        await super().scale_up(n)

    async def workers_to_close(self, target: int) -> list:
        """Idle workers (see :func:`decide`), as the cluster manager names them."""
        decision = self.decision
        if decision is None or not decision.idle:
            return []
        by_name = {str(token): token for token in self.plan}
        chosen = [by_name[n] for n in decision.idle if n in by_name]
        return chosen[:max(len(self.plan) - target, 0)]

    async def scale_down(self, workers):
        if not workers:
            return
        retiring = []
        for token in workers:
            if await self._retire(str(token)):
                retiring.append(token)
        if not retiring:
            return
        names = ", ".join(map(str, retiring))
        reason = self.decision.reason if self.decision and self.decision.reason else ""
        self.note(reason if reason and all(str(t) in reason for t in retiring) else
                  f"retiring idle worker{'s' if len(retiring) > 1 else ''} {names}"
                  + (f" ({reason})" if reason else ""))
        try:
            await super().scale_down(retiring)
        except BaseException:
            # Not retired after all: let those workers serve again rather than refuse calls.
            for token in retiring:
                await self._unretire(str(token))
            raise
        finally:
            self.samples.clear()  # the window described the pool before

    async def _unretire(self, name: str) -> None:
        route = self.pool._router.route_named(name)
        if route is None:
            return
        try:
            await self._on_control_loop(asyncio.wait_for(
                self.pool._control.call(route.address, "kaas_retire", cancel=True), timeout=5))
        except Exception:  # gone after all
            return
        self.pool._router.unmark_retiring(route.address)

    async def _retire(self, name: str) -> bool:
        """Take worker ``name`` out of routing and have it retire; False (and routed to
        again) when a call reached it meanwhile or it keeps buffers."""
        router = self.pool._router
        route = router.route_named(name)
        if route is None:  # not (or no longer) a worker this client routes to: no call there
            return True
        address = route.address
        self.retirements["tried"] += 1
        router.mark_retiring(address)
        try:
            # This client's calls routed there before the mark: wait until they are sent and done.
            deadline = time.monotonic() + max(10.0, 4 * self.policy.settle)
            while router.in_flight[address] > 0 or router.chosen_within(address, self.policy.settle):
                if time.monotonic() > deadline:
                    raise _Busy()
                await asyncio.sleep(0.05)
            reply = await self._on_control_loop(asyncio.wait_for(
                self.pool._control.call(address, "kaas_retire", quiet=self.policy.settle), timeout=5))
            if not (isinstance(reply, dict) and reply.get("ok")):
                raise _Busy()
        except Exception:
            self.retirements["declined"] += 1
            router.unmark_retiring(address)
            return False
        return True

    def stop(self, reason: str = "unknown") -> None:
        """Stop adapting (the pool keeps the workers it has). Safe from any thread."""
        loop = getattr(getattr(self, "loop", None), "asyncio_loop", None)
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is None or here is loop or loop.is_closed() or not loop.is_running():
            super().stop(reason=reason)
            return

        async def stop():
            Adaptive.stop(self, reason=reason)

        future = asyncio.run_coroutine_threadsafe(stop(), loop)
        if reason == "adaptive-deleted":  # from the garbage collector: never wait there
            return
        try:
            future.result(10)
        except Exception:
            super().stop(reason=reason)

    def log_lines(self) -> list[str]:
        """The events as lines: "HH:MM:SS reason"."""
        with self._events_lock:
            events = list(self.events)
        return [f"{time.strftime('%H:%M:%S', time.localtime(t))} {line}" for t, line in events]

    def latest_reason(self) -> str:
        with self._events_lock:
            return self.events[-1][1] if self.events else ""

    def __repr__(self) -> str:
        return (f"<KaasAdaptive {self.state} minimum={self.minimum} maximum={self.maximum} "
                f"workers={len(self.plan)}>")


class _Busy(Exception):
    pass


# -- starting it --


def start_adaptive(pool: "Pool", minimum: int = 1, maximum: int | float | None = None, cluster=None,
                   **policy: Any) -> KaasAdaptive:
    """``pool.adapt(...)``: make the pool's cluster manager adapt with kaas's policy."""
    cluster = cluster if cluster is not None else pool.cluster
    if cluster is None or not hasattr(cluster, "adapt"):
        raise KaasUsageError(
            "this pool is connected to a scheduler it did not start, so kaas cannot add or remove its "
            "workers: pass the cluster manager that runs them, pool.adapt(minimum, maximum, cluster=cluster) "
            "(a LocalCluster, or a dask-jobqueue, dask-kubernetes or Dask Gateway cluster object), or use a "
            "pool kaas started (kaas.start())")
    minimum, maximum = _bounds(minimum, maximum)
    Policy.configured(**policy)  # a bad option fails here, before anything stops
    return cluster.adapt(Adaptive=KaasAdaptive, pool=pool, minimum=minimum, maximum=maximum, **policy)


def _bounds(minimum: Any, maximum: Any) -> tuple[int, int | float]:
    def count(value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise KaasUsageError(f"{name} must be a whole number of workers, not {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise KaasUsageError(f"{name} must be a whole number of workers, not {value!r}") from None
        if not number.is_integer() or number < 0:
            raise KaasUsageError(f"{name} must be a whole number of workers >= 0, not {value!r}")
        return int(number)

    low = count(minimum, "minimum")
    if maximum is None or (isinstance(maximum, float) and math.isinf(maximum)):
        return low, math.inf
    high = count(maximum, "maximum")
    if high < low:
        raise KaasUsageError(f"maximum ({high}) must be at least minimum ({low})")
    if high == 0:
        raise KaasUsageError("maximum must be at least 1 worker")
    return low, high


def adapt_command(pool: "Pool", line: str) -> str:
    """What ``%kaas adapt`` does with the rest of its line, as a message to show:

    ``MIN MAX [key=value ...]`` starts (or changes) autoscaling, keys being the policy's
    (``interval``, ``scale_up_after``/``scale-up-after``, ``idle_after``, ``target_occupancy``,
    ``settle``); ``off`` (or ``stop``) stops it; nothing shows its state and latest events.
    Raises :class:`KaasUsageError` for a bad line."""
    words = line.split()
    adaptive = getattr(pool, "_adaptive", None)
    if not words:
        if adaptive is None or adaptive.state == "stopped":
            return "autoscaling is off (%kaas adapt MIN MAX to start it)"
        lines = [f"autoscaling between {adaptive.minimum} and {adaptive.maximum} workers"]
        return "\n".join(lines + adaptive.log_lines()[-10:])
    if words[0] in ("off", "stop"):
        if len(words) > 1:
            raise KaasUsageError("%kaas adapt off takes nothing more")
        if adaptive is None or adaptive.state == "stopped":
            return "autoscaling was not on"
        pool.adapt_stop()
        return f"autoscaling stopped; the pool keeps its {len(pool.routes())} workers"
    positional = [w for w in words if "=" not in w]
    if len(positional) not in (1, 2):
        raise KaasUsageError("usage: %kaas adapt MIN MAX [interval=S scale_up_after=S idle_after=S "
                             "target_occupancy=F settle=S] | %kaas adapt off")
    policy = {}
    for word in words:
        if "=" in word:
            key, _, value = word.partition("=")
            policy[key.strip().replace("-", "_")] = value
    maximum = positional[1] if len(positional) > 1 else None
    if maximum in ("inf", "none", "None"):
        maximum = None
    adaptive = pool.adapt(positional[0], maximum, **policy)
    p = adaptive.policy
    return (f"autoscaling between {adaptive.minimum} and {adaptive.maximum} workers: up after "
            f"{p.scale_up_after:g} s of queueing, down after {p.idle_after:g} s idle")


__all__ = ["Decision", "DeviceLoad", "KaasAdaptive", "Policy", "Sample", "WorkerLoad", "adapt_command",
           "decide", "queueing_for", "start_adaptive"]
