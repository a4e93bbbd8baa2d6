// CUDA kernels of generalized linear attention (docs/design.md, op contract 1).
//
// Two families, one responsibility per kernel:
//   * generic (SIMT) kernels for every dtype (fp64 included) and head dim <= 256, accumulating in
//     acc_t (float, or double for fp64);
//   * tensor-core (WMMA, fp16/bf16 in, fp32 accumulate) kernels for Dk == Dv <= 160, padded to a
//     compile-time width DP (48, 64, 80, 128, 160); the runtime head dim d <= DP is zero-padded.
// The reductions over tokens (the state, and dS / dz of the apply backward) split N across
// blocks into partials (fp32; fp64 for fp64) that linear_attention_reduce_partials_kernel sums in
// a fixed order: no float atomics, bitwise deterministic.
//
// Every kernel uses a 1-D grid (gridDim.x < 2^31): the y / z limit of 65,535 never applies,
// whatever B, H and N. Offsets into token-major tensors are int64.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "common.h"
#include "cuda/launch.cuh"

namespace linfusion_ops {
namespace la_cuda {

constexpr int kWarpSize = 32;

// ---------------------------------------------------------------------------------------------
// Index helpers.

// Element offset of head h of token n of batch b in a token-major (B, N, H*D) tensor whose last
// dim is contiguous; batch and row strides are arbitrary (e.g. slices of a fused qkv).
struct TokenMajorLayout {
  int64_t batch_stride;  // elements between batches
  int64_t row_stride;    // elements between tokens
  int64_t head_dim;      // D: elements between heads

  __host__ __device__ int64_t offset(int64_t b, int64_t n, int64_t h) const {
    return b * batch_stride + n * row_stride + h * head_dim;
  }
};

// Key padding mask (B, N) bool, True = keep; data == nullptr keeps every key.
struct KeyMask {
  const bool* data;
  int64_t batch_stride;
  int64_t row_stride;

  __device__ bool keep(int64_t b, int64_t n) const {
    return data == nullptr || data[b * batch_stride + n * row_stride];
  }
};

// 1/n for batch b, where n is the number of kept keys (kept: (B,) int64, or nullptr: n = tokens);
// 0 when n == 0, so that no key gives a zero state (and zero gradients).
template <typename acc_t>
__device__ inline acc_t inverse_kept(const int64_t* kept, int64_t b, int64_t tokens) {
  const int64_t n = kept == nullptr ? tokens : kept[b];
  return n > 0 ? acc_t(1) / static_cast<acc_t>(n) : acc_t(0);
}

// N tokens cut into `count` contiguous ranges of `per_split` tokens (a multiple of the kernel's
// token tile), one per block; the last range may be short.
struct TokenSplit {
  int64_t tokens;
  int64_t per_split;
  int64_t count;

  __device__ int64_t begin(int64_t s) const { return s * per_split; }
  __device__ int64_t end(int64_t s) const {
    return (s + 1) * per_split < tokens ? (s + 1) * per_split : tokens;
  }
};

// blockIdx.x = outer * inner_count + inner, as int64.
struct BlockCoords {
  int64_t outer;
  int64_t inner;
};

__device__ inline BlockCoords split_block_index(int64_t inner_count) {
  const int64_t block = blockIdx.x;
  return {block / inner_count, block % inner_count};
}

// Offset of split s of (batch*head) bh in a partials buffer (B*H, splits, rows, cols).
__host__ __device__ inline int64_t partial_offset(int64_t bh, int64_t s, int64_t splits,
                                                  int64_t rows, int64_t cols) {
  return (bh * splits + s) * rows * cols;
}

template <typename T>
__device__ inline T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// Where a reduction row's weights come from: the key padding mask (the state: a_t = phi(k_t)
// if kept else 0, c_t = 1), or a per-token scratch written by the apply backward (dS and dz:
// a_t = phi(q_t) / den_t, c_t = -(o_t . do_t)).
enum class RowWeights : int { kMask = 0, kScratch = 1 };

// Arguments of the split-N reduction partial[s] = sum_{t in split s} a_t b_t^T and
// partial_sum[s] = sum_t a_t c_t, where a_t = phi(x_t) w_t and b_t = y_t.
template <typename scalar_t, typename acc_t>
struct PartialArgs {
  const scalar_t* x;            // batch x tokens x (heads * dx): k, or q for the apply backward
  TokenMajorLayout x_layout;
  const scalar_t* y;            // batch x tokens x (heads * dy): v, or grad_out
  TokenMajorLayout y_layout;
  KeyMask mask;                 // batch x tokens (kMask)
  const acc_t* row_scratch;     // (batch * heads) x tokens x 2 = (w_t, c_t) (kScratch)
  acc_t* partial_outer;         // (batch * heads) x splits x ld_x x ld_y
  acc_t* partial_sum;           // (batch * heads) x splits x ld_x
  int64_t batch_heads;
  int64_t heads;
  int dx;
  int dy;
  int ld_x;                     // >= dx (the tensor-core kernels pad to DP)
  int ld_y;                     // >= dy
  TokenSplit split;
  bool vec_x;                   // 16-byte vector loads allowed (tensor-core kernels)
  bool vec_y;
};

// Row weights (w_t, c_t) of token n of (batch*head) bh; (0, 0) removes the token.
template <RowWeights W, typename acc_t>
__device__ inline void row_weights(const KeyMask& mask, const acc_t* row_scratch, int64_t tokens,
                                   int64_t heads, int64_t bh, int64_t n, acc_t& w, acc_t& c) {
  if constexpr (W == RowWeights::kMask) {
    const bool keep = mask.keep(bh / heads, n);
    w = keep ? acc_t(1) : acc_t(0);
    c = w;
  } else {
    const acc_t* row = row_scratch + (bh * tokens + n) * 2;
    w = row[0];
    c = row[1];
  }
}

// ---------------------------------------------------------------------------------------------
// Reduction of the partials, in split order (deterministic). Also applies 1/n for the state.
//
// grid.x = (batch * heads) * ceil((d_out * (dy + 1)) / kReduceThreads); thread e < dx*dy writes
// outer[i][j], e in [dx*dy, dx*dy + dx) writes sum[i].
constexpr int kReduceThreads = 256;

template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) linear_attention_reduce_partials_kernel(
    const acc_t* __restrict__ partial_outer,  // (batch * heads) x splits x ld_x x ld_y
    const acc_t* __restrict__ partial_sum,    // (batch * heads) x splits x ld_x
    acc_t* __restrict__ outer,                // batch x heads x dx x dy
    acc_t* __restrict__ sum,                  // batch x heads x dx
    const int64_t* __restrict__ kept,         // batch, or nullptr (n = tokens)
    int64_t tokens, int64_t heads, int dx, int dy, int ld_x, int ld_y, int64_t splits,
    bool scale_by_inverse_kept, int64_t blocks_per_head) {
  const BlockCoords coords = split_block_index(blocks_per_head);
  const int64_t bh = coords.outer;
  const int64_t e = coords.inner * kReduceThreads + threadIdx.x;
  const int64_t outer_count = int64_t(dx) * dy;
  if (e >= outer_count + dx) return;
  const acc_t scale =
      scale_by_inverse_kept ? inverse_kept<acc_t>(kept, bh / heads, tokens) : acc_t(1);
  acc_t total = 0;
  if (e < outer_count) {
    const int64_t i = e / dy, j = e % dy;
    for (int64_t s = 0; s < splits; ++s) {
      total += partial_outer[partial_offset(bh, s, splits, ld_x, ld_y) + i * ld_y + j];
    }
    outer[bh * outer_count + e] = total * scale;
  } else {
    const int64_t i = e - outer_count;
    for (int64_t s = 0; s < splits; ++s) {
      total += partial_sum[partial_offset(bh, s, splits, 1, ld_x) + i];
    }
    sum[bh * dx + i] = total * scale;
  }
}

// ---------------------------------------------------------------------------------------------
// Generic (SIMT) kernels.

constexpr int kGenericThreads = 256;
constexpr int kGenericMaxDim = 256;

// Tokens per block of the per-token kernels: two (tokens x 256) acc_t tiles fit in 32 KiB.
template <typename acc_t>
constexpr int generic_tokens() {
  return sizeof(acc_t) == 8 ? 8 : 16;
}

// Split-N outer-product partials. Each block computes a T x T tile (rows of x, columns of y) of
// one split of one (batch*head), T = 16 M; each thread an M x M micro tile whose rows and columns
// are strided by 16 so that a warp reads consecutive shared-memory words. M (3, 4 or 5) is the
// one whose tiles pad dx x dy the least (outer_micro): every multiply-add of a tile runs, zeros
// included, so 64-wide tiles would cost 2.56 x the products at D = 40 and D = 80.
// grid.x = (batch * heads) * splits * tiles_x * tiles_y.
constexpr int kOuterMaxMicro = 5;
constexpr int kOuterMaxTile = 16 * kOuterMaxMicro;
constexpr int kOuterTokens = 32;
static_assert(kGenericThreads == 16 * 16, "one thread per (row, column) of the 16 x 16 grid");

__host__ __device__ inline int64_t outer_padded_cells(int dx, int dy, int micro) {
  const int tile = 16 * micro;
  return int64_t((dx + tile - 1) / tile * tile) * ((dy + tile - 1) / tile * tile);
}

// The micro tile size of the generic outer products of a dx x dy matrix: the least padded cells,
// ties to the larger tile (D = 17..48: 3, 49..64: 4, 65..80: 5, 160: 5, 256: 4).
__host__ __device__ inline int outer_micro(int dx, int dy) {
  int best = kOuterMaxMicro;
  for (int micro = kOuterMaxMicro - 1; micro >= 3; --micro) {
    if (outer_padded_cells(dx, dy, micro) < outer_padded_cells(dx, dy, best)) best = micro;
  }
  return best;
}

__host__ __device__ inline int outer_tiles(int d, int micro) {
  return (d + 16 * micro - 1) / (16 * micro);
}

template <typename scalar_t, typename acc_t, FeatureMap F, RowWeights W, int M>
__device__ inline void partial_generic_tile(const PartialArgs<scalar_t, acc_t>& args,
                                            acc_t* s_a, acc_t* s_b, acc_t* s_w, acc_t* s_c) {
  constexpr int T = 16 * M;
  const int tiles_x = outer_tiles(args.dx, M), tiles_y = outer_tiles(args.dy, M);
  const BlockCoords coords = split_block_index(int64_t(tiles_x) * tiles_y);
  const int tile_x = static_cast<int>(coords.inner / tiles_y);
  const int tile_y = static_cast<int>(coords.inner % tiles_y);
  const int64_t bh = coords.outer / args.split.count;
  const int64_t s = coords.outer % args.split.count;
  const int64_t b = bh / args.heads, h = bh % args.heads;
  const int x0 = tile_x * T, y0 = tile_y * T;
  const int tid = threadIdx.x;
  const int row = tid / 16, col = tid % 16;

  acc_t acc[M][M] = {};
  acc_t sum_acc = 0;  // partial_sum[x0 + tid], tile_y == 0 and tid < T only
  const int64_t begin = args.split.begin(s), end = args.split.end(s);
  for (int64_t n0 = begin; n0 < end; n0 += kOuterTokens) {
    __syncthreads();  // the previous tile's readers are done
    if (tid < kOuterTokens) {
      const int64_t n = n0 + tid;
      acc_t w = 0, c = 0;
      if (n < end) {
        row_weights<W>(args.mask, args.row_scratch, args.split.tokens, args.heads, bh, n, w, c);
      }
      s_w[tid] = w;
      s_c[tid] = c;
    }
    __syncthreads();
    // s_a, s_b: kOuterTokens x T, token-major; consecutive threads load consecutive columns of a
    // token's row (coalesced), rows one after another.
    for (int idx = tid; idx < kOuterTokens * T; idx += kGenericThreads) {
      const int t = idx / T, column = idx % T;
      const int64_t n = n0 + t;
      acc_t a = 0, yv = 0;
      if (n < end && s_w[t] != acc_t(0)) {
        if (x0 + column < args.dx) {
          const acc_t xv =
              static_cast<acc_t>(args.x[args.x_layout.offset(b, n, h) + x0 + column]);
          a = feature_map_value<F, acc_t>(xv) * s_w[t];
        }
        if (y0 + column < args.dy) {
          yv = static_cast<acc_t>(args.y[args.y_layout.offset(b, n, h) + y0 + column]);
        }
      }
      s_a[idx] = a;
      s_b[idx] = yv;
    }
    __syncthreads();
    const int tile_tokens = static_cast<int>(end - n0 < kOuterTokens ? end - n0 : kOuterTokens);
    for (int t = 0; t < tile_tokens; ++t) {
      acc_t av[M], bv[M];
#pragma unroll
      for (int m = 0; m < M; ++m) {
        av[m] = s_a[t * T + row + 16 * m];
        bv[m] = s_b[t * T + col + 16 * m];
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
#pragma unroll
        for (int k = 0; k < M; ++k) acc[m][k] += av[m] * bv[k];
      }
    }
    if (tile_y == 0 && tid < T) {
      for (int t = 0; t < tile_tokens; ++t) sum_acc += s_a[t * T + tid] * s_c[t];
    }
  }

  const int64_t base = partial_offset(bh, s, args.split.count, args.ld_x, args.ld_y);
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int k = 0; k < M; ++k) {
      const int i = x0 + row + 16 * m, j = y0 + col + 16 * k;
      if (i < args.dx && j < args.dy) args.partial_outer[base + int64_t(i) * args.ld_y + j] = acc[m][k];
    }
  }
  if (tile_y == 0 && tid < T && x0 + tid < args.dx) {
    args.partial_sum[partial_offset(bh, s, args.split.count, 1, args.ld_x) + x0 + tid] = sum_acc;
  }
}

