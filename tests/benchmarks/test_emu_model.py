"""benchmarks/emu_profile.py and bench_emu_profile.py: the grid of a grid-stride launch in the
roofline model. The row-wise kernels (LayerNorm, merge) launch at most the blocks that are
resident at once (cuda_rowwise::grid_stride_blocks), so their predicted waves must not grow with
the extrapolated work."""

import math

from benchmarks import bench_emu_profile as bench
from benchmarks import emu_profile as ep


def test_grid_stride_blocks_stop_at_the_resident_blocks():
    # 256 threads at 58 registers: 2,048 registers per warp, 4 blocks of 8 warps per H100 SM.
    assert ep.occupancy("H100", 256, 58, 0)["blocks_per_sm"] == 4
    assert ep.grid_stride_blocks("H100", 10_000, 256, 58, 0) == 4 * 132
    assert ep.grid_stride_blocks("H100", 100, 256, 58, 0) == 100
    assert ep.grid_stride_blocks("A100", 10_000, 256, 58, 0) == 4 * 108


def _fitted(blocks_per_n, dram_per_n):
    coef = {key: [0.0, 0.0, 0.0] for key in bench.COUNTERS}
    coef["blocks"] = [blocks_per_n, 0.0, 0.0]
    coef["dram_bytes"] = [dram_per_n, 0.0, 0.0]
    return [{"kernel": "copy_kernel", "coef": coef, "threads": 256, "smem": 0}]


def test_predict_caps_grid_stride_launches_at_one_wave():
    usage = {"copy_kernel": {"registers": 58}}
    n = 1000  # 10,000 blocks of work, 16 MB
    fitted = _fitted(10.0, 16e3)
    plain = bench.predict(fitted, n, 1.0, lambda k, nn, _resident: None, 64, "H100", usage)[0]
    capped = bench.predict(fitted, n, 1.0, lambda k, nn, _resident: None, 64, "H100", usage, grid_stride=True)[0]
    assert plain["waves"] == math.ceil(10_000 / 528) and plain["bound"] == "latency"
    assert capped["blocks"] == 528 and capped["waves"] == 1
    # One wave: the launch is bound by its 16 MB of traffic, not by 19 waves of latency.
    assert capped["bound"] == "memory"
    assert math.isclose(capped["seconds"], 16e6 / ep.DEVICES["H100"]["dram_bytes_per_s"])


def test_roofline_shared_memory_term_and_serial_estimate():
    # 2.6e8 wavefronts: 1 s of one wavefront per clock on 132 SMs at 1.98 GHz; 3.35e12 bytes: 1 s
    # of H100 DRAM. Either alone sets the bound; the serial estimate adds them.
    sms_clock = 132 * 1.98e9
    shared_only = ep.roofline("H100", 0.0, 0.0, 0.0, 132, 1, shared_wavefronts=sms_clock)
    assert shared_only["bound"] == "shared" and math.isclose(shared_only["seconds"], 1.0)
    both = ep.roofline("H100", 3.35e12, 0.0, 0.0, 132, 1, shared_wavefronts=0.5 * sms_clock)
    assert both["bound"] == "memory" and math.isclose(both["seconds"], 1.0)
    assert math.isclose(both["serial_s"], 1.5)
    # The H200 profile differs from the H100's in DRAM bandwidth only.
    h200 = ep.roofline("H200", 4.8e12, 0.0, 0.0, 132, 1, shared_wavefronts=0.5 * sms_clock)
    assert math.isclose(h200["memory_s"], 1.0) and math.isclose(h200["shared_s"], 0.5)


def test_predict_counts_shared_wavefronts_in_the_bound():
    fitted = _fitted(0.0, 1e3)
    fitted[0]["coef"]["blocks"] = [0.0, 0.0, 132.0]
    fitted[0]["coef"]["sld_wave"] = [261.36, 0.0, 0.0]  # per n: 1e6 n wavefronts of 1.98e9 x 132
    pred = bench.predict(fitted, 1e6, 1.0, lambda k, nn, _resident: None, 64, "H100", {})[0]
    assert pred["bound"] == "shared"
    assert math.isclose(pred["shared_s"], 1e6 * 261.36 / (132 * 1.98e9))
    assert math.isclose(pred["serial_s"], pred["shared_s"] + 1e9 / 3.35e12)
