#!/usr/bin/env bash
# The checks that need a CUDA GPU, as run on the lent accelerator machine (see README).
# Packages missing there travel as wheels in .whl/ (dask, distributed and their needs).
set -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/kaas-gpu-out}"; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi -L
python3 -c "import cupy, jax; print('cupy', cupy.__version__, 'cuda', cupy.cuda.is_available(), 'jax', jax.__version__, jax.devices())"
python3 -m pytest tests/test_gpu.py tests/test_cellcode.py tests/test_dlpack.py tests/test_shared_memory.py -rs -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
timeout 120 python3 -m kaas_magic.cli demo 2>&1 | grep -v "distributed\.\|^  File" | tee "$OUT/demo.log"
