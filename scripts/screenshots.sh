#!/usr/bin/env bash
# Regenerate docs/screenshots/*.png: the browser tests take them while they check what a
# user sees in JupyterLab (run view, monitor during a long cell, the side panel).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest tests/test_browser.py -v "$@"
