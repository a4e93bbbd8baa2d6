"""linfusion_ops.highres: stage plans, DemoFusion's pieces, and the staged pipelines end to end
(SD 1.5, SD 2.1, SD XL; DemoFusion and SDEdit; super-resolution; callbacks, interrupt,
determinism, output types, IP-Adapter, ControlNet), against ports of the official code
(tests.helpers.official): equal with DDIM and for SDEdit, a measured difference with Euler.
Offline, on tiny random models (native size 16 px: latents 8 x 8, VAE x2)."""

import math
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
)
from diffusers.callbacks import PipelineCallback  # noqa: E402

from linfusion_ops.highres import (  # noqa: E402
    LinFusionHighResPipeline,
    LinFusionHighResXLPipeline,
    channel_stats,
    demofusion_weights,
    dilated_convs,
    gaussian_blur,
    gaussian_kernel,
    Stage,
    check_stages,
    match_channel_stats,
    plan_chain,
    plan_stages,
    plan_super_resolution,
)
from linfusion_ops.highres.pipeline import has_linfusion, resize_image  # noqa: E402
from tests.helpers.official import official_demofusion_sdxl, official_sdedit_chain  # noqa: E402
from tests.helpers.tiny_models import (  # noqa: E402
    load_tiny_ip_adapter,
    make_linfusion,
    make_unet,
    tiny_controlnet,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)

SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "heun": HeunDiscreteScheduler,
}


def scheduler(name, **config):
    if name == "ddim":  # SD's DDIM config: eps stays linear in the prediction (no clipping)
        config = dict(clip_sample=False, set_alpha_to_one=False, **config)
    return SCHEDULERS[name](steps_offset=1, **config)


# ---------------------------------------------------------------------------------------------
# Stage plans.
def test_plan_xl_8192_square():
    stages = plan_stages(8192, 8192, sample_size=128)
    assert [(s.height, s.width) for s in stages] == [(1024, 1024), (2048, 2048), (4096, 4096), (8192, 8192)]
    assert [s.ratio for s in stages] == [1, 2, 4, 8]
    assert [s.num_inference_steps for s in stages] == [50, 16, 11, 6]
    assert stages[1].strength == pytest.approx(0.32) and stages[0].strength == 1.0


def test_plan_xl_8192_by_16384_keeps_aspect_ratio():
    stages = plan_stages(8192, 16384, sample_size=128)
    assert (stages[0].height, stages[0].width) == (512, 1024)  # long side = native
    assert (stages[-1].height, stages[-1].width) == (8192, 16384)
    assert [s.strength for s in stages[1:]] == pytest.approx([0.32, 0.24, 0.16, 0.08])
    assert [s.num_inference_steps for s in stages[1:]] == [16, 12, 8, 4]


def test_plan_rounds_up_with_a_warning():
    with pytest.warns(UserWarning, match="4096x4096"):
        stages = plan_stages(3000, 3000, sample_size=128)
    assert (stages[-1].height, stages[-1].width) == (4096, 4096) and len(stages) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan_stages(2048, 4096, sample_size=128)


def test_plan_sd15_strength_04():
    stages = plan_stages(8192, 8192, sample_size=64, upscale_strength=0.4)
    assert [s.height for s in stages] == [512, 1024, 2048, 4096, 8192]
    assert [s.num_inference_steps for s in stages[1:]] == [20, 15, 10, 5]


def test_plan_native_or_smaller_is_one_base_stage():
    assert [(s.height, s.width, s.num_inference_steps) for s in plan_stages(256, 512, sample_size=64)] == [
        (256, 512, 50)
    ]
    with pytest.warns(UserWarning, match="512x256"):
        stages = plan_stages(200, 400, sample_size=64)  # smaller than native: generated at native
    assert [(s.height, s.width) for s in stages] == [(256, 512)]


def test_plan_super_resolution():
    (stage,) = plan_super_resolution(3072, 2048, sample_size=128, upscale_strength=0.3)
    assert (stage.height, stage.width, stage.ratio, stage.num_inference_steps) == (3072, 2048, 3, 15)
    with pytest.warns(UserWarning, match="multiples"):
        (stage,) = plan_super_resolution(1001, 2048, sample_size=128)
    assert stage.height == 1008


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(height=0, width=64, sample_size=8), "height"),
        (dict(height=64, width=64.0, sample_size=8), "width"),
        (dict(height=64, width=64, sample_size=0), "sample_size"),
        (dict(height=64, width=64, sample_size=8, upscale_strength=0), "upscale_strength"),
        (dict(height=64, width=64, sample_size=8, num_inference_steps=0), "num_inference_steps"),
    ],
)
def test_plan_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_stages(**kwargs)


# The official SD 1.5 notebook chain: a 512x1024 (h x w) base at 50 steps, then img2img to
# 1024x2048, 2048x4096, 4096x8192 and 8192x16384 at strengths 0.4, 0.3, 0.2, 0.1.
NOTEBOOK_SIZES = [(512, 1024), (1024, 2048), (2048, 4096), (4096, 8192), (8192, 16384)]
NOTEBOOK_STRENGTHS = (0.4, 0.3, 0.2, 0.1)


