"""GPU benchmark of linfusion_ops against PyTorch references, as a fraction of copy bandwidth.

Measures the device-to-device copy bandwidth in the same run, then times every case of
benchmarks/gpu_cases_linear_attention.py and (when present) benchmarks/gpu_cases_norm_merge.py:
each module's cases(device) yields (case dict, fn, bytes). Writes
<out>/<date>_<commit>_<gpu>.json in the format of benchmarks/README.md,

  {"commit", "device", "torch", "cuda", "copy_gbps",
   "cases": [{"op", "pass", "impl", <shape keys>, "dtype", "ms", "gbps", "bw_fraction"}]}

with ms the median time, gbps = bytes / time / 1e9 and bw_fraction = gbps / copy_gbps (plus
peak_mb, the memory allocated while the case runs, and for linear-attention fwd+bwd extra_mb,
that peak less o, dq, dk, dv), a PNG plot next to it, and prints a table with the ratio of each
case to "reference".

Usage: python benchmarks/bench_gpu.py [--out benchmarks/results] [--max-seconds 2]
"""

import argparse
import datetime
import importlib
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import git_commit, peak_memory_mb, time_ms  # noqa: E402

CASE_MODULES = ("benchmarks.gpu_cases_linear_attention", "benchmarks.gpu_cases_norm_merge")
COPY_BYTES = 1 << 30  # 1 GiB source buffer: far beyond L2
NON_SHAPE_KEYS = ("op", "pass", "impl", "dtype", "ms", "gbps", "bw_fraction", "peak_mb", "extra_mb")


def copy_gbps(device) -> float:
    """Device-to-device copy bandwidth: (bytes read + bytes written) / s / 1e9."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, repeat=20)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * COPY_BYTES / ms / 1e6


def load_case_modules():
    modules = []
    for name in CASE_MODULES:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            print(f"bench_gpu: {name} not found, skipping its cases")
    return modules


def shape_key(case: dict) -> tuple:
    """What identifies a case apart from its impl and its measurements."""
    return tuple((k, v) for k, v in case.items()
                 if k not in ("impl", "ms", "gbps", "bw_fraction", "peak_mb", "extra_mb"))


def run_cases(modules, device, max_seconds: float, copy: float):
    from tqdm import tqdm

    results = []
    progress = tqdm(desc="cases", unit="case")
    for module in modules:
        for case, fn, nbytes in module.cases(device):
            label = " ".join(f"{k}={v}" for k, v in case.items())
            progress.set_postfix_str(label[:60])
            try:
                ms = time_ms(fn, device, warmup=2, repeat=15, max_seconds=max_seconds)
            except torch.OutOfMemoryError:
                tqdm.write(f"bench_gpu: out of memory, skipped: {label}")
                torch.cuda.empty_cache()
                progress.update()
                continue
            gbps = nbytes / ms / 1e6
            row = {**case, "ms": round(ms, 5), "gbps": round(gbps, 2),
                   "bw_fraction": round(gbps / copy, 4)}
            # Memory allocated while the case runs, beyond what existed before (inputs).
            row["peak_mb"] = round(peak_memory_mb(fn, device), 1)
            if case["op"] == "linear_attention" and case["pass"] == "fwd+bwd":
                # Beyond o, dq, dk, dv: half of the pass's traffic (8 tensors of one size).
                row["extra_mb"] = round(row["peak_mb"] - nbytes / 2 / 2**20, 1)
            results.append(row)
            progress.update()
        torch.cuda.empty_cache()
    progress.close()
    return results


def print_table(results) -> None:
    reference_ms = {shape_key(r): r["ms"] for r in results if r["impl"] == "reference"}
    header = (f"{'op':<22} {'pass':<8} {'impl':<14} {'shape':<34} {'dtype':<5} {'ms':>10} "
              f"{'GB/s':>8} {'bw':>6} {'vs ref':>8} {'extra MB':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        shape = " ".join(f"{k}={v}" for k, v in r.items() if k not in NON_SHAPE_KEYS)
        ref = reference_ms.get(shape_key(r))
        ratio = f"{ref / r['ms']:.1f}x" if ref else ""
        print(f"{r['op']:<22} {r['pass']:<8} {r['impl']:<14} {shape:<34} {r['dtype']:<5} "
              f"{r['ms']:>10.4f} {r['gbps']:>8.1f} {r['bw_fraction']:>6.2f} {ratio:>8} "
              f"{r.get('extra_mb', ''):>9}")


def plot(results, copy: float, path: Path, title: str) -> None:
    """Fraction of copy bandwidth of each linear-attention case, one panel per pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["op"] == "linear_attention"]
    passes = ("fwd", "fwd+bwd")
    fig, axes = plt.subplots(1, len(passes), figsize=(20, 6), sharey=True)
    for ax, pass_name in zip(axes, passes):
        subset = [r for r in rows if r["pass"] == pass_name]
        labels = sorted({(r["N"], r["H"], r["D"], r["dtype"]) for r in subset})
        impls = sorted({r["impl"] for r in subset})
        width = 0.8 / max(len(impls), 1)
        for i, impl in enumerate(impls):
            values = {(r["N"], r["H"], r["D"], r["dtype"]): r["bw_fraction"] for r in subset
                      if r["impl"] == impl}
            xs = [j + i * width for j, key in enumerate(labels) if key in values]
            ax.bar(xs, [values[key] for key in labels if key in values], width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
        ax.set_xticklabels([f"N={n}\nH={h} D={d}\n{t}" for n, h, d, t in labels], fontsize=7)
        ax.set_yscale("log")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_title(f"linear attention {pass_name} (B=2)")
        ax.set_ylabel(f"fraction of copy bandwidth ({copy:.0f} GB/s)")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                        help="folder for the JSON and PNG (default: benchmarks/results)")
    parser.add_argument("--max-seconds", type=float, default=2.0,
                        help="stop repeating a case after this many seconds (default: 2)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU is visible (torch.cuda.is_available() is False); "
              "run this on a machine with an NVIDIA GPU.", file=sys.stderr)
        return 2
    import linfusion_ops

    info = linfusion_ops.build_info()
    if not info.get("cuda"):
        print(f"bench_gpu: linfusion_ops was built without CUDA kernels ({info}); build it with "
              "`python setup.py build_ext --inplace` on a machine with nvcc.", file=sys.stderr)
        return 2

    device = "cuda"
    name = torch.cuda.get_device_name(device)
    commit = git_commit()
    print(f"device: {name}  torch {torch.__version__}  cuda {torch.version.cuda}  "
          f"linfusion_ops {info.get('version')} archs {info.get('archs')}  commit {commit}")
    copy = copy_gbps(device)
    print(f"copy bandwidth: {copy:.1f} GB/s (read + write)")

    results = run_cases(load_case_modules(), device, args.max_seconds, copy)
    print_table(results)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    stem = f"{datetime.date.today().isoformat()}_{commit}_{gpu}"
    report = {"commit": commit, "device": name, "torch": torch.__version__,
              "cuda": torch.version.cuda, "copy_gbps": round(copy, 1), "cases": results}
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    plot(results, copy, out_dir / f"{stem}.png", f"{name}, commit {commit}")
    print(f"wrote {json_path} and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
