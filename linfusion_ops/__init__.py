"""linfusion_ops: CUDA and C++ kernels for LinFusion's generalized linear attention and
LongAlign's segment-level text encoding, as PyTorch custom ops with autograd.

The op layer (this package's ops, reference, emulated) needs only torch. The features live in
one package per paper and load on first use:

* linfusion_ops.linfusion: LinFusion for diffusers UNets (LinFusion, LinFusionAttnProcessor),
  sequence-parallel attention (linfusion.distributed) and distillation (linfusion.distillation,
  the training script linfusion.distill);
* linfusion_ops.longalign: the long-prompt encoder (LongPromptEncoder), LongSD's T5 path
  (LongSDAdapter, load_longsd_lora), the LoRA layout (longalign.lora), the preference score and
  reward sampler (CLIPPreferenceScorer, RewardSampler) and the fine-tuning script
  (longalign.finetune);
* linfusion_ops.highres: the ultra-high-resolution pipelines.

The names below resolve lazily, so `import linfusion_ops` imports neither diffusers nor
transformers. The module paths of the flat layout (linfusion_ops.training, .distributed,
.preference, .long_prompt, .longsd, .kernel_mlp, .distill) still work for one release, with a
DeprecationWarning.
"""

from . import _deprecated
from .optional import import_module
from ._library import build_info, compiled
from .ops import (
    layer_norm_leaky_relu,
    linear_attention,
    linear_attention_apply,
    linear_attention_state,
    merge_segments,
)

# The one place of the version: setup.py and pyproject.toml read it from here.
__version__ = "0.1.0"

_deprecated.install()

_LAZY = {
    "linfusion": "linfusion_ops.linfusion",
    "longalign": "linfusion_ops.longalign",
    "highres": "linfusion_ops.highres",
    "LinFusion": "linfusion_ops.linfusion.model",
    "LinFusionAttnProcessor": "linfusion_ops.linfusion.processor",
    "has_linfusion": "linfusion_ops.linfusion.model",
    "Attn1FeatureTap": "linfusion_ops.linfusion.distillation",
    "distillation_loss": "linfusion_ops.linfusion.distillation",
    "LongPromptEncoder": "linfusion_ops.longalign.long_prompt",
    "LongSDAdapter": "linfusion_ops.longalign.longsd",
    "load_longsd_lora": "linfusion_ops.longalign.longsd",
    "CLIPPreferenceScorer": "linfusion_ops.longalign.preference",
    "RewardSampler": "linfusion_ops.longalign.preference",
    "LinFusionHighResPipeline": "linfusion_ops.highres.pipeline",
    "LinFusionHighResXLPipeline": "linfusion_ops.highres.pipeline",
}


def __getattr__(name):
    if name in _LAZY:
        module = import_module(_LAZY[name])
        return module if _LAZY[name] == f"{__name__}.{name}" else getattr(module, name)
    if f"{__name__}.{name}" in _deprecated.MOVED:
        return _deprecated.moved_module(f"{__name__}.{name}", stacklevel=2)
    raise AttributeError(f"module 'linfusion_ops' has no attribute {name!r}")


__all__ = [
    "build_info",
    "compiled",
    "layer_norm_leaky_relu",
    "linear_attention",
    "linear_attention_apply",
    "linear_attention_state",
    "merge_segments",
    *_LAZY,
]
