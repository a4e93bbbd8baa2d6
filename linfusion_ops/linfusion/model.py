"""Drop-in LinFusion for diffusers Stable Diffusion UNets, on linfusion_ops' fused kernels (the
attention itself is linfusion_ops.linfusion.processor's).

`LinFusion` reads and writes the official checkpoints (Yuanshi/LinFusion-1-5, -2-1, -XL) and
owns their parameters under the official names; mounting it on a UNet swaps the projections of
every self-attention (attn1) for the checkpoint's and sets a `LinFusionAttnProcessor`, which
computes LinFusion's generalized linear attention with `linfusion_ops.linear_attention` and the
kernel-function MLPs with `linfusion_ops.layer_norm_leaky_relu`:

    q = to_q(x + mlp_q(x)),  k = to_k(c + mlp_k(c)),  v = to_v(c)     (c = x for self-attention)
    o = to_out(linear_attention(q, k, v, heads, feature_map="elu", eps=1e-4))

Only attn1 is replaced; cross-attention, IP-Adapter processors, ControlNets and PEFT adapters
keep running as they are. Shapes: B batch, N tokens, C channels, H heads.
"""

import functools
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from ..optional import needs

with needs(__name__):  # a missing extra is a one-line MissingExtraError
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.attention_processor import Attention
    from diffusers.utils import logging

from .kernel_mlp import kernel_mlp
from .processor import LinFusionAttnProcessor

logger = logging.get_logger(__name__)

# The official pipeline -> checkpoint mapping (Huage001/LinFusion, src/linfusion/linfusion.py).
MODEL_DICT = {
    "runwayml/stable-diffusion-v1-5": "Yuanshi/LinFusion-1-5",
    "SG161222/Realistic_Vision_V4.0_noVAE": "Yuanshi/LinFusion-1-5",
    "Lykon/dreamshaper-8": "Yuanshi/LinFusion-1-5",
    "stabilityai/stable-diffusion-2-1": "Yuanshi/LinFusion-2-1",
    "stabilityai/stable-diffusion-xl-base-1.0": "Yuanshi/LinFusion-XL",
}

# The projections that LinFusion distils and that mounting replaces on the UNet's attn1.
_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
_KERNEL_MLPS = ("to_q_", "to_k_")


class GeneralizedLinearAttention(Attention):
    """One LinFusion layer as the official checkpoints store it: a diffusers Attention with
    query_dim = out_dim = dim_n and dim_n // heads channels per head, plus the kernel MLPs
    `to_q_` and `to_k_` (see `kernel_mlp`), running `LinFusionAttnProcessor`. Parameters:
    to_q/to_k/to_v.weight (dim_n, dim_n), to_out.0.weight/bias, to_q_/to_k_ .0 (Linear),
    .1 (LayerNorm), .3 (Linear). Callable on its own with hidden_states (B, N, dim_n)."""

    def __init__(self, dim_n: int, heads: int, projection_mid_dim: Optional[int] = None):
        if dim_n % heads:
            raise ValueError(f"LinFusion: dim_n ({dim_n}) must be divisible by heads ({heads})")
        super().__init__(
            query_dim=dim_n, out_dim=dim_n, dim_head=dim_n // heads, processor=LinFusionAttnProcessor()
        )
        self.to_q_ = kernel_mlp(dim_n, projection_mid_dim)
        self.to_k_ = kernel_mlp(dim_n, projection_mid_dim)


def _resolve_unet(pipeline, unet):
    if unet is not None:
        return unet
    if pipeline is None or getattr(pipeline, "unet", None) is None:
        raise ValueError("LinFusion: pass a `unet`, or a `pipeline` that has one")
    return pipeline.unet


def is_self_attention(name: str, module: nn.Module) -> bool:
    """Whether `module`, named `name` in a UNet, is a self-attention that LinFusion replaces: a
    diffusers Attention called attn1 that is not configured as cross-attention."""
    # The official code selects the UNet's attn1 modules; is_cross_attention guards against
    # an attn1 that is configured as cross-attention (only_cross_attention blocks).
    return (
        isinstance(module, Attention)
        and name.rsplit(".", 1)[-1] == "attn1"
        and not module.is_cross_attention
    )


class _Mount:
    """What mounting changed on one UNet, to undo it exactly."""

    def __init__(self, unet: nn.Module):
        self.unet = unet
        # (attn module, its submodules, its processor, its fused_projections flag), as they
        # were before mounting.
        self.saved: List[tuple] = []


