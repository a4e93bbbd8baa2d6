"""FID (Fréchet distance, the FID Inception-v3, cached reference statistics), CLIP score and
LongAlign's decomposed score of linfusion_ops.evaluation.metrics, on tiny random networks."""

import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

from linfusion_ops.evaluation import cli
from linfusion_ops.evaluation.inception import FIDInceptionV3, load_fid_inception
from linfusion_ops.evaluation.metrics import (
    FeatureStatistics,
    PreferenceScores,
    clip_image_processor_class,
    clip_scores,
    evaluate_samples,
    feature_statistics,
    fid,
    frechet_distance,
    load_clip,
    load_image,
    reference_statistics,
    resolve_samples,
    summarize_clip,
)

TINY_WIDTH = 1 / 16  # 128-d features


def scipy_frechet(mu1, sigma1, mu2, sigma2):
    """The textbook float64 formula with scipy's matrix square root (pytorch-fid's way)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def random_gaussian(rng, dim):
    a = rng.standard_normal((dim, dim))
    return rng.standard_normal(dim), a @ a.T / dim + 0.1 * np.eye(dim)


def write_images(folder, arrays, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / (names[i] if names else f"{i:06d}.png"))
    return folder


def random_images(n, size=(40, 48), seed=0):
    rng = np.random.default_rng(seed)
    # Smooth random images (upsampled noise), so that resizing changes them gently.
    small = rng.integers(0, 256, size=(n, size[1] // 8, size[0] // 8, 3)).astype(np.float32)
    big = F.interpolate(torch.from_numpy(small).permute(0, 3, 1, 2), size=(size[1], size[0]), mode="bilinear")
    return [a for a in big.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()]


@pytest.fixture(scope="module")
def tiny_inception():
    torch.manual_seed(0)
    model = FIDInceptionV3(width=TINY_WIDTH)
    with torch.no_grad():  # He-initialised convolutions keep the features apart through 94 layers
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.normal_(0, 0.1)
    return model


# ---------------------------------------------------------------------------------------------
# Fréchet distance


@pytest.mark.parametrize("dim", [1, 7, 64])
def test_frechet_distance_matches_scipy_on_known_gaussians(dim):
    rng = np.random.default_rng(dim)
    (mu1, s1), (mu2, s2) = random_gaussian(rng, dim), random_gaussian(rng, dim)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-9, abs=1e-10)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_zero_for_identical_sets_even_when_singular():
    rng = np.random.default_rng(3)
    features = rng.standard_normal((10, 32))  # 10 samples in 32 dims: a rank-9 covariance
    stats = FeatureStatistics.empty(32)
    stats.update(features)
    assert abs(frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)) < 1e-12 * np.trace(stats.sigma)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="frechet_distance"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_equal_numpy_in_any_order_and_batching():
    rng = np.random.default_rng(4)
    features = rng.standard_normal((50, 6)) * 3 + 1
    stats = FeatureStatistics.empty(6)
    for chunk in np.array_split(features, 7):
        stats.update(torch.from_numpy(chunk).float())
    np.testing.assert_allclose(stats.mu, features.astype(np.float32).mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(features.astype(np.float32), rowvar=False), rtol=1e-6, atol=1e-9)
    shuffled = FeatureStatistics.empty(6)
    shuffled.update(torch.from_numpy(features[rng.permutation(50)]).float())
    np.testing.assert_allclose(shuffled.sigma, stats.sigma, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Inception, images, FID


def test_fid_inception_real_size_shapes():
    model = FIDInceptionV3()
    assert model.feature_dim == 2048
    assert sum(p.numel() for p in model.parameters()) == 23_850_960  # pytorch-fid's InceptionV3
    assert model(torch.rand(1, 3, 64, 80)).shape == (1, 2048)


def stem_input(model, images):
    """What the network's first convolution receives for ``images``."""
    seen = []
    handle = model.Conv2d_1a_3x3.conv.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        model(images)
    finally:
        handle.remove()
    return seen[0]


