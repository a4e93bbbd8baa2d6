#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/bench.sh: make (once) and activate a virtual environment
# with torch and the dev tools, and build linfusion_ops._C in place when its sources changed.
#
#   VENV=path                 where the environment lives (default: .venv in the repository)
#   LINFUSION_OPS_CUDA=0      CPU-only build; TORCH_CUDA_ARCH_LIST, MAX_JOBS as for setup.py
#   LINFUSION_OPS_CUDA_EMU=1  also build the CUDA emulation module linfusion_ops._C_emu (the CUDA
#                             kernels on CPU tensors, for the emu tests); "checked" also builds
#                             its race-detecting flavour _C_emu_checked (see README)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
  echo "== installing torch (the CUDA build: several GB on first use)"
  python -m pip install -qq --upgrade pip
  python -m pip install -qq torch
fi
# requirements-dev.txt is pyproject.toml's [dev] extra (scripts/requirements.py); a copy in the
# environment records what was installed, so that a change installs again.
if ! cmp -s "$ROOT/requirements-dev.txt" "$VENV/requirements-dev.installed"; then
  echo "== installing dev requirements"
  python -m pip install -qq -r "$ROOT/requirements-dev.txt"
  cp "$ROOT/requirements-dev.txt" "$VENV/requirements-dev.installed"
fi

cd "$ROOT"
# Rebuild only when a module is missing or a source or the build script is newer than it.
modules=(_C)
case "${LINFUSION_OPS_CUDA_EMU:-0}" in
  0) ;;
  checked) modules+=(_C_emu _C_emu_checked) ;;
  *) modules+=(_C_emu) ;;
esac
rebuild=""
for module in "${modules[@]}"; do
  so=$(ls linfusion_ops/"$module".*.so 2>/dev/null | head -n 1 || true)
  if [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" -type f 2>/dev/null | head -n 1)" ]; then
    rebuild=1
  fi
done
if [ -n "$rebuild" ]; then
  # The compiler's output (one line per source, toolkit warnings) goes to a log, shown on failure.
  log="$ROOT/build/build_ext.log"
  mkdir -p "$ROOT/build"
  echo "== building ${modules[*]} (MAX_JOBS=${MAX_JOBS:-$(nproc)}, log: build/build_ext.log)"
  start=$(date +%s)
  if ! MAX_JOBS="${MAX_JOBS:-$(nproc)}" python setup.py -q build_ext --inplace >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "== build failed; the whole log is $log" >&2
    exit 1
  fi
  echo "== built in $(( $(date +%s) - start )) s"
fi
python -c "import linfusion_ops; print('linfusion_ops build:', linfusion_ops.build_info())"
if [ "${LINFUSION_OPS_CUDA_EMU:-0}" != 0 ]; then
  python -c "from linfusion_ops import emulated
print('CUDA emulation built:', {f: emulated.available(f) for f in emulated.FLAVOURS})"
fi
