"""What one LongAlign reward fine-tuning step costs per sample: UNet calls and backward passes
of linfusion_ops.longalign.preference.RewardSampler, counted with hooks in a small run (a small random
SD 1.5-shaped UNet, VAE and CLIP preference model on CPU; the counts do not depend on the model
size or the device).

Counted per mode: UNet forward calls while sampling (and the images each call carries: CFG
doubles the batch), how many of them ran with gradient, the calls that gradient checkpointing
recomputes during the backward, and the UNet backward passes (gradients arriving at a UNet
output); the same for the VAE decoder and the preference model's image tower.

    python -m benchmarks.reward_cost [--json benchmarks/results/reward_cost.json]
"""

import argparse
import json
import platform
import warnings
from pathlib import Path

import diffusers
import peft
import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel

from benchmarks.common import git_commit
from linfusion_ops.longalign.lora import add_longalign_lora
from linfusion_ops.longalign.preference import CLIPPreferenceScorer, RewardSampler, common_direction, decomposed_score

BATCH = 2
UNET = dict(
    sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, norm_num_groups=8,
)
VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)


class Counter:
    """Forward calls of a module by phase (sampling / backward) and grad mode, and gradients
    arriving at its outputs (one per backward pass through it)."""

    def __init__(self, module):
        self.phase = "sampling"
        self.calls = {"sampling": 0, "sampling_with_grad": 0, "backward_recompute": 0}
        self.images = 0
        self.backward = 0
        # A pre-hook counts the recomputed calls: checkpointing stops a recomputation as soon as
        # it has the tensors the backward needs, before the forward hooks would run.
        module.register_forward_pre_hook(self.pre_hook)
        module.register_forward_hook(self.forward_hook)

    def pre_hook(self, module, args):
        self.calls["backward_recompute" if self.phase == "backward" else "sampling"] += 1

    def forward_hook(self, module, args, output):
        if self.phase == "backward":
            return
        out = output if isinstance(output, torch.Tensor) else output[0]
        self.images += out.shape[0]
        if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
            self.calls["sampling_with_grad"] += 1
            out.register_hook(self.grad_hook)

    def grad_hook(self, grad):
        self.backward += 1

    def per_sample(self):
        return {**self.calls, "images_through_forward": self.images / BATCH,
                "backward_passes": self.backward}


def measure(mode):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET).requires_grad_(False)
    add_longalign_lora(unet, rank=4)
    vae = AutoencoderKL(**VAE).requires_grad_(False)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                         vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                           image_size=16, patch_size=4),
        projection_dim=16,
    ))
    # The text side of the score is not differentiated; random text embeddings stand in for it.
    scorer = CLIPPreferenceScorer(clip, None, crop_size=12)
    counters = {"unet": Counter(unet), "vae_decoder": Counter(vae.decoder), "preference_image_tower": Counter(clip.vision_model)}
    sampler = RewardSampler(unet, vae, DDPMScheduler(), mode=mode)
    prompt_embeds, negative = torch.randn(2, BATCH, 9, 32)
    generator = torch.Generator().manual_seed(0)
    images, grad_steps = sampler.sample(prompt_embeds, negative, generator=generator)
    text = torch.nn.functional.normalize(torch.randn(BATCH, 16, generator=generator), dim=-1)
    score = decomposed_score(scorer.image_features(images, generator), text, common_direction(text))
    for c in counters.values():
        c.phase = "backward"
    (0.5 * (1 - score.score.mean())).backward()
    result = {name: c.per_sample() for name, c in counters.items()}
    u = result["unet"]
    # A backward pass costs about two forward passes.
    result["unet_forward_equivalents_per_sample"] = (
        u["images_through_forward"] + (u["backward_recompute"] + 2 * u["backward_passes"]) * (2 if sampler.do_cfg else 1)
    )
    result["unet_forward_equivalents_inference"] = u["images_through_forward"]
    result["config"] = {"num_steps": sampler.num_steps, "guidance_scale": sampler.guidance_scale,
                        "grad_every": sampler.grad_every, "gradient_steps": grad_steps}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="benchmarks/out/reward_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = {
        "device": "cpu (counts are device-independent)", "platform": platform.platform(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "commit": git_commit(), "batch": BATCH, "latents": [BATCH, 4, UNET["sample_size"], UNET["sample_size"]],
    }
    print(json.dumps(info))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = {mode: measure(mode) for mode in ("ddim", "lcm")}
    for mode, r in results.items():
        u = r["unet"]
        print(f"{mode}: {r['config']}  UNet per sample: {u['images_through_forward']:.0f} image evaluations in "
              f"{u['sampling']} calls ({u['sampling_with_grad']} with gradient), {u['backward_recompute']} "
              f"recomputed calls, {u['backward_passes']} backward passes; "
              f"~{r['unet_forward_equivalents_per_sample']:.0f} forward-equivalents vs "
              f"{r['unet_forward_equivalents_inference']:.0f} for inference")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
