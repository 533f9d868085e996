"""The device model: a worker's metrics rows grouped into one load per physical device
(:class:`DeviceLoad`, :func:`group_devices`), and per target across the pool
(:class:`TargetLoad`, :func:`target_loads`).

A worker reports one metrics row per backend session (its own turn of calls); several of
them share one physical device (NumPy, JAX on XLA:CPU, PoCL and Aer all run on the host
CPU), so a device's load is summed over the backends that run on it.
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass
from typing import Iterable

from ..targets import KIND_ORDER, TARGETS, Service


def occupancy(metric: dict) -> float:
    """Calls in flight over the device's concurrency, 0..1."""
    concurrency = metric.get("concurrency") or 0
    return min(1.0, metric.get("in_flight", 0) / concurrency) if concurrency > 0 else 0.0


def physical_device(metric: dict) -> str:
    """The physical device a metrics row's backend runs on ("cpu", "gpu:0"), as the
    worker's session says (``Session.physical_device``); a row from a worker that does not
    say is a device of its own (its session's ``device_id``)."""
    return str(metric.get("physical_device") or metric.get("device_id")
               or f"{metric.get('backend', '?')}:{metric.get('device', '')}")


def row_services(metric: dict) -> list[Service]:
    """Every (target, backend, kind) a row's session serves, its own first."""
    services = [s for s in (Service.from_resource(r) for r in metric.get("services") or ()) if s is not None]
    own = Service(metric["target"], metric["backend"], metric.get("kind", "device"))
    if not any((s.target, s.backend, s.kind) == (own.target, own.backend, own.kind) for s in services):
        services.insert(0, own)
    return services


def median_over_calls(rows: Iterable[dict]) -> float | None:
    """The median latency of a device's calls from its backends' medians: each backend's
    median stands for its calls (a weighted median). Rows without calls count once."""
    pairs = sorted((float(r["median_latency_s"]), max(1, int(r.get("calls") or 0)))
                   for r in rows if r.get("median_latency_s") is not None)
    if not pairs:
        return None
    half, seen = sum(w for _, w in pairs) / 2, 0
    for value, weight in pairs:
        seen += weight
        if seen >= half:
            return value
    return pairs[-1][0]


@functools.cache
def _default_backend(target: str) -> str:
    try:
        from ..backends import registry

        return registry.default_backend(target)
    except Exception:  # an unknown target: no default first
        return ""


@dataclass(frozen=True)
class DeviceLoad:
    """One physical device of one worker, summed over the backends that run on it."""

    worker: str
    worker_name: str
    host: str
    physical: str
    rows: tuple[dict, ...]  # its backends' metrics rows, real devices first
    in_flight: int  # summed: every backend's calls run on this device
    queued: int
    # The largest of its backends' concurrencies, not their sum: calls of different
    # backends on one device compete for it, so four NumPy and four JAX slots on a 2-core
    # CPU are not eight places. More calls than that in flight read as over 100%.
    capacity: int
    # The busiest backend's share of the window: the device was busy at least that long
    # (backends busy at other times make it busier; their sum could count overlaps twice).
    busy_10s: float
    busy_60s: float
    calls: int
    errors: int
    median_latency_s: float | None
    memory_used: int | None
    memory_total: int | None
    kept_bytes: int
    warm_kernels: tuple[str, ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.worker, self.physical)

    @property
    def occupancy(self) -> float:
        return min(1.0, self.in_flight / self.capacity) if self.capacity > 0 else 0.0

    @property
    def backends(self) -> list[str]:
        return list(dict.fromkeys(s.backend for r in self.rows for s in row_services(r)))

    def targets(self) -> dict[str, str]:
        """target -> how this device serves it: "device" if any backend really does, else
        "simulator" or "fallback"; in the usual target order."""
        best: dict[str, str] = {}
        for r in self.rows:
            for s in row_services(r):
                if s.target not in best or KIND_ORDER[s.kind] < KIND_ORDER[best[s.target]]:
                    best[s.target] = s.kind
        return {t: best[t] for t in TARGETS if t in best}

    @property
    def kind(self) -> str:
        """"device", unless every backend here stands in (a simulator, a CPU stand-in)."""
        return min((r.get("kind", "device") for r in self.rows), key=lambda k: KIND_ORDER.get(k, 0))

    @property
    def description(self) -> str:
        """What the device is, in words: the shortest of its backends' descriptions."""
        real = [r for r in self.rows if r.get("kind", "device") == self.kind] or list(self.rows)
        return min((str(r.get("device", "")) for r in real), key=len)


