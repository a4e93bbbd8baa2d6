// CUDA kernels of leaky_relu(layer_norm(x)) over the last dim and its backward (docs/design.md, layer_norm_leaky_relu).
//
// Fast path (fp32 / fp16 / bf16, C a multiple of the 16-byte vector, C <= 2048, aligned
// pointers): a group of kThreadsPerRow threads owns a row and keeps its kElemsPerThread channels
// per thread in registers, so the forward reads x once and writes out once; statistics are
// two-pass (mean, then the sum of squared deviations) over the registers, in fp32. The backward
// reads grad_out and x once, writes grad_x once and accumulates dweight / dbias per thread in
// registers; each block adds its row groups in shared memory in a fixed order into one fp32
// partial row, and a second kernel sums the partial rows in a fixed order (no float atomics).
//
// Generic path (any C, any alignment, and fp64): one warp per row with scalar accesses that
// re-read the row (from L1/L2) for each pass; dweight / dbias partials are accumulated per warp
// in a global scratch row that only that warp touches, then summed by the same second kernel.
//
// Rows are walked by a 1-D grid-stride loop (no grid y/z limits) with 64-bit row offsets.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <tuple>
#include <type_traits>

#include "common.h"
#include "cuda/rowwise.cuh"

namespace linfusion_ops {
namespace {

using cuda_rowwise::AlignedVector;
using cuda_rowwise::kVectorBytes;
using cuda_rowwise::kWarpSize;
using cuda_rowwise::row_group_allreduce;

constexpr int kBlockThreads = 256;
constexpr int kElemsPerThread = 16;       // fast path: channels held per thread
constexpr int kMaxThreadsPerRow = 128;    // so the fast path covers C <= 128 * 16 = 2048
constexpr int kBlockWarps = kBlockThreads / kWarpSize;
constexpr int64_t kMaxGenericPartials = int64_t{1} << 22;  // generic backward scratch per param

// Register layout of the fast path: thread `lane` of a row group holds the vectors
// lane, lane + kThreadsPerRow, ... of its row (kVec channels each), so consecutive threads touch
// consecutive 16-byte chunks.
template <typename scalar_t, int kThreadsPerRow>
struct FastLayout {
  static constexpr int kVec = kVectorBytes / static_cast<int>(sizeof(scalar_t));
  static constexpr int kVecsPerThread = kElemsPerThread / kVec;
  static constexpr int kRowsPerBlock = kBlockThreads / kThreadsPerRow;
  static_assert(kElemsPerThread % kVec == 0, "a thread holds whole vectors");
  static_assert(kBlockThreads % kThreadsPerRow == 0, "row groups tile the block");
  static_assert(kThreadsPerRow <= kWarpSize || kThreadsPerRow % kWarpSize == 0,
                "a row group is part of one warp or whole warps");
  using Vec = AlignedVector<scalar_t, kVec>;

