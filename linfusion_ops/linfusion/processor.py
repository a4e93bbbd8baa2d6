"""LinFusion's self-attention for diffusers `Attention` modules: ONE q/k/v -> out body with
pluggable linear-attention cores.

    q = to_q(x + mlp_q(x)),  k = to_k(c + mlp_k(c)),  v = to_v(c)     (c = x for self-attention)
    o = to_out(linear_attention(q, k, v, heads, feature_map="elu", eps=1e-4))

`linfusion_attention(attn, hidden_states, ..., core=...)` is that body, written once: the norms
diffusers' Attention applies (spatial_norm, group_norm, norm_cross, and the per-head qk-norm
norm_q / norm_k), LinFusion's kernel MLPs, the projections, linear attention in its two passes
(the state over the keys, then the queries against it), to_out, the residual and the rescale.
The core says how the two passes run over the tokens:

* `FusedCore`: all tokens at once (linfusion_ops.linear_attention_state + _apply); what
  `LinFusionAttnProcessor` runs.
* `TokenChunkedCore(chunk_size)`: the same maths over chunk_size tokens at a time, so that only
  one chunk's q / k / v and kernel-MLP activations are alive at once; what
  linfusion_ops.highres.low_memory's chunked self-attention runs.
* `linfusion_ops.linfusion.distributed.SequenceParallelCore`: this rank's token slice, its
  state all-reduced over the ranks; what `SequenceParallelLinFusionAttnProcessor` runs.

Shapes: B batch, N tokens, C channels, H heads. Needs only torch: diffusers provides the
Attention modules it is called with.
"""

from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from ..ops import check_feature_map, linear_attention_apply, linear_attention_state
from .kernel_mlp import apply_kernel_mlp

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

__all__ = [
    "LINFUSION_EPS",
    "FusedCore",
    "TokenChunkedCore",
    "LinFusionAttnProcessor",
    "linfusion_attention",
]

# LinFusion's normalizer epsilon (the official z = q . mean(k) + 1e-4).
LINFUSION_EPS = 1e-4

# diffusers writes "drop this key" as a large negative additive bias: -10000.0 in
# Transformer2DModel, finfo.min or -inf elsewhere. Anything at or below this counts as dropped.
_DROP_BIAS = -1e4


def _key_padding_mask(attention_mask: torch.Tensor, batch: int, keys: int) -> torch.Tensor:
    """(B, N_k) bool keep-mask from a diffusers attention mask that is the same for every query
    and head: bool (True = attend) or additive float (0 = attend, <= -1e4 = drop), shaped
    (B | 1, N_k), (B | 1, 1, N_k) or (B | 1, 1, 1, N_k)."""
    mask = attention_mask
    while mask.dim() > 2 and mask.shape[1] == 1:
        mask = mask.squeeze(1)
    if mask.dim() != 2 or mask.shape[0] not in (1, batch) or mask.shape[1] != keys:
        raise ValueError(
            "LinFusionAttnProcessor: linear attention can only drop keys, so attention_mask must be "
            f"a per-key mask shaped (B, N_k), (B, 1, N_k) or (B, 1, 1, N_k) with B={batch}, "
            f"N_k={keys}; got shape {tuple(attention_mask.shape)}"
        )
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask > _DROP_BIAS
        # A bias strictly between "drop" and 0 re-weights a key, which linear attention cannot
        # express. Checking it reads the data, so it is left out of compiled graphs.
        if not torch.compiler.is_compiling() and bool(((mask != 0) & keep).any()):
            raise ValueError(
                "LinFusionAttnProcessor: an additive attention_mask may only hold 0 (attend) or "
                f"values <= {_DROP_BIAS:g} (drop); linear attention cannot re-weight keys"
            )
    # Materialised (B * N_k bools): kernels may index the mask as a dense (B, N_k) array.
    return keep.expand(batch, keys).contiguous()