def test_plan_chain_reproduces_the_sd15_notebook_chain():
    stages = plan_chain(512, 1024, NOTEBOOK_STRENGTHS, sample_size=64, num_inference_steps=50)
    assert [(s.height, s.width) for s in stages] == NOTEBOOK_SIZES
    assert [s.strength for s in stages] == [1.0, 0.4, 0.3, 0.2, 0.1]
    assert [s.num_inference_steps for s in stages] == [50, 20, 15, 10, 5]
    assert [s.index for s in stages] == [0, 1, 2, 3, 4]
    assert [s.ratio for s in stages] == [2, 4, 8, 16, 32]  # long side / 512
    # explicit sizes give the same plan; the timesteps are img2img's last steps of 50
    explicit = plan_chain(512, 1024, NOTEBOOK_STRENGTHS, sizes=NOTEBOOK_SIZES[1:], sample_size=64)
    assert explicit == stages
    timed = plan_chain(512, 1024, NOTEBOOK_STRENGTHS, sample_size=64, scheduler=scheduler("euler"))
    full = scheduler("euler")
    full.set_timesteps(50)
    for stage in timed:
        assert stage.timesteps == tuple(full.timesteps[50 - stage.num_inference_steps:].tolist())
    assert check_stages(stages, vae_scale_factor=8, num_inference_steps=50) == stages


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(strengths=(0.4, 0.0)), "strength must be in"),
        (dict(strengths=(1.5,)), "strength must be in"),
        (dict(strengths=(0.4,), sizes=[(1024, 2048), (2048, 4096)]), "one size per stage"),
        (dict(strengths=(0.4,), sizes=[(1020, 2048)]), "multiple of vae_scale_factor"),
        (dict(base_height=500), "multiple of vae_scale_factor"),
        (dict(base_width=0), "positive int"),
    ],
)
def test_plan_chain_rejects_bad_arguments(kwargs, match):
    args = dict(base_height=512, base_width=1024, strengths=NOTEBOOK_STRENGTHS, sample_size=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        plan_chain(**args)


def test_check_stages_rejects_bad_plans():
    good = plan_chain(512, 1024, (0.4, 0.3), sample_size=64)
    check = dict(vae_scale_factor=8, num_inference_steps=50)
    cases = [
        ([], "at least one Stage"),
        ([good[0], (1024, 2048)], "must be a Stage"),
        ([good[0], good[2]], "index must be 1"),
        (good, "super-resolution has no base stage"),
        ([Stage(0, 512, 1024, 1, 0.5, 25)], "base stage"),
        ([good[0], Stage(1, 1024, 2048, 4, 0.4, 0)], r"num_inference_steps must be an int in \[1, 50\]"),
        ([good[0], Stage(1, 1024, 2048, 4, 0.4, 51)], r"num_inference_steps must be an int in \[1, 50\]"),
        ([good[0], Stage(1, 1024, 2048, 0, 0.4, 20)], "ratio must be a positive int"),
    ]
    for stages, match in cases:
        with pytest.raises(ValueError, match=match):
            check_stages(stages, super_resolution=match.startswith("super"), **check)
    assert check_stages(good[1:], super_resolution=True, **check) == good[1:]


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_stage_timesteps_equal_img2img(tmp_path, name):
    sched = scheduler(name)
    before = (sched.timesteps.clone(), sched.num_inference_steps)
    stages = plan_stages(8192, 8192, sample_size=128, num_inference_steps=30, scheduler=sched)
    assert torch.equal(sched.timesteps, before[0]) and sched.num_inference_steps == before[1]  # untouched
    stages += plan_super_resolution(2048, 2048, sample_size=128, num_inference_steps=30, scheduler=sched)
    sd = tiny_sd_pipeline(tmp_path)
    img2img = StableDiffusionImg2ImgPipeline(**{**sd.components, "scheduler": scheduler(name)})
    for stage in stages:
        img2img.scheduler.set_timesteps(30)
        expected, steps = img2img.get_timesteps(30, stage.num_inference_steps / 30, "cpu")
        assert steps == stage.num_inference_steps
        assert stage.timesteps == tuple(expected.tolist())
    assert len(stages[0].timesteps) == len(img2img.scheduler.timesteps)


# ---------------------------------------------------------------------------------------------
# DemoFusion's pieces.
def test_demofusion_weights_at_known_timesteps():
    w = demofusion_weights(500, cosine_scale_1=3, cosine_scale_2=1, cosine_scale_3=1)
    assert w.skip == pytest.approx(0.125) and w.global_ == pytest.approx(0.5) and w.sigma == pytest.approx(0.505)
    w = demofusion_weights(torch.tensor(250.0), cosine_scale_1=2, cosine_scale_2=0.5, cosine_scale_3=2)
    cf = 0.5 * (1 + math.cos(math.pi * 0.75))
    assert w == pytest.approx((cf**2, cf**0.5, 0.99 * cf**2 + 0.01))
    assert demofusion_weights(1000) == pytest.approx((1.0, 1.0, 1.0))
    assert demofusion_weights(0) == pytest.approx((0.0, 0.0, 0.01))


def _conv_params(*modules):
    return [(c.dilation, c.padding) for m in modules for c in m.modules() if isinstance(c, nn.Conv2d)]


def test_dilated_convs_scale_and_restore_exactly():
    unet = make_unet("sd15")
    controlnet = tiny_controlnet(unet)
    before = _conv_params(unet, controlnet)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    sample = torch.randn(1, 4, 16, 16)
    args = (sample, 500, torch.randn(1, 7, 32))
    with torch.no_grad(), dilated_convs(unet, None, controlnet, ratio=2):
        inside = _conv_params(unet, controlnet)
        out = unet(*args).sample
    assert inside == [((2 * d[0], 2 * d[1]), (2 * p[0], 2 * p[1])) for d, p in before]
    assert out.shape == sample.shape
    assert _conv_params(unet, controlnet) == before
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    with torch.no_grad():
        plain = unet(*args).sample
    assert not torch.allclose(out, plain)

    with pytest.raises(RuntimeError, match="boom"):
        with dilated_convs(unet, ratio=4):
            raise RuntimeError("boom")
    assert _conv_params(unet, controlnet) == before
    with torch.no_grad():
        torch.testing.assert_close(unet(*args).sample, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="ratio"):
        with dilated_convs(unet, ratio=0):
            pass


@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_gaussian_kernel_sums_to_one_and_is_symmetric(ratio):
    kernel = gaussian_kernel(2 * ratio - 1, 0.8 * 0.505, 4, dtype=torch.float64)
    assert kernel.shape == (4, 1, 2 * ratio - 1, 2 * ratio - 1)
    torch.testing.assert_close(kernel.sum(dim=(1, 2, 3)), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(kernel, kernel.flip(-1).flip(-2))
    torch.testing.assert_close(kernel, kernel.transpose(-1, -2))


def test_blur_then_renormalise_restores_statistics():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 24, 20, generator=g, dtype=torch.float64) * 3 + 1
    blurred = gaussian_blur(latents, 7, 2.0)
    assert blurred.shape == latents.shape
    inner = blurred[..., 3:-3, 3:-3]  # away from the zero padding, a constant stays constant
    torch.testing.assert_close(gaussian_blur(torch.ones_like(latents), 7, 2.0)[..., 3:-3, 3:-3], torch.ones_like(inner))
    assert blurred.std() < latents.std()
    mean, std = channel_stats(latents)
    restored = match_channel_stats(blurred, mean, std)
    for got, want in zip(channel_stats(restored), (mean, std)):
        torch.testing.assert_close(got, want)
    target_mean, target_std = torch.randn(2, 4, 1, 1, dtype=torch.float64), torch.rand(2, 4, 1, 1, dtype=torch.float64) + 0.5
    for got, want in zip(channel_stats(match_channel_stats(latents, target_mean, target_std)), (target_mean, target_std)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["euler", "ddim"])
def test_one_step_on_the_blend_equals_the_official_two_step_blend(name):
    g = torch.Generator().manual_seed(3)
    sample, local, global_ = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    sched = scheduler(name)
    sched.set_timesteps(20)
    t = sched.timesteps[7]
    c2 = demofusion_weights(t).global_

    def step(eps):
        if hasattr(sched, "_init_step_index"):
            sched._init_step_index(t)
        return sched.step(eps, t, sample, return_dict=False)[0]

    official = (1 - c2) * step(local) + c2 * step(global_)
    ours = step((1 - c2) * local + c2 * global_)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)


