"""Predicted kernel performance without a GPU: every op and kernel path run under the emulator's
profiler (linfusion_ops.emulated.profile, checked flavour) at emulation-sized shapes, its
counters fitted per launch as a N + b S + c (S: the launch's token splits per head, or its
blocks) and extrapolated to real sizes, then the roofline model of benchmarks/emu_profile.py.

    python benchmarks/bench_emu_profile.py [--quick | --dims D ...] [--out benchmarks/results]

writes emu_profile.json and emu_profile.md (the table of benchmarks/README.md, "Emulator profile"). Each op runs at
two N on a 1-SM H100 profile (few, fixed splits: the per-token growth, shown per token in the
"linearity" rows) and at the larger N on the 132-SM profile (the splits the launcher picks on an
H100: the per-split cost). Everything it prints about time is *predicted*.
"""

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import emu_profile as ep  # noqa: E402
from linfusion_ops import emulated  # noqa: E402

TARGET_N = (16384, 65536, 1 << 20)
TARGET_B, TARGET_H = 2, 8  # B * H = 16: SD 1.5 at 1024^2 and above (the example shape of docs/performance.md)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ELEM = {"fp16": 2, "bf16": 2, "fp32": 4}


def tc_dim(d):
    return next(p for p in (48, 64, 80, 128, 160) if p >= d)


def tc_tile(dp):
    return 64 if dp <= 80 else 32


def target_splits(kernel, n, bh, d, sms, resident_per_sm):
    """Blocks per head the launcher gives `kernel` at N = n (mirror of linear_attention.cu); the
    tensor-core kernels fill one wave at their residency (resident_per_sm blocks per SM)."""
    if "state_partial_tc" in kernel:
        return ep.split_count(n, bh, 64, sms, resident_per_sm=resident_per_sm)
    if "_tc_kernel" in kernel:
        dp = tc_dim(d)
        return ep.split_count(n, bh, tc_tile(dp), sms, math.ceil(2 * dp / tc_tile(dp)), resident_per_sm)
    if "partial_generic" in kernel:
        tiles = math.ceil(d / outer_tile(d)) ** 2
        return ep.split_count(n, bh * tiles, 32, sms) * tiles
    if "generic_kernel" in kernel:  # per-token generic kernels: splits of whole 16-token tiles
        return ep.split_count(n, bh, 16, sms)
    raise KeyError(kernel)


def regressors(launches, bh):
    """S per launch: its blocks per head; a reduction uses its producer's."""
    out, previous = [], 1.0
    for r in launches:
        s = r["blocks"] / bh
        if "reduce_partials" in r["kernel"] or "column_sum" in r["kernel"]:
            s = previous
        out.append(s)
        previous = s
    return out


COUNTERS = ("dram_bytes", "mma", "blocks", "gld_bytes", "gld_sectors", "gst_bytes", "gst_sectors",
            "sld_wave", "sld_ideal", "sst_wave", "sst_ideal")


def flat(r):
    return {"dram_bytes": r["dram_bytes"], "mma": r["mma"], "blocks": r["blocks"],
            "gld_bytes": r["global_load"]["distinct_bytes"], "gld_sectors": r["global_load"]["sectors"],
            "gst_bytes": r["global_store"]["distinct_bytes"], "gst_sectors": r["global_store"]["sectors"],
            "sld_wave": r["shared_load"]["wavefronts"], "sld_ideal": r["shared_load"]["ideal_wavefronts"],
            "sst_wave": r["shared_store"]["wavefronts"], "sst_ideal": r["shared_store"]["ideal_wavefronts"]}


def fit(runs, bh):
    """runs: [(n, launches)] of one pass; per launch and counter, least-squares a, b, c of
    counter = a n + b S + c."""
    names = [r["kernel"] for r in runs[0][1]]
    for _, launches in runs:
        assert [r["kernel"] for r in launches] == names, "the runs launched different kernels"
    rows = []
    for i, name in enumerate(names):
        design = np.array([[n, regressors(l, bh)[i], 1.0] for n, l in runs])
        coef = {}
        for key in COUNTERS:
            y = np.array([flat(l[i])[key] for _, l in runs], dtype=float)
            coef[key] = np.linalg.lstsq(design, y, rcond=None)[0].tolist()
        rows.append({"kernel": name, "coef": coef, "threads": int(np.prod(runs[0][1][i]["block"])),
                     "smem": runs[0][1][i]["dynamic_smem"] + runs[0][1][i]["static_smem"]})
    return rows


