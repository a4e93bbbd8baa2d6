"""CUDA kernels of layer_norm_leaky_relu and merge_segments against linfusion_ops.reference.

The oracle is the reference computed in float64; low-precision results follow the tolerance rule of docs/design.md
(at most twice the error of the same math done by PyTorch in the output dtype, plus a small
floor). Every test runs on the backends of tests/helpers/backends.py: `cuda` (a GPU; skips without one) and the
emulation build on CPU tensors, as an H100 (132 SMs) and, where grid-stride loops matter, with
1 SM (`emu-1sm`: the loops then iterate, and per-block partials cover many rows). Emulation-only
tests check which kernel ran and that results do not depend on the thread and block schedule;
CUDA graphs, the child-process device assert and the 2^31-element case stay GPU-only.
"""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from linfusion_ops import reference

from tests.helpers.backends import assert_schedule_independent, launched, only

from tests.helpers.tolerances import assert_close_lowp, default_floor

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
EPS = 1e-5
SLOPE = 0.01
# The grid-stride kernels with a full H100 and with one SM.
GRID_BACKENDS = only("cuda", "emu", "emu-1sm")


# ---------------------------------------------------------------------------------------------
# layer_norm_leaky_relu

def _torch_layer_norm_leaky_relu(x, weight, bias):
    """The same math in x's dtype with PyTorch's own kernels."""
    return F.leaky_relu(F.layer_norm(x, x.shape[-1:], weight, bias, EPS), SLOPE)


