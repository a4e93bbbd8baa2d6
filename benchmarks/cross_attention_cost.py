"""What a long prompt costs the UNet: FLOPs of one UNet evaluation against the cross-attention
length T (LongPromptEncoder's max_tokens), counted with torch.utils.flop_counter on meta-device
UNets built from the SD 1.5, SD 2.1 and SD XL configs (no weights, no GPU needed).

Cross-attention ("attn2") is the only part of the UNet whose cost depends on T: per layer, the
K and V projections of the T text tokens (2 x 2*T*d_text*C FLOPs) and the attention itself
(QK^T and PV, 2 x 2*N*T*C FLOPs for N image tokens, C inner channels).

    python -m benchmarks.cross_attention_cost [--json benchmarks/results/cross_attention_cost.json]
"""

import argparse
import json
import platform

import diffusers
import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

# The published UNet configs (the fields that shape the compute; the rest are diffusers defaults).
_SD15 = dict(
    sample_size=64, cross_attention_dim=768, attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
CONFIGS = {
    "sd15": (_SD15, 512),
    "sd21": (dict(_SD15, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                  use_linear_projection=True), 768),
    "sdxl": (dict(
        sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
        block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ), 1024),
}
LENGTHS = (77, 154, 240, 480)


def count(unet: UNet2DConditionModel, resolution: int, tokens: int):
    """(total, cross-attention) FLOPs of one UNet evaluation, batch 1."""
    latent = resolution // 8
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(1, 1280, device="meta"),
            "time_ids": torch.empty(1, 6, device="meta"),
        }
    counter = FlopCounterMode(display=False)
    with counter:
        unet(
            torch.empty(1, 4, latent, latent, device="meta"),
            torch.tensor([500], device="meta"),
            encoder_hidden_states=torch.empty(1, tokens, unet.config.cross_attention_dim, device="meta"),
            **kwargs,
        )
    per_module = counter.get_flop_counts()
    # Leaf attn2 modules only (their parents' counts include them).
    cross = sum(sum(v.values()) for name, v in per_module.items() if name.endswith(".attn2"))
    return counter.get_total_flops(), cross


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {platform.machine()}; "
          "FLOPs counted on the meta device (1 multiply-add = 2 FLOPs), batch 1, one UNet evaluation")
    results = []
    for name, (config, resolution) in CONFIGS.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        layers = sum(1 for n, _ in unet.named_modules() if n.endswith(".attn2"))
        base = None
        for tokens in LENGTHS:
            total, cross = count(unet, resolution, tokens)
            base = base or total
            row = dict(model=name, resolution=resolution, cross_attention_layers=layers, tokens=tokens,
                       unet_gflops=total / 1e9, cross_attention_gflops=cross / 1e9,
                       vs_77_tokens=total / base)
            results.append(row)
            print(f"{name} {resolution}x{resolution} ({layers} cross-attn layers)  T={tokens:4d}: "
                  f"UNet {row['unet_gflops']:8.1f} GFLOP, cross-attention {row['cross_attention_gflops']:7.1f} "
                  f"GFLOP ({100 * cross / total:4.1f}%), x{row['vs_77_tokens']:.3f} vs T=77")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "diffusers": diffusers.__version__, "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
