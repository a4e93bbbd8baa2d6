// CUDA kernels of LongAlign's segment merge and its backward (docs/design.md, merge_segments).
//
// The plan: each segment's kept count, the exclusive scan of those counts per prompt in segment
// order (segments may come in any prompt order), the prompt lengths and every token's slot in its
// prompt's merged row (-1 when it is dropped or past the budget). It runs on the GPU, with no host
// synchronisation, in one of two ways:
//  - fused (S and B at most kFusedMaxSegments, S*L at most kFusedKeepBytes: LongAlign's sizes):
//    every block of the copy kernel plans in shared memory first (it reads the keep mask, S*L
//    bytes, from L2 in 16-byte units and keeps its ballots, 32 tokens a word) and a warp finds a
//    token's slot from its segment's words, so the op is one launch (the backward's gather is one
//    launch too, before the pad gradient);
//  - planned (more segments or prompts): a one-block plan kernel writes every slot to global
//    memory and the copy kernels read them.
//
// The forward has one warp per "row task": the S*L token rows (copied to their slot when they
// have one) and then the B*T output slots (filled with the pad when at or after the prompt's
// length), so every output row is written exactly once. The copies move bits, so they depend on
// the element size only, in 16-byte units when the rows are aligned. Grid-stride kernels launch
// at most the blocks that are resident at once.
//
// Segment ids outside [0, num_prompts) trip a device-side assert (the CUDA error surfaces at the
// next synchronisation, like an out-of-range index in torch.index_select); with asserts compiled
// out those segments are dropped, so nothing is ever written out of bounds.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <tuple>

#include "common.h"
#include "cuda/rowwise.cuh"

