"""A third party adds a backend by installing a package: no file of kaas_magic changes.

The package here declares a `toy` backend (NumPy, on the `cpu` target) under the
``kaas_magic.backends`` entry-point group. It is installed with pip into a folder of its
own, put on the path of this process and of the workers a fresh pool spawns, and removed
afterwards, so nothing in the environment changes.
"""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest

TOY_PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "kaas-toy-backend"
version = "0.1.0"

[project.entry-points."kaas_magic.backends"]
toy = "kaas_toy:ToyBackend"

[tool.setuptools]
py-modules = ["kaas_toy"]
"""

TOY_MODULE = '''\
"""A kaas backend of its own package: NumPy on the worker's CPU, as the `toy` backend."""

from kaas_magic.backends.base import Backend, Offer, Session, cpu_name
from kaas_magic.targets import Service


class ToySession(Session):
    def namespace(self):
        import numpy

        return {"xp": numpy, "device": self.device}


class ToyBackend(Backend):
    name = "toy"
    session_class = ToySession
    targets = {"cpu": ("device",)}
    injected = ("xp", "device")

    def discover(self):
        return [Offer(Service("cpu", "toy", "device"), f"{cpu_name()}, toy backend")]
'''


def _can_build_offline() -> bool:
    """Whether setuptools here builds a wheel without fetching anything: from 70.1 it
    carries bdist_wheel; before, it needs the `wheel` package."""
    try:
        import setuptools
    except ImportError:
        return False
    try:
        import wheel  # noqa: F401

        return True
    except ImportError:
        pass
    version = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
    return version >= (70, 1)


@pytest.fixture
def toy_installed(tmp_path):
    source = tmp_path / "kaas-toy-backend"
    source.mkdir()
    (source / "pyproject.toml").write_text(TOY_PYPROJECT)
    (source / "kaas_toy.py").write_text(TOY_MODULE)
    site = tmp_path / "site"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site)]
    if _can_build_offline():
        command.append("--no-build-isolation")  # else pip fetches setuptools to build it
    out = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (site / "kaas_toy.py").exists()

    from kaas_magic.backends import registry

    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), old_path]))  # workers
    sys.path.insert(0, str(site))  # this process (and workers spawned from it)
    importlib.invalidate_caches()
    registry.refresh()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path
        sys.modules.pop("kaas_toy", None)
        importlib.invalidate_caches()
        registry.refresh()


def test_registry_lists_the_builtin_backends_from_their_declarations():
    from kaas_magic.backends import registry
    from kaas_magic.kernelspec import LANGUAGES
    from kaas_magic.targets import BACKENDS, DEFAULT_BACKEND

    assert set(registry.names()) >= {"numpy", "cupy", "jax", "opencl", "qiskit"}
    assert list(BACKENDS)[:5] == list(registry.names())[:5]
    assert dict(DEFAULT_BACKEND) == {"gpu": "cupy", "tpu": "jax", "fpga": "opencl", "qpu": "qiskit", "cpu": "numpy"}
    assert dict(LANGUAGES) == {
        "opencl": ("opencl", ("fpga", "gpu", "cpu")),
        "cuda": ("cupy", ("gpu",)),
        "jax": ("jax", ("tpu", "gpu", "cpu")),
        "qiskit": ("qiskit", ("qpu",)),
    }
    assert registry.injected_names("qiskit") == ("xp", "device", "run", "backend", "transpile")
    with pytest.raises(registry.UnknownBackend, match="no kaas backend named 'torch'"):
        registry.load("torch")


def test_builtins_are_found_without_entry_points(monkeypatch):
    """From a source tree that was never installed, the built-in table stands in."""
    import importlib.metadata

    from kaas_magic.backends import registry

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: ())
    registry.refresh()
    try:
        assert registry.names() == tuple(registry.BUILTIN)
        assert registry.default_backend("cpu") == "numpy"
    finally:
        monkeypatch.undo()
        registry.refresh()


def test_the_package_declares_its_backends_as_entry_points():
    """The installed metadata matches the built-in table (reinstall after editing pyproject)."""
    from importlib.metadata import entry_points

    from kaas_magic.backends import registry

    declared = {p.name: p.value for p in entry_points(group=registry.GROUP) if p.name in registry.BUILTIN}
    assert declared == registry.BUILTIN


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_an_installed_package_adds_a_backend(toy_installed, cache_dir):
    import dask.config

    from kaas_magic import targets
    from kaas_magic.backends import registry
    from kaas_magic.client import Pool

    assert "toy" in registry.names()
    assert "toy" in targets.BACKENDS and targets.check_backend("toy") == "toy"
    assert registry.info("toy").targets == (("cpu", ("device",)),)
    assert targets.DEFAULT_BACKEND["cpu"] == "numpy"  # toy does not claim to be the default

    with dask.config.set({"kaas.backends": ["numpy", "toy"]}):
        pool = Pool.start(1)
    try:
        pool.wait_ready(timeout=240)
        x = np.arange(6, dtype=np.float64)
        result = pool.run("y = xp.sqrt(x) + 1\nwhere = device", "cpu", backend="toy",
                          inputs={"x": x}, stdout=io.StringIO())
        np.testing.assert_allclose(result["y"], np.sqrt(x) + 1)
        assert result.outputs["where"].endswith("toy backend")
        assert result.record.backend == "toy" and result.record.kind == "device"
        assert result.record.ok
        # The default for cpu is still NumPy.
        assert pool.run("z = 1", "cpu", stdout=io.StringIO()).record.backend == "numpy"
    finally:
        pool.close()


def test_a_broken_plugin_does_not_break_the_others(tmp_path, monkeypatch):
    """An entry point whose module does not import is left out of the tables, loudly."""
    import importlib.metadata

    from kaas_magic.backends import registry

    broken = importlib.metadata.EntryPoint(name="broken", value="kaas_no_such_module:Backend",
                                           group=registry.GROUP)
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: (*real(**kw), broken))
    registry.refresh()
    try:
        assert "broken" in registry.names()
        assert "broken" not in {b.name for b in registry.infos()}
        assert registry.default_backend("fpga") == "opencl"
        with pytest.raises(ImportError):
            registry.load("broken")
    finally:
        monkeypatch.undo()
        registry.refresh()

