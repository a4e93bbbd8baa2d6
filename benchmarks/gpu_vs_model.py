"""On a GPU: measured times of the ops next to the emulator model's predictions (calibration of
benchmarks/emu_profile.py; run by benchmarks/gpu_check.sh).

    python benchmarks/gpu_vs_model.py [--out DIR] [--ncu]
    python benchmarks/gpu_vs_model.py --analyse results/gpu_vs_model_<gpu>.json   (no GPU needed)

For each op, dtype, head dim and pass that benchmarks/results/emu_profile.json predicts at
N = 64K (linear attention at B = 2, H = 8; LayerNorm at 2 N rows; merge at 64 segments), it
times the same pass on the GPU (CUDA events, median) and writes gpu_vs_model_<gpu>.json:

    {"device", "torch", "commit", "model_device", "cases": [{"op", "path", "dtype", "dim",
     "pass", "measured_ms", "predicted_ms", "measured_over_predicted", "floor_ms"}],
     "ncu": {case: [{"id", "kernel", "grid", "block", "metrics", "summary"}]}}
                                      (with --ncu and Nsight Compute's ncu on PATH)

The model device is the H200 profile when the GPU's name says H200 and the model has it, H100 for
an H100 (or an H200 against an older model), the A100 one otherwise. A ratio near 1 means the
roofline bound is tight; well above 1, the model misses what it cannot see (L2 misses, latency
not hidden, clocks).

--analyse re-predicts a recorded run with the current model (benchmarks/emu_profile.py) for the
device it ran on, from the per-launch counters that bench_emu_profile.py extrapolated to the 64K
size for the kernels that run measured (matched_model_path), and sets the emulator's counters beside ncu's per kernel (DRAM bytes, shared-memory
wavefronts, time against the bound and the serial estimate); it writes
gpu_vs_model_<gpu>_analysis.json into --out and prints the tables of benchmarks/README.md.
"""

import argparse
import csv
import io
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import linfusion_ops  # noqa: E402
from benchmarks import emu_profile as ep  # noqa: E402
from benchmarks.common import git_commit, time_ms  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NCU_METRICS = ",".join([
    "gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum", "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum", "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum", "smsp__inst_executed_op_shared_ld.sum",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum", "smsp__inst_executed_op_shared_st.sum",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
])
# Asked for too, where this ncu knows them: ldmatrix (WMMA's shared loads) is counted apart from
# ld.shared, so wavefronts per ld.shared instruction alone overstate conflicts in the TC kernels.
NCU_EXTRA_METRICS = ",".join([
    "smsp__inst_executed_op_ldsm.sum", "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ldsm.sum",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum",
])
# ncu --csv's columns, for output whose header line was cut off.
NCU_COLUMNS = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream",
               "Block Size", "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit",
               "Metric Value"]


def parse_ncu_csv(text: str) -> list:
    """ncu --csv output -> [{"id", "kernel", "grid", "block", "metrics": {name: value}}], one entry
    per profiled launch in launch order. Lines that are not whole CSV rows (a cut-off first line,
    ncu's own ==PROF== messages) are skipped; a missing header means ncu's default columns."""
    rows = list(csv.reader(io.StringIO(text)))
    columns = NCU_COLUMNS
    launches = {}
    for row in rows:
        if row and row[0] == "ID":
            columns = row
            continue
        if len(row) != len(columns):
            continue
        r = dict(zip(columns, row))
        try:
            value = float(r["Metric Value"].replace(",", ""))
        except ValueError:
            continue
        kernel = r["Kernel Name"].removeprefix("void ").split("(")[0]
        entry = launches.setdefault(r["ID"], {"id": int(r["ID"]), "kernel": kernel, "grid": r["Grid Size"],
                                             "block": r["Block Size"], "metrics": {}})
        entry["metrics"][r["Metric Name"]] = value
    return sorted(launches.values(), key=lambda e: e["id"])


def ncu_summary(metrics: dict) -> dict:
    """Derived figures of one launch: time, DRAM GB/s, sectors per global request, warps active."""
    m = metrics
    seconds = m.get("gpu__time_duration.sum", 0.0) * 1e-9
    dram = m.get("dram__bytes_read.sum", 0.0) + m.get("dram__bytes_write.sum", 0.0)
    ratio = lambda a, b: round(m[a] / m[b], 3) if m.get(b) else None  # noqa: E731
    return {"us": round(seconds * 1e6, 2), "dram_mb": round(dram / 1e6, 3),
            "dram_gbps": round(dram / seconds / 1e9, 1) if seconds else None,
            "load_sectors_per_request": ratio("l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
                                              "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum"),
            "store_sectors_per_request": ratio("l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum",
                                               "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum"),
            "warps_active_pct": m.get("sm__warps_active.avg.pct_of_peak_sustained_active"),
            "stalls_per_issue": {name.split("stalled_")[1].split("_per_issue")[0]: round(v, 3)
                                 for name, v in sorted(m.items(), key=lambda kv: -kv[1])
                                 if name.startswith("smsp__average_warps_issue_stalled_")}}


