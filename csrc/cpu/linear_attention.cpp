// CPU kernels of generalized linear attention (docs/design.md, op contract 1): the state pass, the apply
// pass and their backwards.
//
// Tokens are cut into chunks, and at::parallel_for runs units of (batch, group of consecutive
// chunks). For each chunk, a unit reads the token-major inputs in place (any batch / row stride;
// whole rows, so the reads are sequential), converts them to the accumulation type into per-head
// scratch buffers that stay in cache, applies phi there with ATen's vectorised kernels, and does
// the D x D products of every head with BLAS through at::mm_out / addmm_ (inside
// at::parallel_for the BLAS call runs single-threaded). Two tricks keep every product one GEMM:
//   * a column of ones appended to v turns phi(k)^T [v | 1] into [state | key_mean];
//   * the packed [state | key_mean] (Dk x (Dv+1)) gives [numerator | denominator - eps] in one
//     product with phi(q).
// Partial sums over tokens (one per unit) are reduced in token order, and chunks and groups depend
// only on the shape, so results are bitwise identical whatever the number of threads.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"

namespace linfusion_ops {
namespace {

// Tokens per work unit: large enough for efficient GEMMs and few ATen calls, small enough that
// a unit's scratch (2 to 3 * H * (Dk + Dv + 1) values per token) stays in L2/L3. Depends only
// on the shape, never on the number of threads.
int64_t chunk_tokens(const LinearAttentionDims& d) {
  const int64_t per_token = std::max<int64_t>(2 * d.heads * (d.head_dim + d.value_dim + 1), 1);
  constexpr int64_t kScratchValues = int64_t{1} << 19;
  return std::clamp<int64_t>(kScratchValues / per_token / 16 * 16, 16, 1024);
}

// A token-major (B, N, H*D) tensor whose channel dim is contiguous: row(b, t, h) points at the
// D values of head h of token t.
template <typename T>
struct TokenRows {
  T* data;
  int64_t batch_stride;
  int64_t row_stride;
  int64_t width;  // D

  T* row(int64_t batch, int64_t token, int64_t head) const {
    return data + batch * batch_stride + token * row_stride + head * width;
  }
};

template <typename T>
TokenRows<T> token_rows(T* data, const at::Tensor& t, int64_t width) {
  return {data, t.stride(0), t.stride(1), width};
}

// Token chunks of a pass over N tokens. A work unit is one group of consecutive chunks of one
// batch, all heads, so that each unit reads whole token rows (sequential memory) whatever the head
// count. Passes that reduce over tokens keep one partial sum per unit and head: capping the
// number of groups keeps that buffer small at millions of tokens.
struct Chunks {
  static constexpr int64_t kMaxGroups = 64;  // per batch
  int64_t tokens;
  int64_t size;       // tokens per chunk
  int64_t count;      // chunks per batch
  int64_t per_group;  // chunks per group
  int64_t groups;     // groups per batch

  explicit Chunks(const LinearAttentionDims& dims)
      : tokens(dims.tokens),
        size(chunk_tokens(dims)),
        count((dims.tokens + size - 1) / size),
        per_group(std::max<int64_t>((count + kMaxGroups - 1) / kMaxGroups, 1)),
        groups((count + per_group - 1) / per_group) {}

  int64_t units(int64_t batch) const { return batch * groups; }

  struct Unit {
    int64_t batch, first_token, rows;
  };

