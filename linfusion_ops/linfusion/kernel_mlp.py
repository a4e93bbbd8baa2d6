"""LinFusion's kernel-function MLPs, shared by the diffusers processors (linfusion.py) and the
sequence-parallel one (distributed.py). Needs only torch."""

from typing import Optional

import torch
from torch import nn

from ..ops import layer_norm_leaky_relu


def kernel_mlp(dim: int, mid_dim: Optional[int]) -> nn.Module:
    """LinFusion's kernel-function MLP for `dim` channels: Linear(dim, mid) -> LayerNorm(mid) ->
    LeakyReLU(0.01) -> Linear(mid, dim), applied as a residual by the processor. `mid_dim`
    None means mid = dim; -1 means no MLP (nn.Identity, so the residual doubles the input, as
    in the official code). Indices 0, 1 and 3 carry the official parameter names."""
    if mid_dim == -1:
        return nn.Identity()
    if mid_dim is not None and mid_dim <= 0:
        raise ValueError(f"LinFusion: projection_mid_dim must be None, -1 or positive, got {mid_dim}")
    mid = mid_dim or dim
    return nn.Sequential(nn.Linear(dim, mid), nn.LayerNorm(mid), nn.LeakyReLU(0.01), nn.Linear(mid, dim))


def apply_kernel_mlp(mlp: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """x + mlp(x), with the official MLP's LayerNorm + LeakyReLU as one fused op. `mlp` None (a
    plain Attention without LinFusion's MLPs) gives x unchanged."""
    if mlp is None:
        return x
    if (
        isinstance(mlp, nn.Sequential)
        and len(mlp) == 4
        and isinstance(mlp[1], nn.LayerNorm)
        and mlp[1].weight is not None
        and mlp[1].bias is not None
        and isinstance(mlp[2], nn.LeakyReLU)
    ):
        # Calling mlp[0] and mlp[3] as modules keeps PEFT adapters and hooks on them working.
        norm = mlp[1]
        mid = layer_norm_leaky_relu(
            mlp[0](x), norm.weight, norm.bias, eps=norm.eps, negative_slope=mlp[2].negative_slope
        )
        return x + mlp[3](mid)
    return x + mlp(x)