def test_clean_resize_is_clean_fids_pil_bicubic_on_float_channels(tiny_inception):
    # Pixel noise: sharp edges, so that the bicubic filter overshoots.
    images = torch.from_numpy(np.random.default_rng(11).integers(0, 256, size=(2, 3, 32, 40), dtype=np.uint8))
    expected = np.stack([
        np.stack([
            np.asarray(Image.fromarray(channel.numpy().astype(np.float32)).resize((299, 299), Image.BICUBIC))
            for channel in image
        ]) for image in images
    ])
    # Not clipped to [0, 255] nor quantised: the bicubic overshoot reaches the network.
    assert expected.min() < 0 or expected.max() > 255
    fed = stem_input(tiny_inception, images)
    np.testing.assert_array_equal(fed.numpy(), (expected - 128) / 128)
    # A float image in [0, 1] of the same pixels gives the same features.
    torch.testing.assert_close(tiny_inception(images.float() / 255), tiny_inception(images), rtol=1e-5, atol=1e-5)


def test_legacy_pytorch_resize_is_bilinear_and_named_apart(tiny_inception):
    legacy = FIDInceptionV3(width=TINY_WIDTH, resize="legacy-pytorch")
    legacy.load_state_dict(tiny_inception.state_dict())
    images = torch.from_numpy(np.random.default_rng(12).integers(0, 256, size=(2, 3, 32, 40), dtype=np.uint8))
    expected = 2 * F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    fed = stem_input(legacy, images)
    torch.testing.assert_close(fed, expected, rtol=0, atol=0)
    assert (fed - stem_input(tiny_inception, images)).abs().max() > 0.05
    assert "resize=legacy-pytorch" in legacy.name and "resize=clean" in tiny_inception.name
    with pytest.raises(ValueError, match="resize must be one of"):
        FIDInceptionV3(width=TINY_WIDTH, resize="bicubic")


def test_load_fid_inception_round_trip_and_errors(tmp_path, tiny_inception):
    path = tmp_path / "tiny_inception.pth"
    torch.save(tiny_inception.state_dict(), path)
    loaded = load_fid_inception(path)
    x = torch.rand(3, 3, 30, 30)
    torch.testing.assert_close(loaded(x), tiny_inception(x), rtol=0, atol=0)
    assert "sha256:" in loaded.name

    with pytest.raises(FileNotFoundError, match="--inception-weights") as error:
        load_fid_inception(tmp_path / "missing.pth")
    assert "\n" not in str(error.value)
    torch.save({"weight": torch.zeros(3)}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="not an FID Inception-v3 state dict") as error:
        load_fid_inception(tmp_path / "foreign.pth")
    assert "\n" not in str(error.value)


def test_load_image_center_crops_and_lanczos_resizes(tmp_path):
    array = random_images(1, size=(40, 24))[0]  # 40 wide, 24 high
    Image.fromarray(array).save(tmp_path / "a.png")
    expected = np.asarray(Image.fromarray(array[:, 8:32]).resize((16, 16), Image.LANCZOS))
    np.testing.assert_array_equal(load_image(tmp_path / "a.png", 16), expected)
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), array)


def test_fid_invariant_to_image_order_and_zero_for_identical_sets(tmp_path, tiny_inception):
    images = random_images(12, seed=1)
    reference = feature_statistics(write_images(tmp_path / "ref", random_images(12, seed=2)), tiny_inception, eval_res=32, batch_size=5)
    ordered = write_images(tmp_path / "a", images)
    order = np.random.default_rng(0).permutation(12)
    shuffled = write_images(tmp_path / "b", [images[i] for i in order])
    stats_a = feature_statistics(ordered, tiny_inception, eval_res=32, batch_size=4)
    stats_b = feature_statistics(shuffled, tiny_inception, eval_res=32, batch_size=5)
    value = fid(stats_a, reference)
    assert value > 0
    assert fid(stats_b, reference) == pytest.approx(value, rel=1e-6)
    assert abs(fid(stats_a, stats_b)) < 1e-6 * value


def test_reference_statistics_cached_with_settings_hash(tmp_path, tiny_inception):
    # COCO-like: mixed sizes are fine for the reference, as every image is cropped and resized.
    ref = tmp_path / "ref"
    write_images(ref, random_images(4, size=(40, 48), seed=3) + random_images(4, size=(48, 32), seed=4))
    cache = tmp_path / "ref.npz"
    first = reference_statistics(tiny_inception, ref_dir=ref, ref_stats=cache, eval_res=32, batch_size=3)
    assert cache.is_file() and first.count == 8
    with np.load(cache) as data:
        np.testing.assert_allclose(data["mu"], first.mu)
        np.testing.assert_allclose(data["sigma"], first.sigma)
        assert int(data["count"]) == 8 and len(str(data["settings_hash"])) == 16
    again = reference_statistics(tiny_inception, ref_dir=None, ref_stats=cache, eval_res=32)
    np.testing.assert_array_equal(again.sigma, first.sigma)
    with pytest.raises(ValueError, match="other settings") as error:
        reference_statistics(tiny_inception, ref_stats=cache, eval_res=64)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="--ref-dir"):
        reference_statistics(tiny_inception, ref_stats=tmp_path / "absent.npz")


