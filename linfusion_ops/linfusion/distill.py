"""Distil LinFusion from a Stable Diffusion pipeline (SD 1.x, SD 2.x or SD XL, detected from its
UNet) on accelerate; `python -m linfusion_ops.linfusion.distill --help` (or scripts/distill_linfusion.py) lists the
flags. What one step computes is linfusion_ops.linfusion.distillation's; this module reads the data, runs the
loop, and saves.

    accelerate launch -m linfusion_ops.linfusion.distill \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --train_data_dir my_images --output_dir linfusion-mine --mixed_precision bf16 \\
      --train_batch_size 8 --max_train_steps 100000 --gradient_checkpointing

Data: `--train_data_dir`, a folder of images with captions in a `metadata.jsonl` (one
`{"file_name": ..., "text": ...}` per line; `--caption_column` names the caption key) or in a
`.txt` file beside each image; or
`--dataset_name`, anything `datasets.load_dataset` reads (a hub name or a local folder), with
`--image_column` / `--caption_column`. Images are resized (shorter side) and centre-cropped to
`--resolution`; SD XL gets the original size, crop corner and target size as its time ids.

Output: `output_dir/checkpoint-<step>/` every `--checkpointing_steps` optimizer steps, holding
the accelerate training state (optimizer, RNG; `--resume_from_checkpoint latest` continues from
it) and `linfusion/`, a LinFusion in the official format (config.json + safetensors, readable by
`LinFusion.from_pretrained` and the official class); the final LinFusion in `output_dir`.

Resuming: every random draw of a step (the VAE latent sample, the noise, the timesteps) comes
from linfusion_ops.seeding.seed_step(seed, micro-batch index, process index), and the data order
of epoch e is a function of (seed, e); so a run resumed from any checkpoint makes the draws the
uninterrupted run made and ends with bitwise the same weights (fp32). The seed (--seed, else the
checkpoint's, else a fresh one) is stored in every checkpoint; a resume with another --seed is
refused. The data and the checkpoint are checked (folder, images, captions, seed) before any
model loads.
"""

import argparse
import copy
import io
import json
import math
import os
import random
import re
import shutil
import sys
from pathlib import Path

import torch

