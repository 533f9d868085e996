"""What ``%kaas status`` shows: every worker, its physical devices with what each serves
and how busy it is (in the pool monitor's words), and which backends are still warming up."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

WARMING_STATES = ("pending", "warming")


@dataclass
class PoolStatus:
    scheduler: str
    embedded: bool
    workers: list[dict]
    # The pool's metrics rows (ControlPlane.metrics: call counts summed over a worker's
    # incarnations), one per backend session; grouped per physical device as the monitor does.
    metrics: list[dict] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """One row per service (target, backend) of every worker."""
        rows = []
        for w in self.workers:
            for s in w.get("services", []):
                rows.append(
                    {
                        "worker": w.get("name", w["address"]),
                        "address": w["address"],
                        "target": s["target"],
                        "backend": s["backend"],
                        "kind": s["kind"],
                        "device": s["device"],
                        "physical_device": s.get("physical_device", ""),
                        "calls": s.get("calls", 0),
                    }
                )
        return rows

    def devices(self, worker: dict | None = None) -> list:
        """The physical devices (pool_monitor.DeviceLoad) of one worker, or of all. A
        worker that sent no metrics has its devices made from its services (no load)."""
        from .pool_monitor import group_devices

        workers = self.workers if worker is None else [worker]
        devices = []
        for w in workers:
            rows = [m for m in self.metrics if m.get("worker") == w["address"]]
            if not rows:
                rows = [{"worker": w["address"], "worker_name": w.get("name", w["address"]), "host": w.get("host", ""),
                         "target": s["target"], "backend": s["backend"], "kind": s["kind"], "device": s["device"],
                         "physical_device": s.get("physical_device") or f"{s['backend']}:{s['device']}",
                         "services": [s["resource"]] if s.get("resource") else [], "calls": s.get("calls", 0),
                         "concurrency": w.get("concurrency") or 0}
                        for s in w.get("services", [])]
            devices += group_devices(rows)
        return devices

    def warming(self) -> list[str]:
        """"worker 1 (jax, opencl)" for every worker still warming up, with its backends
        (or its kernel library, once every backend is up)."""
        out = []
        for w in self.workers:
            if "error" in w:
                continue
            backends = [name for name, state in w.get("backends", {}).items() if str(state) in WARMING_STATES]
            if backends or not w.get("ready", True):
                out.append(f"worker {w.get('name', w['address'])} ({', '.join(backends) or 'kernel library'})")
        return out

    @property
    def in_flight(self) -> int:
        if self.metrics:
            return sum(int(m.get("in_flight") or 0) for m in self.metrics)
        return sum(w.get("in_flight", 0) for w in self.workers)

    def __str__(self) -> str:
        from .pool_monitor import device_summary, plural, serves_summary

        kind = "embedded LocalCluster" if self.embedded else "connected"
        devices = self.devices()
        lines = [f"kaas pool ({kind}) at {self.scheduler}: {plural(len(self.workers), 'worker')}, "
                 f"{plural(len(devices), 'device')}, {self.in_flight} in flight"]
        warming = self.warming()
        if warming:
            lines.append(f"warming up: {'; '.join(warming)}")
        for w in self.workers:
            state = "ready" if w.get("ready") else "warming up"
            if "error" in w:
                state = f"unreachable: {w['error']}"
            lines.append(f"- worker {w.get('name')} {w['address']} on {w.get('host', '?')}: {state}, "
                         f"concurrency {w.get('concurrency', '?')} per device")
            measured = any(m.get("worker") == w["address"] for m in self.metrics)
            for d in self.devices(w):
                tag = "" if d.kind == "device" else f" [{d.kind.upper()}]"
                load = device_summary(d) if measured else plural(d.calls, "call")
                lines.append(f"    {d.physical:<6}{tag} {d.description}: serves {serves_summary(d)}; {load}")
            for name, state in w.get("backends", {}).items():
                if not str(state).startswith("ready"):
                    lines.append(f"    backend {name}: {state}")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        from .pool_monitor import format_percent, serves_summary

        head = ("<tr><th>worker</th><th>device</th><th>serves</th><th>in flight</th><th>busy (10 s)</th>"
                "<th>calls</th></tr>")
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
                d.worker_name, f"{d.physical}: {d.description}", serves_summary(d), f"{d.in_flight}/{d.capacity}",
                format_percent(d.busy_10s), d.calls)) + "</tr>"
            for d in self.devices()
        )
        lines = str(self).splitlines()
        title = html.escape(lines[0])
        warming = f"<div>{html.escape(lines[1])}</div>" if len(lines) > 1 and lines[1].startswith("warming up") else ""
        return f"<div><b>{title}</b>{warming}<table>{head}{body}</table></div>"


@dataclass
class KernelTable:
    """What ``%kaas kernels`` shows: every kernel, its signature, where it is compiled."""

    specs: list
    compiled: dict[str, list[dict]]

    def rows(self) -> list[dict]:
        rows = []
        for spec in self.specs:
            where = [c for c in self.compiled.get(spec.name, []) if c.get("language") == spec.language]
            rows.append({
                "name": spec.name, "language": spec.language, "origin": spec.origin,
                "targets": ",".join(spec.targets), "signature": spec.signature(),
                "compiled_on": sorted({f"{c['worker']}:{c['device']}" for c in where
                                       if c["compiles"] or c.get("disk_loads") or c["cache_hits"]}),
                "compiles": sum(c["compiles"] for c in where),
                "disk_loads": sum(c.get("disk_loads", 0) for c in where),
                "cache_hits": sum(c["cache_hits"] for c in where),
                "calls": sum(c["calls"] for c in where),
                "mean_execute_ms": (1e3 * sum(c["execute_s"] for c in where) / max(1, sum(c["calls"] for c in where))),
            })
        return rows

    def __str__(self) -> str:
        from dask.utils import format_time

        lines = []
        for r in self.rows():
            lines.append(f"{r['name']:<12} {r['language']:<7} {r['origin']:<8} [{r['targets']}] "
                         f"compiles={r['compiles']} disk={r['disk_loads']} warm={r['cache_hits']} calls={r['calls']}"
                         + (f" mean {format_time(r['mean_execute_ms'] / 1e3)}" if r["calls"] else "")
                         + f"\n    {r['signature']}"
                         + "".join(f"\n    compiled on {w}" for w in r["compiled_on"]))
        return "\n".join(lines)

    __repr__ = __str__
