"""Memory of 16K generation with LinFusion: one UNet step and the VAE decode / encode of the real
SD 1.5 and SD-XL models, modelled on the meta device, per low-memory technique.

The model. The UNet2DConditionModel and AutoencoderKL of runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0 (their configs written out below, no weights needed)
are built on the meta device in fp16 with LinFusion mounted (LinFusion-1-5: kernel MLPs of
full width; LinFusion-XL: width / 16). One UNet call with the CFG batch of 2 and 77 text
tokens, the tiled VAE decode of the latents and the tiled encode of the image are run on meta
tensors under linfusion_ops.highres.memory.LiveBytes, which counts every tensor from the op that
creates it until it dies (weights, buffers and inputs added): the peak a caching allocator would
need, without fragmentation or kernel workspaces. Techniques, cumulative: none; chunked CFG;
+ in-place SiLU; + feed-forward chunks of 4096 tokens; + skip tensors on the CPU; + LinFusion's
self-attention in chunks of 65536 tokens. The pipeline
peak adds what stays resident while the other model runs: the text encoders, the UNet during the
VAE passes, the VAE during the UNet steps.

The check. The same counter on real CPU tensors, and the CPU allocator's own peak (the torch
profiler's allocation events, benchmarks.common.peak_memory_mb), for narrow versions of both
UNets and of the VAE at small sizes: the model's error against each.

The stages. UNet evaluations per image and time per stage of LinFusionHighResPipeline and
LinFusionHighResXLPipeline (pipe.stage_stats) on the tiny random models of the tests, on CPU,
with and without apply_low_memory + the tiled VAE.

    python benchmarks/bench_highres.py                       # everything, writes results/highres_memory.{json,png}
    python benchmarks/bench_highres.py --sizes 2048x2048 --skip-check --skip-stages
    # rerun some rows and merge them into the existing JSON (other rows, check, stages kept):
    python benchmarks/bench_highres.py --models sd15 --sizes 16384x16384 --techniques +attn_chunks \
        --skip-check --skip-stages --merge
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# benchmarks.common also silences kineto's log lines (KINETO_LOG_LEVEL) before any profile runs.
from benchmarks.common import git_commit, peak_memory_mb  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")

# The UNet config keys SD 1.5 and SD-XL share (unet/config.json of both checkpoints).
_UNET_COMMON = dict(
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
)
# unet/config.json of runwayml/stable-diffusion-v1-5.
SD15_UNET = dict(
    _UNET_COMMON,
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0.
SDXL_UNET = dict(
    _UNET_COMMON,
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# vae/config.json of both (SD-XL's differs in sample_size 1024, scaling_factor 0.13025 and
# force_upcast: its fp16 decode overflows; use madebyollin/sdxl-vae-fp16-fix, the same
# architecture, for the fp16 figures here to be reachable, or count the VAE part twice in fp32).
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
)
# text_encoder (CLIP ViT-L/14) and SD-XL's text_encoder_2 (OpenCLIP ViT-bigG/14).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, projection_dim=768)
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  max_position_embeddings=77, vocab_size=49408, projection_dim=1280, hidden_act="gelu")

MODELS = {
    "sd15": dict(unet=SD15_UNET, mid_dim_scale=None, text=[CLIP_L], name="SD 1.5"),
    "xl": dict(unet=SDXL_UNET, mid_dim_scale=16, text=[CLIP_L, CLIP_BIG_G], name="SD-XL"),
}
TECHNIQUES = {
    "none": dict(chunked_cfg=False, inplace_silu=False),
    "chunked_cfg": dict(chunked_cfg=True, inplace_silu=False),
    "+inplace_silu": dict(chunked_cfg=True, inplace_silu=True),
    "+ff_chunks": dict(chunked_cfg=True, inplace_silu=True, ff_chunk_size=4096),
    "+offload_skips": dict(chunked_cfg=True, inplace_silu=True, ff_chunk_size=4096, offload_skips=True),
    "+attn_chunks": dict(chunked_cfg=True, inplace_silu=True, ff_chunk_size=4096, offload_skips=True,
                         attn_chunk_size=65536),
}
# Every technique: the set the goals, the linearity figures and the VAE curve are read from.
ALL = list(TECHNIQUES)[-1]
SIZES = ["2048x2048", "4096x4096", "8192x8192", "8192x16384", "16384x16384"]
GOALS = {("xl", "8192x16384"): 20e9, ("xl", "16384x16384"): 40e9, ("sd15", "16384x16384"): 24e9}
VAE_TILE = 1024


def build_unet(config, mid_dim_scale, device, dtype):
    from diffusers import UNet2DConditionModel
    from linfusion_ops import LinFusion

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
        linfusion = LinFusion(**LinFusion.get_default_config(unet=unet, mid_dim_scale=mid_dim_scale))
    torch.nn.Module.to(unet, dtype=dtype).eval()
    linfusion.mount_to(unet=unet)
    return unet


def build_vae(config, device, dtype):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(**config)
    return torch.nn.Module.to(vae, dtype=dtype).eval()


def text_encoder_bytes(configs, dtype):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from linfusion_ops.highres.memory import module_bytes

    with torch.device("meta"):
        models = [CLIPTextModelWithProjection(CLIPTextConfig(**c)).to(dtype) for c in configs]
    return module_bytes(models)


def unet_inputs(config, height, width, device, dtype, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        if device == "meta":
            return torch.empty(shape, device="meta", dtype=dtype)
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    args = dict(
        sample=randn(batch, 4, height // 8, width // 8),
        timestep=torch.tensor([500] * batch, device=device),
        encoder_hidden_states=randn(batch, 77, config["cross_attention_dim"]),
    )
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        args["added_cond_kwargs"] = dict(
            text_embeds=randn(batch, pooled),
            time_ids=torch.tensor([[height, width, 0, 0, height, width]] * batch, device=device, dtype=dtype),
        )
    return args


def unet_peak(unet, inputs, techniques):
    from linfusion_ops.highres import apply_low_memory
    from linfusion_ops.highres.memory import model_peak

    with apply_low_memory(unet, **techniques):
        return model_peak(lambda meta: unet(**meta), [unet], inputs)


def vae_peaks(vae, height, width, dtype, tile_size):
    """Modelled peaks (bytes) of the tiled decode of (1, 4, H/8, W/8) latents and the tiled
    encode of a (1, 3, H, W) image, VAE weights included."""
    from linfusion_ops.highres import tiled_decode, tiled_encode
    from linfusion_ops.highres.memory import model_peak

    latents = torch.empty(1, 4, height // 8, width // 8, device="meta", dtype=dtype)
    image = torch.empty(1, 3, height, width, device="meta", dtype=dtype)
    decode = model_peak(lambda z: tiled_decode(vae, z, tile_size=tile_size), [vae], latents)
    encode = model_peak(lambda x: tiled_encode(vae, x, tile_size=tile_size).mean, [vae], image)
    return decode, encode


def vae_resident(height, width, dtype):
    """Bytes of the full-size tensors of a tiled decode / encode: latents or image in, the
    mid block's attention input and output (512 channels at latent resolution), the output."""
    latent = height * width // 64
    item = torch.empty((), dtype=dtype).element_size()
    maps = 2 * 512 * latent
    return (4 * latent + maps + 3 * height * width) * item, (3 * height * width + maps + 8 * latent) * item


