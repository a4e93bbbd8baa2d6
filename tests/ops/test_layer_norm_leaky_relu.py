"""layer_norm_leaky_relu: forward and backward against linfusion_ops.reference, gradcheck,
opcheck, bad input and the determinism of the weight / bias gradients."""

import re

import pytest
import torch
import torch.nn.functional as F

import linfusion_ops
from linfusion_ops import reference
from tests.helpers.backends import DEVICES, requires_compiled
from tests.helpers.tolerances import assert_close_lowp, default_floor

pytestmark = requires_compiled

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
OP = torch.ops.linfusion_ops.layer_norm_leaky_relu.default
BACKWARD_OP = torch.ops.linfusion_ops.layer_norm_leaky_relu_backward.default


def _make(shape, device, dtype, seed, offset=0.0):
    """x of `shape` (last dim C), weight and bias (C,); weight spread around 1 as after training."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[-1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0 + offset
    weight = 1.0 + 0.5 * torch.randn(c, generator=gen, dtype=torch.float64)
    bias = 0.5 * torch.randn(c, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, weight, bias)]


def sample_inputs(device, dtype):
    """Yields (x, weight, bias, eps, negative_slope): odd channel counts, 0 to 1000 rows, 1-D to 4-D
    x, non-contiguous x / weight / bias, rows far from zero and non-default eps and slope."""
    seed = 0
    for c, rows in [(1, 7), (33, 1), (33, 1000), (40, 7), (80, 1000), (320, 7), (768, 1),
                    (1280, 7), (2048, 7)]:
        seed += 1
        yield (*_make((rows, c), device, dtype, seed), 1e-5, 0.01)
    yield (*_make((40,), device, dtype, 20), 1e-5, 0.01)
    yield (*_make((2, 5, 40), device, dtype, 21), 1e-6, 0.2)
    yield (*_make((2, 3, 4, 33), device, dtype, 22), 1e-5, 0.01)
    yield (*_make((2, 0, 40), device, dtype, 25), 1e-5, 0.01)
    x, weight, bias = _make((6, 80), device, dtype, 23)
    yield x.t().contiguous().t(), weight, bias, 1e-5, 0.01
    x, weight, bias = _make((7, 66), device, dtype, 26)
    yield x[:, ::2], weight[::2], bias[::2], 1e-5, 0.01
    yield (*_make((7, 320), device, dtype, 24, offset=100.0), 1e-5, 0.01)


def _same_dtype_pytorch(x, weight, bias, eps, negative_slope):
    """The same math done by PyTorch in x's dtype: the low-precision reference of the tolerance rule."""
    return F.leaky_relu(F.layer_norm(x, x.shape[-1:], weight, bias, eps), negative_slope)


def _oracle(x, weight, bias, eps, negative_slope):
    """linfusion_ops.reference in float64."""
    return reference.layer_norm_leaky_relu(
        x.double(), weight.double(), bias.double(), eps=eps, negative_slope=negative_slope
    )


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().requires_grad_() for t in inputs[:3]]
    out = fn(*leaves, *inputs[3:])
    return torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