def _norm_inputs(device, shape, dtype, seed=0, requires_grad=False):
    """x (shape), weight, bias (C,) on device; weight near 1 with some negative entries."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    c = shape[-1]
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, dtype)
    weight = (1 + 0.5 * torch.randn(c, generator=gen)).to(device, dtype)
    bias = (0.3 * torch.randn(c, generator=gen)).to(device, dtype)
    return [t.requires_grad_(requires_grad) for t in (x, weight, bias)]


def norm_sample_inputs(device, dtype):
    """(x, weight, bias) covering both kernel paths: the register path (C a multiple of the
    16-byte vector, C <= 2048) with every row-group width, and the generic path (odd C, C > 2048,
    misaligned rows, fp64)."""
    shapes = [(5, 1), (7, 33), (64, 40), (3, 11, 80), (21, 200), (300, 320), (130, 640),
              (33, 768), (17, 1280), (9, 2048), (4, 2056)]
    for i, shape in enumerate(shapes):
        yield _norm_inputs(device, shape, dtype, seed=i)


def _away_from_kink(x, weight, bias, grad_out, margin=1e-2):
    """grad_out with zeros where z = layer_norm(x) is within `margin` of 0: LeakyReLU's
    derivative jumps there, and a last-bit difference in z would pick the other side."""
    z = F.layer_norm(x.detach().double(), x.shape[-1:], weight.detach().double(),
                     bias.detach().double(), EPS)
    return grad_out.masked_fill(z.abs() < margin, 0)


def _norm_oracle(x, weight, bias, grad_out=None):
    """Forward (and, with grad_out, the gradients) of the reference in float64."""
    xd, wd, bd = (t.detach().double().requires_grad_(grad_out is not None) for t in (x, weight, bias))
    out = reference.layer_norm_leaky_relu(xd, wd, bd, eps=EPS, negative_slope=SLOPE)
    if grad_out is None:
        return out
    return (out, *torch.autograd.grad(out, (xd, wd, bd), grad_out.double()))


def _norm_same_dtype(x, weight, bias, grad_out):
    """PyTorch's forward and gradients in x's dtype (the low-precision side of the rule)."""
    xl, wl, bl = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))
    out = _torch_layer_norm_leaky_relu(xl, wl, bl)
    return (out.detach(), *torch.autograd.grad(out, (xl, wl, bl), grad_out))


@GRID_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_forward_matches_reference(backend, dtype):
    for x, weight, bias in norm_sample_inputs(backend.device, dtype):
        out, mean, rstd = backend.ops.layer_norm_leaky_relu(x, weight, bias, EPS, SLOPE)
        assert out.shape == x.shape and out.dtype == dtype
        oracle = _norm_oracle(x, weight, bias)
        lowp = _torch_layer_norm_leaky_relu(x, weight, bias)
        assert_close_lowp(out, lowp, oracle, floor=default_floor(dtype), name=f"out {tuple(x.shape)}")
        var, mu = torch.var_mean(x.double(), dim=-1, unbiased=False)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert mean.dtype == acc and rstd.dtype == acc and mean.shape == x.shape[:-1]
        stats_floor = 1e-10 if dtype == torch.float64 else 1e-5
        assert_close_lowp(mean, mu, mu, floor=stats_floor, name="mean")
        assert_close_lowp(rstd / torch.rsqrt(var + EPS), torch.ones_like(var),
                          torch.ones_like(var), floor=stats_floor, name="rstd (relative)")


@GRID_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_gradients_match_reference(backend, dtype):
    for i, (x, weight, bias) in enumerate(norm_sample_inputs(backend.device, dtype)):
        grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i)).to(backend.device, dtype)
        grad_out = _away_from_kink(x, weight, bias, grad_out)
        x, weight, bias = (t.requires_grad_(True) for t in (x, weight, bias))
        out = backend.layer_norm_leaky_relu(x, weight, bias, eps=EPS, negative_slope=SLOPE)
        grads = torch.autograd.grad(out, (x, weight, bias), grad_out)
        oracle = _norm_oracle(x, weight, bias, grad_out)[1:]
        lowp = _norm_same_dtype(x, weight, bias, grad_out)[1:]
        # dweight / dbias sum over rows: the floor scales with the number of rows.
        rows = x.numel() // x.shape[-1]
        floors = [default_floor(dtype), default_floor(dtype) * rows ** 0.5, default_floor(dtype) * rows ** 0.5]
        for name, got, lp, ref, floor in zip(("grad_x", "grad_weight", "grad_bias"), grads, lowp, oracle, floors):
            assert got.shape == ref.shape and got.dtype == dtype
            assert_close_lowp(got, lp, ref, floor=floor, name=f"{name} {tuple(x.shape)}")


def test_layer_norm_misaligned_and_strided_inputs(backend):
    """A contiguous x whose data starts off the 16-byte grid takes the generic path; a
    non-contiguous x gives an output in x's layout."""
    c, rows = 320, 50
    flat = torch.randn(rows * c + 1, device=backend.device, dtype=torch.bfloat16)
    x = flat[1:].view(rows, c)
    _, weight, bias = _norm_inputs(backend.device, (rows, c), torch.bfloat16)
    out, _, _ = backend.ops.layer_norm_leaky_relu(x, weight, bias, EPS, SLOPE)
    assert_close_lowp(out, _torch_layer_norm_leaky_relu(x, weight, bias), _norm_oracle(x, weight, bias),
                      floor=default_floor(torch.bfloat16), name="misaligned")
    xt = torch.randn(c, rows, device=backend.device).t()  # (rows, C) with C strided
    _, weight, bias = _norm_inputs(backend.device, (rows, c), torch.float32)
    out, _, _ = backend.ops.layer_norm_leaky_relu(xt, weight, bias, EPS, SLOPE)
    assert out.stride() == torch.empty_like(xt).stride()
    assert_close_lowp(out, _torch_layer_norm_leaky_relu(xt, weight, bias), _norm_oracle(xt, weight, bias),
                      floor=default_floor(torch.float32), name="transposed")


