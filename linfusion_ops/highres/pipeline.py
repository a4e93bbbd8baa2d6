"""Staged high-resolution generation with LinFusion: `LinFusionHighResPipeline` (SD 1.5 / 2.1)
and `LinFusionHighResXLPipeline` (SD XL), diffusers pipelines built with `from_pipe(pipe)`.

Text-to-image: a base image at the native size, then x2 per stage (see `stages.plan_stages`);
each upscaling stage decodes, resizes (bicubic), encodes, re-noises to the stage's first
timestep and denoises the stage's last steps of the schedule. With `image=`, one stage at the
target size (super-resolution). `method="demofusion"` adds DemoFusion's skip residual and dilated
global pass in the upscaling stages and renormalises each stage's latents to the anchor's
per-channel statistics; `method="sdedit"` is the plain img2img chain.
"""

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..optional import needs

with needs(__name__):  # a missing extra is a one-line MissingExtraError
    import PIL.Image
    import numpy as np
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from diffusers.schedulers import KarrasDiffusionSchedulers
    from diffusers.utils import BaseOutput, logging
    from diffusers.utils.torch_utils import randn_tensor

from ..linfusion.model import LinFusion, has_linfusion
from .demofusion import blurred_for_global_pass, channel_stats, demofusion_weights, dilated_convs, match_channel_stats
from .stages import Stage, check_stages, plan_stages, plan_super_resolution, stage_timesteps

logger = logging.get_logger(__name__)

