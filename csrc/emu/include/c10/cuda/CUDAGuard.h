// Shadow of c10's CUDA device guard for the emulation build: one emulated device, nothing to set.
#pragma once

#include <c10/core/Device.h>

#include "emu/emu.h"

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};

}  // namespace cuda
}  // namespace c10
