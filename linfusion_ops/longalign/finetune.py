"""LongAlign preference fine-tuning of a Stable Diffusion 1.5 / 2.1 UNet (LoRA) with the
decomposed CLIP preference score (linfusion_ops.longalign.preference), on accelerate + PEFT.

    accelerate launch scripts/finetune_longalign.py \\
        --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --preference_model luping-liu/Denscore \\
        --preference_tokenizer laion/CLIP-ViT-H-14-laion2B-s32B-b79K \\
        --prompts prompts.jsonl --output_dir results/sd15-reward --mixed_precision bf16

Defaults are the official run's (run_unet.sh "reward", unet_reward.py): DDIM 50 steps with CFG
7.5 and gradients at 5 of them, LoRA rank 32 on the ResNet convs, attention projections and
GEGLUs, AdamW lr 3e-5, weight decay 1e-2, constant schedule after 2000 warmup steps, gradient
clipping 0.3, reweight w = 0.3, batch 8 per process. The text conditioning is LongPromptEncoder's
segment-level CLIP encoding (240 tokens). Writes to --output_dir: pytorch_lora_weights.safetensors
(diffusers/PEFT: ``pipe.load_lora_weights(output_dir)``), lora_vis.pt (the official list format),
and checkpoint-<step>/ folders to resume from (--resume).

Resuming: every random draw of a micro-batch (initial noise, gradient steps, LCM noise, the
preference model's crop, LoRA dropout) comes from linfusion_ops.seeding.seed_step(seed,
micro-batch index, process index) and the prompt order of epoch e is a function of (seed, e), so
a run resumed from any checkpoint ends with bitwise the uninterrupted run's LoRA and optimizer
state (fp32). A checkpoint stores its seed; a resume with another --seed is refused. The prompt
file and the checkpoint are checked before any model loads.

Conversions (no training): ``--convert_lora_vis lora_vis.pt`` writes the official file as a
diffusers LoRA folder in --output_dir; ``--export_lora_vis <diffusers LoRA folder>`` writes its
lora_vis.pt there. Both need --pretrained_model (the UNet fixes the layer order).
"""

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import torch

from ..optional import exit_on_missing
from .lora import add_longalign_lora, lora_from_longalign_list, lora_to_longalign_list

