"""The pool monitor: one live row per physical device, refreshed from a background thread.

``monitor(pool)`` shows it under the cell, ``panel(pool)`` in JupyterLab's right side area
(a ``sidecar``). A daemon thread polls ``pool.metrics()`` and replaces the HTML of one
ipywidgets ``HTML`` widget.

A worker reports one metrics row per backend session (its own turn of calls); several of
them share one physical device (NumPy, JAX on XLA:CPU, PoCL and Aer all run on the host
CPU). The monitor groups rows by (worker, physical device) into one row each
(:func:`group_devices`), its backends and targets shown as tags, and keeps the last 60 s
of each such row (:class:`History`), drawn as a small inline SVG with the pool's joins and
departures marked on it (:func:`sparkline_svg`).

Everything the monitor knows comes from ``pool.metrics()``; it touches no device library
itself (no NVML at import time, nor ever).

Modules, each with one job:

- ``devices``: metrics rows grouped per physical device and per target (the device model)
- ``history``: the workers seen, the last 60 s of each device row, and its SVG chart
- ``render``: the monitor as HTML (table or side-panel cards) and as text; formatters
- ``live``: the ``Monitor`` thread, ``monitor()`` and ``panel()``, stopping at exit
- ``theme``: the JupyterLab colours the views draw with
"""

from __future__ import annotations

from .devices import (
    DeviceLoad,
    TargetLoad,
    group_devices,
    median_over_calls,
    occupancy,
    physical_device,
    row_services,
    target_loads,
)
from .history import HISTORY_WINDOW, History, Roster, Sample, history_legend, sparkline_svg
from .live import KERNEL_EXIT, MetricsSource, Monitor, _stop_all, monitor, panel
from .render import (
    FIELDS,
    device_summary,
    device_tags,
    format_bytes,
    format_memory,
    format_memory_short,
    format_percent,
    plural,
    render_cards,
    render_monitor,
    render_monitor_text,
    render_table,
    row_fields,
    serves_summary,
)

__all__ = [
    # devices
    "DeviceLoad", "TargetLoad", "group_devices", "median_over_calls", "occupancy", "physical_device",
    "row_services", "target_loads",
    # history
    "HISTORY_WINDOW", "History", "Roster", "Sample", "history_legend", "sparkline_svg",
    # render
    "FIELDS", "device_summary", "device_tags", "format_bytes", "format_memory", "format_memory_short",
    "format_percent", "plural", "render_cards", "render_monitor", "render_monitor_text", "render_table",
    "row_fields", "serves_summary",
    # live
    "KERNEL_EXIT", "MetricsSource", "Monitor", "monitor", "panel",
    "_stop_all",  # the atexit hook; the tests call it
]
