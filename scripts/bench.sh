#!/usr/bin/env bash
# The main job: sets up .venv on first use, then runs the linear attention benchmark on the
# current device (GPU when present). Extra arguments go to benchmarks/bench.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python benchmarks/bench.py "$@"
