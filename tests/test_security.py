"""Security of a remote pool: TLS with certificates (a real scheduler and `kaas worker` on
loopback, self-signed certificates made with openssl); and a lost scheduler is a clear error
that reconnecting fixes once it is back.

And nobody but the notebook's user uses the embedded pool: its scheduler, nannies, workers
and direct links take only clients with the pool's own throwaway certificates (mutual TLS),
and its Unix sockets (plain, for speed) only this user. Shown by connecting as another OS
user (`nobody`, with a standard-library-only script) to every port and socket."""

from __future__ import annotations

import io
import json
import os
import pwd
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import kaas_magic
from kaas_magic import fastlink
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


# --- the embedded pool: nobody but the notebook's user -----------------------------------

# Run as another OS user, with the standard library only (that user may not read this
# interpreter's site-packages). Each probe connects, sends its bytes (over TLS without a
# client certificate when "tls" is set) and says what came back.
_ATTACKER = r"""
import json, socket, ssl, sys

def probe(p):
    try:
        if p.get("unix"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(p["unix"])
        else:
            sock = socket.create_connection(("127.0.0.1", p["port"]), timeout=5)
    except OSError as e:
        return {"connected": False, "error": type(e).__name__, "errno": e.errno}
    got = b""
    try:
        if p.get("tls"):
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # trusts anything; has no certificate of its own
            sock = ctx.wrap_socket(sock)
        sock.sendall(bytes.fromhex(p["send"]))
        while len(got) < 65536:
            chunk = sock.recv(65536)
            if not chunk:
                return {"connected": True, "outcome": "closed", "got": got.hex()}
            got += chunk
            if not got.startswith(b"\x15"):  # not a TLS alert: an answer (only the control gets one)
                return {"connected": True, "outcome": "answered", "got": got[:64].hex()}
        return {"connected": True, "outcome": "open", "got": got[:64].hex()}
    except socket.timeout:
        return {"connected": True, "outcome": "timeout", "got": got.hex()}
    except ssl.SSLError as e:
        return {"connected": True, "outcome": "tls-refused", "error": str(e), "got": got.hex()}
    except OSError as e:
        return {"connected": True, "outcome": "reset", "error": type(e).__name__, "got": got.hex()}
    finally:
        sock.close()

print(json.dumps([probe(p) for p in json.load(sys.stdin)]))
"""


def _other_user():
    """How to run a command as `nobody`: root and setpriv needed; and an interpreter that
    user can run (this one may sit in root's home)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user `nobody` here")
    as_nobody = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        ok = subprocess.run([*as_nobody, python, "-I", "-S", "-c", "pass"], cwd="/", capture_output=True)
        if ok.returncode == 0:
            return [*as_nobody, python, "-I", "-S", "-c", _ATTACKER], nobody.pw_uid
    pytest.skip("no Python interpreter that `nobody` can run")


def _attack(probes: list[dict]) -> list[dict]:
    command, _ = _other_user()
    done = subprocess.run(command, input=json.dumps(probes), cwd="/", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class _Mkdir:
    """A pickle that makes a folder when loaded: whoever loads it ran the sender's code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _kaas_message_that_makes(marker: Path) -> bytes:
    parts, _descriptors = fastlink._encode({"service": _Mkdir(str(marker))})
    return b"".join(bytes(part) for part in parts)


def _dask_plaintext() -> bytes:
    """What a plain tcp:// Dask client sends first: its handshake, then an op."""
    import asyncio

    from distributed.comm.tcp import _add_frames_header
    from distributed.comm.utils import to_frames

    out = b""
    for msg in ({"compression": None, "python": tuple(sys.version_info[:3]), "pickle-protocol": 5},
                {"op": "identity", "reply": True}):
        frames, _, _ = _add_frames_header(asyncio.run(to_frames(msg, allow_offload=False)))
        out += b"".join(bytes(f) for f in frames)
    return out


