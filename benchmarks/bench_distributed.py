"""Communication of sequence-parallel attention: linear attention's state all-reduce against the
all-gather of keys and values that softmax attention needs.

Per self-attention layer, with the image tokens split evenly over W ranks:

* linear attention (linfusion_ops.linfusion.distributed): one all-reduce of
  M = 4 * (B*H*D*(D+1) + B + 8) bytes (fp32 state, key sums, key counts and the 8-value rank
  check), whatever the resolution;
* softmax attention: every rank needs every key and value: an all-gather of
  G = 2 * B * N * C * e bytes in all (K and V, e = 2 bytes in fp16), each rank contributing G / W.

"Bytes sent per rank" uses the ring algorithms' volumes (NCCL's bus-bandwidth model):
2 * (W-1)/W * M for the all-reduce, (W-1)/W * G for the all-gather. Latent tokens are
(res/8)^2; the layer is each model's highest-resolution self-attention: SD 1.5 at the latent
resolution (C=320, 8 heads of 40), SD XL at half of it (C=640, 10 heads of 64). B = 2
(classifier-free guidance).

Measured: the median time of both collectives on gloo between W local CPU processes, for the
smaller resolutions (larger all-gathers would not fit the run's time budget); the reported time
is the slowest rank's median.

Writes benchmarks/out/distributed.json and distributed.png (log-log).

    python benchmarks/bench_distributed.py [--world 2] [--repeat 7]
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import time_ms  # noqa: E402

BATCH = 2
KV_BYTES = 2  # fp16 keys and values
RESOLUTIONS = [512, 1024, 2048, 4096, 8192, 16384]
# (channels, heads, downsampling of the latent) of each model's highest-resolution self-attention
MODELS = {"SD 1.5": (320, 8, 1), "SD XL": (640, 10, 2)}
# resolutions measured on gloo, per model (the all-gather grows with res^2)
MEASURED = {"SD 1.5": [512, 1024, 2048], "SD XL": [512, 1024, 2048, 4096]}
FINGERPRINT_VALUES = 8  # linfusion_ops.linfusion.distributed packs 4 digits as (d, d^2)


def tokens(model: str, res: int) -> int:
    return (res // 8 // MODELS[model][2]) ** 2


def state_bytes(model: str) -> int:
    """M: the all-reduced buffer of one linear-attention layer, in bytes."""
    channels, heads, _ = MODELS[model]
    d = channels // heads
    return 4 * (BATCH * heads * d * (d + 1) + BATCH + FINGERPRINT_VALUES)


def kv_bytes(model: str, res: int) -> int:
    """G: all the keys and values of one layer, in bytes."""
    return 2 * BATCH * tokens(model, res) * MODELS[model][0] * KV_BYTES


def analytic(world: int) -> list:
    rows = []
    for model in MODELS:
        for res in RESOLUTIONS:
            m, g = state_bytes(model), kv_bytes(model, res)
            rows.append({
                "model": model, "resolution": res, "tokens": tokens(model, res),
                "allreduce_buffer_bytes": m, "allgather_total_bytes": g,
                "allreduce_sent_per_rank_bytes": 2 * (world - 1) / world * m,
                "allgather_sent_per_rank_bytes": (world - 1) / world * g,
            })
    return rows


def worker(rank, world, store, repeat, result_path):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    jobs = [(model, "all_reduce", None) for model in MODELS]
    jobs += [(model, "all_gather", res) for model in MODELS for res in MEASURED[model]]
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(jobs, desc=f"gloo, {world} processes", unit="collective")
    results = []
    for model, kind, res in jobs:
        if kind == "all_reduce":
            buf = torch.zeros(state_bytes(model) // 4, dtype=torch.float32)

            def fn():
                dist.all_reduce(buf)
        else:
            channels = MODELS[model][0]
            local = tokens(model, res) // world
            mine = torch.zeros(BATCH, local, 2 * channels, dtype=torch.float16)
            gathered = [torch.empty_like(mine) for _ in range(world)]

            def fn():
                dist.all_gather(gathered, mine)
        dist.barrier()
        # A fixed number of repeats on every rank: a time limit could stop the ranks after
        # different counts and leave one waiting in a collective. The all-reduce is sub-ms and
        # noisy on a shared machine, so it gets 10x the repeats.
        n = repeat * 10 if kind == "all_reduce" else repeat
        ms = torch.tensor(time_ms(fn, "cpu", warmup=3, repeat=n, max_seconds=float("inf")))
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        results.append({"model": model, "collective": kind, "resolution": res, "ms": ms.item()})
        if progress is not None:
            progress.update()
    if progress is not None:
        progress.close()
        with open(result_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def plot(rows, measured, world, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_bytes, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for model, color in zip(MODELS, ("tab:blue", "tab:orange")):
        mine = [r for r in rows if r["model"] == model]
        res = [r["resolution"] for r in mine]
        ax_bytes.plot(res, [r["allgather_sent_per_rank_bytes"] for r in mine], "o-", color=color,
                      label=f"{model}: all-gather K, V (softmax)")
        ax_bytes.plot(res, [r["allreduce_sent_per_rank_bytes"] for r in mine], "s--", color=color,
                      label=f"{model}: all-reduce state (linear)")
        gathers = [m for m in measured if m["model"] == model and m["collective"] == "all_gather"]
        reduce_ms = next(m["ms"] for m in measured if m["model"] == model and m["collective"] == "all_reduce")
        ax_time.plot([m["resolution"] for m in gathers], [m["ms"] for m in gathers], "o-", color=color,
                     label=f"{model}: all-gather K, V")
        ax_time.plot(res, [reduce_ms] * len(res), "s--", color=color,
                     label=f"{model}: all-reduce state (same buffer at every res)")
    for ax in (ax_bytes, ax_time):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("image resolution (px per side)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax_bytes.set_ylabel(f"bytes sent per rank per layer (ring, W={world})")
    ax_bytes.set_title("communication per self-attention layer")
    ax_time.set_ylabel("ms (gloo, CPU, slowest rank's median)")
    ax_time.set_title(f"measured on gloo, {world} local processes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="number of local gloo processes")
    parser.add_argument(
        "--repeat", type=int, default=7, help="timed repeats per all-gather (10x for the all-reduce)"
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; gloo with {args.world} local processes; batch {BATCH}, "
          f"K/V in fp16, state in fp32")
    for model, (channels, heads, down) in MODELS.items():
        print(f"  {model}: C={channels}, H={heads}, D={channels // heads}, tokens=(res/{8 * down})^2, "
              f"all-reduced buffer {state_bytes(model)} bytes")

    rows = analytic(args.world)
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "measured.json")
        mp.spawn(worker, args=(args.world, os.path.join(tmp, "store"), args.repeat, result_path),
                 nprocs=args.world, join=True)
        with open(result_path) as f:
            measured = json.load(f)

    print(f"\n{'model':7} {'res':>6} {'tokens':>9} {'all-reduce B/rank':>18} {'all-gather B/rank':>18} "
          f"{'ratio':>9} {'all-reduce ms':>14} {'all-gather ms':>14}")
    times = {(m["model"], m["collective"], m["resolution"]): m["ms"] for m in measured}
    for r in rows:
        reduce_ms = times[(r["model"], "all_reduce", None)]
        gather_ms = times.get((r["model"], "all_gather", r["resolution"]))
        ratio = r["allgather_sent_per_rank_bytes"] / r["allreduce_sent_per_rank_bytes"]
        print(f"{r['model']:7} {r['resolution']:>6} {r['tokens']:>9} "
              f"{r['allreduce_sent_per_rank_bytes']:>18,.0f} {r['allgather_sent_per_rank_bytes']:>18,.0f} "
              f"{ratio:>9.1f} {reduce_ms:>14.3f} "
              f"{'-' if gather_ms is None else f'{gather_ms:.3f}':>14}")

    result = {
        "device": "cpu", "backend": "gloo", "world": args.world, "torch": torch.__version__,
        "batch": BATCH, "kv_bytes_per_element": KV_BYTES,
        "models": {
            m: {"channels": c, "heads": h, "latent_downsampling": d} for m, (c, h, d) in MODELS.items()
        },
        "analytic": rows, "measured": measured,
    }
    json_path = os.path.join(args.out, "distributed.json")
    png_path = os.path.join(args.out, "distributed.png")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, measured, args.world, png_path)
    print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
