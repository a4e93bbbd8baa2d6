"""Sample-quality metrics as LinFusion's and LongAlign's evaluations report them: FID, CLIP score
and LongAlign's decomposed preference score, over folders of images.

Images are read as the official evaluation does (GigaGAN's, which LinFusion ships): a centre
crop to the short side, then a Lanczos resize to ``eval_res`` × ``eval_res`` (256 for the
LinFusion table); ``eval_res=None`` keeps the images as they are (then they must share one
size). Every metric reads these uint8 images.

* FID: features of a :class:`~linfusion_ops.evaluation.inception.FeatureExtractor` (the FID
  Inception-v3 pool3, which resizes to 299 as clean-fid does by default), accumulated as float64 sums
  (:class:`FeatureStatistics`), and :func:`frechet_distance` in float64. Reference statistics
  are cached as ``.npz`` (mu, sigma, count and a hash of the settings that produced them).
* CLIP score (:func:`clip_scores`): per image the cosine between the CLIP image and text
  embeddings; reported both as the usual CLIP score, ``100 · max(cos, 0)`` (Hessel et al. 2021,
  torchmetrics), and as the mean raw cosine, the number LinFusion's table reports. The official
  code prepends "A photo depicts " to every caption.
* Decomposed preference score (:class:`PreferenceScores`): LongAlign's relevant / irrelevant /
  total split from :mod:`linfusion_ops.longalign.preference`, with the common direction taken over all
  evaluated captions.
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..optional import needs

with needs(__name__, "eval"):  # a missing extra is a one-line MissingExtraError
    import numpy as np

from .files import write_atomic

__all__ = [
    "IMAGE_SUFFIXES",
    "list_images",
    "load_image",
    "check_image_sizes",
    "iter_image_batches",
    "FeatureStatistics",
    "frechet_distance",
    "feature_statistics",
    "settings_hash",
    "save_statistics",
    "load_statistics",
    "reference_statistics",
    "fid",
    "clip_scores",
    "clip_image_processor_class",
    "load_clip",
    "summarize_clip",
    "PreferenceScores",
    "resolve_samples",
    "evaluate_samples",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PathLike = Union[str, os.PathLike]


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_images(folder: PathLike) -> List[str]:
    """Paths of the image files directly in ``folder`` (not its subfolders), in natural order
    (2.png before 10.png). Hidden files (the generator's temporary files) are skipped."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no such image folder: {folder!r}")
    names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def load_image(path: PathLike, eval_res: Optional[int] = None) -> np.ndarray:
    """One image as an (H, W, 3) uint8 array: RGB, centre-cropped to its short side and
    Lanczos-resized to ``eval_res`` × ``eval_res`` when ``eval_res`` is given."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if eval_res is not None:
            width, height = image.size
            side = min(width, height)
            left, top = int(round((width - side) / 2.0)), int(round((height - side) / 2.0))
            image = image.crop((left, top, left + side, top + side))
            image = image.resize((eval_res, eval_res), Image.LANCZOS)
        return np.asarray(image, dtype=np.uint8).copy()


def check_image_sizes(paths: Sequence[str], what: str = "images") -> Tuple[int, int]:
    """The (width, height) all ``paths`` share, read from the file headers; a one-line
    ValueError naming two files of different sizes otherwise (or when there are none)."""
    from PIL import Image

    if not paths:
        raise ValueError(f"{what}: no images found")
    size = None
    for path in paths:
        with Image.open(path) as image:
            if size is None:
                size, first = image.size, path
            elif image.size != size:
                raise ValueError(
                    f"{what}: images of mixed sizes ({first} is {size[0]}x{size[1]}, {path} is "
                    f"{image.size[0]}x{image.size[1]}); samples of one run share a size"
                )
    return size


def iter_image_batches(paths: Sequence[str], batch_size: int, eval_res: Optional[int] = None) -> Iterator[torch.Tensor]:
    """(B, 3, H, W) uint8 batches of :func:`load_image` (``eval_res``) in ``paths`` order."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    for start in range(0, len(paths), batch_size):
        arrays = [load_image(p, eval_res) for p in paths[start:start + batch_size]]
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _image_paths(images: Union[PathLike, Sequence[str]], eval_res: Optional[int], same_size: bool, what: str) -> List[str]:
    paths = list_images(images) if isinstance(images, (str, os.PathLike)) else list(images)
    if not paths:
        raise ValueError(f"{what}: no images found in {os.fspath(images)!r}" if isinstance(images, (str, os.PathLike)) else f"{what}: no images given")
    if eval_res is not None and (isinstance(eval_res, bool) or not isinstance(eval_res, int) or eval_res <= 0):
        raise ValueError(f"--eval-res must be a positive int or None, got {eval_res!r}")
    if same_size or eval_res is None:
        check_image_sizes(paths, what)
    return paths


# ---------------------------------------------------------------------------------------------
# FID


@dataclass
class FeatureStatistics:
    """Running float64 sums of features: ``total`` (D,), ``outer`` (D, D) = Σ f fᵀ, ``count``.
    The sums make the statistics independent of the order and batching of the images (up to
    float64 rounding), and let partial statistics be added."""

    total: np.ndarray
    outer: np.ndarray
    count: int

    @classmethod
    def empty(cls, dim: int) -> "FeatureStatistics":
        return cls(np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64), 0)

    def update(self, features: Union[torch.Tensor, np.ndarray]) -> None:
        """Add (B, D) features."""
        f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.total.shape[0]:
            raise ValueError(f"FeatureStatistics.update: expected (B, {self.total.shape[0]}) features, got {f.shape}")
        self.total += f.sum(0)
        self.outer += f.T @ f
        self.count += f.shape[0]

    @property
    def mu(self) -> np.ndarray:
        """(D,) float64 mean."""
        return self.total / self.count

    @property
    def sigma(self) -> np.ndarray:
        """(D, D) float64 unbiased covariance (``np.cov``'s, as pytorch-fid and clean-fid)."""
        if self.count < 2:
            raise ValueError(f"FID needs at least 2 images for a covariance, got {self.count}")
        mu = self.mu
        return (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)


