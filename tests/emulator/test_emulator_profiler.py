"""The emulator's profiler (linfusion_ops.emulated.profile, checked flavour).

Microkernels with known answers prove the counters: a coalesced copy (100 % load and store
efficiency, 4 sectors per request), a stride-2 copy (50 %), a 32-way bank conflict (32 wavefronts
for one request), a 32 x 32 transpose through shared memory padded to 33 words per row
(conflict-free) and unpadded (32-way), and an MMA count. Then every production kernel, at small
shapes, must stay within the committed budget of emulator_profile_budget.json (load / store
efficiency, DRAM bytes, shared-memory wavefronts and bank-conflict wavefronts per launch), so a
change that uncoalesces an access, adds a conflict or re-reads shared memory fails here. After a deliberate improvement, rewrite the budget with
LINFUSION_OPS_WRITE_PROFILE_BUDGET=1 python -m pytest tests/emulator/test_emulator_profiler.py
(benchmarks/README.md, "Emulator profile").
"""

import json
import os
from pathlib import Path

import pytest
import torch

from benchmarks import bench_emu_profile, emu_profile
from linfusion_ops import emulated

from tests.helpers.backends import skip_or_fail_without_emu

BUDGET = Path(__file__).with_name("emulator_profile_budget.json")
WRITE_BUDGET = os.environ.get("LINFUSION_OPS_WRITE_PROFILE_BUDGET") == "1"


@pytest.fixture(autouse=True)
def checked():
    skip_or_fail_without_emu("checked")
    with emulated.settings(device="H100", schedule="forward", seed=0):
        yield


def profile_selftest(name):
    with emulated.profile() as launches:
        out = emulated.run_selftest(name, "checked")
    assert len(launches) == 1, [r["kernel"] for r in launches]
    return launches[0], out


def test_coalesced_copy_is_fully_efficient():
    r, out = profile_selftest("profile_coalesced_copy")
    assert torch.equal(out, torch.arange(1024, dtype=torch.float32))
    for space in ("global_load", "global_store"):
        c = r[space]
        assert c["requests"] == 1024 // 32, space
        assert c["bytes"] == 4096, space
        assert c["sectors_per_request"] == 4.0, space
        assert c["efficiency"] == 1.0, space
    assert r["load_sectors"] == r["store_sectors"] == 4096 // 32
    assert r["dram_bytes"] == 2 * 4096
    assert r["blocks"] == 4 and r["grid"] == (4, 1, 1) and r["block"] == (256, 1, 1)
    assert r["shared_load"]["requests"] == r["shared_store"]["requests"] == 0
    assert r["mma"] == 0 and r["barriers"] == 0


def test_stride_two_copy_is_half_efficient():
    r, out = profile_selftest("profile_strided_copy")
    assert torch.equal(out, 2 * torch.arange(1024, dtype=torch.float32))
    assert r["global_load"]["sectors_per_request"] == 8.0
    assert r["global_load"]["efficiency"] == 0.5
    assert r["global_store"]["efficiency"] == 1.0
    # Every sector of the 8 KB input is touched: that is what DRAM delivers.
    assert r["load_sectors"] == 8192 // 32


def test_bank_conflict_costs_32_wavefronts():
    r, out = profile_selftest("profile_bank_conflict")
    assert torch.equal(out, 32 * torch.arange(32, dtype=torch.float32))
    load = r["shared_load"]
    assert load["requests"] == 1
    assert load["wavefronts"] == 32 and load["ideal_wavefronts"] == 1
    assert load["conflict_ways"] == 32.0
    # The fill loop writes consecutive words: conflict-free.
    assert r["shared_store"]["conflict_ways"] == 1.0
    assert r["barriers"] == 1


def test_padded_transpose_is_conflict_free_and_unpadded_is_not():
    padded, out = profile_selftest("profile_transpose_padded")
    assert torch.equal(out, torch.arange(1024, dtype=torch.float32).view(32, 32).t())
    for space in ("shared_load", "shared_store"):
        assert padded[space]["requests"] == 32
        assert padded[space]["wavefronts"] == 32, space
    unpadded, out = profile_selftest("profile_transpose_unpadded")
    assert torch.equal(out, torch.arange(1024, dtype=torch.float32).view(32, 32).t())
    assert unpadded["shared_store"]["conflict_ways"] == 1.0
    assert unpadded["shared_load"]["wavefronts"] == 32 * 32
    assert unpadded["shared_load"]["conflict_ways"] == 32.0
    for r in (padded, unpadded):
        assert r["global_load"]["efficiency"] == r["global_store"]["efficiency"] == 1.0


