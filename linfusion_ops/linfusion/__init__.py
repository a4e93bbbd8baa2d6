"""linfusion_ops.linfusion: LinFusion (Liu et al., 2024) on linfusion_ops' kernels.

* `LinFusion`, `has_linfusion`, `is_self_attention`, `GeneralizedLinearAttention`,
  `MODEL_DICT` (model): the official checkpoints' layers, mounted on a diffusers UNet's
  self-attention.
* `LinFusionAttnProcessor`, `linfusion_attention`, `FusedCore`, `TokenChunkedCore`,
  `LINFUSION_EPS` (processor): the one attention body and its cores.
* `apply_kernel_mlp` (and the module kernel_mlp): LinFusion's kernel-function MLPs.
* `SequenceParallelLinFusionAttnProcessor`, `SequenceParallelCore`, `token_slice`
  (distributed): sequence-parallel LinFusion attention over torch.distributed ranks (its
  `linear_attention` is `linfusion_ops.linfusion.distributed.linear_attention`).
* `Attn1FeatureTap`, `distillation_loss`, ... (distillation): what one distillation step
  computes; `linfusion_ops.linfusion.distill` is the training script built on it
  (`python -m linfusion_ops.linfusion.distill --help`).

Every name loads its module on first use, so importing the package costs nothing.
"""

from ..optional import lazy_getattr

_LAZY = {
    "LinFusion": ".model",
    "GeneralizedLinearAttention": ".model",
    "MODEL_DICT": ".model",
    "has_linfusion": ".model",
    "is_self_attention": ".model",
    "LinFusionAttnProcessor": ".processor",
    "linfusion_attention": ".processor",
    "FusedCore": ".processor",
    "TokenChunkedCore": ".processor",
    "LINFUSION_EPS": ".processor",
    "apply_kernel_mlp": ".kernel_mlp",
    "SequenceParallelLinFusionAttnProcessor": ".distributed",
    "SequenceParallelCore": ".distributed",
    "token_slice": ".distributed",
    "Attn1FeatureTap": ".distillation",
    "DistillationLoss": ".distillation",
    "distillation_loss": ".distillation",
    "distillation_forward": ".distillation",
    "init_linfusion": ".distillation",
    "teacher_forward": ".distillation",
    "trainable_parameters": ".distillation",
}

_SUBMODULES = ("model", "processor", "kernel_mlp", "distributed", "distillation", "distill")


__getattr__ = lazy_getattr(__name__, _LAZY, _SUBMODULES)


__all__ = sorted(_LAZY)
