"""``python -m linfusion_ops.evaluation generate|metrics`` (``main`` is the console entry point).

    torchrun --standalone --nproc_per_node=4 -m linfusion_ops.evaluation generate \\
        --pipeline stabilityai/stable-diffusion-xl-base-1.0 --linfusion auto \\
        --captions captions.txt --seeds 0-29999 --batch-size 8 --resolution 1024 --outdir samples/xl
    python -m linfusion_ops.evaluation metrics --samples samples/xl \\
        --ref-dir coco/val2014 --ref-stats coco_val2014_256.npz --inception-weights pt_inception-2015-12-05-6726825d.pth \\
        --clip-model laion/CLIP-ViT-g-14-laion2B-s12B-b42K --eval-res 256

See docs/evaluation.md. Errors in the inputs end the command with one line on stderr and exit
status 2, before anything is written.
"""

import argparse
import json
import os
import sys
from typing import List, Optional

from ..optional import exit_on_missing

__all__ = ["main", "build_parser"]

_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def build_parser() -> argparse.ArgumentParser:
    # The console script's name (linfusion-eval), or how `python -m` ran it.
    script = os.path.basename(sys.argv[0])
    prog = "python -m linfusion_ops.evaluation" if script in ("__main__.py", "-c", "") else script
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate samples (one caption and one seed each) as PNGs")
    gen.add_argument("--pipeline", required=True, help="diffusers pipeline: hub name or folder")
    gen.add_argument("--outdir", required=True, help="folder of the PNGs, run.json and metadata.jsonl")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--captions", help="caption file, one per line (blank lines skipped)")
    source.add_argument("--dataset", help="a `datasets` dataset (hub name or local loader) holding the captions")
    gen.add_argument("--dataset-column", default="caption", help="its caption column (default: caption)")
    gen.add_argument("--dataset-split", default="train")
    gen.add_argument("--dataset-config", default=None)
    gen.add_argument("--seeds", default=None, help="seed per sample, e.g. 0-29999 or 1,2,5-10 (default: 0..n-1)")
    gen.add_argument("--num", type=int, default=None, help="number of samples (default: one per caption)")
    gen.add_argument("--batch-size", type=int, default=1)
    gen.add_argument("--resolution", type=int, default=None, help="square output size (default: the pipeline's)")
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--steps", type=int, default=25, help="inference steps (official eval: 25)")
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--dtype", choices=sorted(_DTYPES), default="fp16")
    gen.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    gen.add_argument("--linfusion", default=None, help="mount LinFusion: 'auto' (the official mapping) or a checkpoint")
    gen.add_argument("--lora", default=None, help="diffusers LoRA, or LongAlign's lora_vis.pt")
    gen.add_argument("--highres", action="store_true", help="use linfusion_ops.highres' staged pipeline")
    gen.add_argument("--call-kwargs", default="{}", help="JSON object of more pipeline arguments")
    gen.add_argument("--disable-safety-checker", action="store_true")
    gen.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    gen.add_argument("--no-progress", action="store_true")

    met = commands.add_parser("metrics", help="FID, CLIP score and LongAlign's decomposed score of a samples folder")
    met.add_argument("--samples", required=True, help="folder of generated images (a generate --outdir or any)")
    met.add_argument("--captions", default=None, help="caption file (default: the folder's metadata.jsonl)")
    met.add_argument("--how-many", type=int, default=None, help="evaluate the first N samples")
    met.add_argument("--eval-res", type=int, default=256, help="centre-crop + Lanczos resize to this size; 0 keeps the images")
    met.add_argument("--batch-size", type=int, default=50)
    met.add_argument("--ref-dir", default=None, help="reference images for FID (e.g. COCO 2014 val2014/)")
    met.add_argument("--ref-stats", default=None, help=".npz cache of the reference statistics (read, or written)")
    met.add_argument("--ref-how-many", type=int, default=None, help="use the first N reference images")
    met.add_argument("--inception-weights", default=None, help="FID Inception weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    met.add_argument("--fid-resize", choices=["clean", "legacy-pytorch"], default="clean",
                     help="how FID images reach 299 px: clean-fid's PIL bicubic (default, as the official eval) or pytorch-fid's bilinear")
    met.add_argument("--clip-model", default=None, help="transformers CLIP model name or folder for the CLIP score")
    met.add_argument("--clip-prefix", default="A photo depicts ", help="text put before each caption (official: 'A photo depicts ')")
    met.add_argument("--preference-model", default=None, help="CLIP-type preference model (e.g. Denscore) for the decomposed score")
    met.add_argument("--preference-tokenizer", default=None, help="its tokenizer (default: the model's folder)")
    met.add_argument("--preference-weight", type=float, default=0.3, help="w of relevant + w * irrelevant (LongAlign: 0.3)")
    met.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    met.add_argument("--out", default=None, help="JSON output (default: <samples>/metrics.json)")
    met.add_argument("--no-progress", action="store_true")
    return parser


