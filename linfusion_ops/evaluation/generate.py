"""Sample generation for evaluation, as LinFusion's official eval runs it: one caption and one
seed per sample (``--seeds 0-29999`` for COCO-30K), any diffusers text-to-image pipeline, PNGs
in one folder, on one process or on several (torchrun / accelerate launch: each rank its own
slice of the samples).

Sample i (0-based) is caption i with seed ``seeds[i]`` and is written to ``{i:06d}.png``. Its
initial noise is drawn from its own ``torch.Generator("cpu").manual_seed(seed)`` (a list of
generators, one per sample, goes to the pipeline), so a sample does not depend on the batch it
falls in, the number of processes or the device.

Resumable and kill-safe: each PNG is written to a hidden temporary file and renamed, so a
sample's PNG exists only when it is complete; a rerun skips the samples whose PNG exists and
removes the temporaries a killed run left. ``run.json`` (written at the start) records the
settings and a hash of the sample plan; a rerun with other settings is refused rather than mixed
in. ``metadata.jsonl`` (one line per sample: index, file, seed, caption) is written last, once
every sample exists: its presence means the folder is complete.
"""

import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..optional import needs
from .files import remove_stale_temporaries, write_atomic

__all__ = [
    "Sample",
    "parse_seeds",
    "read_captions",
    "dataset_captions",
    "plan_samples",
    "sample_file",
    "read_metadata",
    "distributed_setup",
    "generate",
    "load_pipeline",
    "RUN_FILE",
    "METADATA_FILE",
]

RUN_FILE = "run.json"
METADATA_FILE = "metadata.jsonl"
_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Sample:
    """One sample of the plan: its index (file name), seed and caption."""

    index: int
    seed: int
    caption: str


def sample_file(index: int) -> str:
    """The PNG name of sample ``index``."""
    return f"{index:06d}.png"


def parse_seeds(spec: str) -> List[int]:
    """Seeds from a comma-separated list of ints and inclusive ranges: ``"0-29999"``,
    ``"1,2,5-10"``. One-line ValueError on anything else (negative, reversed range, empty)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--seeds: expected a list such as '0-29999' or '1,2,5-10', got {spec!r}")
    seeds = []
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"--seeds: {part!r} is not a non-negative int or a range 'a-b' (in {spec!r})")
        start = int(match.group(1))
        stop = int(match.group(2)) if match.group(2) is not None else start
        if stop < start:
            raise ValueError(f"--seeds: range {part!r} ends before it starts")
        seeds.extend(range(start, stop + 1))
    return seeds


def read_captions(path: str) -> List[str]:
    """One caption per line, stripped, blank lines skipped (the official eval's reading of
    ``captions.txt``). One-line errors for a missing or empty file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--captions: no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        captions = [line.strip() for line in f if line.strip()]
    if not captions:
        raise ValueError(f"--captions: {path!r} holds no captions (empty or blank lines only)")
    return captions


def dataset_captions(name: str, column: str, split: str = "train", config: Optional[str] = None,
                     limit: Optional[int] = None, progress: bool = True) -> List[str]:
    """The ``column`` of a ``datasets`` dataset as captions, the first ``limit`` rows: ``name``
    is a hub name, a local dataset folder, or one local .csv / .json / .jsonl / .parquet file
    (read as its only split). A list-valued cell (COCO's five captions) gives its first caption.
    ``progress=False`` silences ``datasets``' progress bars for the call."""
    with needs("linfusion_ops.evaluation.dataset_captions", "eval"):
        import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        if os.path.isfile(name):
            builder = _FILE_BUILDERS.get(os.path.splitext(name)[1].lower())
            if builder is None:
                raise ValueError(f"--dataset: {name!r} is a file but not {'/'.join(sorted(_FILE_BUILDERS))}")
            data = datasets.load_dataset(builder, data_files=name, split="train")
        else:
            data = datasets.load_dataset(name, config, split=split)
    finally:
        if not progress and not was_disabled:
            datasets.enable_progress_bars()
    if column not in data.column_names:
        raise ValueError(f"--dataset-column: {name!r} has no column {column!r} (columns: {data.column_names})")
    values = data[column] if limit is None else data.select(range(min(limit, len(data))))[column]
    captions = [str(v[0] if isinstance(v, (list, tuple)) and v else v).strip() for v in values]
    if not captions or not any(captions):
        raise ValueError(f"--dataset: {name!r} column {column!r} holds no captions")
    return captions