template <typename scalar_t, typename acc_t, FeatureMap F, RowWeights W>
__global__ void __launch_bounds__(kGenericThreads) linear_attention_partial_generic_kernel(
    PartialArgs<scalar_t, acc_t> args) {
  __shared__ acc_t s_a[kOuterTokens * kOuterMaxTile];  // phi(x_t) w_t, tile columns
  __shared__ acc_t s_b[kOuterTokens * kOuterMaxTile];  // y_t, tile columns
  __shared__ acc_t s_w[kOuterTokens];                  // w_t
  __shared__ acc_t s_c[kOuterTokens];                  // c_t
  switch (outer_micro(args.dx, args.dy)) {
    case 3:
      partial_generic_tile<scalar_t, acc_t, F, W, 3>(args, s_a, s_b, s_w, s_c);
      break;
    case 4:
      partial_generic_tile<scalar_t, acc_t, F, W, 4>(args, s_a, s_b, s_w, s_c);
      break;
    default:
      partial_generic_tile<scalar_t, acc_t, F, W, 5>(args, s_a, s_b, s_w, s_c);
      break;
  }
}

// Arguments of the per-token kernels (apply forward / backward, state backward).
template <typename scalar_t, typename acc_t>
struct TokenArgs {
  const scalar_t* x;         // batch x tokens x (heads * dk): q (apply) or k (state backward)
  TokenMajorLayout x_layout;
  const scalar_t* y;         // batch x tokens x (heads * dv): grad_out (apply bwd) or v (state bwd)
  TokenMajorLayout y_layout;
  const acc_t* matrix;       // batch x heads x dk x dv, contiguous: state, or grad_state
  const acc_t* vec;          // batch x heads x dk, contiguous: key_mean, or grad_key_mean
  scalar_t* out_x;           // batch x tokens x (heads * dk): grad_q / grad_k
  TokenMajorLayout out_x_layout;
  scalar_t* out_y;           // batch x tokens x (heads * dv): o / grad_v
  TokenMajorLayout out_y_layout;
  acc_t* row_scratch;        // (batch * heads) x tokens x 2: (1/den_t, -(o_t . do_t)), apply bwd
  KeyMask mask;              // state backward
  const int64_t* kept;       // batch, or nullptr (state backward)
  int64_t tokens;
  int64_t batch_heads;
  int64_t heads;
  int dk;
  int dv;
  acc_t eps;
  // One block per split of the tokens (every per-token kernel); 16-byte vector access allowed
  // (tensor-core kernels only).
  TokenSplit split;
  bool vec_x;
  bool vec_y;
  bool vec_out_x;
  bool vec_out_y;
};

// Block coordinates of the per-token generic kernels: grid.x = (batch * heads) * split.count;
// block (bh, s) takes the tokens [begin, end) of split s in tiles of TOK tokens (split.per_split
// is a multiple of TOK, so a tile never crosses into the next split). A few blocks per SM loop
// over their tiles instead of one short-lived block per tile.
struct TokenRange {
  int64_t bh, b, h, begin, end;
};

__device__ inline TokenRange token_range(const TokenSplit& split, int64_t heads) {
  const BlockCoords coords = split_block_index(split.count);
  return {coords.outer, coords.outer / heads, coords.outer % heads, split.begin(coords.inner),
          split.end(coords.inner)};
}

// One tile of TOK tokens from n0 of (batch*head) bh.
struct TokenTile {
  int64_t bh, b, h, n0;
};

// Loads phi(x) of TOK tokens into s_fx (TOK x dk, zero past the end) and writes
// s_inv_den[t] = 1 / (phi(x_t) . vec + eps), one warp per token.
template <typename scalar_t, typename acc_t, FeatureMap F, int TOK>
__device__ inline void load_phi_and_denominator(const TokenArgs<scalar_t, acc_t>& args,
                                                const TokenTile& tile, acc_t* s_fx,
                                                acc_t* s_inv_den) {
  const int dk = args.dk;
  for (int idx = threadIdx.x; idx < TOK * dk; idx += blockDim.x) {
    const int t = idx / dk, d = idx % dk;
    const int64_t n = tile.n0 + t;
    s_fx[idx] = n < args.tokens ? feature_map_value<F, acc_t>(static_cast<acc_t>(
                                      args.x[args.x_layout.offset(tile.b, n, tile.h) + d]))
                                : acc_t(0);
  }
  __syncthreads();
  const acc_t* z = args.vec + tile.bh * dk;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int t = warp; t < TOK; t += blockDim.x / kWarpSize) {
    acc_t dot = 0;
    for (int d = lane; d < dk; d += kWarpSize) dot += s_fx[t * dk + d] * z[d];
    dot = warp_sum(dot);
    if (lane == 0) s_inv_den[t] = acc_t(1) / (dot + args.eps);
  }
  __syncthreads();
}

// Token t and row d of item idx (< TOK * dk) of accumulate_matrix_rows. Items go by 32-row
// bands of d, all tokens of a band before the next: a warp's lanes take distinct rows d, or the
// same row for several tokens (a broadcast), never rows 32 apart (a bank conflict), whatever dk.
struct MatrixItem {
  int t, d;
};
template <int TOK>
__device__ inline MatrixItem matrix_item(int idx, int dk) {
  const int full = dk / kWarpSize * kWarpSize;  // rows in whole bands
  if (idx < TOK * full) {
    const int band = idx / (TOK * kWarpSize), rest = idx % (TOK * kWarpSize);
    return {rest / kWarpSize, band * kWarpSize + rest % kWarpSize};
  }
  const int rest = idx - TOK * full, width = dk - full;
  return {rest / width, full + rest % width};
}

// The inverse of matrix_item: the item idx of token t, row d.
template <int TOK>
__device__ inline int matrix_item_index(int t, int d, int dk) {
  const int full = dk / kWarpSize * kWarpSize;
  if (d < full) return d / kWarpSize * (TOK * kWarpSize) + t * kWarpSize + d % kWarpSize;
  return TOK * full + t * (dk - full) + (d - full);
}

// s_acc[idx] += sum_j matrix[d][j] * s_rows[t * dv + j] for every item idx < TOK * dk,
// (t, d) = matrix_item(idx), of a per-token kernel; matrix: dk x dv, row-major, acc_t. Lanes of a
// warp take different rows d, so reading `matrix` directly would stride by dv between lanes (one
// sector per lane). Instead it goes through shared memory one chunk of kChunkCols columns (one
// 32-byte sector of each row) at a time: a warp loads 32 / kChunkCols rows of a chunk as whole
// sectors. In s_chunk (dk x kChunkCols) column c of row r is stored at
// c ^ ((r / rows_per_warp) % kChunkCols): the rows a warp stores fall in distinct banks, and so
// do 32 consecutive rows read at one column. The sums stay in shared memory (s_acc, TOK * dk;
// item idx is always thread idx % kGenericThreads's), not in per-item registers: that would
// take 16 accumulators per thread and 128 registers. Every thread of the block must call it.
template <typename acc_t>
__host__ __device__ constexpr int matrix_chunk_cols() {
  return 32 / static_cast<int>(sizeof(acc_t));
}

template <typename acc_t, int TOK>
__device__ inline void accumulate_matrix_rows(const acc_t* matrix, const acc_t* s_rows,
                                              acc_t* s_chunk, acc_t* s_acc, int dk, int dv) {
  constexpr int kChunkCols = matrix_chunk_cols<acc_t>();
  constexpr int kRowsPerWarp = kWarpSize / kChunkCols;
  for (int j0 = 0; j0 < dv; j0 += kChunkCols) {
    const int width = dv - j0 < kChunkCols ? dv - j0 : kChunkCols;
    for (int idx = threadIdx.x; idx < dk * kChunkCols; idx += kGenericThreads) {
      const int r = idx / kChunkCols, c = idx % kChunkCols;
      s_chunk[r * kChunkCols + (c ^ ((r / kRowsPerWarp) % kChunkCols))] =
          c < width ? matrix[int64_t(r) * dv + j0 + c] : acc_t(0);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < TOK * dk; idx += kGenericThreads) {
      const MatrixItem item = matrix_item<TOK>(idx, dk);
      const acc_t* row = s_chunk + item.d * kChunkCols;
      const acc_t* y = s_rows + item.t * dv + j0;
      const int swizzle = (item.d / kRowsPerWarp) % kChunkCols;
      acc_t sum = 0;
      for (int c = 0; c < width; ++c) sum += row[c ^ swizzle] * y[c];
      s_acc[idx] += sum;
    }
    __syncthreads();  // the chunk's readers are done before the next chunk is stored
  }
}