def relative_error(out, ref):
    """max |out - ref| / max |ref|: random tiny UNets give latents in the hundreds."""
    assert out.shape == ref.shape and torch.isfinite(out).all()
    return ((out - ref).abs().max() / ref.abs().max()).item()


def assert_parity(outs, refs, tol=1e-5):
    """Every stage within `tol` of the latents' scale. The fp32 floor of these comparisons is a
    few 1e-6 (the official blur kernel and cosine factor are float32, ours float64; two steps
    blended instead of one on the blend), amplified by the random UNets' large gain."""
    assert len(outs) == len(refs)
    for k, (out, ref) in enumerate(zip(outs, refs)):
        err = relative_error(out, ref)
        assert err <= tol, f"stage {k}: max error {err:.3e} of the latents' scale > {tol:.0e}"


# ---------------------------------------------------------------------------------------------
# Pipelines.
def sd_highres(tmp_path, kind="sd15", sched="euler", **kwargs):
    unet = make_unet(kind)
    sd = tiny_sd_pipeline(tmp_path, unet)
    config = dict(prediction_type="v_prediction") if kind == "sd21" else {}
    sd.scheduler = scheduler(sched, **config)
    make_linfusion(unet).mount_to(unet=unet)
    pipe = LinFusionHighResPipeline.from_pipe(sd, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def xl_highres(tmp_path, sched="euler", **kwargs):
    unet = make_unet("xl")
    xl = tiny_sdxl_pipeline(tmp_path, unet)
    xl.scheduler = scheduler(sched)
    make_linfusion(unet, "xl").mount_to(unet=unet)
    pipe = LinFusionHighResXLPipeline.from_pipe(xl, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_embeds(pipe):
    g = torch.Generator().manual_seed(5)
    return torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "latent")
    if isinstance(pipe, LinFusionHighResXLPipeline):
        kwargs.setdefault("prompt", "a cat")
    elif "prompt" not in kwargs:
        kwargs["prompt_embeds"], kwargs["negative_prompt_embeds"] = sd_embeds(pipe)
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs)


