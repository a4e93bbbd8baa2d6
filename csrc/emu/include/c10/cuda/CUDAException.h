// Shadow of c10's CUDA error checks for the emulation build. Launch errors are raised by the
// emulator when they happen, so the launch check has nothing left to report.
#pragma once

#include <c10/util/Exception.h>

#include "emu/emu.h"

#define C10_CUDA_CHECK(EXPR)                                                          \
  do {                                                                                \
    const cudaError_t linfusion_emu_err = (EXPR);                                     \
    TORCH_CHECK(linfusion_emu_err == cudaSuccess, "CUDA error (emulated): ",          \
                cudaGetErrorString(linfusion_emu_err));                               \
  } while (false)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