def _generate(args) -> dict:
    import torch

    from .generate import dataset_captions, distributed_setup, generate, load_pipeline, parse_seeds, plan_samples, read_captions

    try:
        call_kwargs = json.loads(args.call_kwargs)
    except json.JSONDecodeError as error:
        raise ValueError(f"--call-kwargs: not JSON ({error})") from None
    if not isinstance(call_kwargs, dict):
        raise ValueError("--call-kwargs must be a JSON object")
    if args.resolution is not None and (args.height is not None or args.width is not None):
        raise ValueError("pass --resolution or --height/--width, not both")
    height = args.height if args.resolution is None else args.resolution
    width = args.width if args.resolution is None else args.resolution
    if args.captions is not None:
        captions = read_captions(args.captions)
    else:
        captions = dataset_captions(args.dataset, args.dataset_column, args.dataset_split, args.dataset_config,
                                    limit=args.num, progress=not args.no_progress)
    num = args.num if args.num is not None else len(captions)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else list(range(num))
    samples = plan_samples(captions, seeds, num)
    rank, world, device = distributed_setup(args.device)
    pipe = load_pipeline(
        args.pipeline, dtype=getattr(torch, _DTYPES[args.dtype]), device=device, linfusion=args.linfusion,
        lora=args.lora, highres=args.highres, disable_safety_checker=args.disable_safety_checker, variant=args.variant,
    )
    settings = {
        "pipeline": args.pipeline, "linfusion": args.linfusion, "lora": args.lora, "highres": args.highres,
        "dtype": args.dtype, "variant": args.variant, "safety_checker": not args.disable_safety_checker,
    }
    result = generate(
        pipe, samples, args.outdir, batch_size=args.batch_size, height=height, width=width,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, call_kwargs=call_kwargs,
        settings=settings, rank=rank, world_size=world, progress=not args.no_progress,
    )
    if rank == 0:
        print(f"generate: {result['total']} samples in {args.outdir} ({result['skipped']} were already there)")
    return result


def _metrics(args) -> dict:
    import torch

    from .files import write_atomic
    from .generate import read_captions
    from .inception import load_fid_inception
    from .metrics import evaluate_samples, load_clip, reference_statistics, resolve_samples

    eval_res = args.eval_res or None
    fid_wanted = args.ref_dir is not None or args.ref_stats is not None
    if not (fid_wanted or args.clip_model or args.preference_model):
        raise ValueError("nothing to compute: pass --ref-dir/--ref-stats (FID), --clip-model and/or --preference-model")
    if fid_wanted and args.inception_weights is None:
        raise ValueError("FID needs --inception-weights PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    if args.ref_stats is not None and not os.path.exists(args.ref_stats) and args.ref_dir is None:
        raise ValueError(f"--ref-stats {args.ref_stats!r} does not exist yet: pass --ref-dir to compute it")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    progress = not args.no_progress
    extractor = reference = clip = scorer = None
    # The samples are checked first: a bad folder fails before any network loads.
    captions = read_captions(args.captions) if args.captions is not None else None
    paths, captions = resolve_samples(args.samples, captions, args.how_many)
    if fid_wanted:
        extractor = load_fid_inception(args.inception_weights, device, resize=args.fid_resize)
        reference = reference_statistics(
            extractor, ref_dir=args.ref_dir, ref_stats=args.ref_stats, eval_res=eval_res,
            batch_size=args.batch_size, limit=args.ref_how_many, progress=progress,
        )
    if args.clip_model:
        clip = load_clip(args.clip_model, device)
    if args.preference_model:
        from ..longalign.preference import CLIPPreferenceScorer

        scorer = CLIPPreferenceScorer.from_pretrained(
            args.preference_model, args.preference_tokenizer, crop_size=None, random_crop=False
        ).to(device)
    result = evaluate_samples(
        paths, captions, extractor=extractor, reference=reference, clip=clip, clip_prefix=args.clip_prefix,
        scorer=scorer, preference_weight=args.preference_weight, eval_res=eval_res, batch_size=args.batch_size,
        progress=progress,
    )
    result.update(samples=os.fspath(args.samples), ref_dir=args.ref_dir, ref_stats=args.ref_stats,
                  clip_model=args.clip_model, preference_model=args.preference_model,
                  inception=extractor.name if extractor is not None else None)
    out = args.out or os.path.join(args.samples, "metrics.json")
    write_atomic(out, json.dumps(result, indent=1) + "\n")
    print(summary_line(result))
    return result


def summary_line(result: dict) -> str:
    """One line of the metrics' results, e.g. ``n=30000 @256px | FID 12.345 | CLIP score 31.20
    (cos 0.3120) | preference total 0.2100 (relevant 0.0500, irrelevant 0.5200, w=0.3)``."""
    parts = [f"n={result['num_samples']} @{result['eval_res'] or 'native '}px"]
    if "fid" in result:
        parts.append(f"FID {result['fid']:.3f}")
    if "clip_score" in result:
        parts.append(f"CLIP score {result['clip_score']:.2f} (cos {result['clip_cosine']:.4f})")
    if "preference" in result:
        p = result["preference"]
        parts.append(f"preference total {p['total']:.4f} (relevant {p['relevant']:.4f}, irrelevant {p['irrelevant']:.4f}, w={p['weight']})")
    return " | ".join(parts)


@exit_on_missing("linfusion-eval", "eval")
def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; returns the exit status (0, or 2 after a one-line error for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            _generate(args)
        else:
            _metrics(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"linfusion_ops.evaluation {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