def _scale(t):
    return max(1.0, t.abs().max().item()) if t.numel() else 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_reference(device, dtype):
    for x, weight, bias, eps, slope in sample_inputs(device, dtype):
        out, mean, rstd = OP(x, weight, bias, eps, slope)
        assert out.shape == x.shape and out.dtype == dtype
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert mean.shape == x.shape[:-1] and mean.dtype == acc and rstd.dtype == acc
        oracle = _oracle(x, weight, bias, eps, slope)
        assert_close_lowp(
            out, _same_dtype_pytorch(x, weight, bias, eps, slope), oracle,
            floor=default_floor(dtype) * _scale(oracle), name=f"out {tuple(x.shape)}",
        )
        x64 = x.double()
        ref_mean = x64.mean(-1)
        ref_rstd = torch.rsqrt((x64 - ref_mean[..., None]).square().mean(-1) + eps)
        assert_close_lowp(mean, ref_mean, ref_mean, floor=1e-5 * _scale(ref_mean), name="mean")
        assert_close_lowp(rstd, ref_rstd, ref_rstd, floor=1e-5 * _scale(ref_rstd), name="rstd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_public_api_matches_op(device, dtype):
    x, weight, bias = _make((3, 5, 40), device, dtype, 30)
    out = linfusion_ops.layer_norm_leaky_relu(x, weight, bias, eps=1e-4, negative_slope=0.1)
    torch.testing.assert_close(out, OP(x, weight, bias, 1e-4, 0.1)[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_reference(device, dtype):
    def ours(x, weight, bias, eps, slope):
        return linfusion_ops.layer_norm_leaky_relu(x, weight, bias, eps=eps, negative_slope=slope)

    def oracle(x, weight, bias, eps, slope):
        return _oracle(x, weight, bias, eps, slope)

    for i, sample in enumerate(sample_inputs(device, dtype)):
        x = sample[0]
        grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i),
                               dtype=torch.float64).to(device)
        got = _grads(ours, sample, grad_out)
        ref_lowp = _grads(_same_dtype_pytorch, sample, grad_out)
        ref = _grads(oracle, sample, grad_out)
        for name, g, g_lowp, g_ref in zip(("grad_x", "grad_weight", "grad_bias"), got, ref_lowp, ref):
            assert g.shape == g_ref.shape and g.dtype == dtype, name
            assert_close_lowp(g, g_lowp, g_ref, floor=default_floor(dtype) * _scale(g_ref),
                              name=f"{name} {tuple(x.shape)}")


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64(device):
    for shape in [(1, 1), (5, 33), (2, 3, 40)]:
        x, weight, bias = (t.requires_grad_() for t in _make(shape, device, torch.float64, 40))

        def fn(x, weight, bias):
            return linfusion_ops.layer_norm_leaky_relu(x, weight, bias, eps=1e-5, negative_slope=0.1)

        assert torch.autograd.gradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    # Registration (schema, fake kernel, autograd) does not depend on the dtype: fp32 samples only.
    for x, weight, bias, eps, slope in sample_inputs(device, torch.float32):
        torch.library.opcheck(OP, (x.requires_grad_(), weight.requires_grad_(),
                                   bias.requires_grad_(), eps, slope))
        _, mean, rstd = OP(x.detach(), weight.detach(), bias.detach(), eps, slope)
        grad_out = torch.randn_like(x)
        torch.library.opcheck(BACKWARD_OP, (grad_out, x.detach(), weight.detach(), bias.detach(),
                                            mean, rstd, slope))


@pytest.mark.parametrize("device", DEVICES)
def test_weight_bias_gradients_are_deterministic(device):
    x, weight, bias = _make((8192, 64), device, torch.float32, 50)
    grad_out = torch.randn_like(x)
    _, mean, rstd = OP(x, weight, bias, 1e-5, 0.01)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(BACKWARD_OP(grad_out, x, weight, bias, mean, rstd, 0.01))
    finally:
        torch.set_num_threads(previous)
    for grads in results[1:]:
        for got, first in zip(grads, results[0]):
            assert torch.equal(got, first)


def _bad_inputs(device):
    x, weight, bias = _make((4, 8), device, torch.float32, 60)
    yield (x, weight[:7], bias, 1e-5), "weight must have shape (8,)"
    yield (x, weight, bias.reshape(2, 4), 1e-5), "bias must have shape (8,)"
    yield (x, weight.double(), bias, 1e-5), "x and weight must have the same dtype"
    yield (x, weight, bias.half(), 1e-5), "x and bias must have the same dtype"
    yield (x.to(torch.int32), weight, bias, 1e-5), "x must be float32, float16, bfloat16 or float64"
    yield (x, weight, bias, 0.0), "eps must be finite and > 0"
    yield (x, weight, bias, -1e-5), "eps must be finite and > 0"
    yield (x[:, :0], weight[:0], bias[:0], 1e-5), "x's last dim (C) must be positive"


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    for (x, weight, bias, eps), message in _bad_inputs(device):
        with pytest.raises(RuntimeError, match=re.escape(message)):
            OP(x, weight, bias, eps, 0.01)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_bad_input(device):
    x, weight, bias = _make((4, 8), device, torch.float32, 61)
    _, mean, rstd = OP(x, weight, bias, 1e-5, 0.01)
    grad_out = torch.randn_like(x)
    cases = [
        ((grad_out[:3], x, weight, bias, mean, rstd), "grad_out must have x's shape"),
        ((grad_out.double(), x, weight, bias, mean, rstd), "x and grad_out must have the same dtype"),
        ((grad_out, x, weight, bias, mean[:3], rstd), "mean must have shape x.shape[:-1]"),
        ((grad_out, x, weight, bias, mean, rstd.double()), "rstd must be Float"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            BACKWARD_OP(*args, 0.01)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_in_fp32(device, dtype):
    """Mixed-precision training: a low-precision x (a Linear's output under autocast) with the
    LayerNorm's fp32 weights runs in fp32, like F.layer_norm, and is differentiable in all three."""
    x, weight, bias = (t.requires_grad_() for t in _make((6, 40), device, torch.float32, 70))
    x_lowp = x.to(dtype)
    with torch.autocast(torch.device(device).type, dtype=dtype):
        out = linfusion_ops.layer_norm_leaky_relu(x_lowp, weight, bias)
    assert out.dtype == torch.float32
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, weight, bias), grad_out)
    x32 = x_lowp.detach().float().requires_grad_()
    ref = reference.layer_norm_leaky_relu(x32, weight, bias, eps=1e-5, negative_slope=0.01)
    ref_grads = torch.autograd.grad(ref, (x32, weight, bias), grad_out)
    assert_close_lowp(out, ref, ref, default_floor(torch.float32))
    # x's gradient comes back through the autocast cast in x's dtype.
    for name, g, rg in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        tol = default_floor(dtype) if name == "dx" else default_floor(torch.float32)
        assert_close_lowp(g, rg, rg, tol * _scale(rg), name)
