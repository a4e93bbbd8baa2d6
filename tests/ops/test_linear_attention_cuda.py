"""CUDA linear attention (csrc/cuda/linear_attention*.cu) against linfusion_ops.reference.

Truth is the reference in fp64. Low-precision outputs follow the tolerance rule of docs/design.md: the
error is at most twice that of the same math done by PyTorch in the input dtype
(`lowp_linear_attention`, the official formula generalised to every feature map and the mask)
plus a small floor.

Every test runs on the backends of tests/helpers/backends.py: `cuda` (a GPU; skips without one) and the
emulation build on CPU tensors, at emulation-sized shapes (backend.pick). The emulated device
has 2 SMs here: with B*H = 4 and 200 keys the split-N kernels then run several splits (reduced by
the partials kernel) of several token tiles each (the loops that carry state across tiles).
Emulation-only tests at the end check which kernel ran on each device profile and that the
results do not depend on the order threads and blocks are scheduled in. CUDA graphs,
reduce-overhead compilation and multi-million-token sizes stay GPU-only.
"""

import re

import pytest
import torch

from linfusion_ops import reference
from tests.helpers.backends import assert_schedule_independent, launched, only
from tests.helpers.tolerances import assert_close_lowp, default_floor

BACKENDS = ["cuda", "emu-2sm"]
LOWP = [torch.bfloat16, torch.float16]
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
HEAD_DIMS = [17, 40, 59, 64, 80, 96, 128, 160, 256]


def lengths(backend):
    """(Nq, Nk) of the main cases: not a multiple of any tile (16, 32, 64), Nq != Nk."""
    return backend.pick((777, 1000), (77, 200))


