// Fused leaky_relu(layer_norm(x)) over the last dim on CPU, with its backward. LinFusion's
// kernel-function MLP (Linear -> LayerNorm -> LeakyReLU -> Linear) runs this on every token.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"

namespace linfusion_ops {
namespace {

// The build targets baseline x86-64 (SSE2), and the row loops do several flops per element read
// from cache, so the vector width decides their speed: GCC compiles the row functions once per
// target below and the loader picks the best one the CPU supports.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LINFUSION_OPS_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LINFUSION_OPS_CPU_CLONES
#endif

// Interleaved partial sums of a row reduction. A plain running sum is a serial dependency the
// compiler may not reorder; kLanes independent sums, combined in a fixed order, vectorize and
// give the same result on every run.
constexpr int64_t kLanes = 16;

template <typename acc_t, typename Term>
inline acc_t lane_sum(int64_t n, const Term& term) {
  acc_t lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += term(c + j);
  }
  acc_t total = 0;
  for (; c < n; ++c) total += term(c);
  for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

// The pre-activation y = (x - mean) * rstd * weight + bias, written once so that the backward's
// recomputation takes the LeakyReLU branch the forward took.
template <typename acc_t>
inline acc_t pre_activation(acc_t xhat, acc_t weight, acc_t bias) {
  return xhat * weight + bias;
}

template <typename acc_t>
inline acc_t leaky_relu(acc_t y, acc_t negative_slope) {
  return y > acc_t(0) ? y : y * negative_slope;
}

// Rows per parallel task, so that a task touches about this many elements.
constexpr int64_t kGrainElements = 32768;

// The weight / bias gradients are summed over rows in fixed chunks of rows: at most kMaxChunks
// chunks of at least kGrainElements elements. The chunking depends only on the shape, so the
// result is the same for every thread count.
constexpr int64_t kMaxChunks = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The kernels write row-major (rows, C). Results take the layout of empty_like(like), as the fake
// kernels do; a permuted layout gets a copy.
template <typename Kernel>
at::Tensor into_layout_of(const at::Tensor& like, const Kernel& kernel) {
  at::Tensor result = at::empty_like(like);
  if (result.is_contiguous()) {
    kernel(result);
    return result;
  }
  at::Tensor row_major = at::empty(like.sizes(), like.options());
  kernel(row_major);
  result.copy_(row_major);
  return result;
}

// Rows [begin, end) of the forward. x, out (rows, C); weight, bias (C,) and mean, rstd (rows,)
// in acc_t; row: C scratch values.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
LINFUSION_OPS_CPU_CLONES void forward_rows(const scalar_t* x, const acc_t* __restrict weight,
                                           const acc_t* __restrict bias, scalar_t* out,
                                           acc_t* mean, acc_t* rstd, acc_t* __restrict row,
                                           int64_t begin, int64_t end, int64_t channels,
                                           acc_t eps, acc_t slope) {
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(channels);
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* __restrict x_row = x + r * channels;
    // Reduced-precision rows are widened once; fp32 / fp64 rows are read in place.
    const acc_t* __restrict xr = row;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      xr = x_row;
    } else {
      for (int64_t c = 0; c < channels; ++c) row[c] = static_cast<acc_t>(x_row[c]);
    }
    // Two passes (mean, then squared deviations): no cancellation for rows far from zero.
    const acc_t m = lane_sum<acc_t>(channels, [&](int64_t c) { return xr[c]; }) * inv_c;
    const acc_t var = lane_sum<acc_t>(channels, [&](int64_t c) {
                        const acc_t d = xr[c] - m;
                        return d * d;
                      }) *
                      inv_c;
    const acc_t rs = acc_t(1) / std::sqrt(var + eps);
    scalar_t* __restrict out_row = out + r * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t y = pre_activation((xr[c] - m) * rs, weight[c], bias[c]);
      out_row[c] = static_cast<scalar_t>(leaky_relu(y, slope));
    }
    mean[r] = m;
    rstd[r] = rs;
  }
}