def test_layer_norm_empty_rows(backend):
    x, weight, bias = _norm_inputs(backend.device, (0, 320), torch.float32)
    out, mean, rstd = backend.ops.layer_norm_leaky_relu(x, weight, bias, EPS, SLOPE)
    assert out.shape == (0, 320) and mean.shape == (0,)
    grad_x, grad_w, grad_b = backend.ops.layer_norm_leaky_relu_backward(out, x, weight, bias, mean, rstd, SLOPE)
    assert grad_x.shape == (0, 320)
    assert torch.equal(grad_w, torch.zeros_like(grad_w)) and torch.equal(grad_b, torch.zeros_like(grad_b))


# GPU only: the emulator runs one thread at a time (its schedule tests below are the check there).
@only("cuda")
@pytest.mark.parametrize("shape", [(4096, 320), (2000, 33), (1500, 2048)])
def test_layer_norm_backward_is_deterministic(backend, shape):
    x, weight, bias = _norm_inputs(backend.device, shape, torch.bfloat16)
    grad_out = torch.randn(shape, device=backend.device, dtype=torch.bfloat16)
    _, mean, rstd = backend.ops.layer_norm_leaky_relu(x, weight, bias, EPS, SLOPE)
    first = backend.ops.layer_norm_leaky_relu_backward(grad_out, x, weight, bias, mean, rstd, SLOPE)
    for _ in range(3):
        again = backend.ops.layer_norm_leaky_relu_backward(grad_out, x, weight, bias, mean, rstd, SLOPE)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_layer_norm_opcheck(backend):
    ops = backend.ops
    for dtype in (torch.float32, torch.bfloat16):
        for x, weight, bias in list(norm_sample_inputs(backend.device, dtype))[:6]:
            for requires_grad in (False, True):
                args = [t.detach().requires_grad_(requires_grad) for t in (x, weight, bias)]
                torch.library.opcheck(ops.layer_norm_leaky_relu.default, (*args, EPS, SLOPE))
            out, mean, rstd = ops.layer_norm_leaky_relu(x, weight, bias, EPS, SLOPE)
            torch.library.opcheck(ops.layer_norm_leaky_relu_backward.default,
                                  (torch.randn_like(out), x, weight, bias, mean, rstd, SLOPE))


@pytest.mark.slow
@only("cuda")
def test_layer_norm_more_than_2_31_elements(backend):
    """bf16 rows x 1280 with rows * C > 2^31: the head and tail rows match the reference, and
    dweight / dbias match a chunked float64 sum over every row."""
    c = 1280
    rows = 2**31 // c + 37
    assert rows * c > 2**31
    torch.manual_seed(0)
    x = torch.randn(rows, c, device=backend.device, dtype=torch.bfloat16)
    _, weight, bias = _norm_inputs(backend.device, (1, c), torch.bfloat16)
    out, mean, rstd = backend.ops.layer_norm_leaky_relu(x, weight, bias, EPS, SLOPE)
    grad_out = torch.randn_like(x)
    parts = (slice(0, 64), slice(rows - 64, rows))
    for part in parts:
        grad_out[part] = _away_from_kink(x[part], weight, bias, grad_out[part])
    grad_x, grad_w, grad_b = backend.ops.layer_norm_leaky_relu_backward(grad_out, x, weight, bias, mean, rstd, SLOPE)
    for part in parts:
        oracle = _norm_oracle(x[part], weight, bias, grad_out[part])
        lowp = _norm_same_dtype(x[part], weight, bias, grad_out[part])
        assert_close_lowp(out[part], lowp[0], oracle[0], floor=default_floor(torch.bfloat16), name="out tail")
        assert_close_lowp(grad_x[part], lowp[1], oracle[1], floor=default_floor(torch.bfloat16), name="grad_x tail")
    del out
    sum_w = torch.zeros(c, device=backend.device, dtype=torch.float64)
    sum_b = torch.zeros_like(sum_w)
    chunk = 1 << 18
    for start in range(0, rows, chunk):
        xs = x[start:start + chunk].double()
        xhat = (xs - mean[start:start + chunk, None].double()) * rstd[start:start + chunk, None].double()
        z = xhat * weight.double() + bias.double()
        g = grad_out[start:start + chunk].double()
        gz = torch.where(z > 0, g, g * SLOPE)
        sum_w += (gz * xhat).sum(0)
        sum_b += gz.sum(0)
    # bf16 rounding of a sum of ~1.7M terms of size ~1: compare relative to the bf16 grid.
    for name, got, ref in (("grad_weight", grad_w, sum_w), ("grad_bias", grad_b, sum_b)):
        err = (got.double() - ref).abs().max().item()
        bound = 2 ** -7 * ref.abs().max().item() + 1.0
        assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