# Warp stall reasons (ncu's WarpStateStats section reads these: warps stalled on each reason per
# issued instruction; long scoreboard = global loads, barrier, mio throttle / short scoreboard =
# shared memory, math pipe throttle, wait = fixed latency), asked for first: the H200 run showed
# the tensor-core kernels 2-3x slower than their DRAM and shared-memory times added, with 24 % of
# the warp slots active, and these are what tell latency from issue limits.
NCU_STALL_METRICS = ",".join(
    f"smsp__average_warps_issue_stalled_{reason}_per_issue_active.ratio"
    for reason in ("long_scoreboard", "barrier", "mio_throttle", "short_scoreboard", "math_pipe_throttle",
                   "wait", "lg_throttle", "not_selected", "selected", "dispatch_stall", "no_instruction"))


def run_ncu(case: str, timeout: float):
    """Our kernels' counters for one case: ncu with the stall reasons and the extra metrics, again
    without the stall reasons, then without the extra metrics, if this ncu does not know one.
    Clocks as found (--clock-control none: never lock a shared card's)."""
    last = ""
    extra = NCU_METRICS + "," + NCU_EXTRA_METRICS
    attempts = (extra + "," + NCU_STALL_METRICS, extra, NCU_METRICS)
    for metrics in attempts:
        cmd = ["ncu", "--csv", "--clock-control", "none",
               "--kernel-name", "regex:linear_attention|layer_norm|merge_segments|column_sum",
               "--metrics", metrics, sys.executable, __file__, "--case", case]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        launches = parse_ncu_csv(run.stdout)
        if run.returncode == 0 and launches:
            for launch in launches:
                launch["summary"] = ncu_summary(launch["metrics"])
            return launches
        last = (run.stderr or run.stdout)[-2000:]
    return f"ncu failed: {last}"


def model_device_for(gpu_name: str, model_devices) -> str:
    """The model's device profile for a GPU: its own when the model has it, else the nearest."""
    if "H200" in gpu_name and "H200" in model_devices:
        return "H200"
    return "H100" if ("H100" in gpu_name or "H200" in gpu_name) else "A100"


def short_kernel(name: str) -> str:
    """'linfusion_ops::la_cuda::k<c10::Half, ...>' or ncu's 'k<__half, ...>' -> 'k'."""
    return name.split("<")[0].split("::")[-1]


def repredict(launch: dict, source: str, device: str) -> dict:
    """One launch of emu_profile.json (predicted for `source`) re-predicted for `device` with the
    current roofline: the same counters and grid (the devices share SM count and arch where this
    is used), that device's bandwidth, peaks and clock."""
    c = launch["counters"]
    fp32_flops = launch.get("fp32_s", 0.0) * ep.DEVICES[source]["fp32_flops"]
    return ep.roofline(device, launch["dram_bytes"], c["mma"] * ep.emulated.MMA_FLOPS, fp32_flops,
                       launch["blocks"], launch["blocks_per_sm"], c["sld_wave"] + c["sst_wave"])


def ncu_by_kernel(launches) -> dict:
    """{short kernel name: mean metrics over its profiled launches} (a case ran 3 times)."""
    groups = {}
    for launch in launches:
        groups.setdefault(short_kernel(launch["kernel"]), []).append(launch["metrics"])
    return {k: {m: sum(x.get(m, 0.0) for x in ms) / len(ms) for m in ms[0]} for k, ms in groups.items()}


def matched_model_path(measured: dict) -> Path:
    """The emulator counters of the kernels a run measured: results/emu_profile_<its commit>.json
    (bench_emu_profile.py run on that commit) when committed, else the current emu_profile.json
    (right when the kernels did not change since the run)."""
    matched = RESULTS / f"emu_profile_{measured.get('commit')}.json"
    return matched if matched.exists() else RESULTS / "emu_profile.json"


