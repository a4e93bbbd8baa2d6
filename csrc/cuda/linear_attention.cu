// CUDA implementations of the linear-attention ops (schemas in csrc/ops.cpp): host launchers,
// path selection and registration. Kernels: linear_attention_kernels.cuh.
//
// Path selection: fp16 / bf16 with Dk == Dv <= 160 on sm_80+ run the tensor-core kernels for all
// four ops (the apply backward fused: dq, dS and dz in one pass over q and grad_out), each op as
// long as its kernel's shared memory fits the device (sm_86 / sm_89 allow 99 KiB per block, so
// wide heads fall back there); everything else (fp32, fp64, Dk != Dv, head dims up to 256) runs
// the generic SIMT kernels, whose apply backward also sums dS and dz per split of the tokens in
// shared memory where they fit (else it keeps a (B*H, N, 2) scratch of per-token weights for a
// second pass). Head dims above 256 are rejected. Every launch goes to the current stream with no
// host synchronisation; scratch comes from the caching allocator, so the ops can be captured in
// CUDA graphs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

#include "common.h"
#include "cuda/linear_attention_kernels.cuh"

namespace linfusion_ops {
namespace la_cuda {
namespace {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
constexpr bool kHasTensorCores =
    std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;

void check_head_dims(const LinearAttentionDims& dims) {
  TORCH_CHECK(dims.head_dim > 0 && dims.value_dim > 0,
              "linfusion_ops: the CUDA kernels need positive head dims, got Dk = ", dims.head_dim,
              " and Dv = ", dims.value_dim);
  TORCH_CHECK(dims.head_dim <= kGenericMaxDim && dims.value_dim <= kGenericMaxDim,
              "linfusion_ops: the CUDA kernels support head dims up to ", kGenericMaxDim,
              ", got Dk = ", dims.head_dim, " and Dv = ", dims.value_dim);
}

// Padded head dim of the tensor-core kernel `kernel`, or 0 when it does not apply: other dtypes,
// Dk != Dv, pre-sm_80 devices, or more shared memory than the device lets one block use.
int tensor_core_dim(at::ScalarType dtype, const LinearAttentionDims& dims, TcKernel kernel) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return 0;
  if (dims.head_dim != dims.value_dim || dims.head_dim > 160) return 0;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major < 8) return 0;
  for (int dp : {48, 64, 80, 128, 160}) {
    if (dims.head_dim <= dp) {
      return tc_smem_bytes(kernel, dp) <= prop->sharedMemPerBlockOptin ? dp : 0;
    }
  }
  return 0;
}

// (B, N, H*D) with a contiguous last dim (see channels_contiguous).
TokenMajorLayout token_major_layout(const at::Tensor& t, int64_t head_dim) {
  return {t.stride(0), t.stride(1), head_dim};
}

// 16-byte vector access to each head's row: 16-bit elements, 8 per vector, aligned rows.
bool vector_access(const at::Tensor& t, int64_t head_dim) {
  return t.element_size() == 2 && head_dim % kTcVector == 0 &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % kTcVector == 0 &&
         t.stride(1) % kTcVector == 0;
}

KeyMask key_mask(const c10::optional<at::Tensor>& key_padding_mask) {
  if (!key_padding_mask.has_value()) return {nullptr, 0, 0};
  const auto& mask = *key_padding_mask;
  return {mask.data_ptr<bool>(), mask.stride(0), mask.stride(1)};
}

// Kept keys per batch, (B,) int64 on the device (an ATen reduction on the current stream), or
// an undefined tensor without a mask (n = N).
at::Tensor kept_counts(const c10::optional<at::Tensor>& key_padding_mask) {
  if (!key_padding_mask.has_value()) return at::Tensor();
  return at::sum(*key_padding_mask, {1}, /*keepdim=*/false, at::kLong);
}

const int64_t* kept_ptr(const at::Tensor& kept) {
  return kept.defined() ? kept.data_ptr<int64_t>() : nullptr;
}

unsigned grid_size(int64_t blocks) {
  TORCH_CHECK(blocks > 0 && blocks <= INT_MAX, "linfusion_ops: launch needs ", blocks,
              " blocks, beyond CUDA's grid limit");
  return static_cast<unsigned>(blocks);
}

// Splits N into ranges of whole tiles. B*H alone (16-40 at inference) is far below the SM count,
// so every pass splits N as well.
//
// resident_per_sm > 0 (the tensor-core kernels: the occupancy API's count for the kernel): one
// full wave, resident_per_sm blocks on every SM, ranges rounded down to fit it. Measured on an
// H200 at 4 blocks per SM, these kernels moved only the minimum bytes yet ran at 0.9-1.4 TB/s of
// its 4.2 TB/s copy rate with a quarter of the warp slots filled (ncu): latency-bound, so every
// block that can be resident should be; and no more than that, since a second, partial wave runs
// no faster and each range of a kernel that writes split partials adds a DP x DP fp32 partial.
// resident_per_sm == 0 (the generic fp32 kernels): about kBlocksPerSm blocks per SM, rounded up.
// min_tiles: tiles per range at least (a block of the apply pass first loads the whole state).
constexpr int64_t kBlocksPerSm = 4;

TokenSplit split_tokens(int64_t tokens, int64_t blocks_per_range, int64_t tile,
                        int64_t min_tiles = 1, int64_t resident_per_sm = 0) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t tiles = (tokens + tile - 1) / tile;
  // Rounded down: ceil(tiles / wanted) >= tiles / most >= min_tiles whenever there are 2+ ranges.
  const int64_t most = std::max<int64_t>(tiles / min_tiles, 1);
  const int64_t wanted =
      resident_per_sm > 0
          ? resident_per_sm * sms / blocks_per_range
          : (kBlocksPerSm * sms + blocks_per_range - 1) / blocks_per_range;
  const int64_t count = std::clamp<int64_t>(wanted, 1, most);
  const int64_t per_split = (tiles + count - 1) / count * tile;
  return {tokens, per_split, (tokens + per_split - 1) / per_split};
}