def test_mma_count_and_tile_model():
    r, out = profile_selftest("profile_mma")
    assert torch.equal(out, torch.full((16, 16), 3 * 16.0))  # three products of all-ones tiles
    assert r["mma"] == 3
    assert r["flops"] == 3 * 2 * 16 ** 3
    # Two fragment loads of an unpadded 16 x 16 fp16 tile (rows 32 bytes apart): ldmatrix's
    # eight 16-byte rows of a phase fall in 4 bank groups twice, so 8 wavefronts instead of 4.
    # WMMA sites are named by the kernel's call of load / store_matrix_sync.
    shared = [s for s in r["sites"] if s["space"] == "shared"]
    assert all(s["where"].startswith("csrc/emu/selftest.cpp:") for s in shared)
    loads = [s for s in shared if s["op"] == "load" and s["bytes"] == 512 * s["requests"]]
    assert sum(s["requests"] for s in loads) == 2
    assert sum(s["wavefronts"] for s in loads) == 16 and sum(s["ideal_wavefronts"] for s in loads) == 8
    # The fp32 accumulator store: 4 instructions of 8 bytes per lane, 1 KB, 2 wavefronts each.
    stores = [s for s in shared if s["op"] == "store" and s["bytes"] == 256 * s["requests"]]
    assert sum(s["requests"] for s in stores) == 4 and sum(s["bytes"] for s in stores) == 1024


def test_profile_restores_the_flavour_and_records_nothing_outside():
    with emulated.settings(flavour="fast"):
        with emulated.profile() as launches:
            assert emulated.current_settings()["flavour"] == "checked"
        assert emulated.current_settings()["flavour"] == "fast"
        assert launches == []
        x = torch.randn(8, 64)
        emulated.layer_norm_leaky_relu(x, torch.ones(64), torch.zeros(64))  # not profiled
    with emulated.profile() as launches:
        emulated.run_selftest("profile_coalesced_copy", "checked")
    assert len(launches) == 1


def test_profile_names_each_source_line():
    r, _ = profile_selftest("profile_strided_copy")
    sites = {(s["space"], s["op"]): s for s in r["sites"]}
    load = sites[("global", "load")]
    assert load["where"].startswith("csrc/emu/selftest.cpp:")
    assert load["efficiency"] == 0.5 and load["requests"] == 32


# ---------------------------------------------------------------------------------------------
# Production kernels against the committed budget.
CASES = {
    "linear_attention_fp16_d64": lambda: emu_profile.run_linear_attention(torch.float16, 64, 256),
    "linear_attention_bf16_d40": lambda: emu_profile.run_linear_attention(torch.bfloat16, 40, 256),
    # SD's layout: two heads per token row, a head's 80-byte rows not sector-aligned.
    "linear_attention_fp16_d40_h2": lambda: emu_profile.run_linear_attention(torch.float16, 40, 256, heads=2),
    "linear_attention_fp16_d80": lambda: emu_profile.run_linear_attention(torch.float16, 80, 256),
    "linear_attention_fp16_d160": lambda: emu_profile.run_linear_attention(torch.float16, 160, 128),
    "linear_attention_fp32_d40": lambda: emu_profile.run_linear_attention(torch.float32, 40, 128),
    # The generic apply backward with its dS / dz sums in shared memory over 3 x 3 accumulator
    # tiles, and without them (256 x 256 does not fit): the partial kernel with scratch weights.
    "linear_attention_fp32_d160": lambda: emu_profile.run_linear_attention(torch.float32, 160, 32),
    "linear_attention_fp32_d256": lambda: emu_profile.run_linear_attention(torch.float32, 256, 16),
    "layer_norm_fp16_c320": lambda: emu_profile.run_layer_norm(torch.float16, 320, 64),
    "layer_norm_fp16_c40": lambda: emu_profile.run_layer_norm(torch.float16, 40, 256),
    "layer_norm_fp32_c80": lambda: emu_profile.run_layer_norm(torch.float32, 80, 128),
    "layer_norm_fp32_c37_generic": lambda: emu_profile.run_layer_norm(torch.float32, 37, 32),
    "merge_segments_fp16": lambda: emu_profile.run_merge(torch.float16, 4),
    "merge_segments_fp16_planned": lambda: emu_profile.run_merge(torch.float16, 258, channels=64, length=9),
}
# Per launch: at least the budget's efficiencies; at most its DRAM bytes, its shared-memory
# wavefronts (loads + stores: on the H200 the tensor-core kernels' bound) and its bank-conflict
# wavefronts (wavefronts beyond the conflict-free count, loads and stores apart). Conflicts are
# capped as a count, not as ways (a ratio), so that removing conflict-free traffic, which raises
# the ratio of what conflicts remain, passes, and a new conflicting access fails.
FLOORS = ("global_load_efficiency", "global_store_efficiency")
CEILINGS = ("dram_bytes", "shared_wavefronts", "shared_load_conflict_wavefronts", "shared_store_conflict_wavefronts")