class FusedCore:
    """The linear-attention core that runs each pass over all tokens at once (the default).

    A core is what `linfusion_attention` asks to run the two passes:
    * `chunk_size`: tokens per chunk of each pass, None for all at once;
    * `state(key, value, heads, key_padding_mask)`: linfusion_ops.linear_attention_state of one
      chunk of keys (B, n, H*Dk) and values (B, n, H*Dv): state (B, H, Dk, Dv) and key_mean
      (B, H, Dk), fp32 (fp64 for fp64), averaged over the chunk's kept keys;
    * `combine(state, key_mean, key_padding_mask, num_keys)`: the state over every key of the
      attention from the one over this process's num_keys keys (the identity here);
    * `apply(query, state, key_mean, heads)`: linfusion_ops.linear_attention_apply, (B, n, H*Dk)
      queries to (B, n, H*Dv) outputs in the queries' dtype.

    Args:
        feature_map: "elu" (LinFusion), "relu" or "identity".
        eps: added to the normalizer (LinFusion: 1e-4).
    """

    chunk_size: Optional[int] = None

    def __init__(self, feature_map: str = "elu", eps: float = LINFUSION_EPS):
        check_feature_map(feature_map)
        self.feature_map = feature_map
        self.eps = eps

    def state(
        self, key: torch.Tensor, value: torch.Tensor, heads: int, key_padding_mask: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return linear_attention_state(
            key, value, heads, feature_map=self.feature_map, key_padding_mask=key_padding_mask
        )

    def combine(
        self,
        state: torch.Tensor,
        key_mean: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor],
        num_keys: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        return state, key_mean

    def apply(self, query: torch.Tensor, state: torch.Tensor, key_mean: torch.Tensor, heads: int) -> torch.Tensor:
        return linear_attention_apply(query, state, key_mean, heads, feature_map=self.feature_map, eps=self.eps)


_FUSED = FusedCore()


class TokenChunkedCore(FusedCore):
    """FusedCore's maths over `chunk_size` tokens at a time, for memory: the keys and values
    (kernel MLP included) chunk by chunk into the fp32 state, each chunk's state weighted by its
    share of the kept keys, then the queries, the apply and to_out chunk by chunk into one
    preallocated output. Equal to FusedCore up to floating-point rounding (the chunks' states
    are summed in another order; BLAS may block a GEMM of another size differently).

    Args:
        chunk_size: tokens per chunk, a positive int (N need not be a multiple of it).
        feature_map, eps: as for FusedCore.
    """

    def __init__(self, chunk_size: int, feature_map: str = "elu", eps: float = LINFUSION_EPS):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"TokenChunkedCore: chunk_size must be a positive int, got {chunk_size!r}")
        super().__init__(feature_map, eps)
        self.chunk_size = chunk_size


def _chunks(tokens: int, chunk_size: Optional[int]) -> List[slice]:
    """The token ranges of one pass; a single (possibly empty) range when unchunked."""
    if chunk_size is None or tokens <= chunk_size:
        return [slice(0, tokens)]
    return [slice(start, min(start + chunk_size, tokens)) for start in range(0, tokens, chunk_size)]


def _per_head(norm, x: torch.Tensor, heads: int) -> torch.Tensor:
    """diffusers' qk-norm: `norm` over each head's channels of a token-major (B, N, H*D) x."""
    if norm is None:
        return x
    return norm(x.unflatten(-1, (heads, -1))).flatten(-2)


def _queries(attn: "Attention", x: torch.Tensor) -> torch.Tensor:
    """norm_q(to_q(x + to_q_(x))), (B, n, C) -> (B, n, H*Dk)."""
    query = attn.to_q(apply_kernel_mlp(getattr(attn, "to_q_", None), x))
    return _per_head(getattr(attn, "norm_q", None), query, attn.heads)


def _chunk_state(attn: "Attention", context: torch.Tensor, key_padding_mask, core: FusedCore):
    """The state of one chunk of context tokens (B, n, C_k): k = norm_k(to_k(c + to_k_(c))),
    v = to_v(c). A function of its own so that the chunk's k and v are freed on return."""
    key = attn.to_k(apply_kernel_mlp(getattr(attn, "to_k_", None), context))
    key = _per_head(getattr(attn, "norm_k", None), key, attn.heads)
    return core.state(key, attn.to_v(context), attn.heads, key_padding_mask)


def _key_pass(attn: "Attention", context: torch.Tensor, key_padding_mask, core: FusedCore):
    """Pass 1: (state, key_mean) over all keys of context (B, N_k, C_k), chunk by chunk."""
    num_keys = context.shape[1]
    chunks = _chunks(num_keys, core.chunk_size)
    if len(chunks) == 1:
        state, key_mean = _chunk_state(attn, context, key_padding_mask, core)
        return core.combine(state, key_mean, key_padding_mask, num_keys)
    if key_padding_mask is not None:
        kept = key_padding_mask.sum(dim=1).clamp(min=1)  # (B,) int64; no kept key: zero states
    state = key_mean = None
    for chunk in chunks:
        mask = None if key_padding_mask is None else key_padding_mask[:, chunk].contiguous()
        part, part_mean = _chunk_state(attn, context[:, chunk], mask, core)
        # Each chunk's state is the mean over its kept keys: weighted by its share of them.
        if mask is None:
            weight = (chunk.stop - chunk.start) / num_keys
            part, part_mean = part * weight, part_mean * weight
        else:
            weight = mask.sum(dim=1).to(part.dtype) / kept.to(part.dtype)
            part, part_mean = part * weight[:, None, None, None], part_mean * weight[:, None, None]
        state, key_mean = (part, part_mean) if state is None else (state + part, key_mean + part_mean)
    return core.combine(state, key_mean, key_padding_mask, num_keys)


