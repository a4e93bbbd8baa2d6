"""linfusion_ops: CUDA and C++ kernels for LinFusion's generalized linear attention and
LongAlign's segment-level text encoding, as PyTorch custom ops with autograd."""

from ._library import build_info, compiled
from .ops import (
    layer_norm_leaky_relu,
    linear_attention,
    linear_attention_apply,
    linear_attention_state,
    merge_segments,
)

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "compiled",
    "layer_norm_leaky_relu",
    "linear_attention",
    "linear_attention_apply",
    "linear_attention_state",
    "merge_segments",
]
