"""Plain-PyTorch definitions of every linfusion_ops op: the test oracle.

Written for clarity, not speed. Every fast path (C++ CPU, CUDA) is tested against these, and
the package falls back to them when the compiled module is unavailable.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("elu", "relu", "identity")


def feature_map_fn(name: str):
    """phi for a feature map name: "elu" -> elu(x) + 1, "relu" -> relu(x), "identity" -> x."""
    if name == "elu":
        return lambda x: F.elu(x) + 1.0
    if name == "relu":
        return F.relu
    if name == "identity":
        return lambda x: x
    raise ValueError(f"linfusion_ops: feature_map must be one of {FEATURE_MAPS}, got {name!r}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D)."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def linear_attention_state(
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
    feature_map: str = "elu",
    key_padding_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """state = (1/n) sum_j phi(k_j) v_j^T  (B, H, Dk, Dv); key_mean = (1/n) sum_j phi(k_j)
    (B, H, Dk). fp32 (fp64 for fp64 inputs); n = number of kept keys (0 gives zeros)."""
    acc = _acc_dtype(k.dtype)
    phi = feature_map_fn(feature_map)
    fk = phi(_split_heads(k, heads).to(acc))  # (B, H, N, Dk)
    fv = _split_heads(v, heads).to(acc)  # (B, H, N, Dv)
    if key_padding_mask is None:
        n = torch.full((k.shape[0],), k.shape[1], dtype=acc, device=k.device)
    else:
        keep = key_padding_mask.to(acc)[:, None, :, None]  # (B, 1, N, 1)
        fk = fk * keep
        n = key_padding_mask.sum(dim=1).to(acc)
    inv_n = torch.where(n > 0, 1.0 / n.clamp(min=1), torch.zeros_like(n))[:, None, None]
    state = fk.transpose(-1, -2) @ fv * inv_n[..., None]
    key_mean = fk.sum(dim=2) * inv_n
    return state, key_mean


def linear_attention_apply(
    q: torch.Tensor,
    state: torch.Tensor,
    key_mean: torch.Tensor,
    heads: int,
    *,
    feature_map: str = "elu",
    eps: float = 1e-4,
) -> torch.Tensor:
    """o_i = phi(q_i)^T state / (phi(q_i) . key_mean + eps); (B, Nq, H*Dv) in q's dtype."""
    phi = feature_map_fn(feature_map)
    fq = phi(_split_heads(q, heads).to(state.dtype))  # (B, H, Nq, Dk)
    num = fq @ state  # (B, H, Nq, Dv)
    den = (fq * key_mean[:, :, None, :]).sum(-1, keepdim=True) + eps
    return _merge_heads(num / den).to(q.dtype)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
    feature_map: str = "elu",
    eps: float = 1e-4,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Generalized (normalized, non-causal) linear attention: q (B, Nq, H*Dk), k (B, Nk, H*Dk),
    v (B, Nk, H*Dv) -> (B, Nq, H*Dv). Accumulates in fp32 (fp64 for fp64 inputs)."""
    state, key_mean = linear_attention_state(
        k, v, heads, feature_map=feature_map, key_padding_mask=key_padding_mask
    )
    return linear_attention_apply(q, state, key_mean, heads, feature_map=feature_map, eps=eps)


def official_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int
) -> torch.Tensor:
    """The official LinFusion formula, as its GeneralizedLinearAttention computes it after the
    projections: heads split and transposed, elu+1, z = q . mean(k) + 1e-4,
    kv = (k^T / sqrt(N)) (v / sqrt(N)), o = q kv / z, heads merged. Runs in the inputs' dtype."""
    q = F.elu(_split_heads(q, heads)) + 1.0
    k = F.elu(_split_heads(k, heads)) + 1.0
    v = _split_heads(v, heads)
    n = k.shape[2]
    z = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-4
    kv = (k.transpose(-2, -1) * (n ** -0.5)) @ (v * (n ** -0.5))
    return _merge_heads(q @ kv / z)


def layer_norm_leaky_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    eps: float = 1e-5,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """leaky_relu(layer_norm(x, (C,), weight, bias, eps), negative_slope); x (..., C)."""
    acc = _acc_dtype(x.dtype)
    y = F.layer_norm(x.to(acc), x.shape[-1:], weight.to(acc), bias.to(acc), eps)
    return F.leaky_relu(y, negative_slope).to(x.dtype)


def merge_segments(
    embeds: torch.Tensor,
    keep: torch.Tensor,
    segment_ids: torch.Tensor,
    num_prompts: int,
    max_tokens: int,
    pad: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the kept tokens of each prompt's segments (segment order, then token order),
    truncate to max_tokens and fill the rest with pad ((C,) or (max_tokens, C)).

    embeds (S, L, C), keep (S, L) bool, segment_ids (S,) int64 -> merged (B, T, C) in embeds'
    dtype and lengths (B,) int64, the number of slots filled from segments."""
    if pad.dim() == 1:
        merged = pad.expand(num_prompts, max_tokens, pad.shape[0])
    else:
        merged = pad.expand(num_prompts, max_tokens, pad.shape[1])
    rows = []
    lengths = []
    for b in range(num_prompts):
        picked = [embeds[s][keep[s]] for s in range(embeds.shape[0]) if int(segment_ids[s]) == b]
        tokens = torch.cat(picked, dim=0)[:max_tokens] if picked else embeds.new_zeros(0, embeds.shape[2])
        t = tokens.shape[0]
        rows.append(torch.cat([tokens, merged[b, t:]], dim=0))
        lengths.append(t)
    out = torch.stack(rows) if rows else merged[:0].clone()
    return out, torch.tensor(lengths, dtype=torch.int64, device=embeds.device)
