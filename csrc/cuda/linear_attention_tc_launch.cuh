// Definitions of the tensor-core launchers declared in linear_attention_kernels.cuh. Included
// only by linear_attention_tc_<dtype>.cu, which instantiate them for one dtype each, so the
// heavy WMMA kernels compile in parallel translation units.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "cuda/linear_attention_kernels.cuh"

namespace linfusion_ops {
namespace la_cuda {

// Above the 48 KiB default a kernel must opt in to `smem_bytes` of dynamic shared memory: a
// function attribute, no stream work, so it is allowed while a CUDA graph is being captured.
template <typename Kernel>
void opt_in_shared_memory(Kernel kernel, size_t smem_bytes) {
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  }
}

// Launches kernel on (batch * heads) * splits blocks with `smem_bytes` of dynamic shared memory.
template <typename Kernel, typename... Args>
void launch_split_kernel(Kernel kernel, int threads, size_t smem_bytes, int64_t batch_heads,
                         const TokenSplit& split, cudaStream_t stream, const Args&... args) {
  opt_in_shared_memory(kernel, smem_bytes);
  const int64_t blocks = batch_heads * split.count;
  TORCH_CHECK(blocks > 0 && blocks <= INT32_MAX, "linfusion_ops: launch needs ", blocks,
              " blocks, beyond CUDA's grid limit");
  launch_kernel(kernel, static_cast<unsigned>(blocks), threads, smem_bytes, stream, args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Blocks of kernel that one SM holds at once (registers, shared memory, threads), at least 1.
template <typename Kernel>
int resident_blocks_per_sm(Kernel kernel, int threads, size_t smem_bytes) {
  opt_in_shared_memory(kernel, smem_bytes);
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem_bytes));
  return blocks > 0 ? blocks : 1;
}

// A launcher's last step: launch kernel, or, when resident_per_sm is set, only store how many of
// its blocks one SM holds (tc_blocks_per_sm, which sizes the split).
template <typename Kernel, typename... Args>
void launch_or_query(int* resident_per_sm, Kernel kernel, int threads, size_t smem_bytes,
                     int64_t batch_heads, const TokenSplit& split, cudaStream_t stream,
                     const Args&... args) {
  if (resident_per_sm != nullptr) {
    *resident_per_sm = resident_blocks_per_sm(kernel, threads, smem_bytes);
    return;
  }
  launch_split_kernel(kernel, threads, smem_bytes, batch_heads, split, stream, args...);
}

// Each launcher turns the feature map, then the padded head dim, into template constants.
template <typename scalar_t>
struct StatePartialTcLauncher {
  const PartialArgs<scalar_t, float>& args;
  int dp;
  cudaStream_t stream;
  int* resident_per_sm = nullptr;
  template <FeatureMap F>
  struct ByDim {
    const StatePartialTcLauncher& self;
    template <int DP>
    void operator()() const {
      TORCH_CHECK(self.resident_per_sm != nullptr || (self.args.ld_x == DP && self.args.ld_y == DP),
                  "linfusion_ops: state partials must be padded to ", DP);
      launch_or_query(self.resident_per_sm, linear_attention_state_partial_tc_kernel<scalar_t, F, DP>,
                      kTcPartialWarps * kWarpSize, 0, self.args.batch_heads, self.args.split,
                      self.stream, self.args);
    }
  };
  template <FeatureMap F>
  void operator()() const {
    dispatch_tc_dim(dp, ByDim<F>{*this});
  }
};

template <typename scalar_t>
struct ApplyTcLauncher {
  const TokenArgs<scalar_t, float>& args;
  int dp;
  cudaStream_t stream;
  int* resident_per_sm = nullptr;
  template <FeatureMap F>
  struct ByDim {
    const ApplyTcLauncher& self;
    template <int DP>
    void operator()() const {
      launch_or_query(self.resident_per_sm, linear_attention_apply_tc_kernel<scalar_t, F, DP>,
                      kTcApplyWarps * kWarpSize, TcApplyShape<DP>::kSmemBytes,
                      self.args.batch_heads, self.args.split, self.stream, self.args);
    }
  };
  template <FeatureMap F>
  void operator()() const {
    dispatch_tc_dim(dp, ByDim<F>{*this});
  }
};

template <typename scalar_t>
struct ApplyBackwardTcLauncher {
  const TokenArgs<scalar_t, float>& args;
  float* partial_outer;
  float* partial_sum;
  int dp;
  cudaStream_t stream;
  int* resident_per_sm = nullptr;
  template <FeatureMap F>
  struct ByDim {
    const ApplyBackwardTcLauncher& self;
    template <int DP>
    void operator()() const {
      launch_or_query(self.resident_per_sm,
                      linear_attention_apply_backward_tc_kernel<scalar_t, F, DP>,
                      kTcBackwardWarps * kWarpSize, TcApplyBackwardShape<DP>::kSmemBytes,
                      self.args.batch_heads, self.args.split, self.stream, self.args,
                      self.partial_outer, self.partial_sum);
    }
  };
  template <FeatureMap F>
  void operator()() const {
    dispatch_tc_dim(dp, ByDim<F>{*this});
  }
};

template <typename scalar_t>
struct StateBackwardTcLauncher {
  const TokenArgs<scalar_t, float>& args;
  int dp;
  cudaStream_t stream;
  int* resident_per_sm = nullptr;
  template <FeatureMap F>
  struct ByDim {
    const StateBackwardTcLauncher& self;
    template <int DP>
    void operator()() const {
      launch_or_query(self.resident_per_sm,
                      linear_attention_state_backward_tc_kernel<scalar_t, F, DP>,
                      kTcApplyWarps * kWarpSize, TcStateBackwardShape<DP>::kSmemBytes,
                      self.args.batch_heads, self.args.split, self.stream, self.args);
    }
  };
  template <FeatureMap F>
  void operator()() const {
    dispatch_tc_dim(dp, ByDim<F>{*this});
  }
};

template <typename scalar_t>
void launch_state_partial_tc(const PartialArgs<scalar_t, float>& args, FeatureMap feature_map,
                             int dp, cudaStream_t stream) {
  dispatch_feature_map(feature_map, StatePartialTcLauncher<scalar_t>{args, dp, stream});
}

template <typename scalar_t>
void launch_apply_tc(const TokenArgs<scalar_t, float>& args, FeatureMap feature_map, int dp,
                     cudaStream_t stream) {
  dispatch_feature_map(feature_map, ApplyTcLauncher<scalar_t>{args, dp, stream});
}

template <typename scalar_t>
void launch_apply_backward_tc(const TokenArgs<scalar_t, float>& args, float* partial_outer,
                              float* partial_sum, FeatureMap feature_map, int dp,
                              cudaStream_t stream) {
  dispatch_feature_map(feature_map, ApplyBackwardTcLauncher<scalar_t>{
                                        args, partial_outer, partial_sum, dp, stream});
}

template <typename scalar_t>
void launch_state_backward_tc(const TokenArgs<scalar_t, float>& args, FeatureMap feature_map,
                              int dp, cudaStream_t stream) {
  dispatch_feature_map(feature_map, StateBackwardTcLauncher<scalar_t>{args, dp, stream});
}

template <typename scalar_t>
int tc_blocks_per_sm(TcKernel which, FeatureMap feature_map, int dp) {
  int resident = 0;
  const PartialArgs<scalar_t, float> partial_args{};
  const TokenArgs<scalar_t, float> token_args{};
  switch (which) {
    case TcKernel::kStatePartial:
      dispatch_feature_map(feature_map,
                           StatePartialTcLauncher<scalar_t>{partial_args, dp, nullptr, &resident});
      break;
    case TcKernel::kApply:
      dispatch_feature_map(feature_map,
                           ApplyTcLauncher<scalar_t>{token_args, dp, nullptr, &resident});
      break;
    case TcKernel::kApplyBackward:
      dispatch_feature_map(feature_map, ApplyBackwardTcLauncher<scalar_t>{
                                            token_args, nullptr, nullptr, dp, nullptr, &resident});
      break;
    case TcKernel::kStateBackward:
      dispatch_feature_map(feature_map,
                           StateBackwardTcLauncher<scalar_t>{token_args, dp, nullptr, &resident});
      break;
  }
  return resident;
}

}  // namespace la_cuda
}  // namespace linfusion_ops
