"""GPU benchmark cases of linear attention.

`cases(device)` yields `(case, fn, bytes)`: `case` is a dict in the results format of
benchmarks/bench_gpu.py (op, pass, impl, B, N, H, D, dtype), `fn` a no-argument callable to time
and `bytes` the minimum traffic of the pass: q, k, v read and o written for "fwd"; in addition
grad_out read and dq, dk, dv written for "fwd+bwd".

impls: "linfusion_ops" (the public linear_attention, autograd for fwd+bwd); "reference" (the
official LinFusion formula in PyTorch, linfusion_ops.reference.official_linear_attention, with
its head transposes and elu + 1); "sdpa" (softmax attention, torch's
scaled_dot_product_attention on (B, H, N, D) views) where it finishes in reasonable time.
"""

from typing import Callable, Dict, Iterator, Tuple

import torch
import torch.nn.functional as F

import linfusion_ops
from linfusion_ops import reference

B = 2
# (N, H, D): Stable Diffusion self-attention at 512^2 ... 16K^2 latents.
SHAPES = [
    (4096, 8, 40),
    (65536, 8, 40),
    (16384, 10, 64),
    (262144, 10, 64),
    (1048576, 10, 64),
    (16384, 8, 80),
    (4096, 8, 160),
]
# Extra dtypes on two shapes.
OTHER_DTYPES = {(65536, 8, 40): ("fp16", "fp32"), (262144, 10, 64): ("fp16", "fp32")}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_MAX_TOKENS = 65536  # softmax attention is quadratic: beyond this a case takes seconds

Case = Tuple[Dict, Callable[[], object], int]


def _sdpa(q, k, v, heads):
    """Softmax attention on token-major inputs: (B, N, H*D) viewed as (B, H, N, D)."""
    b, n, c = q.shape
    split = [t.view(b, t.shape[1], heads, c // heads).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, c)


def _linfusion(q, k, v, heads):
    return linfusion_ops.linear_attention(q, k, v, heads)


IMPLS = {
    "linfusion_ops": _linfusion,
    "reference": reference.official_linear_attention,
    "sdpa": _sdpa,
}


def _shape_cases(device, n, heads, d, dtype_name) -> Iterator[Case]:
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad_out = (
        torch.randn(B, n, heads * d, device=device, generator=gen).to(dtype) for _ in range(4)
    )
    elem = q.element_size()
    fwd_bytes = 4 * B * n * heads * d * elem
    shape = {"op": "linear_attention", "B": B, "N": n, "H": heads, "D": d, "dtype": dtype_name}
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    for impl, fn in IMPLS.items():
        if impl == "sdpa" and n > SDPA_MAX_TOKENS:
            continue

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(q, k, v, heads)

        def fwd_bwd(fn=fn):
            out = fn(*leaves, heads)
            return torch.autograd.grad(out, leaves, grad_out)

        yield {**shape, "pass": "fwd", "impl": impl}, fwd, fwd_bytes
        yield {**shape, "pass": "fwd+bwd", "impl": impl}, fwd_bwd, 2 * fwd_bytes


def cases(device) -> Iterator[Case]:
    """Every (case, fn, bytes) of linear attention on `device`; inputs are allocated one shape
    at a time as the iterator advances."""
    for n, heads, d in SHAPES:
        for dtype_name in ("bf16",) + OTHER_DTYPES.get((n, heads, d), ()):
            yield from _shape_cases(device, n, heads, d, dtype_name)
