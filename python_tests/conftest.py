"""Shared test helpers: device parametrisation and the tolerance rule of DESIGN.md."""

import pytest
import torch

import linfusion_ops

HAS_CUDA = torch.cuda.is_available()
HAS_CUDA_KERNELS = linfusion_ops.build_info().get("cuda", False)

# Every op test runs on CPU; the CUDA variants skip without a GPU (or without CUDA kernels).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not (HAS_CUDA and HAS_CUDA_KERNELS), reason="needs a GPU and the CUDA kernels"
        ),
    ),
]

requires_compiled = pytest.mark.skipif(
    not linfusion_ops.compiled(), reason="linfusion_ops._C is not built"
)


def assert_close_lowp(out, ref_lowp, ref_fp32, floor=1e-5, name="output"):
    """DESIGN.md's rule: max|out - ref_fp32| <= 2 * max|ref_lowp - ref_fp32| + floor, where
    ref_lowp is the same math done by PyTorch in out's dtype. For fp32/fp64 outputs, pass
    ref_lowp = ref_fp32 and a floor that fits the dtype."""
    out = out.double()
    ref_fp32 = ref_fp32.double()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out - ref_fp32).abs().max().item() if out.numel() else 0.0
    ref_err = (ref_lowp.double() - ref_fp32).abs().max().item() if out.numel() else 0.0
    bound = 2 * ref_err + floor
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (ref error {ref_err:.3e})"


def default_floor(dtype):
    """Absolute floor of the tolerance rule for each dtype (values of order 1)."""
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