def plan_samples(captions: Sequence[str], seeds: Sequence[int], num: Optional[int] = None) -> List[Sample]:
    """Samples 0 .. n−1, n = ``num`` or the number of captions: sample i gets caption i and
    ``seeds[i]``. One-line ValueError when there are fewer seeds (or captions) than samples."""
    captions = list(captions)
    if not captions:
        raise ValueError("no captions to generate from")
    n = len(captions) if num is None else num
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"--num must be a positive int, got {num!r}")
    if n > len(captions):
        raise ValueError(f"--num {n} asks for more samples than the {len(captions)} captions")
    if len(seeds) < n:
        raise ValueError(f"--seeds gives {len(seeds)} seeds for {n} samples; give one seed per sample (e.g. 0-{n - 1})")
    return [Sample(i, int(seeds[i]), captions[i]) for i in range(n)]


def plan_hash(samples: Sequence[Sample]) -> str:
    """SHA-256 (hex) of the plan's (index, seed, caption) triples."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(json.dumps([s.index, s.seed, s.caption]).encode())
    return digest.hexdigest()


def read_metadata(folder: str) -> List[Dict[str, Any]]:
    """The records of a complete folder's ``metadata.jsonl`` (index, file, seed, caption)."""
    path = os.path.join(folder, METADATA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} has no {METADATA_FILE} (generation incomplete, or not a generate folder)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def distributed_setup(device: Optional[str] = None):
    """(rank, world_size, device) of this process. Under torchrun or ``accelerate launch``
    (WORLD_SIZE > 1 in the environment) the default process group is initialised if it is not
    yet: NCCL with one GPU per local rank when CUDA is available, gloo on CPU otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def _png_bytes(image, sample: Sample) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("caption", sample.caption)
    info.add_text("seed", str(sample.seed))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def generate(
    pipeline,
    samples: Sequence[Sample],
    outdir: str,
    *,
    batch_size: int = 1,
    height: Optional[int] = None,
    width: Optional[int] = None,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    call_kwargs: Optional[Dict[str, Any]] = None,
    settings: Optional[Dict[str, Any]] = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> Dict[str, int]:
    """Generate the samples missing from ``outdir`` with ``pipeline``; this rank takes every
    ``world_size``-th missing sample from ``rank`` on, in batches of ``batch_size``.

    Args:
        pipeline: a diffusers text-to-image pipeline (``prompt``, ``generator`` (a list),
            ``num_inference_steps``, ``guidance_scale``, ``height``, ``width``, ``output_type``).
        samples: the plan (:func:`plan_samples`), the same on every rank.
        height, width: the output size (None: the pipeline's default).
        call_kwargs: more pipeline arguments (JSON-able; e.g. a high-res pipeline's ``method``).
        settings: what else identifies the run (pipeline path, LinFusion, LoRA, dtype ...),
            recorded in ``run.json`` with the arguments above and the plan's hash.
        rank, world_size: this process in the default process group (:func:`distributed_setup`);
            every rank must call with the same arguments.

    Returns:
        ``{"generated": this rank's new samples, "skipped": samples found complete, "total"}``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"--batch-size must be a positive int, got {batch_size!r}")
    samples = list(samples)
    if not samples:
        raise ValueError("generate: no samples")
    call_kwargs = dict(call_kwargs or {})
    run = {
        "settings": dict(settings or {}),
        "height": height,
        "width": width,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "call_kwargs": call_kwargs,
        "num_samples": len(samples),
        "plan_sha256": plan_hash(samples),
    }
    run = json.loads(json.dumps(run))
    run_path = os.path.join(outdir, RUN_FILE)
    # Every rank checks before the first barrier, so a refusal stops all ranks alike.
    if os.path.isfile(run_path):
        with open(run_path, encoding="utf-8") as f:
            previous = json.load(f)
        if previous != run:
            differ = sorted(k for k in set(run) | set(previous) if run.get(k) != previous.get(k))
            raise ValueError(
                f"{outdir!r} holds samples of another run ({RUN_FILE} differs in {', '.join(differ)}); "
                "use a new --outdir or the same settings"
            )
    _barrier(world_size)
    if rank == 0:
        os.makedirs(outdir, exist_ok=True)
        remove_stale_temporaries(outdir)
        if not os.path.isfile(run_path):
            write_atomic(run_path, json.dumps(run, indent=1, sort_keys=True) + "\n")
    _barrier(world_size)
    pending = [s for s in samples if not os.path.isfile(os.path.join(outdir, sample_file(s.index)))]
    # Nobody writes before every rank has listed, so all ranks split the same list.
    _barrier(world_size)
    mine = pending[rank::world_size]

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), unit="sample", desc=f"generate (rank 0 of {world_size}, {len(pending)} to do)")
    size = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(s.seed) for s in batch]
        with torch.no_grad():
            images = pipeline(
                prompt=[s.caption for s in batch], generator=generators, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, output_type="pil", **size, **call_kwargs,
            ).images
        if len(images) != len(batch):
            raise RuntimeError(f"generate: the pipeline returned {len(images)} images for {len(batch)} prompts")
        for sample, image in zip(batch, images):
            write_atomic(os.path.join(outdir, sample_file(sample.index)), _png_bytes(image, sample))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()

    _barrier(world_size)
    if rank == 0:
        missing = [s.index for s in samples if not os.path.isfile(os.path.join(outdir, sample_file(s.index)))]
        if missing:
            raise RuntimeError(f"generate: {len(missing)} samples missing after the run (first: {sample_file(missing[0])})")
        lines = [json.dumps(dict(asdict(s), file=sample_file(s.index)), ensure_ascii=False) for s in samples]
        write_atomic(os.path.join(outdir, METADATA_FILE), "\n".join(lines) + "\n")
    _barrier(world_size)
    return {"generated": len(mine), "skipped": len(samples) - len(pending), "total": len(samples)}