logger = logging.getLogger("finetune_longalign")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained_model", required=True, help="diffusers SD 1.5 / 2.1 pipeline (hub id or folder)")
    p.add_argument("--preference_model", help="CLIPModel of the preference score (Denscore, PickScore, HPS)")
    p.add_argument("--preference_tokenizer", default=None, help="its tokenizer (default: the model's folder)")
    p.add_argument("--prompts", help="text file (one prompt per line) or JSONL ({'prompt'|'caption': ...})")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--linfusion", default=None, help="LinFusion checkpoint (hub id or folder) to mount before the LoRA")
    p.add_argument("--init_lora", default=None, help="an official lora_vis.pt to start the LoRA from")
    p.add_argument("--mode", choices=["ddim", "lcm"], default="ddim")
    p.add_argument("--num_steps", type=int, default=None, help="sampling steps (default: 50 ddim, 4 lcm)")
    p.add_argument("--guidance_scale", type=float, default=None, help="CFG scale (default 7.5; none with lcm)")
    p.add_argument("--reweight", type=float, default=0.3, help="w, the weight of the text-irrelevant score term")
    p.add_argument("--max_tokens", type=int, default=240, help="LongPromptEncoder's conditioning length")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the UNet's, 512 for SD 1.5)")
    p.add_argument("--crop_size", type=int, default=504, help="preference model's random crop (0: none)")
    p.add_argument("--lora_rank", type=int, default=32)
    p.add_argument("--lora_dropout", type=float, default=0.1)
    p.add_argument("--learning_rate", type=float, default=3e-5)
    p.add_argument("--weight_decay", type=float, default=1e-2)
    p.add_argument("--warmup_steps", type=int, default=2000)
    p.add_argument("--max_grad_norm", type=float, default=0.3)
    p.add_argument("--batch_size", type=int, default=8, help="prompts per process and step")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--num_epochs", type=int, default=1)
    p.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps (overrides --num_epochs)")
    p.add_argument("--save_steps", type=int, default=1250, help="write the LoRA files every N steps")
    p.add_argument("--checkpointing_steps", type=int, default=500, help="write a resumable checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint-<step> in --output_dir")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the LoRA init, the prompt order and every draw (default 0; with --resume the checkpoint's)")
    conversion = p.add_mutually_exclusive_group()
    conversion.add_argument("--convert_lora_vis", default=None, help="official lora_vis.pt -> diffusers LoRA in --output_dir")
    conversion.add_argument("--export_lora_vis", default=None, help="diffusers LoRA folder -> lora_vis.pt in --output_dir")
    args = p.parse_args(argv)
    if not (args.convert_lora_vis or args.export_lora_vis):
        missing = [f"--{name}" for name in ("preference_model", "prompts") if getattr(args, name) is None]
        if missing:
            p.error(f"training needs {' and '.join(missing)}")
    return args


def save_diffusers_lora(unet, folder):
    """The UNet's LoRA adapter as pytorch_lora_weights.safetensors (pipe.load_lora_weights)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)


def load_pipeline(name_or_path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(name_or_path, safety_checker=None, requires_safety_checker=False)


def convert(args):
    pipe = load_pipeline(args.pretrained_model)
    output_dir = Path(args.output_dir)
    if args.convert_lora_vis:
        lora_from_longalign_list(pipe.unet, torch.load(args.convert_lora_vis, map_location="cpu", weights_only=True))
        save_diffusers_lora(pipe.unet, output_dir)
    else:
        pipe.load_lora_weights(args.export_lora_vis)
        output_dir.mkdir(parents=True, exist_ok=True)
        torch.save(lora_to_longalign_list(pipe.unet), output_dir / "lora_vis.pt")


def read_prompts(path):
    """Prompts from a text file (one per line) or JSONL (a 'prompt' or 'caption' string field).
    A missing or unreadable file, a bad JSONL line or no prompt raises a one-line ValueError
    naming --prompts. Reads no model."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--prompts: cannot read {path}: {error}") from None
    if str(path).endswith((".jsonl", ".json")):
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"--prompts: {path} line {n} is not JSON: {error}") from None
            key = next((k for k in ("prompt", "caption") if isinstance(record, dict) and k in record), None)
            if key is None or not isinstance(record[key], str):
                raise ValueError(f"--prompts: {path} line {n}: a JSONL record needs a 'prompt' or 'caption' string")
            prompts.append(record[key])
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts: {path} holds no prompts")
    return prompts


