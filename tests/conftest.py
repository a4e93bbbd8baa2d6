"""pytest hooks and fixtures of the whole suite: the `backend` fixture of the CUDA kernel tests
(the helpers themselves live in tests/helpers/backends.py) and the skip summary at the end of
the run (tests/helpers/skips.py)."""

import pytest

from linfusion_ops import emulated
from tests.helpers.backends import BACKENDS, HAS_CUDA, HAS_CUDA_KERNELS, Backend, skip_or_fail_without_emu
from tests.helpers.skips import summary_lines


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


def pytest_terminal_summary(terminalreporter):
    """How many tests skipped for each reason, in a few lines (not one line per test)."""
    lines = summary_lines(terminalreporter.stats.get("skipped", []))
    if lines:
        terminalreporter.write_sep("-", "skipped tests, by reason")
        for line in lines:
            terminalreporter.write_line(line)