def vae_rows(vae, sizes, dtype, tile_size, direct_max):
    """{size: (decode, encode, how)}: a dry run up to `direct_max` pixels; above, the largest
    dry-run size's peak plus the growth of the full-size tensors (vae_resident). A tile's
    working set does not depend on the image size once tiles have neighbours on every side,
    so this is an upper bound (each phase's full-size tensors are added, even those not live
    at its peak); benchmarks/results/highres_memory_xl_8192_direct.json checks it at 8192^2."""
    out = {}
    direct = sorted((s for s in sizes if _pixels(s) <= direct_max), key=_pixels)
    if not direct or _pixels(direct[-1]) < 4096 * 4096 <= max(_pixels(s) for s in sizes):
        direct.append("4096x4096")
    for size in direct:
        start = time.perf_counter()
        out[size] = vae_peaks(vae, *_hw(size), dtype, tile_size) + ("dry run",)
        print(f"  VAE {size}: {time.perf_counter() - start:.0f} s of dry runs", flush=True)
    ref = direct[-1]
    ref_res = vae_resident(*_hw(ref), dtype)
    for size in sizes:
        if size not in out:
            res = vae_resident(*_hw(size), dtype)
            out[size] = (out[ref][0] + res[0] - ref_res[0], out[ref][1] + res[1] - ref_res[1], f"bound from {ref}")
    return out


