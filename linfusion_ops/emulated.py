"""linfusion_ops' CUDA kernels, emulated on CPU tensors.

The emulation build compiles the unchanged kernels of csrc/cuda with the host compiler against
the emulator of csrc/emu/ (threads are fibers, blocks run one after another, __syncthreads and
warp collectives are checked rendezvous points, WMMA tiles are computed exactly) into
linfusion_ops._C_emu, whose ops are torch.ops.linfusion_ops_emu.*; the checked flavour,
linfusion_ops._C_emu_checked (torch.ops.linfusion_ops_emu_checked.*), adds a shared-memory race
detector and alignment checks. Build them with

    LINFUSION_OPS_CUDA_EMU=1 python setup.py build_ext --inplace        # fast
    LINFUSION_OPS_CUDA_EMU=checked python setup.py build_ext --inplace  # fast and checked

The functions below are linfusion_ops' public functions (same signatures and semantics) on CPU
tensors, running the emulated CUDA kernels, with autograd and fake kernels. The knobs choose the
emulated device (which kernel paths the launchers pick), the order in which a block's threads
and a grid's blocks run, and the flavour; launch_log() names the kernels that ran. A kernel bug
the emulator detects (divergent or unreachable barriers, missing lanes, misaligned WMMA
arguments, bad launch configurations, device asserts, and in the checked flavour races and
reads of unwritten shared memory) raises a RuntimeError naming the check, the kernel, the
source line, the block and the thread.

It proves the kernels' logic (indices, tiles, barriers, paths); it says nothing about timing,
real tensor-core rounding, races between blocks or CUDA graphs. profile() turns the checked
flavour's access hooks into per-launch memory counters (coalescing, DRAM sectors, bank
conflicts, barriers, MMAs): the inputs of the roofline model of benchmarks/README.md.
"""

import contextlib
import importlib
from typing import Dict, Iterator, List, Optional

import torch

from . import ops as _ops

DEVICES = ("H100", "A100", "sm86", "sm75")
SCHEDULES = ("forward", "reverse", "shuffle")
FLAVOURS = ("fast", "checked")

_MODULES = {"fast": "linfusion_ops._C_emu", "checked": "linfusion_ops._C_emu_checked"}
_NAMESPACES = {"fast": "linfusion_ops_emu", "checked": "linfusion_ops_emu_checked"}
_BUILD_VALUES = {"fast": "1", "checked": "checked"}

_loaded: Dict[str, object] = {}  # flavour -> module, or None when it is not built
_state = {"device": "H100", "multiprocessor_count": None, "registers_per_thread": None, "schedule": "forward",
          "seed": 0, "flavour": "fast"}


def _check_flavour(flavour: str) -> None:
    if flavour not in FLAVOURS:
        raise ValueError(f"linfusion_ops.emulated: flavour must be one of {FLAVOURS}, got {flavour!r}")


def _apply_settings(module) -> None:
    module.set_device(_state["device"], _state["multiprocessor_count"] or 0, _state["registers_per_thread"] or 0)
    module.set_schedule(_state["schedule"], _state["seed"])


def _module(flavour: str):
    """The flavour's compiled module (loaded, its ops' fake kernels and autograd registered, the
    current settings applied on first use), or None when it is not built."""
    _check_flavour(flavour)
    if flavour not in _loaded:
        try:
            module = importlib.import_module(_MODULES[flavour])
        except ImportError:
            module = None
        if module is not None:
            _ops.register_op_library(_NAMESPACES[flavour])
            _apply_settings(module)
        _loaded[flavour] = module
    return _loaded[flavour]


def _require(flavour: str):
    module = _module(flavour)
    if module is None:
        raise RuntimeError(
            f"linfusion_ops.emulated: the {flavour} emulation module {_MODULES[flavour]} is not built; "
            f"build it with `LINFUSION_OPS_CUDA_EMU={_BUILD_VALUES[flavour]} python setup.py build_ext "
            "--inplace` (add LINFUSION_OPS_CUDA=0 where no CUDA toolkit is installed)"
        )
    return module


