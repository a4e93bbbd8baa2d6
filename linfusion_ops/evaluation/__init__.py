"""linfusion_ops.evaluation: evaluate like the papers (docs/evaluation.md).

* `generate`, `plan_samples`, `parse_seeds`, `read_captions`, `load_pipeline`: per-sample-seeded,
  resumable, multi-process sample generation with any diffusers pipeline.
* `FIDInceptionV3`, `load_fid_inception`: the FID Inception-v3 (pool3, 2048-d).
* `frechet_distance`, `FeatureStatistics`, `reference_statistics`, `clip_scores`,
  `PreferenceScores`, `evaluate_samples`: FID, CLIP score, LongAlign's decomposed score.
* `main`: the CLI (`python -m linfusion_ops.evaluation generate|metrics`).

Every name loads its module on first use.
"""

from ..optional import import_module

_LAZY = {
    "Sample": ".generate",
    "generate": ".generate",
    "plan_samples": ".generate",
    "parse_seeds": ".generate",
    "read_captions": ".generate",
    "dataset_captions": ".generate",
    "read_metadata": ".generate",
    "distributed_setup": ".generate",
    "load_pipeline": ".generate",
    "FeatureExtractor": ".inception",
    "FIDInceptionV3": ".inception",
    "load_fid_inception": ".inception",
    "FeatureStatistics": ".metrics",
    "frechet_distance": ".metrics",
    "feature_statistics": ".metrics",
    "reference_statistics": ".metrics",
    "save_statistics": ".metrics",
    "load_statistics": ".metrics",
    "fid": ".metrics",
    "clip_scores": ".metrics",
    "load_clip": ".metrics",
    "clip_image_processor_class": ".metrics",
    "summarize_clip": ".metrics",
    "PreferenceScores": ".metrics",
    "resolve_samples": ".metrics",
    "evaluate_samples": ".metrics",
    "main": ".cli",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'linfusion_ops.evaluation' has no attribute {name!r}")


__all__ = sorted(_LAZY)