def _psd_eigh(matrix: np.ndarray):
    # Eigenvalues below the rounding noise of the decomposition are zeros of a singular
    # covariance (fewer images than dimensions); their square roots would add noise of
    # sqrt(eps · |λ_max|) each.
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    tol = 10 * matrix.shape[0] * np.finfo(np.float64).eps * max(float(np.abs(values).max(initial=0.0)), 1e-300)
    return np.where(values > tol, values, 0.0), vectors


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = _psd_eigh(matrix)
    return (vectors * np.sqrt(values)) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
    ``|mu1 − mu2|² + tr(sigma1) + tr(sigma2) − 2 tr((sigma1 sigma2)^½)``.

    tr((Σ1 Σ2)^½) is computed as Σ √λ of the symmetric PSD matrix Σ1^½ Σ2 Σ1^½ (same
    eigenvalues as Σ1 Σ2), from two symmetric eigendecompositions: real and stable where
    ``scipy.linalg.sqrtm(Σ1 Σ2)`` of singular covariances (fewer images than dimensions) returns
    complex noise.

    Args:
        mu1, mu2: (D,) means; sigma1, sigma2: (D, D) symmetric PSD covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    dim = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"frechet_distance: expected two (D,) means and (D, D) covariances of one D, got {mu1.shape}, "
            f"{sigma1.shape}, {mu2.shape}, {sigma2.shape}"
        )
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(_psd_eigh(middle)[0]).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _extractor_device(extractor) -> torch.device:
    parameter = next(iter(extractor.parameters()), None) if hasattr(extractor, "parameters") else None
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def feature_statistics(
    images: Union[PathLike, Sequence[str]],
    extractor,
    *,
    eval_res: Optional[int] = 256,
    batch_size: int = 50,
    same_size: bool = True,
    limit: Optional[int] = None,
    progress: bool = False,
    what: str = "images",
) -> FeatureStatistics:
    """:class:`FeatureStatistics` of ``extractor``'s features of a folder (or list) of images
    read with ``eval_res``. ``same_size``: the source files must share one size (generated
    samples); False allows mixed sizes when ``eval_res`` makes them equal (COCO). ``limit``:
    the first ``limit`` images only."""
    paths = _image_paths(images, eval_res, same_size, what)[:limit]
    stats = FeatureStatistics.empty(extractor.feature_dim)
    device = _extractor_device(extractor)
    batches = iter_image_batches(paths, batch_size, eval_res)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-len(paths) // batch_size), desc=f"FID features ({what})", unit="batch")
    for batch in batches:
        stats.update(extractor(batch.to(device)))
    return stats