def launch_counters(r):
    s = emu_profile.summarize([r])
    s["shared_wavefronts"] = r["shared_load"]["wavefronts"] + r["shared_store"]["wavefronts"]
    for space in ("shared_load", "shared_store"):
        s[space + "_conflict_wavefronts"] = r[space]["wavefronts"] - r[space]["ideal_wavefronts"]
    return {"kernel": r["kernel"], **{k: s[k] for k in FLOORS + CEILINGS}}


@pytest.mark.parametrize("case", sorted(CASES))
def test_production_kernels_stay_within_budget(case):
    with emulated.settings(multiprocessor_count=4):  # several blocks per head at these sizes
        passes = CASES[case]()
    measured = {p: [launch_counters(r) for r in launches] for p, launches in passes.items()}
    if WRITE_BUDGET:
        budget = json.loads(BUDGET.read_text()) if BUDGET.exists() else {}
        budget[case] = measured
        BUDGET.write_text(json.dumps(dict(sorted(budget.items())), indent=1) + "\n")
    budget = json.loads(BUDGET.read_text())[case]
    for pass_, launches in budget.items():
        got = measured[pass_]
        assert [g["kernel"] for g in got] == [b["kernel"] for b in launches], f"{case} {pass_}: other kernels ran"
        for g, b in zip(got, launches):
            for key in FLOORS:
                assert g[key] >= b[key] - 1e-9, f"{case} {pass_} {g['kernel']}: {key} {g[key]:.4f} < budget {b[key]:.4f}"
            for key in CEILINGS:
                assert g[key] <= b[key] * (1 + 1e-9), f"{case} {pass_} {g['kernel']}: {key} {g[key]} > budget {b[key]}"


def test_generic_outer_products_run_whole_padded_tiles():
    """The model's fp32 FLOPs of the generic outer products (bench_emu_profile.analytic_fp32_flops)
    count whole zero-padded tiles, not D x D: the partial kernel's hot loop loads one row and one
    column value per micro-tile row per token whatever D, so at D = 40 it issues as many shared
    loads, and multiply-adds, as at D = 48 (its 48-wide tile), and fewer than at D = 64."""
    source = Path(__file__).resolve().parents[2] / "csrc" / "cuda" / "linear_attention_kernels.cuh"
    lines = source.read_text().splitlines()
    loads = ("av[m] = s_a[t * T + row + 16 * m];", "bv[m] = s_b[t * T + col + 16 * m];")
    hot = {f"csrc/cuda/linear_attention_kernels.cuh:{i + 1}" for i, text in enumerate(lines)
           if text.strip() in loads}
    assert len(hot) == 2

    def partial_launch(d):
        with emulated.settings(multiprocessor_count=1):
            fwd = emu_profile.run_linear_attention(torch.float32, d, 64)["fwd"]
        (launch,) = [r for r in fwd if "partial_generic_kernel" in r["kernel"]]
        loads = sum(s["requests"] for s in launch["sites"]
                    if s["space"] == "shared" and s["op"] == "load" and s["where"] in hot)
        return launch["kernel"], loads

    (name40, loads40), (name48, loads48), (name64, loads64) = map(partial_launch, (40, 48, 64))
    assert loads40 == loads48 == 3 * loads64 // 4 > 0
    flops = bench_emu_profile.analytic_fp32_flops
    assert flops(name40, 64, 1, 40) == flops(name48, 64, 1, 48) == 2 * 64 * 48 * 48
    assert flops(name64, 64, 1, 64) == 2 * 64 * 64 * 64
    tiles = [bench_emu_profile.outer_tile(d) for d in (17, 40, 64, 80, 160, 256)]
    assert tiles == [48, 48, 64, 80, 80, 64]
