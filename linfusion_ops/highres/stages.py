"""Stage plans for staged high-resolution generation (pure Python; no diffusers import).

A text-to-image run generates a base image at the model's native size (long side =
`sample_size` latent pixels, the request's aspect ratio kept), then doubles the size per stage
until the request is reached: n = ceil(log2(long latent side / sample_size)) upscaling stages,
output = base x 2^n. Upscaling stage k (1..n) re-noises the previous stage's image with strength
s_k = upscale_strength * (n - k + 1) / n (linspace(upscale_strength, 0, n + 1)[k - 1]) and
denoises it for ceil(num_inference_steps * s_k) steps: the last steps of the
num_inference_steps schedule, as img2img's get_timesteps picks them.
"""

import copy
import math
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

# Products such as 50 * 0.24 land a few ulps above an integer; ceil must not round them up.
_CEIL_SLACK = 1e-9


@dataclass(frozen=True)
class Stage:
    """One denoising stage.

    index: 0 for the base stage, k for the k-th upscaling stage.
    height, width: pixel size of the stage's image.
    ratio: the stage's size over the native size (2^k; for super-resolution
        ceil(long side / native long side)): the dilation and blur scale of DemoFusion's global
        pass.
    strength: the fraction of the schedule denoised (1.0 for the base stage).
    num_inference_steps: scheduler steps of the stage, ceil(total steps * strength).
    timesteps: the stage's timesteps (as img2img's get_timesteps chooses them), when a scheduler
        was given to the planner; None otherwise.
    """

    index: int
    height: int
    width: int
    ratio: int
    strength: float
    num_inference_steps: int
    timesteps: Optional[Tuple[float, ...]] = None


def stage_steps(num_inference_steps: int, strength: float) -> int:
    """Steps denoised at `strength`: ceil(num_inference_steps * strength), at most all of them."""
    return min(math.ceil(num_inference_steps * strength - _CEIL_SLACK), num_inference_steps)


def stage_timesteps(scheduler, num_inference_steps: int, steps: int, device=None):
    """Set `scheduler` up for a stage that denoises the last `steps` of a num_inference_steps
    schedule, as img2img does: set_timesteps (which also resets a multistep scheduler's history),
    slice off the first (num_inference_steps - steps) * order timesteps, set_begin_index.
    Mutates `scheduler`; returns the stage's timesteps (1-D tensor)."""
    scheduler.set_timesteps(num_inference_steps, device=device)
    start = (num_inference_steps - steps) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_args(height, width, sample_size, vae_scale_factor, num_inference_steps, upscale_strength):
    _check_positive_int("height", height)
    _check_positive_int("width", width)
    _check_positive_int("sample_size", sample_size)
    _check_positive_int("vae_scale_factor", vae_scale_factor)
    _check_positive_int("num_inference_steps", num_inference_steps)
    if not 0 < upscale_strength <= 1:
        raise ValueError(f"upscale_strength must be in (0, 1], got {upscale_strength!r}")


def _with_timesteps(stages: List[Stage], scheduler, num_inference_steps: int) -> List[Stage]:
    if scheduler is None:
        return stages
    scheduler = copy.deepcopy(scheduler)  # the planner is pure: the caller's scheduler is untouched
    return [
        Stage(
            **{
                **stage.__dict__,
                "timesteps": tuple(
                    stage_timesteps(scheduler, num_inference_steps, stage.num_inference_steps).tolist()
                ),
            }
        )
        for stage in stages
    ]


