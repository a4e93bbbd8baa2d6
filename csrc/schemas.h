// Every op schema of the library, in one list shared by torch.ops.linfusion_ops (csrc/ops.cpp)
// and the CUDA emulation's namespaces (csrc/emu/module.cpp).
#pragma once

#include <torch/library.h>

namespace linfusion_ops {

inline void define_schemas(torch::Library& m) {
  // Linear attention, pass 1. k: (B, Nk, H*Dk), v: (B, Nk, H*Dv), key_padding_mask: (B, Nk) bool
  // (True = keep). Returns state (B, H, Dk, Dv) and key_mean (B, H, Dk), both scaled by 1/n where
  // n is the number of kept keys; fp32 (fp64 for fp64 inputs).
  m.def(
      "linear_attention_state(Tensor k, Tensor v, int heads, str feature_map, "
      "Tensor? key_padding_mask) -> (Tensor, Tensor)");
  // Gradients of pass 1: (grad_k, grad_v) from (grad_state, grad_key_mean).
  m.def(
      "linear_attention_state_backward(Tensor grad_state, Tensor grad_key_mean, Tensor k, "
      "Tensor v, int heads, str feature_map, Tensor? key_padding_mask) -> (Tensor, Tensor)");
  // Linear attention, pass 2. q: (B, Nq, H*Dk) -> o: (B, Nq, H*Dv) in q's dtype,
  // o_i = phi(q_i)^T state / (phi(q_i) . key_mean + eps).
  m.def(
      "linear_attention_apply(Tensor q, Tensor state, Tensor key_mean, int heads, "
      "str feature_map, float eps) -> Tensor");
  // Gradients of pass 2: (grad_q, grad_state, grad_key_mean); o is recomputed, not saved.
  m.def(
      "linear_attention_apply_backward(Tensor grad_out, Tensor q, Tensor state, "
      "Tensor key_mean, int heads, str feature_map, float eps) -> (Tensor, Tensor, Tensor)");

  // leaky_relu(layer_norm(x)) over the last dim. x: (..., C), weight/bias: (C,).
  // Returns (out like x, mean, rstd) with mean/rstd of shape x.shape[:-1], fp32 (fp64 for fp64).
  m.def(
      "layer_norm_leaky_relu(Tensor x, Tensor weight, Tensor bias, float eps, "
      "float negative_slope) -> (Tensor, Tensor, Tensor)");
  // (grad_x, grad_weight, grad_bias); grad_weight/grad_bias are reduced deterministically.
  m.def(
      "layer_norm_leaky_relu_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, "
      "Tensor mean, Tensor rstd, float negative_slope) -> (Tensor, Tensor, Tensor)");

  // LongAlign merge. embeds: (S, L, C), keep: (S, L) bool, segment_ids: (S,) int64 in
  // [0, num_prompts), pad: (C,) or (max_tokens, C). Returns merged (num_prompts, max_tokens, C)
  // and lengths (num_prompts,) int64: the number of token slots (<= max_tokens) filled from
  // segments; slots at and after lengths[b] hold the pad.
  m.def(
      "merge_segments(Tensor embeds, Tensor keep, Tensor segment_ids, int num_prompts, "
      "int max_tokens, Tensor pad) -> (Tensor, Tensor)");
  // (grad_embeds (S, L, C), grad_pad shaped like pad: (C,) unless pad_per_slot, then (T, C)).
  m.def(
      "merge_segments_backward(Tensor grad_merged, Tensor keep, Tensor segment_ids, "
      "Tensor lengths, bool pad_per_slot) -> (Tensor, Tensor)");
}

}  // namespace linfusion_ops
