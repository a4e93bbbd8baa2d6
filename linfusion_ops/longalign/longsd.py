"""LongSD, LongAlign's released Stable Diffusion 1.5 model: its T5 text path and UNet LoRA weights.

LongSD conditions the UNet on two token sequences concatenated on the token axis:

    [ CLIP segment-level encoding (240 tokens) ; adapter(T5-large(prompt, 240 tokens)) ]   (B, 480, 768)

The first part is `LongPromptEncoder`'s ``"longalign"`` policy; the second runs the whole prompt
through a T5 encoder (truncated or padded to 240 tokens, no attention mask) and maps its 1024
channels to the UNet's 768 with LaVi-Bridge's adapter, `LongSDAdapter`. `LongPromptEncoder` takes
the T5 path as ``t5_tokenizer``/``t5_encoder``/``t5_adapter`` (see `T5TextPath`). The UNet itself
is SD 1.5 with LoRA deltas merged into its weights: `load_longsd_lora` reads the released
``*.pt`` files (bare lists of LoRA factors, in the UNet's module order).
"""

import os
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..optional import needs

with needs(__name__):  # a missing extra is a one-line MissingExtraError
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.attention import FeedForward
    from diffusers.models.model_loading_utils import load_state_dict
    from diffusers.utils.torch_utils import get_module_execution_device

from .lora import longalign_lora_targets

__all__ = ["LongSDAdapter", "T5TextPath", "load_longsd_lora"]


class LongSDAdapter(ModelMixin, ConfigMixin):
    """LaVi-Bridge's text adapter (LongSD's T5 → UNet bridge), under the official parameter names.

    ``x → FeedForward(in_dim → int_dim)(LayerNorm(x)) → FeedForward(int_dim → out_dim)(LayerNorm(·))``,
    each FeedForward a GEGLU (``Linear(d, 2·4d)``, value half × GELU(gate half), exact GELU),
    dropout 0.1 (training only) and ``Linear(4d, d_out)``. Parameters: ``norm1.*`` (in_dim),
    ``ff1.net.0.proj.*``, ``ff1.net.2.*``, ``norm2.*`` (int_dim), ``ff2.net.0.proj.*``,
    ``ff2.net.2.*``. The defaults are the released T5-large → SD 1.5 adapter (1024, 896, 768).

    ``from_pretrained`` reads the official adapter folders unchanged (LaVi-Bridge's
    ``t5_unet/adapter``, LongSD's ``s28750_adapter``: a diffusers folder with ``config.json`` and
    ``diffusion_pytorch_model.{bin,safetensors}``), a hub repository (``subfolder=``), or a bare
    state-dict file with the official names (the sizes are read from the tensors);
    ``save_pretrained`` writes the official folder format.

    Shapes: ``forward(hidden_states)``: (..., in_dim) → (..., out_dim), in the adapter's dtype.
    """

    @register_to_config
    def __init__(self, in_dim: int = 1024, int_dim: int = 896, out_dim: int = 768):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim)
        self.ff1 = FeedForward(in_dim, int_dim, mult=4, dropout=0.1, activation_fn="geglu")
        self.norm2 = nn.LayerNorm(int_dim)
        self.ff2 = FeedForward(int_dim, out_dim, mult=4, dropout=0.1, activation_fn="geglu")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[-1] != self.config.in_dim:
            raise ValueError(
                f"LongSDAdapter: hidden_states must have in_dim = {self.config.in_dim} channels "
                f"(the T5 encoder's d_model), got shape {tuple(hidden_states.shape)}"
            )
        return self.ff2(self.norm2(self.ff1(self.norm1(hidden_states))))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> "LongSDAdapter":
        """A folder or hub repository (diffusers' ``ModelMixin.from_pretrained``, keyword arguments
        included), or a state-dict file (``.bin``, ``.pt``, ``.safetensors``) with the official
        parameter names, loaded strictly; ``torch_dtype=`` applies to both."""
        if not os.path.isfile(pretrained_model_name_or_path):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        unexpected = set(kwargs) - {"torch_dtype"}
        if unexpected:
            raise TypeError(
                f"LongSDAdapter.from_pretrained: a weights file takes only torch_dtype, got {sorted(unexpected)}"
            )
        state_dict = load_state_dict(pretrained_model_name_or_path)
        try:
            dims = (state_dict["norm1.weight"].shape[0], state_dict["norm2.weight"].shape[0],
                    state_dict["ff2.net.2.weight"].shape[0])
        except KeyError as exc:
            raise ValueError(
                f"LongSDAdapter.from_pretrained: {pretrained_model_name_or_path} is not an adapter state dict "
                f"(no {exc.args[0]!r}; expected LaVi-Bridge's names norm1.*, ff1.net.0.proj.*, ...)"
            ) from None
        adapter = cls(*dims)
        adapter.load_state_dict(state_dict, strict=True)
        if kwargs.get("torch_dtype") is not None:
            adapter.to(kwargs["torch_dtype"])
        return adapter.eval()


