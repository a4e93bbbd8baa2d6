// Device helpers shared by the row-wise CUDA kernels (layer_norm_leaky_relu, merge_segments):
// aligned vector access, reductions over the threads of one row, and a deterministic column sum.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launch.cuh"

namespace linfusion_ops {
namespace cuda_rowwise {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kVectorBytes = 16;  // one 128-bit load / store

// kN contiguous elements moved by one 128-bit (or narrower) memory instruction.
template <typename T, int kN>
struct alignas(sizeof(T) * kN) AlignedVector {
  T val[kN];
};

inline bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % static_cast<std::uintptr_t>(bytes) == 0;
}

// Blocks that stay resident at once for a grid-stride kernel; a fixed function of the device, so
// per-block partial sums (and the order they are added in) are the same on every run.
template <typename Kernel>
inline int64_t resident_blocks(Kernel kernel, int block_threads, size_t dynamic_smem = 0) {
  int per_sm = 0;
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block_threads, dynamic_smem));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int64_t>(per_sm > 0 ? per_sm : 1) * sms;
}

// Grid of a grid-stride kernel: enough blocks for the work, at most one resident wave.
template <typename Kernel>
inline int64_t grid_stride_blocks(Kernel kernel, int block_threads, int64_t work_blocks) {
  const int64_t resident = resident_blocks(kernel, block_threads);
  return work_blocks < resident ? (work_blocks > 0 ? work_blocks : 1) : resident;
}

// Sums kN values over the kThreadsPerRow consecutive threads of a row group and gives every one
// of them the total. Groups narrower than a warp use xor shuffles (IEEE addition commutes, so
// all lanes end up with bitwise-equal sums); wider groups add their warps' sums through
// `smem` ([blockDim.x / 32][kN]) in warp order. Every thread of the block must call it (it
// synchronises the block when kThreadsPerRow > 32).
template <int kThreadsPerRow, int kN>
__device__ __forceinline__ void row_group_allreduce(float (&v)[kN], float* smem) {
  constexpr int kShuffleWidth = kThreadsPerRow < kWarpSize ? kThreadsPerRow : kWarpSize;
#pragma unroll
  for (int offset = kShuffleWidth / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int n = 0; n < kN; ++n) v[n] += __shfl_xor_sync(kFullMask, v[n], offset);
  }
  if constexpr (kThreadsPerRow > kWarpSize) {
    constexpr int kWarpsPerRow = kThreadsPerRow / kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    if (threadIdx.x % kWarpSize == 0) {
#pragma unroll
      for (int n = 0; n < kN; ++n) smem[warp * kN + n] = v[n];
    }
    __syncthreads();
    const int first_warp = warp / kWarpsPerRow * kWarpsPerRow;
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < kWarpsPerRow; ++w) total += smem[(first_warp + w) * kN + n];
      v[n] = total;
    }
    __syncthreads();  // smem is reused by the next call
  }
}

// Sum over a full warp, every lane gets the (bitwise-equal) total.
template <typename T>
__device__ __forceinline__ T warp_allreduce_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

constexpr int kColumnSumColumns = 32;  // one warp reads 32 consecutive columns of a part
constexpr int kColumnSumSlices = 16;   // parts are split into 16 strided slices per column

// out[c] = sum over p of parts[p][c], added in a fixed order (slice by slice, then the slices in
// order), so the result is bitwise reproducible. Replaces float atomics for dweight, dbias and
// the pad gradient.
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kColumnSumColumns* kColumnSumSlices)
    column_sum_kernel(const acc_t* __restrict__ parts,  // num_parts x columns
                      int64_t num_parts, int64_t columns,
                      out_t* __restrict__ out) {  // columns
  __shared__ acc_t slice_sums[kColumnSumSlices][kColumnSumColumns];
  const int64_t column = static_cast<int64_t>(blockIdx.x) * kColumnSumColumns + threadIdx.x;
  acc_t sum = 0;
  if (column < columns) {
#pragma unroll 4
    for (int64_t p = threadIdx.y; p < num_parts; p += kColumnSumSlices) {
      sum += parts[p * columns + column];
    }
  }
  slice_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && column < columns) {
    acc_t total = 0;
#pragma unroll
    for (int s = 0; s < kColumnSumSlices; ++s) total += slice_sums[s][threadIdx.x];
    out[column] = static_cast<out_t>(total);
  }
}

// Launches column_sum_kernel on the current stream. parts: (num_parts, columns) contiguous.
template <typename acc_t, typename out_t>
inline void launch_column_sum(const acc_t* parts, int64_t num_parts, int64_t columns, out_t* out) {
  if (columns == 0) return;
  const int64_t blocks = (columns + kColumnSumColumns - 1) / kColumnSumColumns;
  launch_kernel(column_sum_kernel<acc_t, out_t>, static_cast<unsigned>(blocks),
                dim3(kColumnSumColumns, kColumnSumSlices), 0, at::cuda::getCurrentCUDAStream(), parts,
                num_parts, columns, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_rowwise
}  // namespace linfusion_ops
