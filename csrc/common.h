// Argument checks, feature maps and dtype helpers shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace linfusion_ops {

// ---------------------------------------------------------------------------------------------
// Feature maps phi of generalized linear attention.
enum class FeatureMap : int { kElu = 0, kRelu = 1, kIdentity = 2 };

inline FeatureMap parse_feature_map(const std::string& name) {
  if (name == "elu") return FeatureMap::kElu;
  if (name == "relu") return FeatureMap::kRelu;
  if (name == "identity") return FeatureMap::kIdentity;
  TORCH_CHECK(false, "linfusion_ops: feature_map must be one of 'elu', 'relu', 'identity', got '",
              name, "'");
}

// phi(x): elu(x) + 1, relu(x) or x. Computed in the accumulation type T (float or double).
template <FeatureMap F, typename T>
C10_HOST_DEVICE inline T feature_map_value(T x) {
  if constexpr (F == FeatureMap::kElu) {
    return x > T(0) ? x + T(1) : exp(x);
  } else if constexpr (F == FeatureMap::kRelu) {
    return x > T(0) ? x : T(0);
  } else {
    return x;
  }
}

// phi'(x), the factor that turns a gradient w.r.t. phi(x) into one w.r.t. x.
template <FeatureMap F, typename T>
C10_HOST_DEVICE inline T feature_map_grad(T x) {
  if constexpr (F == FeatureMap::kElu) {
    return x > T(0) ? T(1) : exp(x);
  } else if constexpr (F == FeatureMap::kRelu) {
    return x > T(0) ? T(1) : T(0);
  } else {
    return T(1);
  }
}

// Calls body.template operator()<F>() with the runtime feature map turned into a constant.
template <typename Body>
inline void dispatch_feature_map(FeatureMap feature_map, Body&& body) {
  switch (feature_map) {
    case FeatureMap::kElu:
      body.template operator()<FeatureMap::kElu>();
      break;
    case FeatureMap::kRelu:
      body.template operator()<FeatureMap::kRelu>();
      break;
    case FeatureMap::kIdentity:
      body.template operator()<FeatureMap::kIdentity>();
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// Dtypes. Accumulation (and the state, key mean, LayerNorm statistics) is fp32, or fp64 for
// fp64 inputs (gradcheck).
inline at::ScalarType accumulate_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  dtype == at::kDouble,
              "linfusion_ops: ", name, " must be float32, float16, bfloat16 or float64, got ",
              dtype);
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "linfusion_ops: ", a_name, " and ", b_name,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "linfusion_ops: ", a_name, " and ", b_name,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == dim, "linfusion_ops: ", name, " must be ", dim, "-D ", layout, ", got ",
              t.dim(), "-D tensor of shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* name,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == expected, "linfusion_ops: ", name, " dim ", dim, " (", what,
              ") must be ", expected, ", got ", t.size(dim), " (shape ", t.sizes(), ")");
}

// Token-major (B, N, C) tensors are read in place when the channel dim is contiguous, whatever
// the batch and row strides (e.g. q/k/v sliced out of one fused qkv projection).
inline at::Tensor channels_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// ---------------------------------------------------------------------------------------------
// Linear attention argument checks (shared by every backend).
struct LinearAttentionDims {
  int64_t batch;     // B
  int64_t tokens;    // N (keys for the state, queries for apply)
  int64_t heads;     // H
  int64_t head_dim;  // Dk
  int64_t value_dim; // Dv
};

inline int64_t head_width(const at::Tensor& t, int64_t heads, const char* name) {
  TORCH_CHECK(heads > 0, "linfusion_ops: heads must be positive, got ", heads);
  TORCH_CHECK(t.size(2) % heads == 0, "linfusion_ops: ", name, " channels (", t.size(2),
              ") must be divisible by heads (", heads, ")");
  return t.size(2) / heads;
}

