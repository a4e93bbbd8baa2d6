#!/usr/bin/env bash
# Checks that every C++ translation unit of csrc/ is valid C++17 (the kernels must also build where
# an older torch compiles extensions with -std=c++17): g++ -fsyntax-only on each unit the way
# setup.py compiles it. The emulation build's units (csrc/cuda/*.cu and csrc/emu/{runtime,selftest,
# module}.cpp with _C_emu's flags; csrc/emu/*.cpp and one .cu again with the checked flavour's,
# whose only source differences are the LINFUSION_OPS_EMU_CHECKED sections of csrc/emu) and the
# host units (csrc/ops.cpp, csrc/cpu/*.cpp; ops.cpp also with LINFUSION_OPS_WITH_CUDA when CUDA
# headers are found). No GPU and no nvcc are needed. C++20 features that g++ accepts in C++17 mode
# as extensions (designated initializers, template lambdas, ...) are errors here (-Wpedantic
# -Werror=c++20-extensions); torch's and Python's headers are system headers.
#
# torch >= 2.14's headers require C++20, so the C++17 pass compiles against the headers of a torch
# that still allows C++17: TORCH_CXX17_INCLUDE (a torch/include folder), or else those of
# TORCH_CXX17_VERSION (default 2.13.0), fetched once with `pip download --no-deps` into
# CACHE_DIR (default ~/.cache/linfusion_ops) and unpacked there (headers only). `c++20` as an
# argument runs the same units against the installed torch (what every build already does).
# Cost: 19 units, about 16 s of CPU each (torch's headers): 5.2 min of CPU measured (9.5 min wall on
# 2 shared cores), so over a minute even on an idle 2-core machine.
# Usage: bash scripts/check_cxx17.sh [c++17] [c++20]   (default: c++17)
#   CXX=g++  PYTHON=python3  JOBS=<cores>  CUDA_HOME=<toolkit, for ops.cpp's WITH_CUDA pass>
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CXX="${CXX:-g++}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"
CACHE_DIR="${CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/linfusion_ops}"
TORCH_CXX17_VERSION="${TORCH_CXX17_VERSION:-2.13.0}"
STANDARDS=("$@")
[ ${#STANDARDS[@]} -gt 0 ] || STANDARDS=(c++17)

PY_INCLUDE="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
INSTALLED_TORCH_INCLUDE="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"

# The minimum standard a torch/include folder's ATen.h asks for (17 or 20).
torch_min_standard() {
  if grep -q '__cplusplus < 202002L' "$1/ATen/ATen.h"; then echo 20; else echo 17; fi
}

torch_include_for() {  # $1: c++17 or c++20
  if [ "$1" = c++20 ] || [ "$(torch_min_standard "$INSTALLED_TORCH_INCLUDE")" = 17 ]; then
    echo "$INSTALLED_TORCH_INCLUDE"
    return
  fi
  if [ -n "${TORCH_CXX17_INCLUDE:-}" ]; then
    echo "$TORCH_CXX17_INCLUDE"
    return
  fi
  local dest="$CACHE_DIR/torch-$TORCH_CXX17_VERSION-headers"
  if [ ! -f "$dest/torch/include/ATen/ATen.h" ]; then
    echo "== fetching torch $TORCH_CXX17_VERSION's headers (C++17) into $dest" >&2
    local wheels="$CACHE_DIR/wheels"
    mkdir -p "$wheels" "$dest"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" \
      "torch==$TORCH_CXX17_VERSION" >&2
    local wheel
    wheel="$(ls "$wheels"/torch-"$TORCH_CXX17_VERSION"*.whl | head -n 1)"
    "$PYTHON" -c 'import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("torch/include/")])' \
      "$wheel" "$dest"
  fi
  echo "$dest/torch/include"
}

CUDA_INCLUDE=""
for root in "${CUDA_HOME:-}" /usr/local/cuda; do
  if [ -n "$root" ] && [ -f "$root/include/cuda_runtime_api.h" ]; then CUDA_INCLUDE="$root/include"; break; fi
done

# One line per job: <label> <flags...> -- <source>.
jobs_for() {  # $1: standard, $2: torch include folder
  local std="$1" ti="$2"
  local common="-std=$std -fsyntax-only -Wpedantic -Werror=c++20-extensions -isystem $ti -isystem $ti/torch/csrc/api/include -isystem $PY_INCLUDE -DTORCH_API_INCLUDE_EXTENSION_H"
  local emu="-x c++ -fvisibility=hidden -fno-strict-aliasing -Wno-unknown-pragmas -DLINFUSION_OPS_EMU -Icsrc/emu/include -Icsrc"
  local unit
  for unit in csrc/cuda/*.cu csrc/emu/runtime.cpp csrc/emu/selftest.cpp csrc/emu/module.cpp; do
    echo "$std:emu-fast:$unit $common $emu -DLINFUSION_OPS_EMU_NAMESPACE=linfusion_ops_emu -DTORCH_EXTENSION_NAME=_C_emu -- $unit"
  done
  for unit in csrc/cuda/merge_segments.cu csrc/emu/*.cpp; do
    echo "$std:emu-checked:$unit $common $emu -fsanitize=thread -DLINFUSION_OPS_EMU_CHECKED -DLINFUSION_OPS_EMU_NAMESPACE=linfusion_ops_emu_checked -DTORCH_EXTENSION_NAME=_C_emu_checked -- $unit"
  done
  local host="-fopenmp -Icsrc -DLINFUSION_OPS_VERSION='\"check\"' -DTORCH_EXTENSION_NAME=_C"
  for unit in csrc/ops.cpp csrc/cpu/*.cpp; do
    echo "$std:host:$unit $common $host -- $unit"
  done
  if [ -n "$CUDA_INCLUDE" ]; then
    echo "$std:host-with-cuda:csrc/ops.cpp $common $host -isystem $CUDA_INCLUDE -DLINFUSION_OPS_WITH_CUDA=1 -DLINFUSION_OPS_CUDA_ARCHS='\"9.0\"' -- csrc/ops.cpp"
  fi
}

LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT
export CXX LOGS
check_one() {
  local label="${1%% *}" rest="${1#* }"
  local flags="${rest% -- *}" src="${rest##* -- }"
  local log="$LOGS/$(echo "$label" | tr '/:+' '___').log"
  # shellcheck disable=SC2086
  if eval "$CXX" $flags "$src" >"$log" 2>&1; then
    echo "ok   $label"
  else
    echo "FAIL $label"
    sed 's/^/     /' "$log" | head -n 40
    return 1
  fi
}
export -f check_one

for std in "${STANDARDS[@]}"; do
  case "$std" in c++17|c++20) ;; *) echo "unknown standard $std (c++17 or c++20)" >&2; exit 2 ;; esac
done
# The flags must reject what C++17 lacks, or a pass proves nothing.
if printf 'struct P { int a; };\nP p{.a = 1};\n' |
   "$CXX" -std=c++17 -fsyntax-only -Wpedantic -Werror=c++20-extensions -x c++ - 2>/dev/null; then
  echo "== $CXX accepts a C++20 designated initializer under these flags: the check would prove nothing" >&2
  exit 1
fi

status=0
for std in "${STANDARDS[@]}"; do
  ti="$(torch_include_for "$std")"
  echo "== $std: torch headers $ti ($("$CXX" --version | head -n 1))"
  jobs_for "$std" "$ti" | xargs -d '\n' -P "$JOBS" -I{} bash -c 'check_one "$@"' _ {} || status=1
done
[ -n "$CUDA_INCLUDE" ] || echo "== note: no CUDA toolkit headers found: the host-with-cuda unit was not checked"
if [ "$status" -eq 0 ]; then echo "== every unit is valid ${STANDARDS[*]}"; else echo "== some units failed"; fi
exit "$status"