def make_qkv(device, b, nq, nk, heads, dk, dv, dtype, scale=1.0, seed=0):
    """Token-major q (B, Nq, H*Dk), k (B, Nk, H*Dk) uniform in [-scale, scale], and
    v (B, Nk, H*Dv) uniform in [0, scale] so that the outputs (weighted means of v) are of the
    order of scale rather than averaging out to ~0."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, low=-1.0):
        return ((torch.rand(*shape, generator=g, device=device) * (1 - low) + low) * scale).to(dtype)

    return rand(b, nq, heads * dk), rand(b, nk, heads * dk), rand(b, nk, heads * dv, low=0.0)


def lowp_linear_attention(q, k, v, heads, feature_map="elu", eps=1e-4, key_padding_mask=None):
    """The official LinFusion formula run by PyTorch in the inputs' dtype, for any feature map
    and mask: kv = (phi(k)^T / sqrt(n)) (v / sqrt(n)), z = phi(q) . mean(phi(k)) + eps."""
    phi = reference.feature_map_fn(feature_map)
    b, nk, _ = k.shape
    fq = phi(reference._split_heads(q, heads))
    fk = phi(reference._split_heads(k, heads))
    vh = reference._split_heads(v, heads)
    if key_padding_mask is None:
        n = torch.full((b, 1, 1, 1), float(nk), device=k.device)
    else:
        fk = fk * key_padding_mask[:, None, :, None].to(fk.dtype)
        n = key_padding_mask.sum(1).clamp(min=1).float()[:, None, None, None]
    rs = n.rsqrt().to(k.dtype)
    kv = (fk.transpose(-2, -1) * rs) @ (vh * rs)
    z = fq @ (fk.sum(dim=-2, keepdim=True).transpose(-2, -1) * (1.0 / n).to(k.dtype)) + eps
    return reference._merge_heads(fq @ kv / z)


def truth(q, k, v, heads, feature_map="elu", eps=1e-4, key_padding_mask=None):
    return reference.linear_attention(
        q.double(), k.double(), v.double(), heads, feature_map=feature_map, eps=eps,
        key_padding_mask=key_padding_mask,
    )


def check_forward(backend, q, k, v, heads, feature_map="elu", eps=1e-4, key_padding_mask=None):
    out = backend.linear_attention(
        q, k, v, heads, feature_map=feature_map, eps=eps, key_padding_mask=key_padding_mask
    )
    assert out.dtype == q.dtype and out.shape == (q.shape[0], q.shape[1], v.shape[2])
    ref = truth(q, k, v, heads, feature_map, eps, key_padding_mask)
    if q.dtype in LOWP:
        ref_lowp = lowp_linear_attention(q, k, v, heads, feature_map, eps, key_padding_mask)
    else:
        ref_lowp = ref
    assert_close_lowp(out, ref_lowp, ref, floor=default_floor(q.dtype))
    return out


# ---------------------------------------------------------------------------------------------
# Forward.
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("feature_map", ["elu", "relu", "identity"])
# fp16 / bf16 take the tensor-core kernels, which pad d to 48, 64, 80, 128 or 160 (17, 59 and 96
# are padded; 59 and 17 also take the scalar loads); 256, fp32 and fp64 take the generic ones.
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_forward_head_dims(backend, dtype, feature_map, d):
    nq, nk = lengths(backend)
    q, k, v = make_qkv(backend.device, 2, nq, nk, 2, d, d, dtype, seed=d)
    if feature_map == "identity":  # keep the normalizer away from zero
        q, k = q.abs() + 0.1, k.abs() + 0.1
    check_forward(backend, q, k, v, 2, feature_map)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_forward_different_key_and_value_dims(backend, dtype):
    nq, nk = backend.pick((300, 513), (77, 200))
    q, k, v = make_qkv(backend.device, 2, nq, nk, 3, 24, 40, dtype)
    check_forward(backend, q, k, v, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nq,nk", [(1, 1), (5, 17), (4096, 77), (77, 4096)])
def test_forward_query_and_key_lengths(backend, dtype, nq, nk):
    nq, nk = (backend.pick(n, min(n, 400)) for n in (nq, nk))
    q, k, v = make_qkv(backend.device, 2, nq, nk, 4, 64, 64, dtype, seed=nq + nk)
    check_forward(backend, q, k, v, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_strided_qkv_slices(backend, dtype):
    b, heads, d = 2, backend.pick(4, 2), 40
    n = lengths(backend)[1]
    qkv = torch.randn(b, n, 3 * heads * d + 8, device=backend.device).to(dtype)  # padded rows
    c = heads * d
    q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:3 * c]
    assert not q.is_contiguous()
    out = check_forward(backend, q, k, v, heads)
    torch.testing.assert_close(
        out, backend.linear_attention(q.contiguous(), k.contiguous(), v.contiguous(), heads),
        rtol=0, atol=0,
    )
    # A misaligned start (offset of one element) takes the scalar-load path.
    q1, k1, v1 = qkv[..., 1:c + 1], qkv[..., c + 1:2 * c + 1], qkv[..., 2 * c + 1:3 * c + 1]
    check_forward(backend, q1, k1, v1, heads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [40, 59])
def test_forward_key_padding_mask(backend, dtype, d):
    b = 3
    nq, n = backend.pick((600, 1000), lengths(backend))
    q, k, v = make_qkv(backend.device, b, nq, n, 2, d, d, dtype)
    g = torch.Generator(device=backend.device).manual_seed(1)
    mask = torch.rand(b, n, generator=g, device=backend.device) > 0.3
    mask[1] = False  # no key kept: o = 0
    mask[2, n // 2:] = False
    out = check_forward(backend, q, k, v, 2, key_padding_mask=mask)
    assert (out[1] == 0).all()


def test_state_matches_reference_exactly_shaped(backend):
    heads, n = backend.pick((4, 1000), (2, lengths(backend)[1]))
    q, k, v = make_qkv(backend.device, 2, 10, n, heads, 64, 64, torch.bfloat16)
    state, key_mean = backend.linear_attention_state(k, v, heads)
    ref_state, ref_mean = reference.linear_attention_state(k.double(), v.double(), heads)
    assert state.dtype == torch.float32 and state.shape == (2, heads, 64, 64)
    # phi(k) is rounded to bf16 on the tensor cores: relative error <= 2^-9 per product.
    torch.testing.assert_close(state.double(), ref_state, rtol=4e-3, atol=1e-4)
    torch.testing.assert_close(key_mean.double(), ref_mean, rtol=4e-3, atol=1e-4)


@only("cuda")
def test_fp16_large_magnitude_long_sequence(backend):
    # |x| <= 8 at N = 1M: elu(8) + 1 = 9, sums of 1M products stay in the fp32 state.
    q, k, v = make_qkv(backend.device, 1, 1 << 20, 1 << 20, 2, 64, 64, torch.float16, scale=8.0)
    out = backend.linear_attention(q, k, v, 2)
    assert torch.isfinite(out).all()
    ref = truth(q, k, v, 2)
    ref_lowp = lowp_linear_attention(q, k, v, 2)
    assert_close_lowp(out, ref_lowp, ref, floor=default_floor(torch.float16) * 8)


@pytest.mark.parametrize("d", [40, 64])
def test_fp16_state_backward_grad_state_beyond_fp16_range(backend, d):
    # grad_state is a sum over the queries, not a mean: about N / (2 D) per entry for
    # grad_out = 1, beyond fp16's 65,504 at N = 4.2M and D = 40. The tensor-core state backward
    # rounds dS to fp16 halves, so it must rescale it first; dk and dv themselves are in range.
    heads = 2
    _, k, v = make_qkv(backend.device, 2, 1, lengths(backend)[1], heads, d, d, torch.float16, seed=3)
    g = torch.Generator(device=backend.device).manual_seed(4)
    grad_state = 1e5 * (1 + torch.rand(2, heads, d, d, generator=g, device=backend.device))
    grad_key_mean = torch.randn(2, heads, d, generator=g, device=backend.device)
    got = backend.ops.linear_attention_state_backward(
        grad_state, grad_key_mean, k, v, heads, "elu", None
    )
    k64, v64 = (t.double().requires_grad_(True) for t in (k, v))
    state, key_mean = reference.linear_attention_state(k64, v64, heads)
    ((state * grad_state.double()).sum() + (key_mean * grad_key_mean.double()).sum()).backward()
    for name, x, want in (("k", got[0], k64.grad), ("v", got[1], v64.grad)):
        assert torch.isfinite(x).all(), f"grad_{name} is not finite"
        # fp16 phi(k) and output rounding: 2^-11 each.
        torch.testing.assert_close(x.double(), want, rtol=4e-3,
                                   atol=1e-3 * want.abs().max().item())


def test_fp64_is_supported(backend):
    q, k, v = make_qkv(backend.device, 2, 50, 70, 2, 16, 16, torch.float64)
    out = backend.linear_attention(q, k, v, 2)
    torch.testing.assert_close(out, truth(q, k, v, 2), rtol=1e-12, atol=1e-12)


def test_rejects_head_dim_above_256(backend):
    q, k, v = make_qkv(backend.device, 1, 8, 8, 1, 264, 264, torch.float32)
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        backend.linear_attention(q, k, v, 1)


# ---------------------------------------------------------------------------------------------
# Backward.
def grads(fn, q, k, v, grad_out):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out.to(out.dtype))
    return q.grad, k.grad, v.grad


def check_gradients(backend, dtype, dk, dv, masked):
    """grad q, k, v of (B, H) = (2, 2) heads of Dk / Dv against the fp64 reference, within the
    tolerance rule."""
    b, heads = 2, 2
    nq, nk = backend.pick((333, 1000), lengths(backend))
    seed = dk if dk == dv else dk + 1000 * dv  # test_gradients keeps its inputs
    q, k, v = make_qkv(backend.device, b, nq, nk, heads, dk, dv, dtype, seed=seed)
    mask = None
    if masked:
        mask = torch.rand(b, nk, device=backend.device) > 0.4
    g = torch.Generator(device=backend.device).manual_seed(7)
    grad_out = torch.randn(b, nq, heads * dv, generator=g, device=backend.device)

    def ours(q, k, v):
        return backend.linear_attention(q, k, v, heads, key_padding_mask=mask)

    def ref64(q, k, v):
        return reference.linear_attention(q, k, v, heads, key_padding_mask=mask)

    def lowp(q, k, v):
        return lowp_linear_attention(q, k, v, heads, key_padding_mask=mask)

    got = grads(ours, q, k, v, grad_out)
    want = grads(ref64, q.double(), k.double(), v.double(), grad_out.double())
    lowp_grads = grads(lowp, q, k, v, grad_out) if dtype in LOWP else want
    # fp32 has no lower-precision reference: its floor is relative to the gradient's scale, with
    # room for the cancellation in dq = (S do - (o . do) z) / den.
    relative_floor = default_floor(dtype) * (10 if dtype == torch.float32 else 1)
    for name, x, lo, w in zip("qkv", got, lowp_grads, want):
        assert x.dtype == dtype
        floor = relative_floor * w.abs().max().item()
        assert_close_lowp(x, lo, w, floor=floor, name=f"grad_{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("masked", [False, True])
def test_gradients(backend, dtype, d, masked):
    check_gradients(backend, dtype, d, d, masked)


# Dk != Dv always takes the generic kernels, whose backward stages S / dS (Dk x Dv) through shared
# memory in chunks of 8 fp32 (4 fp64) columns and walks the Dk rows in bands of 32: Dv not a
# multiple of the chunk and Dk not a multiple of the band, and the transposed case.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("dk,dv", [(33, 13), (13, 70)])
def test_gradients_different_key_and_value_dims(backend, dtype, dk, dv):
    check_gradients(backend, dtype, dk, dv, masked=True)


@pytest.mark.parametrize("feature_map", ["elu", "relu", "identity"])
def test_gradcheck_fp64(backend, feature_map):
    q, k, v = make_qkv(backend.device, 1, 9, 11, 2, 5, 3, torch.float64)
    q, k = q.abs() + 0.5, k.abs() + 0.5  # away from relu's kink and a zero normalizer
    mask = torch.ones(1, 11, dtype=torch.bool, device=backend.device)
    mask[0, 3] = False
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v))
    # Emulated, the full Jacobian (one launch pair per input element) would take minutes; the fast
    # mode checks random projections of it.
    assert torch.autograd.gradcheck(
        lambda q, k, v: backend.linear_attention(
            q, k, v, 2, feature_map=feature_map, key_padding_mask=mask
        ),
        inputs,
        fast_mode=backend.emulated,
    )


def sample_op_inputs(backend):
    """(op, args) for torch.library.opcheck: every op, fp32 and bf16, masks, odd sizes."""
    samples = []
    ops = backend.ops
    for dtype, d in [(torch.float32, 24), (torch.bfloat16, 40), (torch.bfloat16, 59)]:
        q, k, v = make_qkv(backend.device, 2, 37, 45, 2, d, d, dtype)
        mask = torch.rand(2, 45, device=backend.device) > 0.3
        state, key_mean = ops.linear_attention_state(k, v, 2, "elu", mask)
        grad_out = torch.randn_like(q)
        samples += [
            (ops.linear_attention_state.default, (k, v, 2, "elu", mask)),
            (ops.linear_attention_state.default, (k, v, 2, "relu", None)),
            (ops.linear_attention_state_backward.default,
             (torch.randn_like(state), torch.randn_like(key_mean), k, v, 2, "elu", mask)),
            (ops.linear_attention_apply.default, (q, state, key_mean, 2, "elu", 1e-4)),
            (ops.linear_attention_apply_backward.default,
             (grad_out, q, state, key_mean, 2, "elu", 1e-4)),
        ]
    return samples


@pytest.mark.parametrize("index", range(15))
def test_opcheck(backend, index):
    op, args = sample_op_inputs(backend)[index]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# Emulation only: which kernel each device profile runs, and independence of the schedule.

# Dynamic shared memory of the tensor-core kernels (KiB) at padded head dim 48 / 64 / 80 / 128 /
@pytest.mark.parametrize("dtype", LOWP)
def test_gradients_strided_and_misaligned_slices(backend, dtype):
    """The tensor-core backward kernels read q, k, v and write dq, dk, dv with 16-byte accesses
    when rows allow (slices of padded rows), else element by element (a start one element off):
    both agree with the reference, and the strided slices bitwise with contiguous copies."""
    b, heads, d = 2, 2, 40
    nq, nk = lengths(backend)
    g = torch.Generator(device=backend.device).manual_seed(11)
    c = heads * d
    qkv = torch.rand(b, nk, 3 * c + 8, generator=g, device=backend.device).to(dtype)  # padded rows
    grad_out = torch.randn(b, nk, c, generator=g, device=backend.device)
    mask = torch.rand(b, nk, generator=g, device=backend.device) > 0.4

    def run(q, k, v):
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))  # strides kept
        out = backend.linear_attention(q, k, v, heads, key_padding_mask=mask)
        out.backward(grad_out.to(dtype))
        return q.grad, k.grad, v.grad

    def ref64(q, k, v):
        return reference.linear_attention(q, k, v, heads, key_padding_mask=mask)

    def lowp(q, k, v):
        return lowp_linear_attention(q, k, v, heads, key_padding_mask=mask)

    for offset in (0, 1):
        q, k, v = (qkv[..., offset + i * c:offset + (i + 1) * c] for i in range(3))
        assert not q.is_contiguous()
        got = run(q, k, v)
        want = grads(ref64, q.double(), k.double(), v.double(), grad_out.double())
        lowp_grads = grads(lowp, q, k, v, grad_out)
        for name, x, lo, w in zip("qkv", got, lowp_grads, want):
            floor = default_floor(dtype) * w.abs().max().item()
            assert_close_lowp(x, lo, w, floor=floor, name=f"grad_{name} (offset {offset})")
        if offset == 0:
            for x, y in zip(got, run(q.contiguous(), k.contiguous(), v.contiguous())):
                torch.testing.assert_close(x, y, rtol=0, atol=0)


# 160: apply 44.5 / 53.0 / 69.5 / 103.5 / 148.5, apply backward 76.2 / 80.8 / 103.3 / 129.8 /
# 180.9, state backward 54.9 / 54.5 / 72.1 / 102.6 / 147.8; the state kernel's is static, below
# 48 KiB. An op runs on tensor cores on sm_80+ when its kernel fits the profile's opt-in limit
# (H100 227 KiB, A100 163 KiB, sm86 99 KiB), else (and always on sm75) on the generic kernels.
TC_OPS = ("state", "apply", "apply_backward", "state_backward")
PADDED_DIMS = (48, 64, 80, 128, 160)
TENSOR_CORE_OPS = {
    "H100": {dp: set(TC_OPS) for dp in PADDED_DIMS},
    "A100": {**{dp: set(TC_OPS) for dp in PADDED_DIMS},
             160: {"state", "apply", "state_backward"}},
    "sm86": {48: set(TC_OPS), 64: set(TC_OPS), 80: {"state", "apply", "state_backward"},
             128: {"state"}, 160: {"state"}},
    "sm75": {dp: set() for dp in PADDED_DIMS},
}
# The kernels each op launches, by path (the state's generic kernel is the split-N partials one).
TC_KERNEL = {op: f"linear_attention_{'state_partial' if op == 'state' else op}_tc_kernel"
             for op in TC_OPS}
GENERIC_KERNEL = {"state": "linear_attention_partial_generic_kernel",
                  "apply": "linear_attention_apply_generic_kernel",
                  "apply_backward": "linear_attention_apply_backward_generic_kernel",
                  "state_backward": "linear_attention_state_backward_generic_kernel"}


def run_each_op(ops, q, k, v, heads):
    """{op: kernels it launched} for the four linear attention ops on (q, k, v)."""
    state, key_mean = ops.linear_attention_state(k, v, heads, "elu", None)
    grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype)
    calls = {
        "state": lambda: ops.linear_attention_state(k, v, heads, "elu", None),
        "apply": lambda: ops.linear_attention_apply(q, state, key_mean, heads, "elu", 1e-4),
        "apply_backward": lambda: ops.linear_attention_apply_backward(
            grad_out, q, state, key_mean, heads, "elu", 1e-4),
        "state_backward": lambda: ops.linear_attention_state_backward(
            torch.randn_like(state), torch.randn_like(key_mean), k, v, heads, "elu", None),
    }
    return {op: launched(call) for op, call in calls.items()}


def tensor_core_dim(kernels, op):
    """The padded head dim of op's tensor-core kernel among `kernels`, or None when op ran the
    generic kernel (and no tensor-core one)."""
    dims = [int(m.group(1)) for name in kernels
            for m in [re.search(TC_KERNEL[op] + r"<[^>]*?(\d+)>", name)] if m]
    generic = [name for name in kernels if GENERIC_KERNEL[op] + "<" in name]
    assert len(dims) + bool(generic) == 1, f"{op}: expected one path, launched {kernels}"
    return dims[0] if dims else None


@only("emu")
@pytest.mark.parametrize("profile", list(TENSOR_CORE_OPS))
@pytest.mark.parametrize("d", [40, 64, 80, 96, 160])
def test_path_per_device_profile(backend, profile, d):
    dp = next(p for p in PADDED_DIMS if d <= p)
    q, k, v = make_qkv(backend.device, 1, 33, 33, 1, d, d, torch.bfloat16)
    with backend.settings(device=profile):
        kernels = run_each_op(backend.ops, q, k, v, 1)
    for op, names in kernels.items():
        want = dp if op in TENSOR_CORE_OPS[profile][dp] else None
        assert tensor_core_dim(names, op) == want, f"{profile}, d = {d}, {op}: {names}"


@only("emu")
@pytest.mark.parametrize("dtype,dk,dv,dp", [
    (torch.float16, 17, 17, 48),     # fp16 takes the tensor cores too, padded
    (torch.bfloat16, 256, 256, None),  # wider than the tensor-core kernels
    (torch.bfloat16, 24, 40, None),    # Dk != Dv
    (torch.float32, 64, 64, None),
    (torch.float64, 64, 64, None),
])
def test_path_per_dtype_and_head_dims(backend, dtype, dk, dv, dp):
    q, k, v = make_qkv(backend.device, 1, 20, 20, 1, dk, dv, dtype)
    for op, names in run_each_op(backend.ops, q, k, v, 1).items():
        assert tensor_core_dim(names, op) == dp, f"{op}: {names}"


# The generic apply backward sums dS and dz of its split itself (one pass over q and grad_out)
# when its dynamic shared memory with the accumulators, 4 * (16 * (2 Dk + Dv) + 8 Dk + 32 +
# Dk * (Dv padded to 16 mod 32) + Dk) bytes for fp32, fits the profile's opt-in limit: 149 KiB at
# 160 x 160 (H100 and A100 yes, sm86 no), 338 KiB at 256 x 256 (none). Otherwise it writes the
# per-token row weights and the partial kernel reads q and grad_out again.
@only("emu")
@pytest.mark.parametrize("profile,dtype,dk,dv,fused", [
    ("H100", torch.float32, 40, 40, True),
    ("H100", torch.float32, 160, 160, True),
    ("A100", torch.float32, 160, 160, True),
    ("sm86", torch.float32, 160, 160, False),
    ("H100", torch.float32, 256, 256, False),
    ("H100", torch.float32, 24, 72, True),
    ("H100", torch.float64, 59, 17, True),
])
def test_generic_apply_backward_fuses_the_reduction_where_it_fits(backend, profile, dtype, dk, dv,
                                                                 fused):
    heads, nq = 2, 77  # not a multiple of the 16-token tile
    q, k, v = make_qkv(backend.device, 2, nq, 45, heads, dk, dv, dtype, seed=dk)
    state, key_mean = reference.linear_attention_state(k, v, heads)
    g = torch.Generator(device=backend.device).manual_seed(3)
    grad_out = torch.randn(2, nq, heads * dv, generator=g, device=backend.device).to(dtype)
    got = []
    # One SM: each block loops over several token tiles; the default: several splits per head.
    for sms in (1, None):
        with backend.settings(device=profile, multiprocessor_count=sms):
            names = launched(lambda: got.append(backend.ops.linear_attention_apply_backward(
                grad_out, q, state, key_mean, heads, "elu", 1e-4)))
        bwd = [n for n in names if GENERIC_KERNEL["apply_backward"] + "<" in n]
        assert len(bwd) == 1 and bwd[0].endswith(", true>" if fused else ", false>"), names
        assert any("partial_generic_kernel" in n for n in names) == (not fused), names
    q64, s64, m64 = (t.double().requires_grad_(True) for t in (q, state, key_mean))
    out = reference.linear_attention_apply(q64, s64, m64, heads)
    want = torch.autograd.grad(out, (q64, s64, m64), grad_out.double())
    for grad_q, grad_state, grad_key_mean in got:
        for name, x, w in zip(("grad_q", "grad_state", "grad_key_mean"),
                              (grad_q, grad_state, grad_key_mean), want):
            assert x.shape == w.shape, name
            floor = 10 * default_floor(dtype) * w.abs().max().item()
            assert_close_lowp(x, w, w, floor=floor, name=name)


@only("emu-2sm")
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 64), (torch.float16, 96), (torch.float16, 40),
                                     (torch.float32, 40), (torch.float64, 17)])
def test_schedules_give_bitwise_equal_results(backend, dtype, d):
    """Forward and backward, masked, under forward, reverse and shuffled thread and block orders:
    a missing barrier or a race on shared memory would change the bits."""
    nq, nk = lengths(backend)
    q, k, v = make_qkv(backend.device, 2, nq, nk, 2, d, d, dtype, seed=d)
    mask = torch.rand(2, nk, generator=torch.Generator().manual_seed(5)) > 0.3
    grad_out = torch.randn(2, nq, 2 * d, generator=torch.Generator().manual_seed(6))

    def run():
        out = backend.linear_attention(q, k, v, 2, key_padding_mask=mask)
        return (out, *grads(
            lambda q, k, v: backend.linear_attention(q, k, v, 2, key_padding_mask=mask),
            q, k, v, grad_out))

    assert_schedule_independent(backend, run)


# ---------------------------------------------------------------------------------------------
# Determinism, graphs, compile (GPU only: the emulator runs one thread at a time; its schedule
# tests below are the determinism check there).
@only("cuda")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(backend, dtype):
    q, k, v = make_qkv(backend.device, 2, 20000, 30000, 4, 64, 64, dtype)
    grad_out = torch.randn_like(q)
    first = grads(lambda q, k, v: backend.linear_attention(q, k, v, 4), q, k, v, grad_out)
    out1 = backend.linear_attention(q, k, v, 4)
    second = grads(lambda q, k, v: backend.linear_attention(q, k, v, 4), q, k, v, grad_out)
    out2 = backend.linear_attention(q, k, v, 4)
    assert torch.equal(out1, out2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@only("cuda")
def test_cuda_graph_capture_and_replay(backend):
    q, k, v = make_qkv(backend.device, 2, 4096, 4096, 8, 40, 40, torch.bfloat16)
    static = [t.clone() for t in (q, k, v)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        backend.linear_attention(*static, 8)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = backend.linear_attention(*static, 8)
    for seed in (1, 2):
        new = make_qkv(backend.device, 2, 4096, 4096, 8, 40, 40, torch.bfloat16, seed=seed)
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, backend.linear_attention(*new, 8))


@only("cuda")
def test_torch_compile_reduce_overhead(backend):
    q, k, v = make_qkv(backend.device, 2, 1024, 1024, 4, 64, 64, torch.bfloat16)

    def block(q, k, v):
        return backend.linear_attention(q * 2, k, v, 4) + 1

    compiled = torch.compile(block, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # record, then replay the graph
        out = compiled(q, k, v)
    torch.testing.assert_close(out, block(q, k, v))


# ---------------------------------------------------------------------------------------------
# More than 2^31 elements: 64-bit offsets and grids within CUDA's limits.
@pytest.mark.slow
@only("cuda")
def test_more_than_2_pow_31_elements(backend):
    b, n, heads, d = 1, 4_200_000, 10, 64
    assert b * n * heads * d > 2**31
    q, k, v = make_qkv(backend.device, b, n, n, heads, d, d, torch.bfloat16)
    state, key_mean = backend.linear_attention_state(k, v, heads)
    # fp32 reference state, accumulated in chunks of tokens.
    ref_state = torch.zeros_like(state, dtype=torch.float64)
    ref_mean = torch.zeros_like(key_mean, dtype=torch.float64)
    for start in range(0, n, 1 << 18):
        chunk_state, chunk_mean = reference.linear_attention_state(
            k[:, start:start + (1 << 18)].float(), v[:, start:start + (1 << 18)].float(), heads
        )
        weight = min(1 << 18, n - start) / n
        ref_state += chunk_state.double() * weight
        ref_mean += chunk_mean.double() * weight
    torch.testing.assert_close(state.double(), ref_state, rtol=4e-3, atol=1e-5)
    torch.testing.assert_close(key_mean.double(), ref_mean, rtol=4e-3, atol=1e-5)

    out = backend.linear_attention_apply(q, state, key_mean, heads)
    tail = slice(n - 4096, n)  # rows past 2^31 elements
    ref_tail = reference.linear_attention_apply(q[:, tail].double(), state.double(),
                                                key_mean.double(), heads)
    torch.testing.assert_close(out[:, tail].double(), ref_tail, rtol=2e-2,
                               atol=1e-2 * ref_tail.abs().max().item())

    # Backward ops on the tail rows: dq depends on row i only; dk, dv on row j, dS, dz and n.
    grad_out = torch.randn_like(q)
    grad_q, _, _ = backend.ops.linear_attention_apply_backward(
        grad_out, q, state, key_mean, heads, "elu", 1e-4
    )
    q_tail = q[:, tail].double().requires_grad_(True)
    reference.linear_attention_apply(q_tail, state.double(), key_mean.double(), heads).backward(
        grad_out[:, tail].double()
    )
    torch.testing.assert_close(grad_q[:, tail].double(), q_tail.grad, rtol=5e-2,
                               atol=1e-2 * q_tail.grad.abs().max().item())

    grad_state, grad_mean = torch.randn_like(state), torch.randn_like(key_mean)
    grad_k, grad_v = backend.ops.linear_attention_state_backward(
        grad_state, grad_mean, k, v, heads, "elu", None
    )
    k_tail = k[:, tail].double().requires_grad_(True)
    v_tail = v[:, tail].double().requires_grad_(True)
    tail_state, tail_mean = reference.linear_attention_state(k_tail, v_tail, heads)
    # The tail's own state divides by 4096 keys; the full one by n.
    ((tail_state * grad_state.double()).sum() + (tail_mean * grad_mean.double()).sum()).backward()
    ratio = 4096 / n
    for got, want in ((grad_k, k_tail.grad * ratio), (grad_v, v_tail.grad * ratio)):
        torch.testing.assert_close(got[:, tail].double(), want, rtol=2e-2,
                                   atol=1e-2 * want.abs().max().item())