def sd_cond(pipe):
    pos, neg = sd_embeds(pipe)
    embeds = torch.cat([neg, pos])
    return lambda x: dict(encoder_hidden_states=embeds)


SD_SIZES = [(16, 16), (32, 32), (64, 64)]
XL_SIZES = [(8, 16), (16, 32), (32, 64)]


class EulerScaledAtItsTimestep(EulerDiscreteScheduler):
    """Euler whose scale_model_input uses the sigma of the timestep it is given, whatever step
    index the scheduler holds: run under the official loop it removes exactly the two effects of
    the official order (see test_xl_euler_differs_from_the_official_loop)."""

    def scale_model_input(self, sample, timestep):
        self._init_step_index(timestep)
        return super().scale_model_input(sample, timestep)


@pytest.mark.parametrize("kind", ["sd15", "sd21"])
def test_sd_sdedit_equals_the_notebook_chain(tmp_path, kind):
    """method="sdedit" against the SD 1.5 notebook's chain (a text-to-image base, then one img2img
    call per stage), with Euler: the same operations in the same order, bitwise equal."""
    pipe = sd_highres(tmp_path, kind)
    out = run(pipe, height=64, width=64, method="sdedit", upscale_strength=0.5, return_stages=True)
    assert [(s.height, s.ratio, s.num_inference_steps) for s in pipe.stages] == [(16, 1, 4), (32, 2, 2), (64, 4, 1)]
    refs = official_sdedit_chain(pipe, sd_cond(pipe), SD_SIZES, (0.5, 0.25), steps=4)
    assert_parity(out.stage_images, refs, tol=0)


@pytest.mark.parametrize("kind", ["sd15", "sd21"])
def test_sd_demofusion_with_ddim_equals_the_official_loop(tmp_path, kind):
    """SD 1.5 / 2.1 DemoFusion against the official SD-XL loop run on their UNets (the official
    code has no SD 1.5 DemoFusion), with DDIM, where the official order changes nothing: measured
    2.0e-6 / 1.7e-6 (SD 1.5) and 2.4e-6 / 3.0e-6 (SD 2.1) of the latents' scale in the upscaling
    stages."""
    pipe = sd_highres(tmp_path, kind, sched="ddim")
    out = run(pipe, height=64, width=64, upscale_strength=0.5, return_stages=True)
    refs = official_demofusion_sdxl(pipe, sd_cond(pipe), SD_SIZES, steps=4, upscale_strength=0.5)
    assert_parity(out.stage_images, refs)


def xl_cond(pipe, size):
    (pos, neg, pooled, neg_pooled) = pipe.encode_prompt("a cat", device="cpu")
    embeds, text = torch.cat([neg, pos]), torch.cat([neg_pooled, pooled])
    time_ids = torch.tensor([[*size, 0, 0, *size]] * 2, dtype=pipe.unet.dtype)
    return lambda x: dict(encoder_hidden_states=embeds, added_cond_kwargs=dict(text_embeds=text, time_ids=time_ids))


def test_xl_ddim_equals_the_official_loop(tmp_path):
    """With DDIM (scale_model_input is the identity, the step is affine in the prediction and
    has no step index) the official order computes what ours does. In float64, so that nothing
    but the order could show: measured 0 / 8.7e-16 / 3.0e-16 of the latents' scale for the three
    text-to-image stages, 7.3e-9 for super-resolution (whose blur is wide enough for the official
    float32 kernel to show); in float32 0 / 4.3e-6 / 1.5e-6 and 2.8e-6 (fp32 rounding amplified
    by the random UNet). The official loop itself cannot run with DDIM: it
    calls scheduler._init_step_index, which DDIM lacks."""
    pipe = xl_highres(tmp_path, sched="ddim").to(torch.float64)
    assert not hasattr(pipe.scheduler, "_init_step_index")
    out = run(pipe, height=32, width=64, guidance_scale=7.5, return_stages=True)
    assert [(s.height, s.width) for s in pipe.stages] == XL_SIZES
    refs = official_demofusion_sdxl(pipe, xl_cond(pipe, (32, 64)), XL_SIZES, steps=4, upscale_strength=0.32)
    assert refs[-1].dtype == torch.float64
    assert_parity(out.stage_images, refs, tol=1e-6)

    image = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2 - 1
    out = run(pipe, image=(image + 1) / 2, height=40, width=48, num_inference_steps=6, upscale_strength=0.5,
              guidance_scale=7.5)
    (stage,) = pipe.stages
    assert (stage.height, stage.width, stage.ratio, stage.num_inference_steps) == (40, 48, 3, 3)
    refs = official_demofusion_sdxl(pipe, xl_cond(pipe, (40, 48)), [(40, 48)], steps=6, upscale_strength=0.5,
                                    image=image)
    assert_parity([out.images], refs, tol=1e-6)


# The Euler difference between ours and the official order, max |ours - official| / max |official|
# per upscaling stage, measured on these tiny models (4 steps, CFG 7.5, seed 0).
EULER_T2I_DIFFERENCE = (1.842e-1, 1.488e-1)
EULER_SUPER_RESOLUTION_DIFFERENCE = 7.527e-2


def assert_in_band(measured, expected):
    assert 1e-3 < 0.5 * expected <= measured <= 2 * expected, f"{measured:.3e} outside [0.5, 2] x {expected:.3e}"