def _each_loaded():
    return [m for m in _loaded.values() if m is not None]


def available(flavour: str = "fast") -> bool:
    """True when the flavour's emulation module ("fast": _C_emu, "checked": _C_emu_checked) is
    built and loads."""
    return _module(flavour) is not None


def ops(flavour: str = "fast"):
    """The flavour's op namespace, torch.ops.linfusion_ops_emu[_checked] (for opcheck and direct
    op calls). Raises RuntimeError, saying how to build it, when the flavour is not built."""
    _require(flavour)
    return getattr(torch.ops, _NAMESPACES[flavour])


# ---------------------------------------------------------------------------------------------
# Knobs. They apply to every flavour's module, to the launches that follow.
def set_device(name: str, *, multiprocessor_count: Optional[int] = None,
               registers_per_thread: Optional[int] = None) -> None:
    """Emulate device profile `name`: "H100" (sm_90, 132 SMs, 227 KB of opt-in shared memory per
    block; the default), "A100" (sm_80, 108 SMs, 163 KB), "sm86" (sm_86, 84 SMs, 99 KB) or "sm75"
    (sm_75, 40 SMs, 64 KB). multiprocessor_count overrides the profile's SM count (grid sizes of
    the grid-stride kernels depend on it). registers_per_thread (1-255; None: no limit) is the
    register count cudaOccupancyMaxActiveBlocksPerMultiprocessor assumes for every kernel (64K
    registers per SM, allocated per warp in units of 256), so that launchers which size their grid
    by residency pick what they would for a kernel that heavy on a GPU; the emulated kernels
    themselves know nothing of registers."""
    if name not in DEVICES:
        raise ValueError(f"linfusion_ops.emulated: device must be one of {DEVICES}, got {name!r}")
    if multiprocessor_count is not None and multiprocessor_count < 1:
        raise ValueError(f"linfusion_ops.emulated: multiprocessor_count must be >= 1, got {multiprocessor_count}")
    if registers_per_thread is not None and not 1 <= registers_per_thread <= 255:
        raise ValueError(f"linfusion_ops.emulated: registers_per_thread must be in [1, 255], got {registers_per_thread}")
    _state["device"], _state["multiprocessor_count"] = name, multiprocessor_count
    _state["registers_per_thread"] = registers_per_thread
    for module in _each_loaded():
        _apply_settings(module)


def set_schedule(order: str, seed: int = 0) -> None:
    """Run the threads of a block, and the blocks of a grid, in "forward" (index) order, in
    "reverse" order, or "shuffle"d by a generator seeded with `seed`. Correct kernels give
    bitwise-equal results under every schedule."""
    if order not in SCHEDULES:
        raise ValueError(f"linfusion_ops.emulated: schedule must be one of {SCHEDULES}, got {order!r}")
    _state["schedule"], _state["seed"] = order, int(seed)
    for module in _each_loaded():
        _apply_settings(module)


def set_flavour(flavour: str) -> None:
    """Which module the public functions of this module run: "fast" or "checked"."""
    _check_flavour(flavour)
    _state["flavour"] = flavour


def current_settings() -> dict:
    """{"device", "multiprocessor_count" (the effective count), "registers_per_thread", "schedule",
    "seed", "flavour"}."""
    settings = dict(_state)
    if settings["multiprocessor_count"] is None:
        module = next(iter(_each_loaded()), None)
        settings["multiprocessor_count"] = module.current_settings()["multiprocessor_count"] if module else None
    return settings