def test_samples_of_mixed_sizes_are_refused(tmp_path):
    folder = write_images(tmp_path / "s", random_images(2, size=(40, 48)) + random_images(1, size=(48, 40)))
    with pytest.raises(ValueError, match="mixed sizes") as error:
        resolve_samples(folder)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# CLIP score and the decomposed preference score


def tiny_clip(tmp_path):
    from tests.helpers.tiny_models import tiny_clip_model, write_tokenizer

    processor = clip_image_processor_class()(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return tiny_clip_model(image_size=16), write_tokenizer(tmp_path / "tok"), processor


CAPTIONS = ["a red cat", "two blue dogs", "green tree. big sky", "a house by the sea", "snow", "night city"]


def test_clip_score_equals_hand_computation(tmp_path):
    pytest.importorskip("diffusers")
    model, tokenizer, processor = tiny_clip(tmp_path)
    images = torch.from_numpy(np.stack(random_images(6, size=(24, 20), seed=5))).permute(0, 3, 1, 2)
    cos = clip_scores(images, CAPTIONS, model, tokenizer, processor, prefix="a photo depicts ")

    with torch.no_grad():
        pixels = processor(images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt")["pixel_values"]
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tokens = tokenizer(["a photo depicts " + c for c in CAPTIONS], padding=True, truncation=True, return_tensors="pt")
        text = model.text_projection(model.text_model(**tokens).pooler_output)
    expected = (image / image.norm(dim=-1, keepdim=True) * (text / text.norm(dim=-1, keepdim=True))).sum(-1)
    torch.testing.assert_close(cos, expected, rtol=1e-5, atol=1e-6)
    summary = summarize_clip(cos)
    assert summary["clip_score"] == pytest.approx(float((100 * expected.clamp(min=0)).mean()), rel=1e-5)
    assert summary["clip_cosine"] == pytest.approx(float(expected.mean()), rel=1e-5, abs=1e-7)


def test_preference_scores_equal_hand_decomposition(tmp_path):
    pytest.importorskip("diffusers")
    from linfusion_ops.longalign.preference import CLIPPreferenceScorer

    model, tokenizer, _ = tiny_clip(tmp_path)
    scorer = CLIPPreferenceScorer(model, tokenizer, crop_size=None, random_crop=False)
    images = torch.from_numpy(np.stack(random_images(6, size=(24, 24), seed=6))).permute(0, 3, 1, 2)
    scores = PreferenceScores(CAPTIONS, scorer, weight=0.3, text_batch_size=4)
    for chunk in images.split(4):
        scores.update(chunk)
    result = scores.result()

    with torch.no_grad():
        t = scorer.text_embeds(CAPTIONS).double()
        f = F.normalize(scorer.image_features(images.float() / 255).double(), dim=-1)
    e = F.normalize(t.mean(0), dim=0)
    irrelevant = (t @ e) * (f @ e)
    relevant = (t * f).sum(-1) - irrelevant
    torch.testing.assert_close(result["relevant"], relevant, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["irrelevant"], irrelevant, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["score"], relevant + 0.3 * irrelevant, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["plain"], (t * f).sum(-1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The metrics command


def saved_tiny_clip(tmp_path):
    """tiny_clip's three parts and the folder they are saved in (a --clip-model)."""
    model, tokenizer, processor = tiny_clip(tmp_path)
    clip_dir = tmp_path / "clip"
    for part in (model, tokenizer, processor):
        part.save_pretrained(clip_dir)
    return (model, tokenizer, processor), clip_dir


def test_metrics_cli_end_to_end(tmp_path, tiny_inception, capsys):
    pytest.importorskip("diffusers")
    (model, tokenizer, processor), clip_dir = saved_tiny_clip(tmp_path)
    weights = tmp_path / "inception.pth"
    torch.save(tiny_inception.state_dict(), weights)
    samples = write_images(tmp_path / "samples", random_images(6, size=(32, 32), seed=7))
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    ref = write_images(tmp_path / "ref", random_images(5, size=(40, 48), seed=8) + random_images(3, size=(48, 40), seed=9))
    args = [
        "metrics", "--samples", str(samples), "--captions", str(tmp_path / "captions.txt"), "--ref-dir", str(ref),
        "--ref-stats", str(tmp_path / "ref.npz"), "--inception-weights", str(weights), "--clip-model", str(clip_dir),
        "--preference-model", str(clip_dir), "--eval-res", "32", "--batch-size", "4", "--no-progress",
    ]
    assert cli.main(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("n=6 @32px | FID ") and "CLIP score" in line and "preference total" in line
    result = json.loads((samples / "metrics.json").read_text())
    loaded = load_clip(str(clip_dir))
    assert type(loaded[2]) is type(processor) and loaded[2].size == processor.size

    paths, captions = resolve_samples(samples, CAPTIONS)
    expected = evaluate_samples(
        paths, captions, extractor=tiny_inception,
        reference=feature_statistics(ref, tiny_inception, eval_res=32, same_size=False),
        clip=(model, tokenizer, processor), eval_res=32, batch_size=3,
    )
    assert result["fid"] == pytest.approx(expected["fid"], rel=1e-6)
    assert result["clip_score"] == pytest.approx(expected["clip_score"], rel=1e-5)
    assert result["fid_reference_count"] == 8 and os.path.isfile(tmp_path / "ref.npz")
    # The cached statistics serve a second run without the reference images.
    args[args.index("--ref-dir") : args.index("--ref-dir") + 2] = []
    assert cli.main(args + ["--out", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["fid"] == pytest.approx(result["fid"], rel=1e-12)


def test_metrics_cli_missing_weights_is_one_line_and_writes_nothing(tmp_path, capsys):
    samples = write_images(tmp_path / "samples", random_images(3, size=(32, 32)))
    code = cli.main([
        "metrics", "--samples", str(samples), "--ref-dir", str(samples), "--ref-stats", str(tmp_path / "ref.npz"),
        "--inception-weights", str(tmp_path / "nope.pth"), "--no-progress",
    ])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--inception-weights" in err
    assert not (tmp_path / "ref.npz").exists() and not (samples / "metrics.json").exists()


def test_metrics_of_a_generate_folder_use_its_metadata_and_refuse_an_unfinished_run(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from linfusion_ops.evaluation.generate import generate, plan_samples
    from tests.helpers.tiny_models import NoisePipeline

    _, clip_dir = saved_tiny_clip(tmp_path)
    samples = tmp_path / "samples"
    plan = plan_samples(CAPTIONS, range(10, 16))
    with pytest.raises(KeyboardInterrupt):
        generate(NoisePipeline(die_at=2), plan, str(samples), batch_size=4, height=24, width=24, progress=False)
    args = ["metrics", "--samples", str(samples), "--clip-model", str(clip_dir), "--eval-res", "16", "--no-progress"]
    with pytest.raises(ValueError, match="generation incomplete") as error:
        resolve_samples(samples)
    assert "\n" not in str(error.value)
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    capsys.readouterr()
    assert cli.main(args + ["--captions", str(tmp_path / "captions.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "generation incomplete" in err and not (samples / "metrics.json").exists()

    generate(NoisePipeline(), plan, str(samples), batch_size=4, height=24, width=24, progress=False)
    paths, captions = resolve_samples(samples)
    assert captions == CAPTIONS and [os.path.basename(p) for p in paths] == [f"{i:06d}.png" for i in range(6)]
    assert cli.main(args) == 0
    from_metadata = json.loads((samples / "metrics.json").read_text())
    assert cli.main(args + ["--captions", str(tmp_path / "captions.txt"), "--out", str(tmp_path / "m.json")]) == 0
    from_file = json.loads((tmp_path / "m.json").read_text())
    assert from_metadata["clip_cosine"] == from_file["clip_cosine"] and from_metadata["num_samples"] == 6
    # A caption in another order scores differently: the metadata's captions are matched by file.
    (tmp_path / "shuffled.txt").write_text("\n".join(CAPTIONS[::-1]) + "\n")
    assert cli.main(args + ["--captions", str(tmp_path / "shuffled.txt"), "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["clip_cosine"] != from_file["clip_cosine"]