def outer_tile(d):
    """Tile width 16 M of the generic outer products of a D x D matrix (mirror of outer_micro in
    csrc/cuda/linear_attention_kernels.cuh): the M in 5, 4, 3 that pads D the least, ties to the
    larger."""
    return min((16 * m for m in (5, 4, 3)), key=lambda t: (math.ceil(d / t) * t, -t))


def analytic_fp32_flops(kernel, n, bh, d):
    """FLOPs the SIMT (generic) kernels execute, which the emulator does not count: 2 per
    multiply-add. Their outer products (the split partials, and the apply backward's dS when it
    sums them itself: template argument true) run every multiply-add of whole tiles
    (outer_tile), zeros past D included (D = 40: 48^2 per token); the per-token matrix products
    (phi(q) S, S do, dS v, dS^T phi(k)) run D^2 exactly."""
    tile = outer_tile(d)
    padded = tile * math.ceil(d / tile)
    outer, exact = 2 * n * bh * padded * padded, 2 * n * bh * d * d
    if "partial_generic_kernel" in kernel:
        return outer
    if "apply_backward_generic_kernel" in kernel:
        return exact + (outer if kernel.endswith(", true>") else 0)
    if "state_backward_generic_kernel" in kernel:
        return 2 * exact
    if "apply_generic_kernel" in kernel:
        return exact
    return 0


def predict(fitted, n, scale, target_s, d, device, usage, grid_stride=False):
    """Counters and predicted time of each launch at size n; target_s(kernel, n, resident blocks
    per SM) gives the launch's S there (None: the fit has no S term), scale multiplies per-head
    counters.
    grid_stride: the launches are grid-stride kernels whose launcher caps the grid at the
    resident blocks (ep.grid_stride_blocks), so the fitted block count is capped there too."""
    out, previous = [], 1.0
    for row in fitted:
        k = row["kernel"]
        regs = usage.get(k, {}).get("registers")
        occ = ep.occupancy(device, row["threads"], regs, row["smem"])
        s = previous if ("reduce_partials" in k or "column_sum" in k) else target_s(k, n, occ["blocks_per_sm"])
        previous = s
        values = {key: max(0.0, scale * (a * n + b * (s or 0.0) + c)) for key, (a, b, c) in row["coef"].items()}
        blocks = max(values["blocks"], 1)
        if grid_stride:
            blocks = ep.grid_stride_blocks(device, blocks, row["threads"], regs, row["smem"])
        roof = ep.roofline(device, values["dram_bytes"], values["mma"] * emulated.MMA_FLOPS,
                           scale * analytic_fp32_flops(k, n, 1, d), blocks, occ["blocks_per_sm"],
                           values["sld_wave"] + values["sst_wave"])
        out.append({"kernel": k, "blocks": blocks, "registers": regs, **occ, **roof,
                    "counters": {key: v for key, v in values.items() if key != "blocks"},
                    "dram_bytes": values["dram_bytes"]})
    return out


def extrapolated_ratios(launch_pred):
    """Load / store efficiency and shared conflict ways of a pass from extrapolated counters."""
    tot = {}
    for x in launch_pred:
        for key, v in x["counters"].items():
            tot[key] = tot.get(key, 0.0) + v
    ratio = lambda a, b: a / b if b else 1.0  # noqa: E731
    return {"global_load_efficiency": ratio(tot["gld_bytes"], 32 * tot["gld_sectors"]),
            "global_store_efficiency": ratio(tot["gst_bytes"], 32 * tot["gst_sectors"]),
            "shared_load_conflict_ways": ratio(tot["sld_wave"], tot["sld_ideal"]),
            "shared_store_conflict_ways": ratio(tot["sst_wave"], tot["sst_ideal"])}


