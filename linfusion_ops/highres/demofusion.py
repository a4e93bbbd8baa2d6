"""DemoFusion's pieces (arXiv 2311.16973, as LinFusion's high-resolution pipelines use them):
the cosine schedule of the three blend weights, the Conv2d dilation of the global pass, the
Gaussian blur and the per-channel renormalisation. Plain PyTorch; latents are (B, C, H, W)."""

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class DemoFusionWeights(NamedTuple):
    """The weights at one timestep, from the cosine factor cf = (1 + cos(pi (T - t) / T)) / 2,
    which falls from 1 at t = T to 0 at t = 0.

    skip: cf^cosine_scale_1, the share of the re-noised stage input mixed into the latents
        (skip residual).
    global_: cf^cosine_scale_2, the share of the dilated global pass in the noise prediction.
    sigma: 0.99 cf^cosine_scale_3 + 0.01, the factor on gaussian_sigma for the blur.
    """

    skip: float
    global_: float
    sigma: float


def demofusion_weights(
    t, *, cosine_scale_1=3.0, cosine_scale_2=1.0, cosine_scale_3=1.0, num_train_timesteps=1000
) -> DemoFusionWeights:
    """The blend weights at timestep `t` (a number or a 0-d tensor)."""
    t = float(t)
    cf = 0.5 * (1.0 + math.cos(math.pi * (num_train_timesteps - t) / num_train_timesteps))
    return DemoFusionWeights(cf**cosine_scale_1, cf**cosine_scale_2, 0.99 * cf**cosine_scale_3 + 0.01)


@contextlib.contextmanager
def dilated_convs(*modules: nn.Module, ratio: int):
    """Within the block, every nn.Conv2d inside `modules` (None entries skipped) has its
    dilation and integer padding multiplied by `ratio`, so that a 3x3 kernel samples every
    ratio-th latent pixel and keeps the spatial size. Both are restored exactly on exit, also
    when the block raises. ratio 1 changes nothing."""
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"dilated_convs: ratio must be a positive int, got {ratio!r}")
    convs = {m for module in modules if module is not None for m in module.modules() if isinstance(m, nn.Conv2d)}
    saved = [(conv, conv.dilation, conv.padding) for conv in convs]
    try:
        if ratio > 1:
            for conv, dilation, padding in saved:
                conv.dilation = tuple(ratio * d for d in dilation)
                # "same" / "valid" string paddings adapt to the dilation by themselves.
                if not isinstance(padding, str):
                    conv.padding = tuple(ratio * p for p in padding)
        yield
    finally:
        for conv, dilation, padding in saved:
            conv.dilation, conv.padding = dilation, padding


def gaussian_kernel(kernel_size: int, sigma: float, channels: int, *, dtype=torch.float32, device=None):
    """(channels, 1, k, k) depthwise Gaussian kernel, normalised to sum 1 per channel."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"gaussian_kernel: kernel_size must be a positive odd int, got {kernel_size}")
    if not sigma > 0:
        raise ValueError(f"gaussian_kernel: sigma must be > 0, got {sigma}")
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).to(dtype=dtype, device=device)
    return kernel.expand(channels, 1, kernel_size, kernel_size).contiguous()


def gaussian_blur(latents: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Depthwise Gaussian blur of (B, C, H, W) latents with zero padding (same size out)."""
    kernel = gaussian_kernel(kernel_size, sigma, latents.shape[1], dtype=latents.dtype, device=latents.device)
    return F.conv2d(latents, kernel, padding=kernel_size // 2, groups=latents.shape[1])


def channel_stats(latents: torch.Tensor):
    """Per-image, per-channel mean and standard deviation over H, W: two (B, C, 1, 1) tensors."""
    return latents.mean(dim=(2, 3), keepdim=True), latents.std(dim=(2, 3), keepdim=True)


def match_channel_stats(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`latents` shifted and scaled per image and channel to the given mean and std."""
    own_mean, own_std = channel_stats(latents)
    return (latents - own_mean) / own_std * std + mean


def blurred_for_global_pass(latents: torch.Tensor, ratio: int, sigma: float) -> torch.Tensor:
    """The global pass's input: latents blurred with a (2 ratio - 1)^2 Gaussian of std `sigma`,
    renormalised per channel to the latents' own mean and std."""
    return match_channel_stats(gaussian_blur(latents, 2 * ratio - 1, sigma), *channel_stats(latents))