def load_pipeline(
    path: str,
    *,
    dtype: torch.dtype = torch.float16,
    device: Optional[torch.device] = None,
    linfusion: Optional[str] = None,
    lora: Optional[str] = None,
    highres: bool = False,
    disable_safety_checker: bool = False,
    variant: Optional[str] = None,
):
    """A diffusers pipeline from ``path`` (hub name or folder, ``DiffusionPipeline``) ready for
    :func:`generate`.

    Args:
        linfusion: None; ``"auto"`` mounts the LinFusion checkpoint the official mapping picks
            for the pipeline; any other value is a LinFusion folder or hub repository.
        lora: a diffusers LoRA (folder or ``.safetensors``, ``pipe.load_lora_weights``) or
            LongAlign's ``lora_vis.pt`` list (a ``.pt`` / ``.bin`` file, loaded into the UNet with
            :func:`linfusion_ops.longalign.lora.lora_from_longalign_list`).
        highres: wrap in :class:`linfusion_ops.highres.LinFusionHighResPipeline` (or the XL one),
            which mounts LinFusion when it is not yet.
        disable_safety_checker: drop SD's safety checker (it blacks out flagged samples, which
            biases FID).
    """
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, variant=variant)
    if disable_safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    # LinFusion first: a LoRA then wraps the mounted attention's projections too.
    if linfusion is not None:
        from ..linfusion import LinFusion

        LinFusion.construct_for(pipe, pretrained_model_name_or_path=None if linfusion == "auto" else linfusion)
    if lora is not None:
        if lora.endswith((".pt", ".bin")) and os.path.isfile(lora):
            from ..longalign.lora import lora_from_longalign_list

            lora_from_longalign_list(pipe.unet, torch.load(lora, map_location="cpu", weights_only=True))
        else:
            pipe.load_lora_weights(lora)
    if highres:
        from diffusers import StableDiffusionXLPipeline

        from ..highres import LinFusionHighResPipeline, LinFusionHighResXLPipeline

        cls = LinFusionHighResXLPipeline if isinstance(pipe, StableDiffusionXLPipeline) else LinFusionHighResPipeline
        pipe = cls.from_pipe(pipe)
    if device is not None:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