# ---------------------------------------------------------------------------------------------
# merge_segments

def _merge_inputs(device, segments, length, channels, prompts, max_tokens, dtype, *, seed=0,
                  keep_fraction=0.7, pad_per_slot=False, shuffle=True):
    """embeds (S, L, C), keep (S, L) bool, segment_ids (S,) int64 (prompts in shuffled order
    when `shuffle`), pad (C,) or (T, C)."""
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(segments, length, channels, generator=gen).to(device, dtype)
    keep = (torch.rand(segments, length, generator=gen) < keep_fraction).to(device)
    ids = torch.randint(0, max(prompts, 1), (segments,), generator=gen)
    if not shuffle:
        ids = ids.sort().values
    pad_shape = (max_tokens, channels) if pad_per_slot else (channels,)
    pad = torch.randn(pad_shape, generator=gen).to(device, dtype)
    return embeds, keep, ids.to(device), prompts, max_tokens, pad


def merge_sample_inputs(device, dtype):
    """Odd sizes: C = 1, 33, 768, 2048; S from 1 to 300; L of 5 to 77 tokens (64: whole warps);
    every token dropped; a budget smaller than one segment; prompts without segments (260
    prompts: more than the copy blocks plan themselves); (C,) and (T, C) pads."""
    yield _merge_inputs(device, 1, 5, 1, 1, 3, dtype, seed=1)
    yield _merge_inputs(device, 7, 77, 33, 3, 100, dtype, seed=2, pad_per_slot=True)
    yield _merge_inputs(device, 12, 77, 768, 2, 240, dtype, seed=3, shuffle=False)
    yield _merge_inputs(device, 300, 13, 33, 9, 50, dtype, seed=4)
    yield _merge_inputs(device, 24, 77, 2048, 4, 512, dtype, seed=5, pad_per_slot=True)
    yield _merge_inputs(device, 10, 77, 768, 3, 20, dtype, seed=6, keep_fraction=0.0)  # every token dropped
    yield _merge_inputs(device, 6, 77, 64, 2, 5, dtype, seed=7, keep_fraction=1.0)  # budget < one segment
    yield _merge_inputs(device, 3, 40, 80, 5, 64, dtype, seed=8)  # some prompts have no segment
    yield _merge_inputs(device, 9, 64, 24, 4, 150, dtype, seed=9)  # L a multiple of the warp
    yield _merge_inputs(device, 5, 33, 8, 260, 40, dtype, seed=10)  # > 256 prompts: the plan kernel


@GRID_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_forward_matches_reference(backend, dtype):
    for embeds, keep, ids, prompts, tokens, pad in merge_sample_inputs(backend.device, dtype):
        merged, lengths = backend.ops.merge_segments(embeds, keep, ids, prompts, tokens, pad)
        ref_merged, ref_lengths = reference.merge_segments(embeds, keep, ids, prompts, tokens, pad)
        assert merged.dtype == dtype and lengths.dtype == torch.int64
        assert torch.equal(lengths, ref_lengths)
        assert torch.equal(merged, ref_merged), f"merged differs for S={embeds.shape[0]}, C={embeds.shape[2]}"


