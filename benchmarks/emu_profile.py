"""The performance model behind benchmarks/bench_emu_profile.py (benchmarks/README.md, "Emulator profile"): workloads
that run every op and kernel path under linfusion_ops.emulated.profile(), each op's minimum
traffic, theoretical occupancy from nvcc's resource usage, a roofline bound per launch, and the
extrapolation of emulated counters to real sizes. Every time it gives is *predicted*.

Roofline per launch: time >= max(DRAM bytes / bandwidth, FLOPs / peak of the unit used,
shared-memory wavefronts / (SMs x clock), waves x WAVE_FLOOR_S), where DRAM bytes are the
launch's distinct 32-byte sectors (L2 catching every reuse within the launch), a shared-memory
pipe serves one wavefront per clock per SM, and waves = ceil(blocks / (SMs x resident blocks per
SM)). Next to that bound, "serial_s" is the same terms added instead of overlapped (DRAM, then
shared memory, then math): what a kernel takes when each block's load, shared-memory and math
phases alternate between barriers and too few warps are resident to overlap them. On the H200
the tensor-core passes measured between the two (benchmarks/README.md, "First GPU results").
"""

import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from linfusion_ops import emulated

RESULTS = Path(__file__).resolve().parent / "results"

# Device constants. Sources: NVIDIA H100 Tensor Core GPU datasheet (H100 SXM5: HBM3 3.35 TB/s,
# dense FP16/BF16 tensor 989.4 TFLOPS, FP32 66.9 TFLOPS, 132 SMs); NVIDIA A100 datasheet (A100
# SXM4 80 GB: 2,039 GB/s, dense FP16/BF16 tensor 312 TFLOPS, FP32 19.5 TFLOPS, 108 SMs); CUDA C++
# Programming Guide, "Compute Capabilities" table (65,536 registers, 2,048 threads and 32 blocks
# per SM on sm_80 / sm_90, 1,536 threads and 16 blocks on sm_86; shared memory per SM 228 KB on
# sm_90, 164 KB on sm_80, 100 KB on sm_86; 1 KB of it reserved per block; registers allocated
# per warp in units of 256). sm_86 is modelled for occupancy only, with the sm_80 cubin's
# register counts. NVIDIA H200 datasheet (H200 SXM: HBM3e 4.8 TB/s, the H100 SXM's SMs and
# tensor peaks). Clocks: the boost clocks of the same datasheets (1,980 MHz H100 / H200 SXM,
# 1,410 MHz A100); the shared-memory pipe serves one 128-byte wavefront per clock per SM.
DEVICES = {
    "H100": {"label": "H100 SXM5", "arch": "sm90", "sms": 132, "dram_bytes_per_s": 3.35e12,
             "tensor_flops": 989.4e12, "fp32_flops": 66.9e12, "clock_hz": 1.98e9,
             "smem_per_sm": 228 * 1024, "threads_per_sm": 2048, "blocks_per_sm": 32},
    "H200": {"label": "H200 SXM", "arch": "sm90", "sms": 132, "dram_bytes_per_s": 4.8e12,
             "tensor_flops": 989.4e12, "fp32_flops": 66.9e12, "clock_hz": 1.98e9,
             "smem_per_sm": 228 * 1024, "threads_per_sm": 2048, "blocks_per_sm": 32},
    "A100": {"label": "A100 SXM4 80GB", "arch": "sm80", "sms": 108, "dram_bytes_per_s": 2.039e12,
             "tensor_flops": 312e12, "fp32_flops": 19.5e12, "clock_hz": 1.41e9,
             "smem_per_sm": 164 * 1024, "threads_per_sm": 2048, "blocks_per_sm": 32},
    "sm86": {"label": "sm_86 (84 SMs)", "arch": "sm80", "sms": 84, "smem_per_sm": 100 * 1024,
             "threads_per_sm": 1536, "blocks_per_sm": 16},
}
REGISTERS_PER_SM = 65536
SMEM_RESERVED_PER_BLOCK = 1024
# A wave of blocks costs at least one launch-and-drain: about 2 us (kernel launch overhead of
# ~2-4 us back to back on a stream, a few dependent DRAM round trips of ~0.6 us each). An
# assumption, to be calibrated by benchmarks/gpu_check.sh.
WAVE_FLOOR_S = 2e-6


def load_resource_usage(arch: str) -> Dict[str, dict]:
    """{kernel name: {"registers", "shared_static", ...}} from results/resource_usage_<arch>.json
    (benchmarks/resource_usage.py), or {} when it was not generated."""
    path = RESULTS / f"resource_usage_{arch}.json"
    return json.loads(path.read_text())["kernels"] if path.exists() else {}