// out_y[n0 + t][j] = scale_t * sum_d s_rows[t * dk + d] * matrix[d][j] for the tile's tokens
// (scale_t = s_scale[t], or 1 when s_scale is nullptr); matrix: dk x dv, row-major, acc_t. Lanes
// take consecutive j: coalesced reads of matrix and stores of out_y.
template <typename scalar_t, typename acc_t, int TOK>
__device__ inline void store_rows_times_matrix(const TokenArgs<scalar_t, acc_t>& args,
                                               const TokenTile& tile, const acc_t* s_rows,
                                               const acc_t* matrix, const acc_t* s_scale) {
  const int dk = args.dk, dv = args.dv;
  for (int idx = threadIdx.x; idx < TOK * dv; idx += blockDim.x) {
    const int t = idx / dv, j = idx % dv;
    const int64_t n = tile.n0 + t;
    if (n >= args.tokens) continue;
    acc_t sum = 0;
    for (int d = 0; d < dk; ++d) sum += s_rows[t * dk + d] * matrix[int64_t(d) * dv + j];
    if (s_scale != nullptr) sum *= s_scale[t];
    args.out_y[args.out_y_layout.offset(tile.b, n, tile.h) + j] = static_cast<scalar_t>(sum);
  }
}

// Pass 2: o_t = phi(q_t)^T S / (phi(q_t) . z + eps). grid.x = (batch*heads) * split.count.
template <typename scalar_t, typename acc_t, FeatureMap F>
__global__ void __launch_bounds__(kGenericThreads) linear_attention_apply_generic_kernel(
    TokenArgs<scalar_t, acc_t> args) {
  constexpr int TOK = generic_tokens<acc_t>();
  __shared__ acc_t s_fq[TOK * kGenericMaxDim];  // TOK x dk
  __shared__ acc_t s_inv_den[TOK];
  const TokenRange range = token_range(args.split, args.heads);
  const int dk = args.dk, dv = args.dv;
  const acc_t* S = args.matrix + range.bh * dk * dv;
  for (int64_t n0 = range.begin; n0 < range.end; n0 += TOK) {
    __syncthreads();  // the previous tile's readers of s_fq and s_inv_den are done
    const TokenTile tile{range.bh, range.b, range.h, n0};
    load_phi_and_denominator<scalar_t, acc_t, F, TOK>(args, tile, s_fq, s_inv_den);
    store_rows_times_matrix<scalar_t, acc_t, TOK>(args, tile, s_fq, S, s_inv_den);
  }
}

// Row stride (acc_t words) of the apply backward's dS accumulator: >= dv and 16 (mod 32), so that
// the two 16-column rows a warp of the 16 x 16 thread grid touches fall in distinct banks.
__host__ __device__ inline int apply_backward_acc_ld(int dv) { return (dv + 15) / 32 * 32 + 16; }

// Dynamic shared memory of the generic apply backward, as offsets in acc_t words: phi(q) (then
// phi(q) / den), S do and do (TOK x dk, TOK x dk, TOK x dv), the matrix chunk, 1/den_t and g_t
// (TOK each), and with the fused reduction the dS (dk x apply_backward_acc_ld(dv)) and dz (dk)
// accumulators of the block's split.
struct ApplyBackwardSmem {
  int fq, sdo, dout, chunk, inv_den, g, acc, dz, words;
};

template <typename acc_t>
__host__ __device__ inline ApplyBackwardSmem apply_backward_smem(int dk, int dv, bool reduce) {
  constexpr int TOK = generic_tokens<acc_t>();
  constexpr int kChunkCols = matrix_chunk_cols<acc_t>();
  ApplyBackwardSmem s{};
  s.fq = 0;
  s.sdo = s.fq + TOK * dk;
  s.dout = s.sdo + TOK * dk;
  s.chunk = s.dout + TOK * dv;
  s.inv_den = s.chunk + dk * kChunkCols;
  s.g = s.inv_den + TOK;
  s.acc = s.g + TOK;
  s.dz = s.acc + (reduce ? dk * apply_backward_acc_ld(dv) : 0);
  s.words = s.dz + (reduce ? dk : 0);
  return s;
}

// s_acc (dk x ld) += sum_t s_a[t]^T s_b[t] over the TOK tokens of a tile (s_a: TOK x dk, s_b:
// TOK x dv): the dk x dv matrix goes by 16 M x 16 M tiles, M = outer_micro(dk, dv), each thread
// an M x M micro tile strided by 16 (as linear_attention_partial_generic_kernel), loaded from and
// stored back to s_acc; every element belongs to one thread, so the tiles need no barrier.
template <typename acc_t, int TOK, int M>
__device__ inline void accumulate_outer_tile(const acc_t* s_a, const acc_t* s_b, acc_t* s_acc,
                                             int dk, int dv, int ld) {
  constexpr int T = 16 * M;
  const int row = threadIdx.x / 16, col = threadIdx.x % 16;
  for (int x0 = 0; x0 < dk; x0 += T) {
    for (int y0 = 0; y0 < dv; y0 += T) {
      acc_t acc[M][M];
#pragma unroll
      for (int m = 0; m < M; ++m) {
#pragma unroll
        for (int k = 0; k < M; ++k) {
          const int i = x0 + row + 16 * m, j = y0 + col + 16 * k;
          acc[m][k] = i < dk && j < dv ? s_acc[i * ld + j] : acc_t(0);
        }
      }
      for (int t = 0; t < TOK; ++t) {
        acc_t av[M], bv[M];
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const int i = x0 + row + 16 * m, j = y0 + col + 16 * m;
          av[m] = i < dk ? s_a[t * dk + i] : acc_t(0);
          bv[m] = j < dv ? s_b[t * dv + j] : acc_t(0);
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
#pragma unroll
          for (int k = 0; k < M; ++k) acc[m][k] += av[m] * bv[k];
        }
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
#pragma unroll
        for (int k = 0; k < M; ++k) {
          const int i = x0 + row + 16 * m, j = y0 + col + 16 * k;
          if (i < dk && j < dv) s_acc[i * ld + j] = acc[m][k];
        }
      }
    }
  }
}

// Apply backward, per token, with u_t = S do_t and g_t = o_t . do_t = phi(q_t) . u_t / den_t:
// dq_t = phi'(q_t) * (u_t - g_t z) / den_t. The dS / dz reduction over tokens needs
// a_t = phi(q_t) / den_t and c_t = -g_t of every token:
//   * kReduce: the block accumulates dS = sum_t a_t do_t^T and dz = sum_t a_t c_t of its split in
//     shared memory and writes them to partial_outer (B*H, splits, dk, dv) and partial_sum
//     (B*H, splits, dk), summed by linear_attention_reduce_partials_kernel: q and grad_out are
//     read once for dq, dS and dz;
//   * otherwise (the accumulators do not fit the device's shared memory): it writes
//     (1/den_t, -g_t) to row_scratch for linear_attention_partial_generic_kernel with
//     RowWeights::kScratch, which reads q and grad_out again.
// grid.x = (batch * heads) * split.count; dynamic shared memory apply_backward_smem(dk, dv,
// kReduce).words acc_t words.
template <typename scalar_t, typename acc_t, FeatureMap F, bool kReduce>
__global__ void __launch_bounds__(kGenericThreads) linear_attention_apply_backward_generic_kernel(
    TokenArgs<scalar_t, acc_t> args, acc_t* __restrict__ partial_outer,
    acc_t* __restrict__ partial_sum) {
  constexpr int TOK = generic_tokens<acc_t>();
  LINFUSION_OPS_DYNAMIC_SMEM(unsigned char, smem);
  const int dk = args.dk, dv = args.dv;
  const ApplyBackwardSmem layout = apply_backward_smem<acc_t>(dk, dv, kReduce);
  acc_t* const words = reinterpret_cast<acc_t*>(smem);
  acc_t* const s_fq = words + layout.fq;
  acc_t* const s_sdo = words + layout.sdo;  // u_t, in matrix_item order
  acc_t* const s_do = words + layout.dout;
  acc_t* const s_chunk = words + layout.chunk;
  acc_t* const s_inv_den = words + layout.inv_den;
  acc_t* const s_g = words + layout.g;
  acc_t* const s_acc = words + layout.acc;
  acc_t* const s_dz = words + layout.dz;
  const int ld = apply_backward_acc_ld(dv);
  const int micro = outer_micro(dk, dv);
  const TokenRange range = token_range(args.split, args.heads);
  const acc_t* S = args.matrix + range.bh * dk * dv;
  const acc_t* z = args.vec + range.bh * dk;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if constexpr (kReduce) {
    for (int e = threadIdx.x; e < dk * ld; e += kGenericThreads) s_acc[e] = 0;
    for (int i = threadIdx.x; i < dk; i += kGenericThreads) s_dz[i] = 0;
  }
  for (int64_t n0 = range.begin; n0 < range.end; n0 += TOK) {
    __syncthreads();  // the previous tile's readers are done
    const TokenTile tile{range.bh, range.b, range.h, n0};
    for (int idx = threadIdx.x; idx < TOK * dv; idx += kGenericThreads) {
      const int t = idx / dv, j = idx % dv;
      const int64_t n = n0 + t;
      s_do[idx] = n < args.tokens
                      ? static_cast<acc_t>(args.y[args.y_layout.offset(tile.b, n, tile.h) + j])
                      : acc_t(0);
    }
    for (int idx = threadIdx.x; idx < TOK * dk; idx += kGenericThreads) s_sdo[idx] = 0;
    load_phi_and_denominator<scalar_t, acc_t, F, TOK>(args, tile, s_fq, s_inv_den);
    accumulate_matrix_rows<acc_t, TOK>(S, s_do, s_chunk, s_sdo, dk, dv);
    for (int t = warp; t < TOK; t += kGenericThreads / kWarpSize) {
      acc_t g = 0;
      for (int d = lane; d < dk; d += kWarpSize) {
        g += s_fq[t * dk + d] * s_sdo[matrix_item_index<TOK>(t, d, dk)];
      }
      g = warp_sum(g) * s_inv_den[t];
      if (lane == 0) s_g[t] = g;
    }
    __syncthreads();
    if constexpr (!kReduce) {
      // The tile's (1/den_t, -g_t) pairs are contiguous in row_scratch: one coalesced store.
      if (threadIdx.x < 2 * TOK) {
        const int t = threadIdx.x / 2;
        if (n0 + t < args.tokens) {
          args.row_scratch[(range.bh * args.tokens + n0) * 2 + threadIdx.x] =
              threadIdx.x % 2 == 0 ? s_inv_den[t] : -s_g[t];
        }
      }
    }
    for (int idx = threadIdx.x; idx < TOK * dk; idx += kGenericThreads) {
      const MatrixItem item = matrix_item<TOK>(idx, dk);
      const int t = item.t, d = item.d;
      const int64_t n = n0 + t;
      if (n >= args.tokens) continue;
      const acc_t xq = static_cast<acc_t>(args.x[args.x_layout.offset(tile.b, n, tile.h) + d]);
      const acc_t dfq = (s_sdo[idx] - s_g[t] * z[d]) * s_inv_den[t];
      args.out_x[args.out_x_layout.offset(tile.b, n, tile.h) + d] =
          static_cast<scalar_t>(dfq * feature_map_grad<F, acc_t>(xq));
    }
    if constexpr (kReduce) {
      // a_t = phi(q_t) / den_t in place (tokens past the end are zero), then the tile's terms.
      for (int idx = threadIdx.x; idx < TOK * dk; idx += kGenericThreads) {
        s_fq[idx] *= s_inv_den[idx / dk];
      }
      __syncthreads();
      switch (micro) {
        case 3:
          accumulate_outer_tile<acc_t, TOK, 3>(s_fq, s_do, s_acc, dk, dv, ld);
          break;
        case 4:
          accumulate_outer_tile<acc_t, TOK, 4>(s_fq, s_do, s_acc, dk, dv, ld);
          break;
        default:
          accumulate_outer_tile<acc_t, TOK, 5>(s_fq, s_do, s_acc, dk, dv, ld);
          break;
      }
      for (int i = threadIdx.x; i < dk; i += kGenericThreads) {
        acc_t sum = 0;
        for (int t = 0; t < TOK; ++t) sum -= s_fq[t * dk + i] * s_g[t];
        s_dz[i] += sum;
      }
    }
  }
  if constexpr (kReduce) {
    __syncthreads();  // every thread's accumulator elements are final
    const int64_t s = blockIdx.x % args.split.count;
    acc_t* outer = partial_outer + partial_offset(range.bh, s, args.split.count, dk, dv);
    for (int e = threadIdx.x; e < dk * dv; e += kGenericThreads) {
      outer[e] = s_acc[e / dv * ld + e % dv];
    }
    acc_t* sum = partial_sum + partial_offset(range.bh, s, args.split.count, 1, dk);
    for (int i = threadIdx.x; i < dk; i += kGenericThreads) sum[i] = s_dz[i];
  }
}

