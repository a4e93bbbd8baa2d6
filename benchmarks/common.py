"""Timing and memory helpers shared by the benchmarks."""

import os
import statistics
import subprocess
import time
import warnings
from pathlib import Path

import torch

# Kineto (the profiler behind peak_memory_mb on CPU) logs at levels 0 (verbose) to 5 ("USDT":
# a profiler_start / profiler_stop line pair for every profiled region, printed even at
# KINETO_LOG_LEVEL=5). 6 is past its last level and silences the library, and nothing else: the
# profiled events are unchanged. Kineto reads the variable when a profiler first starts in the
# process, so this must run before any profile; a value the user set is kept.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, *, warmup: int = 2, repeat: int = 10, max_seconds: float = 30.0) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on GPU). Stops repeating once
    max_seconds have been spent, after at least one measured run."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    cuda = torch.device(device).type == "cuda"
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start_all > max_seconds:
            break
    return statistics.median(times)


def peak_memory_mb(fn, device) -> float:
    """Peak memory allocated while fn() runs, beyond what was allocated before, in MiB.
    CUDA: the caching allocator's peak. CPU: the running sum of the allocations and frees that
    the profiler attributes to each op (self memory), in time order; its maximum is the peak."""
    if torch.device(device).type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        # torch 2.11 warns once per process that a profiler clears its events at the end of each
        # cycle; this one-region profile has a single cycle, so nothing is lost.
        warnings.filterwarnings("ignore", message="Warning: Profiler clears events")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def git_commit() -> str:
    """The short commit of the checkout being measured, "-dirty" when tracked files changed, or
    "unknown" outside git. LINFUSION_OPS_BENCH_COMMIT overrides it (a copy of the tree without
    .git, as on a lent GPU machine)."""
    if os.environ.get("LINFUSION_OPS_BENCH_COMMIT"):
        return os.environ["LINFUSION_OPS_BENCH_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        run = lambda *args: subprocess.run(  # noqa: E731
            ["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        sha = run("rev-parse", "--short", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")