def occupancy(device: str, threads: int, registers: Optional[int], smem: int) -> dict:
    """Theoretical resident blocks per SM and occupancy (resident warps / the SM's maximum) of a
    block of `threads` threads using `registers` per thread and `smem` bytes of shared memory."""
    d = DEVICES[device]
    warps = math.ceil(threads / 32)
    limits = {"blocks": d["blocks_per_sm"], "threads": d["threads_per_sm"] // (warps * 32)}
    if registers:
        per_warp = math.ceil(registers * 32 / 256) * 256
        limits["registers"] = REGISTERS_PER_SM // (per_warp * warps)
    if smem:
        limits["smem"] = d["smem_per_sm"] // (smem + SMEM_RESERVED_PER_BLOCK)
    blocks = min(limits.values())
    return {"blocks_per_sm": blocks, "limited_by": min(limits, key=limits.get),
            "occupancy": blocks * warps * 32 / d["threads_per_sm"]}


def grid_stride_blocks(device: str, work_blocks: float, threads: int, registers: Optional[int], smem: int) -> float:
    """Blocks a grid-stride launcher gives a kernel on `device` (a mirror of
    cuda_rowwise::grid_stride_blocks in csrc/cuda/rowwise.cuh): the blocks the work needs, at most
    those resident at once (SMs x resident blocks per SM), so never more than one wave."""
    resident = occupancy(device, threads, registers, smem)["blocks_per_sm"] * DEVICES[device]["sms"]
    return min(work_blocks, max(resident, 1))


def roofline(device: str, dram_bytes: float, tensor_flops: float, fp32_flops: float, blocks: float,
             blocks_per_sm: int, shared_wavefronts: float = 0.0) -> dict:
    """Predicted lower bound of one launch's time (seconds), which term sets it, and the serial
    estimate (the DRAM, shared-memory and math terms added: no overlap of a block's phases)."""
    d = DEVICES[device]
    waves = math.ceil(blocks / (d["sms"] * max(blocks_per_sm, 1)))
    terms = {"memory": dram_bytes / d["dram_bytes_per_s"],
             "tensor": tensor_flops / d["tensor_flops"],
             "fp32": fp32_flops / d["fp32_flops"],
             "shared": shared_wavefronts / (d["sms"] * d["clock_hz"]),
             "latency": waves * WAVE_FLOOR_S}
    bound = max(terms, key=terms.get)
    serial = max(terms["memory"] + terms["shared"] + max(terms["tensor"], terms["fp32"]), terms["latency"])
    return {"seconds": terms[bound], "bound": bound, "serial_s": serial, "waves": waves,
            **{f"{k}_s": v for k, v in terms.items()}}


# ---------------------------------------------------------------------------------------------
# Minimum traffic of each op (bytes): every input read once, every output written once.
def linear_attention_min_bytes(pass_: str, b: int, n: int, h: int, d: int, elem: int) -> int:
    """fwd: q, k, v read, o written; bwd: q, k, v, grad_out read, dq, dk, dv written (the fp32
    state, B·H·D·(D+1)·4 bytes, is left out: it does not grow with N)."""
    tensor = b * n * h * d * elem
    return {"fwd": 4 * tensor, "bwd": 7 * tensor}[pass_]


def layer_norm_min_bytes(pass_: str, rows: int, channels: int, elem: int) -> int:
    """fwd: x read, out written, fp32 mean and rstd written; bwd: grad_out, x, mean, rstd read,
    grad_x written (weight, bias and their grads: C each, left out)."""
    return {"fwd": 2 * rows * channels * elem + 8 * rows, "bwd": 3 * rows * channels * elem + 8 * rows}[pass_]


def merge_min_bytes(pass_: str, kept_tokens: int, out_tokens: int, in_tokens: int, channels: int, elem: int) -> int:
    """fwd: the kept tokens read, the merged (B, T, C) written; bwd: grad (B, T, C) read,
    grad_embeds (S, L, C) written."""
    if pass_ == "fwd":
        return (kept_tokens + out_tokens) * channels * elem
    return (out_tokens + in_tokens) * channels * elem


# ---------------------------------------------------------------------------------------------
# The split of N across blocks (a mirror of split_tokens / tc_token_split in
# csrc/cuda/linear_attention.cu), for extrapolating counters that grow with the splits.
BLOCKS_PER_SM = 4


def split_count(tokens: int, blocks_per_range: int, tile: int, sms: int, min_tiles: int = 1,
                resident_per_sm: int = 0) -> int:
    """Ranges of N (mirror of split_tokens in linear_attention.cu): one full wave of
    resident_per_sm blocks per SM, rounded down, for the tensor-core kernels (resident_per_sm > 0);
    about BLOCKS_PER_SM blocks per SM, rounded up, for the others (0)."""
    tiles = math.ceil(tokens / tile)
    most = max(tiles // min_tiles, 1)
    if resident_per_sm > 0:
        wanted = min(max(resident_per_sm * sms // blocks_per_range, 1), most)
    else:
        wanted = min(max(math.ceil(BLOCKS_PER_SM * sms / blocks_per_range), 1), most)
    per_split = math.ceil(tiles / wanted) * tile
    return math.ceil(tokens / per_split)


# ---------------------------------------------------------------------------------------------
# Workloads. Each runs one op at one size, forward then backward, each under its own profile(),
# and returns {"fwd": [launch records], "bwd": [...]}.
def _profiled(forward: Callable[[], torch.Tensor]) -> Dict[str, List[dict]]:
    with emulated.profile() as fwd:
        out = forward()
    grad = torch.ones_like(out) if out.dtype == torch.float64 else torch.randn_like(out)
    with emulated.profile() as bwd:
        out.backward(grad)
    return {"fwd": fwd, "bwd": bwd}


def run_linear_attention(dtype: torch.dtype, d: int, n: int, heads: int = 1, batch: int = 1,
                         seed: int = 0) -> Dict[str, List[dict]]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n, heads * d, generator=g).to(dtype).requires_grad_() for _ in range(3))
    return _profiled(lambda: emulated.linear_attention(q, k, v, heads))


def run_layer_norm(dtype: torch.dtype, channels: int, rows: int, seed: int = 0) -> Dict[str, List[dict]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(channels, generator=g)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(channels, generator=g)).to(dtype).requires_grad_()
    return _profiled(lambda: emulated.layer_norm_leaky_relu(x, w, b))


def run_merge(dtype: torch.dtype, segments: int, channels: int = 768, length: int = 77, prompts: int = 2,
              seed: int = 0) -> Dict[str, List[dict]]:
    """LongAlign's shapes: segments of 77 CLIP tokens, the start token and 60 content tokens
    kept per segment, a budget of 77 tokens per segment of the longest prompt."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(segments, length, channels, generator=g).to(dtype).requires_grad_()
    keep = torch.zeros(segments, length, dtype=torch.bool)
    keep[:, :61] = True
    ids = torch.arange(segments) % prompts
    ids, _ = ids.sort()
    pad = torch.randn(channels, generator=g).to(dtype).requires_grad_()
    tokens = length * math.ceil(segments / prompts)
    return _profiled(lambda: emulated.merge_segments(embeds, keep, ids, prompts, tokens, pad)[0])


# ---------------------------------------------------------------------------------------------
# Summaries.
def summarize(launches: List[dict]) -> dict:
    """Totals over the launches of one op pass: the issue's columns before the model."""
    tot = {"launches": len(launches), "dram_bytes": 0, "mma": 0, "barriers": 0}
    for space in ("global_load", "global_store", "shared_load", "shared_store"):
        tot[space] = {"requests": 0, "bytes": 0, "units": 0, "ideal": 0}
    for r in launches:
        tot["dram_bytes"] += r["dram_bytes"]
        tot["mma"] += r["mma"]
        tot["barriers"] += r["barriers"]
        for space in ("global_load", "global_store"):
            c = r[space]
            t = tot[space]
            t["requests"] += c["requests"]
            t["bytes"] += c["distinct_bytes"]
            t["units"] += c["sectors"]
        for space in ("shared_load", "shared_store"):
            c = r[space]
            t = tot[space]
            t["requests"] += c["requests"]
            t["bytes"] += c["bytes"]
            t["units"] += c["wavefronts"]
            t["ideal"] += c["ideal_wavefronts"]
    out = {"launches": tot["launches"], "dram_bytes": tot["dram_bytes"], "mma": tot["mma"],
           "barriers": tot["barriers"]}
    for space in ("global_load", "global_store"):
        t = tot[space]
        out[space + "_efficiency"] = t["bytes"] / (32 * t["units"]) if t["units"] else 1.0
        out[space + "_sectors_per_request"] = t["units"] / t["requests"] if t["requests"] else 0.0
    for space in ("shared_load", "shared_store"):
        t = tot[space]
        out[space + "_conflict_ways"] = t["units"] / t["ideal"] if t["ideal"] else 1.0
        out[space + "_wavefronts_per_request"] = t["units"] / t["requests"] if t["requests"] else 0.0
    return out


def worst_sites(launches: List[dict], count: int = 3) -> List[str]:
    """The global sites with the lowest efficiency and the shared ones with the most conflict
    ways, as 'kernel-short-name file:line value'."""
    found = []
    for r in launches:
        short = r["kernel"].split("<")[0].split("::")[-1]
        for s in r["sites"]:
            if s["space"] == "global" and s["efficiency"] < 0.9:
                found.append((1 - s["efficiency"], f"{short} {s['where']} {s['op']} eff {s['efficiency']:.2f}"))
            if s["space"] == "shared" and s["conflict_ways"] > 1.25:
                found.append((s["conflict_ways"] - 1, f"{short} {s['where']} {s['op']} ways {s['conflict_ways']:.2f}"))
    return [text for _, text in sorted(found, reverse=True)[:count]]
