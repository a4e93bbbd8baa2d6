"""Launchers that size their grid by how many blocks of a kernel one SM holds.

The tensor-core kernels fill exactly one wave: as many token ranges as put every block an SM can
hold on every SM (the occupancy query; on a GPU, the compiler's registers decide it), and no more
(on an H200 at a fixed 4 blocks per SM they ran latency-bound with a quarter of the warp slots
filled). The emulator's occupancy query counts threads and shared memory only, unless
`emulated.settings(registers_per_thread=...)` says how many registers every kernel uses; these
tests set it and check the grids against the launcher's rule and its Python mirror in
benchmarks/emu_profile.py (split_count), and that the results do not change beyond rounding.
"""

import pytest
import torch

from benchmarks import emu_profile
from linfusion_ops import emulated, reference
from tests.helpers.backends import skip_or_fail_without_emu
from tests.helpers.tolerances import assert_close_lowp

D, N, SMS = 64, 1024, 2  # B * H = 1: 16 tiles of 64 tokens, so the split is not capped by N


@pytest.fixture(autouse=True)
def checked():
    skip_or_fail_without_emu("checked")


def run(registers_per_thread):
    """Forward and backward of fp16 linear attention (B = H = 1) on a 2-SM H100 profile; returns
    the grids of the four tensor-core kernels and (out, grad q, grad k, grad v)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.rand(1, N, D, generator=g).to(torch.float16).requires_grad_() for _ in range(3))
    grad_out = torch.randn(1, N, D, generator=g).to(torch.float16)
    with emulated.settings(device="H100", multiprocessor_count=SMS, flavour="checked",
                           registers_per_thread=registers_per_thread):
        with emulated.profile() as launches:
            out = emulated.linear_attention(q, k, v, 1)
            out.backward(grad_out)
    grids = {}
    for name in KERNELS:
        found = [r["grid"][0] for r in launches if name + "<" in r["kernel"]]
        assert len(found) == 1, [r["kernel"] for r in launches]
        grids[name] = found[0]
    return grids, (out.detach(), q.grad, k.grad, v.grad), (q, k, v, grad_out)


# kernel: (threads per block, dynamic shared memory at DP = 64, minimum 64-token tiles per range);
# B * H = 1 block per range. Shared memory (TcApplyShape etc. in linear_attention_kernels.cuh):
# apply 2 x 11264 (state hi / lo) + 9216 (token tile) + 22528 (fp32 products); apply backward
# 2 x 11264 + 2 x 9216 + 22528 + 18432 + 768; state backward 2 x 9216 + 2 x 9216 + 18432 + 516.
# The state partial kernel's is static, which the emulator's occupancy does not count.
KERNELS = {"state_partial_tc_kernel": (256, 0, 1), "apply_tc_kernel": (128, 55272, 2),
           "apply_backward_tc_kernel": (256, 82688, 2), "state_backward_tc_kernel": (128, 55812, 2)}
SMEM_PER_SM = 228 * 1024  # the emulated H100: 227 KiB per block + 1 KiB


def resident_blocks(threads, smem, registers):
    """The emulated H100's blocks per SM: 2048 threads, 228 KiB of shared memory, and (when
    registers is set) 64K registers allocated per warp in units of 256."""
    blocks = 2048 // threads
    if smem:
        blocks = min(blocks, SMEM_PER_SM // smem)
    if registers is not None:
        per_warp = -(-registers * 32 // 256) * 256
        blocks = min(blocks, 65536 // (per_warp * (threads // 32)))
    return blocks


@pytest.mark.parametrize("registers,want", [
    (None, {"state_partial_tc_kernel": 16, "apply_tc_kernel": 8, "apply_backward_tc_kernel": 4,
            "state_backward_tc_kernel": 8}),
    (128, {"state_partial_tc_kernel": 4, "apply_tc_kernel": 8, "apply_backward_tc_kernel": 4,
           "state_backward_tc_kernel": 8}),
    (255, {"state_partial_tc_kernel": 2, "apply_tc_kernel": 4, "apply_backward_tc_kernel": 2,
           "state_backward_tc_kernel": 4}),
])
def test_tensor_core_kernels_fill_one_wave_at_their_residency(registers, want):
    """None: 8 state-partial blocks per SM (threads), so 16 ranges on 2 SMs; 2 apply-backward
    blocks (shared memory), so 4; apply and state backward hold 4 and are capped at 8 ranges by
    their 2-tile minimum over 16 tiles. 128 registers: 2 blocks of 256 threads, 4 of 128; 255: 1
    and 2."""
    grids, _, _ = run(registers)
    mirror = {name: emu_profile.split_count(N, 1, 64, SMS, min_tiles, resident_blocks(threads, smem, registers))
              for name, (threads, smem, min_tiles) in KERNELS.items()}
    assert grids == mirror == want


def test_fewer_splits_give_the_same_results():
    _, few, _ = run(255)
    _, many, (q, k, v, grad_out) = run(None)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = reference.linear_attention(q64, k64, v64, 1)
    want = (out64.detach(), *torch.autograd.grad(out64, (q64, k64, v64), grad_out.double()))
    for name, a, b, w in zip(("out", "grad_q", "grad_k", "grad_v"), few, many, want):
        floor = 4e-3 * w.abs().max().item()  # fp16 outputs: a few units in the last place
        assert_close_lowp(a, w, w, floor=floor, name=name + " (1 wave)")
        assert_close_lowp(b, w, w, floor=floor, name=name + " (residency by threads only)")


def test_registers_per_thread_is_checked_and_restored():
    before = emulated.current_settings()
    with emulated.settings(registers_per_thread=200) as inside:
        assert inside["registers_per_thread"] == 200
        with emulated.settings(device="A100"):
            assert emulated.current_settings()["registers_per_thread"] == 200
    assert emulated.current_settings() == before
    for bad in (0, 256):
        with pytest.raises(ValueError, match="registers_per_thread"):
            emulated.set_device("H100", registers_per_thread=bad)