@contextlib.contextmanager
def settings(
    device: Optional[str] = None,
    multiprocessor_count: Optional[int] = None,
    schedule: Optional[str] = None,
    seed: Optional[int] = None,
    flavour: Optional[str] = None,
    registers_per_thread: Optional[int] = None,
) -> Iterator[dict]:
    """Context manager: the given knobs inside the block (the others unchanged), the previous
    values restored on exit. Yields current_settings()."""
    saved = dict(_state)
    try:
        if device is not None or multiprocessor_count is not None:
            set_device(device or _state["device"], multiprocessor_count=multiprocessor_count,
                       registers_per_thread=_state["registers_per_thread"])
        if registers_per_thread is not None:
            set_device(_state["device"], multiprocessor_count=_state["multiprocessor_count"],
                       registers_per_thread=registers_per_thread)
        if schedule is not None or seed is not None:
            set_schedule(schedule or _state["schedule"], _state["seed"] if seed is None else seed)
        if flavour is not None:
            set_flavour(flavour)
        yield current_settings()
    finally:
        set_device(saved["device"], multiprocessor_count=saved["multiprocessor_count"],
                   registers_per_thread=saved["registers_per_thread"])
        set_schedule(saved["schedule"], saved["seed"])
        set_flavour(saved["flavour"])


def launch_log(flavour: Optional[str] = None) -> List[str]:
    """Demangled names, template arguments included, of the kernels the flavour's module
    (default: the current flavour) launched since the last clear_launch_log(), in order, e.g.
    "linfusion_ops::la_cuda::linear_attention_apply_tc_kernel<c10::Half, (linfusion_ops::FeatureMap)0, 64>"."""
    return list(_require(flavour or _state["flavour"]).launch_log())


def clear_launch_log() -> None:
    """Empties the launch log of every flavour."""
    for module in _each_loaded():
        module.clear_launch_log()


# ---------------------------------------------------------------------------------------------
# The profiler (checked flavour).
MMA_FLOPS = 2 * 16 * 16 * 16  # one m16n16k16 multiply-accumulate


def _launch_record(raw: dict) -> dict:
    record = dict(raw)
    for space in ("global_load", "global_store"):
        c = record[space]
        c["sectors"] = c.pop("units")
        c["distinct_bytes"] = c.pop("ideal")
        c["sectors_per_request"] = c["sectors"] / c["requests"] if c["requests"] else 0.0
        c["efficiency"] = c["distinct_bytes"] / (32 * c["sectors"]) if c["sectors"] else 1.0
    for space in ("shared_load", "shared_store"):
        c = record[space]
        c["wavefronts"] = c.pop("units")
        c["ideal_wavefronts"] = c.pop("ideal")
        c["wavefronts_per_request"] = c["wavefronts"] / c["requests"] if c["requests"] else 0.0
        c["conflict_ways"] = c["wavefronts"] / c["ideal_wavefronts"] if c["ideal_wavefronts"] else 1.0
    for site in record["sites"]:
        if site["space"] == "global":
            site["sectors"] = site.pop("units")
            site["distinct_bytes"] = site.pop("ideal")
            site["efficiency"] = site["distinct_bytes"] / (32 * site["sectors"]) if site["sectors"] else 1.0
        else:
            site["wavefronts"] = site.pop("units")
            site["ideal_wavefronts"] = site.pop("ideal")
            site["conflict_ways"] = site["wavefronts"] / site["ideal_wavefronts"] if site["ideal_wavefronts"] else 1.0
    record["flops"] = record["mma"] * MMA_FLOPS
    record["dram_bytes"] = 32 * (record["load_sectors"] + record["store_sectors"])
    record["dram_bytes_no_l2_reuse"] = 32 * (record["block_load_sectors"] + record["block_store_sectors"])
    return record