// State backward, per key: dk_t = keep_t * phi'(k_t) * (dS v_t + dz) / n,
// dv_t = keep_t * dS^T phi(k_t) / n. grid.x = (batch * heads) * split.count.
template <typename scalar_t, typename acc_t, FeatureMap F>
__global__ void __launch_bounds__(kGenericThreads) linear_attention_state_backward_generic_kernel(
    TokenArgs<scalar_t, acc_t> args) {
  constexpr int TOK = generic_tokens<acc_t>();
  __shared__ acc_t s_fk[TOK * kGenericMaxDim];  // TOK x dk, phi(k_t) * keep_t / n
  __shared__ acc_t s_v[TOK * kGenericMaxDim];   // TOK x dv, v_t * keep_t / n
  __shared__ acc_t s_chunk[kGenericMaxDim * matrix_chunk_cols<acc_t>()];
  const TokenRange range = token_range(args.split, args.heads);
  const int dk = args.dk, dv = args.dv;
  const acc_t inv_n = inverse_kept<acc_t>(args.kept, range.b, args.tokens);
  const acc_t* dS = args.matrix + range.bh * dk * dv;
  const acc_t* dz = args.vec + range.bh * dk;
  for (int64_t n0 = range.begin; n0 < range.end; n0 += TOK) {
    __syncthreads();  // the previous tile's readers of s_fk and s_v are done
    const TokenTile tile{range.bh, range.b, range.h, n0};
    for (int idx = threadIdx.x; idx < TOK * dk; idx += blockDim.x) {
      const int t = idx / dk, d = idx % dk;
      const int64_t n = n0 + t;
      acc_t value = 0;
      if (n < args.tokens && args.mask.keep(tile.b, n)) {
        value = feature_map_value<F, acc_t>(static_cast<acc_t>(
                    args.x[args.x_layout.offset(tile.b, n, tile.h) + d])) * inv_n;
      }
      s_fk[idx] = value;
    }
    for (int idx = threadIdx.x; idx < TOK * dv; idx += blockDim.x) {
      const int t = idx / dv, j = idx % dv;
      const int64_t n = n0 + t;
      acc_t value = 0;
      if (n < args.tokens && args.mask.keep(tile.b, n)) {
        value = static_cast<acc_t>(args.y[args.y_layout.offset(tile.b, n, tile.h) + j]) * inv_n;
      }
      s_v[idx] = value;
    }
    __syncthreads();
    store_rows_times_matrix<scalar_t, acc_t, TOK>(args, tile, s_fk, dS, nullptr);
    __syncthreads();  // s_fk's readers are done: (dS v_t + dz)[d] / n accumulates there
    acc_t* s_dfk = s_fk;
    for (int idx = threadIdx.x; idx < TOK * dk; idx += kGenericThreads) {
      s_dfk[idx] = dz[matrix_item<TOK>(idx, dk).d] * inv_n;
    }
    accumulate_matrix_rows<acc_t, TOK>(dS, s_v, s_chunk, s_dfk, dk, dv);
    for (int idx = threadIdx.x; idx < TOK * dk; idx += kGenericThreads) {
      const MatrixItem item = matrix_item<TOK>(idx, dk);
      const int t = item.t, d = item.d;
      const int64_t n = n0 + t;
      if (n >= args.tokens) continue;
      acc_t grad = 0;
      if (args.mask.keep(tile.b, n)) {
        const acc_t xk = static_cast<acc_t>(args.x[args.x_layout.offset(tile.b, n, tile.h) + d]);
        grad = s_dfk[idx] * feature_map_grad<F, acc_t>(xk);
      }
      args.out_x[args.out_x_layout.offset(tile.b, n, tile.h) + d] = static_cast<scalar_t>(grad);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernels: fp16 / bf16 operands, fp32 accumulation (WMMA m16n16k16, sm_80+).
// The head dim d <= DP is zero-padded to DP, a multiple of 16, in shared memory.

template <typename scalar_t>
struct TcType;
template <>
struct TcType<at::Half> {
  using type = __half;
};
template <>
struct TcType<at::BFloat16> {
  using type = __nv_bfloat16;
};

__device__ inline float to_float(__half x) { return __half2float(x); }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ inline T from_float(float x);
template <>
__device__ inline __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

constexpr int kTcVector = 8;  // 16-bit elements per 16-byte vector access

// Row stride (16-bit elements) of the token tiles (rows x DP) in shared memory: rows of DP + 8
// elements, an odd number of 16-byte units, so the 8 rows one WMMA (ldmatrix) phase reads fall in
// 8 different bank groups. DP = 48 (head dim 40: 5 chunks of 8 per row) takes 13 units, 5 mod 8,
// so that for_each_chunk_tc's consecutive (row, chunk) pairs (row * 5 + chunk) also land in
// consecutive bank groups: conflict-free 16-byte stores.
__host__ __device__ constexpr int tc_tile_ld(int dp) { return dp == 48 ? 104 : dp + 8; }

// The 16-byte chunks (8 elements each) of a tile of rows, dealt to the block's lanes so that each
// warp holds whole rows: a head's row of 80 bytes (head dim 40) is 2.5 sectors, and a row split
// between two warps costs its middle sector twice. Within a warp, the rows' whole groups of 8
// chunks come first (a 16-byte phase of 8 lanes then stores one row's group: 8 bank groups),
// then the rows' remaining chunks. A lane keeps its chunk and steps through rows first_row,
// first_row + row_step, ...; lanes beyond the warp's whole rows have none (active false).
struct TcLaneChunk {
  bool active;
  int chunk;
  int first_row;
  int row_step;
};

// This lane's share of rows of `chunks` chunks (1 to 32).
__device__ inline TcLaneChunk tc_lane_chunk(int chunks) {
  const int rows_per_warp = kWarpSize / chunks;
  const int grouped = chunks / 8 * 8, tail = chunks - grouped;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  TcLaneChunk me{lane < rows_per_warp * chunks, 0, 0,
                 static_cast<int>(blockDim.x / kWarpSize) * rows_per_warp};
  int r = 0;
  if (lane < rows_per_warp * grouped) {
    r = lane / grouped;
    me.chunk = lane % grouped;
  } else if (me.active) {
    const int j = lane - rows_per_warp * grouped;
    r = j / tail;
    me.chunk = grouped + j % tail;
  }
  me.first_row = warp * rows_per_warp + r;
  return me;
}

// Calls body(t, c) for every chunk c < chunks of rows t < ROWS, as tc_lane_chunk deals them.
template <int ROWS, typename Body>
__device__ inline void for_each_chunk_tc(int chunks, Body body) {
  const TcLaneChunk me = tc_lane_chunk(chunks);
  if (!me.active) return;
  for (int t = me.first_row; t < ROWS; t += me.row_step) body(t, me.chunk);
}

// Which half of its 8 fp32 values the lane reading chunk `chunk` of row t reads first
// (load_8_floats_tc), for rows of `chunks` chunks dealt by tc_lane_chunk: with an odd count
// (head dim 40), lanes 4-7 of each quarter warp; with an even one, every other group of 4
// chunks, alternating by row. Either way a 16-byte phase's 8 lanes read 32 distinct banks of
// fp32 rows whose stride is 8 or 24 words mod 32 (tc_product_ld).
__device__ inline bool tc_upper_first(int chunks, int t, int chunk) {
  return chunks % 2 != 0 ? threadIdx.x % 8 / 4 != 0 : (chunk / 4 + t) % 2 != 0;
}

// Row stride (fp32 elements) of the product tiles (rows x cols) that WMMA accumulator stores
// write: cols + 8, 8 or 24 words mod 32, so each 16-lane store phase (4 rows x 8 words) hits 32
// banks; cols = 48 takes 72 (8 mod 32, not 24), which also keeps load_8_floats_tc's reads of a
// warp's 6 rows of 5 chunks (head dim 40) conflict-free.
__host__ __device__ constexpr int tc_product_ld(int cols) { return cols == 48 ? 72 : cols + 8; }

// v = p[0, 8): 8 fp32 values of shared memory (16-byte aligned) as two 16-byte reads, the upper
// half first when upper_first (tc_upper_first: in index order, the lanes of one phase would
// share banks: 2-way, and 4-way with scalar reads).
__device__ inline void load_8_floats_tc(float (&v)[8], const float* p, bool upper_first) {
  const int first_half = upper_first ? 4 : 0;
  const uint4 first = *reinterpret_cast<const uint4*>(p + first_half);
  const uint4 second = *reinterpret_cast<const uint4*>(p + 4 - first_half);
  const uint4 lo = upper_first ? second : first, hi = upper_first ? first : second;
  const unsigned words[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = __uint_as_float(words[e]);
}

// out = this lane's chunk (tc_lane_chunk(d / 8)) of an fp32 vector in shared memory, for an
// epilogue that adds it to every row of its chunks: read once, since lanes of several rows read
// different chunks of it in one phase (bank conflicts). Zeros without vec; with vec
// (block-uniform) the whole block calls it, and a barrier first publishes s_vec.
__device__ inline void lane_chunk_of_smem_vector_tc(float (&out)[8], const float* s_vec, int d,
                                                    bool vec) {
#pragma unroll
  for (int e = 0; e < 8; ++e) out[e] = 0.f;
  if (!vec) return;
  __syncthreads();
  const TcLaneChunk me = tc_lane_chunk(d / kTcVector);
  if (me.active) load_8_floats_tc(out, s_vec + me.chunk * kTcVector, false);
}

// Loads tokens [n0, n0 + ROWS) of head h (d <= DP columns) into smem (ROWS x LD, row-major) as
// T(transform(x, t)) for row t; tokens >= end are zero, and so are columns >= d: written on every
// call without vec, and with vec (16-byte accesses: d % 8 == 0, 16-byte aligned rows) only when
// zero_padding (the first tile: nothing else writes them, so they stay zero).
template <int ROWS, int DP, int LD, typename T, typename Transform>
__device__ inline void load_rows_tc(T* smem, const T* src, const TokenMajorLayout& layout,
                                    int64_t b, int64_t h, int64_t n0, int64_t end, int d,
                                    bool vec, bool zero_padding, Transform transform) {
  static_assert(DP % kTcVector == 0 && LD % kTcVector == 0, "rows hold whole 16-byte vectors");
  if (vec) {
    constexpr int kChunks = DP / kTcVector;
    const int chunks = d / kTcVector;
    for_each_chunk_tc<ROWS>(chunks, [&](int t, int chunk) {
      const int c = chunk * kTcVector;
      const int64_t n = n0 + t;
      uint4 packed = make_uint4(0, 0, 0, 0);
      if (n < end) {
        const uint4 raw = *reinterpret_cast<const uint4*>(src + layout.offset(b, n, h) + c);
        const T* in = reinterpret_cast<const T*>(&raw);
        T* out = reinterpret_cast<T*>(&packed);
#pragma unroll
        for (int e = 0; e < kTcVector; ++e) out[e] = from_float<T>(transform(to_float(in[e]), t));
      }
      *reinterpret_cast<uint4*>(smem + t * LD + c) = packed;
    });
    const int pad = zero_padding ? kChunks - chunks : 0;
    for (int idx = threadIdx.x; idx < ROWS * pad; idx += blockDim.x) {
      const int t = idx / pad, c = (chunks + idx % pad) * kTcVector;
      *reinterpret_cast<uint4*>(smem + t * LD + c) = make_uint4(0, 0, 0, 0);
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * DP; idx += blockDim.x) {
      const int t = idx / DP, c = idx % DP;
      const int64_t n = n0 + t;
      smem[t * LD + c] = n < end && c < d
                             ? from_float<T>(transform(to_float(src[layout.offset(b, n, h) + c]), t))
                             : from_float<T>(0.f);
    }
  }
}

// Output row tiles a warp of gemm_hi_lo_to_smem computes at once: the most (each B fragment,
// hi and lo, loaded once per k-step serves them all) that still leaves every warp a unit of work
// (ROW_TILES / group row tiles x COL_TILES columns >= warps); a divisor of ROW_TILES. Larger
// groups (4 row tiles for the 8-warp apply backward) cut a few more wavefronts but cost it
// 4 x 8 accumulator registers: 166-172 per thread at D = 48-80 on sm_90, one block per SM
// instead of two.
__host__ __device__ constexpr int tc_row_group(int row_tiles, int col_tiles, int warps) {
  int best = 1;
  for (int g = 1; g <= row_tiles; ++g) {
    if (row_tiles % g == 0 && (row_tiles / g) * col_tiles >= warps) best = g;
  }
  return best;
}

// Shared-memory GEMM on the tensor cores: C (ROWS x COLS, fp32, ld LDC) = A (ROWS x K, row-major,
// ld LDA) (B_hi + B_lo), where B is K x COLS, stored row-major (B[k][n] at b[k * LDB + n]) or,
// with B_TRANSPOSED, as the transpose of a row-major matrix (B[k][n] at b[n * LDB + k]).
// B_hi + B_lo is an fp32 matrix split into two 16-bit halves (split_hi_lo), so the product keeps
// ~16 (bf16) or ~22 (fp16) mantissa bits. A warp's unit of work is a column of 16 and a group of
// tc_row_group row tiles: per k-step it loads the two B fragments once for the group (before:
// once per output tile, (2 + 1) fragment loads per MMA pair; now (2 + group) per group), which
// is most of the shared-memory traffic of the per-token kernels. Each output tile still sums its
// k-steps in the same order (hi, then lo, k-step after k-step): the result is unchanged.
template <typename T, int ROWS, int COLS, int K, int LDA, int LDB, int LDC, bool B_TRANSPOSED,
          int NWARPS>
__device__ inline void gemm_hi_lo_to_smem(const T* a, const T* b_hi, const T* b_lo, float* c) {
  namespace wmma = nvcuda::wmma;
  static_assert(ROWS % 16 == 0 && COLS % 16 == 0 && K % 16 == 0, "whole 16 x 16 tiles");
  static_assert(LDA % 8 == 0 && LDB % 8 == 0 && LDC % 4 == 0, "WMMA leading dimensions");
  using BLayout = std::conditional_t<B_TRANSPOSED, wmma::col_major, wmma::row_major>;
  constexpr int kColTiles = COLS / 16;
  constexpr int kGroup = tc_row_group(ROWS / 16, kColTiles, NWARPS);
  constexpr int kUnits = (ROWS / 16 / kGroup) * kColTiles;
  for (int unit = threadIdx.x / kWarpSize; unit < kUnits; unit += NWARPS) {
    const int m0 = (unit / kColTiles) * kGroup, n = unit % kColTiles;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kGroup];
#pragma unroll
    for (int r = 0; r < kGroup; ++r) wmma::fill_fragment(acc[r], 0.f);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb_hi, fb_lo;
      const int b_offset = B_TRANSPOSED ? n * 16 * LDB + kk * 16 : kk * 16 * LDB + n * 16;
      wmma::load_matrix_sync(fb_hi, b_hi + b_offset, LDB);
      wmma::load_matrix_sync(fb_lo, b_lo + b_offset, LDB);
#pragma unroll
      for (int r = 0; r < kGroup; ++r) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, a + (m0 + r) * 16 * LDA + kk * 16, LDA);
        wmma::mma_sync(acc[r], fa, fb_hi, acc[r]);
        wmma::mma_sync(acc[r], fa, fb_lo, acc[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < kGroup; ++r) {
      wmma::store_matrix_sync(c + (m0 + r) * 16 * LDC + n * 16, acc[r], LDC, wmma::mem_row_major);
    }
  }
}

// Loads an fp32 (d x d) matrix, row-major and contiguous, into hi / lo halves (DP x COLS, ld LD)
// with value * 2^shift = hi + lo; with a non-null column (d,) it goes to column DP
// (COLS >= DP + 16), the key mean next to the state. Everything else is zero.
template <int DP, int COLS, int LD, typename T>
__device__ inline void split_hi_lo(T* hi, T* lo, const float* matrix, const float* column, int d,
                                   int shift = 0) {
  static_assert(COLS >= DP && LD >= COLS, "rows hold the columns");
  const float scale = ldexpf(1.f, shift);  // a power of two: exact
  for (int idx = threadIdx.x; idx < DP * COLS; idx += blockDim.x) {
    const int r = idx / COLS, c = idx % COLS;
    float value = 0.f;
    if (r < d && c < d) value = matrix[r * d + c] * scale;
    if (column != nullptr && r < d && c == DP) value = column[r] * scale;
    const T high = from_float<T>(value);
    hi[r * LD + c] = high;
    lo[r * LD + c] = from_float<T>(value - to_float(high));
  }
}

// Exponent e such that 2^e times the largest |m[i]| (count entries) lies in [2^13, 2^14): an
// exact rescaling before split_hi_lo that keeps a matrix whose entries grow with the number of
// tokens (dS, a sum over the queries: ~N / (2 D) for grad_out = 1) inside fp16's range (65,504)
// and its entries away from fp16's subnormals. 0 for a zero or non-finite matrix (a NaN or inf
// then reaches the output, as it should). Called by the whole block; s_bits: one shared word.
__device__ inline int fp16_range_shift(const float* m, int count, unsigned* s_bits) {
  if (threadIdx.x == 0) *s_bits = 0u;
  __syncthreads();
  unsigned bits = 0u;  // non-negative floats order like their bit patterns (NaN above inf)
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    bits = max(bits, __float_as_uint(fabsf(m[i])));
  }
  atomicMax(s_bits, bits);  // a maximum: the same whatever the order
  __syncthreads();
  const float largest = __uint_as_float(*s_bits);
  if (!(largest > 0.f) || isinf(largest)) return 0;
  int exponent;
  frexpf(largest, &exponent);  // largest in [2^(exponent - 1), 2^exponent)
  return min(max(14 - exponent, -126), 126);  // 2^-126 and 2^126: normal floats
}

// The i-th of a warp's output tiles in accumulate_outer_tc / store_outer_tc: a contiguous run
// of TILES_PER_WARP tiles of the (DP/16)^2, row-major, so that consecutive tiles share their
// row and accumulate_outer_tc loads that row's A fragment once for them (round-robin tiles,
// warp + i * NWARPS, shared none at D = 48, 80, 160). Past the last tile: skipped.
template <int NWARPS, int TILES_PER_WARP>
__device__ inline int outer_tile_tc(int warp, int i) {
  return warp * TILES_PER_WARP + i;
}

// acc[i] += A^T B for the output tiles of this warp (outer_tile_tc of the (DP/16)^2 tiles): A and
// B are TOK x DP row-major in shared memory (ld LD), so A^T is read column-major. The
// accumulators stay in registers across token tiles. Per k-step a warp loads one A fragment per
// distinct row of its tiles and one B fragment per tile.
template <typename T, int DP, int TOK, int LD, int NWARPS, int TILES_PER_WARP>
__device__ inline void accumulate_outer_tc(
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[TILES_PER_WARP],
    const T* a, const T* b) {
  namespace wmma = nvcuda::wmma;
  constexpr int kTilesPerDim = DP / 16;
  static_assert(TOK % 16 == 0 && TILES_PER_WARP * NWARPS >= kTilesPerDim * kTilesPerDim,
                "every output tile has a warp");
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int kk = 0; kk < TOK / 16; ++kk) {
    // A^T: element (row i of the output, token t) sits at a[t * LD + i]: column-major.
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
    int fa_row = -1;  // the output tile row fa holds (warp-uniform)
#pragma unroll
    for (int i = 0; i < TILES_PER_WARP; ++i) {
      const int tile = outer_tile_tc<NWARPS, TILES_PER_WARP>(warp, i);
      if (tile < kTilesPerDim * kTilesPerDim) {  // warp-uniform
        const int m = tile / kTilesPerDim, n = tile % kTilesPerDim;
        if (m != fa_row) {
          wmma::load_matrix_sync(fa, a + kk * 16 * LD + m * 16, LD);
          fa_row = m;
        }
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, b + kk * 16 * LD + n * 16, LD);
        wmma::mma_sync(acc[i], fa, fb, acc[i]);
      }
    }
  }
}