def _hw(size):
    return tuple(int(v) for v in size.split("x"))


def _pixels(size):
    h, w = _hw(size)
    return h * w


def model_rows(args):
    from linfusion_ops.highres.memory import module_bytes

    dtype = torch.float16
    vae = build_vae(SD_VAE, "meta", dtype)
    vae_weights = module_bytes([vae])
    vae_model = vae_rows(vae, args.sizes, dtype, args.vae_tile, args.vae_direct_max)
    rows = []
    for key in args.models:
        spec = MODELS[key]
        unet = build_unet(spec["unet"], spec["mid_dim_scale"], "meta", dtype)
        weights = module_bytes([unet])
        text = text_encoder_bytes(spec["text"], dtype)
        for size in args.sizes:
            height, width = (int(v) for v in size.split("x"))
            inputs = unet_inputs(spec["unet"], height, width, "meta", dtype)
            decode, encode, how = vae_model[size]
            for name in args.techniques:
                techniques = TECHNIQUES[name]
                step = unet_peak(unet, inputs, techniques)
                pipeline = text + max(step + vae_weights, weights + max(decode, encode))
                row = dict(
                    model=key,
                    size=size,
                    megapixels=height * width / 1e6,
                    techniques=name,
                    unet_weights_bytes=weights,
                    unet_step_peak_bytes=step,
                    vae_weights_bytes=vae_weights,
                    vae_decode_peak_bytes=decode,
                    vae_encode_peak_bytes=encode,
                    vae_model=how,
                    text_encoder_bytes=text,
                    pipeline_peak_bytes=pipeline,
                )
                rows.append(row)
                print(
                    f"{spec['name']:>6} {size:>12} {name:>15} | UNet step {step / 1e9:7.2f} GB"
                    f" | VAE decode {decode / 1e9:6.2f} encode {encode / 1e9:6.2f} GB"
                    f" | pipeline {pipeline / 1e9:7.2f} GB",
                    flush=True,
                )
    return rows


def linearity(rows):
    """Per model, with every technique: the activation part (peak minus weights) per pixel at
    each size, and its ratio to the smallest size's."""
    out = {}
    for key in {r["model"] for r in rows}:
        mine = [r for r in rows if r["model"] == key and r["techniques"] == ALL]
        per_pixel = [
            (r["size"], (r["pipeline_peak_bytes"] - r["text_encoder_bytes"] - r["unet_weights_bytes"] - r["vae_weights_bytes"])
             / (r["megapixels"] * 1e6))
            for r in mine
        ]
        out[key] = [dict(size=s, activation_bytes_per_pixel=v, ratio_to_first=v / per_pixel[0][1]) for s, v in per_pixel]
    return out


# Narrow versions of the UNets and the VAE for the check on real CPU tensors.
CHECK_UNETS = {
    "sd15_narrow": dict(SD15_UNET, block_out_channels=(32, 64, 128, 128), cross_attention_dim=64),
    "xl_narrow": dict(SDXL_UNET, block_out_channels=(32, 64, 128), attention_head_dim=(1, 2, 4),
                      transformer_layers_per_block=(1, 2, 2), cross_attention_dim=64,
                      addition_time_embed_dim=16, projection_class_embeddings_input_dim=64 + 6 * 16),
}
CHECK_VAE = dict(SD_VAE, block_out_channels=(16, 32, 64, 64), norm_num_groups=8)