namespace linfusion_ops {
namespace {

using cuda_rowwise::kFullMask;
using cuda_rowwise::kVectorBytes;
using cuda_rowwise::kWarpSize;

constexpr int kPlanThreads = 1024;
constexpr int kPlanWarps = kPlanThreads / kWarpSize;
constexpr int kCopyThreads = 256;
constexpr int kCopyWarps = kCopyThreads / kWarpSize;
constexpr int kCopyUnroll = 4;  // 16-byte units in flight per lane
// Fused path: one thread of the copy block per segment (and per prompt) in the block's plan; the
// keep mask (S*L bytes) and its bits (32 tokens a word) staged in shared memory.
constexpr int64_t kFusedMaxSegments = kCopyThreads;
constexpr int64_t kFusedKeepBytes = 16384;
constexpr int64_t kFusedMaskWords = 1024;

__device__ __forceinline__ bool valid_prompt(int64_t id, int64_t prompts) {
  return id >= 0 && id < prompts;
}

// Row of merged / grad_merged, viewed as (B*T) rows, that holds slot `slot` of prompt `prompt`.
__device__ __forceinline__ int64_t merged_row(int64_t prompt, int64_t slot, int64_t max_tokens) {
  return prompt * max_tokens + slot;
}

// Lanes below this one, as a ballot mask.
__device__ __forceinline__ unsigned lanes_below(int lane) { return (1u << lane) - 1u; }

// keep: (S, L) bool; segment_ids: (S,) int64. Writes slot_of (S*L): the slot of each token in its
// prompt's merged row, or -1; lengths (B): min(kept tokens of the prompt, T). Scratch, set here
// (no memset launch): counts (S), offsets (S), running (B). Launched with one block of
// kPlanThreads.
__global__ void __launch_bounds__(kPlanThreads)
    merge_segments_plan_kernel(const bool* __restrict__ keep,           // S x L
                               const int64_t* __restrict__ segment_ids,  // S
                               int64_t segments, int64_t length, int64_t prompts,
                               int64_t max_tokens,
                               int64_t* __restrict__ counts,   // S
                               int64_t* __restrict__ offsets,  // S
                               int64_t* __restrict__ running,  // B
                               int64_t* __restrict__ slot_of,  // S x L
                               int64_t* __restrict__ lengths) {  // B
  __shared__ int64_t chunk_ids[kPlanThreads];
  __shared__ int64_t chunk_counts[kPlanThreads];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  // 1. Kept tokens per segment, a warp per segment, 32 tokens per ballot; running totals zeroed.
  for (int64_t b = threadIdx.x; b < prompts; b += kPlanThreads) running[b] = 0;
  for (int64_t s = warp; s < segments; s += kPlanWarps) {
    int64_t kept = 0;
#pragma unroll 4  // the keep loads of a CLIP segment (77 tokens) issue together
    for (int64_t l0 = 0; l0 < length; l0 += kWarpSize) {
      const bool k = l0 + lane < length && keep[s * length + l0 + lane];
      kept += __popc(__ballot_sync(kFullMask, k));
    }
    if (lane == 0) counts[s] = kept;
  }
  __syncthreads();

  // 2. Exclusive scan per prompt in segment order, kPlanThreads segments at a time: a segment's
  // offset is its prompt's total from earlier chunks plus the counts of the earlier segments of
  // the same prompt in this chunk; the last segment of each prompt in the chunk carries the
  // total forward.
  for (int64_t base = 0; base < segments; base += kPlanThreads) {
    const int64_t s = base + threadIdx.x;
    const int64_t in_chunk = segments - base < kPlanThreads ? segments - base : kPlanThreads;
    int64_t id = -1, count = 0;
    if (s < segments) {
      id = segment_ids[s];
      CUDA_KERNEL_ASSERT_MSG(valid_prompt(id, prompts),
                             "merge_segments: segment_ids must be in [0, num_prompts)");
      if (!valid_prompt(id, prompts)) id = -1;
      count = counts[s];
    }
    chunk_ids[threadIdx.x] = id;
    chunk_counts[threadIdx.x] = count;
    __syncthreads();
    int64_t offset = 0;
    bool last_of_prompt = true;
    if (id >= 0) {
      offset = running[id];
      for (int j = 0; j < static_cast<int>(threadIdx.x); ++j) {
        if (chunk_ids[j] == id) offset += chunk_counts[j];
      }
      for (int64_t j = threadIdx.x + 1; j < in_chunk; ++j) {
        if (chunk_ids[j] == id) {
          last_of_prompt = false;
          break;
        }
      }
    }
    __syncthreads();  // every read of running and of the chunk arrays is done
    if (s < segments) offsets[s] = offset;
    if (id >= 0 && last_of_prompt) running[id] = offset + count;
  }
  __syncthreads();

  // 3. Prompt lengths: the kept tokens, truncated to the budget.
  for (int64_t b = threadIdx.x; b < prompts; b += kPlanThreads) {
    lengths[b] = running[b] < max_tokens ? running[b] : max_tokens;
  }

  // 4. Token slots: segment offset plus the kept tokens before it in the segment.
  for (int64_t s = warp; s < segments; s += kPlanWarps) {
    const bool valid = valid_prompt(segment_ids[s], prompts);
    int64_t next_slot = offsets[s];
#pragma unroll 4
    for (int64_t l0 = 0; l0 < length; l0 += kWarpSize) {
      const int64_t l = l0 + lane;
      const bool k = l < length && keep[s * length + l];
      const unsigned kept_mask = __ballot_sync(kFullMask, k);
      const int64_t slot = next_slot + __popc(kept_mask & lanes_below(lane));
      if (l < length) slot_of[s * length + l] = k && valid && slot < max_tokens ? slot : -1;
      next_slot += __popc(kept_mask);
    }
  }
}

// Copies (or, with src == nullptr, zeroes) one row of `units` Units, the warp's lanes striding
// over it with kCopyUnroll loads in flight before the stores.
template <typename Unit>
__device__ __forceinline__ void copy_row(Unit* __restrict__ dst, const Unit* __restrict__ src,
                                         int64_t units, int lane) {
  for (int64_t first = lane; first < units; first += kWarpSize * kCopyUnroll) {
    Unit staged[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t i = first + u * kWarpSize;
      if (i < units) {
        if (src != nullptr) {
          staged[u] = src[i];
        } else {
          staged[u] = Unit{};
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t i = first + u * kWarpSize;
      if (i < units) dst[i] = staged[u];
    }
  }
}

__device__ __forceinline__ int64_t global_warp() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
}

__device__ __forceinline__ int64_t warps_in_grid() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
}

// Rows are `units` Units wide (C channels, reinterpreted as raw bits). Tasks [0, S*L) are token
// rows, [S*L, S*L + B*T) the output slots (b, t) that take the pad.
template <typename Unit>
__global__ void __launch_bounds__(kCopyThreads)
    merge_segments_kernel(const Unit* __restrict__ embeds,          // (S*L) x units
                          const int64_t* __restrict__ segment_ids,  // S
                          const int64_t* __restrict__ slot_of,      // S*L
                          const int64_t* __restrict__ lengths,      // B
                          const Unit* __restrict__ pad,             // units, or T x units
                          bool pad_per_slot, int64_t length, int64_t prompts, int64_t max_tokens,
                          int64_t units, int64_t token_rows,
                          Unit* __restrict__ merged) {  // (B*T) x units
  const int lane = threadIdx.x % kWarpSize;
  const int64_t tasks = token_rows + prompts * max_tokens;
  for (int64_t task = global_warp(); task < tasks; task += warps_in_grid()) {
    if (task < token_rows) {
      const int64_t slot = slot_of[task];
      if (slot < 0) continue;
      const int64_t prompt = segment_ids[task / length];  // task = s * L + l
      copy_row(merged + merged_row(prompt, slot, max_tokens) * units, embeds + task * units, units,
               lane);
    } else {
      const int64_t out_row = task - token_rows;  // b * T + t
      const int64_t t = out_row % max_tokens;
      if (t < lengths[out_row / max_tokens]) continue;
      copy_row(merged + out_row * units, pad + (pad_per_slot ? t * units : 0), units, lane);
    }
  }
}

// grad_embeds row (s, l) = grad_merged row (b, slot) for tokens with a slot, else zero.
template <typename Unit>
__global__ void __launch_bounds__(kCopyThreads)
    merge_segments_gather_grad_kernel(const Unit* __restrict__ grad_merged,    // (B*T) x units
                                      const int64_t* __restrict__ segment_ids,  // S
                                      const int64_t* __restrict__ slot_of,      // S*L
                                      int64_t length, int64_t max_tokens, int64_t units,
                                      int64_t token_rows,
                                      Unit* __restrict__ grad_embeds) {  // (S*L) x units
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t task = global_warp(); task < token_rows; task += warps_in_grid()) {
    const int64_t slot = slot_of[task];
    const Unit* src = nullptr;
    if (slot >= 0) {
      src = grad_merged + merged_row(segment_ids[task / length], slot, max_tokens) * units;
    }
    copy_row(grad_embeds + task * units, src, units, lane);
  }
}

// ---------------------------------------------------------------------------------------------
// Fused path: the plan of one block, in shared memory (S, B <= kFusedMaxSegments).
struct BlockPlan {
  int64_t prompt[kFusedMaxSegments];  // segment's prompt, -1 for an invalid id
  int64_t count[kFusedMaxSegments];   // segment's kept tokens
  int64_t offset[kFusedMaxSegments];  // slot of the segment's first kept token
  int64_t length[kFusedMaxSegments];  // prompt lengths: min(kept tokens of the prompt, T)
  uint32_t mask[kFusedMaskWords];     // keep bits of segment s: mask[s * chunks + l / 32]
  alignas(16) bool keep[kFusedKeepBytes];  // the keep mask, S x L
};

// Words of keep bits per segment.
__host__ __device__ __forceinline__ int64_t keep_chunks(int64_t length) {
  return (length + kWarpSize - 1) / kWarpSize;
}

// Fills `plan` (every thread of the block calls it; blockDim.x == kCopyThreads). Block 0 also
// writes the prompt lengths to `lengths_out` (B).
__device__ __forceinline__ void plan_in_block(const bool* __restrict__ keep,
                                              const int64_t* __restrict__ segment_ids,
                                              int64_t segments, int64_t length, int64_t prompts,
                                              int64_t max_tokens, BlockPlan& plan,
                                              int64_t* __restrict__ lengths_out) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  // The keep mask into shared memory, 16 bytes a thread when it is aligned.
  const int64_t keep_bytes = segments * length;
  int64_t done = 0;
  if (reinterpret_cast<std::uintptr_t>(keep) % kVectorBytes == 0) {
    done = keep_bytes / kVectorBytes * kVectorBytes;
    for (int64_t v = threadIdx.x; v < done / kVectorBytes; v += kCopyThreads) {
      reinterpret_cast<uint4*>(plan.keep)[v] = reinterpret_cast<const uint4*>(keep)[v];
    }
  }
  for (int64_t i = done + threadIdx.x; i < keep_bytes; i += kCopyThreads) plan.keep[i] = keep[i];
  __syncthreads();
  // Keep bits and kept count per segment, a warp per segment, 32 tokens per ballot.
  const int64_t chunks = keep_chunks(length);
  for (int64_t s = warp; s < segments; s += kCopyWarps) {
    int64_t kept = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t l = c * kWarpSize + lane;
      const unsigned bits = __ballot_sync(kFullMask, l < length && plan.keep[s * length + l]);
      if (lane == 0) plan.mask[s * chunks + c] = bits;
      kept += __popc(bits);
    }
    if (lane == 0) plan.count[s] = kept;
  }
  const int64_t s = threadIdx.x;
  if (s < segments) {
    const int64_t id = segment_ids[s];
    CUDA_KERNEL_ASSERT_MSG(valid_prompt(id, prompts),
                           "merge_segments: segment_ids must be in [0, num_prompts)");
    plan.prompt[s] = valid_prompt(id, prompts) ? id : -1;
  }
  __syncthreads();
  // Segment s's offset: the kept tokens of the earlier segments of its prompt; prompt b's
  // length: those of all its segments (the reads of plan.prompt / count are broadcasts).
  if (s < segments) {
    const int64_t id = plan.prompt[s];
    int64_t offset = 0;
    for (int64_t j = 0; j < s; ++j) offset += plan.prompt[j] == id ? plan.count[j] : 0;
    plan.offset[s] = offset;
  }
  const int64_t b = threadIdx.x;
  if (b < prompts) {
    int64_t total = 0;
    for (int64_t j = 0; j < segments; ++j) total += plan.prompt[j] == b ? plan.count[j] : 0;
    plan.length[b] = total < max_tokens ? total : max_tokens;
    if (blockIdx.x == 0) lengths_out[b] = plan.length[b];
  }
  __syncthreads();
}