@GRID_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_gradients_match_reference(backend, dtype):
    for i, (embeds, keep, ids, prompts, tokens, pad) in enumerate(merge_sample_inputs(backend.device, dtype)):
        embeds, pad = embeds.requires_grad_(True), pad.requires_grad_(True)
        merged, _ = backend.merge_segments(embeds, keep, ids, prompts, tokens, pad)
        grad = torch.randn(merged.shape, generator=torch.Generator().manual_seed(50 + i)).to(backend.device, dtype)
        grad_embeds, grad_pad = torch.autograd.grad(merged, (embeds, pad), grad)
        # Oracle: the reference's autograd in float64; same-dtype side: the reference in dtype.
        p64 = pad.detach().double().requires_grad_(True)
        ref = reference.merge_segments(embeds.detach().double(), keep, ids, prompts, tokens, p64)[0]
        (ref_pad,) = torch.autograd.grad(ref, (p64,), grad.double())
        el, pl = embeds.detach().clone().requires_grad_(True), pad.detach().clone().requires_grad_(True)
        low = reference.merge_segments(el, keep, ids, prompts, tokens, pl)[0]
        low_embeds, low_pad = torch.autograd.grad(low, (el, pl), grad)
        assert torch.equal(grad_embeds, low_embeds), "grad_embeds is a pure gather"
        pad_rows = max(prompts * tokens, 1)
        assert_close_lowp(grad_pad, low_pad, ref_pad, floor=default_floor(dtype) * pad_rows ** 0.5,
                          name=f"grad_pad {tuple(pad.shape)}")


@only("cuda", "emu-1sm")
def test_merge_many_segments_cross_scan_chunks(backend):
    """More segments than the plan kernel scans at once (1024), prompts interleaved, so each
    prompt's running offset is carried across chunks. The reference runs on CPU copies."""
    embeds, keep, ids, prompts, tokens, pad = _merge_inputs(backend.device, 2500, 3, 8, 7, 900,
                                                            torch.float32, seed=9)
    merged, lengths = backend.ops.merge_segments(embeds, keep, ids, prompts, tokens, pad)
    ref_merged, ref_lengths = reference.merge_segments(embeds.cpu(), keep.cpu(), ids.cpu(), prompts, tokens, pad.cpu())
    assert torch.equal(lengths.cpu(), ref_lengths)
    assert torch.equal(merged.cpu(), ref_merged)
    grad = torch.randn_like(merged)
    grad_embeds, grad_pad = backend.ops.merge_segments_backward(grad, keep, ids, lengths, False)
    ref_grads = {}
    for dtype in (torch.float32, torch.float64):
        e = embeds.cpu().to(dtype).requires_grad_(True)
        p = pad.cpu().to(dtype).requires_grad_(True)
        merged_ref = reference.merge_segments(e, keep.cpu(), ids.cpu(), prompts, tokens, p)[0]
        ref_grads[dtype] = torch.autograd.grad(merged_ref, (e, p), grad.cpu().to(dtype))
    assert torch.equal(grad_embeds.cpu(), ref_grads[torch.float32][0])
    assert_close_lowp(grad_pad.cpu(), ref_grads[torch.float32][1], ref_grads[torch.float64][1],
                      floor=default_floor(torch.float32) * (prompts * tokens) ** 0.5, name="grad_pad")


@only("cuda")
def test_merge_backward_is_deterministic(backend):
    for pad_per_slot in (False, True):
        embeds, keep, ids, prompts, tokens, pad = _merge_inputs(
            backend.device, 96, 77, 768, 8, 240, torch.bfloat16, keep_fraction=0.3,
            pad_per_slot=pad_per_slot)
        merged, lengths = backend.ops.merge_segments(embeds, keep, ids, prompts, tokens, pad)
        grad = torch.randn_like(merged)
        first = backend.ops.merge_segments_backward(grad, keep, ids, lengths, pad_per_slot)
        for _ in range(3):
            again = backend.ops.merge_segments_backward(grad, keep, ids, lengths, pad_per_slot)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_merge_opcheck(backend):
    ops = backend.ops
    for dtype in (torch.float32, torch.bfloat16):
        for embeds, keep, ids, prompts, tokens, pad in merge_sample_inputs(backend.device, dtype):
            for requires_grad in (False, True):
                args = (embeds.detach().requires_grad_(requires_grad), keep, ids, prompts, tokens,
                        pad.detach().requires_grad_(requires_grad))
                torch.library.opcheck(ops.merge_segments.default, args)
            merged, lengths = ops.merge_segments(embeds, keep, ids, prompts, tokens, pad)
            torch.library.opcheck(ops.merge_segments_backward.default,
                                  (torch.randn_like(merged), keep, ids, lengths, pad.dim() == 2))