def measure_op(op, dtype_name, d, ns, bh_emulated):
    """Profiles fwd and bwd at each (n, sms) of ns (sms 0: the profile's 132); returns
    {pass: [(n, launches)]}."""
    passes = {"fwd": [], "bwd": []}
    for n, sms in ns:
        with emulated.settings(device="H100", multiprocessor_count=sms or None):
            if op == "linear_attention":
                res = ep.run_linear_attention(DTYPES[dtype_name], d, n, heads=bh_emulated)
            elif op == "layer_norm":
                res = ep.run_layer_norm(DTYPES[dtype_name], d, n)
            else:
                res = ep.run_merge(DTYPES[dtype_name], n, channels=d)
        for p in passes:
            passes[p].append((n, res[p]))
    return passes


def min_bytes(op, pass_, n, bh, d, elem):
    if op == "linear_attention":
        return ep.linear_attention_min_bytes(pass_, 1, n, bh, d, elem)
    if op == "layer_norm":
        return ep.layer_norm_min_bytes(pass_, n, d, elem)
    prompts, length = 2, 77
    tokens = length * math.ceil(n / prompts) * prompts
    return ep.merge_min_bytes(pass_, 61 * n, tokens, length * n, d, elem)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one head dim per path (a smoke run)")
    parser.add_argument("--dims", type=int, nargs="+", help="linear attention head dims (default 40 64 80 160)")
    parser.add_argument("--out", default=str(ep.RESULTS))
    args = parser.parse_args()
    if not emulated.available("checked"):
        raise SystemExit("bench_emu_profile: needs the checked emulation flavour (LINFUSION_OPS_CUDA_EMU=checked)")
    start = time.time()
    dims = tuple(args.dims) if args.dims else (64,) if args.quick else (40, 64, 80, 160)
    cases = []
    for dt in ("fp16", "bf16", "fp32"):
        for d in dims:
            small = (128, 256) if dt == "fp32" else (512, 1024)
            heads = 1 if dt == "fp32" else 2
            cases.append(("linear_attention", "tensor-core" if dt != "fp32" else "generic", dt, d, heads,
                          [(small[0], 1), (small[1], 1), (small[1], 0)]))
    # LayerNorm at the widths LinFusion's kernel MLPs use: dim_n = 320, 640, 1280 (SD 1.5 / 2.1 /
    # XL), and dim_n // 16 = 40, 80 (LinFusion-XL's mid width); bf16 runs the fp16 kernels' layout.
    ln_rows = {40: 1024, 80: 1024, 320: 1024, 640: 512, 1280: 256}
    for c, r in ln_rows.items():
        for dt in ("fp16", "bf16", "fp32") if c == 320 else ("fp16", "fp32"):
            cases.append(("layer_norm", "fast", dt, c, 1, [(r, 1), (2 * r, 1), (2 * r, 0)]))
    cases.append(("layer_norm", "generic", "fp32", 330, 1, [(256, 1), (512, 1), (512, 0)]))
    # merge at the text encoders' widths: 768 (SD 1.5), 1024 (SD 2.1), 768 + 1280 (SD XL's two).
    for dt, c in (("fp16", 768), ("fp16", 1024), ("fp16", 2048), ("fp32", 768)):
        cases.append(("merge_segments", "copy", dt, c, 1, [(4, 0), (8, 0)]))

    measured_cases = []
    for op, path, dt, d, bh_e, ns in cases:
        t0 = time.time()
        passes = measure_op(op, dt, d, ns, bh_e)
        measured_cases.append((op, path, dt, d, bh_e, ns, passes, time.time() - t0))
        print(f"{op} {path} {dt} D={d}: {measured_cases[-1][-1]:.0f} s", flush=True)

    # Read after the (long) emulation, so that a resource_usage.py run that ends meanwhile counts.
    usage = {dev: ep.load_resource_usage(ep.DEVICES[dev]["arch"]) for dev in ep.DEVICES}
    results = []
    for op, path, dt, d, bh_e, ns, passes, seconds in measured_cases:
        elem = ELEM[dt]
        entry = {"op": op, "path": path, "dtype": dt, "dim": d, "emulated": {"heads": bh_e, "runs": ns},
                 "passes": {}}
        for p, runs in passes.items():
            n_last, launches = runs[-1]
            s = ep.summarize(launches)
            measured = {k: v for k, v in s.items()}
            measured["dram_over_min"] = s["dram_bytes"] / min_bytes(op, p, n_last, bh_e, d, elem)
            measured["worst_sites"] = ep.worst_sites(launches)
            # Per-token growth on the 1-SM profile (fixed splits): equal when the counters are linear.
            if op != "merge_segments":
                (n0, l0), (n1, l1) = runs[0], runs[1]
                measured["bytes_per_token"] = [ep.summarize(l0)["dram_bytes"] / n0, ep.summarize(l1)["dram_bytes"] / n1]
                fitted = fit(runs, bh_e)
            else:
                fitted = fit_rows(runs)
            pred = {}
            targets = TARGET_N if op != "merge_segments" else (16, 64, 256)
            for dev in ("H100", "H200", "A100"):
                sms = ep.DEVICES[dev]["sms"]
                for n in targets:
                    if op == "linear_attention":
                        bh = TARGET_B * TARGET_H
                        launch_pred = predict(fitted, n, bh / bh_e,
                                              lambda k, nn, resident: target_splits(k, nn, bh, d, sms, resident), d, dev, usage[dev])
                        mb = ep.linear_attention_min_bytes(p, TARGET_B, n, TARGET_H, d, elem)
                    elif op == "layer_norm":
                        rows = TARGET_B * n
                        n_full, l_full = runs[-1]
                        per_block = {r["kernel"]: n_full / r["blocks"] for r in l_full}
                        # grid-stride kernels: enough blocks for the rows, at most those resident
                        shape = {row["kernel"]: (row["threads"], row["smem"]) for row in fitted}
                        launch_pred = predict(fitted, rows, 1.0,
                                              lambda k, nn, _resident: ep.grid_stride_blocks(
                                                  dev, math.ceil(nn / per_block[k]), shape[k][0],
                                                  usage[dev].get(k, {}).get("registers"), shape[k][1]),
                                              d, dev, usage[dev], grid_stride=True)
                        mb = min_bytes(op, p, rows, 1, d, elem)
                    else:
                        launch_pred = predict(fitted, n, 1.0, lambda k, nn, _resident: None, d, dev, usage[dev],
                                              grid_stride=True)
                        mb = min_bytes(op, p, n, 1, d, elem)
                    seconds = sum(x["seconds"] for x in launch_pred)
                    serial = sum(x["serial_s"] for x in launch_pred)
                    floor = mb / ep.DEVICES[dev]["dram_bytes_per_s"]
                    pred[f"{dev}@{n}"] = {
                        "seconds": seconds, "floor_seconds": floor, "over_floor": seconds / floor,
                        "serial_seconds": serial, "serial_over_floor": serial / floor,
                        "dram_over_min": sum(x["dram_bytes"] for x in launch_pred) / mb,
                        **extrapolated_ratios(launch_pred), "launches": launch_pred}
            occ = {dev: min(ep.occupancy(dev, row["threads"], usage[dev].get(row["kernel"], {}).get("registers"),
                                         row["smem"])["occupancy"] for row in fitted) for dev in ep.DEVICES}
            entry["passes"][p] = {"measured": measured, "occupancy_min": occ, "predicted": pred}
        entry["seconds_emulated"] = seconds
        results.append(entry)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {"what": "predicted (emulator counters + roofline model), not measured on a GPU",
           "commit": commit, "torch": torch.__version__, "host": platform.processor() or platform.machine(),
           "target_shape": {"B": TARGET_B, "H": TARGET_H, "N": list(TARGET_N)},
           "devices": ep.DEVICES, "wave_floor_s": ep.WAVE_FLOOR_S, "seconds": time.time() - start,
           "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "emu_profile.json").write_text(json.dumps(doc, indent=1) + "\n")
    table = render(doc)
    (out / "emu_profile.md").write_text(table)
    print(table)
    print(f"bench_emu_profile: {time.time() - start:.0f} s, wrote {out / 'emu_profile.json'}")


def fit_rows(runs):
    """LN and merge: counters per launch = a n + c (n: rows, or segments), blocks included."""
    names = [r["kernel"] for r in runs[0][1]]
    rows = []
    for i, name in enumerate(names):
        design = np.array([[n, 0.0, 1.0] for n, _ in runs])
        coef = {}
        for key in COUNTERS:
            y = np.array([flat(l[i])[key] for _, l in runs], dtype=float)
            a, _, c = np.linalg.lstsq(design, y, rcond=None)[0].tolist()
            coef[key] = [a, 0.0, c]
        rows.append({"kernel": name, "coef": coef, "threads": int(np.prod(runs[0][1][i]["block"])),
                     "smem": runs[0][1][i]["dynamic_smem"] + runs[0][1][i]["static_smem"]})
    return rows


def both(entry, big):
    """(t_fwd + t_bwd) / (floor_fwd + floor_bwd) on the H100 at the big size."""
    fwd, bwd = (entry["passes"][p]["predicted"]["H100@" + big] for p in ("fwd", "bwd"))
    return f"{(fwd['seconds'] + bwd['seconds']) / (fwd['floor_seconds'] + bwd['floor_seconds']):.2f}"


def render(doc):
    lines = ["| op | path | dtype | D | pass | sectors/req ld, st | ld eff (64K) | st eff (64K) | smem ways ld, st (64K) | "
             "DRAM ÷ min (emu N) | DRAM ÷ min (64K) | occupancy H100 | H100 64K (pred.) | ÷ floor 16K, 64K, 1M | "
             "fwd+bwd ÷ floor 64K | serial ÷ floor 64K | A100 64K ÷ floor |",
             "|" + "---|" * 17]
    for e in doc["results"]:
        big = "64" if e["op"] == "merge_segments" else "65536"
        keys = ("16", "64", "256") if e["op"] == "merge_segments" else ("16384", "65536", "1048576")
        for p, r in e["passes"].items():
            m = r["measured"]
            pr = r["predicted"]
            x = pr["H100@" + big]
            lines.append(
                f"| {e['op']} | {e['path']} | {e['dtype']} | {e['dim']} | {p} | "
                f"{m['global_load_sectors_per_request']:.1f}, {m['global_store_sectors_per_request']:.1f} | "
                f"{100 * m['global_load_efficiency']:.0f}% ({100 * x['global_load_efficiency']:.0f}%) | "
                f"{100 * m['global_store_efficiency']:.0f}% ({100 * x['global_store_efficiency']:.0f}%) | "
                f"{m['shared_load_conflict_ways']:.2f}, {m['shared_store_conflict_ways']:.2f} "
                f"({x['shared_load_conflict_ways']:.2f}, {x['shared_store_conflict_ways']:.2f}) | "
                f"{m['dram_over_min']:.2f} | {pr['H100@' + big]['dram_over_min']:.2f} | "
                f"{r['occupancy_min']['H100']:.2f} | {1e3 * pr['H100@' + big]['seconds']:.3f} ms | "
                + ", ".join(f"{pr['H100@' + k]['over_floor']:.2f}" for k in keys)
                + f" | {both(e, big)} | {x.get('serial_over_floor', float('nan')):.2f}"
                f" | {pr['A100@' + big]['over_floor']:.2f} |")
    lines.append("")
    lines.append("Measured by the emulator at the largest emulated size (in brackets: extrapolated to the 64K "
                 "size). Linear attention at B = 2, H = 8; LayerNorm at 2 N rows of C channels; merge at "
                 "16 / 64 / 256 segments. Times are predicted lower bounds (benchmarks/emu_profile.py), never measured; "
                 "'serial' adds the DRAM, shared-memory and math terms instead of overlapping them.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