// Slot of token row `task` = s * L + l in its prompt's merged row, or -1: the segment's offset
// plus the kept tokens before l, counted in the segment's keep words.
__device__ __forceinline__ int64_t token_slot(int64_t task, int64_t length, int64_t max_tokens,
                                              const BlockPlan& plan) {
  const int64_t s = task / length;
  const int64_t l = task - s * length;
  if (plan.prompt[s] < 0) return -1;
  const uint32_t* words = plan.mask + s * keep_chunks(length);
  const int64_t chunk = l / kWarpSize;
  int64_t before = 0;
  for (int64_t c = 0; c < chunk; ++c) before += __popc(words[c]);
  const int bit = static_cast<int>(l - chunk * kWarpSize);
  if (((words[chunk] >> bit) & 1u) == 0u) return -1;
  const int64_t slot = plan.offset[s] + before + __popc(words[chunk] & lanes_below(bit));
  return slot < max_tokens ? slot : -1;
}

// The forward in one launch: plan, then the row tasks of merge_segments_kernel.
template <typename Unit>
__global__ void __launch_bounds__(kCopyThreads)
    merge_segments_fused_kernel(const Unit* __restrict__ embeds,          // (S*L) x units
                                const bool* __restrict__ keep,            // S x L
                                const int64_t* __restrict__ segment_ids,  // S
                                const Unit* __restrict__ pad,             // units, or T x units
                                bool pad_per_slot, int64_t segments, int64_t length,
                                int64_t prompts, int64_t max_tokens, int64_t units,
                                int64_t* __restrict__ lengths,  // B
                                Unit* __restrict__ merged) {    // (B*T) x units
  __shared__ BlockPlan plan;
  plan_in_block(keep, segment_ids, segments, length, prompts, max_tokens, plan, lengths);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t token_rows = segments * length;
  const int64_t tasks = token_rows + prompts * max_tokens;
  for (int64_t task = global_warp(); task < tasks; task += warps_in_grid()) {
    if (task < token_rows) {
      const int64_t slot = token_slot(task, length, max_tokens, plan);
      if (slot < 0) continue;
      copy_row(merged + merged_row(plan.prompt[task / length], slot, max_tokens) * units,
               embeds + task * units, units, lane);
    } else {
      const int64_t out_row = task - token_rows;  // b * T + t
      const int64_t t = out_row % max_tokens;
      if (t < plan.length[out_row / max_tokens]) continue;
      copy_row(merged + out_row * units, pad + (pad_per_slot ? t * units : 0), units, lane);
    }
  }
}