from ..optional import exit_on_missing
from .distillation import (
    DEFAULT_LOSS_WEIGHTS,
    INITS,
    Attn1FeatureTap,
    diffusion_target,
    distillation_forward,
    init_linfusion,
    trainable_parameters,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LINFUSION_SUBFOLDER = "linfusion"
# LinFusion-XL's kernel MLPs are dim_n // 16 wide; SD 1.5 / 2.1's are dim_n wide.
XL_MID_DIM_SCALE = 16


def _loss_weights(text):
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers (noise,kd,feat), got {text!r}")
    return weights


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Distil LinFusion from a Stable Diffusion UNet's self-attention.")
    add = parser.add_argument
    add("--pretrained_model_name_or_path", required=True, help="diffusers pipeline folder or hub name")
    add("--revision", default=None)
    add("--variant", default=None, help="weights variant, e.g. fp16")
    add("--pretrained_linfusion_path", "--pretrained_attn_path", default=None,
        help="continue from this LinFusion checkpoint instead of --init")
    add("--init", choices=INITS, default="teacher",
        help="teacher: start to_q/k/v/out from the UNet's attn1 projections; fresh: default init (official)")
    add("--mid_dim_scale", type=int, default=None,
        help=f"kernel-MLP width dim_n // scale; default {XL_MID_DIM_SCALE} for SD XL, none (dim_n) otherwise")
    add("--separate_teacher", action="store_true",
        help="keep a frozen copy of the UNet as teacher instead of unmounting LinFusion for the teacher pass")
    add("--train_data_dir", default=None, help="folder of images with metadata.jsonl or .txt captions")
    add("--dataset_name", default=None, help="a datasets.load_dataset name or local folder")
    add("--dataset_config_name", default=None)
    add("--cache_dir", default=None, help="datasets / hub cache")
    add("--image_column", default="image")
    add("--caption_column", default="text")
    add("--max_train_samples", type=int, default=None)
    add("--output_dir", default="linfusion-distill")
    add("--logging_dir", default="logs")
    add("--report_to", default=None, help="accelerate tracker (tensorboard, wandb, all); none by default")
    add("--resolution", type=int, default=None,
        help="training size in px; default the UNet's sample_size x 8 (512 SD 1.5, 768 SD 2.1, 1024 SD XL)")
    add("--train_batch_size", type=int, default=8, help="per device")
    add("--num_train_epochs", type=int, default=300)
    add("--max_train_steps", type=int, default=None, help="optimizer steps; overrides --num_train_epochs")
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--gradient_checkpointing", action="store_true")
    add("--learning_rate", type=float, default=1e-4)
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", "--weight_decay", type=float, default=0.0)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--max_grad_norm", type=float, default=None, help="clip gradients to this norm (off by default, as officially)")
    add("--loss_weights", type=_loss_weights, default=DEFAULT_LOSS_WEIGHTS, help="noise,kd,feat (default 1,0.5,0.5)")
    add("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    add("--seed", type=int, default=None)
    add("--dataloader_num_workers", type=int, default=0)
    add("--checkpointing_steps", "--save_steps", type=int, default=10000)
    add("--checkpoints_total_limit", type=int, default=None)
    add("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder')
    args = parser.parse_args(argv)
    if (args.train_data_dir is None) == (args.dataset_name is None):
        parser.error("give exactly one of --train_data_dir and --dataset_name")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------
# Data.
def _folder_samples(folder, caption_column="text"):
    """(image path, caption) pairs of an image folder: captions from the `caption_column` entries
    of metadata.jsonl when present, else from a .txt file beside each image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--train_data_dir: {folder} is not a folder")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    metadata = folder / "metadata.jsonl"
    captions = {}
    if metadata.exists():
        try:
            lines = metadata.read_text().splitlines()
            for number, line in enumerate(lines, 1):
                if line.strip():
                    entry = json.loads(line)
                    captions[(folder / entry["file_name"]).resolve()] = entry
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"--train_data_dir: cannot read {metadata}: {error}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"--train_data_dir: {metadata} line {number} is not a JSON object with a \"file_name\": {error}"
            ) from None
    samples = []
    for path in images:
        if metadata.exists():
            entry = captions.get(path.resolve())
            caption = None if entry is None else entry.get(caption_column)
        else:
            side = path.with_suffix(".txt")
            try:
                caption = side.read_text().strip() if side.exists() else None
            except (OSError, UnicodeDecodeError) as error:
                raise ValueError(f"--train_data_dir: cannot read {side}: {error}") from None
        if caption is None:
            raise ValueError(
                f"--train_data_dir: no caption for {path} (expected a {caption_column!r} entry in "
                f"{metadata.name} or a {path.with_suffix('.txt').name} beside it)"
            )
        samples.append((path, caption))
    if not samples:
        raise ValueError(f"--train_data_dir: no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return samples


def _open_image(value):
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):  # datasets' undecoded Image feature
        return Image.open(value["path"] if value.get("bytes") is None else io.BytesIO(value["bytes"]))
    return Image.open(value)


class CaptionedImages(torch.utils.data.Dataset):
    """Images and captions as the UNet's training inputs: pixel_values (3, R, R) in [-1, 1], the
    token ids for each tokenizer (input_ids, input_ids_2), and SD XL's original_size (h, w) and
    crop_top_left (top, left), int64."""

    def __init__(self, samples, tokenizers, resolution):
        self.samples = samples  # indexable of (image or path, caption)
        self.tokenizers = tokenizers
        self.resolution = resolution

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        from PIL import Image

        image, caption = self.samples[index]
        image = _open_image(image).convert("RGB")
        width, height = image.size
        scale = self.resolution / min(width, height)
        resized = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
        image = image.resize(resized, Image.BILINEAR)
        left, top = (resized[0] - self.resolution) // 2, (resized[1] - self.resolution) // 2
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(self.resolution, self.resolution, 3).permute(2, 0, 1).float() / 127.5 - 1.0
        item = {
            "pixel_values": pixels,
            "original_size": torch.tensor([height, width]),
            "crop_top_left": torch.tensor([top, left]),
        }
        for i, tokenizer in enumerate(self.tokenizers):
            item["input_ids" if i == 0 else f"input_ids_{i + 1}"] = tokenizer(
                caption, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                return_tensors="pt",
            ).input_ids[0]
        return item


class _HubSamples:
    """(image, caption) pairs of a datasets.Dataset, read lazily."""

    def __init__(self, dataset, image_column, caption_column):
        for column in (image_column, caption_column):
            if column not in dataset.column_names:
                raise ValueError(
                    f"--dataset_name: no column {column!r} (columns: {dataset.column_names}); set "
                    "--image_column / --caption_column"
                )
        self.dataset, self.image_column, self.caption_column = dataset, image_column, caption_column

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        row = self.dataset[index]
        caption = row[self.caption_column]
        return row[self.image_column], caption[0] if isinstance(caption, (list, tuple)) else caption


def load_samples(args):
    """The (image or path, caption) pairs that --train_data_dir / --dataset_name name, checked:
    a missing or empty folder, an image without a caption or an unreadable caption file raise a
    one-line ValueError. Reads no model."""
    if args.train_data_dir is not None:
        samples = _folder_samples(args.train_data_dir, args.caption_column)
    else:
        import datasets

        hub = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split="train")
        samples = _HubSamples(hub, args.image_column, args.caption_column)
    if len(samples) == 0:
        raise ValueError(f"--dataset_name: {args.dataset_name} has no training rows")
    if args.max_train_samples is not None:
        samples = [samples[i] for i in range(min(args.max_train_samples, len(samples)))]
    return samples


def build_dataset(args, tokenizers, resolution, samples=None) -> CaptionedImages:
    """The training dataset; samples: load_samples(args) when already read."""
    return CaptionedImages(load_samples(args) if samples is None else samples, tokenizers, resolution)


# ---------------------------------------------------------------------------------------------
# Models.
def load_models(args):
    """(scheduler, unet, vae, tokenizers, text_encoders, kind) of the pipeline; kind is "sd-xl"
    when the UNet takes SD XL's text_time conditioning (then two text encoders), else "sd-2"
    (1024-wide text states) or "sd-1"."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = args.pretrained_model_name_or_path
    common = dict(revision=args.revision, cache_dir=args.cache_dir)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant, **common)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **common)
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common)]
    text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=args.variant, **common)]
    if unet.config.addition_embed_type == "text_time":
        kind = "sd-xl"
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **common))
        text_encoders.append(
            CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", variant=args.variant, **common)
        )
    else:
        kind = "sd-2" if unet.config.cross_attention_dim == 1024 else "sd-1"
    return scheduler, unet, vae, tokenizers, text_encoders, kind


