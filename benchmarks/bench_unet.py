"""One UNet forward at increasing resolution: LinFusion against diffusers' default attention.

The UNet is SD 1.5-shaped (UNet2DConditionModel with SD 1.5's config: 320/640/1280/1280
channels, 8 heads, cross-attention width 768) with random weights, nothing downloaded. Both
runs use the same UNet: "softmax" is diffusers' AttnProcessor2_0 (scaled_dot_product_attention)
in every attention module; "LinFusion" mounts LinFusion (random kernel MLPs, projections
copied from the UNet) on the self-attention modules, which then run
linfusion_ops.linear_attention and linfusion_ops.layer_norm_leaky_relu; cross-attention stays
softmax (77 text tokens). Latent tokens at the first level: (res / 8)^2.

Two measurements per resolution, in the same process: one UNet forward (inference mode, batch
--batch, 77 text tokens), and its highest-resolution self-attention layer alone
(down_blocks.0...attn1: 320 channels, 8 heads of 40, (res / 8)^2 tokens), which shows the
attention's own cost where the convolutions dominate the forward. For each: the median time of
--repeat (UNet) or --layer-repeat (layer) runs, in wall time and in the process's CPU time (the
fair measure on a CPU shared with other jobs), after one run that measures the peak memory
allocated beyond the weights and inputs (benchmarks.common), and the softmax / LinFusion
ratios. --layer-only skips the UNet forward, to reach higher resolutions. Writes
benchmarks/out/unet_<device>[_layer].json and a plot unet_<device>[_layer].png.

    python benchmarks/bench_unet.py --device cpu --resolutions 256 384 512
    python benchmarks/bench_unet.py --device cpu --layer-only --resolutions 768 1024
    python benchmarks/bench_unet.py --device cuda --dtype float16 --resolutions 512 1024 2048 4096
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import peak_memory_mb, time_ms  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
# SD 1.5's UNet config; everything else is UNet2DConditionModel's default (= SD 1.5).
SD15_CONFIG = dict(sample_size=64, cross_attention_dim=768)
TEXT_TOKENS = 77


def build_unet(device, dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_CONFIG).eval()
    # nn.Module.to: ModelMixin.to warns about fp32-kept modules even when there are none.
    return torch.nn.Module.to(unet, device=device, dtype=dtype)


def forward_fn(unet, res, batch, device, dtype):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, res // 8, res // 8, generator=g).to(device=device, dtype=dtype)
    text = torch.randn(batch, TEXT_TOKENS, 768, generator=g).to(device=device, dtype=dtype)
    timestep = torch.tensor([500] * batch, device=device)

    def run():
        with torch.inference_mode():
            return unet(sample, timestep, text).sample

    return run


def layer_fn(attn, res, batch, device, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, (res // 8) ** 2, attn.to_q.in_features, generator=g).to(
        device=device, dtype=dtype
    )

    def run():
        with torch.inference_mode():
            return attn(x)

    return run


def measure(fn, repeat, args):
    """(median wall ms, median process CPU ms, peak MiB) of fn(). The memory run goes first: it
    is also the warm-up. The CPU time of the process (all its threads) is what the work costs
    on a CPU shared with other jobs, where wall time mostly measures the contention."""
    mb = peak_memory_mb(fn, args.device)
    cpu_ms = []

    def timed():
        start = time.process_time()
        fn()
        cpu_ms.append((time.process_time() - start) * 1e3)

    ms = time_ms(timed, args.device, warmup=args.warmup, repeat=repeat, max_seconds=args.max_seconds)
    return ms, statistics.median(cpu_ms[args.warmup :]), mb


def measure_both(make_fn, repeat, linfusion, unet, args):
    """{softmax,linfusion}_{ms,cpu_ms,peak_mb} and the softmax / LinFusion ratios."""
    softmax = measure(make_fn(), repeat, args)
    linfusion.mount_to(unet=unet)
    try:
        lin = measure(make_fn(), repeat, args)
    finally:
        linfusion.unmount(unet=unet)
    return {
        "softmax_ms": softmax[0],
        "linfusion_ms": lin[0],
        "speedup": softmax[0] / lin[0],
        "softmax_cpu_ms": softmax[1],
        "linfusion_cpu_ms": lin[1],
        "cpu_time_speedup": softmax[1] / lin[1],
        "softmax_peak_mb": softmax[2],
        "linfusion_peak_mb": lin[2],
        "memory_ratio": softmax[2] / lin[2],
    }


def plot(rows, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = [r["resolution"] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for part, style in (("unet", "-"), ("layer", "--")):
        if rows[0][part] is None:
            continue
        for key, label, color in (
            ("softmax", "diffusers AttnProcessor2_0", "C0"),
            ("linfusion", "LinFusion", "C1"),
        ):
            name = f"{label}, {'UNet forward' if part == 'unet' else 'first attn1 layer'}"
            ax_t.plot(
                res, [r[part][f"{key}_ms"] for r in rows], style, marker="o", color=color, label=name
            )
            ax_m.plot(
                res,
                [r[part][f"{key}_peak_mb"] for r in rows],
                style,
                marker="o",
                color=color,
                label=name,
            )
    ax_t.set(xlabel="resolution (px)", ylabel="time (ms)", yscale="log", xticks=res)
    ax_m.set(
        xlabel="resolution (px)",
        ylabel="peak memory beyond weights and inputs (MiB)",
        yscale="log",
        xticks=res,
    )
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"SD 1.5 UNet, batch {meta['batch']}, {meta['dtype']}, {meta['device_name']}"
        + ("" if meta["device"] != "cpu" else f", {meta['cpu_threads']} thread(s)")
        + ("" if meta["compiled"] else " (linfusion_ops reference fallback)"),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="default: float16 on CUDA, float32 on CPU",
    )
    parser.add_argument(
        "--resolutions",
        type=int,
        nargs="+",
        default=None,
        help="image sizes in px (multiples of 64); default 256 384 512 on CPU, "
        "512 1024 2048 4096 on CUDA",
    )
    parser.add_argument("--batch", type=int, default=None, help="default 1 on CPU, 2 (CFG) on CUDA")
    parser.add_argument("--layer-only", action="store_true", help="skip the UNet forward")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed runs after the memory run")
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="timed UNet forwards (median); default 1 on CPU, 10 on CUDA",
    )
    parser.add_argument("--layer-repeat", type=int, default=10, help="timed layer runs (median)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=20.0,
        help="stop repeating a measurement after this many seconds (at least one run)",
    )
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    args.resolutions = args.resolutions or ([512, 1024, 2048, 4096] if cuda else [256, 384, 512])
    args.batch = args.batch or (2 if cuda else 1)
    args.repeat = args.repeat or (10 if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    for res in args.resolutions:
        if res % 64:
            parser.error(f"--resolutions: {res} is not a multiple of 64")

    import diffusers
    from diffusers.models.attention_processor import AttnProcessor2_0

    import linfusion_ops
    from linfusion_ops import LinFusion

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": (
            torch.cuda.get_device_name(args.device)
            if cuda
            else platform.processor() or platform.machine()
        ),
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(args.dtype).replace("torch.", ""),
        "batch": args.batch,
        "text_tokens": TEXT_TOKENS,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "linfusion_ops": linfusion_ops.__version__,
        "compiled": linfusion_ops.compiled(),
        "build_info": linfusion_ops.build_info(),
        "unet": "UNet2DConditionModel(SD 1.5 config, random weights)",
    }
    print(json.dumps(meta))
    if not meta["compiled"]:
        print("note: linfusion_ops._C is not built; LinFusion runs the pure-PyTorch reference ops")

    unet = build_unet(args.device, args.dtype)
    unet.set_attn_processor(AttnProcessor2_0())
    linfusion = LinFusion.construct_for(unet=unet, load_pretrained=False)
    linfusion.unmount(unet=unet)

    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    rows = []
    header = (
        f"{'res':>6} {'tokens':>6} {'part':>6} | {'softmax ms':>11} {'LinFusion ms':>12} {'speedup':>7}"
        f" | {'CPU-time speedup':>16} | {'softmax MiB':>11} {'LinFusion MiB':>13} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for res in args.resolutions:
        row = {"resolution": res, "latent_tokens": (res // 8) ** 2, "unet": None}
        if not args.layer_only:
            row["unet"] = measure_both(
                lambda: forward_fn(unet, res, args.batch, args.device, args.dtype),
                args.repeat,
                linfusion,
                unet,
                args,
            )
        row["layer"] = measure_both(
            lambda: layer_fn(attn, res, args.batch, args.device, args.dtype),
            args.layer_repeat,
            linfusion,
            unet,
            args,
        )
        rows.append(row)
        for part in ("unet", "layer"):
            m = row[part]
            if m is not None:
                print(
                    f"{res:>6} {row['latent_tokens']:>6} {part:>6}"
                    f" | {m['softmax_ms']:>11.1f} {m['linfusion_ms']:>12.1f} {m['speedup']:>6.2f}x"
                    f" | {m['cpu_time_speedup']:>15.2f}x"
                    f" | {m['softmax_peak_mb']:>11.1f} {m['linfusion_peak_mb']:>13.1f} {m['memory_ratio']:>5.2f}x",
                    flush=True,
                )

    os.makedirs(OUT_DIR, exist_ok=True)
    stem = os.path.join(
        OUT_DIR, f"unet_{torch.device(args.device).type}" + ("_layer" if args.layer_only else "")
    )
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    plot(rows, meta, stem + ".png")
    print(f"wrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
