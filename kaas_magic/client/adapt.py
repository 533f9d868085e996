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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from distributed.deploy.adaptive import Adaptive

from .. import config as kaas_config
from ..errors import KaasUsageError

if TYPE_CHECKING:
    from .pool import Pool

logger = logging.getLogger(__name__)

#: Events kept per adaptive object (each scale-up or -down, with its reason).
EVENTS_KEPT = 200


# -- the policy: a pure function of a window of load samples --


@dataclass(frozen=True)
class DeviceLoad:
    """One device of a worker, as it said: its (best) target, calls running and waiting for
    their turn, and how many it runs at once."""

    target: str
    running: int = 0
    queued: int = 0
    concurrency: int = 1


@dataclass(frozen=True)
class WorkerLoad:
    """One worker's answer to ``kaas_adapt_load``."""

    name: str
    address: str = ""
    devices: tuple[DeviceLoad, ...] = ()
    active: int = 0  # calls inside the worker (arrived, not yet answered)
    kept: int = 0  # kept buffers it holds (any client's)
    idle_s: float = 0.0  # seconds since its last call ended (0 while one runs)

    @property
    def busy(self) -> bool:
        return self.active > 0 or any(d.running or d.queued for d in self.devices)


@dataclass
class Sample:
    """The pool's load at time ``t``: every ready worker's answer, and calls waiting on this
    client for a worker to route to (``pending``: target -> calls)."""

    t: float
    workers: tuple[WorkerLoad, ...] = ()
    pending: dict[str, int] = field(default_factory=dict)

    def queued(self) -> int:
        return sum(d.queued for w in self.workers for d in w.devices) + sum(self.pending.values())