def analyse(measured: dict, model: dict) -> dict:
    """A recorded gpu_vs_model run against the current model: per case, measured time over the
    roofline bound and over the serial estimate for the device it ran on; per kernel profiled by
    ncu, the emulator's extrapolated counters over ncu's."""
    device = model_device_for(measured["device"], ep.DEVICES)
    source = "A100" if device == "A100" else "H100"
    by_case = {}
    for e in model["results"]:
        big = "64" if e["op"] == "merge_segments" else "65536"
        for pass_, r in e["passes"].items():
            by_case[f"{e['op']}-{e['path']}-{e['dtype']}-{e['dim']}-{pass_}"] = r["predicted"][f"{source}@{big}"]
    cases, kernels = [], []
    for c in measured["cases"]:
        pred = by_case.get(c["case"])
        if pred is None:
            continue
        launches = [(x, repredict(x, source, device)) for x in pred["launches"]]
        bound = sum(r["seconds"] for _, r in launches)
        serial = sum(r["serial_s"] for _, r in launches)
        cases.append({"case": c["case"], "measured_ms": c["measured_ms"], "bound_ms": 1e3 * bound,
                      "serial_ms": 1e3 * serial, "over_bound": c["measured_ms"] / (1e3 * bound),
                      "over_serial": c["measured_ms"] / (1e3 * serial)})
        ncu = measured.get("ncu", {}).get(c["case"])
        if not isinstance(ncu, list):
            continue
        profiled = ncu_by_kernel(ncu)
        for x, r in launches:
            m = profiled.get(short_kernel(x["kernel"]))
            if m is None or not m.get("gpu__time_duration.sum"):
                continue
            seconds = m["gpu__time_duration.sum"] * 1e-9
            dram = m.get("dram__bytes_read.sum", 0.0) + m.get("dram__bytes_write.sum", 0.0)
            shared = (m.get("l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum", 0.0)
                      + m.get("l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum", 0.0))
            emu_shared = x["counters"]["sld_wave"] + x["counters"]["sst_wave"]
            kernels.append({
                "case": c["case"], "kernel": short_kernel(x["kernel"]), "measured_us": 1e6 * seconds,
                "bound_us": 1e6 * r["seconds"], "bound": r["bound"], "serial_us": 1e6 * r["serial_s"],
                "memory_us": 1e6 * r["memory_s"], "shared_us": 1e6 * r["shared_s"],
                "emu_over_ncu_dram": x["dram_bytes"] / dram if dram else None,
                "emu_over_ncu_shared_wavefronts": emu_shared / shared if shared else None,
                "warps_active_pct": m.get("sm__warps_active.avg.pct_of_peak_sustained_active")})
    return {"device": measured["device"], "model_device": device, "measured_commit": measured.get("commit"),
            "model_commit": model.get("commit"), "cases": cases, "kernels": kernels}


