"""LongAlign preference optimization (linfusion_ops.longalign.preference), offline with tiny random CLIP,
UNet and VAE models: the decomposed score, the common direction (locally and over 2 gloo ranks),
sentence-mean text embeddings against a literal port of the official loop, the differentiable
scorer, the reward sampler (call counts, truncated backprop, checkpointing, LinFusion), the
LoRA layout and its lora_vis.pt conversion, and the fine-tuning CLI."""

import datetime
import json
import os
import re
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tests.helpers.official import official_lora_layers  # noqa: E402
from tests.helpers.tiny_models import make_linfusion, make_unet, tiny_clip_model, tiny_sd_pipeline, tiny_vae, write_tokenizer  # noqa: E402

from linfusion_ops.longalign import finetune  # noqa: E402
from linfusion_ops.longalign.lora import (  # noqa: E402
    add_longalign_lora,
    longalign_lora_targets,
    lora_from_longalign_list,
    lora_to_longalign_list,
)
from linfusion_ops.longalign.preference import (  # noqa: E402
    CLIPPreferenceScorer,
    RewardSampler,
    common_direction,
    decomposed_score,
    sentence_mean_text_embeds,
)

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red cat. a dog sits.", "a house", "big sky. old tree. warm light.", ""]


def random_terms(b=5, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(b, d, generator=g, dtype=torch.float64)
    t = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1) * 0.8
    return f, t, common_direction(t)


# ---------------------------------------------------------------------------------------------
# The decomposed score.
def test_relevant_plus_irrelevant_is_plain_score():
    f, t, e = random_terms()
    plain = (t * F.normalize(f, dim=-1)).sum(-1)
    for w in (0.0, 0.3, 1.0, 2.5):
        r = decomposed_score(f, t, e, weight=w)
        torch.testing.assert_close(r.relevant + r.irrelevant, plain, rtol=0, atol=1e-14)
        torch.testing.assert_close(r.score, r.relevant + w * r.irrelevant, rtol=0, atol=1e-14)
        torch.testing.assert_close(r.projection, t @ e, rtol=0, atol=1e-14)
    # The text-relevant part is the score of t with its e component removed.
    r = decomposed_score(f, t, e)
    torch.testing.assert_close(r.relevant, ((t - (t @ e)[:, None] * e) * r.image_embeds).sum(-1), rtol=0, atol=1e-14)
    assert (r.irrelevant.abs() > 1e-3).all(), "the test needs a non-trivial irrelevant term"


def test_weight_one_is_plain_score_and_zero_is_orthogonal_to_direction():
    f, t, e = random_terms(seed=1)
    f.requires_grad_()
    plain = (t * F.normalize(f, dim=-1)).sum(-1)
    (g_plain,) = torch.autograd.grad(plain.sum(), f)
    r = decomposed_score(f, t, e, weight=1.0)
    torch.testing.assert_close(r.score, plain, rtol=0, atol=1e-14)
    (g_one,) = torch.autograd.grad(r.score.sum(), f)
    torch.testing.assert_close(g_one, g_plain, rtol=0, atol=1e-14)

    r = decomposed_score(f, t, e, weight=0.0)
    (g_zero,) = torch.autograd.grad(r.score.sum(), r.image_embeds)
    assert (g_zero @ e).abs().max() < 1e-14
    # ...which the plain score's gradient is not.
    r = decomposed_score(f, t, e, weight=1.0)
    (g_one,) = torch.autograd.grad(r.score.sum(), r.image_embeds)
    assert (g_one @ e).abs().min() > 1e-3


def test_score_rejects_bad_shapes():
    f, t, e = random_terms()
    with pytest.raises(ValueError, match="text_embeds must have image_features' shape"):
        decomposed_score(f, t[:2], e)
    with pytest.raises(ValueError, match=r"direction must be a \(16,\) tensor"):
        decomposed_score(f, t, e[:3])
    with pytest.raises(ValueError, match="image_features must be a floating-point"):
        decomposed_score(f[0], t, e)
    with pytest.raises(ValueError, match="no text embeddings"):
        common_direction(t[:0])
    with pytest.raises(TypeError, match="sentence_mean_text_embeds: prompts must be a str or a list of str, got int"):
        sentence_mean_text_embeds(3, tokenizer=None, text_model=None)


