"""The client's router on its own: a routing table in, a choice out. No cluster."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kaas_magic.client.router import Router, WorkerRoute
from kaas_magic.errors import KaasUsageError, TargetUnavailable
from kaas_magic.targets import Service


def route(address: str, *services: tuple[Service, float], name: str | None = None, ready: bool = True,
          incarnation: str = "") -> WorkerRoute:
    return WorkerRoute(address, name or address.rsplit(":", 1)[-1], "host", dict(services), ready, incarnation)


def router_of(*routes: WorkerRoute) -> Router:
    router = Router()
    router.set_table({r.address: r for r in routes})
    return router


CPU = Service("cpu", "numpy", "device")
CPU_JAX = Service("cpu", "jax", "device")
GPU = Service("gpu", "cupy", "device")
GPU_FALLBACK = Service("gpu", "numpy", "fallback")
QPU_SIM = Service("qpu", "qiskit", "simulator")
QPU_DEVICE = Service("qpu", "qiskit", "device")
QPU_FALLBACK = Service("qpu", "numpy", "fallback")


def test_least_loaded_worker_is_chosen():
    router = router_of(route("tcp://a:1", (CPU, 1)), route("tcp://b:1", (CPU, 1)))
    router.note_load("tcp://a:1", {CPU.resource: 3})
    router.note_load("tcp://b:1", {CPU.resource: 1})
    for _ in range(20):
        assert router.choose("cpu", None, False, None)[0].address == "tcp://b:1"


def test_load_is_per_unit_of_concurrency_and_counts_our_own_calls():
    router = router_of(route("tcp://a:1", (CPU, 4)), route("tcp://b:1", (CPU, 1)))
    router.note_load("tcp://a:1", {CPU.resource: 2})  # 2 of 4
    assert router.choose("cpu", None, False, None)[0].address == "tcp://b:1"  # 0 of 1
    router.in_flight["tcp://b:1"] += 1  # ours, since its last report
    assert router.busy("tcp://b:1", CPU) == 1
    assert router.choose("cpu", None, False, None)[0].address == "tcp://a:1"  # 0.5 < 1


def test_our_calls_in_a_report_are_not_counted_twice():
    router = router_of(route("tcp://a:1", (CPU, 1)))
    router.in_flight["tcp://a:1"] = 2
    router.note_load("tcp://a:1", {CPU.resource: 5})  # 2 of the 5 are ours
    assert router.busy("tcp://a:1", CPU) == 5
    router.in_flight["tcp://a:1"] = 0  # ours finished
    assert router.busy("tcp://a:1", CPU) == 3


def test_device_before_simulator_before_fallback():
    router = router_of(route("tcp://a:1", (QPU_FALLBACK, 1)), route("tcp://b:1", (QPU_SIM, 1)))
    router.note_load("tcp://b:1", {QPU_SIM.resource: 100})  # however busy
    assert router.choose("qpu", None, True, None)[1] == QPU_SIM
    router = router_of(route("tcp://a:1", (QPU_FALLBACK, 1)), route("tcp://b:1", (QPU_SIM, 1)),
                       route("tcp://c:1", (QPU_DEVICE, 1)))
    assert router.choose("qpu", None, True, None)[1] == QPU_DEVICE


def test_fallback_only_when_allowed():
    router = router_of(route("tcp://a:1", (GPU_FALLBACK, 1)))
    assert router.choose("gpu", None, False, None) is None
    assert router.choose("gpu", None, True, None)[1] == GPU_FALLBACK
    error = router.unavailable("gpu", None, False, None)
    assert isinstance(error, TargetUnavailable) and "--fallback" in str(error)
    assert "gpu numpy fallback" in str(error)


def test_default_backend_preferred_over_a_less_loaded_other():
    router = router_of(route("tcp://a:1", (CPU_JAX, 1)), route("tcp://b:1", (CPU, 1)))
    router.note_load("tcp://b:1", {CPU.resource: 10})
    assert router.choose("cpu", None, False, None)[1] == CPU  # numpy is cpu's default
    assert router.choose("cpu", "jax", False, None)[1] == CPU_JAX  # unless asked for


def test_worker_pinning_by_address_or_name():
    router = router_of(route("tcp://a:1", (CPU, 1), name="alpha"), route("tcp://b:1", (CPU, 1), name="beta"))
    router.note_load("tcp://b:1", {CPU.resource: 10})
    assert router.choose("cpu", None, False, "tcp://b:1")[0].address == "tcp://b:1"
    assert router.choose("cpu", None, False, "beta")[0].address == "tcp://b:1"
    assert router.choose("cpu", None, False, "nobody") is None
    assert "on worker nobody" in str(router.unavailable("cpu", None, False, "nobody"))


def test_dead_workers_are_skipped_until_a_new_incarnation():
    router = router_of(route("tcp://a:1", (CPU, 1), incarnation="one"), route("tcp://b:1", (CPU, 1)))
    router.note_load("tcp://b:1", {CPU.resource: 10})
    assert router.choose("cpu", None, False, None)[0].address == "tcp://a:1"
    router.forget("tcp://a:1")
    assert ("tcp://a:1", "one") in router.dead
    assert [r.address for r in router.routes()] == ["tcp://b:1"]
    for _ in range(10):
        assert router.choose("cpu", None, False, None)[0].address == "tcp://b:1"
    # The scheduler still lists the dead one: still skipped. Restarted on the same port: used.
    router.set_table({"tcp://a:1": route("tcp://a:1", (CPU, 1), incarnation="one"),
                      "tcp://b:1": route("tcp://b:1", (CPU, 1))})
    assert router.choose("cpu", None, False, "tcp://a:1") is None
    router.set_table({"tcp://a:1": route("tcp://a:1", (CPU, 1), incarnation="two")})
    assert router.choose("cpu", None, False, None)[0].address == "tcp://a:1"


def test_candidate_cache_is_dropped_when_the_table_changes():
    router = router_of(route("tcp://a:1", (CPU, 1)))
    first = router.candidates("cpu", None, False, None)
    assert router.candidates("cpu", None, False, None) is first  # cached
    router.set_table({"tcp://b:1": route("tcp://b:1", (CPU, 1))})  # a refresh: a new table
    assert [r.address for r, _, _ in router.candidates("cpu", None, False, None)] == ["tcp://b:1"]
    cached = router.candidates("cpu", None, False, None)
    router.forget("tcp://b:1")  # a worker found dead: same table, cache dropped
    assert router.candidates("cpu", None, False, None) is not cached
    assert router.candidates("cpu", None, False, None) == []


def test_served_and_warming():
    router = router_of(route("tcp://a:1", (CPU, 1), (GPU_FALLBACK, 1)), route("tcp://b:1", (QPU_SIM, 1)))
    assert router.served() == ["gpu numpy fallback", "qpu qiskit simulator", "cpu numpy"]
    assert not router.warming()
    router.set_table({"tcp://c:1": route("tcp://c:1", ready=False)})
    assert router.warming()
    assert router_of().warming()


@dataclass(frozen=True)
class Spec:
    name: str
    language: str
    backend: str
    targets: tuple[str, ...]


OPENCL = Spec("saxpy", "opencl", "opencl", ("fpga", "gpu", "cpu"))
CUDA = Spec("saxpy", "cuda", "cupy", ("gpu",))
QISKIT = Spec("bell", "qiskit", "qiskit", ("qpu",))


def test_kernel_spec_and_target_choice():
    specs = [CUDA, OPENCL]
    cpu_opencl = Service("cpu", "opencl", "device")
    fpga_fallback = Service("fpga", "opencl", "fallback")
    router = router_of(route("tcp://a:1", (cpu_opencl, 1), (fpga_fallback, 1)))
    assert router.kernel_choice(specs, None, None, False) == (OPENCL, "cpu")  # the only real device
    router = router_of(route("tcp://a:1", (cpu_opencl, 1), (fpga_fallback, 1), (GPU, 1)))
    assert router.kernel_choice(specs, None, None, False) == (CUDA, "gpu")  # first of equals
    assert router.kernel_choice(specs, "fpga", None, False) is None  # a stand-in only with fallback
    assert router.kernel_choice(specs, "fpga", None, True) == (OPENCL, "fpga")
    assert router.kernel_choice(specs, None, "opencl", False) == (OPENCL, "cpu")
    error = router.kernel_unavailable(specs, "fpga", None, False)
    assert "kernel 'saxpy' on fpga (cuda), fpga (opencl)" in str(error) and "fallback=True" in str(error)
    with pytest.raises(KaasUsageError):
        router.kernel_choice(specs, "abacus", None, False)


def test_kernel_choice_prefers_a_simulator_to_a_stand_in_and_is_cached_per_table():
    router = router_of(route("tcp://a:1", (QPU_FALLBACK, 1)))
    assert router.kernel_choice([QISKIT], None, None, True) is None  # a numpy stand-in, not qiskit's
    router.set_table({"tcp://a:1": route("tcp://a:1", (QPU_SIM, 1))})
    first = router.kernel_choice([QISKIT], None, None, False)
    assert first == (QISKIT, "qpu")
    assert router.kernel_choice([QISKIT], None, None, False) is first
    router.forget("tcp://a:1")
    assert router.kernel_choice([QISKIT], None, None, False) is None


def test_only_workers_not_heard_from_lately_are_asked_for_their_load(monkeypatch):
    import kaas_magic.client.router as router_module

    now = [1000.0]
    monkeypatch.setattr(router_module.time, "monotonic", lambda: now[0])
    router = Router()
    addresses = [f"w{i}" for i in range(1000)]
    # Never heard from: asked, a few at a time however many workers there are.
    first = router.stale_load(addresses, older_than=2.0, at_most=2)
    assert len(first) == 2 and set(first) <= set(addresses)
    for a in addresses[:998]:  # replies carried their load just now
        router.note_load(a, {"svc": 0})
    assert set(router.stale_load(addresses, 2.0, 5)) == {"w998", "w999"}
    now[0] += 3.0  # every report is stale now: the stalest first
    router.note_load("w0", {"svc": 1})
    asked = router.stale_load(addresses, 2.0, 3)
    assert len(asked) == 3 and "w0" not in asked and {"w998", "w999"} <= set(asked)
    router.keep_load_of(addresses[:10])  # workers that left are forgotten
    assert set(router.load_heard) <= set(addresses[:10])


def test_a_reply_carries_its_workers_load_into_routing(pool):
    import time

    for _ in range(20):  # retried until no load request raced the call
        requests = pool._control.load_requests
        before = time.monotonic()
        result = pool.run("z = 1", "cpu")
        if pool._control.load_requests == requests:
            break
    assert pool._control.load_requests == requests, "a load request raced every attempt"
    worker = result.record.worker
    assert pool._router.load_heard[worker] >= before  # heard in the reply: nobody asked
    reported, _ = pool._router.load[worker]
    assert any(s.resource in reported for s in pool._router.table[worker].services)
