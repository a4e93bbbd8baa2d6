"""Smoke test of an installed linfusion_ops (run by .ci/run in a fresh virtual environment that
holds the wheel and torch, from outside the repository): the package is the installed one, its
compiled module loaded, its build record names this torch and the wheel tag, and every op
(forward and backward) matches linfusion_ops.reference on CPU (and on CUDA when a GPU is there).

    python smoke_installed.py [--diffusers REPO]   # REPO: also a tiny LinFusion pipeline, with the
                                                   # [diffusers] extra and REPO's tests.helpers
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import linfusion_ops
from linfusion_ops import reference


def check(name, fast, ref, *inputs):
    """fast(*inputs) and ref(*inputs) agree (outputs and input gradients), fp64."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    ref_leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out, expected = fast(*leaves), ref(*ref_leaves)
    outs, expecteds = (out, expected) if isinstance(out, tuple) else ((out,), (expected,))
    for o, e in zip(outs, expecteds):
        torch.testing.assert_close(o, e)
    loss = sum(o.sum() for o in outs if o.is_floating_point())
    ref_loss = sum(e.sum() for e in expecteds if e.is_floating_point())
    loss.backward()
    ref_loss.backward()
    for a, b in zip(leaves, ref_leaves):
        if a.requires_grad and b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad)
    print(f"  {name}: forward and backward match the reference")


def smoke_ops(device):
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    heads = 2
    q, k, v = rand(2, 7, 6), rand(2, 9, 6), rand(2, 9, 8)
    check("linear_attention", lambda q, k, v: linfusion_ops.linear_attention(q, k, v, heads),
          lambda q, k, v: reference.linear_attention(q, k, v, heads), q, k, v)
    check("linear_attention_state", lambda k, v: linfusion_ops.linear_attention_state(k, v, heads),
          lambda k, v: reference.linear_attention_state(k, v, heads), k, v)
    state, key_mean = reference.linear_attention_state(k, v, heads)
    check("linear_attention_apply", lambda q, s, m: linfusion_ops.linear_attention_apply(q, s, m, heads),
          lambda q, s, m: reference.linear_attention_apply(q, s, m, heads), q, state, key_mean)
    check("layer_norm_leaky_relu", linfusion_ops.layer_norm_leaky_relu, reference.layer_norm_leaky_relu,
          rand(3, 5, 16), rand(16), rand(16))
    keep = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 0]], dtype=torch.bool, device=device)
    segment_ids = torch.tensor([0, 0, 1], device=device)
    check("merge_segments", lambda e, p: linfusion_ops.merge_segments(e, keep, segment_ids, 2, 6, p),
          lambda e, p: reference.merge_segments(e, keep, segment_ids, 2, 6, p), rand(3, 4, 8), rand(8))


def smoke_pipeline(repo):
    """LinFusion mounted on a tiny random SD 1.5 pipeline generates an image (the [diffusers]
    extra; the tiny models come from the repository's tests.helpers, put last on sys.path so
    that linfusion_ops stays the installed one)."""
    sys.path.append(str(repo))
    from tests.helpers.tiny_models import make_linfusion, tiny_sd_pipeline

    with tempfile.TemporaryDirectory() as tok_dir:
        pipe = tiny_sd_pipeline(Path(tok_dir))
        linfusion = make_linfusion(pipe.unet)
        linfusion.mount_to(unet=pipe.unet)
        image = pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all(), image.shape
    assert linfusion_ops.__file__.startswith(sys.prefix), linfusion_ops.__file__
    print(f"  tiny SD 1.5 pipeline with LinFusion ({len(linfusion.modules_dict)} layers): image {tuple(image.shape)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffusers", type=Path, default=None, metavar="REPO",
                        help="also run a tiny pipeline (needs the [diffusers] extra and the repository)")
    args = parser.parse_args()
    assert linfusion_ops.__file__.startswith(sys.prefix), f"not the installed package: {linfusion_ops.__file__}"
    info = linfusion_ops.build_info()
    print(f"linfusion_ops {linfusion_ops.__version__} from {Path(linfusion_ops.__file__).parent}")
    print(f"build_info: {info}")
    assert info["compiled"], f"the compiled module did not load: {info}"
    assert info["wheel_tag"] and info["torch"] == torch.__version__.split("+")[0], info
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() and info["cuda"] else []):
        print(f"ops on {device}:")
        smoke_ops(device)
    if args.diffusers is not None:
        smoke_pipeline(args.diffusers)
    print("smoke test passed")


if __name__ == "__main__":
    main()
