"""The CUDA emulator's checks (csrc/emu/, linfusion_ops.emulated).

Deliberately broken kernels compiled into the emulation modules (linfusion_ops.emulated
.run_selftest) prove that each check fires: a RuntimeError naming the check, the kernel, its
source file and line, the block and the thread, after which the emulator keeps working. A kernel
with a missing barrier gives different results under different schedules, which is what the
schedule tests of test_*_cuda.py rely on. Finally every real kernel (each op forward and
backward, each path) runs under the checked flavour, whose shared-memory race detector and
alignment checks must report nothing, with results bitwise equal to the fast flavour's.
"""

import re

import pytest
import torch

from linfusion_ops import emulated, reference

from tests.helpers.backends import skip_or_fail_without_emu

# The check each broken kernel trips, as the error names it, and the kernel it names.
FAST_CHECKS = {
    "barrier_divergent_sites": ("barrier reached at different sites", "barrier_divergent_sites_kernel"),
    "barrier_after_return": ("barrier after some threads of the block returned",
                             "barrier_after_return_kernel"),
    "deadlock": ("deadlock", "deadlock_kernel"),
    "shuffle_missing_lanes": ("shuffle with lanes missing", "shuffle_missing_lanes_kernel"),
    "ballot_missing_lanes": ("ballot with lanes missing", "ballot_missing_lanes_kernel"),
    "wmma_missing_lanes": ("wmma with lanes missing", "wmma_load_kernel<0, 32, 31>"),
    "wmma_misaligned_pointer": ("wmma misaligned pointer", "wmma_load_kernel<8, 32, 32>"),
    "wmma_bad_ldm": ("wmma bad ldm", "wmma_load_kernel<0, 20, 32>"),
    "too_many_threads": ("too many threads per block", "plain_kernel"),
    "dynamic_smem_no_optin": ("dynamic shared memory above 48 KB without opt-in",
                              "dynamic_smem_kernel"),
    "dynamic_smem_over_optin": ("dynamic shared memory above the opt-in limit",
                                "dynamic_smem_kernel"),
    "device_assert": ("device assert", "device_assert_kernel"),
}
CHECKED_ONLY_CHECKS = {
    "race_write_write": ("shared-memory race (write-write)", "race_write_write_kernel"),
    "race_read_write": ("shared-memory race (read-write)", "race_read_write_kernel"),
    "race_write_read": ("shared-memory race (write-read)", "race_write_read_kernel"),
    "uninitialized_smem_read": ("read of uninitialized shared memory",
                                "uninitialized_smem_read_kernel"),
    "misaligned_access": ("misaligned access", "misaligned_access_kernel"),
}
CASES = [(name, "fast") for name in FAST_CHECKS] + [
    (name, "checked") for name in {**FAST_CHECKS, **CHECKED_ONLY_CHECKS}]


@pytest.fixture(params=["fast", "checked"])
def flavour(request):
    """An emulation flavour, with the emulator reset to its defaults."""
    skip_or_fail_without_emu(request.param)
    with emulated.settings(device="H100", schedule="forward", seed=0, flavour=request.param):
        yield request.param


def test_every_check_has_a_selftest():
    skip_or_fail_without_emu("fast")
    assert set(emulated.selftest_names("fast")) == {"ok", "schedule_dependent", *FAST_CHECKS}
    if emulated.available("checked"):
        checks = {n for n in emulated.selftest_names("checked") if not n.startswith("profile_")}
        assert checks == {"ok", "schedule_dependent", *FAST_CHECKS, *CHECKED_ONLY_CHECKS}


def test_control_passes(flavour):
    emulated.run_selftest("ok", flavour)


@pytest.mark.parametrize("name,flavour_name", CASES)
def test_broken_kernel_raises_naming_check_kernel_site_block_and_thread(name, flavour_name):
    skip_or_fail_without_emu(flavour_name)
    check, kernel = {**FAST_CHECKS, **CHECKED_ONLY_CHECKS}[name]
    with emulated.settings(device="H100", schedule="forward", seed=0, flavour=flavour_name):
        with pytest.raises(RuntimeError) as info:
            emulated.run_selftest(name, flavour_name)
        message = str(info.value)
        assert check in message, f"{name}: expected {check!r} in: {message}"
        assert f"::{kernel} at " in message, f"{name}: kernel {kernel} not named in: {message}"
        assert re.search(r"selftest\.cpp:\d+", message), f"{name}: no source line in: {message}"
        assert re.search(r"block \(?\d", message) and re.search(r"thread \(?\d", message), message
        # The emulator is usable again: the control and a real kernel run.
        emulated.run_selftest("ok", flavour_name)
        x = torch.randn(6, 40)
        weight, bias = torch.ones(40), torch.zeros(40)
        torch.testing.assert_close(emulated.layer_norm_leaky_relu(x, weight, bias),
                                   reference.layer_norm_leaky_relu(x, weight, bias))


