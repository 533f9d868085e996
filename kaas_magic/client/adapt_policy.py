"""The autoscaling policy, pure: a window of the pool's load samples in, a worker count
and its reason out (:func:`decide`). No Dask and nothing sent here (only ``kaas.adapt.*``
is read), so it is tested without a cluster: see :mod:`.adapt` for the Dask ``Adaptive``
that samples the workers and acts on the decision."""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from .. import config as kaas_config
from ..errors import KaasUsageError


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