def config_value(module, *names):
    """The first of ``module.config.<name>`` for ``names`` that is set (not None), or None when
    none is or ``module`` has no config (diffusers and transformers models both keep theirs
    there)."""
    config = getattr(module, "config", None)
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


class T5TextPath:
    """LongSD's second conditioning half: ``adapter(T5(prompt))``, batched.

    Each text is tokenized whole (``max_tokens`` tokens: truncated, ``</s>`` kept at the end, padded
    with ``<pad>``) and encoded with the T5 encoder's last hidden state WITHOUT an attention mask,
    as LongSD was trained: its UNet saw the encoder's outputs at the pad positions too. The adapter
    maps them to the UNet's cross-attention channels. `LongPromptEncoder` builds one from its
    ``t5_*`` arguments; ``__call__(texts)`` returns (len(texts), max_tokens, out_dim) in the
    adapter's dtype on its execution device.
    """

    def __init__(self, tokenizer, encoder, adapter, max_tokens: int, channels: Optional[int] = None):
        if tokenizer is None or encoder is None or adapter is None:
            raise ValueError(
                "LongPromptEncoder: pass t5_tokenizer, t5_encoder and t5_adapter together (LongSD), or none"
            )
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ValueError(f"LongPromptEncoder: t5_max_tokens must be a positive int, got {max_tokens!r}")
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError("LongPromptEncoder: t5_tokenizer has no pad_token_id")
        in_dim, out_dim = config_value(adapter, "in_dim"), config_value(adapter, "out_dim")
        if in_dim is None or out_dim is None:
            raise TypeError(
                f"LongPromptEncoder: t5_adapter must be a LongSDAdapter (config.in_dim / config.out_dim), "
                f"got {type(adapter).__name__}"
            )
        d_model = config_value(encoder, "d_model", "hidden_size")
        if d_model is not None and d_model != in_dim:
            raise ValueError(
                f"LongPromptEncoder: t5_adapter takes in_dim = {in_dim} channels but t5_encoder outputs "
                f"d_model = {d_model} (the released adapter is for T5-large, d_model 1024)"
            )
        if channels is not None and channels != out_dim:
            raise ValueError(
                f"LongPromptEncoder: t5_adapter outputs out_dim = {out_dim} channels but the CLIP embeddings "
                f"have {channels}; both halves of the conditioning must have the UNet's cross-attention dim"
            )
        self.tokenizer, self.encoder, self.adapter = tokenizer, encoder, adapter
        self.max_tokens = max_tokens
        self.out_dim = out_dim

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        input_ids = self.tokenizer(
            list(texts), max_length=self.max_tokens, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids.to(get_module_execution_device(self.encoder))
        hidden = self.encoder(input_ids=input_ids)[0]
        dtype = next(self.adapter.parameters()).dtype
        return self.adapter(hidden.to(device=get_module_execution_device(self.adapter), dtype=dtype))


def _expected_factors(layer: nn.Module, rank: int) -> Tuple[tuple, tuple]:
    out_features, in_features = layer.weight.shape[:2]
    if isinstance(layer, nn.Conv2d):
        return (out_features, rank, 1, 1), (rank, in_features, *layer.weight.shape[2:])
    return (out_features, rank), (rank, in_features)


def load_longsd_lora(
    unet: nn.Module, *loras: Union[str, os.PathLike, Sequence[torch.Tensor]], scale: float = 1.0
) -> None:
    """Merge LongSD's released UNet LoRA weights into ``unet`` (in place), as the official
    sample.py does: ``W += scale · up @ down`` for each layer of LongAlign's LoRA layout
    (`linfusion_ops.longalign.lora.longalign_lora_targets`: every Linear and Conv2d of the ResNet
    blocks, attention modules and GEGLUs, in ``unet.modules()`` order).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (SD 1.5 for the released files). With
            LinFusion mounted, the attn1 deltas go to LinFusion's projections (the mounted
            modules, shared with the LinFusion object), as a PEFT adapter loaded after mounting
            would; LinFusion's kernel MLPs are not LoRA layers. A layer wrapped by PEFT gets the
            delta in its base weight.
        loras: one or more ``*.pt`` files (or the loaded lists), merged in order. A file is the
            official format: a flat list ``[up_0, down_0, up_1, down_1, ...]`` with, per layer,
            up (out, r) and down (r, in) for a Linear, up (out, r, 1, 1) and down
            (r, in, kh, kw) for a Conv2d. The released LongSD is
            ``load_longsd_lora(unet, "s28750_lora_vis.pt", "sd15-reward-3750.pt")``.
        scale: multiplies every delta (1.0 is the official merge).

    Each delta is computed and added in fp32 and the weight cast back to its dtype. Every
    factor's shape is checked against its layer before anything is merged: a file for another
    UNet raises ``ValueError`` naming the first layer that does not fit. To keep the LoRA as an
    unmerged PEFT adapter instead, use `linfusion_ops.longalign.lora.lora_from_longalign_list`.
    """
    if not loras:
        raise ValueError("load_longsd_lora: pass at least one LoRA file or list")
    layers = []
    for name in longalign_lora_targets(unet):
        layer = unet.get_submodule(name)
        layers.append((name, getattr(layer, "base_layer", layer)))
    checked = []
    for lora in loras:
        if isinstance(lora, (str, os.PathLike)):
            source, factors = os.fspath(lora), torch.load(lora, map_location="cpu", weights_only=True)
        else:
            source, factors = "the LoRA list", lora
        if not isinstance(factors, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in factors):
            raise ValueError(f"load_longsd_lora: {source} must hold a list of tensors [up_0, down_0, ...]")
        if len(factors) != 2 * len(layers):
            raise ValueError(
                f"load_longsd_lora: {source} holds {len(factors)} tensors, the UNet has {len(layers)} LoRA "
                f"layers (expected {2 * len(layers)} tensors): a file for another UNet?"
            )
        for (name, layer), up, down in zip(layers, factors[0::2], factors[1::2]):
            expected = _expected_factors(layer, down.shape[0] if down.dim() else 0)
            if (tuple(up.shape), tuple(down.shape)) != expected:
                raise ValueError(
                    f"load_longsd_lora: {source} does not fit {name} ({type(layer).__name__} weight "
                    f"{tuple(layer.weight.shape)}): up {tuple(up.shape)}, down {tuple(down.shape)}, expected "
                    f"{expected[0]} and {expected[1]} (r = the rank)"
                )
        checked.append(factors)
    with torch.no_grad():
        for factors in checked:
            for (_, layer), up, down in zip(layers, factors[0::2], factors[1::2]):
                weight = layer.weight
                up, down = (f.to(weight.device, torch.float32).flatten(1) for f in (up, down))
                delta = up @ down
                weight.copy_((weight.float() + scale * delta.reshape(weight.shape)).to(weight.dtype))