  // Calls body(chunk, first) for the chunks of unit u in token order; first marks the first one.
  template <typename Body>
  void for_each_chunk(int64_t u, Body&& body) const {
    const int64_t batch = u / groups, begin = (u % groups) * per_group;
    for (int64_t c = begin; c < std::min(count, begin + per_group); ++c) {
      body(Unit{batch, c * size, std::min(size, tokens - c * size)}, c == begin);
    }
  }
};

// out = a @ b on the first chunk of a unit, out += a @ b after.
inline void accumulate_product(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                               bool first) {
  if (first) {
    at::mm_out(out, a, b);
  } else {
    out.addmm_(a, b);
  }
}

// (rows, cols) row-major matrix over a buffer of the accumulation type (not owned).
template <typename T>
at::Tensor matrix(T* data, int64_t rows, int64_t cols) {
  return at::from_blob(data, {rows, cols},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Per-thread scratch of one unit: (H, chunk, cols) in the accumulation type.
template <typename T>
struct Scratch {
  at::Tensor buffer;
  T* data;
  int64_t chunk;
  int64_t cols;

  Scratch(int64_t heads, int64_t chunk, int64_t cols)
      : buffer(at::empty({heads, chunk, cols},
                         at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))),
        data(buffer.data_ptr<T>()),
        chunk(chunk),
        cols(cols) {}

  T* row(int64_t head, int64_t i) const { return data + (head * chunk + i) * cols; }
  // (rows, cols) matrix of one head.
  at::Tensor head(int64_t h, int64_t rows) const { return matrix(row(h, 0), rows, cols); }
  // (H, rows, cols): the first rows of every head.
  at::Tensor first_rows(int64_t rows) const { return buffer.narrow(1, 0, rows); }
};

// 1/n for each batch, n = number of kept keys (every key without a mask); 0 when n = 0.
template <typename acc_t>
std::vector<acc_t> inverse_kept_keys(const bool* keep, int64_t batch, int64_t keys) {
  std::vector<acc_t> inv_n(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = keep == nullptr ? keys : std::count(keep + b * keys, keep + (b + 1) * keys, true);
    inv_n[b] = n > 0 ? acc_t(1) / static_cast<acc_t>(n) : acc_t(0);
  }
  return inv_n;
}

// Sums partial (B, groups, H, Dk, Dv+1) over groups in token order, times scale[b], into
// matrix_out (B, H, Dk, Dv) and vector_out (B, H, Dk), both contiguous, accumulation type.
template <typename acc_t>
void reduce_groups(const at::Tensor& partial, int64_t groups, const std::vector<acc_t>& scale,
                   at::Tensor& matrix_out, at::Tensor& vector_out) {
  const int64_t heads = matrix_out.size(1), dk = matrix_out.size(2), dv = matrix_out.size(3);
  const int64_t block = dk * (dv + 1);
  const acc_t* parts = partial.const_data_ptr<acc_t>();
  acc_t* mat = matrix_out.data_ptr<acc_t>();
  acc_t* vec = vector_out.data_ptr<acc_t>();
  at::parallel_for(0, matrix_out.size(0) * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(block);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t g = 0; g < groups; ++g) {
        const acc_t* p = parts + ((b * groups + g) * heads + h) * block;
        for (int64_t i = 0; i < block; ++i) sum[i] += p[i];
      }
      for (int64_t i = 0; i < dk; ++i) {
        for (int64_t j = 0; j < dv; ++j) {
          mat[(bh * dk + i) * dv + j] = sum[i * (dv + 1) + j] * scale[b];
        }
        vec[bh * dk + i] = sum[i * (dv + 1) + dv] * scale[b];
      }
    }
  });
}

// [matrix_in | vector_in] * scale[b]: (B, H, Dk, Dv) and (B, H, Dk) -> contiguous
// (B*H, Dk, Dv+1) in the accumulation type.
template <typename acc_t>
at::Tensor pack_state(const at::Tensor& matrix_in, const at::Tensor& vector_in,
                      const std::vector<acc_t>& scale) {
  const int64_t batch = matrix_in.size(0), heads = matrix_in.size(1);
  const int64_t dk = matrix_in.size(2), dv = matrix_in.size(3);
  auto packed = at::empty({batch * heads, dk, dv + 1}, matrix_in.options());
  const auto mat = matrix_in.contiguous();
  const auto vec = vector_in.contiguous();
  const acc_t* m = mat.const_data_ptr<acc_t>();
  const acc_t* z = vec.const_data_ptr<acc_t>();
  acc_t* out = packed.data_ptr<acc_t>();
  for (int64_t bh = 0; bh < batch * heads; ++bh) {
    const acc_t s = scale[bh / heads];
    for (int64_t i = 0; i < dk; ++i) {
      acc_t* row = out + (bh * dk + i) * (dv + 1);
      for (int64_t j = 0; j < dv; ++j) row[j] = m[(bh * dk + i) * dv + j] * s;
      row[dv] = z[bh * dk + i] * s;
    }
  }
  return packed;
}

