"""GPU benchmark cases of layer_norm_leaky_relu and merge_segments.

`cases(device)` yields `(case, fn, bytes)`: `case` is a dict in the results format of the GPU
benchmark (op, pass, impl, shape keys, dtype), `fn` a no-argument callable to time, and `bytes`
the minimum number of bytes the op must read and write (for gbps and bw_fraction). The GPU
benchmark runner iterates this next to the linear-attention cases.

impl "linfusion_ops" calls the registered ops directly (forward op, then the backward op for
"fwd+bwd"); impl "reference" is PyTorch eager: F.layer_norm then F.leaky_relu, and for the merge
LongAlign's per-prompt Python loop (linfusion_ops.reference.merge_segments), with autograd for
"fwd+bwd".
"""

from typing import Callable, Dict, Iterator, Tuple

import torch
import torch.nn.functional as F

from linfusion_ops import reference

EPS = 1e-5
SLOPE = 0.01
DTYPE = torch.bfloat16
DTYPE_NAME = "bf16"

# Shapes of the issue: LinFusion's kernel-function MLP at 2 x 64^2 x 4^2 ... latent tokens.
NORM_ROWS = (2 * 65536, 2 * 16384)
NORM_CHANNELS = (320, 640, 1280)
# LongAlign: 8 prompts of 12 CLIP segments of 77 tokens; CLIP-L / OpenCLIP-bigG widths.
MERGE_PROMPTS, MERGE_SEGMENTS, MERGE_LENGTH = 8, 12, 77
MERGE_CHANNELS = (768, 2048)
MERGE_TOKENS = (240, 512)

Case = Tuple[Dict, Callable[[], object], int]


def _norm_cases(device) -> Iterator[Case]:
    ops = torch.ops.linfusion_ops
    for rows in NORM_ROWS:
        for c in NORM_CHANNELS:
            x = torch.randn(rows, c, device=device, dtype=DTYPE)
            weight = torch.randn(c, device=device, dtype=DTYPE)
            bias = torch.randn(c, device=device, dtype=DTYPE)
            grad_out = torch.randn_like(x)
            elem = x.element_size()
            # Forward: x read, out written, fp32 mean/rstd written, weight and bias read.
            fwd_bytes = 2 * rows * c * elem + 2 * rows * 4 + 2 * c * elem
            # Backward: grad_out and x read, grad_x written, mean/rstd read, weight/bias read,
            # grad_weight/grad_bias written.
            bwd_bytes = 3 * rows * c * elem + 2 * rows * 4 + 4 * c * elem
            shape = {"op": "layer_norm_leaky_relu", "rows": rows, "C": c, "dtype": DTYPE_NAME}

            def fwd(x=x, weight=weight, bias=bias):
                return ops.layer_norm_leaky_relu.default(x, weight, bias, EPS, SLOPE)

            def fwd_bwd(x=x, weight=weight, bias=bias, grad_out=grad_out):
                _, mean, rstd = ops.layer_norm_leaky_relu.default(x, weight, bias, EPS, SLOPE)
                return ops.layer_norm_leaky_relu_backward.default(
                    grad_out, x, weight, bias, mean, rstd, SLOPE)

            xr, wr, br = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))

            def ref_fwd(x=x, weight=weight, bias=bias):
                return F.leaky_relu(F.layer_norm(x, (x.shape[-1],), weight, bias, EPS), SLOPE)

            def ref_fwd_bwd(x=xr, weight=wr, bias=br, grad_out=grad_out):
                out = F.leaky_relu(F.layer_norm(x, (x.shape[-1],), weight, bias, EPS), SLOPE)
                return torch.autograd.grad(out, (x, weight, bias), grad_out)

            yield {**shape, "pass": "fwd", "impl": "linfusion_ops"}, fwd, fwd_bytes
            yield {**shape, "pass": "fwd", "impl": "reference"}, ref_fwd, fwd_bytes
            yield {**shape, "pass": "fwd+bwd", "impl": "linfusion_ops"}, fwd_bwd, fwd_bytes + bwd_bytes
            yield {**shape, "pass": "fwd+bwd", "impl": "reference"}, ref_fwd_bwd, fwd_bytes + bwd_bytes