  // Index (in vectors) within the row of the i-th vector held by `lane`.
  static __device__ __forceinline__ int vector_index(int i, int lane) {
    return i * kThreadsPerRow + lane;
  }
};

// Rows between two grid-stride iterations of the same row group.
template <int kRowsPerBlock>
__device__ __forceinline__ int64_t grid_stride_rows() {
  return static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
}

__device__ __forceinline__ float leaky_relu(float z, float slope) { return z > 0.f ? z : z * slope; }

// ---------------------------------------------------------------------------------------------
// Fast forward.
template <typename scalar_t, int kThreadsPerRow>
__global__ void __launch_bounds__(kBlockThreads)
    layer_norm_leaky_relu_kernel(const scalar_t* __restrict__ x,       // rows x C
                                 const scalar_t* __restrict__ weight,  // C
                                 const scalar_t* __restrict__ bias,    // C
                                 scalar_t* __restrict__ out,           // rows x C
                                 float* __restrict__ mean_out,         // rows
                                 float* __restrict__ rstd_out,         // rows
                                 int64_t rows, int channels, float eps, float slope) {
  using L = FastLayout<scalar_t, kThreadsPerRow>;
  using Vec = typename L::Vec;
  __shared__ float reduce_smem[kBlockWarps];

  const int lane = threadIdx.x % kThreadsPerRow;
  const int group = threadIdx.x / kThreadsPerRow;
  const int num_vecs = channels / L::kVec;
  const float inv_channels = 1.f / static_cast<float>(channels);

  Vec w[L::kVecsPerThread], b[L::kVecsPerThread];
#pragma unroll
  for (int i = 0; i < L::kVecsPerThread; ++i) {
    const int v = L::vector_index(i, lane);
    if (v < num_vecs) {
      w[i] = reinterpret_cast<const Vec*>(weight)[v];
      b[i] = reinterpret_cast<const Vec*>(bias)[v];
    }
  }

  // Every thread runs the same number of iterations (rows past the end are masked), so the
  // block-wide barriers inside row_group_allreduce are reached by all threads.
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * L::kRowsPerBlock; first < rows;
       first += grid_stride_rows<L::kRowsPerBlock>()) {
    const int64_t row = first + group;
    const bool active = row < rows;
    const Vec* x_row = reinterpret_cast<const Vec*>(x + row * channels);

    float values[L::kVecsPerThread][L::kVec];
    float sum[1] = {0.f};
#pragma unroll
    for (int i = 0; i < L::kVecsPerThread; ++i) {
      const int v = L::vector_index(i, lane);
      if (active && v < num_vecs) {
        const Vec loaded = x_row[v];
#pragma unroll
        for (int j = 0; j < L::kVec; ++j) {
          values[i][j] = static_cast<float>(loaded.val[j]);
          sum[0] += values[i][j];
        }
      }
    }
    row_group_allreduce<kThreadsPerRow>(sum, reduce_smem);
    const float mean = sum[0] * inv_channels;

    float squares[1] = {0.f};
#pragma unroll
    for (int i = 0; i < L::kVecsPerThread; ++i) {
      if (active && L::vector_index(i, lane) < num_vecs) {
#pragma unroll
        for (int j = 0; j < L::kVec; ++j) {
          const float d = values[i][j] - mean;
          squares[0] += d * d;
        }
      }
    }
    row_group_allreduce<kThreadsPerRow>(squares, reduce_smem);
    const float rstd = rsqrtf(squares[0] * inv_channels + eps);

    Vec* out_row = reinterpret_cast<Vec*>(out + row * channels);
#pragma unroll
    for (int i = 0; i < L::kVecsPerThread; ++i) {
      const int v = L::vector_index(i, lane);
      if (active && v < num_vecs) {
        Vec result;
#pragma unroll
        for (int j = 0; j < L::kVec; ++j) {
          const float z = (values[i][j] - mean) * rstd * static_cast<float>(w[i].val[j]) +
                          static_cast<float>(b[i].val[j]);
          result.val[j] = static_cast<scalar_t>(leaky_relu(z, slope));
        }
        out_row[v] = result;
      }
    }
    if (active && lane == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Fast backward. With xhat = (x - mean) * rstd, z = xhat * w + b, gz = grad_out * leaky'(z),
// dxhat = gz * w:  grad_x = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),
// dweight = sum_rows gz * xhat, dbias = sum_rows gz.
template <typename scalar_t, int kThreadsPerRow>
__global__ void __launch_bounds__(kBlockThreads)
    layer_norm_leaky_relu_backward_kernel(const scalar_t* __restrict__ grad_out,  // rows x C
                                          const scalar_t* __restrict__ x,         // rows x C
                                          const scalar_t* __restrict__ weight,    // C
                                          const scalar_t* __restrict__ bias,      // C
                                          const float* __restrict__ mean,         // rows
                                          const float* __restrict__ rstd,         // rows
                                          scalar_t* __restrict__ grad_x,          // rows x C
                                          float* __restrict__ partial_weight,     // grid x C
                                          float* __restrict__ partial_bias,       // grid x C
                                          int64_t rows, int channels, float slope) {
  using L = FastLayout<scalar_t, kThreadsPerRow>;
  using Vec = typename L::Vec;
  __shared__ float reduce_smem[kBlockWarps * 2];
  // dweight / dbias partials of the block: row groups narrower than a warp first add their
  // partials across the warp (xor shuffles, a fixed order), so one partial row per warp, else
  // one per row group, lands in shared memory. Slot e = partial_row * kRowSlots + channel
  // (kThreadsPerRow * kElemsPerThread channel slots, >= C) lives at e + e / 32: a thread stores
  // kVec consecutive channels, so without the padding word after every 32 slots the storing
  // lanes would hit banks kVec words apart (a kVec-way conflict); with it they hit distinct
  // banks, while 32 consecutive channels (the reads) stay 32 consecutive words.
  constexpr bool kGroupInWarp = kThreadsPerRow < kWarpSize;
  constexpr int kPartialRows = kGroupInWarp ? kBlockWarps : L::kRowsPerBlock;
  constexpr int kRowSlots = kThreadsPerRow * kElemsPerThread;
  constexpr int kSlots = kPartialRows * kRowSlots;
  __shared__ float group_partials[kSlots + kSlots / kWarpSize];
  const auto padded_slot = [](int e) { return e + e / kWarpSize; };

  const int lane = threadIdx.x % kThreadsPerRow;
  const int group = threadIdx.x / kThreadsPerRow;
  const int num_vecs = channels / L::kVec;
  const float inv_channels = 1.f / static_cast<float>(channels);

  Vec w[L::kVecsPerThread], b[L::kVecsPerThread];
  float dweight[L::kVecsPerThread][L::kVec], dbias[L::kVecsPerThread][L::kVec];
#pragma unroll
  for (int i = 0; i < L::kVecsPerThread; ++i) {
    const int v = L::vector_index(i, lane);
    if (v < num_vecs) {
      w[i] = reinterpret_cast<const Vec*>(weight)[v];
      b[i] = reinterpret_cast<const Vec*>(bias)[v];
    }
#pragma unroll
    for (int j = 0; j < L::kVec; ++j) dweight[i][j] = dbias[i][j] = 0.f;
  }

  for (int64_t first = static_cast<int64_t>(blockIdx.x) * L::kRowsPerBlock; first < rows;
       first += grid_stride_rows<L::kRowsPerBlock>()) {
    const int64_t row = first + group;
    const bool active = row < rows;
    const Vec* x_row = reinterpret_cast<const Vec*>(x + row * channels);
    const Vec* g_row = reinterpret_cast<const Vec*>(grad_out + row * channels);
    const float row_mean = active ? mean[row] : 0.f;
    const float row_rstd = active ? rstd[row] : 0.f;

    Vec xv[L::kVecsPerThread], gv[L::kVecsPerThread];
    float sums[2] = {0.f, 0.f};  // sum(dxhat), sum(dxhat * xhat)
#pragma unroll
    for (int i = 0; i < L::kVecsPerThread; ++i) {
      const int v = L::vector_index(i, lane);
      if (active && v < num_vecs) {
        xv[i] = x_row[v];
        gv[i] = g_row[v];
#pragma unroll
        for (int j = 0; j < L::kVec; ++j) {
          const float xhat = (static_cast<float>(xv[i].val[j]) - row_mean) * row_rstd;
          const float wj = static_cast<float>(w[i].val[j]);
          const float z = xhat * wj + static_cast<float>(b[i].val[j]);
          const float g = static_cast<float>(gv[i].val[j]);
          const float gz = z > 0.f ? g : g * slope;
          const float dxhat = gz * wj;
          sums[0] += dxhat;
          sums[1] += dxhat * xhat;
          dweight[i][j] += gz * xhat;
          dbias[i][j] += gz;
        }
      }
    }
    row_group_allreduce<kThreadsPerRow>(sums, reduce_smem);
    const float mean_dxhat = sums[0] * inv_channels;
    const float mean_dxhat_xhat = sums[1] * inv_channels;

    Vec* dx_row = reinterpret_cast<Vec*>(grad_x + row * channels);
#pragma unroll
    for (int i = 0; i < L::kVecsPerThread; ++i) {
      const int v = L::vector_index(i, lane);
      if (active && v < num_vecs) {
        Vec result;
#pragma unroll
        for (int j = 0; j < L::kVec; ++j) {
          const float xhat = (static_cast<float>(xv[i].val[j]) - row_mean) * row_rstd;
          const float wj = static_cast<float>(w[i].val[j]);
          const float z = xhat * wj + static_cast<float>(b[i].val[j]);
          const float g = static_cast<float>(gv[i].val[j]);
          const float dxhat = (z > 0.f ? g : g * slope) * wj;
          result.val[j] =
              static_cast<scalar_t>(row_rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat));
        }
        dx_row[v] = result;
      }
    }
  }

  // Block partials: the row groups' sums (per warp first when groups are narrower than a warp),
  // then the partial rows added in order, one fp32 row per block.
  const int partial_row = kGroupInWarp ? static_cast<int>(threadIdx.x / kWarpSize) : group;
  const bool stores = !kGroupInWarp || static_cast<int>(threadIdx.x % kWarpSize) < kThreadsPerRow;
  for (int which = 0; which < 2; ++which) {
    float* partial = which == 0 ? partial_weight : partial_bias;
#pragma unroll
    for (int i = 0; i < L::kVecsPerThread; ++i) {
#pragma unroll
      for (int j = 0; j < L::kVec; ++j) {
        float v = which == 0 ? dweight[i][j] : dbias[i][j];
#pragma unroll
        for (int offset = kThreadsPerRow; offset < kWarpSize; offset *= 2) {
          v += __shfl_xor_sync(cuda_rowwise::kFullMask, v, offset);
        }
        const int channel = L::vector_index(i, lane) * L::kVec + j;
        if (stores) group_partials[padded_slot(partial_row * kRowSlots + channel)] = v;
      }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < channels; c += kBlockThreads) {
      float total = 0.f;
      for (int g = 0; g < kPartialRows; ++g) {
        total += group_partials[padded_slot(g * kRowSlots + c)];
      }
      partial[static_cast<int64_t>(blockIdx.x) * channels + c] = total;
    }
    __syncthreads();  // group_partials is rewritten for dbias
  }
}

// ---------------------------------------------------------------------------------------------
// Generic path: one warp per row, scalar accesses, acc_t = float (double for fp64).
__device__ __forceinline__ int64_t global_warp() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
}

__device__ __forceinline__ int64_t warps_in_grid() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
}

__device__ __forceinline__ float inverse_sqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double inverse_sqrt(double v) { return rsqrt(v); }

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    layer_norm_leaky_relu_generic_kernel(const scalar_t* __restrict__ x,       // rows x C
                                         const scalar_t* __restrict__ weight,  // C
                                         const scalar_t* __restrict__ bias,    // C
                                         scalar_t* __restrict__ out,           // rows x C
                                         acc_t* __restrict__ mean_out,         // rows
                                         acc_t* __restrict__ rstd_out,         // rows
                                         int64_t rows, int64_t channels, acc_t eps, acc_t slope) {
  const int lane = threadIdx.x % kWarpSize;
  const acc_t inv_channels = acc_t(1) / static_cast<acc_t>(channels);
  for (int64_t row = global_warp(); row < rows; row += warps_in_grid()) {
    const scalar_t* x_row = x + row * channels;
    acc_t sum = 0;
    for (int64_t c = lane; c < channels; c += kWarpSize) sum += static_cast<acc_t>(x_row[c]);
    const acc_t mean = cuda_rowwise::warp_allreduce_sum(sum) * inv_channels;
    acc_t squares = 0;
    for (int64_t c = lane; c < channels; c += kWarpSize) {
      const acc_t d = static_cast<acc_t>(x_row[c]) - mean;
      squares += d * d;
    }
    const acc_t rstd =
        inverse_sqrt(cuda_rowwise::warp_allreduce_sum(squares) * inv_channels + eps);
    scalar_t* out_row = out + row * channels;
    for (int64_t c = lane; c < channels; c += kWarpSize) {
      const acc_t z = (static_cast<acc_t>(x_row[c]) - mean) * rstd *
                          static_cast<acc_t>(weight[c]) +
                      static_cast<acc_t>(bias[c]);
      out_row[c] = static_cast<scalar_t>(z > acc_t(0) ? z : z * slope);
    }
    if (lane == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

// partial_weight / partial_bias: (warps in grid) x C, zero on entry; warp k only touches row k,
// and each lane only its own channels, so the accumulation order is fixed.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    layer_norm_leaky_relu_backward_generic_kernel(
        const scalar_t* __restrict__ grad_out,  // rows x C
        const scalar_t* __restrict__ x,         // rows x C
        const scalar_t* __restrict__ weight,    // C
        const scalar_t* __restrict__ bias,      // C
        const acc_t* __restrict__ mean,         // rows
        const acc_t* __restrict__ rstd,         // rows
        scalar_t* __restrict__ grad_x,          // rows x C
        acc_t* __restrict__ partial_weight,     // warps x C
        acc_t* __restrict__ partial_bias,       // warps x C
        int64_t rows, int64_t channels, acc_t slope) {
  const int lane = threadIdx.x % kWarpSize;
  const acc_t inv_channels = acc_t(1) / static_cast<acc_t>(channels);
  const int64_t warp = global_warp();
  acc_t* dweight = partial_weight + warp * channels;
  acc_t* dbias = partial_bias + warp * channels;
  for (int64_t row = warp; row < rows; row += warps_in_grid()) {
    const scalar_t* x_row = x + row * channels;
    const scalar_t* g_row = grad_out + row * channels;
    const acc_t row_mean = mean[row];
    const acc_t row_rstd = rstd[row];
    acc_t sum_dxhat = 0, sum_dxhat_xhat = 0;
    for (int64_t c = lane; c < channels; c += kWarpSize) {
      const acc_t xhat = (static_cast<acc_t>(x_row[c]) - row_mean) * row_rstd;
      const acc_t wc = static_cast<acc_t>(weight[c]);
      const acc_t z = xhat * wc + static_cast<acc_t>(bias[c]);
      const acc_t g = static_cast<acc_t>(g_row[c]);
      const acc_t gz = z > acc_t(0) ? g : g * slope;
      sum_dxhat += gz * wc;
      sum_dxhat_xhat += gz * wc * xhat;
      dweight[c] += gz * xhat;
      dbias[c] += gz;
    }
    const acc_t mean_dxhat = cuda_rowwise::warp_allreduce_sum(sum_dxhat) * inv_channels;
    const acc_t mean_dxhat_xhat = cuda_rowwise::warp_allreduce_sum(sum_dxhat_xhat) * inv_channels;
    scalar_t* dx_row = grad_x + row * channels;
    for (int64_t c = lane; c < channels; c += kWarpSize) {
      const acc_t xhat = (static_cast<acc_t>(x_row[c]) - row_mean) * row_rstd;
      const acc_t wc = static_cast<acc_t>(weight[c]);
      const acc_t z = xhat * wc + static_cast<acc_t>(bias[c]);
      const acc_t g = static_cast<acc_t>(g_row[c]);
      const acc_t dxhat = (z > acc_t(0) ? g : g * slope) * wc;
      dx_row[c] = static_cast<scalar_t>(row_rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Calls body(std::integral_constant<int, kThreadsPerRow>{}) with the narrowest row group whose
// registers hold C channels (C <= kMaxThreadsPerRow * kElemsPerThread). Rows whose bytes are not
// a whole number of 32-byte sectors (fp16 / bf16 C = 40: 80 bytes) take one vector per thread
// instead, when that fits a warp: a row group then loads its whole row in one instruction, so
// one warp request covers consecutive rows end to end (4 rows of 80 bytes = 10 whole sectors),
// where kElemsPerThread channels per thread would split each row into a 64-byte and a 16-byte
// request that each straddle sectors (71-83 % efficiency).
template <typename Body>
void dispatch_threads_per_row(int64_t channels, int64_t element_bytes, Body&& body) {
  static_assert(kMaxThreadsPerRow == 128, "update the dispatch with kMaxThreadsPerRow");
  constexpr int64_t kSectorBytes = 32;
  const int64_t vec = kVectorBytes / element_bytes;
  const bool rows_straddle_sectors = channels * element_bytes % kSectorBytes != 0;
  const int64_t per_thread =
      rows_straddle_sectors && channels <= kWarpSize * vec ? vec : kElemsPerThread;
  if (channels <= 4 * per_thread) {
    body(std::integral_constant<int, 4>{});
  } else if (channels <= 8 * per_thread) {
    body(std::integral_constant<int, 8>{});
  } else if (channels <= 16 * per_thread) {
    body(std::integral_constant<int, 16>{});
  } else if (channels <= 32 * per_thread) {
    body(std::integral_constant<int, 32>{});
  } else if (channels <= 64 * per_thread) {
    body(std::integral_constant<int, 64>{});
  } else {
    body(std::integral_constant<int, 128>{});
  }
}

// The fast path's dtypes (fp64 takes the generic path).
#define LINFUSION_DISPATCH_FAST_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// The register path needs 16-byte vectors: C a multiple of the vector and aligned rows.
bool use_fast_path(at::ScalarType dtype, int64_t channels, std::initializer_list<const void*> ptrs) {
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) return false;
  const int64_t vec = kVectorBytes / static_cast<int64_t>(c10::elementSize(dtype));
  if (channels % vec != 0 || channels > kMaxThreadsPerRow * kElemsPerThread) return false;
  for (const void* p : ptrs) {
    if (!cuda_rowwise::is_aligned(p, kVectorBytes)) return false;
  }
  return true;
}

// Result in x's memory layout (what the fake kernel's empty_like(x) promises) from a
// contiguous one.
at::Tensor like_input(const at::Tensor& contiguous_result, const at::Tensor& x) {
  return x.is_contiguous() ? contiguous_result : at::empty_like(x).copy_(contiguous_result);
}

// x: (..., C), weight/bias: (C,) -> (out like x, mean, rstd of shape x.shape[:-1]; fp32, or
// fp64 for fp64 x).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_leaky_relu_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    double negative_slope) {
  const int64_t channels = check_layer_norm_args(x, weight, bias, eps);
  check_kernel_device(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor bc = bias.contiguous();
  const int64_t rows = xc.numel() / channels;
  const auto stats_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor out = at::empty_like(xc);
  at::Tensor mean = at::empty(stats_shape, x.options().dtype(accumulate_dtype(x.scalar_type())));
  at::Tensor rstd = at::empty_like(mean);
  if (rows == 0) return {like_input(out, x), mean, rstd};
  const auto stream = at::cuda::getCurrentCUDAStream();

  if (use_fast_path(x.scalar_type(), channels,
                    {xc.const_data_ptr(), wc.const_data_ptr(), bc.const_data_ptr(),
                     out.const_data_ptr()})) {
    LINFUSION_DISPATCH_FAST_TYPES(x.scalar_type(), "layer_norm_leaky_relu_cuda", [&] {
      dispatch_threads_per_row(channels, sizeof(scalar_t), [&](auto threads_per_row) {
        constexpr int kThreadsPerRow = decltype(threads_per_row)::value;
        using L = FastLayout<scalar_t, kThreadsPerRow>;
        const auto kernel = layer_norm_leaky_relu_kernel<scalar_t, kThreadsPerRow>;
        const int64_t blocks = cuda_rowwise::grid_stride_blocks(
            kernel, kBlockThreads, (rows + L::kRowsPerBlock - 1) / L::kRowsPerBlock);
        launch_kernel(kernel, static_cast<unsigned>(blocks), kBlockThreads, 0, stream,
            xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
            bc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
            mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), rows,
            static_cast<int>(channels), static_cast<float>(eps),
            static_cast<float>(negative_slope));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "layer_norm_leaky_relu_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto kernel = layer_norm_leaky_relu_generic_kernel<scalar_t, acc_t>;
      const int64_t blocks = cuda_rowwise::grid_stride_blocks(
          kernel, kBlockThreads, (rows + kBlockWarps - 1) / kBlockWarps);
      launch_kernel(kernel, static_cast<unsigned>(blocks), kBlockThreads, 0, stream,
          xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
          bc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), rows, channels,
          static_cast<acc_t>(eps), static_cast<acc_t>(negative_slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {like_input(out, x), mean, rstd};
}

// grad_out, x: (..., C); weight, bias: (C,); mean, rstd: x.shape[:-1] from the forward ->
// (grad_x like x, grad_weight (C,), grad_bias (C,)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_leaky_relu_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& rstd,
    double negative_slope) {
  const int64_t channels = check_layer_norm_backward_args(grad_out, x, weight, bias, mean, rstd);
  check_kernel_device(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor gc = grad_out.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor bc = bias.contiguous();
  const at::Tensor mc = mean.contiguous();
  const at::Tensor rc = rstd.contiguous();
  const int64_t rows = xc.numel() / channels;
  at::Tensor grad_x = at::empty_like(xc);
  at::Tensor grad_weight = at::empty_like(wc);
  at::Tensor grad_bias = at::empty_like(bc);
  if (rows == 0) {
    return {like_input(grad_x, x), grad_weight.zero_(), grad_bias.zero_()};
  }
  const auto stream = at::cuda::getCurrentCUDAStream();

  if (use_fast_path(x.scalar_type(), channels,
                    {gc.const_data_ptr(), xc.const_data_ptr(), wc.const_data_ptr(),
                     bc.const_data_ptr(), grad_x.const_data_ptr()})) {
    LINFUSION_DISPATCH_FAST_TYPES(x.scalar_type(), "layer_norm_leaky_relu_backward_cuda", [&] {
      dispatch_threads_per_row(channels, sizeof(scalar_t), [&](auto threads_per_row) {
        constexpr int kThreadsPerRow = decltype(threads_per_row)::value;
        using L = FastLayout<scalar_t, kThreadsPerRow>;
        const auto kernel = layer_norm_leaky_relu_backward_kernel<scalar_t, kThreadsPerRow>;
        const int64_t blocks = cuda_rowwise::grid_stride_blocks(
            kernel, kBlockThreads, (rows + L::kRowsPerBlock - 1) / L::kRowsPerBlock);
        at::Tensor partials = at::empty({2, blocks, channels}, x.options().dtype(at::kFloat));
        float* partial_weight = partials.mutable_data_ptr<float>();
        float* partial_bias = partial_weight + blocks * channels;
        launch_kernel(kernel, static_cast<unsigned>(blocks), kBlockThreads, 0, stream,
            gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
            wc.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
            mc.const_data_ptr<float>(), rc.const_data_ptr<float>(),
            grad_x.mutable_data_ptr<scalar_t>(), partial_weight, partial_bias, rows,
            static_cast<int>(channels), static_cast<float>(negative_slope));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        cuda_rowwise::launch_column_sum(partial_weight, blocks, channels,
                                        grad_weight.mutable_data_ptr<scalar_t>());
        cuda_rowwise::launch_column_sum(partial_bias, blocks, channels,
                                        grad_bias.mutable_data_ptr<scalar_t>());
      });
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "layer_norm_leaky_relu_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto kernel = layer_norm_leaky_relu_backward_generic_kernel<scalar_t, acc_t>;
      // One partial row per warp: cap the grid so the scratch stays within
      // kMaxGenericPartials elements per parameter whatever C is.
      const int64_t max_blocks = std::max<int64_t>(1, kMaxGenericPartials / (channels * kBlockWarps));
      const int64_t blocks = std::min(
          max_blocks, cuda_rowwise::grid_stride_blocks(kernel, kBlockThreads,
                                                       (rows + kBlockWarps - 1) / kBlockWarps));
      const int64_t warps = blocks * kBlockWarps;
      at::Tensor partials = at::zeros({2, warps, channels}, x.options().dtype(mean.scalar_type()));
      acc_t* partial_weight = partials.mutable_data_ptr<acc_t>();
      acc_t* partial_bias = partial_weight + warps * channels;
      launch_kernel(kernel, static_cast<unsigned>(blocks), kBlockThreads, 0, stream,
          gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
          wc.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
          mc.const_data_ptr<acc_t>(), rc.const_data_ptr<acc_t>(),
          grad_x.mutable_data_ptr<scalar_t>(), partial_weight, partial_bias, rows, channels,
          static_cast<acc_t>(negative_slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cuda_rowwise::launch_column_sum(partial_weight, warps, channels,
                                      grad_weight.mutable_data_ptr<scalar_t>());
      cuda_rowwise::launch_column_sum(partial_bias, warps, channels,
                                      grad_bias.mutable_data_ptr<scalar_t>());
    });
  }
  return {like_input(grad_x, x), grad_weight, grad_bias};
}

}  // namespace

LINFUSION_OPS_CUDA_IMPL(m) {
  m.impl("layer_norm_leaky_relu", &layer_norm_leaky_relu_cuda);
  m.impl("layer_norm_leaky_relu_backward", &layer_norm_leaky_relu_backward_cuda);
}

}  // namespace linfusion_ops
