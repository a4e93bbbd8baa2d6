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
