"""Ports of the official code that tests compare against: LongAlign (luping-liu/LongAlign) and
LinFusion's high-resolution pipelines (Huage001/LinFusion)."""

import math
import re

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from linfusion_ops.highres.pipeline import resize_image
from tests.helpers.tiny_models import CLIP_MAX_LENGTH


def published_longalign(captions, tokenizer, text_encoder, token_length):
    """LongAlign's published caption2embed: split on '.' and '?', re-end each sentence with '.',
    tokenize (truncating at 77, padding to the longest), drop end and pad tokens by id, truncate,
    pad with the mean of the last 60 outputs of the empty prompt padded to 77."""
    empty_ids = tokenizer([""], max_length=CLIP_MAX_LENGTH, padding="max_length", return_tensors="pt").input_ids
    pad = text_encoder(empty_ids)[0][0, -60:].mean(dim=0, keepdim=True)
    out = []
    for caption in captions:
        sentences = [s + "." for s in re.split(r'"!|\.|\?|;"', caption) if len(s) > 0] or [caption]
        ids = tokenizer(sentences, max_length=CLIP_MAX_LENGTH, padding=True, truncation=True, return_tensors="pt").input_ids
        hidden = text_encoder(ids)[0]
        keep = (ids != tokenizer.pad_token_id) & (ids != tokenizer.eos_token_id)
        tokens = hidden.reshape(-1, hidden.shape[-1])[keep.reshape(-1)][:token_length]
        out.append(torch.cat([tokens, pad.repeat(token_length - len(tokens), 1)]))
    return torch.stack(out)


def official_lora_layers(unet):
    """A literal port of the official traversal (modules/lora.py _find_modules_v2 over
    UNET_EXTENDED_TARGET_REPLACE), which fixes the order of lora_vis.pt."""
    ancestor_class = {"ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"}
    found = []
    for ancestor in (m for m in unet.modules() if m.__class__.__name__ in ancestor_class):
        for fullname, module in ancestor.named_modules():
            if any(isinstance(module, c) for c in (torch.nn.Linear, torch.nn.Conv2d)):
                found.append(module)
    return found


# ---------------------------------------------------------------------------------------------
# Ports of the official high-resolution code (Huage001/LinFusion): the SD-XL DemoFusion loop of
# src/pipelines/pipeline_highres_sdxl.py (read at commit 0035cb7) and pipeline_superres_sdxl.py
# (read at commit 6261ab1), and the SDEdit chain of examples/inference/ultra_text2image_w_sdedit.ipynb
# (a StableDiffusionPipeline base, then one StableDiffusionImg2ImgPipeline call per stage).
#
# The DemoFusion port keeps the official order of operations literally, scheduler state
# included: one set_timesteps for the whole run, so the step index the base stage leaves behind
# (N: sigma 0) is what scale_model_input sees at each upscaling stage's first local pass; per
# timestep the local prediction, a step on it, then the global pass, whose scale_model_input
# runs after that step advanced the index (the next timestep's sigma), and a second step.
# Where the official code cannot run on current diffusers, the port computes what it would:
# * it calls scheduler._init_step_index before each upscaling step; DDIM has no such method
#   (AttributeError at the first upscaling step) and no step index to reset, so the call is
#   skipped when the scheduler lacks it;
# * only output_type="pil" runs there (stage images go through PIL's Image.resize); the port
#   resizes the decoded image in floating point with the pipeline's `resize_image` instead of
#   rounding it to 8 bits;
# * the official stage noise is unseeded `torch.randn_like`: the port draws it, like the base
#   latents and the VAE posterior samples, from one generator in the pipeline's order.