// The backward's gather in one launch: plan (block 0 writes the lengths the pad gradient
// reads), then grad_embeds row (s, l) = grad_merged row (b, slot), or zero.
template <typename Unit>
__global__ void __launch_bounds__(kCopyThreads)
    merge_segments_fused_gather_grad_kernel(const Unit* __restrict__ grad_merged,   // (B*T) x units
                                            const bool* __restrict__ keep,           // S x L
                                            const int64_t* __restrict__ segment_ids,  // S
                                            int64_t segments, int64_t length, int64_t prompts,
                                            int64_t max_tokens, int64_t units,
                                            int64_t* __restrict__ lengths,       // B
                                            Unit* __restrict__ grad_embeds) {  // (S*L) x units
  __shared__ BlockPlan plan;
  plan_in_block(keep, segment_ids, segments, length, prompts, max_tokens, plan, lengths);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t token_rows = segments * length;
  for (int64_t task = global_warp(); task < token_rows; task += warps_in_grid()) {
    const int64_t slot = token_slot(task, length, max_tokens, plan);
    const Unit* src = nullptr;
    if (slot >= 0) src = grad_merged + merged_row(plan.prompt[task / length], slot, max_tokens) * units;
    copy_row(grad_embeds + task * units, src, units, lane);
  }
}