def _to_out(attn: "Attention", out: torch.Tensor) -> torch.Tensor:
    """to_out: the output projection and its dropout, (B, n, H*Dv) -> (B, n, C_out)."""
    return attn.to_out[1](attn.to_out[0](out))


def linfusion_attention(
    attn: "Attention",
    hidden_states: torch.Tensor,
    encoder_hidden_states: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    temb: Optional[torch.Tensor] = None,
    *,
    core: Optional[FusedCore] = None,
) -> torch.Tensor:
    """LinFusion's attention of a diffusers Attention module, run by `core`.

    Args:
        attn: the Attention module: to_q / to_k / to_v / to_out, optional kernel MLPs
            to_q_ / to_k_, and the norms diffusers' Attention may carry (spatial_norm,
            group_norm, norm_cross, norm_q / norm_k), heads, residual_connection,
            rescale_output_factor.
        hidden_states: (B, N, C) or (B, C, H, W) image tokens, any float dtype.
        encoder_hidden_states: optional (B, N_k, C_k) keys/values source; None for
            self-attention.
        attention_mask: optional per-key mask, bool (True = attend) or additive float
            (0 = attend, <= -1e4 = drop), shaped (B, N_k), (B, 1, N_k) or (B, 1, 1, N_k).
        temb: the time embedding, used by spatial_norm only.
        core: FusedCore (default), TokenChunkedCore or
            linfusion_ops.linfusion.distributed.SequenceParallelCore.

    Returns:
        hidden_states' shape and dtype (a chunked core writes a 4-D result channel-major
        contiguous).
    """
    core = _FUSED if core is None else core
    residual = hidden_states
    spatial_norm = getattr(attn, "spatial_norm", None)
    if spatial_norm is not None:
        hidden_states = spatial_norm(hidden_states, temb)

    four_d = hidden_states.dim() == 4
    if four_d:
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
    batch, tokens = hidden_states.shape[:2]

    group_norm = getattr(attn, "group_norm", None)
    if group_norm is not None:
        hidden_states = group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    if encoder_hidden_states is None:
        context = hidden_states
    elif getattr(attn, "norm_cross", None) is not None:
        context = attn.norm_encoder_hidden_states(encoder_hidden_states)
    else:
        context = encoder_hidden_states

    key_padding_mask = None
    if attention_mask is not None:
        key_padding_mask = _key_padding_mask(attention_mask, batch, context.shape[1])

    state, key_mean = _key_pass(attn, context, key_padding_mask, core)

    if core.chunk_size is None:
        out = _to_out(attn, core.apply(_queries(attn, hidden_states), state, key_mean, attn.heads))
        if four_d:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    # Chunked: the residual and the rescale per chunk, token-major, into one preallocated output
    # (4-D: channel-major, as the unchunked transpose + reshape leaves it).
    if four_d:
        residual = residual.flatten(2).transpose(1, 2)
    out = tokens_view = None
    for chunk in _chunks(tokens, core.chunk_size):
        part = _to_out(attn, core.apply(_queries(attn, hidden_states[:, chunk]), state, key_mean, attn.heads))
        if attn.residual_connection:
            part = part + residual[:, chunk]
        part = part / attn.rescale_output_factor
        if out is None:
            shape = (batch, channels, height, width) if four_d else (batch, tokens, part.shape[2])
            out = part.new_empty(shape)
            tokens_view = out.view(batch, channels, tokens).transpose(1, 2) if four_d else out
        tokens_view[:, chunk] = part
    return out


class LinFusionAttnProcessor:
    """Attention processor for LinFusion's generalized linear attention: `linfusion_attention`
    with the FusedCore (phi = elu + 1, eps = 1e-4).

    A drop-in for diffusers' AttnProcessor2_0 on a self-attention `Attention` module that
    carries LinFusion's kernel MLPs `to_q_` / `to_k_` (put there by `LinFusion.mount_to`; a
    module without them runs plain elu+1 linear attention). Stateless and constructible without
    arguments, so diffusers can re-create it (as the IP-Adapter loader does).

    q = to_q(x + to_q_(x)), k = to_k(c + to_k_(c)), v = to_v(c), with c = x, or the
    encoder states when given (cross-attention), each through the module's norm_q / norm_k per
    head when it has them; o = to_out(linear_attention(q, k, v)). The projections stay
    token-major (B, N, H*D): the kernels read them without head transposes.
    """

    def __call__(
        self,
        attn: "Attention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        """Arguments and result as for `linfusion_attention`; extra positional and keyword
        arguments are accepted and ignored, as in AttnProcessor2_0."""
        return linfusion_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
