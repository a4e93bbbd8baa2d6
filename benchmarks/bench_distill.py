"""One LinFusion distillation training step of the student: linfusion_ops' fused ops against the
official LinFusion attention module, on the same UNet and the same weights.

The UNet is SD 1.5-shaped with random weights (UNet2DConditionModel with SD 1.5's config:
320/640/1280/1280 channels, 8 heads, cross-attention width 768, 77 text tokens), by default
with one layer per block instead of SD 1.5's two on CPU (10 self-attention layers instead of
16, every one of SD 1.5's attention shapes; --layers-per-block 2 is the real depth). Both
students carry the same LinFusion weights (projections copied from the UNet, random kernel MLPs):

* "linfusion_ops": LinFusion mounted (LinFusionAttnProcessor: linfusion_ops.linear_attention and
  the fused layer_norm_leaky_relu kernel MLP, token-major, no head transposes);
* "official": each attn1 replaced by a plain-PyTorch port of what the official
  GeneralizedLinearAttention computes (unfused Linear/LayerNorm/LeakyReLU/Linear residual MLPs,
  heads transposed, z = q . mean(k) + 1e-4, kv = (k^T/sqrt(N)) (v/sqrt(N)), o = q kv / z:
  linfusion_ops.reference.official_linear_attention), the way the official mount_to swaps in
  its modules.

A step is what the student costs in linfusion_ops.linfusion.distillation's distillation: the student forward
with the attn1 feature tap, the loss against the (shared, precomputed) teacher's output and
features, the backward and an AdamW step over LinFusion's parameters. The teacher pass (the
UNet's own softmax attention under no_grad) is the same for both and timed once on its own.
Per resolution: the peak memory of one step beyond the weights, inputs and AdamW state
(benchmarks.common; the step's gradients and activations), then the median wall and
process-CPU time of --repeat steps; the two students are measured twice in alternation and the
second round is reported. Then the UNet's highest-resolution self-attention layer
alone (forward + backward, 320 channels, 8 heads of 40) at --layer-resolutions, where the
attention's own cost shows; in the whole step at these sizes the convolutions dominate. Writes
benchmarks/out/distill_<device>.json.

    python benchmarks/bench_distill.py --device cpu --threads 1 --resolutions 256 512
    python benchmarks/bench_distill.py --device cuda --resolutions 512 1024 --layers-per-block 2
"""

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_unet import OUT_DIR, SD15_CONFIG, TEXT_TOKENS, measure  # noqa: E402
from benchmarks.common import git_commit, time_ms  # noqa: E402