inline LinearAttentionDims check_state_args(const at::Tensor& k, const at::Tensor& v,
                                            int64_t heads,
                                            const c10::optional<at::Tensor>& key_padding_mask) {
  check_dim(k, 3, "k", "(batch, tokens, heads * head_dim)");
  check_dim(v, 3, "v", "(batch, tokens, heads * head_dim)");
  check_floating(k, "k");
  check_same_dtype(k, "k", v, "v");
  check_same_device(k, "k", v, "v");
  check_size(v, 0, k.size(0), "v", "batch, as in k");
  check_size(v, 1, k.size(1), "v", "tokens, as in k");
  LinearAttentionDims dims{k.size(0), k.size(1), heads, head_width(k, heads, "k"),
                           head_width(v, heads, "v")};
  if (key_padding_mask.has_value()) {
    const auto& mask = *key_padding_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool,
                "linfusion_ops: key_padding_mask must be bool (True = keep), got ",
                mask.scalar_type());
    check_dim(mask, 2, "key_padding_mask", "(batch, keys)");
    check_size(mask, 0, dims.batch, "key_padding_mask", "batch, as in k");
    check_size(mask, 1, dims.tokens, "key_padding_mask", "keys, as in k");
    check_same_device(k, "k", mask, "key_padding_mask");
  }
  return dims;
}

inline void check_state_shapes(const at::Tensor& state, const at::Tensor& key_mean,
                               const LinearAttentionDims& dims, at::ScalarType input_dtype,
                               const char* state_name, const char* key_mean_name) {
  const auto acc = accumulate_dtype(input_dtype);
  TORCH_CHECK(state.dim() == 4 && state.size(0) == dims.batch && state.size(1) == dims.heads &&
                  state.size(2) == dims.head_dim && state.size(3) == dims.value_dim,
              "linfusion_ops: ", state_name, " must have shape (", dims.batch, ", ", dims.heads,
              ", ", dims.head_dim, ", ", dims.value_dim, "), got ", state.sizes());
  TORCH_CHECK(key_mean.dim() == 3 && key_mean.size(0) == dims.batch &&
                  key_mean.size(1) == dims.heads && key_mean.size(2) == dims.head_dim,
              "linfusion_ops: ", key_mean_name, " must have shape (", dims.batch, ", ",
              dims.heads, ", ", dims.head_dim, "), got ", key_mean.sizes());
  TORCH_CHECK(state.scalar_type() == acc && key_mean.scalar_type() == acc, "linfusion_ops: ",
              state_name, " and ", key_mean_name, " must be ", acc, " for ", input_dtype,
              " inputs, got ", state.scalar_type(), " and ", key_mean.scalar_type());
}

inline LinearAttentionDims check_apply_args(const at::Tensor& q, const at::Tensor& state,
                                            const at::Tensor& key_mean, int64_t heads,
                                            double eps) {
  check_dim(q, 3, "q", "(batch, tokens, heads * head_dim)");
  check_floating(q, "q");
  check_same_device(q, "q", state, "state");
  check_same_device(q, "q", key_mean, "key_mean");
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps),
              "linfusion_ops: eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(state.dim() == 4, "linfusion_ops: state must be 4-D (batch, heads, Dk, Dv), got ",
              state.dim(), "-D");
  LinearAttentionDims dims{q.size(0), q.size(1), heads, head_width(q, heads, "q"),
                           state.size(3)};
  check_state_shapes(state, key_mean, dims, q.scalar_type(), "state", "key_mean");
  return dims;
}

// Backward of the state pass: the forward's checks plus grad_state (B, H, Dk, Dv) and
// grad_key_mean (B, H, Dk) in the accumulation dtype, on k's device.
inline LinearAttentionDims check_state_backward_args(
    const at::Tensor& grad_state, const at::Tensor& grad_key_mean, const at::Tensor& k,
    const at::Tensor& v, int64_t heads, const c10::optional<at::Tensor>& key_padding_mask) {
  const auto dims = check_state_args(k, v, heads, key_padding_mask);
  check_same_device(k, "k", grad_state, "grad_state");
  check_same_device(k, "k", grad_key_mean, "grad_key_mean");
  check_state_shapes(grad_state, grad_key_mean, dims, k.scalar_type(), "grad_state",
                     "grad_key_mean");
  return dims;
}

