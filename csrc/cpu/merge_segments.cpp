// LongAlign's segment merge on CPU: the kept tokens of each prompt's segments, concatenated in
// segment order and truncated to the token budget, the remaining slots filled with the pad.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common.h"

namespace linfusion_ops {
namespace {

// Where every output slot comes from: the flat token index s * L + l it holds, or -1 for a pad
// slot. Forward and backward build the same map from (keep, segment_ids).
struct SlotMap {
  std::vector<int64_t> source;   // (B * T,)
  std::vector<int64_t> lengths;  // (B,) filled slots, <= T
};

SlotMap build_slot_map(const at::Tensor& keep, const at::Tensor& segment_ids, int64_t prompts,
                       int64_t tokens) {
  const at::Tensor keep_c = keep.contiguous();
  const at::Tensor ids_c = segment_ids.contiguous();
  const bool* keep_ptr = keep_c.const_data_ptr<bool>();
  const int64_t* ids = ids_c.const_data_ptr<int64_t>();
  const int64_t segments = keep.size(0);
  const int64_t length = keep.size(1);
  for (int64_t s = 0; s < segments; ++s) {
    TORCH_CHECK(ids[s] >= 0 && ids[s] < prompts, "linfusion_ops: segment_ids must be in [0, ",
                "num_prompts = ", prompts, "), got segment_ids[", s, "] = ", ids[s]);
  }

  // Each segment's first slot in its prompt: the kept tokens of the earlier segments of the
  // same prompt come first.
  std::vector<int64_t> kept(segments);
  at::parallel_for(0, segments, 64, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const bool* row = keep_ptr + s * length;
      kept[s] = std::count(row, row + length, true);
    }
  });
  std::vector<int64_t> start(segments);
  std::vector<int64_t> filled(prompts, 0);
  for (int64_t s = 0; s < segments; ++s) {
    start[s] = filled[ids[s]];
    filled[ids[s]] += kept[s];
  }

  SlotMap map{std::vector<int64_t>(prompts * tokens, -1), std::vector<int64_t>(prompts)};
  for (int64_t b = 0; b < prompts; ++b) map.lengths[b] = std::min(filled[b], tokens);
  at::parallel_for(0, segments, 64, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      int64_t* prompt_slots = map.source.data() + ids[s] * tokens;
      const bool* row = keep_ptr + s * length;
      int64_t slot = start[s];
      for (int64_t l = 0; l < length && slot < tokens; ++l) {
        if (row[l]) prompt_slots[slot++] = s * length + l;
      }
    }
  });
  return map;
}

// Rows per parallel task when copying rows of C elements.
int64_t copy_grain(int64_t channels) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(channels, 1));
}

// embeds (S, L, C), keep (S, L) bool, segment_ids (S,) int64, pad (C,) or (T, C)
// -> merged (B, T, C) in embeds' dtype, lengths (B,) int64.
std::tuple<at::Tensor, at::Tensor> merge_segments_cpu(const at::Tensor& embeds,
                                                      const at::Tensor& keep,
                                                      const at::Tensor& segment_ids,
                                                      int64_t num_prompts, int64_t max_tokens,
                                                      const at::Tensor& pad) {
  const MergeDims dims = check_merge_args(embeds, keep, segment_ids, num_prompts, max_tokens, pad);
  const SlotMap map = build_slot_map(keep, segment_ids, dims.prompts, dims.tokens);

  // Rows are copied whole, so only the channel dim needs to be contiguous.
  const at::Tensor embeds_c = channels_contiguous(embeds);
  const at::Tensor pad_c = pad.contiguous();
  at::Tensor merged = at::empty({dims.prompts, dims.tokens, dims.channels}, embeds.options());
  const int64_t row_bytes = dims.channels * embeds.element_size();
  const auto* src = static_cast<const char*>(embeds_c.const_data_ptr());
  const int64_t stride_s = embeds_c.stride(0) * embeds.element_size();
  const int64_t stride_l = embeds_c.stride(1) * embeds.element_size();
  const auto* pad_ptr = static_cast<const char*>(pad_c.const_data_ptr());
  const bool pad_per_slot = pad.dim() == 2;
  auto* dst = static_cast<char*>(merged.mutable_data_ptr());
  at::parallel_for(0, dims.prompts * dims.tokens, copy_grain(dims.channels),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t i = begin; i < end; ++i) {
                       const int64_t token = map.source[i];
                       const char* row;
                       if (token >= 0) {
                         row = src + (token / dims.length) * stride_s +
                               (token % dims.length) * stride_l;
                       } else {
                         row = pad_ptr + (pad_per_slot ? (i % dims.tokens) * row_bytes : 0);
                       }
                       std::memcpy(dst + i * row_bytes, row, row_bytes);
                     }
                   });
  at::Tensor lengths = at::empty({dims.prompts}, embeds.options().dtype(at::kLong));
  std::copy(map.lengths.begin(), map.lengths.end(), lengths.mutable_data_ptr<int64_t>());
  return {merged, lengths};
}

