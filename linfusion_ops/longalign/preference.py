"""LongAlign's preference optimization: a decomposed CLIP-based preference score and the
reward sampler that fine-tunes a Stable Diffusion UNet (LoRA) against it.

LongAlign (arXiv 2410.11817) scores a generated image with a CLIP-type preference model
(Denscore, PickScore, HPS: all ``transformers.CLIPModel``): the cosine between the image
feature f and the prompt's text embedding t, the mean of its sentences' L2-normalised
embeddings. Much of t·f comes from the direction e every prompt shares (the normalised batch
mean of t), which rewards images for looking "like a generated image" rather than for following
their own text. Splitting t along e,

    t·f = (t − (t·e)e)·f + (t·e)(e·f) = relevant + irrelevant,

and scoring ``relevant + w · irrelevant`` with w = 0.3 keeps the reward on the text-specific part.

The pieces: :func:`decomposed_score`, :func:`common_direction` (optionally all-reduced across
ranks), :func:`sentence_mean_text_embeds`, :class:`CLIPPreferenceScorer` (differentiable image
path in pure torch, text under ``no_grad``), :class:`RewardSampler` (DDIM with CFG, or LCM, with
truncated backpropagation through gradient-checkpointed UNet calls). The LoRA the sampler
trains lives in :mod:`linfusion_ops.longalign.lora` (re-exported here).
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..distributed_utils import resolve_group
from .long_prompt import as_prompt_list, split_sentences
from .lora import (
    LONGALIGN_LORA_BLOCKS,
    add_longalign_lora,
    longalign_lora_targets,
    lora_from_longalign_list,
    lora_to_longalign_list,
)

__all__ = [
    "DecomposedScore",
    "decomposed_score",
    "common_direction",
    "prompt_sentences",
    "sentence_mean_text_embeds",
    "CLIPPreferenceScorer",
    "RewardSampler",
    "RewardOutput",
    "LONGALIGN_LORA_BLOCKS",
    "longalign_lora_targets",
    "add_longalign_lora",
    "lora_to_longalign_list",
    "lora_from_longalign_list",
]

# OpenAI CLIP's pixel statistics, which Denscore, PickScore and HPS were all trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class DecomposedScore:
    """Per-image terms of the decomposed preference score, each (B,) in the features' dtype:
    ``score = relevant + weight * irrelevant``, ``relevant = (t − (t·e)e)·f``,
    ``irrelevant = (t·e)(e·f)``, ``projection = t·e``; ``image_embeds`` is f, the L2-normalised
    image features (B, D)."""

    score: torch.Tensor
    relevant: torch.Tensor
    irrelevant: torch.Tensor
    projection: torch.Tensor
    image_embeds: torch.Tensor


def _check_features(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point (B, D) tensor, got {_describe(x)}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def decomposed_score(
    image_features: torch.Tensor,
    text_embeds: torch.Tensor,
    direction: torch.Tensor,
    weight: float = 0.3,
) -> DecomposedScore:
    """LongAlign's decomposed preference score (raw cosine, no logit scale).

    Args:
        image_features: (B, D) image features of the preference model, any norm (L2-normalised
            here, as the official code does); the gradient flows through them.
        text_embeds: (B, D) text embeddings t, used as given (for LongAlign: the sentence means
            of :func:`sentence_mean_text_embeds`, not renormalised).
        direction: (D,) the common direction e (:func:`common_direction`); normalised here.
        weight: w, the weight of the text-irrelevant term; 1 gives the plain score t·f, 0 only
            the text-relevant term.

    Returns:
        A :class:`DecomposedScore` of (B,) tensors in ``image_features``' dtype.
    """
    _check_features(image_features, "decomposed_score: image_features")
    _check_features(text_embeds, "decomposed_score: text_embeds")
    if text_embeds.shape != image_features.shape:
        raise ValueError(
            f"decomposed_score: text_embeds must have image_features' shape {tuple(image_features.shape)}, "
            f"got {tuple(text_embeds.shape)}"
        )
    if not isinstance(direction, torch.Tensor) or tuple(direction.shape) != (image_features.shape[1],):
        raise ValueError(
            f"decomposed_score: direction must be a ({image_features.shape[1]},) tensor, got {_describe(direction)}"
        )
    f = F.normalize(image_features, dim=-1)
    t = text_embeds.to(f.dtype)
    e = F.normalize(direction.to(f.dtype), dim=0)
    projection = t @ e
    irrelevant = projection * (f @ e)
    relevant = (t * f).sum(-1) - irrelevant
    return DecomposedScore(relevant + weight * irrelevant, relevant, irrelevant, projection, f)


def common_direction(text_embeds: torch.Tensor, group=None) -> torch.Tensor:
    """e = normalize(mean of the text embeddings over the batch), a constant (no gradient).

    Args:
        text_embeds: (B, D) text embeddings of this rank's prompts (B may be 0 on some ranks).
        group: None for this process's batch only; a ``torch.distributed`` process group
            (``torch.distributed.group.WORLD`` for all processes) to average over the prompts of
            every rank of the group: one all-reduce of the (D + 1) sum and count, so the mean is
            over all prompts even when the ranks hold different batch sizes. Every rank of the
            group must call it, with the same D and dtype.

    Returns:
        (D,) unit vector in ``text_embeds``' dtype (the sums are accumulated in fp32, or fp64
        for fp64 inputs).
    """
    if not isinstance(text_embeds, torch.Tensor) or text_embeds.dim() != 2 or not text_embeds.is_floating_point():
        raise ValueError(f"common_direction: text_embeds must be a floating-point (B, D) tensor, got {_describe(text_embeds)}")
    with torch.no_grad():
        acc = torch.float64 if text_embeds.dtype == torch.float64 else torch.float32
        total = torch.cat([text_embeds.to(acc).sum(0), text_embeds.new_tensor([text_embeds.shape[0]], dtype=acc)])
        if group is not None:
            torch.distributed.all_reduce(total, group=resolve_group(group, total.device, "common_direction"))
        if total[-1].item() == 0:
            raise ValueError("common_direction: no text embeddings (B = 0 on every rank)")
        return F.normalize(total[:-1] / total[-1], dim=0).to(text_embeds.dtype)


def _module_device(module: nn.Module) -> torch.device:
    from diffusers.utils.torch_utils import get_module_execution_device

    return get_module_execution_device(module)


def _pooled(output) -> torch.Tensor:
    # transformers < 5 returns the projected features, >= 5 an output whose pooler_output they are.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def prompt_sentences(prompt: str) -> List[str]:
    """The sentences a prompt is scored by: :func:`linfusion_ops.longalign.long_prompt.split_sentences`
    (LongPromptEncoder's split), or the prompt itself when it has none (the empty prompt), as the
    official code keeps the whole caption then."""
    return split_sentences(prompt) or [prompt]


def sentence_mean_text_embeds(
    prompts: Union[str, Sequence[str]],
    tokenizer,
    text_model,
    max_length: Optional[int] = None,
) -> torch.Tensor:
    """LongAlign's prompt embedding for the preference score: each sentence encoded on its own,
    L2-normalised, averaged per prompt (the mean is not renormalised).

    Sentences are LongPromptEncoder's (:func:`prompt_sentences`); each is tokenized to
    ``max_length`` tokens (default ``tokenizer.model_max_length``, 77 for CLIP), padded and
    truncated as the official code does, all sentences of all prompts in one batch.

    Args:
        prompts: a str or a list of B str.
        tokenizer: the preference model's tokenizer.
        text_model: a ``transformers.CLIPModel`` (its ``get_text_features``).
        max_length: tokens per sentence.

    Returns:
        (B, D) in the model's dtype, on its device. Runs with whatever grad mode is active.
    """
    prompts = as_prompt_list(prompts, "prompts", "sentence_mean_text_embeds")
    if not prompts:
        raise ValueError("sentence_mean_text_embeds: prompts is an empty list")
    sentences = [prompt_sentences(p) for p in prompts]
    flat = [s for group in sentences for s in group]
    index = torch.tensor([i for i, group in enumerate(sentences) for _ in group], dtype=torch.int64)
    tokens = tokenizer(
        flat, padding="max_length", truncation=True, max_length=max_length or tokenizer.model_max_length,
        return_tensors="pt",
    )
    device = _module_device(text_model)
    features = _pooled(text_model.get_text_features(
        input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
    ))
    features = F.normalize(features, dim=-1)
    index = index.to(device)
    counts = torch.bincount(index, minlength=len(prompts)).to(features.dtype)
    sums = features.new_zeros(len(prompts), features.shape[-1]).index_add(0, index, features)
    return sums / counts[:, None]


class CLIPPreferenceScorer(nn.Module):
    """A CLIP-type preference model (Denscore, PickScore, HPS v2: ``transformers.CLIPModel``)
    as a differentiable reward: images in, :class:`DecomposedScore` out.

    Image path (with gradient, pure torch): one crop of ``crop_size`` for the whole batch
    (random offsets when ``random_crop``, the official ``RandomCrop(504)`` that breaks up
    blocky artefacts; centred otherwise; None skips it), a resize to the model's input size
    (``image_size``, default the vision config's, 224) with bilinear antialiased interpolation
    (what the official ``torchvision.transforms.Resize`` does on tensors), the CLIP mean/std
    normalisation, then ``get_image_features``. Text path: :func:`sentence_mean_text_embeds`
    under ``torch.no_grad()``. The model is frozen (``requires_grad_(False)``, eval mode).

    Args:
        model: the ``CLIPModel``.
        tokenizer: its tokenizer (PickScore and Denscore use
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s).
        crop_size, random_crop, image_size: see above.
        mean, std: the normalisation (OpenAI CLIP's by default).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        crop_size: Optional[int] = 504,
        random_crop: bool = True,
        image_size: Optional[int] = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        super().__init__()
        if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
            raise TypeError(f"CLIPPreferenceScorer: model must be a transformers CLIPModel, got {type(model).__name__}")
        for name, value in (("crop_size", crop_size), ("image_size", image_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"CLIPPreferenceScorer: {name} must be None or a positive int, got {value!r}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.crop_size = crop_size
        self.random_crop = random_crop
        self.image_size = image_size or model.config.vision_config.image_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, model_name_or_path, tokenizer_name_or_path=None, torch_dtype=None, **kwargs):
        """Load ``CLIPModel.from_pretrained(model_name_or_path)`` and its tokenizer (from
        ``tokenizer_name_or_path``, default the model's folder); keyword arguments go to the
        constructor."""
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(model_name_or_path, torch_dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path or model_name_or_path)
        return cls(model, tokenizer, **kwargs)

    def preprocess(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, 3, image_size, image_size) normalised pixels in
        the model's dtype (computed in fp32, or fp64 for fp64 images), differentiable. ``generator`` (CPU) draws the crop offsets."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"CLIPPreferenceScorer: images must be a floating-point (B, 3, H, W) tensor, got {_describe(images)}")
        if self.crop_size is not None:
            height, width = images.shape[-2:]
            size = self.crop_size
            if height < size or width < size:
                raise ValueError(
                    f"CLIPPreferenceScorer: crop_size {size} is larger than the images ({height} x {width}); "
                    "pass a smaller crop_size or crop_size=None"
                )
            if self.random_crop:
                top = int(torch.randint(height - size + 1, (1,), generator=generator))
                left = int(torch.randint(width - size + 1, (1,), generator=generator))
            else:
                top, left = (height - size) // 2, (width - size) // 2
            images = images[..., top:top + size, left:left + size]
        # In fp32 at least: half-precision antialiased resizing is less accurate, and missing on CPU.
        images = images.to(torch.promote_types(images.dtype, torch.float32))
        images = F.interpolate(
            images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False
        )
        pixels = (images - self.mean.to(images)) / self.std.to(images)
        return pixels.to(self.model.dtype)

    def image_features(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, D) unnormalised image features, differentiable with respect to ``images``."""
        return _pooled(self.model.get_image_features(pixel_values=self.preprocess(images, generator)))

    @torch.no_grad()
    def text_embeds(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        """(B, D) sentence-mean text embeddings (:func:`sentence_mean_text_embeds`), no gradient."""
        return sentence_mean_text_embeds(prompts, self.tokenizer, self.model)

    def forward(
        self,
        images: torch.Tensor,
        prompts: Union[str, Sequence[str]],
        *,
        weight: float = 0.3,
        group=None,
        generator: Optional[torch.Generator] = None,
    ) -> DecomposedScore:
        """Score B images against B prompts.

        Args:
            images: (B, 3, H, W) in [0, 1].
            prompts: B prompts.
            weight: w of :func:`decomposed_score`.
            group: passed to :func:`common_direction` (None: this batch's direction).
            generator: for the random crop.
        """
        text = self.text_embeds(prompts)
        if text.shape[0] != images.shape[0]:
            raise ValueError(f"CLIPPreferenceScorer: {images.shape[0]} images but {text.shape[0]} prompts")
        features = self.image_features(images, generator)
        return decomposed_score(features, text, common_direction(text, group), weight)


@dataclass
class RewardOutput:
    """What :meth:`RewardSampler.__call__` returns: ``loss`` = 0.5 · (1 − mean score) (scalar),
    the :class:`DecomposedScore`, the decoded ``images`` (B, 3, H, W) in [0, 1] and the indices
    of the denoising steps that were run with gradient."""

    loss: torch.Tensor
    score: DecomposedScore
    images: torch.Tensor
    grad_steps: List[int]


_MODES = {
    # num_steps, guidance_scale, gradient at every k-th step
    "ddim": (50, 7.5, 10),
    "lcm": (4, None, 1),
}


class RewardSampler:
    """LongAlign's reward fine-tuning forward pass: sample from pure noise, decode the final
    predicted x0, score it, with gradients through a few UNet calls only.

    Timesteps ``t_i = T − 1 − i · (T // num_steps)`` (999, 979, ..., 19 for 50 steps of a
    1000-step schedule). At each step the UNet predicts from x_t (``prediction_type`` epsilon,
    v_prediction or sample), x0 and ε are recovered, and

    * ``mode="ddim"`` (unet_reward.py): η = 0, classifier-free guidance (one UNet call per step
      on the concatenated [prompt; negative] batch), ``x_{t'} = sqrt(ᾱ_{t'}) x0 + sqrt(1 − ᾱ_{t'}) ε``,
      t' = max(t − T // num_steps, 0); defaults 50 steps, guidance 7.5;
    * ``mode="lcm"`` (unet_reward_lcm.py): no guidance, fresh noise in place of ε (the LCM
      multistep sampler); default 4 steps (999, 749, 499, 249).

    Truncated backpropagation: only every ``grad_every``-th step from a random offset in
    [0, grad_every) (DDIM: 5 of 50; LCM: every step) runs the UNet with gradient, each on a
    detached input and, with ``checkpointing``, through ``torch.utils.checkpoint`` (its
    activations are recomputed in the backward); the other calls run under ``no_grad``. The
    gradient still reaches earlier steps through the sampler's linear updates, not through the
    UNet. So per sample: ``num_steps`` UNet calls in the forward (with CFG each on a doubled
    batch), plus ``num_steps / grad_every`` recomputed calls and as many UNet backward passes.

    The UNet may carry LoRA adapters and a mounted LinFusion (its linear-attention ops have a
    backward). SD 1.5 / 2.1 UNets (no added conditioning).

    Args:
        unet, vae: the pipeline's; the VAE decodes with gradient (keep it frozen).
        scheduler: any diffusers scheduler of the pipeline; only its training schedule
            (``alphas_cumprod`` of ``DDPMScheduler.from_config``) and ``prediction_type`` are used.
        mode, num_steps, guidance_scale, grad_every: see above (None: the mode's defaults).
        checkpointing: recompute the gradient steps' activations in the backward.
    """

    def __init__(
        self,
        unet,
        vae,
        scheduler,
        *,
        mode: str = "ddim",
        num_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        grad_every: Optional[int] = None,
        checkpointing: bool = True,
    ):
        from diffusers import DDPMScheduler

        if mode not in _MODES:
            raise ValueError(f"RewardSampler: mode must be one of {sorted(_MODES)}, got {mode!r}")
        default_steps, default_guidance, default_every = _MODES[mode]
        self.num_steps = default_steps if num_steps is None else num_steps
        self.grad_every = default_every if grad_every is None else grad_every
        if mode == "lcm" and guidance_scale is not None:
            raise ValueError("RewardSampler: mode='lcm' runs without classifier-free guidance; leave guidance_scale None")
        self.guidance_scale = default_guidance if guidance_scale is None else float(guidance_scale)
        ddpm = DDPMScheduler.from_config(scheduler.config)
        self.train_steps = ddpm.config.num_train_timesteps
        for name, value in (("num_steps", self.num_steps), ("grad_every", self.grad_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RewardSampler: {name} must be a positive int, got {value!r}")
        if self.num_steps > self.train_steps:
            raise ValueError(f"RewardSampler: num_steps must be at most {self.train_steps}, got {self.num_steps}")
        if self.num_steps % self.grad_every:
            raise ValueError(
                f"RewardSampler: num_steps ({self.num_steps}) must be a multiple of grad_every ({self.grad_every})"
            )
        if getattr(unet.config, "addition_embed_type", None) is not None:
            raise ValueError("RewardSampler: UNets with added conditioning (SD XL) are not supported")
        self.prediction_type = ddpm.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"RewardSampler: unsupported prediction_type {self.prediction_type!r}")
        self.alphas_cumprod = ddpm.alphas_cumprod.to(torch.float64)
        self.unet, self.vae, self.mode, self.checkpointing = unet, vae, mode, checkpointing
        self.step_ratio = self.train_steps // self.num_steps

    @property
    def timesteps(self) -> List[int]:
        return [self.train_steps - 1 - i * self.step_ratio for i in range(self.num_steps)]

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale != 1.0

    def gradient_steps(self, generator: Optional[torch.Generator] = None) -> List[int]:
        """Indices of the steps run with gradient: every ``grad_every``-th from an offset drawn
        uniformly in [0, grad_every) with ``generator``."""
        offset = int(torch.randint(self.grad_every, (1,), generator=generator))
        return list(range(offset, self.num_steps, self.grad_every))

    def _unet(self, sample, timestep, embeds):
        return self.unet(sample, timestep, encoder_hidden_states=embeds, return_dict=False)[0]

    def _x0_eps(self, output, sample, alpha, sigma):
        if self.prediction_type == "epsilon":
            return (sample - sigma * output) / alpha, output
        if self.prediction_type == "v_prediction":
            return alpha * sample - sigma * output, sigma * sample + alpha * output
        return output, (sample - alpha * output) / sigma

    def sample(
        self,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        *,
        latents: Optional[torch.Tensor] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ):
        """Sample and decode. Returns ``(images, grad_steps)``: (B, 3, H, W) images in [0, 1]
        (differentiable through the gradient steps) and the indices of those steps.

        Args:
            prompt_embeds: (B, T, C) text conditioning (e.g. from :class:`LongPromptEncoder`).
            negative_prompt_embeds: (B, T, C), required with guidance (DDIM mode).
            latents: (B, 4, h, w) initial noise; by default drawn with ``generator`` at
                ``height`` x ``width`` pixels (default the UNet's sample size).
            generator: a CPU generator for the noise, the gradient-step offset and LCM's noise.
        """
        unet = self.unet
        device, dtype = unet.device, unet.dtype
        if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
            raise ValueError(f"RewardSampler: prompt_embeds must be a (B, T, C) tensor, got {_describe(prompt_embeds)}")
        batch = prompt_embeds.shape[0]
        if self.do_cfg:
            if negative_prompt_embeds is None or negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    f"RewardSampler: guidance needs negative_prompt_embeds of prompt_embeds' shape "
                    f"{tuple(prompt_embeds.shape)}, got {_describe(negative_prompt_embeds)}"
                )
            embeds = torch.cat([prompt_embeds, negative_prompt_embeds]).to(device, dtype)
        else:
            embeds = prompt_embeds.to(device, dtype)
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if latents is None:
            size = unet.config.sample_size
            shape = (batch, unet.config.in_channels, (height or size * scale) // scale, (width or size * scale) // scale)
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
        elif latents.dim() != 4 or latents.shape[0] != batch:
            raise ValueError(f"RewardSampler: latents must be (B={batch}, C, h, w), got {_describe(latents)}")
        grad_steps = self.gradient_steps(generator)

        x = latents.to(device, dtype)
        for i, t in enumerate(self.timesteps):
            timestep = torch.full((embeds.shape[0],), t, device=device, dtype=torch.int64)
            model_input = x.detach()
            if self.do_cfg:
                model_input = torch.cat([model_input, model_input])
            if i in grad_steps and torch.is_grad_enabled():
                if self.checkpointing:
                    output = torch.utils.checkpoint.checkpoint(
                        self._unet, model_input, timestep, embeds, use_reentrant=False
                    )
                else:
                    output = self._unet(model_input, timestep, embeds)
            else:
                with torch.no_grad():
                    output = self._unet(model_input, timestep, embeds)
            if self.do_cfg:
                cond, uncond = output.chunk(2)
                output = uncond + self.guidance_scale * (cond - uncond)
            abar = self.alphas_cumprod[t]
            x0, eps = self._x0_eps(output, x, abar.sqrt().item(), (1 - abar).sqrt().item())
            if i + 1 < self.num_steps:
                abar_prev = self.alphas_cumprod[max(t - self.step_ratio, 0)]
                if self.mode == "lcm":
                    eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device, dtype)
                x = abar_prev.sqrt().item() * x0 + (1 - abar_prev).sqrt().item() * eps
        vae = self.vae
        images = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (images * 0.5 + 0.5).clamp(0, 1), grad_steps

    def __call__(
        self,
        scorer: CLIPPreferenceScorer,
        prompts: Union[str, Sequence[str]],
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        *,
        weight: float = 0.3,
        group=None,
        latents: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> RewardOutput:
        """Sample (:meth:`sample`), score the images against ``prompts`` with ``scorer`` (reweight
        ``weight``, common direction over ``group``) and return the loss 0.5 · (1 − mean score);
        call ``loss.backward()``."""
        images, grad_steps = self.sample(prompt_embeds, negative_prompt_embeds, latents=latents, generator=generator)
        score = scorer(images, prompts, weight=weight, group=group, generator=generator)
        return RewardOutput(0.5 * (1 - score.score.mean()), score, images, grad_steps)


# ---------------------------------------------------------------------------------------------
# LoRA in the official layout.
