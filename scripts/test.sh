#!/usr/bin/env bash
# The test command: sets up .venv (torch, dev tools, the extension) on first use, then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k merge -x`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest tests -q -rs "$@"
