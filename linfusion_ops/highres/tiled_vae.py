"""A tiled AutoencoderKL decode and encode that equal the untiled ones (no seams, no tone shifts).

diffusers' tiling runs the whole decoder on each tile, so every GroupNorm normalises a tile with
that tile's own statistics and the mid-block attention sees one tile: neighbouring tiles come
out in different tones, and blending their overlaps only hides the seam. Here the network is
run as the untiled one, layer by layer, only never holding more than one tile's activations:

* Segments. The decoder (encoder) is a chain of tile-local layers — convolutions, resnets,
  GroupNorms, activations, up/down-samplers — interrupted by the mid-block attention, which
  is global. The input and the attention's input and output at latent resolution are the only
  full-size tensors kept ("checkpoints"); each segment of tile-local layers maps one
  checkpoint to the next (or to the output) tile by tile.
* Halos. A tile is cropped from the checkpoint with a halo of at least the segment's
  receptive radius (summed from its convolutions' kernels, dilations and strides), so the
  layers see everything the tile's core depends on; only the core's output is kept. Crops of
  an image start at multiples of the VAE's downsampling factor, so strided convolutions see
  the same grid as on the whole image.
* GroupNorm over the whole image, streamed. A GroupNorm needs the statistics of its input
  over the whole image, and that input exists only tile by tile. So a segment runs in
  passes: in pass k every tile is run from the checkpoint up to the k-th GroupNorm (the ones
  before it use their already known whole-image statistics), which adds the per-group count,
  mean and sum of squared deviations of the tile's core to an accumulator (Chan's parallel
  merge, in float64) and stops the tile. After the pass the k-th GroupNorm's statistics are
  known. The pass after the last GroupNorm runs every tile to the end and writes its core
  into the output. A segment with G GroupNorms costs G + 1 passes (the compute of roughly
  G / 2 untiled runs of the segment), and at any moment holds one tile's activations.
* The mid-block attention runs once, over all latent tokens, as the untiled VAE does: its
  GroupNorm's statistics come from the checkpoint itself, and softmax attention is computed
  for a block of queries at a time against blocks of keys and values projected on the fly,
  with an online softmax (running maximum and sum, float32), so neither the N x N scores nor
  the full keys and values exist.

Memory: the input, the output, at most two latent-resolution maps of the mid block's width
(the attention's input and output: 512 channels at 1/8 of the side for SD's VAEs), and one
tile's activations (`tile_size` plus the halo on each side, through the whole segment).
The output equals the untiled decode (encode) up to float rounding of the statistics.
"""

import functools
import math
from fractions import Fraction
from typing import List, Optional

import torch
from torch import nn

from ..optional import needs

with needs(__name__):  # a missing extra is a one-line MissingExtraError
    from diffusers.models.attention_processor import Attention
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
    from diffusers.models.resnet import Upsample2D

DEFAULT_TILE_SIZE = 512  # image pixels per tile side, before halos


class _StopTile(Exception):
    """Raised by the GroupNorm being measured: the rest of the tile is not needed this pass."""


class _GroupStats:
    """Whole-image statistics of one GroupNorm's input, merged tile by tile."""

    def __init__(self):
        self.count = 0
        self.mean = None
        self.m2 = None
        self.rstd = None

    def add(self, x: torch.Tensor, groups: int) -> None:
        part = x.float().reshape(x.shape[0], groups, -1)
        var, mean = torch.var_mean(part, dim=2, unbiased=False)
        n = part.shape[2]
        mean, m2 = mean.double(), var.double() * n
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count = total

    def finish(self, eps: float) -> None:
        self.rstd = torch.rsqrt(self.m2 / self.count + eps).float()
        self.mean = self.mean.float()

    def normalize(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        y = (x.float().reshape(b, norm.num_groups, -1) - self.mean[..., None]) * self.rstd[..., None]
        y = y.reshape(x.shape)
        if norm.affine:
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = y * norm.weight.float().reshape(shape) + norm.bias.float().reshape(shape)
        return y.to(x.dtype)


def _conv_radius(modules: List[nn.Module]) -> float:
    """Receptive radius of a chain of layers in units of its input's pixels: each convolution
    adds its kernel radius times its dilation at the resolution it runs at (a strided one its
    whole kernel width, for the asymmetric padding of Downsample2D), Upsample2D doubles and a
    stride halves the resolution."""
    radius, scale = 0.0, 1.0
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, Upsample2D):
                scale *= 2
            elif isinstance(sub, nn.Conv2d):
                stride = sub.stride[0]
                reach = (sub.kernel_size[0] - 1) if stride > 1 else sub.kernel_size[0] // 2
                radius += reach * sub.dilation[0] / scale
                scale /= stride
    return radius