def test_xl_euler_differs_from_the_official_loop(tmp_path):
    """With Euler (SD XL's default) the official loop differs from ours in the upscaling stages,
    by 1.8e-1 and 1.5e-1 of the latents' scale here (super-resolution 7.5e-2); the base stage
    is the same loop. The cause is the sigma Euler's scale_model_input divides by, which comes
    from the scheduler's step index, not from the timestep passed in:
    * per timestep the official code steps on the local prediction before the global pass, so
      the global pass's input is scaled with the next timestep's sigma (the step advanced the
      index); ours predicts both at the current sigma and steps once on the blend;
    * the official run sets the timesteps once and each upscaling stage only slices them, so a
      stage's first local pass is scaled with the index the previous stage left behind: N, the
      final sigma 0, i.e. not scaled at all (super-resolution starts from a fresh index).
    Fixing only the second leaves 6.1e-2 / 5.5e-2; an Euler scaled at the timestep it is given
    (both fixed) makes the official loop equal ours to the fp32 floor, so nothing else differs:
    blending two Euler steps equals one step on the blend."""
    pipe = xl_highres(tmp_path)
    out = run(pipe, height=32, width=64, guidance_scale=7.5, return_stages=True)
    cond = xl_cond(pipe, (32, 64))
    refs = official_demofusion_sdxl(pipe, cond, XL_SIZES, steps=4, upscale_strength=0.32)
    assert relative_error(out.stage_images[0], refs[0]) <= 1e-6
    for ours, official, expected in zip(out.stage_images[1:], refs[1:], EULER_T2I_DIFFERENCE):
        assert_in_band(relative_error(ours, official), expected)

    image = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(7)) * 2 - 1
    sr = run(pipe, image=(image + 1) / 2, height=40, width=48, num_inference_steps=6, upscale_strength=0.5,
             guidance_scale=7.5).images
    sr_cond = xl_cond(pipe, (40, 48))
    (official,) = official_demofusion_sdxl(pipe, sr_cond, [(40, 48)], steps=6, upscale_strength=0.5, image=image)
    assert_in_band(relative_error(sr, official), EULER_SUPER_RESOLUTION_DIFFERENCE)

    pipe.scheduler = EulerScaledAtItsTimestep.from_config(pipe.scheduler.config)
    assert_parity(out.stage_images, official_demofusion_sdxl(pipe, cond, XL_SIZES, steps=4, upscale_strength=0.32))
    assert_parity([sr], official_demofusion_sdxl(pipe, sr_cond, [(40, 48)], steps=6, upscale_strength=0.5, image=image))


def test_multistep_scheduler_steps_once_on_the_blend(tmp_path):
    """DPM++ keeps a history of model outputs: ours steps once per timestep, on the blended
    prediction, and resets the history per stage (set_timesteps). The official loop steps twice
    per timestep and never resets: at the first upscaling step the history still holds the base
    stage's smaller outputs, and the multistep update fails on the size mismatch."""
    pipe = sd_highres(tmp_path, sched="dpm++")
    steps = []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda *a, **k: steps.append(1) or step(*a, **k)
    out = run(pipe, height=64, width=64, num_inference_steps=6, upscale_strength=0.5)
    del pipe.scheduler.step
    assert torch.isfinite(out.images).all()
    assert len(steps) == sum(s.num_inference_steps for s in pipe.stages) == 6 + 3 + 2
    with pytest.raises(RuntimeError, match="must match the size"):
        official_demofusion_sdxl(pipe, sd_cond(pipe), SD_SIZES, steps=6, upscale_strength=0.5)


def test_heun_pipeline_runs(tmp_path):
    pipe = sd_highres(tmp_path, sched="heun")
    out = run(pipe, height=32, width=32)
    assert torch.isfinite(out.images).all()
    assert [s["unet_calls"] for s in pipe.stage_stats] == [7, 3 * 2]  # Heun: 2 steps - 1 per step


def test_stage_stats_count_unet_evaluations(tmp_path):
    pipe = sd_highres(tmp_path)
    run(pipe, height=64, width=64, upscale_strength=0.5)
    stats = pipe.stage_stats
    assert [(s["height"], s["steps"]) for s in stats] == [(16, 4), (32, 2), (64, 1)]
    # CFG: 2 evaluations per image per pass; DemoFusion: a local and a global pass per step.
    assert [s["unet_evaluations_per_image"] for s in stats] == [8, 8, 4]
    assert [s["unet_calls"] for s in stats] == [4, 4, 2]
    assert all(s["seconds"] > 0 and s["cpu_seconds"] > 0 for s in stats)
    run(pipe, height=64, width=64, upscale_strength=0.5, method="sdedit", guidance_scale=1.0)
    assert [s["unet_evaluations_per_image"] for s in pipe.stage_stats] == [4, 2, 1]