def plan_stages(
    height: int,
    width: int,
    *,
    sample_size: int,
    vae_scale_factor: int = 8,
    num_inference_steps: int = 50,
    upscale_strength: float = 0.32,
    scheduler=None,
) -> List[Stage]:
    """The stages of a staged text-to-image run towards `height` x `width` pixels.

    sample_size: the UNet's native latent size (unet.config.sample_size: 128 for SD XL, 64 for
        SD 1.5, 96 for SD 2.1). vae_scale_factor: pixels per latent pixel.
    scheduler: optional diffusers scheduler; when given, each stage carries its timesteps (the
        scheduler is deep-copied, never modified).

    The output size is base x 2^n, with the base's long side at the native size; a warning says
    when that differs from the request (e.g. 3000^2 for SD XL gives 4096^2). A request at or
    below the native size is one base stage at the native size.
    Returns [base stage, upscaling stage 1, ..., n] (see `Stage`).
    """
    _check_args(height, width, sample_size, vae_scale_factor, num_inference_steps, upscale_strength)
    latent_h = math.ceil(height / vae_scale_factor)
    latent_w = math.ceil(width / vae_scale_factor)
    long_side = max(latent_h, latent_w)
    n = max(math.ceil(math.log2(long_side / sample_size) - _CEIL_SLACK), 0)
    base_h = math.ceil(sample_size * latent_h / long_side - _CEIL_SLACK) * vae_scale_factor
    base_w = math.ceil(sample_size * latent_w / long_side - _CEIL_SLACK) * vae_scale_factor
    out_h, out_w = base_h * 2**n, base_w * 2**n
    if (out_h, out_w) != (height, width):
        warnings.warn(
            f"plan_stages: generating {out_w}x{out_h} (width x height) instead of the requested "
            f"{width}x{height}: the output is the native-size base ({base_w}x{base_h}) times 2^{n}",
            UserWarning,
            stacklevel=2,
        )
    stages = [Stage(0, base_h, base_w, 1, 1.0, num_inference_steps)]
    for k in range(1, n + 1):
        strength = upscale_strength * (n - k + 1) / n
        stages.append(
            Stage(k, base_h * 2**k, base_w * 2**k, 2**k, strength, stage_steps(num_inference_steps, strength))
        )
    return _with_timesteps(stages, scheduler, num_inference_steps)


def plan_super_resolution(
    height: int,
    width: int,
    *,
    sample_size: int,
    vae_scale_factor: int = 8,
    num_inference_steps: int = 50,
    upscale_strength: float = 0.32,
    scheduler=None,
) -> List[Stage]:
    """The single stage of a super-resolution run: the input image resized straight to
    `height` x `width` (rounded up to a multiple of vae_scale_factor, with a warning when that
    changes it), ratio = ceil(long side / native long side), strength = upscale_strength.
    Arguments as in `plan_stages`; returns [Stage(index=1, ...)]."""
    _check_args(height, width, sample_size, vae_scale_factor, num_inference_steps, upscale_strength)
    out_h = math.ceil(height / vae_scale_factor) * vae_scale_factor
    out_w = math.ceil(width / vae_scale_factor) * vae_scale_factor
    if (out_h, out_w) != (height, width):
        warnings.warn(
            f"plan_super_resolution: generating {out_w}x{out_h} (width x height) instead of "
            f"{width}x{height}: sizes are multiples of vae_scale_factor={vae_scale_factor}",
            UserWarning,
            stacklevel=2,
        )
    ratio = max(math.ceil(max(out_h, out_w) / (sample_size * vae_scale_factor) - _CEIL_SLACK), 1)
    stage = Stage(
        1, out_h, out_w, ratio, float(upscale_strength), stage_steps(num_inference_steps, upscale_strength)
    )
    return _with_timesteps([stage], scheduler, num_inference_steps)


def _check_size(name, value, vae_scale_factor):
    _check_positive_int(name, value)
    if value % vae_scale_factor:
        raise ValueError(f"{name} must be a multiple of vae_scale_factor={vae_scale_factor}, got {value}")


def _ratio(height, width, sample_size, vae_scale_factor):
    return max(math.ceil(max(height, width) / (sample_size * vae_scale_factor) - _CEIL_SLACK), 1)


