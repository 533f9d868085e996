"""What a registered kernel is: its source in its own language, and its signature.

A signature reads like a Python function header with numpy dtypes and symbolic shapes::

    scale(a: float32[n], out: out float32[n], k: float32)

The package's modules, each one job:

- ``spec``: ``KernelSpec``, signature and header parsing, the checks on a signature's sizes
- ``dims``: the dims language of sizes (``n * m``, ``cdiv(n, 256)``) and ceiling division
- ``csource``: what C source (OpenCL C, CUDA C) defines, and its compiler logs
- ``plan``: a signature as bind walks it, worked out once per kernel
- ``binding``: ``bind`` (a call's arguments to a signature), ``check_launch``, ``Bound``
- ``launch``: the launch both C dialects share
- ``library``: the shipped kernels (``kaas_magic.library``, the repository's kernels/)

Every name is re-exported here: import them from ``kaas_magic.kernelspec``.
"""

from ..errors import KaasError, KernelArgumentError, KernelCompileError, KernelError
from .binding import Bound, bind, check_launch, sample_arguments
from .csource import check_defines, kernels_in_source, shift_log_lines, suggest_signature
from .dims import MAX_DIM_32, cdiv, dim_names, round_up
from .launch import launch_c_kernel, scalar_arg_dtypes
from .library import EXTENSIONS, library_dir, load_library
from .spec import LANGUAGES, KernelSpec, Param, check_sizes, parse_header, parse_signature, spec_from_source

__all__ = [
    "EXTENSIONS", "LANGUAGES", "MAX_DIM_32", "Bound", "KaasError", "KernelArgumentError",
    "KernelCompileError", "KernelError", "KernelSpec", "Param", "bind", "cdiv", "check_defines",
    "check_launch", "check_sizes", "dim_names", "kernels_in_source", "launch_c_kernel",
    "library_dir", "load_library", "parse_header", "parse_signature", "round_up",
    "sample_arguments", "scalar_arg_dtypes", "shift_log_lines", "spec_from_source",
    "suggest_signature",
]