def _merge_inputs(device, c, tokens, seed=0):
    """LongAlign-like segments: each keeps its start token and 20 to 74 text tokens (end and pad
    tokens dropped); segments listed prompt by prompt."""
    gen = torch.Generator().manual_seed(seed)
    segments = MERGE_PROMPTS * MERGE_SEGMENTS
    embeds = torch.randn(segments, MERGE_LENGTH, c, generator=gen).to(device, DTYPE)
    kept = torch.randint(21, MERGE_LENGTH - 1, (segments, 1), generator=gen)
    keep = (torch.arange(MERGE_LENGTH)[None, :] < kept).to(device)
    segment_ids = torch.arange(MERGE_PROMPTS).repeat_interleave(MERGE_SEGMENTS).to(device)
    pad = torch.randn(c, generator=gen).to(device, DTYPE)
    filled = kept.view(MERGE_PROMPTS, MERGE_SEGMENTS).sum(1).clamp(max=tokens).sum().item()
    return embeds, keep, segment_ids, pad, int(filled)


def _merge_cases(device) -> Iterator[Case]:
    ops = torch.ops.linfusion_ops
    for c in MERGE_CHANNELS:
        for tokens in MERGE_TOKENS:
            embeds, keep, segment_ids, pad, filled = _merge_inputs(device, c, tokens)
            elem = embeds.element_size()
            segments, length = keep.shape
            # Forward: the kept tokens that fit read, every output slot written, the pad read
            # once, keep and segment ids read, lengths written.
            fwd_bytes = (filled + MERGE_PROMPTS * tokens + 1) * c * elem + keep.numel() + 8 * (
                segments + MERGE_PROMPTS)
            # Backward: grad_merged read, grad_embeds written (zeros for dropped tokens), grad_pad
            # written, keep and segment ids read (they place every slot's gradient).
            bwd_bytes = ((MERGE_PROMPTS * tokens + segments * length + 1) * c * elem
                         + keep.numel() + 8 * segments)
            shape = {"op": "merge_segments", "prompts": MERGE_PROMPTS, "segments": MERGE_SEGMENTS,
                     "L": MERGE_LENGTH, "C": c, "T": tokens, "dtype": DTYPE_NAME}
            grad = torch.randn(MERGE_PROMPTS, tokens, c, device=device, dtype=DTYPE)

            def fwd(embeds=embeds, keep=keep, ids=segment_ids, tokens=tokens, pad=pad):
                return ops.merge_segments.default(embeds, keep, ids, MERGE_PROMPTS, tokens, pad)

            def fwd_bwd(embeds=embeds, keep=keep, ids=segment_ids, tokens=tokens, pad=pad, grad=grad):
                _, lengths = ops.merge_segments.default(embeds, keep, ids, MERGE_PROMPTS, tokens, pad)
                return ops.merge_segments_backward.default(grad, keep, ids, lengths, False)

            er, pr = embeds.detach().clone().requires_grad_(True), pad.detach().clone().requires_grad_(True)

            def ref_fwd(embeds=embeds, keep=keep, ids=segment_ids, tokens=tokens, pad=pad):
                return reference.merge_segments(embeds, keep, ids, MERGE_PROMPTS, tokens, pad)

            def ref_fwd_bwd(embeds=er, keep=keep, ids=segment_ids, tokens=tokens, pad=pr, grad=grad):
                merged, _ = reference.merge_segments(embeds, keep, ids, MERGE_PROMPTS, tokens, pad)
                return torch.autograd.grad(merged, (embeds, pad), grad)

            yield {**shape, "pass": "fwd", "impl": "linfusion_ops"}, fwd, fwd_bytes
            yield {**shape, "pass": "fwd", "impl": "reference"}, ref_fwd, fwd_bytes
            yield {**shape, "pass": "fwd+bwd", "impl": "linfusion_ops"}, fwd_bwd, fwd_bytes + bwd_bytes
            yield {**shape, "pass": "fwd+bwd", "impl": "reference"}, ref_fwd_bwd, fwd_bytes + bwd_bytes


def cases(device) -> Iterator[Case]:
    """Every (case, fn, bytes) of layer_norm_leaky_relu and merge_segments on `device` (a CUDA
    device; the ops run on whatever device the tensors are on). Inputs are allocated lazily, one
    shape at a time, as the iterator advances."""
    yield from _norm_cases(device)
    yield from _merge_cases(device)


if __name__ == "__main__":
    import argparse
    import json

    from benchmarks.common import time_ms

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name(args.device)}  torch {torch.__version__}  "
          f"cuda {torch.version.cuda}")
    for case, fn, nbytes in cases(args.device):
        ms = time_ms(fn, args.device, warmup=3, repeat=20)
        print(json.dumps({**case, "ms": round(ms, 4), "gbps": round(nbytes / ms / 1e6, 1)}))