// Writes this warp's accumulators to partial_outer (DP x DP, row-major, fp32 global).
template <int DP, int NWARPS, int TILES_PER_WARP>
__device__ inline void store_outer_tc(
    float* partial_outer,
    const nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (
        &acc)[TILES_PER_WARP]) {
  namespace wmma = nvcuda::wmma;
  constexpr int kTilesPerDim = DP / 16;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int i = 0; i < TILES_PER_WARP; ++i) {
    const int tile = outer_tile_tc<NWARPS, TILES_PER_WARP>(warp, i);
    if (tile < kTilesPerDim * kTilesPerDim) {
      const int m = tile / kTilesPerDim, n = tile % kTilesPerDim;
      wmma::store_matrix_sync(partial_outer + (m * 16) * DP + n * 16, acc[i], DP,
                              wmma::mem_row_major);
    }
  }
}

// Split-N partials of the state with tensor cores: partial_outer[s] (DP x DP) = A^T V over the
// split's tokens, A = phi(k) keep (tokens x DP), and partial_sum[s] (DP) = sum_t a_t.
// 8 warps own runs of the (DP/16)^2 output tiles (outer_tile_tc); grid.x = (batch * heads) * splits.
constexpr int kTcPartialWarps = 8;
constexpr int kTcPartialTokens = 64;  // 2 x 64 x (160 + 8) x 2 bytes < 48 KiB of static smem