class LinFusion(ModelMixin, ConfigMixin):
    """LinFusion's linear-attention layers for a Stable Diffusion UNet (API of the official class).

    Config: `modules_list`, one entry per UNet self-attention (attn1) module,
    `{"module_name": "down_blocks.0.attentions.0.transformer_blocks.0.attn1", "dim_n": 320,
    "heads": 8, "projection_mid_dim": None}` (projection_mid_dim: None -> MLP width dim_n,
    an int -> that width (dim_n // 16 in LinFusion-XL), -1 -> no MLP).

    Parameters are owned here under the official names (`0.to_q.weight`, `0.to_q_.1.weight`,
    ...), so `from_pretrained` reads an official folder or hub repository unchanged and
    `save_pretrained` writes one. `mount_to` lends these modules to the UNet (shared, not
    copied: training `linfusion.parameters()` trains the mounted UNet); `unmount` undoes it.

    Usage:
        pipe = StableDiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5")
        linfusion = LinFusion.construct_for(pipe)        # Yuanshi/LinFusion-1-5, mounted
    """

    @register_to_config
    def __init__(self, modules_list: List[Dict]):
        super().__init__()
        self.modules_dict = {}
        for i, entry in enumerate(modules_list):
            layer = GeneralizedLinearAttention(
                entry["dim_n"], entry["heads"], entry["projection_mid_dim"]
            )
            self.add_module(str(i), layer)
            self.modules_dict[entry["module_name"]] = layer
        self._mounts: List[_Mount] = []

    @classmethod
    def get_default_config(cls, pipeline=None, unet=None, mid_dim_scale: Optional[int] = None) -> Dict:
        """The config for a UNet (or a pipeline's): one entry per self-attention attn1 module,
        dim_n = its query width, heads = its heads, projection_mid_dim None (the official
        default), or dim_n // mid_dim_scale when given (LinFusion-XL was distilled with 16)."""
        unet = _resolve_unet(pipeline, unet)
        modules_list = []
        for name, module in unet.named_modules():
            if is_self_attention(name, module):
                dim_n = module.to_q.weight.shape[0]
                modules_list.append(
                    {
                        "module_name": name,
                        "dim_n": dim_n,
                        "heads": module.heads,
                        "projection_mid_dim": None if mid_dim_scale is None else dim_n // mid_dim_scale,
                    }
                )
        if not modules_list:
            raise ValueError("LinFusion: the UNet has no self-attention (attn1) Attention modules")
        return {"modules_list": modules_list}

    @classmethod
    def construct_for(
        cls,
        pipeline=None,
        unet=None,
        load_pretrained: bool = True,
        pretrained_model_name_or_path=None,
        pipe_name_path: Optional[str] = None,
    ) -> "LinFusion":
        """Build a LinFusion for a pipeline's (or a bare) UNet and mount it.

        load_pretrained: read `pretrained_model_name_or_path` (a local folder or hub repository);
        without it, the checkpoint matched to the pipeline's `_name_or_path` (or
        `pipe_name_path`) by the official mapping `MODEL_DICT`. load_pretrained=False builds
        the default config and starts the projections from the UNet's own attn1 weights (the
        teacher's), the usual start for distillation. Moves LinFusion to the UNet's device and
        dtype. Returns the mounted LinFusion.
        """
        unet = _resolve_unet(pipeline, unet)
        if load_pretrained:
            if not pretrained_model_name_or_path:
                if pipe_name_path is None and pipeline is not None:
                    pipe_name_path = pipeline.config.get("_name_or_path")
                pretrained_model_name_or_path = MODEL_DICT.get(pipe_name_path)
                if pretrained_model_name_or_path is None:
                    raise ValueError(
                        f"LinFusion: no checkpoint known for pipeline {pipe_name_path!r} (known: "
                        f"{sorted(MODEL_DICT)}); pass pretrained_model_name_or_path"
                    )
                logger.info(f"LinFusion: using {pretrained_model_name_or_path} for {pipe_name_path}")
            linfusion = cls.from_pretrained(pretrained_model_name_or_path)
        else:
            linfusion = cls(**cls.get_default_config(unet=unet))
            linfusion._copy_projections_from(unet)
        linfusion.mount_to(unet=unet)
        return linfusion

    @torch.no_grad()
    def _copy_projections_from(self, unet) -> None:
        for name, layer in self.modules_dict.items():
            attn = unet.get_submodule(name)
            for proj in _PROJECTIONS:
                getattr(layer, proj).load_state_dict(getattr(attn, proj).state_dict())

    def _check_target(self, name: str, layer: Attention, attn: nn.Module) -> None:
        if not isinstance(attn, Attention):
            raise ValueError(f"LinFusion: {name} is a {type(attn).__name__}, not a diffusers Attention")
        if isinstance(attn.processor, LinFusionAttnProcessor):
            raise ValueError(f"LinFusion: {name} already runs LinFusion; unmount it first")
        for proj in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            if hasattr(proj, "base_layer"):
                raise ValueError(
                    f"LinFusion: {name} carries a PEFT adapter; mount LinFusion before "
                    "loading LoRA adapters (they then apply to LinFusion's projections)"
                )
        dim, out_dim = attn.to_q.in_features, attn.to_out[0].out_features
        if (dim, out_dim, attn.heads) != (layer.to_q.in_features, dim, layer.heads):
            raise ValueError(
                f"LinFusion: {name} has width {dim} and {attn.heads} heads, but the LinFusion entry "
                f"expects width {layer.to_q.in_features} and {layer.heads} heads: wrong checkpoint "
                "for this UNet?"
            )

    def mount_to(self, pipeline=None, unet=None) -> None:
        """Run LinFusion in the UNet's self-attention: each configured attn1 module gets
        LinFusion's to_q/to_k/to_v/to_out and kernel MLPs (the same module objects, so training
        and `save_pretrained` see one set of weights) and a LinFusionAttnProcessor. Moves
        LinFusion to the UNet's device and dtype.

        While mounted, diffusers calls that would set another processor on these modules
        (attention slicing, fused QKV projections, set_attn_processor) leave LinFusion's in
        place with a warning (diffusers' set_default_attn_processor refuses): the distilled
        projections only make sense with linear attention. Call `unmount` to go back to the
        UNet's own attention (unmount the UNet before saving it, too: while mounted its state
        dict holds LinFusion's weights).
        """
        unet = _resolve_unet(pipeline, unet)
        if any(mount.unet is unet for mount in self._mounts):
            raise ValueError("LinFusion: already mounted on this UNet")
        targets = []
        for name, layer in self.modules_dict.items():
            try:
                attn = unet.get_submodule(name)
            except AttributeError as exc:
                raise ValueError(
                    f"LinFusion: the UNet has no module {name!r}: wrong checkpoint?"
                ) from exc
            self._check_target(name, layer, attn)
            targets.append((attn, layer))

        # nn.Module.to: ModelMixin.to warns about fp32-kept modules even when there are none.
        nn.Module.to(self, device=unet.device, dtype=unet.dtype)
        mount = _Mount(unet)
        for attn, layer in targets:
            mount.saved.append((attn, dict(attn._modules), attn.processor, attn.fused_projections))
            for name in ("to_q", "to_k", "to_v") + _KERNEL_MLPS:
                setattr(attn, name, getattr(layer, name))
            # A list of its own, holding LinFusion's modules: an adapter that PEFT later wraps
            # around attn.to_out[0] must not change LinFusion's parameter names.
            attn.to_out = nn.ModuleList(list(layer.to_out))
            # The distilled weights are not fused: the processor uses to_q/to_k/to_v.
            attn.fused_projections = False
            attn._modules.pop("to_qkv", None)
            attn._modules.pop("to_kv", None)
            attn.set_processor(LinFusionAttnProcessor())
            attn.set_processor = functools.partial(_keep_linfusion_processor, attn)
        self._mounts.append(mount)

    def unmount(self, pipeline=None, unet=None) -> None:
        """Undo `mount_to`: each attn1 module gets back the submodules and processor it had,
        moved to the device and dtype the UNet has now (a no-op when unchanged, so the UNet is
        then restored bit for bit)."""
        unet = _resolve_unet(pipeline, unet)
        mount = next((m for m in self._mounts if m.unet is unet), None)
        if mount is None:
            raise ValueError("LinFusion: not mounted on this UNet")
        # LinFusion's parameters live in the UNet while mounted, so they follow its .to().
        reference = next(self.parameters())
        for attn, modules, processor, fused in mount.saved:
            del attn.__dict__["set_processor"]
            attn._modules.clear()
            for name, module in modules.items():
                if module is not None:
                    module.to(device=reference.device, dtype=reference.dtype)
                attn._modules[name] = module
            attn.set_processor(processor)
            attn.fused_projections = fused
        self._mounts.remove(mount)


def has_linfusion(unet) -> bool:
    """Whether a LinFusion is mounted on `unet` (its self-attention runs LinFusionAttnProcessor)."""
    return any(isinstance(p, LinFusionAttnProcessor) for p in unet.attn_processors.values())


def _keep_linfusion_processor(attn: Attention, processor) -> None:
    """set_processor of a mounted attn1 module: takes LinFusion processors, keeps LinFusion in
    place of any other (slicing, fused or softmax processors would run the distilled
    projections with softmax attention)."""
    if isinstance(processor, LinFusionAttnProcessor):
        Attention.set_processor(attn, processor)
        return
    # warnings.warn shows each message once, not once per attn1 module.
    warnings.warn(
        f"LinFusion: keeping LinFusionAttnProcessor on the mounted self-attention modules instead "
        f"of {type(processor).__name__}; call LinFusion.unmount() to restore the UNet's own attention",
        UserWarning,
        stacklevel=3,
    )
