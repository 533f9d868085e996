#!/usr/bin/env bash
# Set up kaas-magic and run the demo on the embedded pool: one real task on every target.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[all]"
exec kaas demo "$@"