template <int DP>
struct TcPartialShape {
  static_assert(DP % 16 == 0 && DP >= 16 && DP <= 160, "DP: multiple of 16, at most 160");
  static_assert(kTcPartialTokens % 16 == 0, "whole k-steps of 16 tokens");
  static constexpr int kLd = tc_tile_ld(DP);
  static constexpr int kTiles = (DP / 16) * (DP / 16);
  static constexpr int kTilesPerWarp = (kTiles + kTcPartialWarps - 1) / kTcPartialWarps;
};

template <typename scalar_t, FeatureMap F, int DP>
__global__ void __launch_bounds__(kTcPartialWarps* kWarpSize)
    linear_attention_state_partial_tc_kernel(PartialArgs<scalar_t, float> args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host launches this kernel on sm_80+ only
#else
  namespace wmma = nvcuda::wmma;
  using T = typename TcType<scalar_t>::type;
  using Shape = TcPartialShape<DP>;
  constexpr int TOK = kTcPartialTokens, LD = Shape::kLd;
  __shared__ __align__(128) T s_a[TOK * LD];  // TOK x DP: phi(k_t) keep_t
  __shared__ __align__(128) T s_b[TOK * LD];  // TOK x DP: v_t (zero for removed tokens)
  __shared__ float s_w[TOK];                  // keep_t

  const BlockCoords coords = split_block_index(args.split.count);
  const int64_t bh = coords.outer, s = coords.inner;
  const int64_t b = bh / args.heads, h = bh % args.heads;
  const T* x = reinterpret_cast<const T*>(args.x);
  const T* y = reinterpret_cast<const T*>(args.y);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[Shape::kTilesPerWarp];
#pragma unroll
  for (int i = 0; i < Shape::kTilesPerWarp; ++i) wmma::fill_fragment(acc[i], 0.f);
  float sum_acc = 0.f;  // partial_sum[threadIdx.x], threadIdx.x < DP

  const int64_t begin = args.split.begin(s), end = args.split.end(s);
  for (int64_t n0 = begin; n0 < end; n0 += TOK) {
    __syncthreads();  // the previous tile's readers are done
    if (threadIdx.x < TOK) {
      const int64_t n = n0 + threadIdx.x;
      float w = 0.f, c = 0.f;
      if (n < end) {
        row_weights<RowWeights::kMask>(args.mask, args.row_scratch, args.split.tokens, args.heads,
                                       bh, n, w, c);
      }
      s_w[threadIdx.x] = w;
    }
    __syncthreads();
    load_rows_tc<TOK, DP, LD>(s_a, x, args.x_layout, b, h, n0, end, args.dx, args.vec_x,
                              n0 == begin,
                              [](float v, int t) {
                                return s_w[t] != 0.f ? feature_map_value<F, float>(v) : 0.f;
                              });
    load_rows_tc<TOK, DP, LD>(s_b, y, args.y_layout, b, h, n0, end, args.dy, args.vec_y,
                              n0 == begin,
                              [](float v, int t) { return s_w[t] != 0.f ? v : 0.f; });
    __syncthreads();
    if (threadIdx.x < DP) {
#pragma unroll 8
      for (int t = 0; t < TOK; ++t) sum_acc += to_float(s_a[t * LD + threadIdx.x]);
    }
    accumulate_outer_tc<T, DP, TOK, LD, kTcPartialWarps, Shape::kTilesPerWarp>(acc, s_a, s_b);
  }

  store_outer_tc<DP, kTcPartialWarps, Shape::kTilesPerWarp>(
      args.partial_outer + partial_offset(bh, s, args.split.count, DP, DP), acc);
  if (threadIdx.x < DP) {
    args.partial_sum[partial_offset(bh, s, args.split.count, 1, DP) + threadIdx.x] = sum_acc;
  }
#endif
}

// Tokens per tile of the per-token tensor-core kernels: fewer for wide heads, to bound shared
// memory.
__host__ __device__ constexpr int tc_token_tile(int dp) { return dp <= 80 ? 64 : 32; }

// Shared-memory layout of the per-token tensor-core kernels: the fp32 matrix of the pass as
// hi / lo halves (DP x kCols), token tiles (kTokens x DP, 16-bit) and fp32 product tiles.
template <int DP, int COLS>
struct TcTokenShape {
  static_assert(DP % 16 == 0 && DP >= 16 && DP <= 160, "DP: multiple of 16, at most 160");
  static constexpr int kTokens = tc_token_tile(DP);
  static constexpr int kCols = COLS;           // DP, or DP + 16 with the key mean at column DP
  static constexpr int kLdS = kCols + 8;       // +16 bytes per row: conflict-free loads
  static constexpr int kLdT = tc_tile_ld(DP);
  // fp32 products, written by WMMA accumulator stores: each 16-lane phase stores 4 rows x 8
  // words, in distinct banks when the row stride is 8 or 24 words mod 32 (kCols is a multiple
  // of 16), instead of 2-way conflicts with kCols + 4.
  static constexpr int kLdP = tc_product_ld(kCols);
  static constexpr size_t kHalfBytes = size_t(DP) * kLdS * 2;    // hi or lo
  static constexpr size_t kTileBytes = size_t(kTokens) * kLdT * 2;
  static constexpr size_t kProductBytes = size_t(kTokens) * kLdP * 4;
  static_assert(kHalfBytes % 128 == 0 && kTileBytes % 128 == 0 && kProductBytes % 128 == 0,
                "shared-memory arrays stay 128-byte aligned");
};

// Pass 2 with tensor cores: [num | den - eps] = phi(Q) [S | z] for a tile of tokens, then
// o = num / den. Each block loads S and z once (as hi + lo halves, so rounding the fp32 state
// costs no accuracy) and loops over one split of the tokens. 4 warps;
// grid.x = (batch * heads) * splits.
constexpr int kTcApplyWarps = 4;

template <int DP>
struct TcApplyShape : TcTokenShape<DP, DP + 16> {
  using Base = TcTokenShape<DP, DP + 16>;
  static constexpr size_t kSmemBytes = 2 * Base::kHalfBytes + Base::kTileBytes + Base::kProductBytes;
};

template <typename scalar_t, FeatureMap F, int DP>
__global__ void __launch_bounds__(kTcApplyWarps* kWarpSize)
    linear_attention_apply_tc_kernel(TokenArgs<scalar_t, float> args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host launches this kernel on sm_80+ only
#else
  using T = typename TcType<scalar_t>::type;
  using Shape = TcApplyShape<DP>;
  constexpr int TOK = Shape::kTokens;
  LINFUSION_OPS_DYNAMIC_SMEM(unsigned char, smem);
  T* s_hi = reinterpret_cast<T*>(smem);                                    // DP x kCols
  T* s_lo = reinterpret_cast<T*>(smem + Shape::kHalfBytes);                // DP x kCols
  T* s_q = reinterpret_cast<T*>(smem + 2 * Shape::kHalfBytes);             // TOK x DP
  float* s_p = reinterpret_cast<float*>(smem + 2 * Shape::kHalfBytes + Shape::kTileBytes);
                                                                           // TOK x kCols

  const BlockCoords coords = split_block_index(args.split.count);
  const int64_t bh = coords.outer, s = coords.inner;
  const int64_t b = bh / args.heads, h = bh % args.heads;
  const int d = args.dk;  // == args.dv
  const T* q = reinterpret_cast<const T*>(args.x);
  T* out = reinterpret_cast<T*>(args.out_y);
  split_hi_lo<DP, Shape::kCols, Shape::kLdS>(s_hi, s_lo, args.matrix + bh * d * d,
                                             args.vec + bh * d, d);

  const int64_t begin = args.split.begin(s), end = args.split.end(s);
  for (int64_t n0 = begin; n0 < end; n0 += TOK) {
    __syncthreads();  // state loaded; the previous epilogue is done with s_q and s_p
    load_rows_tc<TOK, DP, Shape::kLdT>(s_q, q, args.x_layout, b, h, n0, end, d, args.vec_x,
                                       n0 == begin,
                                       [](float v, int) { return feature_map_value<F, float>(v); });
    __syncthreads();
    gemm_hi_lo_to_smem<T, TOK, Shape::kCols, DP, Shape::kLdT, Shape::kLdS, Shape::kLdP, false,
                       kTcApplyWarps>(s_q, s_hi, s_lo, s_p);
    __syncthreads();
    if (args.vec_out_y) {
      for_each_chunk_tc<TOK>(d / kTcVector, [&](int t, int chunk) {
        const int c = chunk * kTcVector;
        const int64_t n = n0 + t;
        if (n >= end) return;
        const float* row = s_p + t * Shape::kLdP;
        const float inv_den = 1.f / (row[DP] + args.eps);
        float products[kTcVector];
        load_8_floats_tc(products, row + c, tc_upper_first(d / kTcVector, t, chunk));
        uint4 packed;
        T* vals = reinterpret_cast<T*>(&packed);
#pragma unroll
        for (int e = 0; e < kTcVector; ++e) vals[e] = from_float<T>(products[e] * inv_den);
        *reinterpret_cast<uint4*>(out + args.out_y_layout.offset(b, n, h) + c) = packed;
      });
    } else {
      for (int idx = threadIdx.x; idx < TOK * DP; idx += blockDim.x) {
        const int t = idx / DP, c = idx % DP;
        const int64_t n = n0 + t;
        if (n >= end || c >= d) continue;
        const float* row = s_p + t * Shape::kLdP;
        const float inv_den = 1.f / (row[DP] + args.eps);
        out[args.out_y_layout.offset(b, n, h) + c] = from_float<T>(row[c] * inv_den);
      }
    }
  }
#endif
}

