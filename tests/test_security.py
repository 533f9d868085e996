"""Security of a remote pool: TLS with certificates (a real scheduler and `kaas worker` on
loopback, self-signed certificates made with openssl); and a lost scheduler is a clear error
that reconnecting fixes once it is back."""

from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import kaas_magic
from kaas_magic.client import Pool
from kaas_magic.errors import KaasError, SchedulerLost
from test_remote_pool import connect_when_up, free_port, scheduler_command, start_process, stop_processes

QUIET = {"stdout": io.StringIO()}
NUMPY_ONLY = dict(os.environ, DASK_KAAS__BACKENDS='["numpy"]')


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(folder: Path, name: str) -> dict[str, str]:
    """A CA of its own and one certificate for 127.0.0.1 signed by it."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name} CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=folder)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "node.key",
             "-out", "node.csr", cwd=folder)
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "ext.cnf", "-out", "node.pem", cwd=folder)
    return {"ca": str(folder / "ca.pem"), "cert": str(folder / "node.pem"), "key": str(folder / "node.key")}


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    certs = make_certificates(tmp_path_factory.mktemp("tls"), "kaas")
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    tls = ["--tls-ca-file", certs["ca"], "--tls-cert", certs["cert"], "--tls-key", certs["key"]]
    scheduler = start_process(*scheduler_command(port, "--protocol", "tls", *tls))
    worker = start_process("kaas", "worker", address, "--name", "tls-worker", "--host", "127.0.0.1", *tls, env=NUMPY_ONLY)
    try:
        yield address, certs
    finally:
        stop_processes(worker, scheduler)


def _security(certs: dict[str, str]):
    from distributed.security import Security

    return Security(tls_ca_file=certs["ca"], tls_client_cert=certs["cert"], tls_client_key=certs["key"],
                    require_encryption=True)


def test_tls_pool_serves_a_client_with_the_right_certificate(tls_cluster):
    address, certs = tls_cluster
    deadline = time.monotonic() + 60
    while True:
        try:
            pool = Pool.connect(address, security=_security(certs), timeout=5)
            break
        except KaasError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        pool.wait_ready(timeout=120)
        assert all(r.address.startswith("tls://") for r in pool.routes())
        result = pool.run("y = x * 2", "cpu", inputs={"x": np.arange(4)}, **QUIET)
        np.testing.assert_array_equal(result.outputs["y"], np.arange(4) * 2)
    finally:
        pool.close()


def test_tls_pool_refuses_clients_without_the_right_certificate(tls_cluster, tmp_path):
    address, _ = tls_cluster
    with pytest.raises(KaasError, match=f"could not connect to the Dask scheduler at {address}"):
        Pool.connect(address, timeout=5)
    stranger = make_certificates(tmp_path / "stranger", "stranger")
    with pytest.raises(KaasError, match=f"could not connect to the Dask scheduler at {address}"):
        Pool.connect(address, security=_security(stranger), timeout=5)


def test_lost_scheduler_is_a_clear_error_and_reconnecting_works(pool):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = start_process(*scheduler_command(port))
    worker = start_process("kaas", "worker", address, "--host", "127.0.0.1", env=NUMPY_ONLY)
    lost = connect_when_up(address)
    try:
        lost.wait_ready(timeout=120)
        assert lost.run("a = 1", "cpu", **QUIET).outputs["a"] == 1
        stop_processes(scheduler)
        deadline = time.monotonic() + 30
        with pytest.raises(SchedulerLost, match=f"lost the Dask scheduler at {address}.*kaas connect"):
            while time.monotonic() < deadline:
                lost.run("a = 1", "cpu", **QUIET)
                time.sleep(0.5)
        stop_processes(worker)
        scheduler = start_process(*scheduler_command(port))
        worker = start_process("kaas", "worker", address, "--host", "127.0.0.1", env=NUMPY_ONLY)
        back = connect_when_up(address)
        try:
            back.wait_ready(timeout=120)
            assert back.run("b = 2", "cpu", **QUIET).outputs["b"] == 2
        finally:
            back.close()
    finally:
        lost.close()
        stop_processes(worker, scheduler)
    assert kaas_magic.pool() is pool  # the session's own pool was never touched