def test_checked_only_selftests_refuse_the_fast_flavour():
    skip_or_fail_without_emu("fast")
    for name in CHECKED_ONLY_CHECKS:
        with pytest.raises(RuntimeError, match="checked flavour"):
            emulated.run_selftest(name, "fast")


def test_device_assert_names_the_failing_thread_and_message():
    skip_or_fail_without_emu("fast")
    with pytest.raises(RuntimeError, match=r"thread \(5, 0, 0\): .*thread 5 must not get here"):
        emulated.run_selftest("device_assert")


def test_missing_barrier_gives_schedule_dependent_results():
    """The schedule check's premise: without the barrier, forward and reverse thread orders see
    different neighbours' values; each order on its own is reproducible."""
    skip_or_fail_without_emu("fast")
    results = {}
    for schedule in ("forward", "reverse", "forward"):
        with emulated.settings(schedule=schedule, flavour="fast"):
            result = emulated.run_selftest("schedule_dependent", "fast")
        if schedule in results:
            assert torch.equal(result, results[schedule]), f"{schedule} is not reproducible"
        results[schedule] = result
    assert not torch.equal(results["forward"], results["reverse"])


def test_checked_flavour_reports_the_missing_barrier():
    """The same kernel under the checked flavour: the race detector names the missing barrier
    whatever the schedule."""
    skip_or_fail_without_emu("checked")
    for schedule in ("forward", "reverse"):
        with emulated.settings(schedule=schedule, flavour="checked"):
            with pytest.raises(RuntimeError, match=r"shared-memory race \(write-read\)|read of "
                               r"uninitialized shared memory") as info:
                emulated.run_selftest("schedule_dependent", "checked")
        assert "schedule_dependent_kernel" in str(info.value)


def test_settings_are_restored():
    skip_or_fail_without_emu("fast")
    before = emulated.current_settings()
    with emulated.settings(device="sm75", multiprocessor_count=3, schedule="shuffle", seed=7):
        inside = emulated.current_settings()
        assert (inside["device"], inside["multiprocessor_count"], inside["schedule"], inside["seed"]) == (
            "sm75", 3, "shuffle", 7)
    assert emulated.current_settings() == before


# ---------------------------------------------------------------------------------------------
# Every real kernel under the checked flavour: no race, no uninitialised shared-memory read, no
# misaligned access; the same bits as the fast flavour.

def _linear_attention_case(dtype, d, nq=33, nk=70, masked=True):
    gen = torch.Generator().manual_seed(d)
    q, k, v = (torch.rand(1, n, 2 * d, generator=gen).to(dtype) for n in (nq, nk, nk))
    mask = torch.rand(1, nk, generator=gen) > 0.3 if masked else None
    grad_out = torch.randn(1, nq, 2 * d, generator=gen)

    def run():
        q_, k_, v_ = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = emulated.linear_attention(q_, k_, v_, 2, key_padding_mask=mask)
        out.backward(grad_out.to(dtype))
        return out, q_.grad, k_.grad, v_.grad

    return run


def _layer_norm_case(shape, dtype, offset=0):
    gen = torch.Generator().manual_seed(shape[-1])
    flat = torch.randn(shape[0] * shape[1] + offset, generator=gen).to(dtype)
    x = flat[offset:].view(shape)  # offset 1: rows off the 16-byte grid, the generic path
    weight = (1 + 0.5 * torch.randn(shape[1], generator=gen)).to(dtype)
    bias = (0.3 * torch.randn(shape[1], generator=gen)).to(dtype)
    grad_out = torch.randn(shape, generator=gen).to(dtype)

    def run():
        x_, w_, b_ = (t.clone().requires_grad_(True) for t in (x, weight, bias))
        out = emulated.layer_norm_leaky_relu(x_, w_, b_)
        out.backward(grad_out)
        return out, x_.grad, w_.grad, b_.grad

    return run