// Apply backward with tensor cores, fused: per token tile, P = [num | den - eps] = phi(Q) [S | z]
// and R = dO S^T (hi / lo state); then per token inv_den = 1 / den, g = (num . do) inv_den and
// dq = phi'(q) (R - g z) inv_den; and, reduced over the split's tokens,
// partial dS = sum_t a_t do_t^T and partial dz = -sum_t g_t a_t with a_t = phi(q_t) inv_den_t.
// Reads q and grad_out once; nothing per token is stored. 8 warps (the dS accumulators of
// DP = 160 need 100 tiles); grid.x = (batch * heads) * splits.
constexpr int kTcBackwardWarps = 8;

template <int DP>
struct TcApplyBackwardShape : TcTokenShape<DP, DP + 16> {
  using Base = TcTokenShape<DP, DP + 16>;
  static constexpr int kLdR = tc_product_ld(DP);  // fp32 dO S^T
  static constexpr size_t kRBytes = size_t(Base::kTokens) * kLdR * 4;
  static constexpr size_t kSmemBytes = 2 * Base::kHalfBytes + 2 * Base::kTileBytes +
                                       Base::kProductBytes + kRBytes +
                                       (2 * Base::kTokens + DP) * sizeof(float);
  static constexpr int kOuterTiles = (DP / 16) * (DP / 16);
  static constexpr int kOuterTilesPerWarp = (kOuterTiles + kTcBackwardWarps - 1) / kTcBackwardWarps;
  static_assert(kRBytes % 128 == 0, "shared-memory arrays stay 128-byte aligned");
};

template <typename scalar_t, FeatureMap F, int DP>
__global__ void __launch_bounds__(kTcBackwardWarps* kWarpSize)
    linear_attention_apply_backward_tc_kernel(TokenArgs<scalar_t, float> args,
                                              float* partial_outer,  // (B*H) x splits x DP x DP
                                              float* partial_sum) {  // (B*H) x splits x DP
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host launches this kernel on sm_80+ only
#else
  namespace wmma = nvcuda::wmma;
  using T = typename TcType<scalar_t>::type;
  using Shape = TcApplyBackwardShape<DP>;
  constexpr int TOK = Shape::kTokens, LDT = Shape::kLdT, LDP = Shape::kLdP, LDR = Shape::kLdR;
  LINFUSION_OPS_DYNAMIC_SMEM(unsigned char, smem);
  unsigned char* cursor = smem;
  T* s_hi = reinterpret_cast<T*>(cursor);  // DP x kCols: [S | z], high half
  cursor += Shape::kHalfBytes;
  T* s_lo = reinterpret_cast<T*>(cursor);  // low half
  cursor += Shape::kHalfBytes;
  T* s_q = reinterpret_cast<T*>(cursor);   // TOK x DP: phi(q_t), then a_t = phi(q_t) inv_den_t
  cursor += Shape::kTileBytes;
  T* s_do = reinterpret_cast<T*>(cursor);  // TOK x DP: do_t
  cursor += Shape::kTileBytes;
  float* s_p = reinterpret_cast<float*>(cursor);  // TOK x kCols: [num | den - eps]
  cursor += Shape::kProductBytes;
  float* s_r = reinterpret_cast<float*>(cursor);  // TOK x DP: dO S^T
  cursor += Shape::kRBytes;
  float* s_inv_den = reinterpret_cast<float*>(cursor);  // TOK
  float* s_g = s_inv_den + TOK;                         // TOK
  float* s_z = s_g + TOK;                               // DP: key mean, fp32

  const BlockCoords coords = split_block_index(args.split.count);
  const int64_t bh = coords.outer, s = coords.inner;
  const int64_t b = bh / args.heads, h = bh % args.heads;
  const int d = args.dk;  // == args.dv
  const T* q = reinterpret_cast<const T*>(args.x);
  const T* grad_out = reinterpret_cast<const T*>(args.y);
  T* grad_q = reinterpret_cast<T*>(args.out_x);
  const float* key_mean = args.vec + bh * d;
  split_hi_lo<DP, Shape::kCols, Shape::kLdS>(s_hi, s_lo, args.matrix + bh * d * d, key_mean, d);
  for (int i = threadIdx.x; i < DP; i += blockDim.x) s_z[i] = i < d ? key_mean[i] : 0.f;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[Shape::kOuterTilesPerWarp];
#pragma unroll
  for (int i = 0; i < Shape::kOuterTilesPerWarp; ++i) wmma::fill_fragment(acc[i], 0.f);
  float dz_acc = 0.f;  // partial dz[threadIdx.x], threadIdx.x < DP

  const bool vec_dq = args.vec_x && args.vec_out_x;
  float z_chunk[kTcVector];  // the key mean at the lane's dq chunk
  lane_chunk_of_smem_vector_tc(z_chunk, s_z, d, vec_dq);

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t begin = args.split.begin(s), end = args.split.end(s);
  for (int64_t n0 = begin; n0 < end; n0 += TOK) {
    __syncthreads();  // state loaded; the previous tile's readers are done
    load_rows_tc<TOK, DP, LDT>(s_q, q, args.x_layout, b, h, n0, end, d, args.vec_x,
                               n0 == begin,
                               [](float v, int) { return feature_map_value<F, float>(v); });
    load_rows_tc<TOK, DP, LDT>(s_do, grad_out, args.y_layout, b, h, n0, end, d, args.vec_y,
                               n0 == begin,
                               [](float v, int) { return v; });
    __syncthreads();
    gemm_hi_lo_to_smem<T, TOK, Shape::kCols, DP, LDT, Shape::kLdS, LDP, false, kTcBackwardWarps>(
        s_q, s_hi, s_lo, s_p);
    gemm_hi_lo_to_smem<T, TOK, DP, DP, LDT, Shape::kLdS, LDR, true, kTcBackwardWarps>(
        s_do, s_hi, s_lo, s_r);
    __syncthreads();
    // Per token: inv_den and g = o . do, one warp per token. Tokens past the end get zeros, so
    // their a_t (and their share of dS, dz) vanish even when eps = 0.
    for (int t = warp; t < TOK; t += kTcBackwardWarps) {
      const float* row = s_p + t * LDP;
      float dot = 0.f;
      for (int j = lane; j < DP; j += kWarpSize) dot += row[j] * to_float(s_do[t * LDT + j]);
      dot = warp_sum(dot);
      if (lane == 0) {
        const bool valid = n0 + t < end;
        const float inv_den = valid ? 1.f / (row[DP] + args.eps) : 0.f;
        s_inv_den[t] = inv_den;
        s_g[t] = dot * inv_den;
      }
    }
    __syncthreads();
    // dq, and a_t = phi(q_t) inv_den_t in place of phi(q_t).
    if (vec_dq) {
      for_each_chunk_tc<TOK>(d / kTcVector, [&](int t, int chunk) {
        const int c = chunk * kTcVector;
        const int64_t n = n0 + t;
        const float inv_den = s_inv_den[t];
        uint4 a = *reinterpret_cast<const uint4*>(s_q + t * LDT + c);
        T* a_vals = reinterpret_cast<T*>(&a);
        if (n < end) {
          const uint4 raw = *reinterpret_cast<const uint4*>(q + args.x_layout.offset(b, n, h) + c);
          const T* xq = reinterpret_cast<const T*>(&raw);
          float r[kTcVector];
          load_8_floats_tc(r, s_r + t * LDR + c, tc_upper_first(d / kTcVector, t, chunk));
          const float g = s_g[t];
          uint4 packed;
          T* dq = reinterpret_cast<T*>(&packed);
#pragma unroll
          for (int e = 0; e < kTcVector; ++e) {
            const float dfq = (r[e] - g * z_chunk[e]) * inv_den;
            dq[e] = from_float<T>(dfq * feature_map_grad<F, float>(to_float(xq[e])));
          }
          *reinterpret_cast<uint4*>(grad_q + args.out_x_layout.offset(b, n, h) + c) = packed;
        }
#pragma unroll
        for (int e = 0; e < kTcVector; ++e) {
          a_vals[e] = from_float<T>(to_float(a_vals[e]) * inv_den);
        }
        *reinterpret_cast<uint4*>(s_q + t * LDT + c) = a;
      });
    } else {
      for (int idx = threadIdx.x; idx < TOK * DP; idx += blockDim.x) {
        const int t = idx / DP, c = idx % DP;
        if (c >= d) continue;  // the padding columns stay zero
        const int64_t n = n0 + t;
        const float inv_den = s_inv_den[t];
        if (n < end) {
          const float xq = to_float(q[args.x_layout.offset(b, n, h) + c]);
          const float dfq = (s_r[t * LDR + c] - s_g[t] * s_z[c]) * inv_den;
          grad_q[args.out_x_layout.offset(b, n, h) + c] =
              from_float<T>(dfq * feature_map_grad<F, float>(xq));
        }
        s_q[t * LDT + c] = from_float<T>(to_float(s_q[t * LDT + c]) * inv_den);
      }
    }
    __syncthreads();
    if (threadIdx.x < DP) {
#pragma unroll 8
      for (int t = 0; t < TOK; ++t) dz_acc -= s_g[t] * to_float(s_q[t * LDT + threadIdx.x]);
    }
    accumulate_outer_tc<T, DP, TOK, LDT, kTcBackwardWarps, Shape::kOuterTilesPerWarp>(acc, s_q,
                                                                                       s_do);
  }

  store_outer_tc<DP, kTcBackwardWarps, Shape::kOuterTilesPerWarp>(
      partial_outer + partial_offset(bh, s, args.split.count, DP, DP), acc);
  if (threadIdx.x < DP) {
    partial_sum[partial_offset(bh, s, args.split.count, 1, DP) + threadIdx.x] = dz_acc;
  }
#endif
}

// State backward with tensor cores, per key tile: with dS (hi / lo, rescaled) in shared memory,
// dk = phi'(k) keep (V dS^T + dz) / n and dv = keep (phi(K) dS) / n. 4 warps;
// grid.x = (batch * heads) * splits.
template <int DP>
struct TcStateBackwardShape : TcTokenShape<DP, DP> {
  using Base = TcTokenShape<DP, DP>;
  // + s_w (kTokens), s_dz (DP) and one word for fp16_range_shift.
  static constexpr size_t kSmemBytes = 2 * Base::kHalfBytes + 2 * Base::kTileBytes +
                                       Base::kProductBytes +
                                       (Base::kTokens + DP + 1) * sizeof(float);
};