def settings_hash(settings: Dict) -> str:
    """SHA-256 (hex, 16 digits) of the JSON of ``settings`` with sorted keys."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def save_statistics(path: PathLike, stats: FeatureStatistics, settings: Dict) -> None:
    """Write mu, sigma, count, settings (JSON) and their hash to ``path`` (.npz), atomically."""
    import io

    buffer = io.BytesIO()
    np.savez(
        buffer, mu=stats.mu, sigma=stats.sigma, count=np.int64(stats.count), total=stats.total, outer=stats.outer,
        settings=np.array(json.dumps(settings, sort_keys=True)), settings_hash=np.array(settings_hash(settings)),
    )
    write_atomic(path, buffer.getvalue())


def load_statistics(path: PathLike, settings: Optional[Dict] = None) -> FeatureStatistics:
    """Statistics saved by :func:`save_statistics`; with ``settings``, a one-line ValueError
    when they were computed with other settings (another network, weights or eval_res)."""
    with np.load(os.fspath(path)) as data:
        stored = str(data["settings_hash"])
        if settings is not None and stored != settings_hash(settings):
            raise ValueError(
                f"{os.fspath(path)}: reference statistics computed with other settings ({str(data['settings'])}, "
                f"now {json.dumps(settings, sort_keys=True)}); delete the file or use another --ref-stats path"
            )
        return FeatureStatistics(data["total"].copy(), data["outer"].copy(), int(data["count"]))


def reference_statistics(
    extractor,
    *,
    ref_dir: Optional[PathLike] = None,
    ref_stats: Optional[PathLike] = None,
    eval_res: Optional[int] = 256,
    batch_size: int = 50,
    limit: Optional[int] = None,
    progress: bool = False,
) -> FeatureStatistics:
    """Reference statistics: loaded from the cache ``ref_stats`` when it exists (and matches the
    settings), else computed from the images of ``ref_dir`` (mixed sizes allowed when
    ``eval_res`` is set) and cached to ``ref_stats`` when given."""
    settings = {"extractor": extractor.name, "eval_res": eval_res, "resize": "center-crop+lanczos", "limit": limit}
    if ref_stats is not None and os.path.exists(ref_stats):
        return load_statistics(ref_stats, settings)
    if ref_dir is None:
        raise ValueError(
            "FID needs reference images: pass --ref-dir (e.g. COCO 2014 val) or an existing --ref-stats .npz"
            + (f" ({os.fspath(ref_stats)!r} does not exist)" if ref_stats is not None else "")
        )
    stats = feature_statistics(
        ref_dir, extractor, eval_res=eval_res, batch_size=batch_size, same_size=False, limit=limit,
        progress=progress, what="reference images",
    )
    if ref_stats is not None:
        save_statistics(ref_stats, stats, settings)
    return stats


def fid(samples: FeatureStatistics, reference: FeatureStatistics) -> float:
    """FID between two :class:`FeatureStatistics` (:func:`frechet_distance` of their Gaussians)."""
    return frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma)


# ---------------------------------------------------------------------------------------------
# CLIP score


@torch.no_grad()
def clip_scores(
    images: torch.Tensor,
    captions: Sequence[str],
    model,
    tokenizer,
    image_processor,
    *,
    prefix: str = "A photo depicts ",
) -> torch.Tensor:
    """Per-image cosine between CLIP's image and text embeddings, (B,) float32 on CPU.

    Args:
        images: (B, 3, H, W) uint8 images (:func:`iter_image_batches`).
        captions: B captions; ``prefix`` is prepended to each (the official evaluation's "A photo
            depicts "; "" for none), then tokenized to the text tower's 77 tokens (truncated).
        model: a ``transformers.CLIPModel`` (any: ViT-B/32, ViT-L/14, ViT-g/14 ...).
        tokenizer, image_processor: its ``CLIPProcessor``'s (the image processor resizes the
            short side bicubically to the model's size, centre-crops and normalises).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError("clip_scores: images must be a (B, 3, H, W) uint8 tensor")
    captions = list(captions)
    if len(captions) != images.shape[0]:
        raise ValueError(f"clip_scores: {images.shape[0]} images but {len(captions)} captions")
    device = next(model.parameters()).device
    pixels = image_processor(images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt")["pixel_values"]
    tokens = tokenizer(
        [prefix + c for c in captions], padding=True, truncation=True,
        max_length=model.config.text_config.max_position_embeddings, return_tensors="pt",
    )
    # The joint forward returns the projected, L2-normalised embeddings in every transformers
    # version (get_*_features changed their return type in transformers 5).
    out = model(
        input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device),
        pixel_values=pixels.to(device, model.dtype),
    )
    image_embeds = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
    text_embeds = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
    return (image_embeds * text_embeds).sum(-1).cpu()


def clip_image_processor_class():
    """The PIL CLIP image processor class: transformers 5's ``CLIPImageProcessorPil`` (its
    default ``CLIPImageProcessor`` switches to torchvision's resize whenever torchvision is
    installed), or ``CLIPImageProcessor`` of earlier versions, which is the PIL one. The official
    evaluation's open_clip preprocessing resizes PIL images."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def load_clip(name: str, device: Union[str, torch.device, None] = None):
    """``(model, tokenizer, image_processor)`` of a transformers CLIP (hub name or folder) for
    :func:`clip_scores`, with the PIL image processor (:func:`clip_image_processor_class`)."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(name).eval()
    processor = clip_image_processor_class().from_pretrained(name)
    return (model.to(device) if device is not None else model), CLIPTokenizer.from_pretrained(name), processor


def summarize_clip(cosines: torch.Tensor) -> Dict[str, float]:
    """``clip_score`` = mean of 100 · max(cos, 0) (the usual definition) and ``clip_cosine`` =
    mean cosine (LinFusion's table) of per-image cosines."""
    cosines = cosines.double()
    return {"clip_score": float((100 * cosines.clamp(min=0)).mean()), "clip_cosine": float(cosines.mean())}


# ---------------------------------------------------------------------------------------------
# LongAlign's decomposed preference score


class PreferenceScores:
    """LongAlign's decomposed score of every image against its caption, batch by batch.

    The text embeddings (sentence means) of all captions are computed at construction, the
    common direction e is their normalised mean (:func:`linfusion_ops.longalign.preference.common_direction`
    over the whole evaluated set), then each image batch given to :meth:`update` (in caption
    order) is scored with :func:`linfusion_ops.longalign.preference.decomposed_score`.

    Args:
        captions: one per image, in image order.
        scorer: a :class:`linfusion_ops.longalign.preference.CLIPPreferenceScorer` (for evaluation built
            with ``crop_size=None`` so that every image is scored whole and deterministically).
        weight: w of the total score ``relevant + w · irrelevant`` (LongAlign: 0.3).
        text_batch_size: captions per text-tower call.
    """

    def __init__(self, captions: Sequence[str], scorer, *, weight: float = 0.3, text_batch_size: int = 64):
        from ..longalign.preference import common_direction

        self.captions = list(captions)
        if not self.captions:
            raise ValueError("PreferenceScores: no captions")
        self.scorer, self.weight = scorer, weight
        self.text = torch.cat([
            scorer.text_embeds(self.captions[i:i + text_batch_size]) for i in range(0, len(self.captions), text_batch_size)
        ])
        self.direction = common_direction(self.text)
        self.parts = {"relevant": [], "irrelevant": [], "score": []}
        self.count = 0

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> None:
        """Score the next (B, 3, H, W) uint8 images against the next B captions."""
        from ..longalign.preference import decomposed_score

        stop = self.count + images.shape[0]
        if stop > len(self.captions):
            raise ValueError(f"PreferenceScores: more images than the {len(self.captions)} captions")
        features = self.scorer.image_features(images.to(self.text.device).float() / 255)
        result = decomposed_score(features, self.text[self.count:stop].to(features.dtype), self.direction, self.weight)
        for key, values in self.parts.items():
            values.append(getattr(result, key).double().cpu())
        self.count = stop

    def result(self) -> Dict[str, torch.Tensor]:
        """(N,) float64 CPU tensors ``relevant``, ``irrelevant``, ``score`` (the total with
        ``weight``) and ``plain`` (relevant + irrelevant: the undecomposed t·f)."""
        if self.count != len(self.captions):
            raise ValueError(f"PreferenceScores: {self.count} images scored for {len(self.captions)} captions")
        out = {key: torch.cat(values) for key, values in self.parts.items()}
        out["plain"] = out["relevant"] + out["irrelevant"]
        return out


# ---------------------------------------------------------------------------------------------
# A folder of samples, every metric in one pass over its images


def resolve_samples(
    folder: PathLike, captions: Optional[Sequence[str]] = None, how_many: Optional[int] = None
) -> Tuple[List[str], Optional[List[str]]]:
    """The image paths of a samples folder and their captions, checked before any metric runs.

    With ``captions`` (e.g. the official ``captions.txt``), image i in natural file order gets
    caption i. Without, a generate folder's ``metadata.jsonl`` gives files and captions; a plain
    folder gives no captions (FID only). ``how_many``: the first ``how_many`` samples (the
    official ``--how_many 30000``). One-line errors for a generate folder whose run has not
    finished (``run.json`` without ``metadata.jsonl``), a folder without images, fewer captions
    than images, files the metadata lists but the folder lacks, and images of mixed sizes."""
    from .generate import METADATA_FILE, RUN_FILE, read_metadata

    folder = os.fspath(folder)
    if os.path.isfile(os.path.join(folder, RUN_FILE)) and not os.path.isfile(os.path.join(folder, METADATA_FILE)):
        raise ValueError(
            f"{folder!r}: generation incomplete ({RUN_FILE} without {METADATA_FILE}); finish it by rerunning the "
            "same generate command, which skips the samples already written"
        )
    if captions is None and os.path.isfile(os.path.join(folder, METADATA_FILE)):
        records = read_metadata(folder)
        paths = [os.path.join(folder, r["file"]) for r in records]
        captions = [r["caption"] for r in records]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"{folder!r}: {len(missing)} samples of {METADATA_FILE} are missing (first: {missing[0]})")
    else:
        paths = list_images(folder)
        if captions is not None:
            captions = list(captions)
            if len(captions) < len(paths[:how_many]):
                raise ValueError(f"{folder!r}: {len(paths[:how_many])} images but only {len(captions)} captions")
    if how_many is not None:
        if isinstance(how_many, bool) or not isinstance(how_many, int) or how_many <= 0:
            raise ValueError(f"--how-many must be a positive int, got {how_many!r}")
        if how_many > len(paths):
            raise ValueError(f"--how-many {how_many}: {folder!r} holds only {len(paths)} samples")
        paths = paths[:how_many]
    if not paths:
        raise ValueError(f"{folder!r}: no images found")
    captions = captions[:len(paths)] if captions is not None else None
    check_image_sizes(paths, f"samples in {folder!r}")
    return paths, captions