// Backward of the apply pass: the forward's checks plus grad_out (B, Nq, H*Dv) like q.
inline LinearAttentionDims check_apply_backward_args(const at::Tensor& grad_out,
                                                     const at::Tensor& q, const at::Tensor& state,
                                                     const at::Tensor& key_mean, int64_t heads,
                                                     double eps) {
  const auto dims = check_apply_args(q, state, key_mean, heads, eps);
  check_dim(grad_out, 3, "grad_out", "(batch, tokens, heads * value_dim)");
  check_same_dtype(q, "q", grad_out, "grad_out");
  check_same_device(q, "q", grad_out, "grad_out");
  check_size(grad_out, 0, dims.batch, "grad_out", "batch, as in q");
  check_size(grad_out, 1, dims.tokens, "grad_out", "tokens, as in q");
  check_size(grad_out, 2, dims.heads * dims.value_dim, "grad_out", "heads * value_dim");
  return dims;
}

// ---------------------------------------------------------------------------------------------
// LayerNorm + LeakyReLU argument checks.
// Plain calls, not a range-for over a braced list of (tensor reference, name) pairs as before: on
// an H200 machine (torch 2.11, its own host gcc) CUDA inputs with a wrong-shaped weight crashed
// (SIGSEGV) instead of raising, while the same check raised for CPU inputs. That loop was the one
// construct only the LayerNorm checks used; that it was the cause is not established.
inline void check_layer_norm_param(const at::Tensor& x, int64_t channels, const at::Tensor& t,
                                   const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, "linfusion_ops: ", name,
              " must have shape (", channels, ",) to match x's last dim, got ", t.sizes());
  check_same_dtype(x, "x", t, name);
  check_same_device(x, "x", t, name);
}

inline int64_t check_layer_norm_params(const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& bias) {
  TORCH_CHECK(x.dim() >= 1, "linfusion_ops: x must have at least 1 dim (..., C)");
  check_floating(x, "x");
  const int64_t channels = x.size(-1);
  TORCH_CHECK(channels > 0, "linfusion_ops: x's last dim (C) must be positive");
  check_layer_norm_param(x, channels, weight, "weight");
  check_layer_norm_param(x, channels, bias, "bias");
  return channels;
}

inline int64_t check_layer_norm_args(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& bias, double eps) {
  const int64_t channels = check_layer_norm_params(x, weight, bias);
  TORCH_CHECK(eps > 0.0 && std::isfinite(eps), "linfusion_ops: eps must be finite and > 0, got ",
              eps);
  return channels;
}

// One of the statistics the forward saved: shape x.shape[:-1], the accumulation dtype.
inline void check_layer_norm_stat(const at::Tensor& x, const at::Tensor& t, const char* name) {
  const auto acc = accumulate_dtype(x.scalar_type());
  const auto stats_shape = x.sizes().slice(0, x.dim() - 1);
  TORCH_CHECK(t.sizes() == stats_shape, "linfusion_ops: ", name, " must have shape x.shape[:-1] = ",
              stats_shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, "linfusion_ops: ", name, " must be ", acc, " for ",
              x.scalar_type(), " x, got ", t.scalar_type());
  check_same_device(x, "x", t, name);
}

// The backward takes what the forward saved: mean and rstd of shape x.shape[:-1] in the
// accumulation dtype.
inline int64_t check_layer_norm_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                              const at::Tensor& weight, const at::Tensor& bias,
                                              const at::Tensor& mean, const at::Tensor& rstd) {
  const int64_t channels = check_layer_norm_params(x, weight, bias);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "linfusion_ops: grad_out must have x's shape ",
              x.sizes(), ", got ", grad_out.sizes());
  check_same_dtype(x, "x", grad_out, "grad_out");
  check_same_device(x, "x", grad_out, "grad_out");
  check_layer_norm_stat(x, mean, "mean");
  check_layer_norm_stat(x, rstd, "rstd");
  return channels;
}

