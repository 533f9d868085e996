"""The notebook side: a pool of warm workers, how calls are routed, and the hot path.

``Pool.run`` is the one execution path behind every magic and API call:

1. route: pick a worker that advertises the target (Dask worker resources), preferring a
   real device, then a simulator, then (only when allowed) a CPU stand-in;
2. serialise the inputs (refusing, by name, any that cannot travel);
3. talk to that worker directly over a link of its own (no scheduler round trip), relay
   its print output as it arrives, and read the final reply;
4. rebuild outputs, or the cell's exception with the cell's line numbers, and a RunRecord.

One job a module:

- :mod:`.pool`: ``Pool``, a facade: start/connect/close, and thin methods over the parts;
- :mod:`.cluster`: the Dask client of an embedded LocalCluster (mutual TLS) or a scheduler;
- :mod:`.router`: pure routing: the table, load and dead workers in, a worker out;
- :mod:`.control`: the control plane over Dask's comms: the table and load refreshed in the
  background, info, metrics, endpoints, frees, cancelling;
- :mod:`.calls`: the call path: request, link, streamed output, reply, outputs, timings;
- :mod:`.kept`: data kept on devices: handles, routing to their worker, frees;
- :mod:`.kernels`: the library and registered kernels, and which spec and target a call uses.
"""

from .calls import RunResult, _deserialize_outputs, _serialize_inputs, _transfer_limits  # noqa: F401
from .pool import Pool
from .router import WorkerRoute

__all__ = ["Pool", "RunResult", "WorkerRoute"]