// Rows [begin, end) of the backward. grad_out, x, grad_x (rows, C); weight, bias (C,), mean,
// rstd (rows,) in acc_t; dw, db (C,): this chunk's weight / bias gradient sums, added to;
// scratch: 2 C values.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
LINFUSION_OPS_CPU_CLONES void backward_rows(const scalar_t* grad_out, const scalar_t* x,
                                            const acc_t* __restrict weight,
                                            const acc_t* __restrict bias, const acc_t* mean,
                                            const acc_t* rstd, scalar_t* grad_x,
                                            acc_t* __restrict dw, acc_t* __restrict db,
                                            acc_t* __restrict scratch, int64_t begin, int64_t end,
                                            int64_t channels, acc_t slope) {
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(channels);
  acc_t* __restrict xhat = scratch;
  acc_t* __restrict dxhat = scratch + channels;  // dL/dy * weight
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* __restrict x_row = x + r * channels;
    const scalar_t* __restrict g_row = grad_out + r * channels;
    const acc_t m = mean[r];
    const acc_t rs = rstd[r];
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t xh = (static_cast<acc_t>(x_row[c]) - m) * rs;
      const acc_t y = pre_activation(xh, weight[c], bias[c]);
      const acc_t g = static_cast<acc_t>(g_row[c]) * (y > acc_t(0) ? acc_t(1) : slope);
      dw[c] += g * xh;
      db[c] += g;
      xhat[c] = xh;
      dxhat[c] = g * weight[c];
    }
    // dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    const acc_t mean_dxhat = lane_sum<acc_t>(channels, [&](int64_t c) { return dxhat[c]; }) *
                             inv_c;
    const acc_t mean_dxhat_xhat =
        lane_sum<acc_t>(channels, [&](int64_t c) { return dxhat[c] * xhat[c]; }) * inv_c;
    scalar_t* __restrict gx_row = grad_x + r * channels;
    for (int64_t c = 0; c < channels; ++c) {
      gx_row[c] = static_cast<scalar_t>(rs * (dxhat[c] - mean_dxhat - xhat[c] * mean_dxhat_xhat));
    }
  }
}

// x (rows, C), weight/bias (C,) in acc_t -> out (rows, C), mean/rstd (rows,) in acc_t.
template <typename scalar_t>
void forward_kernel(const scalar_t* x, const at::opmath_type<scalar_t>* weight,
                    const at::opmath_type<scalar_t>* bias, scalar_t* out,
                    at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* rstd,
                    int64_t rows, int64_t channels, double eps, double negative_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / channels);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(channels);
    forward_rows<scalar_t>(x, weight, bias, out, mean, rstd, row.data(), begin, end, channels,
                           static_cast<acc_t>(eps), static_cast<acc_t>(negative_slope));
  });
}

// grad_out, x (rows, C); weight/bias (C,), mean/rstd (rows,) in acc_t -> grad_x (rows, C) and
// grad_weight / grad_bias (C,) in acc_t.
template <typename scalar_t>
void backward_kernel(const scalar_t* grad_out, const scalar_t* x,
                     const at::opmath_type<scalar_t>* weight,
                     const at::opmath_type<scalar_t>* bias, const at::opmath_type<scalar_t>* mean,
                     const at::opmath_type<scalar_t>* rstd, scalar_t* grad_x,
                     at::opmath_type<scalar_t>* grad_weight, at::opmath_type<scalar_t>* grad_bias,
                     int64_t rows, int64_t channels, double negative_slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t chunk_rows = std::max(ceil_div(rows, kMaxChunks),
                                      std::max<int64_t>(1, kGrainElements / channels));
  const int64_t chunks = ceil_div(rows, chunk_rows);
  // Per-chunk partial sums: chunks x (grad_weight, grad_bias) x C.
  std::vector<acc_t> partial(static_cast<size_t>(chunks * 2 * channels), acc_t(0));

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> scratch(2 * channels);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* dw = partial.data() + chunk * 2 * channels;
      backward_rows<scalar_t>(grad_out, x, weight, bias, mean, rstd, grad_x, dw, dw + channels,
                              scratch.data(), chunk * chunk_rows,
                              std::min(rows, (chunk + 1) * chunk_rows), channels,
                              static_cast<acc_t>(negative_slope));
    }
  });

  // Sum the chunks in chunk order, in parallel over channels.
  at::parallel_for(0, channels, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      acc_t dw = 0;
      acc_t db = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        dw += partial[chunk * 2 * channels + c];
        db += partial[chunk * 2 * channels + channels + c];
      }
      grad_weight[c] = dw;
      grad_bias[c] = db;
    }
  });
}

