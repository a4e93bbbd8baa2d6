"""LinFusion's attention processor for diffusers `Attention` modules: generalized linear attention
on linfusion_ops' fused kernels, with LinFusion's kernel-function MLPs.

    q = to_q(x + mlp_q(x)),  k = to_k(c + mlp_k(c)),  v = to_v(c)     (c = x for self-attention)
    o = to_out(linear_attention(q, k, v, heads, feature_map="elu", eps=1e-4))

Shapes: B batch, N tokens, C channels, H heads.
"""

from typing import Optional

import torch

from diffusers.models.attention_processor import Attention

from ..ops import linear_attention
from .kernel_mlp import apply_kernel_mlp

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


class LinFusionAttnProcessor:
    """Attention processor for LinFusion's generalized linear attention.

    A drop-in for diffusers' AttnProcessor2_0 on a self-attention `Attention` module that
    carries LinFusion's kernel MLPs `to_q_` / `to_k_` (put there by `LinFusion.mount_to`; a
    module without them runs plain elu+1 linear attention). Stateless and constructible without
    arguments, so diffusers can re-create it (as the IP-Adapter loader does).

    q = to_q(x + to_q_(x)), k = to_k(c + to_k_(c)), v = to_v(c), with c = x, or the
    encoder states when given (cross-attention); o = to_out(linear_attention(q, k, v)) with
    phi = elu + 1 and eps = 1e-4. The projections stay token-major (B, N, H*D): the kernels read
    them without head transposes.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        """Args:
            attn: the Attention module (its to_q/to_k/to_v/to_out, optional to_q_/to_k_,
                group_norm, spatial_norm, norm_cross, norm_q/norm_k are used).
            hidden_states: (B, N, C) or (B, C, H, W) image tokens, any float dtype.
            encoder_hidden_states: optional (B, N_k, C_k) keys/values source; None for
                self-attention.
            attention_mask: optional per-key mask, bool (True = attend) or additive float
                (0 = attend, <= -1e4 = drop), shaped (B, N_k), (B, 1, N_k) or (B, 1, 1, N_k).
            temb: the time embedding, used by spatial_norm only.
            Extra positional and keyword arguments are accepted and ignored, as in
            AttnProcessor2_0.

        Returns:
            hidden_states' shape and dtype.
        """
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.dim()
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross is not None:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states

        key_padding_mask = None
        if attention_mask is not None:
            key_padding_mask = _key_padding_mask(attention_mask, batch, context.shape[1])

        query = attn.to_q(apply_kernel_mlp(getattr(attn, "to_q_", None), hidden_states))
        key = attn.to_k(apply_kernel_mlp(getattr(attn, "to_k_", None), context))
        value = attn.to_v(context)

        heads = attn.heads
        if attn.norm_q is not None:
            query = attn.norm_q(query.unflatten(-1, (heads, -1))).flatten(-2)
        if attn.norm_k is not None:
            key = attn.norm_k(key.unflatten(-1, (heads, -1))).flatten(-2)

        hidden_states = linear_attention(
            query,
            key,
            value,
            heads,
            feature_map="elu",
            eps=LINFUSION_EPS,
            key_padding_mask=key_padding_mask,
        )

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