def test_determinism_per_seed(tmp_path):
    pipe = xl_highres(tmp_path)
    a, b, c = (run(pipe, seed=s, height=32, width=32).images for s in (1, 1, 2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    # a batch: one generator per image gives each image the run of its own seed
    batch = pipe("a cat", height=32, width=32, num_inference_steps=4, num_images_per_prompt=2, output_type="latent",
                 generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images
    assert batch.shape == (2, 4, 16, 16)
    torch.testing.assert_close(batch, torch.cat([a, c]), rtol=1e-5, atol=1e-4 * a.abs().max().item())


def test_from_pipe_shares_modules_and_mounts_linfusion(tmp_path):
    sd = tiny_sd_pipeline(tmp_path)
    linfusion = make_linfusion(sd.unet)
    linfusion.save_pretrained(tmp_path / "linfusion")
    assert not has_linfusion(sd.unet)
    pipe = LinFusionHighResPipeline.from_pipe(sd, linfusion_path=str(tmp_path / "linfusion"))
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert getattr(pipe, name) is getattr(sd, name)
    assert has_linfusion(sd.unet) and pipe.linfusion is not None and pipe.controlnet is None
    for a, b in zip(pipe.linfusion.state_dict().values(), linfusion.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    processors = dict(sd.unet.attn_processors)
    again = LinFusionHighResPipeline.from_pipe(pipe)  # already mounted: kept as is
    assert again.linfusion is None and all(sd.unet.attn_processors[k] is p for k, p in processors.items())
    pipe.linfusion.unmount(pipe)
    assert not has_linfusion(sd.unet)


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types_and_return_stages(tmp_path, output_type):
    pipe = sd_highres(tmp_path)
    out = run(pipe, height=32, width=64, output_type=output_type, return_stages=True)
    sizes = [(8, 16), (16, 32), (32, 64)]
    assert len(out.stage_images) == 3
    for images, (h, w) in zip(out.stage_images, sizes):
        if output_type == "pil":
            assert isinstance(images[0], PIL.Image.Image) and images[0].size == (w, h)
        elif output_type == "np":
            assert isinstance(images, np.ndarray) and images.shape == (1, h, w, 3)
        elif output_type == "pt":
            assert images.shape == (1, 3, h, w) and 0 <= images.min() and images.max() <= 1
        else:
            assert images.shape == (1, 4, h // 2, w // 2)
    assert out.stage_images[-1] is out.images
    if output_type == "pt":
        latents = run(pipe, height=32, width=64).images
        torch.testing.assert_close(out.images, pipe.image_processor.postprocess(pipe._decode(latents), "pt"))
    assert run(pipe, height=32, width=64, output_type=output_type).stage_images is None


def test_callbacks_see_every_stage_and_can_edit_latents(tmp_path):
    pipe = sd_highres(tmp_path)
    seen = []

    def record(p, i, t, kwargs):
        seen.append((p.stage_index, i, float(t), p.num_timesteps, tuple(kwargs["latents"].shape)))
        return {}

    bars = []
    progress_bar = pipe.progress_bar

    def counting_progress_bar(total=None):
        bars.append(total)
        return progress_bar(total=total)

    pipe.progress_bar = counting_progress_bar
    run(pipe, height=64, width=64, upscale_strength=0.5, callback_on_step_end=record)
    plan = plan_stages(64, 64, sample_size=8, vae_scale_factor=2, num_inference_steps=4, upscale_strength=0.5,
                       scheduler=pipe.scheduler)
    assert [(s.height, s.num_inference_steps) for s in plan] == [(s.height, s.num_inference_steps) for s in pipe.stages]
    expected = [
        (k, i, t, len(s.timesteps), (1, 4, s.height // 2, s.width // 2))
        for k, s in enumerate(plan)
        for i, t in enumerate(s.timesteps)
    ]
    assert seen == expected
    assert bars == [len(s.timesteps) for s in plan]  # one progress bar per stage

    class AddOne(PipelineCallback):
        tensor_inputs = ["latents", "prompt_embeds"]

        def callback_fn(self, p, i, t, kwargs):
            assert kwargs["prompt_embeds"].shape == (2, 7, 32)
            last = p.stage_index == len(p.stages) - 1 and i == p.num_timesteps - 1
            return {"latents": kwargs["latents"] + 1} if last else {}

    plain = run(pipe, height=64, width=64, method="sdedit").images
    edited = run(pipe, height=64, width=64, method="sdedit", callback_on_step_end=AddOne()).images
    torch.testing.assert_close(edited, plain + 1)


def test_interrupt_stops_the_run(tmp_path):
    pipe = sd_highres(tmp_path)

    def stop(p, i, t, kwargs):
        if p.stage_index == 1:
            p._interrupt = True
        return {}

    out = run(pipe, height=64, width=64, upscale_strength=0.5, callback_on_step_end=stop, return_stages=True)
    assert [s["stage"] for s in pipe.stage_stats] == [0, 1]
    assert pipe.stage_stats[1]["unet_calls"] == 2  # one step (local + global), then stopped
    assert out.images.shape == (1, 4, 16, 16) and len(out.stage_images) == 2
    assert pipe.interrupt


def test_ip_adapter_reaches_every_stage(tmp_path):
    pipe = sd_highres(tmp_path)
    load_tiny_ip_adapter(pipe.unet)
    g = torch.Generator().manual_seed(4)
    embeds = [torch.randn(2, 1, 12, generator=g), torch.randn(2, 1, 12, generator=g)]
    outs = [run(pipe, height=32, width=32, ip_adapter_image_embeds=[e]).images for e in embeds]
    assert torch.isfinite(outs[0]).all() and not torch.allclose(outs[0], outs[1])
    xl = xl_highres(tmp_path / "xl")
    load_tiny_ip_adapter(xl.unet)
    outs = [run(xl, height=32, width=32, ip_adapter_image_embeds=[e]).images for e in embeds]
    assert torch.isfinite(outs[0]).all() and not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize("family", ["sd15", "xl"])
def test_controlnet_gets_each_stage_size_and_is_dilated(tmp_path, family):
    base = sd_highres(tmp_path) if family == "sd15" else xl_highres(tmp_path)
    controlnet = tiny_controlnet(make_unet("sd15" if family == "sd15" else "xl"))  # from an unmounted UNet
    cls = type(base)
    pipe = cls.from_pipe(base, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.controlnet is controlnet and pipe.unet is base.unet
    calls = []
    hook = controlnet.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((tuple(kwargs["controlnet_cond"].shape), m.conv_in.dilation)),
        with_kwargs=True,
    )
    control = [torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)]
    outs = [run(pipe, height=32, width=32, control_image=c).images for c in control]
    hook.remove()
    assert not torch.allclose(outs[0], outs[1])
    # base: 4 local calls at 16 px; stage 1 (2 steps): a local (dilation 1) and a global (2) call
    first_run = calls[: len(calls) // 2]
    assert first_run == [((2, 3, 16, 16), (1, 1))] * 4 + [((2, 3, 32, 32), (1, 1)), ((2, 3, 32, 32), (2, 2))] * 2
    with pytest.raises(ValueError, match="control_image"):
        run(pipe, height=32, width=32)
    with pytest.raises(ValueError, match="control_image"):
        run(base, height=32, width=32, control_image=control[0])


def test_an_error_in_the_global_pass_leaves_the_unet_undilated(tmp_path):
    pipe = sd_highres(tmp_path)
    before = _conv_params(pipe.unet)

    def fail_when_dilated(module, args):
        if module.dilation != (1, 1):
            raise RuntimeError("out of memory (simulated)")

    hook = pipe.unet.conv_in.register_forward_pre_hook(fail_when_dilated)
    with pytest.raises(RuntimeError, match="simulated"):
        run(pipe, height=32, width=32)
    hook.remove()
    assert _conv_params(pipe.unet) == before
    assert pipe.stage_index == 1  # it failed in the first upscaling stage, after the base stage


def test_sd_pipeline_with_prompt_pil_output_and_super_resolution(tmp_path):
    pipe = sd_highres(tmp_path)
    out = pipe("a cat", height=32, width=32, num_inference_steps=3, output_type="pil",
               generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (32, 32)
    up = pipe("a cat", image=out.images[0], num_inference_steps=4, output_type="np",
              generator=torch.Generator().manual_seed(0))
    assert up.images.shape == (1, 64, 64, 3)  # default target: twice the input
    assert [(s.ratio, s.num_inference_steps) for s in pipe.stages] == [(4, 2)]


def test_bad_arguments_raise(tmp_path):
    pipe = sd_highres(tmp_path)
    with pytest.raises(ValueError, match="method"):
        run(pipe, height=32, width=32, method="bilinear")
    with pytest.raises(ValueError, match="output_type"):
        run(pipe, height=32, width=32, output_type="jpeg")
    with pytest.raises(ValueError, match="upscale_strength"):
        run(pipe, height=32, width=32, upscale_strength=1.5)


# ---------------------------------------------------------------------------------------------
# The memory options (linfusion_ops.highres.low_memory and the tiled VAE) inside the pipelines.
@pytest.mark.parametrize("family", ["sd15", "xl"])
def test_low_memory_in_the_pipeline_is_exact_and_removable(tmp_path, family):
    base = sd_highres(tmp_path) if family == "sd15" else xl_highres(tmp_path)
    pipe = type(base).from_pipe(base, controlnet=tiny_controlnet(make_unet(family)))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=32, width=32, control_image=torch.rand(1, 3, 8, 8), output_type="np")
    plain = run(pipe, **kwargs).images
    forwards = {m: m.__dict__.get("forward") for m in [*pipe.unet.modules(), *pipe.controlnet.modules()]}
    handle = pipe.enable_low_memory(chunked_cfg=True, ff_chunk_size=5, inplace_silu=True, offload_skips=True)
    assert handle.techniques["chunked_cfg"] and handle.controlnet_techniques is not None
    low = run(pipe, **kwargs).images
    np.testing.assert_allclose(low, plain, rtol=0, atol=1e-5)
    pipe.disable_low_memory()
    assert {m: m.__dict__.get("forward") for m in forwards} == forwards
    np.testing.assert_array_equal(run(pipe, **kwargs).images, plain)


def test_vae_tiling_in_the_pipeline(tmp_path):
    pipe = sd_highres(tmp_path)
    kwargs = dict(height=64, width=64, output_type="np", return_stages=True)
    plain = run(pipe, **kwargs)
    decode = pipe.vae.decode
    pipe.enable_vae_tiling(tile_size=16)
    assert pipe.vae.decode is not decode
    tiled = run(pipe, **kwargs)
    for a, b in zip(tiled.stage_images, plain.stage_images):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-3)
    pipe.disable_vae_tiling()
    assert pipe.vae.decode == decode
    np.testing.assert_array_equal(run(pipe, **kwargs).images, plain.images)


def test_xl_fp16_runs_with_the_vae_upcast(tmp_path):
    pipe = xl_highres(tmp_path).to(torch.float16)
    assert pipe.vae.config.force_upcast
    vae_dtypes = []
    for part in (pipe.vae.encoder, pipe.vae.decoder):
        part.register_forward_pre_hook(lambda m, args: vae_dtypes.append((args[0].dtype, m.conv_in.weight.dtype)))
    out = run(pipe, height=32, width=32, output_type="pt", return_stages=True)
    assert vae_dtypes and set(vae_dtypes) == {(torch.float32, torch.float32)}  # SD XL's VAE overflows in fp16
    assert out.images.dtype == torch.float16 and torch.isfinite(out.images).all()
    assert [tuple(x.shape) for x in out.stage_images] == [(1, 3, 16, 16), (1, 3, 32, 32)]
    assert pipe.vae.dtype == torch.float16 and pipe.unet.dtype == torch.float16  # upcast undone


# ---------------------------------------------------------------------------------------------
# Explicit stage plans (stages=).
def test_notebook_chain_end_to_end_on_a_tiny_sd15(tmp_path):
    """The notebook's plan scaled to the tiny model (native 16 px, VAE x2): a 16x32 base at 50
    steps, then 32x64, 64x128, 128x256, 256x512 at strengths 0.4/0.3/0.2/0.1 (20/15/10/5 steps),
    as plain img2img stages (method="sdedit")."""
    pipe = sd_highres(tmp_path)
    stages = plan_chain(16, 32, NOTEBOOK_STRENGTHS, sample_size=8, vae_scale_factor=2, num_inference_steps=50)
    out = run(pipe, stages=stages, num_inference_steps=50, method="sdedit", guidance_scale=1.0)
    assert pipe.stages == stages
    stats = pipe.stage_stats
    assert [(s["height"], s["width"], s["steps"]) for s in stats] == [
        (16, 32, 50), (32, 64, 20), (64, 128, 15), (128, 256, 10), (256, 512, 5)
    ]
    assert [s["unet_evaluations_per_image"] for s in stats] == [50, 20, 15, 10, 5]  # no CFG: 1 per step
    assert out.images.shape == (1, 4, 128, 256) and torch.isfinite(out.images).all()
    # DemoFusion on the plan's first stages: a local and a global pass per upscaling step (ratio > 1)
    run(pipe, stages=stages[:3], num_inference_steps=50, guidance_scale=1.0)
    assert [s["unet_evaluations_per_image"] for s in pipe.stage_stats] == [50, 40, 30]


@pytest.mark.parametrize("method", ["demofusion", "sdedit"])
def test_an_explicit_plan_equal_to_the_automatic_one_gives_the_same_run(tmp_path, method):
    pipe = sd_highres(tmp_path)
    auto = run(pipe, height=64, width=64, upscale_strength=0.5, method=method).images
    automatic = pipe.stages
    stages = plan_chain(16, 16, (0.5, 0.25), sample_size=8, vae_scale_factor=2, num_inference_steps=4)
    assert stages == automatic
    explicit = run(pipe, stages=stages, method=method).images
    torch.testing.assert_close(explicit, auto, rtol=0, atol=0)


def test_multi_stage_super_resolution_refines_the_previous_stage(tmp_path):
    """With image= and two stages, the input feeds the first stage only: the second encodes the
    first stage's decoded output (it used to re-encode the input image at every stage)."""
    pipe = sd_highres(tmp_path)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    stages = [Stage(1, 32, 32, 2, 0.5, 2), Stage(2, 64, 64, 4, 0.25, 1)]
    encoded, encode = [], pipe._encode
    pipe._encode = lambda img, *a: encoded.append(img.clone()) or encode(img, *a)
    out = run(pipe, image=image, stages=stages, method="sdedit", return_stages=True)
    del pipe._encode
    assert len(encoded) == 2 and [s["height"] for s in pipe.stage_stats] == [32, 64]
    source = pipe.image_processor.preprocess(image)
    torch.testing.assert_close(encoded[0], resize_image(source, 32, 32), rtol=0, atol=0)
    torch.testing.assert_close(encoded[1], resize_image(pipe._decode(out.stage_images[0]), 64, 64), rtol=0, atol=0)
    assert (encoded[1] - resize_image(source, 64, 64)).abs().max() > 0.1


def test_bad_explicit_plans_raise(tmp_path):
    pipe = sd_highres(tmp_path)
    stages = plan_chain(16, 16, (0.5,), sample_size=8, vae_scale_factor=2, num_inference_steps=4)
    with pytest.raises(ValueError, match="differs from the last stage's size"):
        run(pipe, stages=stages, height=64, width=64)
    with pytest.raises(ValueError, match="super-resolution has no base stage"):
        run(pipe, stages=stages, image=torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"stages\[1\].num_inference_steps must be an int in \[1, 1\]"):
        run(pipe, stages=[Stage(0, 16, 16, 1, 1.0, 1), stages[1]], num_inference_steps=1)
    out = run(pipe, stages=stages, height=32, width=32)  # the last stage's size is accepted
    assert out.images.shape == (1, 4, 16, 16)