@dataclass(frozen=True)
class Policy:
    """How the pool grows and shrinks (``kaas.adapt.*``; per pool: ``pool.adapt(**policy)``).

    interval: seconds between load samples (and decisions);
    scale_up_after: seconds calls must have been queueing before workers are added;
    idle_after: seconds a worker must have been idle before it is removed;
    target_occupancy: the share of a worker's places (concurrency per device) that a
        scale-up aims to fill;
    settle: seconds a worker taken out of routing waits for calls already on their way
        to it before it is asked to retire.
    """

    interval: float = 1.0
    scale_up_after: float = 5.0
    idle_after: float = 60.0
    target_occupancy: float = 0.8
    settle: float = 0.5

    @classmethod
    def configured(cls, **overrides: Any) -> "Policy":
        """kaas.adapt.* with ``overrides`` (None: the setting), each checked."""
        values = {
            "interval": kaas_config.get("adapt.interval"),
            "scale_up_after": kaas_config.get("adapt.scale-up-after"),
            "idle_after": kaas_config.get("adapt.idle-after"),
            "target_occupancy": kaas_config.get("adapt.target-occupancy"),
            "settle": kaas_config.get("adapt.settle"),
        }
        unknown = set(overrides) - set(values)
        if unknown:
            raise KaasUsageError(f"unknown autoscaling option(s) {', '.join(sorted(unknown))}: "
                                 f"the policy takes {', '.join(sorted(values))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        checked = {}
        for name, value in values.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            low_ok = number > 0 if name in ("interval", "target_occupancy") else number >= 0
            if not (math.isfinite(number) and low_ok) or (name == "target_occupancy" and number > 1):
                raise KaasUsageError(f"autoscaling {name} must be a finite number of seconds"
                                     + (" in (0, 1]" if name == "target_occupancy" else " >= 0")
                                     + f", not {value!r}")
            checked[name] = number
        return cls(**checked)

    @property
    def window(self) -> float:
        """Seconds of samples kept: enough to see a queue last ``scale_up_after``."""
        return self.scale_up_after + 3 * self.interval


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str = ""  # empty when nothing changes
    idle: tuple[str, ...] = ()  # names of workers that may be closed, most idle first


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _demand_need(sample: Sample, policy: Policy, default_capacity: int) -> tuple[int, int, dict[str, int]]:
    """(workers needed for the calls running and queued now, calls in all, calls per target)."""
    demand: dict[str, int] = collections.Counter()
    capacity: dict[str, list[int]] = {}
    for worker in sample.workers:
        per_target: dict[str, int] = collections.Counter()
        for d in worker.devices:
            demand[d.target] += d.running + d.queued
            per_target[d.target] += max(d.concurrency, 1)
        for target, places in per_target.items():
            capacity.setdefault(target, []).append(places)
    for target, calls in sample.pending.items():
        demand[target] += calls
    need = 0
    for target, calls in demand.items():
        if calls <= 0:
            continue
        places = capacity.get(target)
        per_worker = sum(places) / len(places) if places else max(default_capacity, 1)
        need = max(need, math.ceil(calls / (per_worker * policy.target_occupancy)))
    return need, sum(demand.values()), dict(demand)


def queueing_for(samples: Sequence[Sample]) -> float:
    """Seconds calls have been queueing without a break, up to the latest sample (0 when
    the latest has none)."""
    if not samples or samples[-1].queued() <= 0:
        return 0.0
    start = samples[-1].t
    for sample in reversed(samples):
        if sample.queued() <= 0:
            break
        start = sample.t
    return samples[-1].t - start


def decide(samples: Sequence[Sample], current: int, policy: Policy, minimum: int = 0,
           maximum: float = math.inf, default_capacity: int = 4) -> Decision:
    """The number of workers the pool should have, and why, from a window of load samples
    (oldest first). ``current``: the workers the pool has or has asked for.

    - none at all and calls waiting: at once, enough for them (at least one);
    - calls queueing for ``scale_up_after`` or more: enough workers for the calls running
      and queued to fill ``target_occupancy`` of each worker's places;
    - no queue, and workers idle (nothing in flight, no kept buffer) for ``idle_after``:
      those go, keeping what the load needs and ``minimum``;
    - always within ``minimum`` and ``maximum``.
    """
    def bounded(n: int) -> int:
        return int(max(minimum, min(n, maximum)))

    if not samples:
        return Decision(bounded(current), "" if minimum <= current <= maximum else
                        f"{'below the minimum' if current < minimum else 'above the maximum'}: "
                        f"{current} -> {bounded(current)} workers")
    latest = samples[-1]
    need, calls, _ = _demand_need(latest, policy, default_capacity)
    queued = latest.queued()
    waiting = sum(latest.pending.values())
    if current == 0 and waiting > 0:
        desired = bounded(max(1, need))
        if desired > 0:
            return Decision(desired, f"{_plural(waiting, 'call')} waiting with no worker: 0 -> {desired} "
                                     f"worker{'' if desired == 1 else 's'}")
    if current < minimum:
        return Decision(bounded(current), f"below the minimum: {current} -> {bounded(current)} workers")
    queued_s = queueing_for(samples)
    if queued > 0 and queued_s >= policy.scale_up_after and need > current:
        desired = bounded(need)
        if desired > current:
            return Decision(desired, f"queue of {queued} for {_seconds(queued_s)} ({calls} calls, "
                                     f"{policy.target_occupancy:.0%} occupancy): {current} -> {desired} workers")
    if queued == 0:
        idle = sorted((w for w in latest.workers
                       if not w.busy and w.kept == 0 and w.idle_s >= policy.idle_after),
                      key=lambda w: -w.idle_s)
        if idle:
            desired = bounded(max(current - len(idle), need))
            if desired < current:
                going = idle[:current - desired]
                names = ", ".join(w.name for w in going)
                return Decision(desired, f"worker{'s' if len(going) > 1 else ''} {names} idle "
                                         f"{_seconds(going[-1].idle_s)}: {current} -> {desired} workers",
                                tuple(w.name for w in going))
    if current > maximum:
        return Decision(bounded(current), f"above the maximum: {current} -> {bounded(current)} workers")
    return Decision(current)


# -- the Dask side --


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
