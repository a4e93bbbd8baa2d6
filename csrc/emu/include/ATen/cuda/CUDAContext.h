// Shadow of ATen's CUDA context for the emulation build: the emulated device's properties and
// its one (synchronous) stream.
#pragma once

#include "emu/emu.h"

namespace at {
namespace cuda {

inline cudaDeviceProp* getCurrentDeviceProperties() {
  return ::linfusion_ops::emu::device_properties();
}

inline cudaStream_t getCurrentCUDAStream() { return nullptr; }

}  // namespace cuda
}  // namespace at
