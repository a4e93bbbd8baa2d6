"""linfusion_ops: CUDA and C++ kernels for LinFusion's generalized linear attention and
LongAlign's segment-level text encoding, as PyTorch custom ops with autograd.

The diffusers integration (LinFusion, LinFusionAttnProcessor), the long-prompt encoder
(LongPromptEncoder), LongSD's T5 path (LongSDAdapter, load_longsd_lora), LongAlign's preference
optimization (CLIPPreferenceScorer, RewardSampler, linfusion_ops.preference), LinFusion
distillation (linfusion_ops.training: Attn1FeatureTap, distillation_loss), the high-resolution
pipelines (linfusion_ops.highres) and linfusion_ops.distributed load on first use, so `import linfusion_ops` needs only torch.
"""

import importlib

from ._library import build_info, compiled
from .ops import (
    layer_norm_leaky_relu,
    linear_attention,
    linear_attention_apply,
    linear_attention_state,
    merge_segments,
)

__version__ = "0.1.0"

_LAZY = {
    "LinFusion": "linfusion_ops.linfusion",
    "LinFusionAttnProcessor": "linfusion_ops.linfusion",
    "LongPromptEncoder": "linfusion_ops.long_prompt",
    "CLIPPreferenceScorer": "linfusion_ops.preference",
    "RewardSampler": "linfusion_ops.preference",
    "LongSDAdapter": "linfusion_ops.longsd",
    "load_longsd_lora": "linfusion_ops.longsd",
    "distributed": "linfusion_ops.distributed",
    "training": "linfusion_ops.training",
    "Attn1FeatureTap": "linfusion_ops.training",
    "distillation_loss": "linfusion_ops.training",
    "highres": "linfusion_ops.highres",
    "LinFusionHighResPipeline": "linfusion_ops.highres.pipeline",
    "LinFusionHighResXLPipeline": "linfusion_ops.highres.pipeline",
}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if _LAZY[name] == f"{__name__}.{name}" else getattr(module, name)
    raise AttributeError(f"module 'linfusion_ops' has no attribute {name!r}")


__all__ = [
    "build_info",
    "compiled",
    "layer_norm_leaky_relu",
    "linear_attention",
    "linear_attention_apply",
    "linear_attention_state",
    "merge_segments",
    "LinFusion",
    "LinFusionAttnProcessor",
    "LongPromptEncoder",
    "CLIPPreferenceScorer",
    "RewardSampler",
    "LongSDAdapter",
    "load_longsd_lora",
    "distributed",
    "training",
    "Attn1FeatureTap",
    "distillation_loss",
    "highres",
    "LinFusionHighResPipeline",
    "LinFusionHighResXLPipeline",
]
