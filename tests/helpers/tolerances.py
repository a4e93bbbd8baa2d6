"""The tolerance rule of the op tests (docs/design.md, Numerics)."""

import torch


def assert_close_lowp(out, ref_lowp, ref_fp32, floor=1e-5, name="output"):
    """the tolerance rule of docs/design.md: max|out - ref_fp32| <= 2 * max|ref_lowp - ref_fp32| + floor, where
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
