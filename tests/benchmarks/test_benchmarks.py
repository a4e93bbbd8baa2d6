"""benchmarks/common.py: the CPU peak-memory figure every benchmark reports (what a pass
allocates beyond its inputs) against known allocations, and that measuring it prints nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: the profiler's log level is fixed when it first starts in a process.
SCRIPT = r"""
import json
import torch
from benchmarks.common import peak_memory_mb

MiB = 2**20
x = torch.ones(MiB // 4)  # 1 MiB input, allocated before the pass: not counted


def step():
    a = torch.empty(MiB, dtype=torch.uint8)
    b = torch.empty(2 * MiB, dtype=torch.uint8)  # a and b alive: 3 MiB, the peak
    del a
    c = torch.empty(MiB // 2, dtype=torch.uint8)  # 2.5 MiB
    del b, c
    return x * 2  # 1 MiB, freed when the caller drops it


def nothing():
    return None


print(json.dumps({"step": [peak_memory_mb(step, "cpu") for _ in range(3)],
                  "nothing": peak_memory_mb(nothing, "cpu")}))
"""


def test_cpu_peak_memory_is_known_allocation_and_silent():
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)
    figures = json.loads(run.stdout)
    assert figures["step"] == [3.0, 3.0, 3.0], figures
    assert figures["nothing"] == 0.0, figures
    # Kineto prints a "USDT ... profiler_start" / "profiler_stop" pair per profiled region unless
    # benchmarks/common.py silences it; nothing at all may reach stderr.
    assert run.stderr == "", run.stderr
