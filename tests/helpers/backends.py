"""Where the tests run: device parametrisation of the op tests and the CUDA kernels' two backends
(a real GPU and the emulation build), with the helpers of the CUDA kernel tests."""

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