def render_analysis(doc: dict) -> str:
    lines = [f"Measured on {doc['device']} (commit {doc['measured_commit']}) against the model of commit "
             f"{doc['model_commit']}, {doc['model_device']} profile:", "",
             "| case | measured ms | bound ms | ÷ bound | serial ms | ÷ serial |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in doc["cases"]:
        lines.append(f"| {c['case']} | {c['measured_ms']:.3f} | {c['bound_ms']:.3f} | {c['over_bound']:.2f} | "
                     f"{c['serial_ms']:.3f} | {c['over_serial']:.2f} |")
    lines += ["", "| case | kernel | measured µs | bound µs (term) | DRAM µs | shared µs | serial µs | "
              "emu ÷ ncu DRAM bytes | emu ÷ ncu shared wavefronts | warps active |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    for k in doc["kernels"]:
        lines.append(f"| {k['case']} | {k['kernel']} | {k['measured_us']:.1f} | {k['bound_us']:.1f} ({k['bound']}) | "
                     f"{k['memory_us']:.1f} | {k['shared_us']:.1f} | {k['serial_us']:.1f} | "
                     f"{fmt(k['emu_over_ncu_dram'])} | {fmt(k['emu_over_ncu_shared_wavefronts'])} | "
                     f"{fmt(k['warps_active_pct'])} % |")
    return "\n".join(lines) + "\n"


def make_pass(op, dtype, d, pass_, device):
    """(fn, description) running one pass of the case at its 64K size."""
    g = torch.Generator(device=device).manual_seed(0)
    if op == "linear_attention":
        b, n, h = 2, 65536, 8
        q, k, v = (torch.randn(b, n, h * d, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
        fwd = lambda: linfusion_ops.linear_attention(q, k, v, h)  # noqa: E731
    elif op == "layer_norm":
        x = torch.randn(2 * 65536, d, device=device, dtype=dtype, generator=g).requires_grad_()
        w = torch.ones(d, device=device, dtype=dtype, requires_grad=True)
        bias = torch.zeros(d, device=device, dtype=dtype, requires_grad=True)
        fwd = lambda: linfusion_ops.layer_norm_leaky_relu(x, w, bias)  # noqa: E731
    else:
        segments, length, prompts = 64, 77, 2
        embeds = torch.randn(segments, length, d, device=device, dtype=dtype, generator=g).requires_grad_()
        keep = torch.zeros(segments, length, dtype=torch.bool, device=device)
        keep[:, :61] = True
        ids = (torch.arange(segments, device=device) % prompts).sort().values
        pad = torch.zeros(d, device=device, dtype=dtype, requires_grad=True)
        tokens = length * math.ceil(segments / prompts)
        fwd = lambda: linfusion_ops.merge_segments(embeds, keep, ids, prompts, tokens, pad)[0]  # noqa: E731
    if pass_ == "fwd":
        return fwd
    out = fwd()
    grad = torch.randn_like(out)
    return lambda: out.backward(grad, retain_graph=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--ncu", action="store_true", help="also collect Nsight Compute counters (needs ncu)")
    parser.add_argument("--ncu-seconds", type=float, default=90.0, help="time limit of the ncu runs together")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, run under ncu
    parser.add_argument("--analyse", metavar="JSON", help="re-predict a recorded run with the current model (no GPU)")
    parser.add_argument("--model", help="the model's counters (with --analyse; default: matched_model_path)")
    args = parser.parse_args()
    if args.analyse:
        source = Path(args.analyse)
        measured = json.loads(source.read_text())
        model_path = Path(args.model) if args.model else matched_model_path(measured)
        doc = analyse(measured, json.loads(model_path.read_text()))
        doc["model_file"] = model_path.name
        path = Path(args.out) / (source.stem + "_analysis.json")
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(render_analysis(doc), end="")
        print(f"gpu_vs_model: wrote {path}")
        return
    if not torch.cuda.is_available():
        raise SystemExit("gpu_vs_model: no CUDA GPU")
    model = json.loads((RESULTS / "emu_profile.json").read_text())
    name = torch.cuda.get_device_name()
    model_device = model_device_for(name, {k.split("@")[0] for k in model["results"][0]["passes"]["fwd"]["predicted"]})
    entries = []
    for e in model["results"]:
        big = "64" if e["op"] == "merge_segments" else "65536"
        for pass_, r in e["passes"].items():
            case = f"{e['op']}-{e['path']}-{e['dtype']}-{e['dim']}-{pass_}"
            entries.append((case, e, pass_, r["predicted"][f"{model_device}@{big}"]))
    if args.case:  # under ncu: run the one case a few times
        case, e, pass_, _ = next(x for x in entries if x[0] == args.case)
        fn = make_pass(e["op"], DTYPES[e["dtype"]], e["dim"], pass_, "cuda")
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        return
    cases = []
    for case, e, pass_, pred in entries:
        fn = make_pass(e["op"], DTYPES[e["dtype"]], e["dim"], pass_, "cuda")
        ms = time_ms(fn, "cuda")
        cases.append({"case": case, "op": e["op"], "path": e["path"], "dtype": e["dtype"], "dim": e["dim"],
                      "pass": pass_, "measured_ms": ms, "predicted_ms": 1e3 * pred["seconds"],
                      "floor_ms": 1e3 * pred["floor_seconds"],
                      "measured_over_predicted": ms / (1e3 * pred["seconds"])})
        print(f"{case}: measured {ms:.3f} ms, predicted {1e3 * pred['seconds']:.3f} ms", flush=True)
        del fn
        torch.cuda.empty_cache()
    ncu = {}
    doc = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "commit": git_commit(),
           "model_device": model_device, "model_commit": model.get("commit"), "cases": cases, "ncu": ncu}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_vs_model_{name.replace(' ', '_')}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")  # written now, so a cut-off ncu loses nothing
    print(f"gpu_vs_model: wrote {path}", flush=True)
    if args.ncu and shutil.which("ncu"):
        deadline = time.monotonic() + args.ncu_seconds
        for c in cases:
            if c["dim"] not in (40, 64, 320, 768) or time.monotonic() > deadline:
                continue
            try:
                ncu[c["case"]] = run_ncu(c["case"], max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                ncu[c["case"]] = "ncu cut off at the time limit"
            path.write_text(json.dumps(doc, indent=1) + "\n")
            print(f"gpu_vs_model: ncu {c['case']} done", flush=True)


if __name__ == "__main__":
    main()