// Sums of the pad-slot gradients (slots t >= lengths[b]) in a fixed order (prompt, then slot),
// whatever the thread count. grad (B, T, C) with contiguous channels -> (T, C) or (C,).
template <typename scalar_t>
void reduce_pad_grad(const at::Tensor& grad, const std::vector<int64_t>& lengths,
                     bool pad_per_slot, at::Tensor& grad_pad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t prompts = grad.size(0);
  const int64_t tokens = grad.size(1);
  const int64_t channels = grad.size(2);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const int64_t stride_b = grad.stride(0);
  const int64_t stride_t = grad.stride(1);
  scalar_t* out = grad_pad.mutable_data_ptr<scalar_t>();
  if (pad_per_slot) {
    at::parallel_for(0, tokens, copy_grain(channels), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(channels);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t b = 0; b < prompts; ++b) {
          if (t < lengths[b]) continue;
          const scalar_t* row = g + b * stride_b + t * stride_t;
          for (int64_t c = 0; c < channels; ++c) sum[c] += static_cast<acc_t>(row[c]);
        }
        for (int64_t c = 0; c < channels; ++c) out[t * channels + c] = static_cast<scalar_t>(sum[c]);
      }
    });
    return;
  }
  // One pad vector for every slot: parallel over blocks of channels, each summing all pad slots.
  constexpr int64_t kBlock = 64;
  at::parallel_for(0, (channels + kBlock - 1) / kBlock, 1, [&](int64_t begin, int64_t end) {
    acc_t sum[kBlock];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t c0 = block * kBlock;
      const int64_t width = std::min(kBlock, channels - c0);
      std::fill(sum, sum + width, acc_t(0));
      for (int64_t b = 0; b < prompts; ++b) {
        for (int64_t t = lengths[b]; t < tokens; ++t) {
          const scalar_t* row = g + b * stride_b + t * stride_t + c0;
          for (int64_t c = 0; c < width; ++c) sum[c] += static_cast<acc_t>(row[c]);
        }
      }
      for (int64_t c = 0; c < width; ++c) out[c0 + c] = static_cast<scalar_t>(sum[c]);
    }
  });
}

// grad_merged (B, T, C), keep (S, L), segment_ids (S,), lengths (B,) from the forward ->
// grad_embeds (S, L, C) (zero for dropped and truncated tokens), grad_pad (T, C) if
// pad_per_slot else (C,).
std::tuple<at::Tensor, at::Tensor> merge_segments_backward_cpu(const at::Tensor& grad_merged,
                                                               const at::Tensor& keep,
                                                               const at::Tensor& segment_ids,
                                                               const at::Tensor& lengths,
                                                               bool pad_per_slot) {
  const MergeDims dims = check_merge_backward_args(grad_merged, keep, segment_ids, lengths);
  const SlotMap map = build_slot_map(keep, segment_ids, dims.prompts, dims.tokens);
  const at::Tensor lengths_c = lengths.contiguous();
  TORCH_CHECK(std::equal(map.lengths.begin(), map.lengths.end(),
                         lengths_c.const_data_ptr<int64_t>()),
              "linfusion_ops: lengths must be the forward's output for this keep and "
              "segment_ids, got ", lengths);

  const at::Tensor grad = channels_contiguous(grad_merged);
  const int64_t elem = grad.element_size();
  const int64_t row_bytes = dims.channels * elem;
  const auto* src = static_cast<const char*>(grad.const_data_ptr());
  const int64_t stride_b = grad.stride(0) * elem;
  const int64_t stride_t = grad.stride(1) * elem;
  // Each token row is written once: the gradient of the slot it filled, or zeros (dropped or
  // truncated), instead of zero-filling (S, L, C) and then scattering over it.
  std::vector<int64_t> slot_of_token(dims.segments * dims.length, -1);
  for (int64_t i = 0; i < dims.prompts * dims.tokens; ++i) {
    if (map.source[i] >= 0) slot_of_token[map.source[i]] = i;
  }
  at::Tensor grad_embeds =
      at::empty({dims.segments, dims.length, dims.channels}, grad_merged.options());
  auto* dst = static_cast<char*>(grad_embeds.mutable_data_ptr());
  at::parallel_for(0, dims.segments * dims.length, copy_grain(dims.channels),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t token = begin; token < end; ++token) {
                       const int64_t i = slot_of_token[token];
                       char* row = dst + token * row_bytes;
                       if (i < 0) {
                         std::memset(row, 0, row_bytes);
                       } else {
                         std::memcpy(row,
                                     src + (i / dims.tokens) * stride_b +
                                         (i % dims.tokens) * stride_t,
                                     row_bytes);
                       }
                     }
                   });

  at::Tensor grad_pad = pad_per_slot ? at::empty({dims.tokens, dims.channels}, grad.options())
                                     : at::empty({dims.channels}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "merge_segments_backward_cpu", [&] {
                                    reduce_pad_grad<scalar_t>(grad, map.lengths, pad_per_slot,
                                                              grad_pad);
                                  });
  return {grad_embeds, grad_pad};
}

}  // namespace

TORCH_LIBRARY_IMPL(linfusion_ops, CPU, m) {
  m.impl("merge_segments", &merge_segments_cpu);
  m.impl("merge_segments_backward", &merge_segments_backward_cpu);
}

}  // namespace linfusion_ops
