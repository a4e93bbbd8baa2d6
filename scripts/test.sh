#!/usr/bin/env bash
# The test command: sets up .venv (torch, dev tools, the extension) on first use, then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k merge -x`.
#
# On a machine without a GPU the CUDA kernels run in the emulation build (docs/emulation.md): the
# fast flavour is built and its tests run unless LINFUSION_OPS_CUDA_EMU says otherwise (0: none,
# checked: also the race-detecting flavour). The run ends with the skipped tests' counts by reason.
set -euo pipefail
if [ -z "${LINFUSION_OPS_CUDA_EMU+set}" ] && ! { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
  export LINFUSION_OPS_CUDA_EMU=1
  echo "== no GPU: the CUDA kernels' tests run in the emulation build (LINFUSION_OPS_CUDA_EMU=0 to skip them)"
fi
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest tests -q "$@"