@contextlib.contextmanager
def profile() -> Iterator[List[dict]]:
    """Context manager: the kernels launched inside the block run on the checked flavour with
    the profiler on; it yields a list that holds, after the block, one record per launch:

    * "kernel" (demangled name), "grid", "block" (3-tuples), "dynamic_smem", "static_smem"
      (bytes), "blocks", "barriers" (released __syncthreads, summed over blocks), "mma"
      (warp-level m16n16k16 MMAs) and "flops" (2·16³ per MMA);
    * "global_load" / "global_store": "requests" (one per warp per instruction instance: the
      k-th execution of one access site by the lanes of a warp between two barriers), "bytes"
      requested, "distinct_bytes" (per request: lanes that read one address count once, a
      broadcast), "sectors" (32-byte sectors touched per request, summed),
      "sectors_per_request", "efficiency" (distinct bytes ÷ sector bytes);
    * "shared_load" / "shared_store": "requests", "bytes", "wavefronts" (32 banks of 4 bytes,
      one wavefront per distinct word in the busiest bank of each phase; 8- and 16-byte
      accesses in 2 and 4 phases, as the hardware splits them), "ideal_wavefronts",
      "wavefronts_per_request", "conflict_ways" (wavefronts ÷ ideal);
    * "load_sectors" / "store_sectors": distinct sectors over the launch, and
      "block_load_sectors" / "block_store_sectors": distinct per block, summed; "dram_bytes"
      (the traffic if L2 caught every reuse) and "dram_bytes_no_l2_reuse" (if it caught none);
    * "sites": the same counters per source line ("where", "space", "op"), costliest first.

    WMMA loads and stores are modelled (ldmatrix.x4 for 16-bit operands, 8-byte-per-lane
    stores in the mma register layout for fp32 accumulators), not the real SASS. Raises
    RuntimeError when the checked flavour is not built."""
    module = _require("checked")
    launches: List[dict] = []
    saved = _state["flavour"]
    module.take_profile()
    module.set_profiling(True)
    set_flavour("checked")
    try:
        yield launches
    finally:
        module.set_profiling(False)
        set_flavour(saved)
        launches.extend(_launch_record(r) for r in module.take_profile())


# ---------------------------------------------------------------------------------------------
# The emulator's own tests: deliberately broken kernels.
def selftest_names(flavour: str = "fast") -> List[str]:
    """Names of the flavour's test kernels: "ok" (correct), one deliberately broken kernel per
    check of the emulator, the race / alignment ones in the checked flavour only,
    "schedule_dependent" (a missing barrier: its output depends on the schedule), and in the
    checked flavour the profiler's microkernels "profile_*" (known counters)."""
    return list(_require(flavour).selftest_names())


def run_selftest(name: str, flavour: str = "fast") -> Optional[torch.Tensor]:
    """Runs test kernel `name`: a broken one raises the emulator's RuntimeError; "ok" returns
    None, "schedule_dependent" its (64,) int32 output, a "profile_*" kernel its float32 output
    (a copy or transpose of torch.arange, or the MMA's 16 x 16 tile)."""
    return _require(flavour).run_selftest(name)


# ---------------------------------------------------------------------------------------------
# linfusion_ops' public functions, running the current flavour's emulated kernels.
def _namespace():
    return ops(_state["flavour"])


def _check_ids_on_host(segment_ids: torch.Tensor) -> bool:
    # The emulated kernel device-asserts like the CUDA one; the public function checks first.
    return not torch.compiler.is_compiling()


_library = _ops.OpLibrary(_namespace, _check_ids_on_host)
linear_attention_state = _library.linear_attention_state
linear_attention_apply = _library.linear_attention_apply
linear_attention = _library.linear_attention
layer_norm_leaky_relu = _library.layer_norm_leaky_relu
merge_segments = _library.merge_segments

__all__ = [
    "DEVICES",
    "FLAVOURS",
    "SCHEDULES",
    "available",
    "clear_launch_log",
    "current_settings",
    "launch_log",
    "layer_norm_leaky_relu",
    "linear_attention",
    "linear_attention_apply",
    "linear_attention_state",
    "merge_segments",
    "MMA_FLOPS",
    "ops",
    "profile",
    "run_selftest",
    "selftest_names",
    "set_device",
    "set_flavour",
    "set_schedule",
    "settings",
]