class OfficialLinFusionAttention(nn.Module):
    """What the official GeneralizedLinearAttention.forward computes, in plain PyTorch, on the
    parameters of one of our LinFusion layers (shared, not copied)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        from linfusion_ops.reference import official_linear_attention

        m = self.layer
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = m.to_q(hidden_states + m.to_q_(hidden_states))
        k = m.to_k(context + m.to_k_(context))
        v = m.to_v(context)
        return m.to_out[1](m.to_out[0](official_linear_attention(q, k, v, m.heads)))


@contextlib.contextmanager
def official_modules(unet, linfusion, replacements):
    """Context: each attn1 of the UNet replaced by its official module (`replacements`, by name),
    as the official mount_to does (whole submodules swapped); LinFusion mounted again after."""
    linfusion.unmount(unet=unet)
    originals = {}
    for name, module in replacements.items():
        parent, attr = name.rsplit(".", 1)
        originals[name] = unet.get_submodule(name)
        setattr(unet.get_submodule(parent), attr, module)
    try:
        yield
    finally:
        for name, module in originals.items():
            parent, attr = name.rsplit(".", 1)
            setattr(unet.get_submodule(parent), attr, module)
        linfusion.mount_to(unet=unet)


def make_step(unet, linfusion, params, batch, teacher_pred, teacher_feats):
    from linfusion_ops.linfusion.distillation import Attn1FeatureTap, distillation_loss

    tap = Attn1FeatureTap(unet, linfusion.modules_dict)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    # AdamW allocates its state on the first step: do that here (a zero-gradient step leaves the
    # weights unchanged), outside the measured steps.
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    noisy, timesteps, text, target = batch

    def step():
        with tap.capture() as feats:
            pred = unet(noisy, timesteps, text, return_dict=False)[0]
        distillation_loss(pred, target, teacher_pred, feats, teacher_feats).total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, tap


def measure_alternating(ours_fn, official_fn, official_context, repeat, args):
    """(ours, official) `measure` results, measured twice in alternation, the second round kept:
    the first warms the allocator for both (whichever ran first would otherwise pay for it)."""
    for _ in range(2):
        ours = measure(ours_fn, repeat, args)
        with official_context():
            official = measure(official_fn, repeat, args)
    return ours, official


def compare(ours, official):
    """The JSON fields of two `measure` results (wall ms, CPU ms, peak MiB) and their ratios."""
    fields = {}
    for i, (unit, ratio) in enumerate((("ms", "speedup"), ("cpu_ms", "cpu_time_speedup"), ("peak_mb", "memory_ratio"))):
        fields.update({f"ours_{unit}": ours[i], f"official_{unit}": official[i], ratio: official[i] / ours[i]})
    return fields


def layer_step(module, tokens, batch, device):
    """Forward and backward of one attn1 module alone on (batch, tokens, C) image tokens."""
    g = torch.Generator().manual_seed(tokens)
    width = module.to_q.in_features if hasattr(module, "to_q") else module.layer.to_q.in_features
    x = torch.randn(batch, tokens, width, generator=g).to(device).requires_grad_()
    grad = torch.randn(batch, tokens, width, generator=g).to(device)

    def run():
        torch.autograd.backward(module(x), grad)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolutions", type=int, nargs="*", default=None,
                        help="image sizes in px (multiples of 64) for the UNet step; default 256 512 on CPU, "
                        "512 1024 on CUDA; none: skip")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers-per-block", type=int, default=None, help="default 1 on CPU, 2 (SD 1.5) on CUDA")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps after the memory run")
    parser.add_argument("--repeat", type=int, default=None, help="timed steps (median); default 1 on CPU, 10 on CUDA")
    parser.add_argument("--layer-resolutions", type=int, nargs="*", default=None,
                        help="sizes for the first attn1 layer alone (forward + backward); default 256 512 1024 2048")
    parser.add_argument("--layer-repeat", type=int, default=5, help="timed layer runs (median)")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="stop repeating a measurement after this many seconds (at least one step)")
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    if args.resolutions is None:
        args.resolutions = [512, 1024] if cuda else [256, 512]
    args.layers_per_block = args.layers_per_block or (2 if cuda else 1)
    args.layer_resolutions = [256, 512, 1024, 2048] if args.layer_resolutions is None else args.layer_resolutions
    args.repeat = args.repeat or (10 if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    for res in args.resolutions:
        if res % 64:
            parser.error(f"--resolutions: {res} is not a multiple of 64")

    import diffusers
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    import linfusion_ops
    from linfusion_ops.linfusion.distillation import Attn1FeatureTap, init_linfusion, teacher_forward, trainable_parameters

    diffusers_logging.set_verbosity_error()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device) if cuda else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "dtype": "float32",
        "batch": args.batch,
        "text_tokens": TEXT_TOKENS,
        "layers_per_block": args.layers_per_block,
        "gradient_checkpointing": args.gradient_checkpointing,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "linfusion_ops": linfusion_ops.__version__,
        "compiled": linfusion_ops.compiled(),
        "unet": f"UNet2DConditionModel(SD 1.5 config, layers_per_block={args.layers_per_block}, random weights)",
    }
    print(json.dumps(meta))

    torch.manual_seed(0)
    unet = nn.Module.to(UNet2DConditionModel(**SD15_CONFIG, layers_per_block=args.layers_per_block), args.device)
    linfusion = init_linfusion(unet, "teacher")
    params = trainable_parameters(unet, linfusion)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    meta["attn1_layers"] = len(linfusion.modules_dict)
    meta["linfusion_parameters"] = sum(p.numel() for p in params)
    teacher_tap = Attn1FeatureTap(unet, linfusion.modules_dict)

    replacements = {name: OfficialLinFusionAttention(layer) for name, layer in linfusion.modules_dict.items()}
    rows = []
    print(f"{'res':>5} {'tokens':>6} | {'teacher ms':>10} | {'ours ms':>9} {'official ms':>11} {'speedup':>7}"
          f" {'CPU-time':>8} | {'ours MiB':>8} {'official MiB':>12} {'ratio':>6} | max |diff|")
    for res in args.resolutions:
        g = torch.Generator().manual_seed(res)
        latent = res // 8
        batch = [
            torch.randn(args.batch, 4, latent, latent, generator=g),
            torch.tensor([500] * args.batch),
            torch.randn(args.batch, TEXT_TOKENS, 768, generator=g),
            torch.randn(args.batch, 4, latent, latent, generator=g),
        ]
        batch = [t.to(args.device) for t in batch]
        noisy, timesteps, text, _ = batch

        def teacher():
            with teacher_tap.capture() as feats:
                out = teacher_forward(unet, linfusion, noisy, timesteps, text, return_dict=False)[0]
            return out, feats

        teacher_ms = time_ms(teacher, args.device, warmup=0, repeat=1)
        teacher_pred, teacher_feats = teacher()

        official_context = functools.partial(official_modules, unet, linfusion, replacements)
        with torch.no_grad():
            ours_pred = unet(noisy, timesteps, text).sample
            with official_context():
                diff = (unet(noisy, timesteps, text).sample - ours_pred).abs().max().item()
        ours_step, ours_tap = make_step(unet, linfusion, params, batch, teacher_pred, teacher_feats)
        with official_context():
            official_step, official_tap = make_step(unet, linfusion, params, batch, teacher_pred, teacher_feats)
        ours, official = measure_alternating(ours_step, official_step, official_context, args.repeat, args)
        ours_tap.remove()
        official_tap.remove()

        row = {"resolution": res, "latent_tokens": latent ** 2, "teacher_forward_ms": teacher_ms,
               **compare(ours, official), "max_abs_output_diff": diff}
        rows.append(row)
        print(f"{res:>5} {latent ** 2:>6} | {teacher_ms:>10.0f} | {ours[0]:>9.0f} {official[0]:>11.0f}"
              f" {row['speedup']:>6.2f}x {row['cpu_time_speedup']:>7.2f}x | {ours[2]:>8.0f} {official[2]:>12.0f}"
              f" {row['memory_ratio']:>5.2f}x | {diff:.1e}", flush=True)

    # The highest-resolution self-attention alone: 320 channels, 8 heads of 40, (res / 8)^2 tokens.
    first = next(iter(linfusion.modules_dict))
    attn = unet.get_submodule(first)
    layer_rows = []
    print(f"first attn1 layer ({first}), forward + backward")
    print(f"{'res':>5} {'tokens':>6} | {'ours ms':>9} {'official ms':>11} {'speedup':>7} {'CPU-time':>8}"
          f" | {'ours MiB':>8} {'official MiB':>12} {'ratio':>6}")
    for res in args.layer_resolutions:
        tokens = (res // 8) ** 2
        ours, official = measure_alternating(
            layer_step(attn, tokens, args.batch, args.device),
            layer_step(replacements[first], tokens, args.batch, args.device),
            contextlib.nullcontext, args.layer_repeat, args,
        )
        row = {"resolution": res, "latent_tokens": tokens, **compare(ours, official)}
        layer_rows.append(row)
        print(f"{res:>5} {tokens:>6} | {ours[0]:>9.1f} {official[0]:>11.1f} {row['speedup']:>6.2f}x"
              f" {row['cpu_time_speedup']:>7.2f}x | {ours[2]:>8.1f} {official[2]:>12.1f} {row['memory_ratio']:>5.2f}x",
              flush=True)

    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, f"distill_{torch.device(args.device).type}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows, "layer_rows": layer_rows}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