template <typename scalar_t, FeatureMap F, int DP>
__global__ void __launch_bounds__(kTcApplyWarps* kWarpSize)
    linear_attention_state_backward_tc_kernel(TokenArgs<scalar_t, float> args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host launches this kernel on sm_80+ only
#else
  using T = typename TcType<scalar_t>::type;
  using Shape = TcStateBackwardShape<DP>;
  constexpr int TOK = Shape::kTokens, LDT = Shape::kLdT, LDP = Shape::kLdP;
  LINFUSION_OPS_DYNAMIC_SMEM(unsigned char, smem);
  unsigned char* cursor = smem;
  T* s_hi = reinterpret_cast<T*>(cursor);  // DP x DP: dS, high half
  cursor += Shape::kHalfBytes;
  T* s_lo = reinterpret_cast<T*>(cursor);  // low half
  cursor += Shape::kHalfBytes;
  T* s_fk = reinterpret_cast<T*>(cursor);  // TOK x DP: phi(k_t) (zero for removed keys)
  cursor += Shape::kTileBytes;
  T* s_v = reinterpret_cast<T*>(cursor);   // TOK x DP: v_t (zero for removed keys)
  cursor += Shape::kTileBytes;
  float* s_p = reinterpret_cast<float*>(cursor);  // TOK x DP: V dS^T, then phi(K) dS
  cursor += Shape::kProductBytes;
  float* s_w = reinterpret_cast<float*>(cursor);  // TOK: keep_t / n
  float* s_dz = s_w + TOK;                        // DP: grad_key_mean, fp32
  unsigned* s_max_bits = reinterpret_cast<unsigned*>(s_dz + DP);  // fp16_range_shift's word

  const BlockCoords coords = split_block_index(args.split.count);
  const int64_t bh = coords.outer, s = coords.inner;
  const int64_t b = bh / args.heads, h = bh % args.heads;
  const int d = args.dk;  // == args.dv
  const T* k = reinterpret_cast<const T*>(args.x);
  const T* v = reinterpret_cast<const T*>(args.y);
  T* grad_k = reinterpret_cast<T*>(args.out_x);
  T* grad_v = reinterpret_cast<T*>(args.out_y);
  const float inv_n = inverse_kept<float>(args.kept, b, args.tokens);
  // dS is not divided by n (that happens per key, in fp32): rescaled by 2^shift so that fp16
  // holds it; the products are scaled back by 2^-shift, exactly.
  const int shift = fp16_range_shift(args.matrix + bh * d * d, d * d, s_max_bits);
  split_hi_lo<DP, DP, Shape::kLdS>(s_hi, s_lo, args.matrix + bh * d * d,
                                   static_cast<const float*>(nullptr), d, shift);
  const float unscale = ldexpf(1.f, -shift);
  for (int i = threadIdx.x; i < DP; i += blockDim.x) s_dz[i] = i < d ? args.vec[bh * d + i] : 0.f;
  const bool vec_dk = args.vec_x && args.vec_out_x;
  float dz_chunk[kTcVector];  // grad_key_mean at the lane's dk chunk
  lane_chunk_of_smem_vector_tc(dz_chunk, s_dz, d, vec_dk);

  const int64_t begin = args.split.begin(s), end = args.split.end(s);
  for (int64_t n0 = begin; n0 < end; n0 += TOK) {
    __syncthreads();  // dS loaded; the previous tile's readers are done
    if (threadIdx.x < TOK) {
      const int64_t n = n0 + threadIdx.x;
      s_w[threadIdx.x] = n < end && args.mask.keep(b, n) ? inv_n : 0.f;
    }
    __syncthreads();
    load_rows_tc<TOK, DP, LDT>(s_fk, k, args.x_layout, b, h, n0, end, d, args.vec_x,
                               n0 == begin,
                               [s_w](float x, int t) {
                                 return s_w[t] != 0.f ? feature_map_value<F, float>(x) : 0.f;
                               });
    load_rows_tc<TOK, DP, LDT>(s_v, v, args.y_layout, b, h, n0, end, d, args.vec_y,
                               n0 == begin,
                               [s_w](float x, int t) { return s_w[t] != 0.f ? x : 0.f; });
    __syncthreads();
    gemm_hi_lo_to_smem<T, TOK, DP, DP, LDT, Shape::kLdS, LDP, true, kTcApplyWarps>(s_v, s_hi,
                                                                                   s_lo, s_p);
    __syncthreads();
    if (vec_dk) {
      for_each_chunk_tc<TOK>(d / kTcVector, [&](int t, int chunk) {
        const int c = chunk * kTcVector;
        const int64_t n = n0 + t;
        if (n >= end) return;
        uint4 packed = make_uint4(0, 0, 0, 0);
        if (s_w[t] != 0.f) {
          const uint4 raw = *reinterpret_cast<const uint4*>(k + args.x_layout.offset(b, n, h) + c);
          const T* xk = reinterpret_cast<const T*>(&raw);
          float p[kTcVector];
          load_8_floats_tc(p, s_p + t * LDP + c, tc_upper_first(d / kTcVector, t, chunk));
          T* vals = reinterpret_cast<T*>(&packed);
#pragma unroll
          for (int e = 0; e < kTcVector; ++e) {
            vals[e] = from_float<T>((p[e] * unscale + dz_chunk[e]) * s_w[t] *
                                    feature_map_grad<F, float>(to_float(xk[e])));
          }
        }
        *reinterpret_cast<uint4*>(grad_k + args.out_x_layout.offset(b, n, h) + c) = packed;
      });
    } else {
      for (int idx = threadIdx.x; idx < TOK * DP; idx += blockDim.x) {
        const int t = idx / DP, c = idx % DP;
        const int64_t n = n0 + t;
        if (n >= end || c >= d) continue;
        float grad = 0.f;
        if (s_w[t] != 0.f) {
          const float xk = to_float(k[args.x_layout.offset(b, n, h) + c]);
          grad = (s_p[t * LDP + c] * unscale + s_dz[c]) * s_w[t] *
                 feature_map_grad<F, float>(xk);
        }
        grad_k[args.out_x_layout.offset(b, n, h) + c] = from_float<T>(grad);
      }
    }
    __syncthreads();
    gemm_hi_lo_to_smem<T, TOK, DP, DP, LDT, Shape::kLdS, LDP, false, kTcApplyWarps>(s_fk, s_hi,
                                                                                    s_lo, s_p);
    __syncthreads();
    // Explicit zeros for removed keys: 0 * an infinite product would be NaN.
    if (args.vec_out_y) {
      for_each_chunk_tc<TOK>(d / kTcVector, [&](int t, int chunk) {
        const int c = chunk * kTcVector;
        const int64_t n = n0 + t;
        if (n >= end) return;
        uint4 packed = make_uint4(0, 0, 0, 0);
        if (s_w[t] != 0.f) {
          float p[kTcVector];
          load_8_floats_tc(p, s_p + t * LDP + c, tc_upper_first(d / kTcVector, t, chunk));
          T* vals = reinterpret_cast<T*>(&packed);
#pragma unroll
          for (int e = 0; e < kTcVector; ++e) vals[e] = from_float<T>(p[e] * unscale * s_w[t]);
        }
        *reinterpret_cast<uint4*>(grad_v + args.out_y_layout.offset(b, n, h) + c) = packed;
      });
    } else {
      for (int idx = threadIdx.x; idx < TOK * DP; idx += blockDim.x) {
        const int t = idx / DP, c = idx % DP;
        const int64_t n = n0 + t;
        if (n >= end || c >= d) continue;
        const float grad = s_w[t] != 0.f ? s_p[t * LDP + c] * unscale * s_w[t] : 0.f;
        grad_v[args.out_y_layout.offset(b, n, h) + c] = from_float<T>(grad);
      }
    }
  }
#endif
}

// Turns the runtime padded head dim into a template constant: body.template operator()<DP>().
template <typename Body>
void dispatch_tc_dim(int dp, Body&& body) {
  switch (dp) {
    case 48:
      return body.template operator()<48>();
    case 64:
      return body.template operator()<64>();
    case 80:
      return body.template operator()<80>();
    case 128:
      return body.template operator()<128>();
    case 160:
      return body.template operator()<160>();
    default:
      TORCH_CHECK(false, "linfusion_ops: no tensor-core kernel for padded head dim ", dp);
  }
}

// The tensor-core kernels, for their dynamic shared-memory sizes.
enum class TcKernel { kStatePartial, kApply, kApplyBackward, kStateBackward };

template <int DP>
constexpr size_t tc_smem_bytes(TcKernel kernel) {
  switch (kernel) {
    case TcKernel::kApply:
      return TcApplyShape<DP>::kSmemBytes;
    case TcKernel::kApplyBackward:
      return TcApplyBackwardShape<DP>::kSmemBytes;
    case TcKernel::kStateBackward:
      return TcStateBackwardShape<DP>::kSmemBytes;
    default:
      return 0;  // static shared memory, below the 48 KiB every sm_80+ device allows
  }
}

struct TcSmemBytes {
  TcKernel kernel;
  size_t& bytes;
  template <int DP>
  void operator()() const {
    bytes = tc_smem_bytes<DP>(kernel);
  }
};

// Dynamic shared memory of `kernel` at padded head dim dp. Above the device's opt-in limit
// (227 KiB on sm_90, 163 KiB on sm_80, 99 KiB on sm_86 / sm_89) the host takes the generic path.
inline size_t tc_smem_bytes(TcKernel kernel, int dp) {
  size_t bytes = 0;
  dispatch_tc_dim(dp, TcSmemBytes{kernel, bytes});
  return bytes;
}

// ---------------------------------------------------------------------------------------------
// Host launchers of the tensor-core kernels, one translation unit per dtype
// (linear_attention_tc_fp16.cu, linear_attention_tc_bf16.cu). dp: 48, 64, 80, 128 or 160.
// Each kernel's split of the tokens is in args.split, its grid (batch * heads) * splits.
template <typename scalar_t>
void launch_state_partial_tc(const PartialArgs<scalar_t, float>& args, FeatureMap feature_map,
                             int dp, cudaStream_t stream);

template <typename scalar_t>
void launch_apply_tc(const TokenArgs<scalar_t, float>& args, FeatureMap feature_map, int dp,
                     cudaStream_t stream);

// partial_outer: (B*H, splits, dp, dp) fp32, partial_sum: (B*H, splits, dp) fp32.
template <typename scalar_t>
void launch_apply_backward_tc(const TokenArgs<scalar_t, float>& args, float* partial_outer,
                              float* partial_sum, FeatureMap feature_map, int dp,
                              cudaStream_t stream);

// Resident blocks per SM of one tensor-core kernel (the occupancy API: on a GPU, the real
// compiler's registers), which sizes its split (split_tokens).
template <typename scalar_t>
int tc_blocks_per_sm(TcKernel which, FeatureMap feature_map, int dp);

template <typename scalar_t>
void launch_state_backward_tc(const TokenArgs<scalar_t, float>& args, FeatureMap feature_map,
                              int dp, cudaStream_t stream);

}  // namespace la_cuda
}  // namespace linfusion_ops