def _merge_case(segments, channels, dtype, pad_per_slot):
    gen = torch.Generator().manual_seed(segments)
    prompts, tokens = 3, 40
    embeds = torch.randn(segments, 5, channels, generator=gen).to(dtype)
    keep = torch.rand(segments, 5, generator=gen) < 0.7
    ids = torch.randint(0, prompts, (segments,), generator=gen)
    pad = torch.randn((tokens, channels) if pad_per_slot else (channels,), generator=gen).to(dtype)
    grad = torch.randn(prompts, tokens, channels, generator=gen).to(dtype)

    def run():
        e_, p_ = embeds.clone().requires_grad_(True), pad.clone().requires_grad_(True)
        merged, lengths = emulated.merge_segments(e_, keep, ids, prompts, tokens, p_)
        merged.backward(grad)
        return merged, lengths, e_.grad, p_.grad

    return run


REAL_KERNEL_CASES = {
    # Linear attention: the four tensor-core kernels at every padded head dim (DP = 48 with vector
    # and with scalar loads), and the generic ones (split-N partials with mask and scratch
    # weights, the per-token kernels, the partials reduction) in fp32 up to D = 256 and fp64;
    # the apply backward with its dS / dz sums in shared memory (d24, d160: 3 x 3 tiles of the
    # accumulator, fp64) and without (d256: they do not fit).
    "linear_attention_tc_bf16_d40": _linear_attention_case(torch.bfloat16, 40),
    "linear_attention_tc_fp16_d17": _linear_attention_case(torch.float16, 17),
    "linear_attention_tc_bf16_d64": _linear_attention_case(torch.bfloat16, 64),
    "linear_attention_tc_fp16_d80": _linear_attention_case(torch.float16, 80),
    "linear_attention_tc_bf16_d128": _linear_attention_case(torch.bfloat16, 128, nq=20, nk=40),
    "linear_attention_tc_bf16_d160": _linear_attention_case(torch.bfloat16, 160, nq=20, nk=40),
    "linear_attention_generic_fp32_d24": _linear_attention_case(torch.float32, 24),
    "linear_attention_generic_fp32_d160": _linear_attention_case(torch.float32, 160, nq=20, nk=40),
    "linear_attention_generic_fp32_d256": _linear_attention_case(torch.float32, 256, nq=20, nk=40),
    "linear_attention_generic_fp64_d72": _linear_attention_case(torch.float64, 72, nq=20, nk=40,
                                                                 masked=False),
    # LayerNorm: register path with every row-group width (4 to 32: shuffles only; 64 and 128:
    # a shared-memory reduction), the generic path (misaligned, fp64), and the column sums.
    "layer_norm_register_fp32_c40": _layer_norm_case((37, 40), torch.float32),
    "layer_norm_register_fp16_c80": _layer_norm_case((11, 80), torch.float16),
    "layer_norm_register_fp32_c200": _layer_norm_case((7, 200), torch.float32),
    "layer_norm_register_bf16_c320": _layer_norm_case((5, 320), torch.bfloat16),
    "layer_norm_register_fp32_c768": _layer_norm_case((3, 768), torch.float32),
    "layer_norm_register_bf16_c1280": _layer_norm_case((9, 1280), torch.bfloat16),
    "layer_norm_generic_bf16_misaligned": _layer_norm_case((21, 80), torch.bfloat16, offset=1),
    "layer_norm_generic_fp64": _layer_norm_case((13, 33), torch.float64),
    # merge_segments: plan (more than 1024 segments), 16-, 8-, 4- and 2-byte copies, both pads.
    "merge_uint4_pad_row": _merge_case(1100, 8, torch.float32, False),
    "merge_uint64_pad_row": _merge_case(20, 1, torch.float64, False),
    "merge_uint32_pad_per_slot": _merge_case(20, 33, torch.float32, True),
    "merge_uint16_pad_per_slot": _merge_case(30, 33, torch.bfloat16, True),
}


@pytest.mark.parametrize("case", list(REAL_KERNEL_CASES))
def test_checked_flavour_finds_nothing_in_the_real_kernels(case):
    skip_or_fail_without_emu("checked")
    run = REAL_KERNEL_CASES[case]
    results = {}
    for flavour_name in ("fast", "checked"):
        with emulated.settings(device="H100", multiprocessor_count=2, schedule="forward", seed=0,
                               flavour=flavour_name):
            emulated.clear_launch_log()
            results[flavour_name] = [t.detach() for t in run()]
            if flavour_name == "checked":
                assert emulated.launch_log(), "no kernel ran"
    for i, (a, b) in enumerate(zip(results["fast"], results["checked"])):
        assert torch.equal(a, b), f"{case}: result {i} differs between the flavours"

