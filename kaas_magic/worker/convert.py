"""A kept buffer of one backend used by a call of another backend on the same device.

A handle names a buffer kept by the backend that made it (NumPy, JAX, CuPy ...). A call that
runs on another backend of the same physical device (``Session.physical_device``: "cpu" for
NumPy, JAX on XLA:CPU, PoCL and Aer alike; "gpu:N" for CuPy and JAX on CUDA device N) gets
the buffer as an array of its own backend, converted here, on the worker, as the handle is
resolved:

1. through DLPack (``__dlpack__``): the new array shares the kept buffer's memory; where the
   framework copies anyway (XLA:CPU shares only 64-byte aligned buffers; JAX without
   ``jax_enable_x64`` narrows 64-bit dtypes), the data pointers differ and the conversion is
   recorded as copied;
2. where DLPack refuses the buffer (strides, a dtype it does not carry): a compact copy made
   on the device by the backend that kept it, then DLPack;
3. where that fails too: through host memory, on the worker (never through the notebook).

Each conversion is reported in the call's reply and so in its run record
(``RunRecord.conversions``, one note line each). A backend that takes no DLPack (OpenCL,
Qiskit) gets a host array made on the worker, as before. A handle kept in a device's own
memory (a CuPy buffer on gpu:0) given to a call on ANOTHER physical device (a ``cpu`` cell)
is refused before the call runs, with an error naming the variable and both devices: kaas
never moves a kept buffer between devices by itself. A buffer in host memory (NumPy, XLA:CPU)
given to a call on another device reaches it as a host array, as any input does.
"""

from __future__ import annotations

from typing import Any

from ..backends.base import Session
from ..errors import KaasUsageError


def physical_device(session: Session) -> str:
    try:
        return str(session.physical_device)
    except Exception:  # a backend that cannot tell: its session is a device of its own
        return session.device_id


def _backend(session: Session) -> str:
    return session.offer.service.backend


def _readable(name: str) -> str:
    if name.startswith("__"):  # kaas.call's positional or keyword arguments
        return "an argument"
    return f"variable {name!r}"


def device_mismatch(name: str, source: Session, target: Session) -> KaasUsageError:
    source_device, target_device = physical_device(source), physical_device(target)
    service = source.offer.service
    return KaasUsageError(
        f"{_readable(name)} is kept on {source_device} ({source.device}, by {_backend(source)}), but this call "
        f"runs on {target_device} ({target.device}, by {_backend(target)}): kaas does not move a kept buffer "
        f"between devices. Run the call on the buffer's device (target {service.target!r}), or bring it home "
        f"with .get() and pass the array. Nothing was run."
    )


def convert(value: Any, name: str, source: Session, target: Session) -> tuple[Any, dict | None]:
    """``value`` (kept by ``source``) as ``target``'s array, and the record of how; the
    record is None when nothing was converted (it is ``target``'s array already). Raises
    KaasUsageError for a buffer in a device's memory given to a call on another device."""
    source_device, target_device = physical_device(source), physical_device(target)
    if source_device != target_device:
        if source_device != HOST:  # in a device's own memory: not moved behind the user's back
            raise device_mismatch(name, source, target)
        # In host memory (NumPy, XLA:CPU) for a call on another device (a GPU, a remote
        # QPU): a host array, as any input is, that the call uploads as it would any other.
        return _host_array(value, name, source, target, "the call runs on another device")
    if target.is_own_array(value):
        return value, None
    if type(target).from_dlpack is Session.from_dlpack:  # a backend that takes no DLPack (OpenCL)
        return _host_array(value, name, source, target, f"{_backend(target)} takes no DLPack")
    record = _record(value, name, source, target)
    before = source.data_pointer(value)
    try:
        out = target.from_dlpack(value)
    except Exception as refused:  # 2: a compact copy on the device, then DLPack
        out = None
        record["why"] = f"DLPack refused it ({_first_line(refused)})"
        try:
            copy = source.device_copy(value)
            if copy is not None:
                out = target.from_dlpack(copy)
                record["how"] = "device copy, then dlpack"
        except Exception:
            out = None
        if out is None:  # 3: through host memory on the worker
            out = target.to_device(source.to_host(value))
            record["how"] = "host memory on the worker"
        record["copied"] = True
        return out, record
    after = target.data_pointer(out)
    if before is not None and after is not None:
        record["copied"] = before != after
    if record["copied"]:
        record["why"] = _why_copied(value, out, before)
    return out, record


HOST = "cpu"  # the physical device whose memory is the worker's own


def _record(value: Any, name: str, source: Session, target: Session) -> dict:
    return {"name": "argument" if name.startswith("__") else name, "from": _backend(source),
            "to": _backend(target), "device": physical_device(target), "copied": False, "how": "dlpack",
            "why": "", "nbytes": int(getattr(value, "nbytes", 0) or 0)}


def _host_array(value: Any, name: str, source: Session, target: Session, why: str) -> tuple[Any, dict | None]:
    """``value`` as a host (NumPy) array made on the worker, for a call that takes those;
    no record when it is one already (a NumPy buffer: passed as it is)."""
    out = source.to_host(value)
    if out is value:
        return value, None
    record = _record(value, name, source, target)
    before, after = source.data_pointer(value), _numpy_pointer(out)
    record.update(how="host array on the worker", why=why,
                  copied=before is None or after is None or before != after)
    return out, record


def _numpy_pointer(value: Any) -> int | None:
    interface = getattr(value, "__array_interface__", None)
    return interface["data"][0] if isinstance(interface, dict) else None


def _why_copied(value: Any, out: Any, pointer: int | None) -> str:
    """Why a framework copied a buffer DLPack offered it, as far as can be told."""
    before, after = str(getattr(value, "dtype", "")), str(getattr(out, "dtype", ""))
    if before and after and before != after:
        return f"{before} became {after} (JAX narrows 64-bit types unless jax_enable_x64 is set)"
    if pointer is not None and pointer % 64:
        return "its data is not 64-byte aligned (XLA:CPU shares only aligned buffers)"
    return "the framework copied it"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__