def check_rows(args):
    """Model (meta) against real CPU tensors in fp32: the same counter, and the allocator."""
    from linfusion_ops.highres import apply_low_memory, tiled_decode
    from linfusion_ops.highres.memory import LiveBytes, model_peak, module_bytes, tensor_bytes

    dtype = torch.float32
    rows = []

    def record(name, size, techniques, modelled, resident, fn):
        with torch.no_grad(), LiveBytes("cpu") as counter:
            fn()
        allocator = peak_memory_mb(lambda: torch.no_grad()(fn)(), "cpu") * 2**20
        activations = modelled - resident
        row = dict(
            config=name,
            size=size,
            techniques=techniques,
            modelled_activation_bytes=activations,
            counted_activation_bytes=counter.peak,
            allocator_activation_bytes=allocator,
            error_vs_counted=activations / counter.peak - 1,
            error_vs_allocator=activations / allocator - 1,
        )
        rows.append(row)
        print(
            f"{name:>12} {size:>8} {techniques:>15} | model {activations / 1e6:8.2f} MB | counted {counter.peak / 1e6:8.2f} MB"
            f" ({row['error_vs_counted']:+.1%}) | allocator {allocator / 1e6:8.2f} MB ({row['error_vs_allocator']:+.1%})",
            flush=True,
        )

    for name, config in CHECK_UNETS.items():
        unet = build_unet(config, 16 if name.startswith("xl") else None, "cpu", dtype)
        for size in (256, 512):
            inputs = unet_inputs(config, size, size, "cpu", dtype)
            resident = module_bytes([unet]) + tensor_bytes(inputs)
            for technique in ("none", "+ff_chunks"):
                with apply_low_memory(unet, **dict(TECHNIQUES[technique], ff_chunk_size=256 if technique == "+ff_chunks" else None)):
                    modelled = model_peak(lambda meta: unet(**meta), [unet], inputs)
                    record(name, f"{size}px", technique, modelled, resident, lambda: unet(**inputs))
    vae = build_vae(CHECK_VAE, "cpu", dtype)
    for size in (256,):
        z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
        resident = module_bytes([vae]) + tensor_bytes(z)
        modelled = model_peak(lambda m: tiled_decode(vae, m, tile_size=128), [vae], z)
        record("vae_narrow", f"{size}px", "tiled decode", modelled, resident, lambda: tiled_decode(vae, z, tile_size=128))
    return rows


