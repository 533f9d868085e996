"""The shipped kernel library: the repository's kernels/ folder, installed as
``kaas_magic.library``."""

from __future__ import annotations

from pathlib import Path

from ..errors import KernelError
from .spec import KernelSpec, parse_header, spec_from_source

EXTENSIONS = {".cl": "opencl", ".cu": "cuda", ".py": "jax", ".qasm": "qiskit"}


def library_dir() -> Path:
    """The repository's kernels/ folder: installed as ``kaas_magic.library``, or found
    beside the package when running from a source checkout that was not installed."""
    try:
        from .. import library

        return Path(library.__file__).parent
    except ImportError:
        return Path(__file__).resolve().parents[2] / "kernels"


def load_library() -> dict[str, list[KernelSpec]]:
    """Every shipped kernel by name; a name may have one implementation per language."""
    specs: dict[str, list[KernelSpec]] = {}
    for path in sorted(library_dir().iterdir()):
        language = EXTENSIONS.get(path.suffix)
        if language is None or path.name.startswith("_"):
            continue
        source = path.read_text()
        language = parse_header(source).get("language", language)
        spec = spec_from_source(source, language, name=parse_header(source).get("name") or path.stem.split(".")[0],
                                origin="library")
        if any(s.language == language for s in specs.get(spec.name, [])):
            raise KernelError(f"two {language} library kernels named {spec.name!r}")
        specs.setdefault(spec.name, []).append(spec)
    return specs
