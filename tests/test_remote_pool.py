"""Growing beyond one machine: a Dask scheduler and a `kaas worker`, as real subprocesses
on loopback, used through `%kaas connect`, the API, and the environment variable."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import kaas_magic
from kaas_magic.client import Pool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(*command: str, env=None) -> subprocess.Popen:
    """A scheduler or `kaas worker`, in a session of its own so that its nanny and worker
    processes can be signalled together."""
    return subprocess.Popen(list(command), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)


def stop_processes(*procs: subprocess.Popen) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def scheduler_command(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
            "--port", str(port), "--no-dashboard", *extra]


@pytest.fixture(scope="module")
def remote():
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = start_process(*scheduler_command(port))
    env = dict(os.environ, DASK_KAAS__BACKENDS='["numpy", "qiskit"]')
    worker = start_process("kaas", "worker", address, "--name", "gpu-host-1", "--host", "127.0.0.1",
                           "--concurrency", "2", env=env)
    try:
        yield address
    finally:
        stop_processes(worker, scheduler)


def connect_when_up(address: str) -> Pool:
    deadline = time.monotonic() + 60
    while True:
        try:
            return Pool.connect(address, timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# A lambda travels by value: the workers need not import this test module.
_profiler_enabled = lambda: __import__("dask").config.get("distributed.worker.profile.enabled")  # noqa: E731


def test_kaas_worker_serves_its_devices_to_a_remote_scheduler(remote):
    with connect_when_up(remote) as pool:
        pool.wait_ready(timeout=120)
        routes = pool.routes()
        assert [r.name for r in routes] == ["gpu-host-1"]
        services = routes[0].services
        # The worker's own configuration decides what it serves, with its concurrency.
        assert {s.backend for s in services} == {"numpy", "qiskit"}
        assert set(services.values()) == {2.0}
        result = pool.run("y = x[::-1].copy()", "cpu", inputs={"x": np.arange(5)}, stdout=io.StringIO())
        np.testing.assert_array_equal(result["y"], np.arange(5)[::-1])
        assert result.record.worker == routes[0].address
        with pytest.raises(kaas_magic.TargetUnavailable, match="qpu qiskit simulator"):
            pool.run("r = 1", "tpu", fallback=True)
        # kaas.pool.worker-profiler: Dask's sampling profiler is off on the workers kaas starts.
        assert list(pool.client.run(_profiler_enabled).values()) == [False]


def test_magic_connect_switches_the_default_pool(remote, shell, pool):
    from IPython.utils.capture import capture_output

    saved = kaas_magic.use_pool(None)  # connect would otherwise close the session's pool
    try:
        with capture_output() as out:
            shell.run_line_magic("kaas", f"connect {remote}")
        assert remote in out.stdout
        kaas_magic.pool().wait_ready(timeout=120)
        shell.user_ns["k"] = 5
        shell.run_cell_magic("kaas", "cpu --quiet", "k2 = k * k")
        assert shell.user_ns.pop("k2") == 25
        assert kaas_magic.last_run().worker == kaas_magic.pool().routes()[0].address
    finally:
        kaas_magic.shutdown()
        kaas_magic.use_pool(saved)


def test_environment_variable_points_start_at_a_scheduler(remote, pool, monkeypatch):
    monkeypatch.setenv("KAAS_SCHEDULER_ADDRESS", remote)
    saved = kaas_magic.use_pool(None)
    try:
        started = kaas_magic.start()
        assert started.cluster is None and started.scheduler_address == remote
    finally:
        kaas_magic.shutdown()
        kaas_magic.use_pool(saved)


def test_a_worker_restarted_on_its_fixed_port_is_used_again(pool):
    """A dead worker is remembered by address *and* incarnation: its replacement on the same
    port (a firewall-friendly deployment) serves calls again."""
    port, worker_port = free_port(), free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = start_process(*scheduler_command(port))
    env = dict(os.environ, DASK_KAAS__BACKENDS='["numpy"]')
    command = ["kaas", "worker", address, "--host", "127.0.0.1", "--port", str(worker_port)]
    worker = start_process(*command, env=env)
    client = connect_when_up(address)
    try:
        client.wait_ready(timeout=120)
        assert client.routes()[0].address == f"tcp://127.0.0.1:{worker_port}"
        assert client.run("a = 1", "cpu", stdout=io.StringIO()).outputs["a"] == 1
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and its nanny, at once
        worker.wait(timeout=30)
        with pytest.raises(kaas_magic.WorkerLost):
            client.run("a = 1", "cpu", stdout=io.StringIO())
        worker = start_process(*command, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            client.refresh()
            if client.routes() and all(r.ready for r in client.routes()):
                break
            time.sleep(0.5)
        result = client.run("b = 2", "cpu", stdout=io.StringIO())
        assert result.outputs["b"] == 2 and result.record.worker == f"tcp://127.0.0.1:{worker_port}"
    finally:
        client.close()
        stop_processes(worker, scheduler)