METHODS = ("demofusion", "sdedit")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class LinFusionHighResPipelineOutput(BaseOutput):
    """images: the final images (list of PIL images, (B, H, W, 3) array, (B, 3, H, W) tensor in
    [0, 1], or (B, 4, H/8, W/8) latents, per output_type). stage_images: with return_stages,
    the same for every stage, base first. nsfw_content_detected: the SD safety checker's flags
    (None without one)."""

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    stage_images: Optional[List[Any]] = None
    nsfw_content_detected: Optional[List[bool]] = None


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize of (B, 3, H, W) images in [-1, 1], clamped to [-1, 1] before and after
    (as a round trip through an 8-bit image would clamp), computed in fp32."""
    out = F.interpolate(
        image.float().clamp(-1, 1), size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    return out.clamp(-1, 1).to(image.dtype)


class _HighResMixin:
    """The staged loop shared by the SD and SD XL pipelines. A subclass provides
    `_added_cond_kwargs(cond, image_embeds)` (the UNet's added conditioning from the
    callback-visible tensors `cond`), `_finish_images` (safety checker / watermark, postprocess)
    and its own `__call__`: `_begin`, prompt encoding, `_generate`."""

    # SD XL's VAE overflows in fp16 (its config says force_upcast); SD 1.5's does not.
    _upcast_vae_in_fp16 = False

    def _init_highres(self, controlnet):
        if controlnet is not None and not isinstance(controlnet, ControlNetModel):
            raise ValueError(
                f"controlnet must be a diffusers ControlNetModel (one ControlNet), got {type(controlnet).__name__}"
            )
        self.register_modules(controlnet=controlnet)
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )
        self._low_memory_handle = None
        self._vae_tiling_handle = None
        self._stages: List[Stage] = []
        self._stage_index = 0
        self.stage_stats: List[Dict[str, Any]] = []
        self.linfusion = None

    # -----------------------------------------------------------------------------------------
    # Construction
    @classmethod
    def from_pipe(cls, pipeline, *, linfusion_path: Optional[str] = None, **kwargs):
        """Build from any SD (or SD XL) pipeline, sharing its modules (diffusers' from_pipe; pass
        `controlnet=` to add one). When the UNet runs no LinFusion yet, one is mounted with
        `LinFusion.construct_for` (the checkpoint that the official mapping picks from the
        pipeline's name, or `linfusion_path`: a hub repository or local folder) and kept as
        `pipe.linfusion`; a UNet that already has one keeps it."""
        pipe = super().from_pipe(pipeline, **kwargs)
        if not has_linfusion(pipe.unet):
            pipe.linfusion = LinFusion.construct_for(
                pipeline, unet=pipe.unet, pretrained_model_name_or_path=linfusion_path
            )
        return pipe

    # -----------------------------------------------------------------------------------------
    # Memory options (linfusion_ops.highres.low_memory / tiled_vae)
    def enable_low_memory(self, **kwargs):
        """Apply `linfusion_ops.highres.apply_low_memory(self.unet, self.controlnet, **kwargs)`
        (chunked CFG, chunked feed-forward, in-place SiLU, CPU-held skips, chunked LinFusion
        self-attention, or a `max_memory` budget) until `disable_low_memory()`. Returns the handle."""
        from .low_memory import apply_low_memory

        self.disable_low_memory()
        self._low_memory_handle = apply_low_memory(self.unet, self.controlnet, **kwargs)
        return self._low_memory_handle

    def disable_low_memory(self):
        """Undo `enable_low_memory` (a no-op when it is off)."""
        if self._low_memory_handle is not None:
            self._low_memory_handle.remove()
            self._low_memory_handle = None

    def enable_vae_tiling(self, **kwargs):
        """Decode and encode in tiles with whole-image GroupNorm statistics
        (`linfusion_ops.highres.enable_tiled_vae(self.vae, **kwargs)`), replacing diffusers' own
        tiling, whose per-tile statistics show seams. Returns the handle."""
        from . import enable_tiled_vae

        self.disable_vae_tiling()
        self._vae_tiling_handle = enable_tiled_vae(self.vae, **kwargs)
        return self._vae_tiling_handle

    def disable_vae_tiling(self):
        """Undo `enable_vae_tiling` (a no-op when it is off)."""
        if self._vae_tiling_handle is not None:
            self._vae_tiling_handle.remove()
            self._vae_tiling_handle = None

    # -----------------------------------------------------------------------------------------
    # State visible to callbacks
    @property
    def stages(self) -> List[Stage]:
        """The plan of the current (or last) call."""
        return self._stages

    @property
    def stage_index(self) -> int:
        """Position in `stages` of the stage being denoised (callbacks read it)."""
        return self._stage_index

    @property
    def num_stages(self) -> int:
        """len(stages)."""
        return len(self._stages)

    # -----------------------------------------------------------------------------------------
    # VAE
    @contextlib.contextmanager
    def _vae_precision(self):
        upcast = self._upcast_vae_in_fp16 and self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            yield
        finally:
            if upcast:
                self.vae.to(dtype=torch.float16)

    def _latent_affine(self, latents):
        """(shift, scale) with latents = (vae latents - shift) * scale."""
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return 0.0, config.scaling_factor
        view = dict(device=latents.device, dtype=latents.dtype)
        mean = torch.tensor(mean, **view).view(1, -1, 1, 1)
        return mean, config.scaling_factor / torch.tensor(std, **view).view(1, -1, 1, 1)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) latents -> (B, 3, H, W) images in about [-1, 1], in the latents' dtype."""
        with self._vae_precision():
            shift, scale = self._latent_affine(latents)
            z = (latents / scale + shift).to(self.vae.dtype)
            return self.vae.decode(z, return_dict=False)[0].to(latents.dtype)

    def _encode(self, image: torch.Tensor, generator, dtype) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, 4, H/8, W/8) scaled latents (sampled from the
        posterior with `generator`)."""
        with self._vae_precision():
            posterior = self.vae.encode(image.to(self.vae.dtype))
            latents = retrieve_latents(posterior, generator=generator).to(dtype)
        shift, scale = self._latent_affine(latents)
        return (latents - shift) * scale

    # -----------------------------------------------------------------------------------------
    # One noise prediction
    def _noise_prediction(self, latents, t, cond, control, controlnet_conditioning_scale):
        batch = latents.shape[0]
        model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        unet_kwargs = dict(
            encoder_hidden_states=cond["prompt_embeds"],
            timestep_cond=self._timestep_cond,
            cross_attention_kwargs=self.cross_attention_kwargs,
            added_cond_kwargs=self._added_cond_kwargs(cond, image_embeds=True),
        )
        if control is not None:
            down, mid = self.controlnet(
                model_input,
                t,
                encoder_hidden_states=cond["prompt_embeds"],
                controlnet_cond=control,
                conditioning_scale=controlnet_conditioning_scale,
                added_cond_kwargs=self._added_cond_kwargs(cond, image_embeds=False),
                return_dict=False,
            )
            unet_kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        noise_pred = self.unet(model_input, t, return_dict=False, **unet_kwargs)[0]
        self._stats["unet_calls"] += 1
        self._stats["unet_evaluations_per_image"] += model_input.shape[0] // batch
        if self.do_classifier_free_guidance:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + self.guidance_scale * (text - uncond)
            if self.guidance_rescale > 0.0:
                noise_pred = rescale_noise_cfg(noise_pred, text, guidance_rescale=self.guidance_rescale)
        return noise_pred

    def _control_image(self, control_image, stage, batch, device, dtype):
        if control_image is None:
            return None
        image = self.control_image_processor.preprocess(control_image, height=stage.height, width=stage.width)
        image = _expand_batch(image, batch, "control_image").to(device=device, dtype=dtype)
        return torch.cat([image] * 2) if self.do_classifier_free_guidance else image

    # -----------------------------------------------------------------------------------------
    # One stage
    def _denoise_stage(self, stage, latents, clean, noise, cond, ctx):
        """Denoise `latents` over the stage's timesteps (already set on the scheduler). clean,
        noise: the stage's encoded input and its noise (None in the base stage), for the skip
        residual. Returns the latents (after the last step done, when a callback interrupts)."""
        demofusion = ctx["method"] == "demofusion" and clean is not None
        control = self._control_image(ctx["control_image"], stage, latents.shape[0], latents.device, latents.dtype)
        predict = dict(cond=cond, control=control, controlnet_conditioning_scale=ctx["controlnet_conditioning_scale"])
        timesteps = ctx["timesteps"]
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            progress_bar.set_description(
                f"stage {self._stage_index + 1}/{len(self._stages)} ({stage.width}x{stage.height})"
            )
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                if demofusion:
                    w = demofusion_weights(
                        t,
                        cosine_scale_1=ctx["cosine_scale_1"],
                        cosine_scale_2=ctx["cosine_scale_2"],
                        cosine_scale_3=ctx["cosine_scale_3"],
                        num_train_timesteps=self.scheduler.config.num_train_timesteps,
                    )
                    renoised = self.scheduler.add_noise(clean, noise, t.reshape(1).expand(clean.shape[0]))
                    latents = (1 - w.skip) * latents + w.skip * renoised
                noise_pred = self._noise_prediction(latents, t, **predict)
                if demofusion and stage.ratio > 1:
                    # Both passes are predicted before the one step, so both are scaled with this
                    # timestep's sigma; the official loop steps in between, which changes the
                    # global pass's scaling with Euler (docs/highres.md, differences).
                    blurred = blurred_for_global_pass(latents, stage.ratio, ctx["gaussian_sigma"] * w.sigma)
                    with dilated_convs(self.unet, self.controlnet, ratio=stage.ratio):
                        global_pred = self._noise_prediction(blurred, t, **predict)
                    noise_pred = (1 - w.global_) * noise_pred + w.global_ * global_pred
                latents = self.scheduler.step(noise_pred, t, latents, **ctx["extra_step_kwargs"], return_dict=False)[0]

                if ctx["callback_on_step_end"] is not None:
                    tensors = {k: latents if k == "latents" else cond[k] for k in ctx["tensor_inputs"]}
                    outputs = ctx["callback_on_step_end"](self, i, t, tensors) or {}
                    latents = outputs.pop("latents", latents)
                    for k, v in outputs.items():
                        if k in cond:
                            cond[k] = v
                progress_bar.update()
        return latents

    # -----------------------------------------------------------------------------------------
    # The staged run
    def _generate(self, cond, batch, device, dtype, options):
        """The staged run over `self.stages`. cond: the callback-visible conditioning tensors
        (CFG batch); options: the __call__ arguments (its locals), with `image` preprocessed and
        `tensor_inputs` the callback's tensor names."""
        ctx = dict(options)
        method, image = ctx["method"], ctx["image"]
        output_type, return_stages, generator = ctx["output_type"], ctx["return_stages"], ctx["generator"]
        num_inference_steps, latents = ctx["num_inference_steps"], ctx["latents"]
        ctx["extra_step_kwargs"] = self.prepare_extra_step_kwargs(generator, ctx["eta"])
        self.stage_stats = []
        raw_stages, anchor, decoded = [], None, None
        for self._stage_index, stage in enumerate(self._stages):
            self._stats = dict(
                stage=stage.index,
                height=stage.height,
                width=stage.width,
                steps=stage.num_inference_steps,
                unet_calls=0,
                unet_evaluations_per_image=0,
            )
            start, cpu_start = time.perf_counter(), time.process_time()
            ctx["timesteps"] = stage_timesteps(self.scheduler, num_inference_steps, stage.num_inference_steps, device)
            if stage.index == 0:
                clean = noise = None
                latents = self.prepare_latents(
                    batch, self.unet.config.in_channels, stage.height, stage.width, dtype, device, generator, latents
                )
            else:
                # The input image feeds the first stage only; later stages refine the previous
                # stage's output (a multi-stage super-resolution plan is a chain, as text-to-image).
                from_input = decoded is None
                source = _expand_batch((image if from_input else decoded).to(device), batch, "image")
                clean = self._encode(resize_image(source, stage.height, stage.width), generator, dtype)
                source = decoded = None  # a full-size image: not kept while the stage runs
                if from_input:
                    anchor = channel_stats(clean)
                noise = randn_tensor(clean.shape, generator=generator, device=device, dtype=dtype)
                latents = self.scheduler.add_noise(clean, noise, ctx["timesteps"][:1].expand(batch))
            latents = self._denoise_stage(stage, latents, clean, noise, cond, ctx)
            interrupted = self.interrupt
            if not interrupted:
                if method == "demofusion":
                    if stage.index == 0:
                        anchor = channel_stats(latents)
                    else:
                        latents = match_channel_stats(latents, *anchor)
            last = interrupted or self._stage_index == len(self._stages) - 1
            decoded = None if (last and output_type == "latent") else self._decode(latents)
            self._stats["seconds"] = time.perf_counter() - start
            self._stats["cpu_seconds"] = time.process_time() - cpu_start
            self.stage_stats.append(self._stats)
            if return_stages:
                raw_stages.append(latents if output_type == "latent" else decoded)
            if last:
                break

        nsfw, stage_images = None, None
        if output_type == "latent":
            images, stage_images = latents, raw_stages
        else:
            images, nsfw = self._finish_images(decoded, device, dtype, output_type)
            stage_images = [self.image_processor.postprocess(x, output_type=output_type) for x in raw_stages[:-1]]
            stage_images.append(images)
        self.maybe_free_model_hooks()
        if not return_stages:
            stage_images = None
        if not ctx["return_dict"]:
            return (images, stage_images, nsfw)
        return LinFusionHighResPipelineOutput(images=images, stage_images=stage_images, nsfw_content_detected=nsfw)

    def _plan(self, image, height, width, num_inference_steps, upscale_strength, stages=None) -> List[Stage]:
        if stages is not None:
            self._stages = check_stages(
                stages, vae_scale_factor=self.vae_scale_factor, num_inference_steps=num_inference_steps,
                super_resolution=image is not None,
            )
            final = self._stages[-1]
            if (height or final.height, width or final.width) != (final.height, final.width):
                raise ValueError(
                    f"height x width ({height}x{width}) differs from the last stage's size "
                    f"({final.height}x{final.width}): with stages=, leave them out or give the last stage's size"
                )
            return self._stages
        plan = plan_super_resolution if image is not None else plan_stages
        self._stages = plan(
            height,
            width,
            sample_size=self._native_sample_size(),
            vae_scale_factor=self.vae_scale_factor,
            num_inference_steps=num_inference_steps,
            upscale_strength=upscale_strength,
        )
        return self._stages

    def _native_sample_size(self) -> int:
        size = self.unet.config.sample_size
        return size if isinstance(size, int) else max(size)

    def _prepare_image_conditioning(self, ip_adapter_image, ip_adapter_image_embeds, device, batch, dtype):
        """The IP-Adapter image embeddings and the guidance-scale embedding (for UNets with
        time_cond_proj_dim), or None, shared by every UNet call of the run."""
        self._image_embeds = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            self._image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, batch, self.do_classifier_free_guidance
            )
        self._timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            scale = torch.tensor(self.guidance_scale - 1).repeat(batch)
            self._timestep_cond = self.get_guidance_scale_embedding(
                scale, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=dtype)

    def _begin(self, options):
        """Per-call state from the __call__ arguments: guidance settings, the preprocessed input
        image, the target size and the stage plan. Returns (image, height, width, tensor_inputs)."""
        if options["method"] not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {options['method']!r}")
        if options["output_type"] not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {options['output_type']!r}")
        if (options["control_image"] is None) != (self.controlnet is None):
            raise ValueError(
                "control_image is needed exactly when the pipeline has a controlnet (controlnet: "
                f"{type(self.controlnet).__name__ if self.controlnet is not None else None}, control_image "
                f"given: {options['control_image'] is not None})"
            )
        if self.linfusion is None and not has_linfusion(self.unet):
            logger.warning(
                "LinFusion is not mounted on this UNet: its self-attention is softmax attention, "
                "quadratic in the image size. Build the pipeline with from_pipe, or mount one with "
                "LinFusion.construct_for."
            )
        self._guidance_scale = options["guidance_scale"]
        self._guidance_rescale = options["guidance_rescale"]
        self._clip_skip = options["clip_skip"]
        self._cross_attention_kwargs = options["cross_attention_kwargs"]
        self._interrupt = False
        tensor_inputs = options["callback_on_step_end_tensor_inputs"]
        if isinstance(options["callback_on_step_end"], (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = options["callback_on_step_end"].tensor_inputs
        image = options["image"]
        image = None if image is None else self.image_processor.preprocess(image)
        stages = options["stages"]
        if stages is not None:
            self._plan(image, options["height"], options["width"], options["num_inference_steps"], None, stages)
            height, width = self._stages[-1].height, self._stages[-1].width
        else:
            height, width = self._target_size(image, options["height"], options["width"])
            self._plan(image, height, width, options["num_inference_steps"], options["upscale_strength"])
        return image, height, width, tensor_inputs

    def _target_size(self, image, height, width):
        """The requested output size: height/width, else for super-resolution twice the input
        image's size, else the native size."""
        if height and width:
            return height, width
        if image is not None:
            h, w = image.shape[-2:]
            return height or 2 * h, width or 2 * w
        native = self._native_sample_size() * self.vae_scale_factor
        return height or native, width or native


def _expand_batch(images: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """(b, ...) -> (batch, ...): b == batch as is; b == 1 or b dividing batch (one per prompt,
    num_images_per_prompt each) repeated per image."""
    if images.shape[0] == batch:
        return images
    if batch % images.shape[0]:
        raise ValueError(f"{name}: batch of {images.shape[0]} images does not divide the batch of {batch} outputs")
    return images.repeat_interleave(batch // images.shape[0], dim=0)


_CALL_DOC = """
        Args (those of the diffusers pipeline it extends, plus):
            height, width: the requested output size in pixels. Text-to-image generates the base
                image at the native size (long side unet.config.sample_size * vae_scale_factor,
                same aspect ratio) and doubles it per stage: the output is base x 2^n (a warning
                says when that differs from the request). Super-resolution (image given) resizes
                the input straight to height x width (default: twice the input).
            image: an input image (PIL, array or tensor, as diffusers' image processor takes them)
                for super-resolution: one stage at the target size, strength upscale_strength.
            method: "demofusion" (skip residual, dilated global pass, renormalisation) or
                "sdedit" (plain img2img stages).
            upscale_strength: the first upscaling stage's strength; stage k of n gets
                upscale_strength * (n - k + 1) / n and ceil(num_inference_steps * strength) steps.
            cosine_scale_1, cosine_scale_2, cosine_scale_3: DemoFusion's exponents on the cosine
                factor for the skip residual, the global-pass weight and the blur std.
            gaussian_sigma: the blur std at cf = 1 (std = gaussian_sigma * (0.99 cf^cs3 + 0.01)).
            control_image: the ControlNet condition (when the pipeline has a controlnet), resized
                to every stage's size; controlnet_conditioning_scale scales its residuals.
            return_stages: also return every stage's image (output.stage_images, base first).
            stages: an explicit stage plan (a list of `Stage`, e.g. from
                `linfusion_ops.highres.plan_chain`) instead of the automatic one; validated by
                `check_stages` (with image=: upscaling stages only, indices 1, 2, ...; the input
                feeds the first, each later stage refines the previous one's output).
                upscale_strength is then unused; height/width, if given, must be the last
                stage's size.
            callback_on_step_end: called after every step of every stage with the step index
                within the stage; `pipe.stage_index`, `pipe.stages` and `pipe.num_timesteps` say
                where it is. Setting `pipe._interrupt = True` stops the run: the latest latents
                are returned.

        Returns:
            LinFusionHighResPipelineOutput (images, stage_images, nsfw_content_detected), or
            that tuple with return_dict=False. `pipe.stage_stats` holds per stage the size,
            steps, UNet calls, UNet evaluations per image (CFG halves and DemoFusion's global
            pass counted), wall seconds and process CPU seconds (VAE work of the stage included).
"""


class LinFusionHighResPipeline(_HighResMixin, StableDiffusionPipeline):
    """Staged high-resolution text-to-image and super-resolution for SD 1.5 / SD 2.1 with
    LinFusion (see the module docstring). Build it with `LinFusionHighResPipeline.from_pipe(pipe)`."""

    _optional_components = StableDiffusionPipeline._optional_components + ["controlnet"]
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: Optional[StableDiffusionSafetyChecker] = None,
        feature_extractor: Optional[CLIPImageProcessor] = None,
        image_encoder: Optional[CLIPVisionModelWithProjection] = None,
        requires_safety_checker: bool = False,
        controlnet: Optional[ControlNetModel] = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self._init_highres(controlnet)

    def _added_cond_kwargs(self, cond, image_embeds):
        if image_embeds and self._image_embeds is not None:
            return {"image_embeds": self._image_embeds}
        return None

    def _finish_images(self, image, device, dtype, output_type):
        image, nsfw = self.run_safety_checker(image, device, dtype)
        denormalize = None if nsfw is None else [not flag for flag in nsfw]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize), nsfw

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: Optional[List[torch.Tensor]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        guidance_rescale: float = 0.0,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Union[Callable, PipelineCallback, MultiPipelineCallbacks]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        image=None,
        method: str = "demofusion",
        upscale_strength: float = 0.4,
        cosine_scale_1: float = 3.0,
        cosine_scale_2: float = 1.0,
        cosine_scale_3: float = 1.0,
        gaussian_sigma: float = 0.8,
        control_image=None,
        controlnet_conditioning_scale: float = 1.0,
        return_stages: bool = False,
        stages: Optional[List[Stage]] = None,
    ):
        options = dict(locals())
        image, height, width, tensor_inputs = self._begin(options)
        self.check_inputs(
            prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
            ip_adapter_image, ip_adapter_image_embeds, tensor_inputs,
        )
        device = self._execution_device
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=(cross_attention_kwargs or {}).get("scale"), clip_skip=clip_skip,
        )
        batch = prompt_embeds.shape[0]
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        self._prepare_image_conditioning(ip_adapter_image, ip_adapter_image_embeds, device, batch, prompt_embeds.dtype)
        options.update(image=image, tensor_inputs=tensor_inputs)
        return self._generate({"prompt_embeds": prompt_embeds}, batch, device, prompt_embeds.dtype, options)


class LinFusionHighResXLPipeline(_HighResMixin, StableDiffusionXLPipeline):
    """Staged high-resolution text-to-image and super-resolution for SD XL with LinFusion (see
    the module docstring). Build it with `LinFusionHighResXLPipeline.from_pipe(pipe)`. The
    micro-conditioning `original_size` and `target_size` default to the output size in every
    stage, as in the official pipeline."""

    _optional_components = StableDiffusionXLPipeline._optional_components + ["controlnet"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    _upcast_vae_in_fp16 = True

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: Optional[CLIPVisionModelWithProjection] = None,
        feature_extractor: Optional[CLIPImageProcessor] = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: Optional[bool] = None,
        controlnet: Optional[ControlNetModel] = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self._init_highres(controlnet)

    def _added_cond_kwargs(self, cond, image_embeds):
        added = {"text_embeds": cond["add_text_embeds"], "time_ids": cond["add_time_ids"]}
        if image_embeds and self._image_embeds is not None:
            added["image_embeds"] = self._image_embeds
        return added

    def _finish_images(self, image, device, dtype, output_type):
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type), None

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]] = None,
        prompt_2: Optional[Union[str, List[str]]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        negative_prompt_2: Optional[Union[str, List[str]]] = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: Optional[List[torch.Tensor]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        guidance_rescale: float = 0.0,
        original_size: Optional[Tuple[int, int]] = None,
        crops_coords_top_left: Tuple[int, int] = (0, 0),
        target_size: Optional[Tuple[int, int]] = None,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Union[Callable, PipelineCallback, MultiPipelineCallbacks]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        image=None,
        method: str = "demofusion",
        upscale_strength: float = 0.32,
        cosine_scale_1: float = 3.0,
        cosine_scale_2: float = 1.0,
        cosine_scale_3: float = 1.0,
        gaussian_sigma: float = 0.8,
        control_image=None,
        controlnet_conditioning_scale: float = 1.0,
        return_stages: bool = False,
        stages: Optional[List[Stage]] = None,
    ):
        options = dict(locals())
        image, height, width, tensor_inputs = self._begin(options)
        self.check_inputs(
            prompt, prompt_2, height, width, None,
            negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs=tensor_inputs,
        )
        device = self._execution_device
        (prompt_embeds, negative_prompt_embeds, pooled, negative_pooled) = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=(cross_attention_kwargs or {}).get("scale"), clip_skip=clip_skip,
        )
        batch = prompt_embeds.shape[0]
        final = self._stages[-1]
        projection_dim = (
            int(pooled.shape[-1]) if self.text_encoder_2 is None else self.text_encoder_2.config.projection_dim
        )
        time_ids = self._get_add_time_ids(
            original_size or (final.height, final.width), crops_coords_top_left,
            target_size or (final.height, final.width), dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        ).to(device).repeat(batch, 1)
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            pooled = torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        self._prepare_image_conditioning(ip_adapter_image, ip_adapter_image_embeds, device, batch, prompt_embeds.dtype)
        options.update(image=image, tensor_inputs=tensor_inputs)
        cond = {"prompt_embeds": prompt_embeds, "add_text_embeds": pooled.to(device), "add_time_ids": time_ids}
        return self._generate(cond, batch, device, prompt_embeds.dtype, options)


LinFusionHighResPipeline.__call__.__doc__ = "Staged high-resolution generation (SD 1.5 / 2.1).\n" + _CALL_DOC
LinFusionHighResXLPipeline.__call__.__doc__ = "Staged high-resolution generation (SD XL).\n" + _CALL_DOC