class _Segment:
    """Tile-local layers from one checkpoint to the next; run(source) -> output tensor."""

    def __init__(self, layers: List[tuple], align: int, out_scale: Fraction):
        self.layers = layers  # (module, call) pairs
        self.align = align
        self.out_scale = out_scale
        self.radius = _conv_radius([m for m, _ in layers])
        self.norms = [m for module, _ in layers for m in module.modules() if isinstance(m, nn.GroupNorm)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, call in self.layers:
            x = call(x)
        return x

    def run(self, source: torch.Tensor, core: int, halo: int) -> torch.Tensor:
        height, width = source.shape[-2:]
        tiles = [
            (r, min(r + core, height), c, min(c + core, width))
            for r in range(0, height, core)
            for c in range(0, width, core)
        ]
        stats = {norm: _GroupStats() for norm in self.norms}
        box = {}

        def norm_forward(norm, x):
            crop_h = box["crop"][1] - box["crop"][0]
            scale = Fraction(x.shape[-2], crop_h)
            s = stats[norm]
            if s.rstd is not None:
                return s.normalize(norm, x)
            r0, r1, c0, c1 = box["core"]
            y0, x0 = box["crop"][0], box["crop"][2]
            core_part = x[
                ...,
                int((r0 - y0) * scale) : int((r1 - y0) * scale),
                int((c0 - x0) * scale) : int((c1 - x0) * scale),
            ]
            s.add(core_part, norm.num_groups)
            raise _StopTile

        out = None
        saved = [(norm, norm.__dict__.get("forward")) for norm in self.norms]
        try:
            for norm in self.norms:
                norm.forward = functools.partial(norm_forward, norm)
            for _ in range(len(self.norms) + 1):
                pending = next((n for n in self.norms if stats[n].rstd is None), None)
                for r0, r1, c0, c1 in tiles:
                    y0, y1 = max(0, r0 - halo), min(height, r1 + halo)
                    x0, x1 = max(0, c0 - halo), min(width, c1 + halo)
                    box["crop"], box["core"] = (y0, y1, x0, x1), (r0, r1, c0, c1)
                    try:
                        y = self.forward(source[..., y0:y1, x0:x1])
                    except _StopTile:
                        continue
                    k = self.out_scale
                    if out is None:
                        out = y.new_empty(y.shape[:2] + (int(height * k), int(width * k)))
                    out[..., int(r0 * k) : int(r1 * k), int(c0 * k) : int(c1 * k)] = y[
                        ...,
                        int((r0 - y0) * k) : int((r1 - y0) * k),
                        int((c0 - x0) * k) : int((c1 - x0) * k),
                    ]
                    del y
                if pending is None:
                    return out
                stats[pending].finish(pending.eps)
        finally:
            for norm, previous in saved:
                if previous is None:
                    del norm.__dict__["forward"]
                else:
                    norm.__dict__["forward"] = previous
        raise AssertionError("unreachable: the last pass has no GroupNorm to measure")


def _global_attention(attn: Attention, x: torch.Tensor, block: int) -> torch.Tensor:
    """The VAE mid-block Attention (AttnProcessor semantics: group_norm, to_q/k/v, softmax,
    to_out, residual, rescale) on the whole map x (B, C, H, W), for `block` queries
    against `block` / 4 keys at a time with an online softmax; exact up to float rounding.
    The products run in x's dtype (tensor cores for fp16), the softmax in float32."""
    if attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None or attn.norm_cross:
        raise NotImplementedError("tiled VAE: the mid-block attention may only use group_norm")
    b, c, h, w = x.shape

    def blocks(tokens):
        rows = max(1, tokens // w)
        return [(r, min(r + rows, h)) for r in range(0, h, rows)]

    stats = None
    if attn.group_norm is not None:
        stats = _GroupStats()
        for r0, r1 in blocks(block):
            stats.add(x[:, :, r0:r1], attn.group_norm.num_groups)
        stats.finish(attn.group_norm.eps)

    def projected(projection, r0, r1):
        part = x[:, :, r0:r1]
        if stats is not None:
            part = stats.normalize(attn.group_norm, part)
        y = projection(part.flatten(2).transpose(1, 2))  # (B, n, C)
        return y.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (B, H, n, D)

    out = torch.empty_like(x)
    key_block = max(1, block // 4)
    for q0, q1 in blocks(block):
        q = projected(attn.to_q, q0, q1) * attn.scale
        peak = torch.full(q.shape[:3], -math.inf, device=x.device)
        total = torch.zeros(q.shape[:3], device=x.device)
        acc = torch.zeros(q.shape, device=x.device)
        for k0, k1 in blocks(key_block):
            k, v = projected(attn.to_k, k0, k1), projected(attn.to_v, k0, k1)
            scores = torch.matmul(q, k.transpose(-1, -2)).float()
            new_peak = torch.maximum(peak, scores.amax(-1))
            probs = scores.sub_(new_peak[..., None]).exp_()
            correction = torch.exp(peak - new_peak)
            total = total * correction + probs.sum(-1)
            acc = acc * correction[..., None] + torch.matmul(probs.to(v.dtype), v).float()
            peak = new_peak
            del scores, probs, k, v
        o = (acc / total[..., None]).transpose(1, 2).flatten(2).to(x.dtype)
        o = attn.to_out[1](attn.to_out[0](o)).transpose(1, 2).reshape(b, c, q1 - q0, w)
        if attn.residual_connection:
            o = o + x[:, :, q0:q1]
        out[:, :, q0:q1] = o / attn.rescale_output_factor
    return out


def _resnet_call(block):
    return lambda x: block(x, None)


def _plan(vae, direction: str):
    """The decoder's (encoder's) layers as a list of _Segment and Attention, in order, and the
    downsampling factor f of the VAE."""
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    net = vae.decoder if direction == "decode" else vae.encoder
    mid = net.mid_block
    if getattr(net, "conv_norm_out", None) is not None and not isinstance(net.conv_norm_out, nn.GroupNorm):
        raise NotImplementedError("tiled VAE: only GroupNorm decoders (norm_type='group') are supported")
    layers: List[tuple] = []
    if direction == "decode":
        if vae.post_quant_conv is not None:
            layers.append((vae.post_quant_conv, vae.post_quant_conv))
        layers.append((net.conv_in, net.conv_in))
    else:
        layers.append((net.conv_in, net.conv_in))
        layers += [(block, block) for block in net.down_blocks]
    layers.append((mid.resnets[0], _resnet_call(mid.resnets[0])))
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            layers.append((attn, None))
        layers.append((resnet, _resnet_call(resnet)))
    if direction == "decode":
        layers += [(block, block) for block in net.up_blocks]
    layers += [(net.conv_norm_out, net.conv_norm_out), (net.conv_act, net.conv_act), (net.conv_out, net.conv_out)]
    if direction == "encode" and vae.quant_conv is not None:
        layers.append((vae.quant_conv, vae.quant_conv))

    # Group the tile-local layers between attentions into segments. The first segment of the
    # encoder runs on the image (crops aligned to f, output at 1/f); the decoder's last one
    # writes the image (output at f); the others stay at latent resolution.
    plan, run = [], []
    for module, call in layers + [(None, None)]:
        if module is None or call is None:
            if run:
                first = not plan
                if direction == "encode" and first:
                    align, scale = f, Fraction(1, f)
                elif direction == "decode" and module is None:
                    align, scale = 1, Fraction(f)
                else:
                    align, scale = 1, Fraction(1)
                plan.append(_Segment(run, align, scale))
                run = []
            if module is not None:
                plan.append(module)
        else:
            run.append((module, call))
    return plan, f


def _halos(plan, f):
    """(segment, its halo in its input's pixels, the same in image pixels, image pixels per
    input pixel) for each segment of a plan: the receptive radius, rounded up to the crop
    alignment."""
    out = []
    for step in plan:
        if isinstance(step, _Segment):
            unit = 1 if step.align > 1 else f
            radius = math.ceil(step.radius / step.align) * step.align
            out.append((step, radius, radius * unit, unit))
    return out


def default_halo(vae, direction: str = "decode") -> int:
    """The smallest (and default) `halo` of tiled_decode (direction="decode") or tiled_encode
    ("encode") for this VAE, in image pixels: the largest receptive radius of its segments."""
    if direction not in ("decode", "encode"):
        raise ValueError(f"default_halo: direction must be 'decode' or 'encode', got {direction!r}")
    plan, f = _plan(vae, direction)
    return max(n[2] for n in _halos(plan, f))


def _run_tiled(vae, x: torch.Tensor, direction: str, tile_size: Optional[int], halo: Optional[int]) -> torch.Tensor:
    plan, f = _plan(vae, direction)
    tile_size = DEFAULT_TILE_SIZE if tile_size is None else tile_size
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < f or tile_size % f:
        raise ValueError(f"tiled VAE: tile_size must be a positive multiple of {f} image pixels, got {tile_size!r}")
    if x.dim() != 4:
        raise ValueError(f"tiled VAE: expected a 4-D (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if direction == "encode" and (x.shape[-2] % f or x.shape[-1] % f):
        raise ValueError(
            f"tiled_encode: images must have a height and width divisible by {f} (the VAE's "
            f"downsampling factor), got {tuple(x.shape[-2:])}"
        )
    # Each segment's halo, in its input's pixels, converted to image pixels for the check.
    needed = _halos(plan, f)
    if halo is not None:
        smallest = max(n[2] for n in needed)
        if isinstance(halo, bool) or not isinstance(halo, int) or halo < smallest:
            raise ValueError(
                f"tiled VAE: halo must be an int of at least {smallest} image pixels (the receptive "
                f"radius of the VAE's layers, so that tiles see all they depend on), got {halo!r}"
            )
    halos = {
        id(step): radius if halo is None else math.ceil(halo / unit / step.align) * step.align
        for step, radius, _, unit in needed
    }
    with torch.no_grad():
        for step in plan:
            if isinstance(step, _Segment):
                core = tile_size if step.align > 1 else tile_size // f
                x = step.run(x, core, halos[id(step)])
            else:
                # Blocks of one tile's latent tokens, at most 16384 (x 4096 keys: float32 scores
                # of 256 MiB), less than one tile's activations.
                x = _global_attention(step, x, min((tile_size // f) ** 2, 16384))
    return x


def tiled_decode(vae, latents: torch.Tensor, *, tile_size: Optional[int] = None, halo: Optional[int] = None) -> torch.Tensor:
    """`vae.decode(latents).sample`, computed tile by tile.

    Args:
        vae: a diffusers AutoencoderKL with GroupNorm decoder (SD 1.5, 2.1, XL, ...).
        latents: (B, latent_channels, h, w), unscaled (divide by scaling_factor first, as for
            vae.decode), the VAE's dtype.
        tile_size: tile side in image pixels before halos, a multiple of the downsampling
            factor f (8 for SD): default 512. Peak memory grows with its square.
        halo: context on each side of a tile in image pixels; default and minimum: the
            decoder's receptive radius.

    Returns:
        (B, out_channels, f*h, f*w) in the VAE's dtype, equal to the untiled decode up to
        float rounding.
    """
    return _run_tiled(vae, latents, "decode", tile_size, halo)


def tiled_encode(vae, images: torch.Tensor, *, tile_size: Optional[int] = None, halo: Optional[int] = None) -> DiagonalGaussianDistribution:
    """`vae.encode(images).latent_dist`, computed tile by tile.

    images: (B, in_channels, H, W) in [-1, 1], H and W divisible by f; tile_size and halo as in
    `tiled_decode` (image pixels; the encoder's default halo is its receptive radius).
    Returns the DiagonalGaussianDistribution of the (B, latent_channels, H/f, W/f) latents.
    """
    return DiagonalGaussianDistribution(_run_tiled(vae, images, "encode", tile_size, halo))


class TiledVAEHandle:
    """Undoes `enable_tiled_vae`: `remove()` (or leaving its `with` block) restores the VAE's
    decode and encode."""

    def __init__(self, vae, saved):
        self.vae = vae
        self._saved = saved

    def remove(self) -> None:
        for name, previous in self._saved:
            if previous is None:
                self.vae.__dict__.pop(name, None)
            else:
                self.vae.__dict__[name] = previous
        self._saved = []

    def __enter__(self) -> "TiledVAEHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def enable_tiled_vae(vae, *, tile_size: Optional[int] = None, halo: Optional[int] = None) -> TiledVAEHandle:
    """Make `vae.decode` and `vae.encode` tiled (`tiled_decode` / `tiled_encode`) for inputs
    larger than one tile; smaller ones run untiled. Returns a handle whose `remove()` restores
    both methods. Same arguments, return types and return_dict as the originals."""
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    size = DEFAULT_TILE_SIZE if tile_size is None else tile_size
    decode, encode = vae.decode, vae.encode

    def tiled_decode_method(z, return_dict: bool = True, generator=None):
        if max(z.shape[-2:]) * f <= size:
            return decode(z, return_dict=return_dict)
        sample = tiled_decode(vae, z, tile_size=tile_size, halo=halo)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def tiled_encode_method(x, return_dict: bool = True):
        if max(x.shape[-2:]) <= size:
            return encode(x, return_dict=return_dict)
        dist = tiled_encode(vae, x, tile_size=tile_size, halo=halo)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    saved = [(name, vae.__dict__.get(name)) for name in ("decode", "encode")]
    vae.decode, vae.encode = tiled_decode_method, tiled_encode_method
    return TiledVAEHandle(vae, saved)


__all__ = ["default_halo", "enable_tiled_vae", "tiled_decode", "tiled_encode", "TiledVAEHandle"]