template <typename scalar_t, typename acc_t>
inline void load(const scalar_t* src, acc_t* dst, int64_t width) {
  for (int64_t d = 0; d < width; ++d) dst[d] = static_cast<acc_t>(src[d]);
}

template <typename acc_t, typename scalar_t>
inline void store(const acc_t* src, scalar_t* dst, int64_t width) {
  for (int64_t d = 0; d < width; ++d) dst[d] = static_cast<scalar_t>(src[d]);
}

// phi in place on the gathered chunk, with ATen's vectorised kernels: a scalar exp would cost
// more than the GEMMs (inside at::parallel_for these run on the calling thread). elu + 1 is
// computed as exp(min(x, 0)) + max(x, 0), because ATen's elu kernel is several times slower than
// its exp; tmp is scratch of x's size.
template <FeatureMap F>
void apply_feature_map(at::Tensor x, at::Tensor tmp) {
  if constexpr (F == FeatureMap::kElu) {
    at::clamp_max_out(tmp, x, 0).exp_();
    x.clamp_min_(0).add_(tmp);
  } else if constexpr (F == FeatureMap::kRelu) {
    at::relu_(x);
  }
}

// grad *= phi'(x) in place, from phi = phi(x) rather than x, so exp is not evaluated again:
// elu: x > 0 <=> phi > 1, else phi'(x) = exp(x) = phi, so phi' = min(phi, 1); relu: phi >= 0 and
// phi' = sign(phi). ATen's vectorised kernels again (a scalar loop branches on every value);
// tmp is scratch of grad's size.
template <FeatureMap F>
void apply_feature_map_grad(at::Tensor grad, const at::Tensor& phi, at::Tensor tmp) {
  if constexpr (F == FeatureMap::kElu) {
    grad.mul_(at::clamp_max_out(tmp, phi, 1));
  } else if constexpr (F == FeatureMap::kRelu) {
    grad.mul_(at::sign_out(tmp, phi));
  }
}

// Gathers one unit of k and v, every head: kc = phi(k) (Dk columns), vc = [v | 1] (Dv+1
// columns). Masked keys are never read: their vc row is zero, so they add nothing to
// phi(k)^T [v | 1] whatever their kc row holds (phi(0)).
template <FeatureMap F, typename scalar_t, typename acc_t>
void gather_keys(const TokenRows<const scalar_t>& k, const TokenRows<const scalar_t>& v,
                 const bool* keep, int64_t keys, int64_t heads, const Chunks::Unit& unit,
                 Scratch<acc_t>& kc, Scratch<acc_t>& vc, Scratch<acc_t>& tmp) {
  const int64_t dk = k.width, dv = v.width;
  for (int64_t i = 0; i < unit.rows; ++i) {
    const int64_t t = unit.first_token + i;
    const bool kept = keep == nullptr || keep[unit.batch * keys + t];
    for (int64_t h = 0; h < heads; ++h) {
      acc_t* krow = kc.row(h, i);
      acc_t* vrow = vc.row(h, i);
      if (kept) {
        load(k.row(unit.batch, t, h), krow, dk);
        load(v.row(unit.batch, t, h), vrow, dv);
        vrow[dv] = acc_t(1);
      } else {
        std::fill(krow, krow + dk, acc_t(0));
        std::fill(vrow, vrow + dv + 1, acc_t(0));
      }
    }
  }
  apply_feature_map<F>(kc.first_rows(unit.rows), tmp.first_rows(unit.rows));
}

