"""What the evaluation metrics cost per 1,000 samples on this machine's CPU, measured with the
real-size networks (random weights: the cost does not depend on the values) on a few hundred
samples (fewer for the big CLIP towers) and extrapolated linearly (every metric is a pass over
the images in batches, plus one Fréchet distance at the end).

Cases, each with the images the official protocol evaluates (512 x 512 PNGs, or 1024 x 1024 for
SDXL, read with ``eval_res`` 256: centre crop + Lanczos resize):

* ``read``: PNG decode + crop + resize alone (every metric pays it once per pass), at 512 and
  1024 px;
* ``fid_features``: the FID Inception-v3 (2048-d pool3) with each resize to 299 (``clean``:
  clean-fid's PIL bicubic, the default; ``legacy-pytorch``: bilinear), batch 50, plus the float64
  statistics update; ``frechet_distance``: one 2048-d distance (paid once per FID);
* ``clip_score``: ``clip_scores`` with a transformers CLIPModel of ViT-B/32, ViT-L/14 (OpenAI's
  configs) and ViT-g/14 shapes (LAION's ViT-g-14, the official evaluation's model), random init,
  COCO-length captions;
* ``preference``: LongAlign's decomposed score (``PreferenceScores``: sentence-mean text
  embeddings, then the image tower) with a ViT-L/14-shaped CLIPModel.

Token ids come from a hashing word tokenizer (no vocabulary files offline); the cost does not
depend on the ids, only on the sequence lengths, which match CLIP's tokenizer for these captions
up to a few tokens.

    python -m benchmarks.bench_eval_metrics [--json benchmarks/results/eval_metrics_cpu.json]
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from benchmarks.common import git_commit
from linfusion_ops.evaluation.inception import FIDInceptionV3
from linfusion_ops.evaluation.metrics import (
    FeatureStatistics,
    PreferenceScores,
    clip_image_processor_class,
    clip_scores,
    frechet_distance,
    iter_image_batches,
    list_images,
)

WORDS = "a an the man woman dog cat red blue green small large street table plate of on with in next to near sitting standing two three pizza bus train field".split()


class HashingTokenizer:
    """Stands in for CLIPTokenizer: BOS, one id per word, EOS; padding and truncation as the
    calls of clip_scores and sentence_mean_text_embeds ask."""

    model_max_length = 77

    def __call__(self, texts, padding=True, truncation=True, max_length=None, return_tensors="pt"):
        max_length = max_length or self.model_max_length
        ids = [[49406] + [1000 + hash(w) % 40000 for w in t.lower().split()] + [49407] for t in texts]
        ids = [i[: max_length - 1] + [49407] if truncation and len(i) > max_length else i for i in ids]
        length = max_length if padding == "max_length" else max(len(i) for i in ids)
        mask = [[1] * len(i) + [0] * (length - len(i)) for i in ids]
        ids = [i + [49407] * (length - len(i)) for i in ids]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


def captions(n, seed=0):
    rng = np.random.default_rng(seed)
    # COCO captions: one sentence of about 10 words; LongAlign's prompts are longer, several sentences.
    return [" ".join(rng.choice(WORDS, size=rng.integers(8, 14))) + "." for _ in range(n)]


def clip_config(kind):
    from transformers import CLIPConfig

    if kind == "ViT-B/32":
        text = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12)
        vision = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, patch_size=32)
        projection = 512
    elif kind == "ViT-L/14":
        text = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, patch_size=14)
        projection = 768
    elif kind == "ViT-g/14":
        text = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24)
        vision = dict(hidden_size=1408, intermediate_size=6144, num_attention_heads=16, num_hidden_layers=40, patch_size=14)
        projection = 1024
    else:
        raise ValueError(kind)
    return CLIPConfig(text_config=text, vision_config=dict(vision, image_size=224), projection_dim=projection)


def write_pngs(folder, n, size=512, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(size // 16, size // 16, 3), dtype=np.uint8)
    for i in range(n):
        small = np.roll(base, i, axis=0) ^ np.uint8(i % 256)
        image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        image.save(folder / f"{i:06d}.png")


def timed(fn):
    """(wall seconds, result); the CPU seconds of this process go to ``timed.cpu``."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    timed.cpu = time.process_time() - cpu
    return time.perf_counter() - start, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-inception", type=int, default=200)
    parser.add_argument("--n-clip-b32", type=int, default=200)
    parser.add_argument("--n-clip-l14", type=int, default=50)
    parser.add_argument("--n-clip-g14", type=int, default=10)
    parser.add_argument("--n-read-1024", type=int, default=50)
    parser.add_argument("--n-preference", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=50, help="images per batch (the last CLIP batch may be cut short)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    n_images = max(args.n_inception, args.n_clip_b32, args.n_clip_l14, args.n_clip_g14, args.n_preference)
    cases = []

    def record(metric, model, n, seconds, **extra):
        # On a shared machine the wall time grows with the other processes' load; the process's
        # CPU seconds (all its threads) are the work itself.
        row = dict(metric=metric, model=model, n=n, batch=args.batch_size, seconds=round(seconds, 3),
                   seconds_per_1000=round(seconds / n * 1000, 1), cpu_seconds=round(timed.cpu, 3),
                   cpu_seconds_per_1000=round(timed.cpu / n * 1000, 1), **extra)
        cases.append(row)
        print(f"{metric:17s} {model:36s} n={n:4d}  {seconds:8.2f} s  -> {row['seconds_per_1000']:9.1f} s / 1000 samples "
              f"(CPU {row['cpu_seconds_per_1000']:9.1f} s / 1000)")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_pngs(folder, n_images)
        paths = list_images(folder)
        text = captions(n_images)

        def read(n):
            return [b for b in iter_image_batches(paths[:n], args.batch_size, 256)]

        seconds, batches = timed(lambda: read(n_images))
        record("read", "512px PNG -> 256 (lanczos)", n_images, seconds)
        big = folder / "1024"
        big.mkdir()
        write_pngs(big, args.n_read_1024, size=1024)
        seconds, _ = timed(lambda: list(iter_image_batches(list_images(big), args.batch_size, 256)))
        record("read", "1024px PNG -> 256 (lanczos)", args.n_read_1024, seconds)

        for resize in ("clean", "legacy-pytorch"):
            inception = FIDInceptionV3(resize=resize)
            stats = FeatureStatistics.empty(2048)

            def inception_pass():
                with torch.no_grad():
                    for batch in batches[: -(-args.n_inception // args.batch_size)]:
                        stats.update(inception(batch))

            inception(batches[0][:2])  # warm-up
            seconds, _ = timed(inception_pass)
            record("fid_features", f"FID Inception-v3 (23.9M), {resize}", stats.count, seconds)
        rng = np.random.default_rng(0)
        a = rng.standard_normal((4096, 2048)) / 30
        sigma1, sigma2 = np.cov(a, rowvar=False), np.cov(a[::-1] * 1.1 + 0.01, rowvar=False)
        seconds, value = timed(lambda: frechet_distance(a.mean(0), sigma1, a.mean(0) * 0.9, sigma2))
        cases.append(dict(metric="frechet_distance", model="D=2048 float64", seconds=round(seconds, 3),
                          cpu_seconds=round(timed.cpu, 3)))
        print(f"frechet_distance  D=2048 float64: {seconds:.2f} s (CPU {timed.cpu:.2f} s) once per FID")

        from transformers import CLIPModel

        processor = clip_image_processor_class()()
        tokenizer = HashingTokenizer()
        for kind, n in (("ViT-B/32", args.n_clip_b32), ("ViT-L/14", args.n_clip_l14), ("ViT-g/14", args.n_clip_g14)):
            model = CLIPModel(clip_config(kind)).eval()
            params = sum(p.numel() for p in model.parameters()) / 1e6
            clip_scores(batches[0][:2], text[:2], model, tokenizer, processor)  # warm-up

            def clip_pass():
                done = 0
                for batch in batches:
                    take = batch[: n - done]
                    clip_scores(take, text[done:done + take.shape[0]], model, tokenizer, processor)
                    done += take.shape[0]
                    if done >= n:
                        return done

            seconds, done = timed(clip_pass)
            record("clip_score", f"CLIP {kind} ({params:.0f}M)", done, seconds)
            if kind == "ViT-L/14":
                from linfusion_ops.longalign.preference import CLIPPreferenceScorer

                scorer = CLIPPreferenceScorer(model, tokenizer, crop_size=None, random_crop=False)

                def preference_pass():
                    m = args.n_preference
                    scores = PreferenceScores(text[:m], scorer)
                    for batch in batches:
                        take = batch[: m - scores.count]
                        scores.update(take)
                        if scores.count >= m:
                            return scores.result()

                seconds, result = timed(preference_pass)
                record("preference", f"decomposed, CLIP {kind} ({params:.0f}M)", len(result["score"]), seconds)
            del model

    out = {
        "benchmark": "bench_eval_metrics",
        "commit": git_commit(),
        "device": f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, "
                  f"{os.cpu_count()} cores visible",
        "load_average_at_start": load_at_start,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "eval_res": 256,
        "cases": cases,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "cases"}))


if __name__ == "__main__":
    main()