def test_common_direction_is_normalised_mean():
    _, t, e = random_terms(seed=2)
    torch.testing.assert_close(e, t.mean(0) / t.mean(0).norm(), rtol=0, atol=1e-15)
    assert e.dtype == torch.float64 and not e.requires_grad
    e32 = common_direction(t.float().requires_grad_())
    assert e32.dtype == torch.float32 and not e32.requires_grad


# ---------------------------------------------------------------------------------------------
# The common direction over 2 gloo ranks with uneven batches.
SIZES = [3, 1]


def all_text(d=8):
    g = torch.Generator().manual_seed(7)
    return torch.randn(sum(SIZES), d, generator=g, dtype=torch.float64) + 0.5


def _direction_worker(rank, world, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        t = all_text()
        local = t.split(SIZES)[rank]
        e = common_direction(local, group=dist.group.WORLD)
        expected = F.normalize(t.mean(0), dim=0)
        torch.testing.assert_close(e, expected, rtol=0, atol=1e-14)
        # Checked before the all-reduce, so every rank raises and none waits.
        with pytest.raises(ValueError, match=r"common_direction: group: its backend \(.*gloo.*\) cannot reduce meta"):
            common_direction(local.to("meta"), group=dist.group.WORLD)
        failure = None
    except Exception:
        failure = traceback.format_exc()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(failure, f)
    os._exit(0)  # as in test_distributed: skip the gloo rank's interpreter teardown


def test_common_direction_over_ranks_is_global_mean(tmp_path):
    t = all_text()
    mean_of_means = F.normalize(torch.stack([p.mean(0) for p in t.split(SIZES)]).mean(0), dim=0)
    assert (mean_of_means - F.normalize(t.mean(0), dim=0)).abs().max() > 1e-3, "uneven batches must matter"
    mp.spawn(_direction_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    failures = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert failures == [None, None], "\n".join(f for f in failures if f)


# ---------------------------------------------------------------------------------------------
# Sentence-mean text embeddings and the scorer.
@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    tokenizer = write_tokenizer(tmp_path_factory.mktemp("clip_tok"))
    return tiny_clip_model().double(), tokenizer


def official_sentence_mean(prompts, tokenizer, model):
    """A literal port of LongAlign's loop (tools.collate_fn's split, loss.dense_score's mean)."""
    pattern = re.compile(r'"!|\.|\?|;"')
    sentence_list, sentence_index = [], []
    for ic, caption in enumerate(prompts):
        pieces = [s + "." for s in re.split(pattern, caption) if len(s) > 0]
        if len(pieces) == 0:
            pieces = [caption]
        sentence_index += [ic] * len(pieces)
        sentence_list += pieces
    inputs = tokenizer(sentence_list, padding="max_length", truncation=True,
                       max_length=tokenizer.model_max_length, return_tensors="pt")
    out = model.get_text_features(**inputs)
    embs = out if isinstance(out, torch.Tensor) else out.pooler_output
    embs = embs / embs.norm(dim=-1, keepdim=True)
    result = torch.zeros_like(embs[: max(sentence_index) + 1])
    sentence_index = torch.tensor(sentence_index)
    for i in range(max(sentence_index) + 1):
        result[i] = embs[sentence_index == i].mean(dim=0)
    return result


def test_sentence_mean_matches_official_loop(clip):
    model, tokenizer = clip
    with torch.no_grad():
        ours = sentence_mean_text_embeds(PROMPTS, tokenizer, model)
        ref = official_sentence_mean(PROMPTS, tokenizer, model)
    assert ours.shape == (len(PROMPTS), 16)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-13)
    # Means of unit vectors: not renormalised.
    assert ours[0].norm() < 1 - 1e-6 and abs(ours[1].norm() - 1) < 1e-12


def test_scorer_gradient_reaches_pixels_not_text_tower(clip):
    model, tokenizer = clip
    scorer = CLIPPreferenceScorer(model, tokenizer, crop_size=12)
    model.requires_grad_(True)  # even trainable, the text tower runs under no_grad
    images = torch.rand(len(PROMPTS), 3, 16, 16, dtype=torch.float64, requires_grad=True)
    result = scorer(images, PROMPTS, generator=torch.Generator().manual_seed(0))
    result.score.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    text_params = [p for n, p in model.named_parameters() if n.startswith(("text_model.", "text_projection."))]
    assert text_params and all(p.grad is None for p in text_params)
    assert model.visual_projection.weight.grad is not None
    model.requires_grad_(False)
    model.zero_grad(set_to_none=True)


def test_scorer_preprocessing(clip):
    model, tokenizer = clip
    images = torch.rand(2, 3, 20, 20, dtype=torch.float64)
    scorer = CLIPPreferenceScorer(model, tokenizer, crop_size=12)
    a = scorer.preprocess(images, torch.Generator().manual_seed(3))
    b = scorer.preprocess(images, torch.Generator().manual_seed(3))
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)
    # A centred crop of a 12 x 12 image is the image itself; resize + CLIP normalisation.
    center = CLIPPreferenceScorer(model, tokenizer, crop_size=12, random_crop=False)
    crop = images[..., 4:16, 4:16]
    expected = F.interpolate(crop, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(center.preprocess(images), (expected - mean) / std, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="crop_size 504 is larger than the images"):
        CLIPPreferenceScorer(model, tokenizer).preprocess(images)
    with pytest.raises(ValueError, match=r"images must be a floating-point \(B, 3, H, W\)"):
        scorer.preprocess(images[:, :2])


# ---------------------------------------------------------------------------------------------
# The reward sampler.
def lora_unet(dtype=torch.float64, linfusion=False, seed=0):
    unet = make_unet("sd15", seed=seed).to(dtype)
    if linfusion:
        make_linfusion(unet).mount_to(unet=unet)
    unet.requires_grad_(False)
    add_longalign_lora(unet, rank=4)
    # Non-zero up weights, so that every LoRA weight gets a gradient.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return unet


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler()


def embeds(batch, dtype=torch.float64, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 9, 32, generator=g, dtype=dtype), torch.randn(batch, 9, 32, generator=g, dtype=dtype))