// Gathers phi(q) of one unit, every head, into qc (Dk columns).
template <FeatureMap F, typename scalar_t, typename acc_t>
void gather_queries(const TokenRows<const scalar_t>& q, int64_t heads, const Chunks::Unit& unit,
                    Scratch<acc_t>& qc, Scratch<acc_t>& tmp) {
  for (int64_t i = 0; i < unit.rows; ++i) {
    for (int64_t h = 0; h < heads; ++h) {
      load(q.row(unit.batch, unit.first_token + i, h), qc.row(h, i), q.width);
    }
  }
  apply_feature_map<F>(qc.first_rows(unit.rows), tmp.first_rows(unit.rows));
}

// ---------------------------------------------------------------------------------------------
// Pass 1: state = (1/n) sum_j phi(k_j) v_j^T, key_mean = (1/n) sum_j phi(k_j).
struct StateArgs {
  at::Tensor k;     // (B, Nk, H*Dk), channel dim contiguous
  at::Tensor v;     // (B, Nk, H*Dv), channel dim contiguous
  at::Tensor keep;  // (B, Nk) bool contiguous, or undefined (keep every key)
  LinearAttentionDims dims;
  at::Tensor state;     // out: (B, H, Dk, Dv) accumulation type
  at::Tensor key_mean;  // out: (B, H, Dk) accumulation type
};

template <FeatureMap F, typename scalar_t>
void state_forward(StateArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& d = a.dims;
  const int64_t heads = d.heads, dk = d.head_dim, dv = d.value_dim;
  const Chunks chunks(d);
  const bool* keep = a.keep.defined() ? a.keep.const_data_ptr<bool>() : nullptr;
  const auto k = token_rows(a.k.const_data_ptr<scalar_t>(), a.k, dk);
  const auto v = token_rows(a.v.const_data_ptr<scalar_t>(), a.v, dv);
  // partial (B, groups, H, Dk, Dv+1): phi(K)^T [V | 1] of each unit and head.
  auto partial = at::empty({chunks.units(d.batch) * heads, dk, dv + 1}, a.state.options());
  acc_t* parts = partial.data_ptr<acc_t>();
  at::parallel_for(0, chunks.units(d.batch), 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> kc(heads, chunks.size, dk), tmp(heads, chunks.size, dk);
    Scratch<acc_t> vc(heads, chunks.size, dv + 1);
    for (int64_t u = begin; u < end; ++u) {
      chunks.for_each_chunk(u, [&](const Chunks::Unit& unit, bool first) {
        gather_keys<F>(k, v, keep, d.tokens, heads, unit, kc, vc, tmp);
        for (int64_t h = 0; h < heads; ++h) {
          auto out = matrix(parts + (u * heads + h) * dk * (dv + 1), dk, dv + 1);
          accumulate_product(out, kc.head(h, unit.rows).t(), vc.head(h, unit.rows), first);
        }
      });
    }
  });
  reduce_groups<acc_t>(partial, chunks.groups, inverse_kept_keys<acc_t>(keep, d.batch, d.tokens),
                       a.state, a.key_mean);
}

// Gradients of pass 1: with M = [grad_state | grad_key_mean] / n (Dk x (Dv+1)),
// grad_phi(k_j) = M [v_j | 1] and grad_v_j = (grad_state / n)^T phi(k_j); masked keys get zero.
struct StateBackwardArgs {
  at::Tensor grad_state;     // (B, H, Dk, Dv) accumulation type
  at::Tensor grad_key_mean;  // (B, H, Dk) accumulation type
  at::Tensor k;              // (B, Nk, H*Dk), channel dim contiguous
  at::Tensor v;              // (B, Nk, H*Dv), channel dim contiguous
  at::Tensor keep;           // (B, Nk) bool contiguous, or undefined
  LinearAttentionDims dims;
  at::Tensor grad_k;  // out: (B, Nk, H*Dk) contiguous, k's dtype
  at::Tensor grad_v;  // out: (B, Nk, H*Dv) contiguous, v's dtype
};

