"""What ``%kaas status`` shows: every worker, what it serves on which device, how busy."""

from __future__ import annotations

import html
from dataclasses import dataclass


@dataclass
class PoolStatus:
    scheduler: str
    embedded: bool
    workers: list[dict]

    def rows(self) -> list[dict]:
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
                        "calls": s.get("calls", 0),
                    }
                )
        return rows

    @property
    def in_flight(self) -> int:
        return sum(w.get("in_flight", 0) for w in self.workers)

    def __str__(self) -> str:
        kind = "embedded LocalCluster" if self.embedded else "connected"
        lines = [f"kaas pool ({kind}) at {self.scheduler}: {len(self.workers)} worker(s), {self.in_flight} call(s) in flight"]
        for w in self.workers:
            state = "ready" if w.get("ready") else "warming up"
            if "error" in w:
                state = f"unreachable: {w['error']}"
            lines.append(
                f"- worker {w.get('name')} {w['address']} on {w.get('host', '?')}: {state}, "
                f"{w.get('in_flight', 0)} in flight, concurrency {w.get('concurrency', '?')}"
            )
            for s in w.get("services", []):
                tag = "" if s["kind"] == "device" else f" [{s['kind'].upper()}]"
                lines.append(f"    {s['target']:<5} {s['backend']:<7}{tag} {s['device']}  ({s.get('calls', 0)} calls)")
            for name, state in w.get("backends", {}).items():
                if not str(state).startswith("ready"):
                    lines.append(f"    backend {name}: {state}")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = "<tr><th>worker</th><th>target</th><th>backend</th><th>kind</th><th>device</th><th>calls</th></tr>"
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(r[k]))}</td>" for k in ("worker", "target", "backend", "kind", "device", "calls")) + "</tr>"
            for r in self.rows()
        )
        title = html.escape(str(self).splitlines()[0])
        return f"<div><b>{title}</b><table>{head}{body}</table></div>"


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