class UNetCalls:
    """Records each UNet forward: (batch, grad enabled, during backward)."""

    def __init__(self, unet):
        self.calls, self.in_backward = [], False
        unet.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls.append((args[0].shape[0], torch.is_grad_enabled(), self.in_backward))


@pytest.mark.parametrize("mode,steps,every,cfg", [("ddim", 20, 10, True), ("lcm", 4, None, False)])
def test_sampler_unet_calls_and_lora_only_gradients(clip, mode, steps, every, cfg):
    model, tokenizer = clip
    unet = lora_unet()
    sampler = RewardSampler(unet, tiny_vae().double().requires_grad_(False), scheduler(), mode=mode,
                            num_steps=steps, grad_every=every)
    calls = UNetCalls(unet)
    prompts = PROMPTS[:2]
    out = sampler(CLIPPreferenceScorer(model, tokenizer, crop_size=12), prompts, *embeds(2),
                  generator=torch.Generator().manual_seed(0))
    grad_steps = steps // (every or 1)
    # One UNet call per step, on the [prompt; negative] batch with CFG.
    assert [c[0] for c in calls.calls] == [4 if cfg else 2] * steps
    assert sum(c[1] for c in calls.calls) == grad_steps == len(out.grad_steps)
    assert [i for i, c in enumerate(calls.calls) if c[1]] == out.grad_steps
    assert torch.isclose(out.loss, 0.5 * (1 - out.score.score.mean()))
    calls.in_backward = True
    out.loss.backward()
    # Checkpointing recomputes each gradient step once in the backward.
    assert sum(c[2] for c in calls.calls) == grad_steps
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    got = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert trainable and all("lora_" in n for n in trainable) and got == trainable
    assert all(unet.get_parameter(n).grad.abs().sum() > 0 for n in got)


def test_sampler_gradient_steps_are_random_and_every_tenth():
    sampler = RewardSampler(lora_unet(), tiny_vae().double(), scheduler())
    assert sampler.timesteps == list(range(999, 0, -20)) and sampler.guidance_scale == 7.5
    offsets = set()
    for seed in range(200):
        steps = sampler.gradient_steps(torch.Generator().manual_seed(seed))
        assert len(steps) == 5 and all(b - a == 10 for a, b in zip(steps, steps[1:]))
        offsets.add(steps[0])
    assert offsets == set(range(10))
    # sample() draws them from its generator (first, when the latents are given).
    with torch.no_grad():
        _, steps = sampler.sample(*embeds(1), latents=torch.randn(1, 4, 8, 8, dtype=torch.float64),
                                  generator=torch.Generator().manual_seed(7))
    assert steps == sampler.gradient_steps(torch.Generator().manual_seed(7))


