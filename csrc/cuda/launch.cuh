// What the .cu files need from the toolchain beyond the kernels themselves: the kernel launch,
// dynamic shared memory, the op registration and the device of the tensors. nvcc builds them for
// linfusion_ops._C; the CUDA emulation (csrc/emu/, docs/emulation.md) builds the same sources with the
// host compiler for linfusion_ops._C_emu, where they run on CPU tensors.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstddef>
#include <utility>

#ifdef LINFUSION_OPS_EMU
#include "emu/emu.h"
#endif

namespace linfusion_ops {

#ifdef LINFUSION_OPS_EMU
using emu::launch_kernel;

inline void check_kernel_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cpu(), "linfusion_ops: ", name,
              " must be a CPU tensor for the emulated CUDA kernels, got ", t.device());
}
#else
// kernel<<<grid, block, smem_bytes, stream>>>(args...), as a function so that the launch sites
// also compile where chevrons do not (a macro would split template-ids at their commas).
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                   cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
}

inline void check_kernel_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "linfusion_ops: ", name, " must be a CUDA tensor, got ", t.device());
}
#endif

}  // namespace linfusion_ops

#ifdef LINFUSION_OPS_EMU
// The block's dynamic shared memory (a buffer of the emulator, 128-byte aligned).
#define LINFUSION_OPS_DYNAMIC_SMEM(type, name) \
  type* const name = ::linfusion_ops::emu::dynamic_smem<type>()
// Registers the kernels for CPU tensors under the emulation's namespace.
#define LINFUSION_OPS_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(LINFUSION_OPS_EMU_NAMESPACE, CPU, m)
#else
#define LINFUSION_OPS_DYNAMIC_SMEM(type, name) extern __shared__ __align__(128) type name[]
#define LINFUSION_OPS_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(linfusion_ops, CUDA, m)
#endif