def _refused(result: dict) -> bool:
    """Connected but got nothing of Dask's or kaas's: closed, reset or a TLS failure; any
    bytes that came are a TLS alert record (0x15), never a reply."""
    return (result["connected"] and result["outcome"] in ("closed", "reset", "tls-refused")
            and (not result["got"] or result["got"].startswith("15")))


def _endpoints(pool) -> dict[str, dict]:
    return {route.address: pool._endpoint(route.address) for route in pool.routes()}


def test_the_embedded_pool_uses_mutual_tls_and_same_host_calls_a_plain_private_unix_socket(pool):
    assert pool.scheduler_address.startswith("tls://")
    assert pool.client.security.require_encryption
    assert pool.client.connection_args["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert pool.routes() and all(route.address.startswith("tls://") for route in pool.routes())
    for address, endpoint in _endpoints(pool).items():
        # The hot path: a Unix socket, no TLS on it; in a folder only this user can enter.
        assert pool.transport(address) == "unix"
        link = pool._links.take(endpoint)
        try:
            assert type(link.sock) is socket.socket
        finally:
            pool._links.give_back(endpoint, link)
        folder = os.stat(os.path.dirname(endpoint["unix"]))
        assert folder.st_uid == os.getuid() and stat.S_IMODE(folder.st_mode) == 0o700
        assert stat.S_IMODE(os.stat(endpoint["unix"]).st_mode) & 0o077 == 0
    # Dask's dashboard (HTTP, no login; read-only pages) listens on loopback only.
    assert pool.cluster.dashboard_link.startswith("http://127.0.0.1:")


def test_an_unknown_security_setting_is_refused_before_anything_starts():
    import dask.config

    with dask.config.set({"kaas.pool.security": "sometimes"}):
        with pytest.raises(KaasError, match="kaas.pool.security must be 'temporary' or 'none'"):
            Pool.start(1)


def test_the_direct_link_over_tcp_takes_the_pools_certificate_and_nothing_else(pool):
    address, endpoint = next(iter(_endpoints(pool).items()))
    over_tcp = dict(endpoint, unix=None)
    # With the pool's client certificate: a TLS link, and a call runs over it.
    other = Pool.connect(pool.scheduler_address)  # this process's own embedded pool: its certificates
    try:
        other._endpoints[address] = over_tcp
        assert other.transport(address) == "tcp"
        link = other._links.take(over_tcp)
        try:
            assert isinstance(link.sock, ssl.SSLSocket) and link.sock.getpeercert()
        finally:
            other._links.give_back(over_tcp, link)
        assert other.run("y = 6 * 7", "cpu", worker=address, **QUIET).outputs["y"] == 42
    finally:
        other.close()
    # TLS that trusts the pool but brings no client certificate of its own: refused.
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname = False
    no_cert.verify_mode = ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        link = fastlink.Link(over_tcp, no_cert)
        try:
            link.send({"service": "kaas/cpu/numpy/device/0"})
            link.receive(timeout=5)
        finally:
            link.close()


def test_a_client_without_the_pools_certificates_is_refused(pool):
    from distributed.security import Security

    plain = pool.scheduler_address.replace("tls://", "tcp://")
    with pytest.raises(KaasError, match="could not connect to the Dask scheduler"):
        Pool.connect(plain, security=Security(), timeout=2)  # plain tcp://, no certificates
    with pytest.raises(KaasError, match="could not connect to the Dask scheduler"):
        Pool.connect(pool.scheduler_address, security=Security.temporary(), timeout=2)  # someone else's


def test_another_user_of_this_machine_cannot_use_the_pool(pool, tmp_path):
    _other_user()  # skips early when no other user can be acted as
    info = pool.client.scheduler_info()["workers"]
    dask_ports = {"scheduler": pool.scheduler_address}
    for address, worker in info.items():
        dask_ports[f"worker {address}"] = address
        if worker.get("nanny"):
            dask_ports[f"nanny {worker['nanny']}"] = worker["nanny"]
    dask_hello = _dask_plaintext().hex()
    markers, probes, names = [], [], []
    for name, address in dask_ports.items():
        port = int(address.rsplit(":", 1)[1])
        for tls in (False, True):
            probes.append({"port": port, "send": dask_hello, "tls": tls})
            names.append(f"{name} ({'TLS, no certificate' if tls else 'plaintext'})")
    for address, endpoint in _endpoints(pool).items():
        for tls in (False, True):
            markers.append(tmp_path / f"ran-{len(markers)}")
            probes.append({"port": endpoint["port"], "send": _kaas_message_that_makes(markers[-1]).hex(), "tls": tls})
            names.append(f"link TCP of {address} ({'TLS, no certificate' if tls else 'plaintext'})")
        markers.append(tmp_path / f"ran-{len(markers)}")
        probes.append({"unix": endpoint["unix"], "send": _kaas_message_that_makes(markers[-1]).hex()})
        names.append(f"link Unix socket of {address}")
    results = dict(zip(names, _attack(probes)))
    for name, result in results.items():
        if "Unix socket" in name:
            assert not result["connected"] and result["error"] == "PermissionError", (name, result)
        else:
            assert _refused(result), (name, result)
    time.sleep(0.5)
    assert not any(m.exists() for m in markers), "another user's message ran on the pool"
    # The notebook's own user still gets through, on the same sockets.
    assert pool.run("ok = 1", "cpu", **QUIET).outputs["ok"] == 1


def test_the_link_refuses_another_user_even_past_the_folder(tmp_path):
    """Defence in depth: were the socket's folder open to all, the link still checks its
    peer's user id (SO_PEERCRED) and closes before reading. The same message over plain
    TCP to a link without TLS runs, so the probe itself is live."""
    if not hasattr(socket, "SO_PEERCRED"):
        pytest.skip("no SO_PEERCRED on this system")
    _other_user()
    handled = []
    folder = tempfile.mkdtemp(prefix="kaas-open-")
    server = fastlink.Server("127.0.0.1", lambda replier, **m: handled.append(m) or {"kind": "result"}, None,
                             unix_path=os.path.join(folder, "link.sock"))
    try:
        os.chmod(folder, 0o777)
        os.chmod(server.unix_path, 0o777)
        over_unix, over_tcp = tmp_path / "over-unix", tmp_path / "over-tcp"
        unix_result, tcp_result = _attack([
            {"unix": server.unix_path, "send": _kaas_message_that_makes(over_unix).hex()},
            {"port": server.port, "send": _kaas_message_that_makes(over_tcp).hex()},
        ])
        assert unix_result["connected"] and unix_result["outcome"] in ("closed", "reset") and not unix_result["got"]
        time.sleep(0.2)
        assert not over_unix.exists()
        assert over_tcp.exists() and tcp_result["got"]  # the control: the same bytes ran when let in
        # This user is still served on the same socket.
        link = fastlink.Link({"host": "127.0.0.1", "port": server.port, "unix": server.unix_path,
                              "hostname": socket.gethostname()}, None)
        try:
            assert link.sock.family == socket.AF_UNIX
            link.send({"x": 1})
            assert link.receive(timeout=5)["kind"] == "result"
        finally:
            link.close()
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_worker_folder_open_to_others_gets_a_private_socket_folder_removed_at_exit(tmp_path):
    """The Unix socket goes in the worker's folder only when that is private (0700, ours);
    otherwise in a folder of its own, 0700, removed when the worker process exits."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    script = (
        "import os, stat, types\n"
        "from kaas_magic.worker import WorkerRuntime\n"
        "for folder in (%r, %r):\n"
        "    path = WorkerRuntime._link_path(types.SimpleNamespace(worker=types.SimpleNamespace(local_directory=folder)))\n"
        "    print(path, oct(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)))\n"
    ) % (str(shared), private := tempfile.mkdtemp())  # a short path, as Dask's are
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    (own, own_mode), (kept, kept_mode) = (line.split() for line in done.stdout.splitlines())
    assert not own.startswith(str(shared)) and own_mode == "0o700"
    assert not os.path.exists(os.path.dirname(own))  # removed at exit
    assert kept == os.path.join(private, "kaas-link.sock") and kept_mode == "0o700"
