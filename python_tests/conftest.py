"""Shared test helpers: device parametrisation, the CUDA kernels' two backends (a real GPU and
the emulation build) and the tolerance rule of DESIGN.md."""

import contextlib
import os

import pytest
import torch

import linfusion_ops
from linfusion_ops import emulated

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


# ---------------------------------------------------------------------------------------------
# Backends of the CUDA kernel tests (test_*_cuda.py): `cuda` runs torch.ops.linfusion_ops on CUDA
# tensors (skips without a GPU); `emu` runs the same kernel sources in the emulation build
# (linfusion_ops._C_emu, CPU tensors) on an emulated H100 with 132 SMs, `emu-<n>sm` on one with
# n SMs, so that grid-stride loops and token splits iterate at emulation sizes. The emu backends
# skip when _C_emu is not built, unless LINFUSION_OPS_REQUIRE_EMU is set ("1": the fast flavour,
# "checked": both flavours), as in CI, where a missing build then fails every emu test.
REQUIRE_EMU = os.environ.get("LINFUSION_OPS_REQUIRE_EMU", "")
BACKENDS = ["cuda", "emu"]


def skip_or_fail_without_emu(flavour="fast"):
    """Skips the calling test when the emulation flavour is not built (fails it when CI requires
    the flavour)."""
    if emulated.available(flavour):
        return
    reason = f"needs the emulation build ({flavour} flavour): LINFUSION_OPS_CUDA_EMU=" + (
        "1" if flavour == "fast" else "checked") + " python setup.py build_ext --inplace"
    required = REQUIRE_EMU == "checked" or (REQUIRE_EMU != "" and flavour == "fast")
    if required:
        pytest.fail(f"LINFUSION_OPS_REQUIRE_EMU={REQUIRE_EMU}: {reason}")
    pytest.skip(reason)


class Backend:
    """Where a CUDA test runs its kernels. `device` holds the tensors, `ops` is the op namespace
    (for direct op calls and opcheck), and the public functions (`linear_attention`, ...,
    `merge_segments`) are those of linfusion_ops or linfusion_ops.emulated."""

    def __init__(self, name):
        self.name = name
        self.emulated = name.startswith("emu")
        self.device = "cpu" if self.emulated else "cuda"
        self.multiprocessor_count = int(name[4:-2]) if name.startswith("emu-") else None
        self._functions = emulated if self.emulated else linfusion_ops

    @property
    def ops(self):
        return emulated.ops("fast") if self.emulated else torch.ops.linfusion_ops

    def pick(self, gpu, emu):
        """gpu on a real GPU, emu (an emulation-sized value) under emulation."""
        return emu if self.emulated else gpu

    def __getattr__(self, name):
        return getattr(self._functions, name)

    def settings(self, **knobs):
        """The emulator's settings for a block of code (see linfusion_ops.emulated.settings);
        nothing on a real GPU."""
        return emulated.settings(**knobs) if self.emulated else contextlib.nullcontext()

    def __repr__(self):
        return self.name


def pytest_generate_tests(metafunc):
    """Runs every test that takes `backend` on BACKENDS (or the test module's BACKENDS), unless
    the test parametrises `backend` itself."""
    if "backend" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if "backend" in (names.split(",") if isinstance(names, str) else names):
            return
    metafunc.parametrize("backend", getattr(metafunc.module, "BACKENDS", BACKENDS), indirect=True)


@pytest.fixture
def backend(request):
    """A Backend; for emu, the emulator is reset to the H100 profile (with the backend's SM
    count), the forward schedule and the fast flavour for the test, and its launch log cleared."""
    b = Backend(request.param)
    if not b.emulated:
        if not (HAS_CUDA and HAS_CUDA_KERNELS):
            pytest.skip("needs a GPU and the CUDA kernels")
        yield b
        return
    skip_or_fail_without_emu()
    with emulated.settings(device="H100", multiprocessor_count=b.multiprocessor_count,
                           schedule="forward", seed=0, flavour="fast"):
        emulated.clear_launch_log()
        yield b


def only(*names):
    """Runs a CUDA test on these backends only (e.g. only("cuda") for CUDA graphs)."""
    return pytest.mark.parametrize("backend", list(names), indirect=True)


def launched(fn):
    """Runs fn under emulation and returns the kernels it launched (demangled names with their
    template arguments), so a test can assert which path ran."""
    emulated.clear_launch_log()
    fn()
    return emulated.launch_log()


# Thread and block orders of the emulator: a missing barrier or a race on shared memory makes a
# kernel's result depend on them.
SCHEDULES = [("forward", 0), ("reverse", 0), ("shuffle", 1), ("shuffle", 2)]


def assert_schedule_independent(backend, run):
    """Calls run() (returning a sequence of tensors) under every schedule and asserts that every
    result is bitwise equal to the forward schedule's."""
    results = []
    for schedule, seed in SCHEDULES:
        with backend.settings(schedule=schedule, seed=seed):
            results.append([t.detach().clone() for t in run()])
    for (schedule, seed), result in zip(SCHEDULES[1:], results[1:]):
        for i, (a, b) in enumerate(zip(results[0], result)):
            assert torch.equal(a, b), f"result {i} differs under schedule {schedule} (seed {seed})"