def group_devices(metrics: list[dict]) -> list[DeviceLoad]:
    """One DeviceLoad per (worker, physical device), sorted by worker name then device."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for m in metrics:
        groups.setdefault((m["worker"], physical_device(m)), []).append(m)
    devices = []
    for (worker, physical), rows in groups.items():
        rows.sort(key=lambda r: (KIND_ORDER.get(r.get("kind", "device"), 0),
                                 list(TARGETS).index(r["target"]) if r["target"] in TARGETS else 99,
                                 r["backend"] != _default_backend(r["target"]), r["backend"]))
        used = [r["memory_used"] for r in rows if r.get("memory_used") is not None]
        total = [r["memory_total"] for r in rows if r.get("memory_total") is not None]
        devices.append(DeviceLoad(
            worker=worker,
            worker_name=str(rows[0].get("worker_name") or worker),
            host=str(rows[0].get("host", "")),
            physical=physical,
            rows=tuple(rows),
            in_flight=sum(int(r.get("in_flight") or 0) for r in rows),
            queued=sum(int(r.get("queued") or 0) for r in rows),
            capacity=max(int(r.get("concurrency") or 0) for r in rows),
            busy_10s=max(float(r.get("busy_10s") or 0.0) for r in rows),
            busy_60s=max(float(r.get("busy_60s") or 0.0) for r in rows),
            calls=sum(int(r.get("calls") or 0) for r in rows),
            errors=sum(int(r.get("errors") or 0) for r in rows),
            median_latency_s=median_over_calls(rows),
            # Memory is the device's, whichever backend could tell: the most any saw.
            memory_used=max(used) if used else None,
            memory_total=max(total) if total else None,
            kept_bytes=sum(int(r.get("kept_bytes") or 0) for r in rows),
            warm_kernels=tuple(sorted({k for r in rows for k in r.get("warm_kernels") or ()})),
        ))
    return sorted(devices, key=lambda d: (d.worker_name, d.physical, d.worker))


@dataclass(frozen=True)
class TargetLoad:
    """One target across the pool: the physical devices serving it, and how busy they are."""

    target: str
    devices: int
    kind: str  # "device" if any serves it for real, else "simulator" / "fallback"
    in_flight: int
    capacity: int
    busy_10s: float  # mean over its devices: the fraction of device-time busy
    busy_60s: float
    calls: int


def target_loads(metrics: list[dict]) -> list[TargetLoad]:
    """Per target (in the usual order), the physical devices that serve it, counted once
    each (a CPU stand-in only where no real device serves it), with their load: calls in
    flight and capacity summed, busy averaged. A device's load is all of its calls,
    whichever target they were for."""
    devices = group_devices(metrics)
    loads = []
    for target in TARGETS:
        serving = [(d, d.targets()[target]) for d in devices if target in d.targets()]
        if not serving:
            continue
        # Only the devices that calls go to: stand-ins count where no real device serves it.
        kind = min((k for _, k in serving), key=KIND_ORDER.__getitem__)
        serving = [(d, k) for d, k in serving if k == kind]
        loads.append(TargetLoad(
            target=target,
            devices=len(serving),
            kind=kind,
            in_flight=sum(d.in_flight for d, _ in serving),
            capacity=sum(d.capacity for d, _ in serving),
            busy_10s=statistics.fmean(d.busy_10s for d, _ in serving),
            busy_60s=statistics.fmean(d.busy_60s for d, _ in serving),
            calls=sum(d.calls for d, _ in serving),
        ))
    return loads