def encode_text(text_encoders, batch, device):
    """(encoder_hidden_states, pooled) as the pipelines compute them: SD 1/2 the last hidden
    state and no pooled output; SD XL both encoders' penultimate states, concatenated, and the
    second encoder's projected pooled output."""
    if len(text_encoders) == 1:
        return text_encoders[0](batch["input_ids"].to(device))[0], None
    first = text_encoders[0](batch["input_ids"].to(device), output_hidden_states=True)
    second = text_encoders[1](batch["input_ids_2"].to(device), output_hidden_states=True)
    states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return states, second.text_embeds


def _checkpoints(output_dir):
    found = []
    for entry in Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def resume_checkpoint(args):
    """The checkpoint folder that --resume_from_checkpoint names ("latest": the newest
    checkpoint-<step> in --output_dir, None when there is none), checked without loading it: a
    missing folder or one not named checkpoint-<step> raises a one-line ValueError. None without
    --resume_from_checkpoint."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found = _checkpoints(args.output_dir)
        return found[-1][1] if found else None
    path = Path(args.resume_from_checkpoint)
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint: {path} is not a folder")
    checkpoint_step(path)
    return path


def checkpoint_step(path):
    """The optimizer step of a checkpoint-<step> folder."""
    match = re.fullmatch(r"checkpoint-(\d+)", Path(path).name)
    if match is None:
        raise ValueError(f"--resume_from_checkpoint: {path} is not named checkpoint-<step>")
    return int(match.group(1))


@exit_on_missing("linfusion-distill", "train")
def main(args=None):
    """Run the distillation. args: a parsed Namespace, a list of command-line strings, or None
    (sys.argv)."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list, set_seed
    from tqdm.auto import tqdm

    from ..seeding import resume_seed, save_seed, seed_step
    from .model import LinFusion

    # The data and the checkpoint to resume from are checked before any model loads or output
    # folder is made.
    samples = load_samples(args)
    resume = resume_checkpoint(args)
    # The seed of the per-step draws and of the data order: --seed, else the checkpoint's, else
    # a fresh one; stored in every checkpoint, so that a resume continues the same draws.
    base_seed = args.seed % 2**63 if args.seed is not None else None
    if resume is not None:
        base_seed = resume_seed(resume, base_seed)
    logger = get_logger(__name__)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        # Seeded shuffling (data_seed set below), so that a resumed run sees the batches the
        # interrupted one would have.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if base_seed is None:  # the main process's fresh seed, for every process
        base_seed = broadcast_object_list([random.SystemRandom().randrange(2**63)])[0]
    accelerator.dataloader_config.data_seed = base_seed
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    scheduler, unet, vae, tokenizers, text_encoders, kind = load_models(args)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # SD XL's VAE overflows in fp16 (its config says force_upcast); the images are cast to the
    # VAE's dtype, whatever it is.
    vae_dtype = torch.float32 if weight_dtype == torch.float16 and vae.config.get("force_upcast") and kind == "sd-xl" else weight_dtype
    vae.requires_grad_(False).to(accelerator.device, dtype=vae_dtype)
    for encoder in text_encoders:
        encoder.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)

    # The UNet (student and teacher) stays in fp32 with LinFusion's trainable weights; mixed
    # precision runs it under autocast.
    mid_dim_scale = args.mid_dim_scale if args.mid_dim_scale is not None or kind != "sd-xl" else XL_MID_DIM_SCALE
    teacher_unet = copy.deepcopy(unet).requires_grad_(False).to(accelerator.device, dtype=weight_dtype) if args.separate_teacher else None
    unet.to(accelerator.device)
    linfusion = init_linfusion(unet, args.init, mid_dim_scale, args.pretrained_linfusion_path)
    params = trainable_parameters(unet, linfusion)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    tap = Attn1FeatureTap(unet, linfusion.modules_dict)
    teacher_tap = None if teacher_unet is None else Attn1FeatureTap(teacher_unet, linfusion.modules_dict)

    resolution = args.resolution or unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    dataset = build_dataset(args, tokenizers, resolution, samples)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, num_workers=args.dataloader_num_workers
    )
    optimizer = torch.optim.AdamW(
        params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )

    # Checkpoints hold LinFusion (official format) and the optimizer, not the frozen UNet.
    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            linfusion.save_pretrained(os.path.join(output_dir, LINFUSION_SUBFOLDER))
            save_seed(output_dir, base_seed)
        weights.clear()

    def load_hook(models, input_dir):
        models.clear()
        saved = LinFusion.from_pretrained(os.path.join(input_dir, LINFUSION_SUBFOLDER))
        if saved.config.modules_list != linfusion.config.modules_list:
            raise ValueError(f"--resume_from_checkpoint: {input_dir} holds a LinFusion for another UNet")
        linfusion.load_state_dict(saved.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    student, optimizer, dataloader = accelerator.prepare(unet, optimizer, dataloader)

    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)

    global_step = 0
    if resume is not None:
        accelerator.print(f"Resuming from {resume}")
        accelerator.load_state(str(resume))
        global_step = checkpoint_step(resume)
    elif args.resume_from_checkpoint:
        accelerator.print(f"No checkpoint in {args.output_dir}; starting a new run.")
    first_epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    if accelerator.is_main_process and args.report_to:
        accelerator.init_trackers("linfusion-distill", config={k: str(v) for k, v in vars(args).items()})
    logger.info(
        f"Distilling LinFusion for {kind} ({len(linfusion.modules_dict)} attn1 layers, "
        f"mid_dim_scale={mid_dim_scale}, init={args.pretrained_linfusion_path or args.init}) at "
        f"{resolution} px: {len(dataset)} images, {max_train_steps} steps of batch "
        f"{args.train_batch_size} x {accelerator.num_processes} processes x "
        f"{args.gradient_accumulation_steps} accumulation", main_process_only=True,
    )
    progress = tqdm(
        range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    vae_scale = vae.config.scaling_factor
    for epoch in range(first_epoch, num_epochs):
        dataloader.set_epoch(epoch)
        batches = dataloader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(dataloader, skip_batches)
        first_batch = skip_batches if epoch == first_epoch else 0
        for index, batch in enumerate(batches, start=epoch * len(dataloader) + first_batch):
            generator = seed_step(base_seed, index, accelerator.process_index, accelerator.device)
            with accelerator.accumulate(student):
                with torch.no_grad():
                    pixels = batch["pixel_values"].to(accelerator.device, dtype=vae.dtype)
                    latents = (vae.encode(pixels).latent_dist.sample(generator=generator) * vae_scale).float()
                    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
                    timesteps = torch.randint(
                        0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device,
                        generator=generator,
                    )
                    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
                    text, pooled = encode_text(text_encoders, batch, accelerator.device)
                unet_kwargs = {"encoder_hidden_states": text}
                if pooled is not None:
                    target_size = torch.tensor([resolution, resolution]).expand(latents.shape[0], 2)
                    time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], target_size], dim=1)
                    unet_kwargs["added_cond_kwargs"] = {
                        "text_embeds": pooled,
                        "time_ids": time_ids.to(accelerator.device, dtype=pooled.dtype),
                    }
                target = diffusion_target(scheduler, latents, noise, timesteps)
                with accelerator.autocast():
                    loss = distillation_forward(
                        unet, linfusion, tap, noisy_latents, timesteps, target, weights=args.loss_weights,
                        student=student, teacher_unet=teacher_unet, teacher_tap=teacher_tap, **unet_kwargs,
                    )
                accelerator.backward(loss.total)
                if accelerator.sync_gradients and args.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            logs = {
                name: accelerator.reduce(value.detach(), reduction="mean").item()
                for name, value in zip(("loss", "noise", "kd", "feat"), loss)
            }
            progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items()})
            accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0:
                _save_checkpoint(accelerator, args, global_step)
            if global_step >= max_train_steps:
                break
        if global_step >= max_train_steps:
            break
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        linfusion.save_pretrained(args.output_dir)
        logger.info(f"Saved LinFusion to {args.output_dir}", main_process_only=True)
    accelerator.end_training()
    tap.remove()
    return linfusion


def _save_checkpoint(accelerator, args, global_step):
    if accelerator.is_main_process and args.checkpoints_total_limit is not None:
        found = _checkpoints(args.output_dir)
        for _, stale in found[: max(0, len(found) - args.checkpoints_total_limit + 1)]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{global_step}"))


def cli(argv=None):
    """main() for the command line: bad data, a bad checkpoint or another seed exits with a
    one-line error instead of a traceback."""
    try:
        main(argv)
    except ValueError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    cli()