// x (..., C), weight/bias (C,) -> (out like x, mean, rstd of shape x.shape[:-1] in the
// accumulation dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_leaky_relu_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
    double negative_slope) {
  const int64_t channels = check_layer_norm_args(x, weight, bias, eps);
  const auto acc = accumulate_dtype(x.scalar_type());
  const at::Tensor x_c = x.contiguous();
  const at::Tensor weight_acc = weight.to(acc).contiguous();
  const at::Tensor bias_acc = bias.to(acc).contiguous();
  const int64_t rows = x_c.numel() / channels;
  const auto stats_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor mean = at::empty(stats_shape, x.options().dtype(acc));
  at::Tensor rstd = at::empty(stats_shape, x.options().dtype(acc));
  at::Tensor out = into_layout_of(x, [&](at::Tensor& out_rows) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_leaky_relu_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          forward_kernel<scalar_t>(
              x_c.const_data_ptr<scalar_t>(), weight_acc.const_data_ptr<acc_t>(),
              bias_acc.const_data_ptr<acc_t>(), out_rows.mutable_data_ptr<scalar_t>(),
              mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), rows, channels, eps,
              negative_slope);
        });
  });
  return {out, mean, rstd};
}

// (grad_x like x, grad_weight like weight, grad_bias like bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_leaky_relu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& rstd,
    double negative_slope) {
  const int64_t channels = check_layer_norm_backward_args(grad_out, x, weight, bias, mean, rstd);
  const auto acc = accumulate_dtype(x.scalar_type());
  const at::Tensor x_c = x.contiguous();
  const at::Tensor grad_out_c = grad_out.contiguous();
  const at::Tensor mean_c = mean.contiguous();
  const at::Tensor rstd_c = rstd.contiguous();
  const at::Tensor weight_acc = weight.to(acc).contiguous();
  const at::Tensor bias_acc = bias.to(acc).contiguous();
  const int64_t rows = x_c.numel() / channels;
  at::Tensor grad_weight_acc = at::empty({channels}, x.options().dtype(acc));
  at::Tensor grad_bias_acc = at::empty({channels}, x.options().dtype(acc));
  at::Tensor grad_x = into_layout_of(x, [&](at::Tensor& grad_x_rows) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_leaky_relu_backward_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          backward_kernel<scalar_t>(
              grad_out_c.const_data_ptr<scalar_t>(), x_c.const_data_ptr<scalar_t>(),
              weight_acc.const_data_ptr<acc_t>(), bias_acc.const_data_ptr<acc_t>(),
              mean_c.const_data_ptr<acc_t>(), rstd_c.const_data_ptr<acc_t>(),
              grad_x_rows.mutable_data_ptr<scalar_t>(), grad_weight_acc.mutable_data_ptr<acc_t>(),
              grad_bias_acc.mutable_data_ptr<acc_t>(), rows, channels, negative_slope);
        });
  });
  return {grad_x, grad_weight_acc.to(weight.scalar_type()), grad_bias_acc.to(bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(linfusion_ops, CPU, m) {
  m.impl("layer_norm_leaky_relu", &layer_norm_leaky_relu_cpu);
  m.impl("layer_norm_leaky_relu_backward", &layer_norm_leaky_relu_backward_cpu);
}

}  // namespace linfusion_ops