// ---------------------------------------------------------------------------------------------
// merge_segments argument checks.
struct MergeDims {
  int64_t segments;  // S
  int64_t length;    // L
  int64_t channels;  // C
  int64_t prompts;   // B
  int64_t tokens;    // T
};

// keep (S, L) bool and segment_ids (S,) int64, shared by the forward and the backward. Whether
// the ids lie in [0, num_prompts) depends on their values: each backend checks it.
inline void check_merge_index_args(const at::Tensor& keep, const at::Tensor& segment_ids,
                                   int64_t segments, int64_t length) {
  TORCH_CHECK(keep.scalar_type() == at::kBool, "linfusion_ops: keep must be bool, got ",
              keep.scalar_type());
  TORCH_CHECK(keep.dim() == 2 && keep.size(0) == segments && keep.size(1) == length,
              "linfusion_ops: keep must have shape (", segments, ", ", length,
              ") to match embeds, got ", keep.sizes());
  TORCH_CHECK(segment_ids.scalar_type() == at::kLong,
              "linfusion_ops: segment_ids must be int64, got ", segment_ids.scalar_type());
  TORCH_CHECK(segment_ids.dim() == 1 && segment_ids.size(0) == segments,
              "linfusion_ops: segment_ids must have shape (", segments, ",), got ",
              segment_ids.sizes());
}

inline MergeDims check_merge_args(const at::Tensor& embeds, const at::Tensor& keep,
                                  const at::Tensor& segment_ids, int64_t num_prompts,
                                  int64_t max_tokens, const at::Tensor& pad) {
  check_dim(embeds, 3, "embeds", "(segments, length, channels)");
  check_floating(embeds, "embeds");
  MergeDims dims{embeds.size(0), embeds.size(1), embeds.size(2), num_prompts, max_tokens};
  TORCH_CHECK(num_prompts >= 0, "linfusion_ops: num_prompts must be >= 0, got ", num_prompts);
  TORCH_CHECK(max_tokens > 0, "linfusion_ops: max_tokens must be positive, got ", max_tokens);
  check_merge_index_args(keep, segment_ids, dims.segments, dims.length);
  TORCH_CHECK((pad.dim() == 1 && pad.size(0) == dims.channels) ||
                  (pad.dim() == 2 && pad.size(0) == max_tokens && pad.size(1) == dims.channels),
              "linfusion_ops: pad must have shape (", dims.channels, ",) or (", max_tokens, ", ",
              dims.channels, "), got ", pad.sizes());
  check_same_dtype(embeds, "embeds", pad, "pad");
  check_same_device(embeds, "embeds", keep, "keep");
  check_same_device(embeds, "embeds", segment_ids, "segment_ids");
  check_same_device(embeds, "embeds", pad, "pad");
  return dims;
}

// grad_merged (B, T, C), lengths (B,) int64 from the forward; S and L come from keep.
inline MergeDims check_merge_backward_args(const at::Tensor& grad_merged, const at::Tensor& keep,
                                           const at::Tensor& segment_ids,
                                           const at::Tensor& lengths) {
  check_dim(grad_merged, 3, "grad_merged", "(prompts, max_tokens, channels)");
  check_floating(grad_merged, "grad_merged");
  check_dim(keep, 2, "keep", "(segments, length)");
  MergeDims dims{keep.size(0), keep.size(1), grad_merged.size(2), grad_merged.size(0),
                 grad_merged.size(1)};
  check_merge_index_args(keep, segment_ids, dims.segments, dims.length);
  TORCH_CHECK(lengths.scalar_type() == at::kLong, "linfusion_ops: lengths must be int64, got ",
              lengths.scalar_type());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == dims.prompts,
              "linfusion_ops: lengths must have shape (", dims.prompts,
              ",) to match grad_merged, got ", lengths.sizes());
  check_same_device(grad_merged, "grad_merged", keep, "keep");
  check_same_device(grad_merged, "grad_merged", segment_ids, "segment_ids");
  check_same_device(grad_merged, "grad_merged", lengths, "lengths");
  return dims;
}

}  // namespace linfusion_ops