def official_gaussian_filter(latents, kernel_size, sigma):
    """The official blur: a float32 separable Gaussian on arange(kernel_size) - (k - 1) / 2,
    normalised, applied depthwise with zero padding. latents (B, C, H, W)."""
    x = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None].repeat(latents.shape[1], 1, 1, 1).to(latents)
    return F.conv2d(latents, kernel, padding=kernel_size // 2, groups=latents.shape[1])


class _OfficialRun:
    """What one official run shares across its stages: the UNet call with CFG, the VAE round
    trip and the generator."""

    def __init__(self, pipe, cond, seed, guidance):
        self.pipe, self.cond, self.guidance = pipe, cond, guidance
        self.unet, self.vae, self.sched = pipe.unet, pipe.vae, pipe.scheduler
        self.generator = torch.Generator().manual_seed(seed)

    def eps(self, latents, t):
        x = self.sched.scale_model_input(torch.cat([latents] * 2), t)
        uncond, text = self.unet(x, t, return_dict=False, **self.cond(x))[0].chunk(2)
        return uncond + self.guidance * (text - uncond)

    def noise(self, shape):
        return randn_tensor(shape, generator=self.generator, dtype=self.unet.dtype)

    def base_stage(self, height, width):
        """The base generation: a plain text-to-image loop at height x width pixels."""
        factor = self.pipe.vae_scale_factor
        latents = self.noise((1, 4, height // factor, width // factor)) * self.sched.init_noise_sigma
        for t in self.sched.timesteps:
            latents = self.sched.step(self.eps(latents, t), t, latents, return_dict=False)[0]
        return latents

    def encode(self, image, height, width):
        """image (1, 3, H, W) in [-1, 1] resized to height x width, encoded, scaled latents."""
        posterior = self.vae.encode(resize_image(image, height, width)).latent_dist
        return posterior.sample(self.generator) * self.vae.config.scaling_factor

    def decode(self, latents):
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample


def _renormalise(latents, mean, std):
    return (latents - latents.mean(dim=(2, 3), keepdim=True)) / latents.std(dim=(2, 3), keepdim=True) * std + mean


def _official_demofusion_stage(run, clean, timesteps, ratio, gaussian_sigma, cosine_scales):
    """One official upscaling stage from the encoded stage input `clean`, in the official order."""
    sched, unet = run.sched, run.unet
    T = sched.config.num_train_timesteps
    noise = run.noise(clean.shape)
    noised = [sched.add_noise(clean, noise, t.unsqueeze(0)) for t in timesteps]
    latents = noised[0]
    convs = [m for m in unet.modules() if m.__class__.__name__ == "Conv2d"]
    saved = [(m.dilation, m.padding) for m in convs]
    for i, t in enumerate(timesteps):
        cf = 0.5 * (1 + torch.cos(torch.pi * (T - t) / T)).item()
        c1 = cf ** cosine_scales[0]
        latents = latents * (1 - c1) + noised[i] * c1
        local = run.eps(latents, t)  # scale_model_input at the index the scheduler holds now
        if hasattr(sched, "_init_step_index"):
            sched._init_step_index(t)
        latents_1 = sched.step(local, t, latents, return_dict=False)[0]  # advances the index
        for m in convs:
            m.dilation = (ratio * m.dilation[0], ratio * m.dilation[1])
            m.padding = (ratio * m.padding[0], ratio * m.padding[1])
        c3 = 0.99 * cf ** cosine_scales[2] + 1e-2
        std, mean = latents.std(dim=(2, 3), keepdim=True), latents.mean(dim=(2, 3), keepdim=True)
        blurred = _renormalise(official_gaussian_filter(latents, 2 * ratio - 1, gaussian_sigma * c3), mean, std)
        global_ = run.eps(blurred, t)  # scale_model_input after the step: the next sigma
        if hasattr(sched, "_init_step_index"):
            sched._init_step_index(t)
        latents_2 = sched.step(global_, t, latents, return_dict=False)[0]
        c2 = cf ** cosine_scales[1]
        latents = (1 - c2) * latents_1 + c2 * latents_2
        for m, (dilation, padding) in zip(convs, saved):
            m.dilation, m.padding = dilation, padding
    return latents


def official_demofusion_sdxl(pipe, cond, sizes, *, steps, upscale_strength, image=None, seed=0, guidance=7.5,
                             gaussian_sigma=0.8, cosine_scales=(3.0, 1.0, 1.0)):
    """The official SD-XL DemoFusion run, ported literally (see above), on any pipeline's UNet.

    cond(latent_input) -> dict of UNet keyword arguments for the CFG batch (negative first).
    sizes: the stages' (height, width) in pixels, base first (text-to-image:
    pipeline_highres_sdxl.py) or one size with `image` ((1, 3, H, W) in [-1, 1]:
    pipeline_superres_sdxl.py). Returns every stage's final latents (1, 4, h, w) in the UNet's
    dtype, base first.
    """
    run = _OfficialRun(pipe, cond, seed, guidance)
    sched, unet = run.sched, run.unet
    with torch.no_grad():
        sched.set_timesteps(steps)  # once: the stages below only slice this schedule
        if image is not None:
            ((height, width),) = sizes
            long_side = width if width > height else height
            ratio = math.ceil(long_side / (unet.config.sample_size * pipe.vae_scale_factor))
            n_steps = min(math.ceil(steps * upscale_strength), steps)
            clean = run.encode(image, height, width)
            anchor = (clean.mean(dim=(2, 3), keepdim=True), clean.std(dim=(2, 3), keepdim=True))
            timesteps = sched.timesteps[(steps - n_steps) * sched.order:]
            latents = _official_demofusion_stage(run, clean, timesteps, ratio, gaussian_sigma, cosine_scales)
            return [_renormalise(latents, *anchor)]
        latents = run.base_stage(*sizes[0])
        anchor = (latents.mean(dim=(2, 3), keepdim=True), latents.std(dim=(2, 3), keepdim=True))
        out = [latents]
        strengths = torch.linspace(upscale_strength, 0, len(sizes))
        for k, (height, width) in enumerate(sizes[1:], start=1):
            n_steps = min(math.ceil(float(steps * strengths[k - 1])), steps)
            timesteps = sched.timesteps[(steps - n_steps) * sched.order:]  # no reset, no begin index
            clean = run.encode(run.decode(latents), height, width)
            latents = _official_demofusion_stage(run, clean, timesteps, 2**k, gaussian_sigma, cosine_scales)
            latents = _renormalise(latents, *anchor)
            out.append(latents)
    return out


def official_sdedit_chain(pipe, cond, sizes, strengths, *, steps, seed=0, guidance=7.5):
    """The official SD 1.5 notebook's SDEdit chain: a text-to-image base at sizes[0], then per
    upscaling stage an img2img call at sizes[k] with strengths[k - 1] (set_timesteps, the last
    int(steps * strength) timesteps with the begin index set, the encoded image noised to the
    first). One generator for the whole chain (the notebook reseeds each call); the image is
    resized in floating point. Returns every stage's final latents, base first."""
    run = _OfficialRun(pipe, cond, seed, guidance)
    sched = run.sched
    with torch.no_grad():
        sched.set_timesteps(steps)
        latents = run.base_stage(*sizes[0])
        out = [latents]
        for (height, width), strength in zip(sizes[1:], strengths):
            sched.set_timesteps(steps)
            start = (steps - min(int(steps * strength), steps)) * sched.order
            sched.set_begin_index(start)
            timesteps = sched.timesteps[start:]
            clean = run.encode(run.decode(latents), height, width)
            latents = sched.add_noise(clean, run.noise(clean.shape), timesteps[:1])
            for t in timesteps:
                latents = sched.step(run.eps(latents, t), t, latents, return_dict=False)[0]
            out.append(latents)
    return out