@pytest.mark.parametrize("linfusion", [False, True])
def test_checkpointed_gradients_equal_plain(clip, linfusion):
    model, tokenizer = clip
    scorer = CLIPPreferenceScorer(model, tokenizer, crop_size=12)
    grads = []
    for checkpointing in (True, False):
        unet = lora_unet(linfusion=linfusion)
        sampler = RewardSampler(unet, tiny_vae().double().requires_grad_(False), scheduler(),
                                num_steps=10, grad_every=5, checkpointing=checkpointing)
        out = sampler(scorer, PROMPTS[:2], *embeds(2), generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        grads.append({n: p.grad for n, p in unet.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-9, atol=1e-12, msg=name)
    if linfusion:
        attn1 = [n for n in grads[0] if ".attn1.to_q.lora_B" in n]
        assert attn1 and all(grads[0][n].abs().sum() > 0 for n in attn1)


def test_sampler_rejects_bad_arguments():
    unet, vae = lora_unet(), tiny_vae().double()
    with pytest.raises(ValueError, match="mode must be one of"):
        RewardSampler(unet, vae, scheduler(), mode="euler")
    with pytest.raises(ValueError, match="multiple of grad_every"):
        RewardSampler(unet, vae, scheduler(), num_steps=25)
    with pytest.raises(ValueError, match="without classifier-free guidance"):
        RewardSampler(unet, vae, scheduler(), mode="lcm", guidance_scale=7.5)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        RewardSampler(unet, vae, scheduler(), num_steps=10).sample(embeds(1)[0])
    with pytest.raises(ValueError, match="added conditioning"):
        RewardSampler(make_unet("xl"), vae, scheduler())


def test_reweighted_score_rises_in_a_tiny_run(clip):
    model, tokenizer = clip
    model = model.float()
    scorer = CLIPPreferenceScorer(model, tokenizer, crop_size=None)
    unet = make_unet("sd15").requires_grad_(False)
    add_longalign_lora(unet, rank=4)
    sampler = RewardSampler(unet, tiny_vae().requires_grad_(False), scheduler(), mode="lcm")
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-2)
    prompts, (prompt_embeds, _) = PROMPTS[:2], embeds(2, torch.float32)
    scores = []
    for _ in range(21):
        out = sampler(scorer, prompts, prompt_embeds, generator=torch.Generator().manual_seed(0))
        scores.append(out.score.score.mean().item())
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
    rises = sum(b > a for a, b in zip(scores, scores[1:]))
    assert scores[-1] > scores[0] + 0.02 and rises >= 18, scores


# ---------------------------------------------------------------------------------------------
# LoRA layout and the official lora_vis.pt list.
def test_lora_targets_follow_the_official_layout():
    unet = make_unet("sd15")
    targets = longalign_lora_targets(unet)
    kinds = {t.rsplit(".", 1)[-1] if not t.endswith(".0") else "to_out.0" for t in targets}
    assert kinds == {"to_q", "to_k", "to_v", "to_out.0", "proj", "conv1", "conv2", "time_emb_proj", "conv_shortcut"}
    assert targets[:4] == [f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.{n}"
                           for n in ("to_q", "to_k", "to_v", "to_out.0")]
    assert not any("proj_in" in t or "proj_out" in t or "ff.net.2" in t or "samplers" in t for t in targets)
    # The same list with LinFusion mounted (its kernel MLPs carry no LoRA) and after PEFT wraps it.
    mounted = make_unet("sd15")
    make_linfusion(mounted).mount_to(unet=mounted)
    assert longalign_lora_targets(mounted) == targets
    assert add_longalign_lora(mounted, rank=2) == targets and longalign_lora_targets(mounted) == targets


def test_lora_targets_match_the_official_traversal():
    unet = make_unet("sd15")
    assert [unet.get_submodule(n) for n in longalign_lora_targets(unet)] == official_lora_layers(unet)
    # The official LoRA shapes: Conv2d up (out, r, 1, 1), down (r, in, kh, kw); Linear (out, r), (r, in).
    add_longalign_lora(unet, rank=4)
    weights = lora_to_longalign_list(unet)
    conv = longalign_lora_targets(unet).index("down_blocks.1.resnets.0.conv1")
    assert weights[2 * conv].shape == (64, 4, 1, 1) and weights[2 * conv + 1].shape == (4, 32, 3, 3)
    proj = longalign_lora_targets(unet).index("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj")
    assert weights[2 * proj].shape == (256, 4) and weights[2 * proj + 1].shape == (4, 32)


def test_lora_vis_round_trip():
    unet = lora_unet(torch.float32)
    weights = lora_to_longalign_list(unet, dtype=None)
    targets = longalign_lora_targets(unet)
    assert len(weights) == 2 * len(targets)
    for name, up, down in zip(targets, weights[::2], weights[1::2]):
        base = unet.get_submodule(name).base_layer
        assert up.shape[:2] == (base.weight.shape[0], 4) and down.shape[0] == 4
        assert up.dim() == down.dim() == base.weight.dim()

    fresh = make_unet("sd15")
    lora_from_longalign_list(fresh, weights)
    assert all(torch.equal(a, b) for a, b in zip(lora_to_longalign_list(fresh, dtype=None), weights))
    g = torch.Generator().manual_seed(3)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(unet(x, 10, emb).sample, fresh(x, 10, emb).sample)

    # The official files are fp16: fp16 -> UNet -> fp16 is bit-exact too.
    half = lora_to_longalign_list(unet)
    assert all(w.dtype == torch.float16 for w in half)
    again = make_unet("sd15")
    lora_from_longalign_list(again, half)
    assert all(torch.equal(a, b) for a, b in zip(lora_to_longalign_list(again), half))
    with pytest.raises(ValueError, match="must hold"):
        lora_from_longalign_list(make_unet("sd15"), weights[:-2])
    with pytest.raises(ValueError, match="has shape"):
        lora_from_longalign_list(make_unet("sd15"), [weights[1], weights[0]] + weights[2:])


# ---------------------------------------------------------------------------------------------
# The fine-tuning script.
def test_finetune_cli(tmp_path):
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = tiny_sd_pipeline(tmp_path / "tok")
    pipe.save_pretrained(tmp_path / "pipe")
    make_linfusion(pipe.unet).save_pretrained(tmp_path / "linfusion")
    clip_dir = tmp_path / "clip"
    tiny_clip_model().save_pretrained(clip_dir)
    pipe.tokenizer.save_pretrained(clip_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"caption": p}) + "\n" for p in ["a red cat. a dog.", "a house", "big sky"]))
    out = tmp_path / "out"

    def run(steps):
        cmd = [sys.executable, str(ROOT / "scripts" / "finetune_longalign.py"),
               "--pretrained_model", str(tmp_path / "pipe"), "--preference_model", str(clip_dir),
               "--prompts", str(prompts), "--output_dir", str(out), "--mode", "lcm", "--max_tokens", "24",
               "--lora_rank", "4", "--batch_size", "2", "--max_train_steps", str(steps), "--crop_size", "0",
               "--checkpointing_steps", "2", "--seed", "0", "--resume", "--warmup_steps", "0",
               "--learning_rate", "1e-3", "--lora_dropout", "0",
               "--linfusion", str(tmp_path / "linfusion")]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    first_run = run(2)
    assert "mounted LinFusion" in first_run.stdout + first_run.stderr
    state = json.loads((out / "checkpoint-2" / "training_state.json").read_text())
    assert state["global_step"] == 2
    first = torch.load(out / "lora_vis.pt", weights_only=True)
    result = run(3)
    assert "resuming from" in result.stdout + result.stderr
    assert json.loads((out / "checkpoint-3" / "training_state.json").read_text())["global_step"] == 3
    weights = torch.load(out / "lora_vis.pt", weights_only=True)
    assert any(not torch.equal(a, b) for a, b in zip(first, weights))

    # The diffusers LoRA file loads with load_lora_weights and holds the lora_vis.pt weights (the
    # layout is the same with or without LinFusion).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    fresh.load_lora_weights(out)
    assert all(torch.equal(a, b) for a, b in zip(lora_to_longalign_list(fresh.unet), weights))

    # The conversions: lora_vis.pt -> diffusers LoRA folder -> lora_vis.pt, bit for bit.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finetune.main(["--pretrained_model", str(tmp_path / "pipe"), "--output_dir", str(tmp_path / "converted"),
                     "--convert_lora_vis", str(out / "lora_vis.pt")])
        finetune.main(["--pretrained_model", str(tmp_path / "pipe"), "--output_dir", str(tmp_path / "exported"),
                     "--export_lora_vis", str(tmp_path / "converted")])
    exported = torch.load(tmp_path / "exported" / "lora_vis.pt", weights_only=True)
    assert len(exported) == len(weights) and all(torch.equal(a, b) for a, b in zip(exported, weights))