@only("cuda")
def test_merge_out_of_range_segment_id_asserts(backend):
    """An id >= num_prompts trips the op's device-side assert (run in a child: it poisons the
    CUDA context). The op is called directly: the public function checks the ids on the host
    first and would raise before the kernel runs."""
    code = textwrap.dedent(
        """
        import torch, linfusion_ops
        embeds = torch.randn(3, 4, 8, device="cuda")
        keep = torch.ones(3, 4, dtype=torch.bool, device="cuda")
        ids = torch.tensor([0, 5, 1], device="cuda")
        merged, lengths = torch.ops.linfusion_ops.merge_segments(
            embeds, keep, ids, 2, 6, torch.zeros(8, device="cuda"))
        torch.cuda.synchronize()
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode != 0
    assert "device-side assert" in result.stderr, result.stderr[-2000:]


@only("emu")
@pytest.mark.parametrize("segments,planner", [(3, "merge_segments_fused_kernel"),
                                              (300, "merge_segments_plan_kernel")])
def test_merge_out_of_range_segment_id_raises_under_emulation(backend, segments, planner):
    """Emulated, the device assert of the kernel that plans (the fused copy kernel for a few
    segments, the plan kernel for many) is a RuntimeError naming the kernel, its source line, the
    block and the thread, raised by the op itself; the emulator stays usable."""
    embeds = torch.randn(segments, 4, 8)
    keep = torch.ones(segments, 4, dtype=torch.bool)
    pad = torch.zeros(8)
    bad = torch.arange(segments) % 2
    bad[1] = 5
    with pytest.raises(RuntimeError, match="segment_ids must be in") as info:
        backend.ops.merge_segments(embeds, keep, bad, 2, 6, pad)
    message = str(info.value)
    for part in (planner, "merge_segments.cu:", "block", "thread"):
        assert part in message, f"{part!r} missing from: {message}"
    ids = torch.arange(segments) % 2
    merged, lengths = backend.ops.merge_segments(embeds, keep, ids, 2, 6, pad)
    ref_merged, ref_lengths = reference.merge_segments(embeds, keep, ids, 2, 6, pad)
    assert torch.equal(merged, ref_merged) and torch.equal(lengths, ref_lengths)


# ---------------------------------------------------------------------------------------------
# Emulation only: which kernel ran, and independence of the thread and block schedule.

def _template_args(kernels, kernel):
    """Template arguments (one string per launch) of `kernel` among the launched kernels."""
    return [m.group(1) for name in kernels for m in [re.search("::" + kernel + "<(.*)>$", name)] if m]


# Row-group width of the register path for C channels (the narrowest of 4 ... 128 threads whose
# 16 channels each hold the row), None for the generic path: C not a multiple of the 16-byte
# vector (1, 33) or above 2048 (2056).
NORM_THREADS_PER_ROW = {1: None, 33: None, 40: 4, 80: 8, 200: 16, 320: 32, 640: 64, 768: 64,
                        1280: 128, 2048: 128, 2056: None}
# fp16 / bf16 rows that are not whole 32-byte sectors (C = 40: 80 bytes, C = 200: 400 bytes) take
# one 8-channel vector per thread instead, so that a row group loads its row in one request.
NORM_THREADS_PER_ROW_2_BYTES = {**NORM_THREADS_PER_ROW, 40: 8, 200: 32}


@only("emu")
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_path(backend, dtype):
    ops = backend.ops
    for x, weight, bias in norm_sample_inputs(backend.device, dtype):
        c = x.shape[-1]
        widths = NORM_THREADS_PER_ROW_2_BYTES if dtype.itemsize == 2 else NORM_THREADS_PER_ROW
        want = None if dtype == torch.float64 else widths[c]
        out, mean, rstd = ops.layer_norm_leaky_relu(x, weight, bias, EPS, SLOPE)
        kernels = launched(lambda: ops.layer_norm_leaky_relu(x, weight, bias, EPS, SLOPE))
        kernels += launched(lambda: ops.layer_norm_leaky_relu_backward(
            torch.ones_like(out), x, weight, bias, mean, rstd, SLOPE))
        for kernel in ("layer_norm_leaky_relu_kernel", "layer_norm_leaky_relu_backward_kernel"):
            widths = [int(args.rsplit(",", 1)[1]) for args in _template_args(kernels, kernel)]
            assert widths == ([] if want is None else [want]), f"C = {c}, {kernel}: {kernels}"
        generic = [name for name in kernels if "_generic_kernel<" in name]
        assert len(generic) == (2 if want is None else 0), f"C = {c}: {kernels}"


@only("emu")
def test_merge_copy_unit_path(backend):
    """16-byte copies when every row is a whole number of aligned 16-byte units, else the
    element itself (fp32 rows of 33 channels, bf16 of 33, fp64 of 1)."""
    unit_bytes = {"uint4": 16, "unsigned short": 2, "unsigned int": 4, "unsigned long": 8}
    for dtype, channels, want in [(torch.float32, 768, 16), (torch.bfloat16, 64, 16),
                                  (torch.float32, 33, 4), (torch.bfloat16, 33, 2),
                                  (torch.float64, 1, 8)]:
        embeds, keep, ids, prompts, tokens, pad = _merge_inputs(
            backend.device, 4, 9, channels, 2, 20, dtype)
        merged, lengths = backend.ops.merge_segments(embeds, keep, ids, prompts, tokens, pad)
        kernels = launched(lambda: backend.ops.merge_segments(embeds, keep, ids, prompts, tokens, pad))
        kernels += launched(lambda: backend.ops.merge_segments_backward(
            merged, keep, ids, lengths, False))
        for kernel in ("merge_segments_fused_kernel", "merge_segments_fused_gather_grad_kernel"):
            units = [unit_bytes[u] for u in _template_args(kernels, kernel)]
            assert units == [want], f"{dtype}, C = {channels}, {kernel}: {kernels}"


@only("emu")
@pytest.mark.parametrize("segments,length,prompts,fused", [
    (256, 9, 2, True), (5, 9, 256, True), (212, 77, 3, True), (257, 9, 2, False), (5, 9, 257, False),
    (213, 77, 3, False)])
def test_merge_plan_path(backend, segments, length, prompts, fused):
    """Up to 256 segments, 256 prompts and 16 KB of keep mask (212 CLIP segments) each copy block
    plans in shared memory (one launch for the forward, one for the gather of the backward, before
    the pad gradient); beyond, the plan kernel writes the slots first. Both give the reference's
    result."""
    embeds, keep, ids, prompts, tokens, pad = _merge_inputs(backend.device, segments, length, 8, prompts,
                                                            40, torch.float32, seed=11)
    if length == 77:  # a keep mask at an odd address: the byte-wise staging
        keep = torch.zeros(segments * length + 1, dtype=torch.bool, device=keep.device)[1:].view(segments, length).copy_(keep)
    merged, lengths = backend.ops.merge_segments(embeds, keep, ids, prompts, tokens, pad)
    ref_merged, ref_lengths = reference.merge_segments(embeds, keep, ids, prompts, tokens, pad)
    assert torch.equal(merged, ref_merged) and torch.equal(lengths, ref_lengths)
    forward = launched(lambda: backend.ops.merge_segments(embeds, keep, ids, prompts, tokens, pad))
    backward = launched(lambda: backend.ops.merge_segments_backward(merged, keep, ids, lengths, False))
    short = [[name.split("<")[0].split("::")[-1] for name in names] for names in (forward, backward)]
    if fused:
        assert short == [["merge_segments_fused_kernel"],
                         ["merge_segments_fused_gather_grad_kernel", "merge_segments_pad_grad_kernel",
                          "column_sum_kernel"]], short
    else:
        assert short == [["merge_segments_plan_kernel", "merge_segments_kernel"],
                         ["merge_segments_plan_kernel", "merge_segments_gather_grad_kernel",
                          "merge_segments_pad_grad_kernel", "column_sum_kernel"]], short


@only("emu-1sm")
@pytest.mark.parametrize("shape,dtype", [((300, 320), torch.bfloat16), ((40, 1280), torch.float32),
                                         ((100, 40), torch.float16), ((130, 33), torch.float32),
                                         ((50, 80), torch.float64)])
def test_layer_norm_schedules_give_bitwise_equal_results(backend, shape, dtype):
    """Register path (row groups of 32 and 128 threads: the latter reduce through shared memory)
    and generic path, forward and backward (per-block partials, then the column sum)."""
    x, weight, bias = _norm_inputs(backend.device, shape, dtype)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)

    def run():
        out, mean, rstd = backend.ops.layer_norm_leaky_relu(x, weight, bias, EPS, SLOPE)
        return (out, mean, rstd, *backend.ops.layer_norm_leaky_relu_backward(
            grad_out, x, weight, bias, mean, rstd, SLOPE))

    assert_schedule_independent(backend, run)


@only("emu-1sm")
@pytest.mark.parametrize("pad_per_slot", [False, True])
def test_merge_schedules_give_bitwise_equal_results(backend, pad_per_slot):
    """Plan (ballots, the chunked scan over 1,100 segments), copies and both pad gradients."""
    embeds, keep, ids, prompts, tokens, pad = _merge_inputs(
        backend.device, 1100, 3, 8, 5, 300, torch.float32, pad_per_slot=pad_per_slot)
    grad = torch.randn(prompts, tokens, 8, generator=torch.Generator().manual_seed(4))

    def run():
        merged, lengths = backend.ops.merge_segments(embeds, keep, ids, prompts, tokens, pad)
        return (merged, lengths,
                *backend.ops.merge_segments_backward(grad, keep, ids, lengths, pad_per_slot))

    assert_schedule_independent(backend, run)


# ---------------------------------------------------------------------------------------------
# Both ops in a CUDA graph: no host synchronisation, launches on the current stream.

@only("cuda")
def test_cuda_graph_capture_and_replay(backend):
    ops = backend.ops
    x, weight, bias = _norm_inputs(backend.device, (1000, 320), torch.bfloat16)
    embeds, keep, ids, prompts, tokens, pad = _merge_inputs(backend.device, 40, 77, 768, 4, 240,
                                                            torch.bfloat16)
    grad_x_in = torch.randn_like(x)

    def step():
        out, mean, rstd = ops.layer_norm_leaky_relu(x, weight, bias, EPS, SLOPE)
        grads = ops.layer_norm_leaky_relu_backward(grad_x_in, x, weight, bias, mean, rstd, SLOPE)
        merged, lengths = ops.merge_segments(embeds, keep, ids, prompts, tokens, pad)
        merge_grads = ops.merge_segments_backward(merged, keep, ids, lengths, False)
        return (out, *grads, merged, lengths, *merge_grads)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(torch.randn_like(x))
    embeds.copy_(torch.randn_like(embeds))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step()):
        assert torch.equal(got, want)