@torch.no_grad()
def evaluate_samples(
    paths: Sequence[str],
    captions: Optional[Sequence[str]] = None,
    *,
    extractor=None,
    reference: Optional[FeatureStatistics] = None,
    clip=None,
    clip_prefix: str = "A photo depicts ",
    scorer=None,
    preference_weight: float = 0.3,
    eval_res: Optional[int] = 256,
    batch_size: int = 50,
    progress: bool = False,
) -> Dict[str, Any]:
    """Every requested metric of the images ``paths`` (read once, with ``eval_res``).

    Args:
        paths, captions: from :func:`resolve_samples` (captions are needed for CLIP and the
            preference score).
        extractor, reference: FID against ``reference`` statistics (:func:`reference_statistics`,
            computed with the same ``extractor`` and ``eval_res``) with ``extractor``'s features.
        clip: ``(model, tokenizer, image_processor)`` for :func:`clip_scores`.
        scorer, preference_weight: :class:`PreferenceScores` with this scorer and weight.

    Returns:
        A JSON-able dict: ``num_samples``, ``eval_res`` and, per metric, ``fid``;
        ``clip_score`` and ``clip_cosine`` (:func:`summarize_clip`); ``preference``: the means of
        ``relevant``, ``irrelevant``, ``total`` (with ``weight``) and ``plain``.
    """
    paths = list(paths)
    if (clip is not None or scorer is not None) and captions is None:
        raise ValueError("CLIP and preference scores need captions (a metadata.jsonl or --captions)")
    if (extractor is None) != (reference is None):
        raise ValueError("evaluate_samples: FID needs both an extractor and reference statistics")
    if extractor is None and clip is None and scorer is None:
        raise ValueError("nothing to compute: ask for FID (reference images or statistics), a CLIP model or a preference model")
    stats = FeatureStatistics.empty(extractor.feature_dim) if extractor is not None else None
    cosines = []
    preference = PreferenceScores(captions, scorer, weight=preference_weight) if scorer is not None else None
    batches = iter_image_batches(paths, batch_size, eval_res)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-len(paths) // batch_size), desc="metrics", unit="batch")
    start = 0
    for batch in batches:
        stop = start + batch.shape[0]
        if stats is not None:
            stats.update(extractor(batch.to(_extractor_device(extractor))))
        if clip is not None:
            cosines.append(clip_scores(batch, captions[start:stop], *clip, prefix=clip_prefix))
        if preference is not None:
            preference.update(batch)
        start = stop
    out: Dict[str, Any] = {"num_samples": len(paths), "eval_res": eval_res}
    if stats is not None:
        out["fid"] = fid(stats, reference)
        out["fid_reference_count"] = reference.count
    if clip is not None:
        out.update(summarize_clip(torch.cat(cosines)))
        out["clip_prefix"] = clip_prefix
    if preference is not None:
        scores = preference.result()
        out["preference"] = {
            "relevant": float(scores["relevant"].mean()),
            "irrelevant": float(scores["irrelevant"].mean()),
            "total": float(scores["score"].mean()),
            "plain": float(scores["plain"].mean()),
            "weight": preference_weight,
        }
    return out