template <FeatureMap F, typename scalar_t>
void state_backward(StateBackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& d = a.dims;
  const int64_t heads = d.heads, dk = d.head_dim, dv = d.value_dim;
  const Chunks chunks(d);
  const bool* keep = a.keep.defined() ? a.keep.const_data_ptr<bool>() : nullptr;
  at::Tensor m = pack_state<acc_t>(a.grad_state, a.grad_key_mean,
                                   inverse_kept_keys<acc_t>(keep, d.batch, d.tokens));
  acc_t* mp = m.data_ptr<acc_t>();
  const auto k = token_rows(a.k.const_data_ptr<scalar_t>(), a.k, dk);
  const auto v = token_rows(a.v.const_data_ptr<scalar_t>(), a.v, dv);
  const auto gk = token_rows(a.grad_k.data_ptr<scalar_t>(), a.grad_k, dk);
  const auto gv = token_rows(a.grad_v.data_ptr<scalar_t>(), a.grad_v, dv);
  at::parallel_for(0, chunks.units(d.batch), 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> kc(heads, chunks.size, dk), dkc(heads, chunks.size, dk);
    Scratch<acc_t> tmp(heads, chunks.size, dk);
    Scratch<acc_t> vc(heads, chunks.size, dv + 1), dvc(heads, chunks.size, dv);
    for (int64_t u = begin; u < end; ++u) {
      chunks.for_each_chunk(u, [&](const Chunks::Unit& unit, bool) {
        gather_keys<F>(k, v, keep, d.tokens, heads, unit, kc, vc, tmp);
        for (int64_t h = 0; h < heads; ++h) {
          const auto mh = matrix(mp + (unit.batch * heads + h) * dk * (dv + 1), dk, dv + 1);
          auto dk_out = dkc.head(h, unit.rows);
          auto dv_out = dvc.head(h, unit.rows);
          at::mm_out(dk_out, vc.head(h, unit.rows), mh.t());
          at::mm_out(dv_out, kc.head(h, unit.rows), mh.narrow(1, 0, dv));
        }
        apply_feature_map_grad<F>(dkc.first_rows(unit.rows), kc.first_rows(unit.rows),
                                  tmp.first_rows(unit.rows));
        for (int64_t i = 0; i < unit.rows; ++i) {
          const int64_t t = unit.first_token + i;
          const bool kept = keep == nullptr || keep[unit.batch * d.tokens + t];
          for (int64_t h = 0; h < heads; ++h) {
            scalar_t* gkrow = gk.row(unit.batch, t, h);
            scalar_t* gvrow = gv.row(unit.batch, t, h);
            if (!kept) {
              std::fill(gkrow, gkrow + dk, scalar_t(0));
              std::fill(gvrow, gvrow + dv, scalar_t(0));
              continue;
            }
            store(dkc.row(h, i), gkrow, dk);
            store(dvc.row(h, i), gvrow, dv);
          }
        }
      });
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Pass 2: o_i = phi(q_i)^T state / (phi(q_i) . key_mean + eps).
struct ApplyArgs {
  at::Tensor q;         // (B, Nq, H*Dk), channel dim contiguous
  at::Tensor state;     // (B, H, Dk, Dv) accumulation type
  at::Tensor key_mean;  // (B, H, Dk) accumulation type
  double eps;
  LinearAttentionDims dims;
  at::Tensor out;  // out: (B, Nq, H*Dv) contiguous, q's dtype
};

template <FeatureMap F, typename scalar_t>
void apply_forward(ApplyArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& d = a.dims;
  const int64_t heads = d.heads, dk = d.head_dim, dv = d.value_dim;
  const Chunks chunks(d);
  at::Tensor sz = pack_state<acc_t>(a.state, a.key_mean, std::vector<acc_t>(d.batch, acc_t(1)));
  acc_t* szp = sz.data_ptr<acc_t>();
  const auto q = token_rows(a.q.const_data_ptr<scalar_t>(), a.q, dk);
  const auto o = token_rows(a.out.data_ptr<scalar_t>(), a.out, dv);
  const acc_t eps = static_cast<acc_t>(a.eps);
  at::parallel_for(0, chunks.units(d.batch), 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> qc(heads, chunks.size, dk), tmp(heads, chunks.size, dk);
    Scratch<acc_t> oc(heads, chunks.size, dv + 1);  // [numerator | denominator - eps]
    for (int64_t u = begin; u < end; ++u) {
      chunks.for_each_chunk(u, [&](const Chunks::Unit& unit, bool) {
        gather_queries<F>(q, heads, unit, qc, tmp);
        for (int64_t h = 0; h < heads; ++h) {
          auto num_den = oc.head(h, unit.rows);
          at::mm_out(num_den, qc.head(h, unit.rows),
                     matrix(szp + (unit.batch * heads + h) * dk * (dv + 1), dk, dv + 1));
        }
        for (int64_t i = 0; i < unit.rows; ++i) {
          for (int64_t h = 0; h < heads; ++h) {
            const acc_t* row = oc.row(h, i);
            const acc_t inv_den = acc_t(1) / (row[dv] + eps);
            scalar_t* dst = o.row(unit.batch, unit.first_token + i, h);
            for (int64_t j = 0; j < dv; ++j) dst[j] = static_cast<scalar_t>(row[j] * inv_den);
          }
        }
      });
    }
  });
}

// Gradients of pass 2, with o_i recomputed and den_i = phi(q_i) . key_mean + eps:
// g_i = [grad_o_i / den_i | -(o_i . grad_o_i) / den_i] (Dv+1 values), then
// grad_phi(q_i) = [state | key_mean] g_i and [grad_state | grad_key_mean] = sum_i phi(q_i) g_i^T.
struct ApplyBackwardArgs {
  at::Tensor grad_out;  // (B, Nq, H*Dv), channel dim contiguous, q's dtype
  at::Tensor q;         // (B, Nq, H*Dk), channel dim contiguous
  at::Tensor state;     // (B, H, Dk, Dv) accumulation type
  at::Tensor key_mean;  // (B, H, Dk) accumulation type
  double eps;
  LinearAttentionDims dims;
  at::Tensor grad_q;         // out: (B, Nq, H*Dk) contiguous, q's dtype
  at::Tensor grad_state;     // out: (B, H, Dk, Dv) accumulation type
  at::Tensor grad_key_mean;  // out: (B, H, Dk) accumulation type
};

template <FeatureMap F, typename scalar_t>
void apply_backward(ApplyBackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& d = a.dims;
  const int64_t heads = d.heads, dk = d.head_dim, dv = d.value_dim;
  const Chunks chunks(d);
  at::Tensor sz = pack_state<acc_t>(a.state, a.key_mean, std::vector<acc_t>(d.batch, acc_t(1)));
  acc_t* szp = sz.data_ptr<acc_t>();
  const auto q = token_rows(a.q.const_data_ptr<scalar_t>(), a.q, dk);
  const auto go = token_rows(a.grad_out.const_data_ptr<scalar_t>(), a.grad_out, dv);
  const auto gq = token_rows(a.grad_q.data_ptr<scalar_t>(), a.grad_q, dk);
  const acc_t eps = static_cast<acc_t>(a.eps);
  // partial (B, groups, H, Dk, Dv+1): phi(Q)^T G of each unit and head.
  auto partial = at::empty({chunks.units(d.batch) * heads, dk, dv + 1}, a.state.options());
  acc_t* parts = partial.data_ptr<acc_t>();
  at::parallel_for(0, chunks.units(d.batch), 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> qc(heads, chunks.size, dk), dqc(heads, chunks.size, dk);
    Scratch<acc_t> tmp(heads, chunks.size, dk);
    Scratch<acc_t> oc(heads, chunks.size, dv + 1);  // [numerator | denominator - eps]
    Scratch<acc_t> gc(heads, chunks.size, dv + 1);  // g
    for (int64_t u = begin; u < end; ++u) {
      chunks.for_each_chunk(u, [&](const Chunks::Unit& unit, bool first) {
        gather_queries<F>(q, heads, unit, qc, tmp);
        for (int64_t h = 0; h < heads; ++h) {
          auto num_den = oc.head(h, unit.rows);
          at::mm_out(num_den, qc.head(h, unit.rows),
                     matrix(szp + (unit.batch * heads + h) * dk * (dv + 1), dk, dv + 1));
        }
        for (int64_t i = 0; i < unit.rows; ++i) {
          for (int64_t h = 0; h < heads; ++h) {
            const acc_t* row = oc.row(h, i);
            const acc_t inv_den = acc_t(1) / (row[dv] + eps);
            const scalar_t* grad = go.row(unit.batch, unit.first_token + i, h);
            acc_t* g = gc.row(h, i);
            acc_t o_dot_grad = 0;
            for (int64_t j = 0; j < dv; ++j) {
              const acc_t grad_j = static_cast<acc_t>(grad[j]);
              o_dot_grad += row[j] * grad_j;
              g[j] = grad_j * inv_den;
            }
            g[dv] = -o_dot_grad * inv_den * inv_den;
          }
        }
        for (int64_t h = 0; h < heads; ++h) {
          const auto szh = matrix(szp + (unit.batch * heads + h) * dk * (dv + 1), dk, dv + 1);
          const auto g = gc.head(h, unit.rows);
          auto dq_out = dqc.head(h, unit.rows);
          auto part = matrix(parts + (u * heads + h) * dk * (dv + 1), dk, dv + 1);
          at::mm_out(dq_out, g, szh.t());
          accumulate_product(part, qc.head(h, unit.rows).t(), g, first);
        }
        apply_feature_map_grad<F>(dqc.first_rows(unit.rows), qc.first_rows(unit.rows),
                                  tmp.first_rows(unit.rows));
        for (int64_t i = 0; i < unit.rows; ++i) {
          for (int64_t h = 0; h < heads; ++h) {
            store(dqc.row(h, i), gq.row(unit.batch, unit.first_token + i, h), dk);
          }
        }
      });
    }
  });
  reduce_groups<acc_t>(partial, chunks.groups, std::vector<acc_t>(d.batch, acc_t(1)),
                       a.grad_state, a.grad_key_mean);
}

// dispatch_feature_map needs a callable with a template operator()<F>() (valid C++17).
template <typename scalar_t>
struct LaunchStateForward {
  StateArgs& args;
  template <FeatureMap F>
  void operator()() const { state_forward<F, scalar_t>(args); }
};
template <typename scalar_t>
struct LaunchStateBackward {
  StateBackwardArgs& args;
  template <FeatureMap F>
  void operator()() const { state_backward<F, scalar_t>(args); }
};
template <typename scalar_t>
struct LaunchApplyForward {
  ApplyArgs& args;
  template <FeatureMap F>
  void operator()() const { apply_forward<F, scalar_t>(args); }
};
template <typename scalar_t>
struct LaunchApplyBackward {
  ApplyBackwardArgs& args;
  template <FeatureMap F>
  void operator()() const { apply_backward<F, scalar_t>(args); }
};

#define LINFUSION_DISPATCH_FLOATING(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

at::Tensor contiguous_mask(const c10::optional<at::Tensor>& key_padding_mask) {
  return key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
}

// ---------------------------------------------------------------------------------------------
// Ops.
std::tuple<at::Tensor, at::Tensor> linear_attention_state_cpu(
    const at::Tensor& k, const at::Tensor& v, int64_t heads, c10::string_view feature_map,
    const c10::optional<at::Tensor>& key_padding_mask) {
  const auto fm = parse_feature_map(std::string(feature_map));
  const auto d = check_state_args(k, v, heads, key_padding_mask);
  StateArgs args{channels_contiguous(k), channels_contiguous(v), contiguous_mask(key_padding_mask),
                 d};
  const auto opts = k.options().dtype(accumulate_dtype(k.scalar_type()));
  args.state = at::empty({d.batch, heads, d.head_dim, d.value_dim}, opts);
  args.key_mean = at::empty({d.batch, heads, d.head_dim}, opts);
  LINFUSION_DISPATCH_FLOATING(k.scalar_type(), "linear_attention_state_cpu", [&] {
    dispatch_feature_map(fm, LaunchStateForward<scalar_t>{args});
  });
  return {args.state, args.key_mean};
}

std::tuple<at::Tensor, at::Tensor> linear_attention_state_backward_cpu(
    const at::Tensor& grad_state, const at::Tensor& grad_key_mean, const at::Tensor& k,
    const at::Tensor& v, int64_t heads, c10::string_view feature_map,
    const c10::optional<at::Tensor>& key_padding_mask) {
  const auto fm = parse_feature_map(std::string(feature_map));
  const auto d =
      check_state_backward_args(grad_state, grad_key_mean, k, v, heads, key_padding_mask);
  StateBackwardArgs args{grad_state,           grad_key_mean, channels_contiguous(k),
                         channels_contiguous(v), contiguous_mask(key_padding_mask), d};
  args.grad_k = at::empty(k.sizes(), k.options());
  args.grad_v = at::empty(v.sizes(), v.options());
  LINFUSION_DISPATCH_FLOATING(k.scalar_type(), "linear_attention_state_backward_cpu", [&] {
    dispatch_feature_map(fm, LaunchStateBackward<scalar_t>{args});
  });
  return {args.grad_k, args.grad_v};
}

at::Tensor linear_attention_apply_cpu(const at::Tensor& q, const at::Tensor& state,
                                      const at::Tensor& key_mean, int64_t heads,
                                      c10::string_view feature_map, double eps) {
  const auto fm = parse_feature_map(std::string(feature_map));
  const auto d = check_apply_args(q, state, key_mean, heads, eps);
  ApplyArgs args{channels_contiguous(q), state, key_mean, eps, d};
  args.out = at::empty({d.batch, d.tokens, heads * d.value_dim}, q.options());
  LINFUSION_DISPATCH_FLOATING(q.scalar_type(), "linear_attention_apply_cpu", [&] {
    dispatch_feature_map(fm, LaunchApplyForward<scalar_t>{args});
  });
  return args.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_apply_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& state,
    const at::Tensor& key_mean, int64_t heads, c10::string_view feature_map, double eps) {
  const auto fm = parse_feature_map(std::string(feature_map));
  const auto d = check_apply_backward_args(grad_out, q, state, key_mean, heads, eps);
  ApplyBackwardArgs args{channels_contiguous(grad_out), channels_contiguous(q), state, key_mean,
                         eps, d};
  args.grad_q = at::empty(q.sizes(), q.options());
  args.grad_state = at::empty(state.sizes(), state.options());
  args.grad_key_mean = at::empty(key_mean.sizes(), key_mean.options());
  LINFUSION_DISPATCH_FLOATING(q.scalar_type(), "linear_attention_apply_backward_cpu", [&] {
    dispatch_feature_map(fm, LaunchApplyBackward<scalar_t>{args});
  });
  return {args.grad_q, args.grad_state, args.grad_key_mean};
}

}  // namespace
}  // namespace linfusion_ops

TORCH_LIBRARY_IMPL(linfusion_ops, CPU, m) {
  m.impl("linear_attention_state", &linfusion_ops::linear_attention_state_cpu);
  m.impl("linear_attention_state_backward", &linfusion_ops::linear_attention_state_backward_cpu);
  m.impl("linear_attention_apply", &linfusion_ops::linear_attention_apply_cpu);
  m.impl("linear_attention_apply_backward", &linfusion_ops::linear_attention_apply_backward_cpu);
}