def plan_chain(
    base_height: int,
    base_width: int,
    strengths,
    *,
    sizes=None,
    sample_size: int,
    vae_scale_factor: int = 8,
    num_inference_steps: int = 50,
    scheduler=None,
) -> List[Stage]:
    """An explicit stage plan: a base stage at base_height x base_width pixels (any size, e.g.
    512 x 1024 for SD 1.5), then one upscaling stage per entry of `strengths` (each in (0, 1]),
    stage k at sizes[k - 1] ((height, width) pixels) or, without `sizes`, base x 2^k.
    Stage k denoises ceil(num_inference_steps * strengths[k - 1]) steps; every stage's ratio is
    ceil(long side / native long side), as in `plan_super_resolution` (1 at most the native size).
    The official SD 1.5 notebook chain is plan_chain(512, 1024, (0.4, 0.3, 0.2, 0.1),
    sample_size=64): 512x1024, 1024x2048, 2048x4096, 4096x8192, 8192x16384 (h x w) at
    50, 20, 15, 10, 5 steps. Arguments otherwise as in `plan_stages`; returns
    [base stage, upscaling stage 1, ..., n] (see `Stage`)."""
    _check_args(base_height, base_width, sample_size, vae_scale_factor, num_inference_steps, 1.0)
    _check_size("base_height", base_height, vae_scale_factor)
    _check_size("base_width", base_width, vae_scale_factor)
    strengths = tuple(strengths)
    if sizes is None:
        sizes = [(base_height * 2**k, base_width * 2**k) for k in range(1, len(strengths) + 1)]
    sizes = [tuple(size) for size in sizes]
    if len(sizes) != len(strengths):
        raise ValueError(f"sizes has {len(sizes)} entries but strengths has {len(strengths)}: give one size per stage")
    stages = [
        Stage(
            0, base_height, base_width, _ratio(base_height, base_width, sample_size, vae_scale_factor), 1.0,
            num_inference_steps,
        )
    ]
    for k, ((height, width), strength) in enumerate(zip(sizes, strengths), start=1):
        stages.append(
            Stage(
                k, height, width, _ratio(height, width, sample_size, vae_scale_factor), float(strength),
                stage_steps(num_inference_steps, strength) if _is_strength(strength) else 0,
            )
        )
    check_stages(stages, vae_scale_factor=vae_scale_factor, num_inference_steps=num_inference_steps)
    return _with_timesteps(stages, scheduler, num_inference_steps)


def _is_strength(value):
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= 1


def check_stages(stages, *, vae_scale_factor: int, num_inference_steps: int, super_resolution: bool = False):
    """Validate a stage plan given by hand (a list of `Stage`), raising a one-line ValueError:
    at least one stage; indices 0, 1, ..., n (1, ..., n for super-resolution, which has no base
    stage); sizes positive multiples of vae_scale_factor; the base stage at strength 1.0 with all
    num_inference_steps steps; upscaling strengths in (0, 1] with 1 <= steps <= num_inference_steps;
    ratios positive ints. Returns the stages as a list."""
    stages = list(stages)
    if not stages:
        raise ValueError("stages must hold at least one Stage")
    first = 1 if super_resolution else 0
    for position, stage in enumerate(stages):
        if not isinstance(stage, Stage):
            raise ValueError(f"stages[{position}] must be a Stage, got {type(stage).__name__}")
        if stage.index != first + position:
            what = "super-resolution has no base stage: indices 1, 2, ..." if super_resolution else "indices 0, 1, ..."
            raise ValueError(f"stages[{position}].index must be {first + position} ({what}), got {stage.index}")
        _check_size(f"stages[{position}].height", stage.height, vae_scale_factor)
        _check_size(f"stages[{position}].width", stage.width, vae_scale_factor)
        _check_positive_int(f"stages[{position}].ratio", stage.ratio)
        if stage.index == 0:
            if stage.strength != 1.0 or stage.num_inference_steps != num_inference_steps:
                raise ValueError(
                    f"stages[0] (the base stage) must have strength 1.0 and num_inference_steps={num_inference_steps}, "
                    f"got {stage.strength!r} and {stage.num_inference_steps!r}"
                )
            continue
        if not _is_strength(stage.strength):
            raise ValueError(f"stages[{position}].strength must be in (0, 1], got {stage.strength!r}")
        steps = stage.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_inference_steps:
            raise ValueError(
                f"stages[{position}].num_inference_steps must be an int in [1, {num_inference_steps}], got {steps!r}"
            )
    return stages