// Pad gradient: row r of `sums` (R x C, R = ceil(T / slots_per_row)) is the sum of
// grad_merged[b][t][c] over the prompts b in order and, within each, over the pad slots
// t >= lengths[b] of [r * slots_per_row, (r + 1) * slots_per_row), in acc_t. For a (T, C) pad,
// slots_per_row = 1 and out_t is the pad's dtype: the rows are the gradient. For a (C,) pad the
// acc_t rows are partials that column_sum_kernel reduces; a row of several slots keeps them
// (read and written once each, in fp32) a small fraction of grad_merged's traffic.
template <typename scalar_t, typename out_t>
__global__ void __launch_bounds__(kCopyThreads)
    merge_segments_pad_grad_kernel(const scalar_t* __restrict__ grad_merged,  // B x T x C
                                   const int64_t* __restrict__ lengths,       // B
                                   int64_t prompts, int64_t max_tokens, int64_t channels,
                                   int64_t slots_per_row,
                                   out_t* __restrict__ sums) {  // R x C
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = (max_tokens + slots_per_row - 1) / slots_per_row;
  const int64_t elems = rows * channels;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < elems;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / channels, c = i % channels;
    const int64_t first = row * slots_per_row;
    const int64_t last = first + slots_per_row < max_tokens ? first + slots_per_row : max_tokens;
    acc_t sum = 0;
    for (int64_t b = 0; b < prompts; ++b) {
      const int64_t length = lengths[b];
      for (int64_t t = length > first ? length : first; t < last; ++t) {
        sum += static_cast<acc_t>(grad_merged[(b * max_tokens + t) * channels + c]);
      }
    }
    sums[i] = static_cast<out_t>(sum);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

struct MergePlan {
  at::Tensor slot_of;  // (S*L,) int64
  at::Tensor lengths;  // (B,) int64
};

MergePlan plan_merge(const at::Tensor& keep, const at::Tensor& segment_ids, const MergeDims& dims,
                     cudaStream_t stream) {
  const auto long_options = segment_ids.options();
  at::Tensor scratch = at::empty({2 * dims.segments + dims.prompts}, long_options);
  MergePlan plan{at::empty({dims.segments * dims.length}, long_options),
                 at::empty({dims.prompts}, long_options)};
  int64_t* counts = scratch.mutable_data_ptr<int64_t>();
  launch_kernel(merge_segments_plan_kernel, 1, kPlanThreads, 0, stream,
      keep.const_data_ptr<bool>(), segment_ids.const_data_ptr<int64_t>(), dims.segments,
      dims.length, dims.prompts, dims.tokens, counts, counts + dims.segments,
      counts + 2 * dims.segments, plan.slot_of.mutable_data_ptr<int64_t>(),
      plan.lengths.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return plan;
}

// Calls body(Unit{}) with the widest raw unit that tiles every row of `row_bytes` bytes at the
// given addresses: 16 bytes when aligned, else the element itself.
template <typename Body>
void dispatch_copy_unit(int64_t element_size, int64_t row_bytes,
                        std::initializer_list<const void*> ptrs, Body&& body) {
  bool vector = row_bytes % kVectorBytes == 0;
  for (const void* p : ptrs) vector = vector && cuda_rowwise::is_aligned(p, kVectorBytes);
  if (vector) {
    body(uint4{});
  } else if (element_size == 2) {
    body(uint16_t{});
  } else if (element_size == 4) {
    body(uint32_t{});
  } else {
    TORCH_INTERNAL_ASSERT(element_size == 8, "unexpected element size ", element_size);
    body(uint64_t{});
  }
}

// Blocks of a grid-stride kernel of kCopyThreads threads for `warp_tasks` warp-sized tasks: at
// most those resident at once (more would only queue a second wave behind the first).
template <typename Kernel>
int64_t copy_blocks(Kernel kernel, int64_t warp_tasks) {
  return cuda_rowwise::grid_stride_blocks(kernel, kCopyThreads,
                                          (warp_tasks + kCopyWarps - 1) / kCopyWarps);
}

// Whether each copy block can plan in shared memory (one thread per segment and per prompt, the
// keep mask and its bits staged there).
bool fused_plan_fits(const MergeDims& dims) {
  return dims.segments <= kFusedMaxSegments && dims.prompts <= kFusedMaxSegments &&
         dims.segments * dims.length <= kFusedKeepBytes &&
         dims.segments * keep_chunks(dims.length) <= kFusedMaskWords;
}

// embeds (S, L, C), keep (S, L) bool, segment_ids (S,) int64, pad (C,) or (T, C) ->
// merged (B, T, C) in embeds' dtype, lengths (B,) int64.
std::tuple<at::Tensor, at::Tensor> merge_segments_cuda(const at::Tensor& embeds,
                                                       const at::Tensor& keep,
                                                       const at::Tensor& segment_ids,
                                                       int64_t num_prompts, int64_t max_tokens,
                                                       const at::Tensor& pad) {
  const MergeDims dims = check_merge_args(embeds, keep, segment_ids, num_prompts, max_tokens, pad);
  check_kernel_device(embeds, "embeds");
  const c10::cuda::CUDAGuard guard(embeds.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor embeds_c = embeds.contiguous();
  const at::Tensor keep_c = keep.contiguous();
  const at::Tensor ids_c = segment_ids.contiguous();
  const at::Tensor pad_c = pad.contiguous();
  at::Tensor merged = at::empty({dims.prompts, dims.tokens, dims.channels}, embeds.options());

  const int64_t token_rows = dims.segments * dims.length;
  const int64_t tasks = token_rows + dims.prompts * dims.tokens;
  const int64_t element_size = embeds.element_size();
  const int64_t row_bytes = dims.channels * element_size;
  const bool fused = fused_plan_fits(dims) && tasks > 0 && row_bytes > 0;
  MergePlan plan;
  if (fused) {
    plan.lengths = at::empty({dims.prompts}, segment_ids.options());
  } else {
    plan = plan_merge(keep_c, ids_c, dims, stream);
  }
  if (tasks == 0 || row_bytes == 0) return {merged, plan.lengths};
  dispatch_copy_unit(element_size, row_bytes,
                     {embeds_c.const_data_ptr(), pad_c.const_data_ptr(), merged.const_data_ptr()},
                     [&](auto unit) {
    using Unit = decltype(unit);
    const int64_t units = row_bytes / static_cast<int64_t>(sizeof(Unit));
    if (fused) {
      const auto kernel = merge_segments_fused_kernel<Unit>;
      launch_kernel(kernel, static_cast<unsigned>(copy_blocks(kernel, tasks)), kCopyThreads, 0,
          stream, static_cast<const Unit*>(embeds_c.const_data_ptr()), keep_c.const_data_ptr<bool>(),
          ids_c.const_data_ptr<int64_t>(), static_cast<const Unit*>(pad_c.const_data_ptr()),
          pad_c.dim() == 2, dims.segments, dims.length, dims.prompts, dims.tokens, units,
          plan.lengths.mutable_data_ptr<int64_t>(), static_cast<Unit*>(merged.mutable_data_ptr()));
    } else {
      const auto kernel = merge_segments_kernel<Unit>;
      launch_kernel(kernel, static_cast<unsigned>(copy_blocks(kernel, tasks)), kCopyThreads, 0,
          stream, static_cast<const Unit*>(embeds_c.const_data_ptr()), ids_c.const_data_ptr<int64_t>(),
          plan.slot_of.const_data_ptr<int64_t>(), plan.lengths.const_data_ptr<int64_t>(),
          static_cast<const Unit*>(pad_c.const_data_ptr()), pad_c.dim() == 2, dims.length,
          dims.prompts, dims.tokens, units, token_rows,
          static_cast<Unit*>(merged.mutable_data_ptr()));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {merged, plan.lengths};
}

// grad_merged (B, T, C), keep (S, L), segment_ids (S,), lengths (B,) ->
// (grad_embeds (S, L, C), grad_pad (T, C) if pad_per_slot else (C,)).
// The slots are re-planned from keep and segment_ids on the GPU; `lengths` is checked for shape
// only (reading its values to compare them would need a host synchronisation), and the pad
// gradient uses the re-planned lengths, so grad_embeds and grad_pad split grad_merged exactly.
std::tuple<at::Tensor, at::Tensor> merge_segments_backward_cuda(const at::Tensor& grad_merged,
                                                                const at::Tensor& keep,
                                                                const at::Tensor& segment_ids,
                                                                const at::Tensor& lengths,
                                                                bool pad_per_slot) {
  const MergeDims dims = check_merge_backward_args(grad_merged, keep, segment_ids, lengths);
  check_kernel_device(grad_merged, "grad_merged");
  const c10::cuda::CUDAGuard guard(grad_merged.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor grad_c = grad_merged.contiguous();
  const at::Tensor keep_c = keep.contiguous();
  const at::Tensor ids_c = segment_ids.contiguous();
  at::Tensor grad_embeds =
      at::empty({dims.segments, dims.length, dims.channels}, grad_merged.options());
  at::Tensor grad_pad = pad_per_slot ? at::empty({dims.tokens, dims.channels}, grad_merged.options())
                                     : at::empty({dims.channels}, grad_merged.options());

  const int64_t token_rows = dims.segments * dims.length;
  const int64_t element_size = grad_merged.element_size();
  const int64_t row_bytes = dims.channels * element_size;
  // The fused gather also writes the re-planned lengths; without token rows to gather there is
  // no launch to write them from, so the plan kernel does.
  const bool fused = fused_plan_fits(dims) && token_rows > 0 && row_bytes > 0;
  MergePlan plan;
  if (fused) {
    plan.lengths = at::empty({dims.prompts}, segment_ids.options());
  } else {
    plan = plan_merge(keep_c, ids_c, dims, stream);
  }
  if (token_rows > 0 && row_bytes > 0) {
    dispatch_copy_unit(element_size, row_bytes,
                       {grad_c.const_data_ptr(), grad_embeds.const_data_ptr()}, [&](auto unit) {
      using Unit = decltype(unit);
      const int64_t units = row_bytes / static_cast<int64_t>(sizeof(Unit));
      if (fused) {
        const auto kernel = merge_segments_fused_gather_grad_kernel<Unit>;
        launch_kernel(kernel, static_cast<unsigned>(copy_blocks(kernel, token_rows)), kCopyThreads,
            0, stream, static_cast<const Unit*>(grad_c.const_data_ptr()),
            keep_c.const_data_ptr<bool>(), ids_c.const_data_ptr<int64_t>(), dims.segments,
            dims.length, dims.prompts, dims.tokens, units,
            plan.lengths.mutable_data_ptr<int64_t>(),
            static_cast<Unit*>(grad_embeds.mutable_data_ptr()));
      } else {
        const auto kernel = merge_segments_gather_grad_kernel<Unit>;
        launch_kernel(kernel, static_cast<unsigned>(copy_blocks(kernel, token_rows)), kCopyThreads,
            0, stream, static_cast<const Unit*>(grad_c.const_data_ptr()),
            ids_c.const_data_ptr<int64_t>(), plan.slot_of.const_data_ptr<int64_t>(), dims.length,
            dims.tokens, units, token_rows, static_cast<Unit*>(grad_embeds.mutable_data_ptr()));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  const int64_t slot_elems = dims.tokens * dims.channels;
  // No slots (T = 0): a (C,) pad still gets its (empty) sum, zeros, as on CPU.
  if (slot_elems == 0) return {grad_embeds, grad_pad.zero_()};
  // A (C,) pad sums 32 slots per fp32 partial row: the partials' write and re-read (T x C fp32
  // with one slot per row, as much traffic as the op's minimum at fp16) shrink 32-fold.
  constexpr int64_t kPadSlotsPerRow = 32;
  const int64_t slots_per_row = pad_per_slot ? 1 : kPadSlotsPerRow;
  const int64_t sum_rows = (dims.tokens + slots_per_row - 1) / slots_per_row;
  const int64_t pad_warps = (sum_rows * dims.channels + kWarpSize - 1) / kWarpSize;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_merged.scalar_type(),
                                  "merge_segments_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (pad_per_slot) {
      const auto kernel = merge_segments_pad_grad_kernel<scalar_t, scalar_t>;
      launch_kernel(kernel, static_cast<unsigned>(copy_blocks(kernel, pad_warps)), kCopyThreads,
                    0, stream,
              grad_c.const_data_ptr<scalar_t>(), plan.lengths.const_data_ptr<int64_t>(),
              dims.prompts, dims.tokens, dims.channels, slots_per_row,
              grad_pad.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      at::Tensor row_sums =
          at::empty({sum_rows, dims.channels},
                    grad_merged.options().dtype(accumulate_dtype(grad_merged.scalar_type())));
      const auto kernel = merge_segments_pad_grad_kernel<scalar_t, acc_t>;
      launch_kernel(kernel, static_cast<unsigned>(copy_blocks(kernel, pad_warps)), kCopyThreads,
                    0, stream,
              grad_c.const_data_ptr<scalar_t>(), plan.lengths.const_data_ptr<int64_t>(),
              dims.prompts, dims.tokens, dims.channels, slots_per_row,
              row_sums.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cuda_rowwise::launch_column_sum(row_sums.const_data_ptr<acc_t>(), sum_rows,
                                      dims.channels, grad_pad.mutable_data_ptr<scalar_t>());
    }
  });
  return {grad_embeds, grad_pad};
}

}  // namespace

LINFUSION_OPS_CUDA_IMPL(m) {
  m.impl("merge_segments", &merge_segments_cuda);
  m.impl("merge_segments_backward", &merge_segments_backward_cuda);
}

}  // namespace linfusion_ops
