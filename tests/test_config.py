"""kaas.yaml is the only source of defaults; config.get the one accessor, on both sides."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import dask.config
import pytest

from kaas_magic import config

PACKAGE = Path(config.__file__).parent
YAML = PACKAGE / "kaas.yaml"


def _accessor_names(tree: ast.Module) -> set[str]:
    """Names a module binds to kaas_magic.config (``from . import config as kaas_config``...)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            for alias in node.names:
                if module in ("", "kaas_magic") and alias.name == "config":
                    names.add(alias.asname or "config")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "kaas_magic.config" and alias.asname:
                    names.add(alias.asname)
    return names


def keys_read() -> dict[str, list[str]]:
    """Every constant key passed to the accessor in kaas_magic -> where it is read."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        names = _accessor_names(tree)
        if path.name == "config.py" and path.parent == PACKAGE:
            names.add("")  # calls to get() inside config.py itself
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "get" and isinstance(func.value, ast.Name) \
                    and func.value.id in names:
                pass
            elif isinstance(func, ast.Name) and func.id == "get" and "" in names:
                pass
            else:
                continue
            found.setdefault(node.args[0].value, []).append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def test_every_key_read_is_declared():
    found = keys_read()
    # the scan finds the reads (on both sides): if these vanish, the scan is broken
    assert {"pool.n-workers", "pool.concurrency", "qpu.default-shots", "kernels.warm-library",
            "limits.max-retries", "widgets.inline"} <= set(found)
    undeclared = {key: where for key, where in found.items() if key not in config.declared()}
    assert not undeclared, f"read but not declared in kaas.yaml: {undeclared}"


def test_undeclared_key_is_an_error():
    with pytest.raises(config.UndeclaredSetting, match="pool.no-such-key"):
        config.get("pool.no-such-key")
    with pytest.raises(config.UndeclaredSetting):
        config.get("no-such-section", {})
    with pytest.raises(config.UndeclaredSetting):
        config.set(no_such_key=1)


def _yaml_comments() -> dict[str, bool]:
    """Each declared dotted key -> whether kaas.yaml comments it: on its line, on the line(s)
    just above it, or (a section) on the line just below it."""
    lines = YAML.read_text().splitlines()
    stack: list[tuple[int, str]] = []
    result: dict[str, bool] = {}
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z0-9_-]+):(.*)$", line)
        if not m:
            continue
        indent, name, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([n for _, n in stack] + [name])
        stack.append((indent, name))
        if path == "kaas":
            continue
        above = lines[i - 1].strip() if i else ""
        below = lines[i + 1].strip() if i + 1 < len(lines) else ""
        section = rest.strip() == ""
        result[path.removeprefix("kaas.")] = ("#" in rest) or above.startswith("#") or (section and below.startswith("#"))
    return result


def test_every_declared_key_has_a_comment():
    comments = _yaml_comments()
    assert set(comments) == set(config.declared())
    missing = sorted(k for k, commented in comments.items() if not commented)
    assert not missing, f"kaas.yaml keys without a comment: {missing}"


def test_dask_config_set_goes_through_the_accessor():
    assert config.get("pool.concurrency") == 4
    with dask.config.set({"kaas.pool.concurrency": 7}):
        assert config.get("pool.concurrency") == 7
        assert config.get("pool.concurrency", config.snapshot()) == 7
    with config.set(**{"pool.concurrency": 9}), config.set(fallback=True):
        assert config.get("pool.concurrency") == 9
        assert config.get("fallback") is True
    assert config.get("pool.concurrency") == 4


_PROBE = (
    "import os, sys\n"
    "if sys.argv[1] == 'late':\n"
    "    import dask\n"
    "    os.environ['DASK_KAAS__POOL__N_WORKERS'] = '3'\n"
    "    os.environ['DASK_KAAS__QPU__DEFAULT_SHOTS'] = '99'\n"
    "from kaas_magic import config\n"
    "snap = config.snapshot()\n"
    "print(config.get('pool.n-workers'), config.get('pool.n-workers', snap),\n"
    "      config.get('qpu.default-shots'), config.get('qpu.default-shots', snap), config.get('pool.concurrency', snap))\n"
)


@pytest.mark.parametrize("when", ["early", "late"])  # set before / after dask was imported
def test_environment_overrides(when):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_KAAS__")}
    if when == "early":
        env.update(DASK_KAAS__POOL__N_WORKERS="3", DASK_KAAS__QPU__DEFAULT_SHOTS="99")
    out = subprocess.run([sys.executable, "-c", _PROBE, when], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["3", "3", "99", "99", "4"]


def test_worker_reads_the_same_values_from_its_snapshot():
    with dask.config.set({"kaas.pool.concurrency": 5, "kaas.keep.max-bytes": 123, "kaas.backends": ["numpy"]}):
        snap = config.snapshot()
    for key in sorted(config.declared()):
        assert config.get(key, snap) == config.get(key) or key in ("pool", "pool.concurrency", "keep",
                                                                   "keep.max-bytes", "backends")
    assert config.get("pool.concurrency", snap) == 5
    assert config.get("keep.max-bytes", snap) == 123
    assert config.get("backends", snap) == ["numpy"]
    # a partial snapshot: kaas.yaml's defaults for the rest
    assert config.get("pool.concurrency", {"pool": {}}) == 4
    assert config.get("cache.dir", {}) is None
    assert config.get("kernels.warm-library", {}) is True
    # keys spelt with underscores (as DASK_KAAS__* variables may leave them) are found too
    assert config.get("pool.n-workers", {"pool": {"n_workers": 3}}) == 3

    from kaas_magic.worker.runtime import _configured_max_timeout

    assert _configured_max_timeout(snap) == config.get("limits.max-timeout") == 86400
    assert _configured_max_timeout({"limits": {"max-timeout": 60}}) == 60
