"""LongAlign's LoRA layout on a diffusers UNet: which layers carry LoRA in the official code
(:func:`longalign_lora_targets`, in the order of the official ``lora_vis.pt``), a PEFT adapter in
that layout (:func:`add_longalign_lora`), and conversions between the adapter and the official
``lora_vis.pt`` list (:func:`lora_to_longalign_list`, :func:`lora_from_longalign_list`)."""

from typing import List, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "LONGALIGN_LORA_BLOCKS",
    "longalign_lora_targets",
    "add_longalign_lora",
    "lora_to_longalign_list",
    "lora_from_longalign_list",
]

# The blocks whose Linear and Conv2d layers carry LoRA in the official code: every ResNet block
# (conv1, time_emb_proj, conv2, conv_shortcut), every attention (attn1 and attn2: to_q, to_k,
# to_v, to_out.0) and every GEGLU (proj).
LONGALIGN_LORA_BLOCKS = ("ResnetBlock2D", "Attention", "GEGLU")
# LinFusion's kernel MLPs sit inside mounted attn1 modules; they are not part of the layout, so
# a UNet gets the same list with or without LinFusion.
_EXCLUDED = ("to_q_", "to_k_")


def longalign_lora_targets(unet: nn.Module) -> List[str]:
    """Full names of the UNet layers that carry LoRA in LongAlign's layout, in the official
    order (the order of ``lora_vis.pt``): blocks in ``unet.modules()`` order, then the layers of
    each block in its own ``named_modules()`` order. A layer already wrapped by PEFT counts as
    the layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = []
    for block_name, block in unet.named_modules():
        if type(block).__name__ not in LONGALIGN_LORA_BLOCKS:
            continue
        skip = None
        for name, module in block.named_modules():
            if not name or (skip is not None and name.startswith(skip)):
                continue
            if name.split(".")[0] in _EXCLUDED:
                continue
            if isinstance(module, BaseTunerLayer):
                skip = name + "."
                targets.append(f"{block_name}.{name}")
            elif type(module) in (nn.Linear, nn.Conv2d):
                targets.append(f"{block_name}.{name}")
    return targets


def add_longalign_lora(unet, rank: int = 32, dropout: float = 0.0, adapter_name: str = "default") -> List[str]:
    """Add a PEFT LoRA adapter in LongAlign's layout (:func:`longalign_lora_targets`) to a
    diffusers UNet and return the targeted names. As in the official code: scale 1
    (``lora_alpha = rank``), down weights ~ N(0, 1/rank²), up weights zero. ``dropout``: PEFT's
    ``lora_dropout``, applied to the LoRA branch's input (the official LoRA layers drop its
    output, with p = 0.1). Mount LinFusion first if it is used: the adapter then wraps
    LinFusion's projections. The UNet's other parameters are left as they are (freeze them
    with ``unet.requires_grad_(False)`` before)."""
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"add_longalign_lora: rank must be a positive int, got {rank!r}")
    targets = longalign_lora_targets(unet)
    if not targets:
        raise ValueError(f"add_longalign_lora: the UNet has no {'/'.join(LONGALIGN_LORA_BLOCKS)} layers")
    config = LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets
    )
    unet.add_adapter(config, adapter_name=adapter_name)
    return targets


def _adapter_name(unet, adapter_name: Optional[str]) -> str:
    names = list(getattr(unet, "peft_config", None) or {})
    if adapter_name is not None:
        return adapter_name
    if len(names) != 1:
        raise ValueError(f"LongAlign LoRA: the UNet has adapters {names}; pass adapter_name")
    return names[0]


def _lora_layers(unet, adapter_name: str):
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = []
    for name in longalign_lora_targets(unet):
        layer = unet.get_submodule(name)
        if not isinstance(layer, BaseTunerLayer) or adapter_name not in layer.lora_A:
            raise ValueError(f"LongAlign LoRA: {name} has no LoRA adapter {adapter_name!r} (see add_longalign_lora)")
        layers.append((name, layer))
    return layers


@torch.no_grad()
def lora_to_longalign_list(
    unet, adapter_name: Optional[str] = None, dtype: Optional[torch.dtype] = torch.float16
) -> List[torch.Tensor]:
    """The adapter as the official ``lora_vis.pt`` list ``[up_0, down_0, up_1, down_1, ...]``
    in :func:`longalign_lora_targets` order, on CPU: up (out, r) or (out, r, 1, 1), down (r, in)
    or (r, in, kh, kw), the PEFT scaling folded into up (the official layers have scale 1).
    ``dtype``: fp16 as the official ``save_lora_weight`` writes; None keeps the weights' dtype.
    ``adapter_name``: None for the UNet's only adapter. Save with
    ``torch.save(list, "lora_vis.pt")``."""
    adapter_name = _adapter_name(unet, adapter_name)
    weights = []
    for _, layer in _lora_layers(unet, adapter_name):
        up = layer.lora_B[adapter_name].weight * layer.scaling[adapter_name]
        down = layer.lora_A[adapter_name].weight
        weights += [w.detach().to("cpu", dtype or w.dtype).clone() for w in (up, down)]
    return weights


@torch.no_grad()
def lora_from_longalign_list(unet, weights: Sequence[torch.Tensor], adapter_name: str = "default", dropout: float = 0.0) -> None:
    """Load an official ``lora_vis.pt`` list (``torch.load(path)``) into the UNet's adapter
    ``adapter_name``, adding it (rank from the list) if the UNet has none. The list must hold
    one (up, down) pair per :func:`longalign_lora_targets` layer with matching shapes."""
    if isinstance(weights, (str, bytes)) or not all(isinstance(w, torch.Tensor) for w in weights):
        raise TypeError("lora_from_longalign_list: weights must be a list of tensors (torch.load the lora_vis.pt file)")
    weights = list(weights)
    targets = longalign_lora_targets(unet)
    if len(weights) != 2 * len(targets):
        raise ValueError(
            f"lora_from_longalign_list: the UNet has {len(targets)} LoRA layers in LongAlign's layout, so the "
            f"list must hold {2 * len(targets)} tensors; got {len(weights)}"
        )
    if not getattr(unet, "peft_config", None) or adapter_name not in unet.peft_config:
        add_longalign_lora(unet, rank=weights[1].shape[0], dropout=dropout, adapter_name=adapter_name)
    for i, (name, layer) in enumerate(_lora_layers(unet, adapter_name)):
        up, down = weights[2 * i], weights[2 * i + 1]
        for kind, target, value in (("up", layer.lora_B[adapter_name].weight, up), ("down", layer.lora_A[adapter_name].weight, down)):
            if value.shape != target.shape:
                raise ValueError(
                    f"lora_from_longalign_list: {name}: {kind} weight {2 * i + (kind == 'down')} has shape "
                    f"{tuple(value.shape)}, expected {tuple(target.shape)}"
                )
        layer.lora_B[adapter_name].weight.copy_(up / layer.scaling[adapter_name])
        layer.lora_A[adapter_name].weight.copy_(down)