def stage_rows():
    """stage_stats of the staged pipelines on the tests' tiny models, plain and low-memory."""
    import tempfile
    from pathlib import Path

    from tests.helpers.tiny_models import make_linfusion, tiny_sd_pipeline, tiny_sdxl_pipeline

    from linfusion_ops.highres import LinFusionHighResPipeline, LinFusionHighResXLPipeline

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key, make, cls in (("sd15_tiny", tiny_sd_pipeline, LinFusionHighResPipeline),
                               ("xl_tiny", tiny_sdxl_pipeline, LinFusionHighResXLPipeline)):
            base = make(Path(tmp) / key)
            make_linfusion(base.unet, mid="xl" if key.startswith("xl") else None).mount_to(unet=base.unet)
            pipe = cls.from_pipe(base)
            pipe.set_progress_bar_config(disable=True)
            for variant in ("plain", "low_memory+tiled_vae"):
                if variant != "plain":
                    pipe.enable_low_memory(ff_chunk_size=64, offload_skips=True)
                    pipe.enable_vae_tiling(tile_size=32)
                pipe("a photo", height=128, width=128, num_inference_steps=20,
                     generator=torch.Generator().manual_seed(0), output_type="np")
                for stats in pipe.stage_stats:
                    rows.append(dict(model=key, variant=variant, **stats))
                    print(f"{key:>9} {variant:>21} stage {stats['stage']} {stats['height']}x{stats['width']}: "
                          f"{stats['steps']} steps, {stats['unet_evaluations_per_image']} UNet evaluations/image, "
                          f"{stats['seconds']:.2f} s ({stats['cpu_seconds']:.2f} s CPU)", flush=True)
                if variant != "plain":
                    pipe.disable_low_memory()
                    pipe.disable_vae_tiling()
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key in zip(axes, ("sd15", "xl")):
        mine = [r for r in rows if r["model"] == key]
        if not mine:
            continue
        for i, name in enumerate(TECHNIQUES):
            pts = [r for r in mine if r["techniques"] == name]
            ax.plot([r["megapixels"] for r in pts], [r["pipeline_peak_bytes"] / 1e9 for r in pts],
                    marker="o", color=f"C{i}", label=f"pipeline, {name}")
        pts = [r for r in mine if r["techniques"] == ALL]
        ax.plot([r["megapixels"] for r in pts], [r["vae_decode_peak_bytes"] / 1e9 for r in pts],
                "--", marker="s", color="grey", label="tiled VAE decode")
        for (model, size), goal in GOALS.items():
            if model == key:
                h, w = (int(v) for v in size.split("x"))
                ax.plot([h * w / 1e6], [goal / 1e9], marker="*", markersize=14, color="red", linestyle="none")
        ax.set(xscale="log", yscale="log", xlabel="megapixels", title=MODELS[key]["name"] + " + LinFusion, fp16, weights included")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("modelled peak device memory (GB)")
    axes[1].legend(fontsize=7, title="red stars: goals", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="HEIGHTxWIDTH in px, multiples of 64")
    parser.add_argument("--techniques", nargs="+", default=list(TECHNIQUES), choices=list(TECHNIQUES))
    parser.add_argument("--merge", action="store_true",
                        help="replace the rows measured now in the existing --out JSON and keep the others "
                             "(and its check / stages when skipped here)")
    parser.add_argument("--vae-tile", type=int, default=VAE_TILE, help="tiled VAE tile size (px)")
    parser.add_argument("--vae-direct-max", type=int, default=4096 * 4096,
                        help="largest pixel count whose VAE passes are dry-run (above: bounded from it)")
    parser.add_argument("--skip-model", action="store_true", help="skip the meta-device model of the real configs")
    parser.add_argument("--skip-check", action="store_true", help="skip the check on real CPU tensors")
    parser.add_argument("--skip-stages", action="store_true", help="skip the staged pipeline timings")
    parser.add_argument("--out", default=os.path.join(RESULTS, "highres_memory.json"))
    args = parser.parse_args()
    for size in args.sizes:
        try:
            h, w = (int(v) for v in size.split("x"))
        except ValueError:
            parser.error(f"--sizes: {size!r} is not HEIGHTxWIDTH")
        if h % 64 or w % 64:
            parser.error(f"--sizes: {size} is not a multiple of 64")

    import diffusers
    import transformers

    import linfusion_ops

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "linfusion_ops": linfusion_ops.__version__,
        "compiled": linfusion_ops.compiled(),
        "model_device": "meta (fp16, LinFusion mounted, CFG batch 2, 77 text tokens)",
        "vae_tile_size": args.vae_tile,
        "techniques": TECHNIQUES,
        "configs": {"sd15_unet": SD15_UNET, "sdxl_unet": SDXL_UNET, "vae": SD_VAE,
                    "clip_l": CLIP_L, "clip_big_g": CLIP_BIG_G},
    }
    print(json.dumps({k: v for k, v in meta.items() if k not in ("configs", "techniques")}))
    result = {"meta": meta}
    result["model"] = [] if args.skip_model else model_rows(args)
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
        fresh = {(r["model"], r["size"], r["techniques"]) for r in result["model"]}
        kept = [r for r in previous.get("model", []) if (r["model"], r["size"], r["techniques"]) not in fresh]
        order = {(m, s, t): i for i, (m, s, t) in enumerate(
            (m, s, t) for m in MODELS for s in SIZES for t in TECHNIQUES)}
        result["model"] = sorted(kept + result["model"], key=lambda r: order.get((r["model"], r["size"], r["techniques"]), len(order)))
        # The run the other rows come from, and every row refreshed since (over several merges).
        meta["merged_into"] = previous["meta"].get("merged_into") or {k: previous["meta"].get(k) for k in ("date", "commit")}
        meta["refreshed_rows"] = sorted(set(previous["meta"].get("refreshed_rows", [])) | {f"{m} {s} {t}" for m, s, t in fresh})
        for part, skipped in (("check", args.skip_check), ("stages", args.skip_stages)):
            if skipped and part in previous:
                result[part] = previous[part]
    result["linearity"] = linearity(result["model"])
    result["goals"] = []
    for (key, size), goal in GOALS.items():
        row = next((r for r in result["model"] if r["model"] == key and r["size"] == size
                    and r["techniques"] == ALL), None)
        if row is not None:
            met = row["pipeline_peak_bytes"] <= goal
            result["goals"].append(dict(model=key, size=size, goal_bytes=goal,
                                        modelled_bytes=row["pipeline_peak_bytes"], met=met))
            print(f"goal {MODELS[key]['name']} {size} <= {goal / 1e9:.0f} GB: "
                  f"{row['pipeline_peak_bytes'] / 1e9:.2f} GB, {'met' if met else 'NOT met'}")
    if not args.skip_check:
        result["check"] = check_rows(args)
    if not args.skip_stages:
        result["stages"] = stage_rows()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    if result["model"]:
        png = os.path.splitext(args.out)[0] + ".png"
        plot(result["model"], png)
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
