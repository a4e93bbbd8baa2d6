"""The main benchmark: linear attention at Stable Diffusion shapes, forward and forward+backward,
for linfusion_ops, the official LinFusion formula in PyTorch, and softmax attention (SDPA).

    python benchmarks/bench.py                 # current device: CUDA when present, else CPU
    python benchmarks/bench.py --device cpu --dtype float32 --out benchmarks/out

Prints a table (median time, speedup over the reference, peak memory), and writes
<out>/bench_<device>.json and a log-log plot of time against N, <out>/bench_<device>.png.
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import linfusion_ops  # noqa: E402
from linfusion_ops import reference  # noqa: E402
from benchmarks.common import git_commit, peak_memory_mb, time_ms  # noqa: E402

BATCH = 2
TOKENS = (4096, 16384, 65536)
HEAD_SHAPES = ((8, 40), (10, 64))  # (H, D): SD 1.5's first block, SD 2.1 / XL-like
SDPA_LIMIT_S = 60.0


def sdpa(q, k, v, heads):
    """Softmax attention as diffusers' AttnProcessor2_0 runs it (head transposes included)."""
    b, n, c = q.shape
    split = lambda x: x.view(b, -1, heads, c // heads).transpose(1, 2)  # noqa: E731
    o = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return o.transpose(1, 2).reshape(b, n, c)


IMPLS = {
    "linfusion_ops": lambda q, k, v, h: linfusion_ops.linear_attention(q, k, v, h),
    "reference": reference.official_linear_attention,
    "sdpa": sdpa,
}


def make_step(impl, q, k, v, heads, backward):
    fn = IMPLS[impl]
    if not backward:
        def step():
            with torch.no_grad():
                return fn(q, k, v, heads)
        return step
    grad = torch.randn_like(q)

    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v, heads).backward(grad)
    return step


def run(args):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    info = linfusion_ops.build_info()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    header = {
        "commit": git_commit(),
        "device": device_name,
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "linfusion_ops": info,
        "dtype": args.dtype,
        "batch": BATCH,
    }
    print(f"device: {device_name} ({device.type}, {torch.get_num_threads()} threads)  torch {torch.__version__}  "
          f"linfusion_ops {linfusion_ops.__version__} compiled={info.get('compiled')} cuda={info.get('cuda')}  dtype {args.dtype}")
    if not info.get("compiled"):
        print("warning: linfusion_ops._C is not built; 'linfusion_ops' rows run the reference code")

    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is a nicety, not a requirement
        tqdm = None
    plan = [(h, d, n, p, impl) for h, d in HEAD_SHAPES for n in args.tokens
            for p in ("fwd", "fwd+bwd") for impl in IMPLS]
    bar = tqdm(plan, desc="bench", unit="case", file=sys.stdout) if tqdm else plan
    results = []
    sdpa_estimate = {}  # (h, d, pass) -> (N, seconds) of the last measured SDPA run
    for heads, dim, n, pass_, impl in bar:
        case = {"op": "linear_attention", "pass": pass_, "impl": impl, "B": BATCH, "N": n, "H": heads,
                "D": dim, "dtype": args.dtype}
        if impl == "sdpa" and (heads, dim, pass_) in sdpa_estimate:
            n0, s0 = sdpa_estimate[(heads, dim, pass_)]
            predicted = s0 * (n / n0) ** 2
            if predicted > SDPA_LIMIT_S:
                results.append({**case, "ms": None, "skipped": f"predicted {predicted:.0f} s > {SDPA_LIMIT_S:.0f} s"})
                continue
        gen = torch.Generator(device="cpu").manual_seed(0)
        qkv = [torch.randn(BATCH, n, heads * dim, generator=gen).to(device=device, dtype=dtype)
               .requires_grad_(pass_ == "fwd+bwd") for _ in range(3)]
        step = make_step(impl, *qkv, heads, pass_ == "fwd+bwd")
        peak = peak_memory_mb(step, device)  # doubles as the warm-up run
        ms = time_ms(step, device, warmup=0, repeat=args.repeat, max_seconds=args.max_seconds)
        if impl == "sdpa":
            sdpa_estimate[(heads, dim, pass_)] = (n, ms / 1e3)
        results.append({**case, "ms": ms, "peak_mb": peak})
        del qkv, step

    for r in results:
        base = next(x for x in results if x["impl"] == "reference" and all(
            x[k] == r[k] for k in ("pass", "N", "H", "D")))
        r["speedup_vs_reference"] = base["ms"] / r["ms"] if r.get("ms") else None

    print_table(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps({**header, "cases": results}, indent=2))
    plotted = plot(results, stem.with_suffix(".png"), header)
    print(f"wrote {stem.with_suffix('.json')}" + (f" and {stem.with_suffix('.png')}" if plotted else ""))
    return results


def print_table(results):
    print(f"\n{'pass':8} {'H x D':7} {'N':>8} {'impl':14} {'ms':>10} {'speedup':>8} {'peak MiB':>9}")
    for r in results:
        hd = f"{r['H']}x{r['D']}"
        if r.get("ms") is None:
            print(f"{r['pass']:8} {hd:7} {r['N']:>8} {r['impl']:14} {'skipped':>10}  ({r['skipped']})")
            continue
        print(f"{r['pass']:8} {hd:7} {r['N']:>8} {r['impl']:14} {r['ms']:>10.2f} "
              f"{r['speedup_vs_reference']:>7.2f}x {r['peak_mb']:>9.1f}")


def plot(results, path, header):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    panels = [(p, h, d) for p in ("fwd", "fwd+bwd") for h, d in HEAD_SHAPES]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), sharey=True)
    for ax, (p, h, d) in zip(axes, panels):
        for impl, style in zip(IMPLS, ("o-", "s--", "^:")):
            pts = [(r["N"], r["ms"]) for r in results
                   if r["impl"] == impl and r["pass"] == p and r["H"] == h and r["D"] == d and r.get("ms")]
            if pts:
                ax.plot(*zip(*pts), style, label=impl)
        ax.set(xscale="log", yscale="log", title=f"{p}, H={h}, D={d}", xlabel="tokens N")
        tokens = sorted({r["N"] for r in results})
        ax.set_xticks(tokens, [f"{n // 1024}K" if n >= 1024 else str(n) for n in tokens])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median time (ms)")
    axes[0].legend()
    fig.suptitle(f"linear attention, B={BATCH}, {header['dtype']}, {header['device']} ({header['device_type']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=10.0, help="time budget per case")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.device(args.device).type == "cuda" else "float32"
    run(args)


if __name__ == "__main__":
    main()