// Partial results of a split-N reduction: outer (B*H, splits, ld_x, ld_y) and
// sum (B*H, splits, ld_x), in the accumulation dtype, of which rows < dx and columns < dy count.
struct Partials {
  at::Tensor outer;
  at::Tensor sum;
  int64_t batch_heads;
  int64_t heads;
  TokenSplit split;
  int dx, dy, ld_x, ld_y;
};

Partials make_partials(const at::TensorOptions& acc_opts, int64_t batch_heads, int64_t heads,
                       const TokenSplit& split, int dx, int dy, int ld_x, int ld_y) {
  return {at::empty({batch_heads, split.count, ld_x, ld_y}, acc_opts),
          at::empty({batch_heads, split.count, ld_x}, acc_opts),
          batch_heads, heads, split, dx, dy, ld_x, ld_y};
}

// outer (B, H, dx, dy) and sum (B, H, dx) = the partials summed in split order, times 1/n when
// scale_by_inverse_kept.
template <typename acc_t>
void reduce_partials(const Partials& p, at::Tensor& outer, at::Tensor& sum, const int64_t* kept,
                     bool scale_by_inverse_kept, cudaStream_t stream) {
  const int64_t per_head = (int64_t(p.dx) * p.dy + p.dx + kReduceThreads - 1) / kReduceThreads;
  launch_kernel(linear_attention_reduce_partials_kernel<acc_t>,
                grid_size(p.batch_heads * per_head), kReduceThreads, 0, stream,
          p.outer.data_ptr<acc_t>(), p.sum.data_ptr<acc_t>(), outer.data_ptr<acc_t>(),
          sum.data_ptr<acc_t>(), kept, p.split.tokens, p.heads, p.dx, p.dy, p.ld_x, p.ld_y,
          p.split.count, scale_by_inverse_kept, per_head);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
struct PartialGenericByFeatureMap {
  const PartialArgs<scalar_t, acc_t>& args;
  RowWeights weights;
  int64_t blocks;
  cudaStream_t stream;
  template <FeatureMap F>
  void operator()() const {
    if (weights == RowWeights::kMask) {
      launch_kernel(
          linear_attention_partial_generic_kernel<scalar_t, acc_t, F, RowWeights::kMask>,
          grid_size(blocks), kGenericThreads, 0, stream, args);
    } else {
      launch_kernel(
          linear_attention_partial_generic_kernel<scalar_t, acc_t, F, RowWeights::kScratch>,
          grid_size(blocks), kGenericThreads, 0, stream, args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Generic split-N partials of sum_t a_t y_t^T and sum_t a_t c_t, a_t = phi(x_t) w_t: the state
// (kMask) or dS / dz of the apply backward (kScratch). `args` carries the inputs and
// args.split.tokens; the split and the partial buffers are chosen here.
template <typename scalar_t, typename acc_t>
Partials partials_generic(PartialArgs<scalar_t, acc_t> args, FeatureMap feature_map,
                          RowWeights weights, const at::TensorOptions& acc_opts,
                          cudaStream_t stream) {
  const int micro = outer_micro(args.dx, args.dy);
  const int64_t tiles = int64_t(outer_tiles(args.dx, micro)) * outer_tiles(args.dy, micro);
  args.split = split_tokens(args.split.tokens, args.batch_heads * tiles, kOuterTokens);
  args.ld_x = args.dx;
  args.ld_y = args.dy;
  Partials p = make_partials(acc_opts, args.batch_heads, args.heads, args.split, args.dx, args.dy,
                             args.ld_x, args.ld_y);
  args.partial_outer = p.outer.data_ptr<acc_t>();
  args.partial_sum = p.sum.data_ptr<acc_t>();
  dispatch_feature_map(feature_map, PartialGenericByFeatureMap<scalar_t, acc_t>{
                                        args, weights, args.batch_heads * args.split.count * tiles,
                                        stream});
  return p;
}

// Split of the tokens for the per-token generic kernels: whole tiles of generic_tokens<acc_t>()
// tokens, about kBlocksPerSm blocks per SM in all, each block looping over its tiles.
template <typename acc_t>
TokenSplit generic_token_split(int64_t tokens, int64_t batch_heads) {
  return split_tokens(tokens, batch_heads, generic_tokens<acc_t>());
}

enum class TokenKernel { kApply, kStateBackward };

template <typename scalar_t, typename acc_t, TokenKernel K>
struct TokenGenericByFeatureMap {
  const TokenArgs<scalar_t, acc_t>& args;
  cudaStream_t stream;
  template <FeatureMap F>
  void operator()() const {
    const unsigned blocks = grid_size(args.batch_heads * args.split.count);
    if constexpr (K == TokenKernel::kApply) {
      launch_kernel(linear_attention_apply_generic_kernel<scalar_t, acc_t, F>, blocks,
                    kGenericThreads, 0, stream, args);
    } else {
      launch_kernel(linear_attention_state_backward_generic_kernel<scalar_t, acc_t, F>, blocks,
                    kGenericThreads, 0, stream, args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Dynamic shared memory (bytes) of the generic apply backward, with or without the fused dS / dz
// reduction.
template <typename acc_t>
size_t apply_backward_generic_smem(int dk, int dv, bool reduce) {
  return static_cast<size_t>(apply_backward_smem<acc_t>(dk, dv, reduce).words) * sizeof(acc_t);
}

template <typename scalar_t, typename acc_t, bool kReduce>
struct ApplyBackwardGenericByFeatureMap {
  const TokenArgs<scalar_t, acc_t>& args;
  acc_t* partial_outer;  // kReduce: (B*H, splits, dk, dv)
  acc_t* partial_sum;    // kReduce: (B*H, splits, dk)
  cudaStream_t stream;
  template <FeatureMap F>
  void operator()() const {
    const auto kernel = linear_attention_apply_backward_generic_kernel<scalar_t, acc_t, F, kReduce>;
    const size_t smem = apply_backward_generic_smem<acc_t>(args.dk, args.dv, kReduce);
    // Above the 48 KiB default a kernel opts in (a function attribute: allowed in graph capture).
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    launch_kernel(kernel, grid_size(args.batch_heads * args.split.count), kGenericThreads, smem,
                  stream, args, partial_outer, partial_sum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Split of the tokens for the per-token tensor-core kernels, with at least 2*DP tokens per
// block: the fp32 matrix each block loads first is then at most the inputs it reads.
TokenSplit tc_token_split(int64_t tokens, int64_t batch_heads, int dp, int64_t resident_per_sm) {
  const int tile = tc_token_tile(dp);
  return split_tokens(tokens, batch_heads, tile, (2 * dp + tile - 1) / tile, resident_per_sm);
}

// The per-op launchers below are function templates so that `if constexpr` drops the
// tensor-core branches for fp32 / fp64.

// Pass 1: state (B, H, Dk, Dv) and key_mean (B, H, Dk), scaled by 1/n.
template <typename scalar_t, typename acc_t>
void launch_state(PartialArgs<scalar_t, acc_t>& args, FeatureMap feature_map, int tc_dim,
                  const int64_t* kept, at::Tensor& state, at::Tensor& key_mean,
                  cudaStream_t stream) {
  if constexpr (kHasTensorCores<scalar_t>) {
    if (tc_dim > 0) {
      args.split = split_tokens(
          args.split.tokens, args.batch_heads, kTcPartialTokens, 1,
          tc_blocks_per_sm<scalar_t>(TcKernel::kStatePartial, feature_map, tc_dim));
      args.ld_x = args.ld_y = tc_dim;
      const Partials p = make_partials(state.options(), args.batch_heads, args.heads, args.split,
                                       args.dx, args.dy, tc_dim, tc_dim);
      args.partial_outer = p.outer.data_ptr<float>();
      args.partial_sum = p.sum.data_ptr<float>();
      launch_state_partial_tc<scalar_t>(args, feature_map, tc_dim, stream);
      reduce_partials<float>(p, state, key_mean, kept, /*scale_by_inverse_kept=*/true, stream);
      return;
    }
  }
  const Partials p = partials_generic(args, feature_map, RowWeights::kMask, state.options(), stream);
  reduce_partials<acc_t>(p, state, key_mean, kept, /*scale_by_inverse_kept=*/true, stream);
}

// Pass 2: out (B, N, H*Dv).
template <typename scalar_t, typename acc_t>
void launch_apply(TokenArgs<scalar_t, acc_t>& args, FeatureMap feature_map, int tc_dim,
                  const at::Tensor& q, const at::Tensor& out, cudaStream_t stream) {
  if constexpr (kHasTensorCores<scalar_t>) {
    if (tc_dim > 0) {
      args.split =
          tc_token_split(args.tokens, args.batch_heads, tc_dim,
                         tc_blocks_per_sm<scalar_t>(TcKernel::kApply, feature_map, tc_dim));
      args.vec_x = vector_access(q, args.dk);
      args.vec_out_y = vector_access(out, args.dv);
      launch_apply_tc<scalar_t>(args, feature_map, tc_dim, stream);
      return;
    }
  }
  args.split = generic_token_split<acc_t>(args.tokens, args.batch_heads);
  dispatch_feature_map(feature_map,
                       TokenGenericByFeatureMap<scalar_t, acc_t, TokenKernel::kApply>{args, stream});
}

// Backward of pass 2: grad_q (into args.out_x), grad_state and grad_key_mean.
template <typename scalar_t, typename acc_t>
void launch_apply_backward(TokenArgs<scalar_t, acc_t>& args, FeatureMap feature_map, int tc_dim,
                           const at::Tensor& q, const at::Tensor& grad_out, at::Tensor& grad_state,
                           at::Tensor& grad_key_mean, cudaStream_t stream) {
  if constexpr (kHasTensorCores<scalar_t>) {
    if (tc_dim > 0) {
      args.split = tc_token_split(
          args.tokens, args.batch_heads, tc_dim,
          tc_blocks_per_sm<scalar_t>(TcKernel::kApplyBackward, feature_map, tc_dim));
      args.vec_x = vector_access(q, args.dk);
      args.vec_y = vector_access(grad_out, args.dv);
      const Partials p = make_partials(grad_state.options(), args.batch_heads, args.heads,
                                       args.split, args.dk, args.dv, tc_dim, tc_dim);
      launch_apply_backward_tc<scalar_t>(args, p.outer.data_ptr<float>(), p.sum.data_ptr<float>(),
                                         feature_map, tc_dim, stream);
      reduce_partials<float>(p, grad_state, grad_key_mean, nullptr, false, stream);
      return;
    }
  }
  // Generic: one pass over q and grad_out writes grad_q and the split partials of dS and dz where
  // their accumulators fit the device's shared memory; otherwise it writes (1/den_t,
  // -(o_t . do_t)), the row weights of the dS / dz reduction, to a (B*H, N, 2) scratch that the
  // partial kernel reads with q and grad_out again.
  args.split = generic_token_split<acc_t>(args.tokens, args.batch_heads);
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  if (apply_backward_generic_smem<acc_t>(args.dk, args.dv, true) <= optin) {
    const Partials p = make_partials(grad_state.options(), args.batch_heads, args.heads, args.split,
                                     args.dk, args.dv, args.dk, args.dv);
    dispatch_feature_map(feature_map, ApplyBackwardGenericByFeatureMap<scalar_t, acc_t, true>{
                                          args, p.outer.data_ptr<acc_t>(),
                                          p.sum.data_ptr<acc_t>(), stream});
    reduce_partials<acc_t>(p, grad_state, grad_key_mean, nullptr, false, stream);
    return;
  }
  at::Tensor row_scratch =
      at::empty({args.batch_heads, args.tokens, 2}, grad_state.options());
  args.row_scratch = row_scratch.data_ptr<acc_t>();
  dispatch_feature_map(feature_map, ApplyBackwardGenericByFeatureMap<scalar_t, acc_t, false>{
                                        args, nullptr, nullptr, stream});
  PartialArgs<scalar_t, acc_t> reduce{};
  reduce.x = args.x;
  reduce.x_layout = args.x_layout;
  reduce.y = args.y;
  reduce.y_layout = args.y_layout;
  reduce.mask = KeyMask{nullptr, 0, 0};
  reduce.row_scratch = args.row_scratch;
  reduce.batch_heads = args.batch_heads;
  reduce.heads = args.heads;
  reduce.dx = args.dk;
  reduce.dy = args.dv;
  reduce.split.tokens = args.tokens;
  const Partials p =
      partials_generic(reduce, feature_map, RowWeights::kScratch, grad_state.options(), stream);
  reduce_partials<acc_t>(p, grad_state, grad_key_mean, nullptr, false, stream);
}

// The fields every per-token launch shares: the token-major input x (q, or k in the state
// backward), the (B, H, Dk, Dv) matrix and (B, H, Dk) vector it is combined with, and the shape.
template <typename scalar_t, typename acc_t>
TokenArgs<scalar_t, acc_t> token_args(const at::Tensor& x, const at::Tensor& matrix,
                                      const at::Tensor& vec, const LinearAttentionDims& dims) {
  TokenArgs<scalar_t, acc_t> args{};
  args.x = x.data_ptr<scalar_t>();
  args.x_layout = token_major_layout(x, dims.head_dim);
  args.matrix = matrix.data_ptr<acc_t>();
  args.vec = vec.data_ptr<acc_t>();
  args.tokens = dims.tokens;
  args.batch_heads = dims.batch * dims.heads;
  args.heads = dims.heads;
  args.dk = static_cast<int>(dims.head_dim);
  args.dv = static_cast<int>(dims.value_dim);
  return args;
}

// Backward of pass 1: grad_k and grad_v (into args.out_x, args.out_y).
template <typename scalar_t, typename acc_t>
void launch_state_backward(TokenArgs<scalar_t, acc_t>& args, FeatureMap feature_map, int tc_dim,
                           const at::Tensor& k, const at::Tensor& v, cudaStream_t stream) {
  if constexpr (kHasTensorCores<scalar_t>) {
    if (tc_dim > 0) {
      args.split = tc_token_split(
          args.tokens, args.batch_heads, tc_dim,
          tc_blocks_per_sm<scalar_t>(TcKernel::kStateBackward, feature_map, tc_dim));
      args.vec_x = vector_access(k, args.dk);
      args.vec_y = vector_access(v, args.dv);
      launch_state_backward_tc<scalar_t>(args, feature_map, tc_dim, stream);
      return;
    }
  }
  args.split = generic_token_split<acc_t>(args.tokens, args.batch_heads);
  dispatch_feature_map(
      feature_map,
      TokenGenericByFeatureMap<scalar_t, acc_t, TokenKernel::kStateBackward>{args, stream});
}

#define LINFUSION_DISPATCH_FLOATING_CUDA(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

// ---------------------------------------------------------------------------------------------
// Ops.
std::tuple<at::Tensor, at::Tensor> linear_attention_state_cuda(
    const at::Tensor& k, const at::Tensor& v, int64_t heads, c10::string_view feature_map,
    const c10::optional<at::Tensor>& key_padding_mask) {
  const auto fm = parse_feature_map(std::string(feature_map));
  const auto dims = check_state_args(k, v, heads, key_padding_mask);
  check_head_dims(dims);
  const c10::cuda::CUDAGuard guard(k.device());
  const at::Tensor kc = channels_contiguous(k), vc = channels_contiguous(v);
  const auto opts = k.options().dtype(accumulate_dtype(k.scalar_type()));
  at::Tensor state = at::empty({dims.batch, heads, dims.head_dim, dims.value_dim}, opts);
  at::Tensor key_mean = at::empty({dims.batch, heads, dims.head_dim}, opts);
  if (state.numel() == 0 && key_mean.numel() == 0) return {state, key_mean};
  if (dims.tokens == 0) return {state.zero_(), key_mean.zero_()};
  const at::Tensor kept = kept_counts(key_padding_mask);
  const int tc_dim = tensor_core_dim(k.scalar_type(), dims, TcKernel::kStatePartial);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LINFUSION_DISPATCH_FLOATING_CUDA(k.scalar_type(), "linear_attention_state_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    PartialArgs<scalar_t, acc_t> args{};
    args.x = kc.data_ptr<scalar_t>();
    args.x_layout = token_major_layout(kc, dims.head_dim);
    args.y = vc.data_ptr<scalar_t>();
    args.y_layout = token_major_layout(vc, dims.value_dim);
    args.mask = key_mask(key_padding_mask);
    args.batch_heads = dims.batch * heads;
    args.heads = heads;
    args.dx = static_cast<int>(dims.head_dim);
    args.dy = static_cast<int>(dims.value_dim);
    args.split.tokens = dims.tokens;
    args.vec_x = vector_access(kc, dims.head_dim);
    args.vec_y = vector_access(vc, dims.value_dim);
    launch_state<scalar_t, acc_t>(args, fm, tc_dim, kept_ptr(kept), state, key_mean, stream);
  });
  return {state, key_mean};
}

std::tuple<at::Tensor, at::Tensor> linear_attention_state_backward_cuda(
    const at::Tensor& grad_state, const at::Tensor& grad_key_mean, const at::Tensor& k,
    const at::Tensor& v, int64_t heads, c10::string_view feature_map,
    const c10::optional<at::Tensor>& key_padding_mask) {
  const auto fm = parse_feature_map(std::string(feature_map));
  const auto dims =
      check_state_backward_args(grad_state, grad_key_mean, k, v, heads, key_padding_mask);
  check_head_dims(dims);
  const c10::cuda::CUDAGuard guard(k.device());
  const at::Tensor kc = channels_contiguous(k), vc = channels_contiguous(v);
  const at::Tensor gs = grad_state.contiguous(), gz = grad_key_mean.contiguous();
  at::Tensor grad_k = at::empty(k.sizes(), k.options());
  at::Tensor grad_v = at::empty(v.sizes(), v.options());
  if (grad_k.numel() == 0 && grad_v.numel() == 0) return {grad_k, grad_v};
  const at::Tensor kept = kept_counts(key_padding_mask);
  const int tc_dim = tensor_core_dim(k.scalar_type(), dims, TcKernel::kStateBackward);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LINFUSION_DISPATCH_FLOATING_CUDA(k.scalar_type(), "linear_attention_state_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    auto args = token_args<scalar_t, acc_t>(kc, gs, gz, dims);
    args.y = vc.data_ptr<scalar_t>();
    args.y_layout = token_major_layout(vc, dims.value_dim);
    args.out_x = grad_k.data_ptr<scalar_t>();
    args.out_x_layout = token_major_layout(grad_k, dims.head_dim);
    args.out_y = grad_v.data_ptr<scalar_t>();
    args.out_y_layout = token_major_layout(grad_v, dims.value_dim);
    args.vec_out_x = vector_access(grad_k, dims.head_dim);  // tensor-core kernels only
    args.vec_out_y = vector_access(grad_v, dims.value_dim);
    args.mask = key_mask(key_padding_mask);
    args.kept = kept_ptr(kept);
    launch_state_backward<scalar_t, acc_t>(args, fm, tc_dim, kc, vc, stream);
  });
  return {grad_k, grad_v};
}

at::Tensor linear_attention_apply_cuda(const at::Tensor& q, const at::Tensor& state,
                                       const at::Tensor& key_mean, int64_t heads,
                                       c10::string_view feature_map, double eps) {
  const auto fm = parse_feature_map(std::string(feature_map));
  const auto dims = check_apply_args(q, state, key_mean, heads, eps);
  check_head_dims(dims);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = channels_contiguous(q);
  const at::Tensor st = state.contiguous(), km = key_mean.contiguous();
  at::Tensor out = at::empty({dims.batch, dims.tokens, heads * dims.value_dim}, q.options());
  if (out.numel() == 0) return out;
  const int tc_dim = tensor_core_dim(q.scalar_type(), dims, TcKernel::kApply);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LINFUSION_DISPATCH_FLOATING_CUDA(q.scalar_type(), "linear_attention_apply_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    auto args = token_args<scalar_t, acc_t>(qc, st, km, dims);
    args.out_y = out.data_ptr<scalar_t>();
    args.out_y_layout = token_major_layout(out, dims.value_dim);
    args.eps = static_cast<acc_t>(eps);
    launch_apply<scalar_t, acc_t>(args, fm, tc_dim, qc, out, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_apply_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& state,
    const at::Tensor& key_mean, int64_t heads, c10::string_view feature_map, double eps) {
  const auto fm = parse_feature_map(std::string(feature_map));
  const auto dims = check_apply_backward_args(grad_out, q, state, key_mean, heads, eps);
  check_head_dims(dims);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = channels_contiguous(q), goc = channels_contiguous(grad_out);
  const at::Tensor st = state.contiguous(), km = key_mean.contiguous();
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_state = at::empty(state.sizes(), state.options());
  at::Tensor grad_key_mean = at::empty(key_mean.sizes(), key_mean.options());
  if (grad_state.numel() == 0 && grad_key_mean.numel() == 0) {
    return {grad_q.zero_(), grad_state, grad_key_mean};
  }
  if (dims.tokens == 0) return {grad_q, grad_state.zero_(), grad_key_mean.zero_()};
  const int tc_dim = tensor_core_dim(q.scalar_type(), dims, TcKernel::kApplyBackward);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LINFUSION_DISPATCH_FLOATING_CUDA(q.scalar_type(), "linear_attention_apply_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    auto args = token_args<scalar_t, acc_t>(qc, st, km, dims);
    args.y = goc.data_ptr<scalar_t>();
    args.y_layout = token_major_layout(goc, dims.value_dim);
    args.out_x = grad_q.data_ptr<scalar_t>();
    args.out_x_layout = token_major_layout(grad_q, dims.head_dim);
    args.vec_out_x = vector_access(grad_q, dims.head_dim);  // tensor-core kernels only
    args.eps = static_cast<acc_t>(eps);
    launch_apply_backward<scalar_t, acc_t>(args, fm, tc_dim, qc, goc, grad_state, grad_key_mean,
                                           stream);
  });
  return {grad_q, grad_state, grad_key_mean};
}

}  // namespace
}  // namespace la_cuda
}  // namespace linfusion_ops

LINFUSION_OPS_CUDA_IMPL(m) {
  m.impl("linear_attention_state", &linfusion_ops::la_cuda::linear_attention_state_cuda);
  m.impl("linear_attention_state_backward",
         &linfusion_ops::la_cuda::linear_attention_state_backward_cuda);
  m.impl("linear_attention_apply", &linfusion_ops::la_cuda::linear_attention_apply_cuda);
  m.impl("linear_attention_apply_backward",
         &linfusion_ops::la_cuda::linear_attention_apply_backward_cuda);
}