def step_prompts(prompts, step, batch, rank, world, seed):
    """The prompts of one process at one optimizer micro-step: a seeded permutation per epoch, so
    that a resumed run sees the same order."""
    total = batch * world
    per_epoch = max(len(prompts) // total, 1)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    start = (index * total + rank * batch) % len(prompts)
    return [prompts[order[(start + i) % len(prompts)]] for i in range(batch)]


def average_gradients(params):
    """Average the gradients over the processes: one all-reduce of a flat buffer."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def latest_checkpoint(output_dir):
    steps = [int(m.group(1)) for d in Path(output_dir).glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", d.name))]
    return Path(output_dir) / f"checkpoint-{max(steps)}" if steps else None


@exit_on_missing("longalign-finetune", "longalign")
def main(argv=None):
    args = parse_args(argv)
    if args.convert_lora_vis or args.export_lora_vis:
        convert(args)
        return
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm.auto import tqdm

    from ..linfusion.model import LinFusion
    from ..seeding import resume_seed, save_seed, seed_step
    from .long_prompt import LongPromptEncoder
    from .preference import CLIPPreferenceScorer, RewardSampler

    # The prompts, the checkpoint and its seed are checked before any model loads.
    prompts = read_prompts(args.prompts)
    output_dir = Path(args.output_dir)
    checkpoint = latest_checkpoint(output_dir) if args.resume else None
    seed = resume_seed(checkpoint, args.seed) if checkpoint is not None else args.seed
    seed = 0 if seed is None else seed
    if seed < 0:
        raise ValueError(f"--seed must be non-negative, got {seed}")

    accelerator = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The same LoRA init on every process (no DDP broadcast); the per-step draws are per process.
    set_seed(seed)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    pipe = load_pipeline(args.pretrained_model)
    pipe.set_progress_bar_config(disable=True)
    unet, vae = pipe.unet, pipe.vae
    for module in (unet, vae, pipe.text_encoder):
        module.requires_grad_(False)
    if args.linfusion:
        linfusion = LinFusion.from_pretrained(args.linfusion)
        linfusion.mount_to(unet=unet)
        logger.info(f"mounted LinFusion from {args.linfusion} on {len(linfusion.modules_dict)} self-attention layers")
        unet.requires_grad_(False)
    add_longalign_lora(unet, rank=args.lora_rank, dropout=args.lora_dropout)
    if args.init_lora:
        lora_from_longalign_list(unet, torch.load(args.init_lora, map_location="cpu", weights_only=True))
    # The frozen weights run in the mixed-precision dtype, the LoRA weights train in fp32.
    unet.to(accelerator.device, dtype)
    cast_training_params(unet, dtype=torch.float32)
    vae.to(accelerator.device, dtype)
    pipe.text_encoder.to(accelerator.device, dtype)
    params = [p for p in unet.parameters() if p.requires_grad]
    encode = LongPromptEncoder.from_pipeline(pipe, max_tokens=args.max_tokens)
    scorer = CLIPPreferenceScorer.from_pretrained(
        args.preference_model, args.preference_tokenizer, crop_size=args.crop_size or None
    ).to(accelerator.device, dtype)

    world = accelerator.num_processes
    steps_per_epoch = max(len(prompts) // (args.batch_size * world * args.gradient_accumulation_steps), 1)
    max_steps = args.max_train_steps or args.num_epochs * steps_per_epoch

    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.999), weight_decay=args.weight_decay, eps=1e-8)
    # accelerate steps a prepared scheduler once per process and optimizer step.
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=args.warmup_steps * world)
    # The UNet is not wrapped in DistributedDataParallel, which does not take several forward
    # calls (the gradient steps) before one backward: the LoRA gradients are averaged by hand.
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)

    def save_lora(folder):
        save_diffusers_lora(unet, folder)
        torch.save(lora_to_longalign_list(unet), folder / "lora_vis.pt")

    def save_checkpoint(step):
        folder = output_dir / f"checkpoint-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({
            "lora": get_peft_model_state_dict(unet),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
        }, folder / "training_state.pt")
        (folder / "training_state.json").write_text(json.dumps({"global_step": step, "max_train_steps": max_steps}))
        save_seed(folder, seed)

    global_step = 0
    if checkpoint is not None:
        state = torch.load(checkpoint / "training_state.pt", map_location="cpu", weights_only=True)
        set_peft_model_state_dict(unet, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        global_step = json.loads((checkpoint / "training_state.json").read_text())["global_step"]
        logger.info(f"resuming from {checkpoint} at step {global_step}")

    sampler = RewardSampler(
        unet, vae, pipe.scheduler, mode=args.mode, num_steps=args.num_steps, guidance_scale=args.guidance_scale
    )
    group = torch.distributed.group.WORLD if world > 1 else None
    height = args.resolution or unet.config.sample_size * pipe.vae_scale_factor
    bar = tqdm(total=max_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="Steps")
    unet.train()
    micro = global_step * args.gradient_accumulation_steps
    while global_step < max_steps:
        with accelerator.accumulate(unet):
            batch = step_prompts(prompts, micro, args.batch_size, accelerator.process_index, world, seed)
            # The sampler's and the crop's draws from it, LoRA dropout from the reseeded global RNG.
            generator = seed_step(seed, micro, accelerator.process_index)
            conditioning = encode(batch)
            with accelerator.autocast():
                images, _ = sampler.sample(
                    conditioning["prompt_embeds"], conditioning["negative_prompt_embeds"], height=height, width=height,
                    generator=generator,
                )
                score = scorer(images.to(dtype), batch, weight=args.reweight, group=group, generator=generator)
                loss = 0.5 * (1 - score.score.float().mean())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if world > 1:
                    average_gradients(params)
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        micro += 1
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", score=f"{score.score.mean().item():.4f}", lr=lr_scheduler.get_last_lr()[0])
        if accelerator.is_main_process:
            if global_step % args.checkpointing_steps == 0 or global_step == max_steps:
                save_checkpoint(global_step)
            if global_step % args.save_steps == 0 or global_step == max_steps:
                save_lora(output_dir if global_step == max_steps else output_dir / f"lora-{global_step}")
    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def cli(argv=None):
    """main() for the command line: a bad prompt file, checkpoint or seed exits with a one-line
    error instead of a traceback."""
    try:
        main(argv)
    except ValueError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    cli()
