// Every schema of the linfusion_ops library, and the Python module's helpers.
// Kernels live in csrc/cpu/*.cpp and csrc/cuda/*.cu and only add TORCH_LIBRARY_IMPL blocks.

#include <torch/extension.h>

#include <sstream>
#include <string>
#include <vector>

#ifdef LINFUSION_OPS_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#ifndef LINFUSION_OPS_VERSION
#define LINFUSION_OPS_VERSION "0.0.0+unknown"
#endif
#ifndef LINFUSION_OPS_CUDA_ARCHS
#define LINFUSION_OPS_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(linfusion_ops, m) {
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

namespace {

std::vector<std::string> split_archs(const std::string& list) {
  std::vector<std::string> archs;
  std::stringstream stream(list);
  std::string item;
  while (std::getline(stream, item, ';')) {
    if (!item.empty()) archs.push_back(item);
  }
  return archs;
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = LINFUSION_OPS_VERSION;
  info["torch"] = TORCH_VERSION;
#ifdef LINFUSION_OPS_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                         std::to_string((CUDART_VERSION % 1000) / 10);
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
  info["archs"] = split_archs(LINFUSION_OPS_CUDA_ARCHS);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "linfusion_ops compiled kernels (ops are registered under torch.ops.linfusion_ops)";
  m.def("build_info", &build_info,
        "Dict describing this build: version, torch, cuda (bool), cuda_version, archs.");
}
