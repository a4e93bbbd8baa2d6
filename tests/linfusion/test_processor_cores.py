"""linfusion_ops.linfusion.processor: the ONE LinFusion attention body and its three cores.

A diffusers Attention with qk-norm (`qk_norm="layer_norm"`, random affine), LinFusion's kernel
MLPs, a residual connection and an output rescale runs through the three public entry points:
LinFusionAttnProcessor (FusedCore), apply_low_memory's chunked self-attention
(TokenChunkedCore, chunk smaller than N and N not a multiple of it) and
SequenceParallelLinFusionAttnProcessor (SequenceParallelCore, 2 gloo processes). All equal each
other and a hand-written fp64 reference of the maths, in fp32. Dropping norm_q / norm_k changes
the output far beyond the tolerance, so any core that skipped them would fail.
"""

import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

pytest.importorskip("diffusers")

from diffusers.models.attention_processor import Attention

from linfusion_ops.highres.low_memory import apply_low_memory
from linfusion_ops.linfusion.distributed import SequenceParallelCore, SequenceParallelLinFusionAttnProcessor, token_slice
from linfusion_ops.linfusion.kernel_mlp import kernel_mlp
from linfusion_ops.linfusion.processor import (
    FusedCore,
    LinFusionAttnProcessor,
    TokenChunkedCore,
    linfusion_attention,
)
from tests.helpers.tiny_models import make_linfusion, make_unet, unet_inputs

B, N, C, HEADS = 2, 23, 24, 3
CHUNK = 5  # < N, and N % CHUNK != 0
# fp32 against fp32 (another summation order) and against the fp64 reference.
TOL = dict(rtol=1e-5, atol=2e-6)


def make_attention(seed=0, qk_norm=True):
    """A LinFusion-style self-attention with per-head LayerNorm qk-norm, every parameter random
    (LayerNorm affines included), a residual connection and an output rescale; fp32."""
    torch.manual_seed(seed)
    attn = Attention(
        query_dim=C,
        heads=HEADS,
        dim_head=C // HEADS,
        bias=True,
        qk_norm="layer_norm" if qk_norm else None,
        residual_connection=True,
        rescale_output_factor=2.0,
        processor=LinFusionAttnProcessor(),
    )
    attn.to_q_, attn.to_k_ = kernel_mlp(C, None), kernel_mlp(C, 10)
    with torch.no_grad():
        for m in attn.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.5 * torch.randn_like(m.weight))
                m.bias.copy_(0.5 * torch.randn_like(m.bias))
    return attn.eval()


def make_input(seed=1):
    return torch.randn(B, N, C, generator=torch.Generator().manual_seed(seed))


def reference_attention(attn, x):
    """The maths written out in fp64, from the module's parameters, without linfusion_ops:
    q = LN_q(to_q(x + mlp_q(x))) per head, k = LN_k(to_k(x + mlp_k(x))) per head, v = to_v(x),
    phi = elu + 1, o_i = phi(q_i) S / (phi(q_i) . z + 1e-4) with S = mean_j phi(k_j) v_j^T,
    z = mean_j phi(k_j); out = (to_out(o) + x) / 2."""
    p = {name: t.detach().double() for name, t in attn.named_parameters()}
    x = x.double()

    def linear(t, prefix):
        return F.linear(t, p[prefix + ".weight"], p.get(prefix + ".bias"))

    def mlp(t, prefix):
        hidden = linear(t, prefix + ".0")
        hidden = F.layer_norm(hidden, hidden.shape[-1:], p[prefix + ".1.weight"], p[prefix + ".1.bias"], 1e-5)
        return t + linear(F.leaky_relu(hidden, 0.01), prefix + ".3")

    def heads(t, norm):
        t = t.unflatten(-1, (HEADS, -1))
        t = F.layer_norm(t, t.shape[-1:], p[norm + ".weight"], p[norm + ".bias"], 1e-5)
        return t.transpose(1, 2)  # (B, H, N, D)

    q = F.elu(heads(linear(mlp(x, "to_q_"), "to_q"), "norm_q")) + 1
    k = F.elu(heads(linear(mlp(x, "to_k_"), "to_k"), "norm_k")) + 1
    v = linear(x, "to_v").unflatten(-1, (HEADS, -1)).transpose(1, 2)
    state = k.transpose(-1, -2) @ v / k.shape[2]
    key_mean = k.mean(dim=2)
    o = (q @ state) / ((q * key_mean[:, :, None]).sum(-1, keepdim=True) + 1e-4)
    o = o.transpose(1, 2).flatten(2)
    return (linear(o, "to_out.0") + x) / 2.0


def test_fused_and_chunked_cores_equal_the_reference():
    attn, x = make_attention(), make_input()
    ref = reference_attention(attn, x)
    with torch.no_grad():
        fused = attn(x)  # LinFusionAttnProcessor
        direct = linfusion_attention(attn, x, core=FusedCore())
        chunked = linfusion_attention(attn, x, core=TokenChunkedCore(CHUNK))
    assert fused.dtype == chunked.dtype == torch.float32 and fused.shape == chunked.shape == x.shape
    assert torch.equal(direct, fused)
    torch.testing.assert_close(fused.double(), ref, **TOL)
    torch.testing.assert_close(chunked.double(), ref, **TOL)
    torch.testing.assert_close(chunked, fused, **TOL)


def test_qk_norm_matters():
    """Without norm_q / norm_k (same weights otherwise) the output moves far beyond TOL: a core
    that dropped them could not pass the equality tests here."""
    attn, x = make_attention(), make_input()
    plain = copy.deepcopy(attn)
    plain.norm_q = plain.norm_k = None
    with torch.no_grad():
        for core in (FusedCore(), TokenChunkedCore(CHUNK)):
            gap = (linfusion_attention(attn, x, core=core) - linfusion_attention(plain, x, core=core)).abs().max()
            assert gap > 1e-2, gap


def test_chunked_core_with_a_mask_cross_attention_and_4d_input():
    """The chunked core's chunk weights count kept keys only; cross-attention keys are chunked
    as well; a 4-D input keeps its channel-major layout."""
    attn, x = make_attention(seed=3), make_input(seed=4)
    context = torch.randn(B, 17, C, generator=torch.Generator().manual_seed(5))
    mask = torch.rand(B, 17, generator=torch.Generator().manual_seed(6)) > 0.5
    mask[0, :CHUNK] = False  # a whole chunk of batch 0 dropped
    x4 = x[:, :20].transpose(1, 2).reshape(B, C, 4, 5)
    with torch.no_grad():
        for args in ((x, context, mask), (x4, None, None)):
            fused = linfusion_attention(attn, *args)
            chunked = linfusion_attention(attn, *args, core=TokenChunkedCore(CHUNK))
            assert chunked.shape == fused.shape and chunked.is_contiguous()
            torch.testing.assert_close(chunked, fused, **TOL)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        TokenChunkedCore(0)


def test_chunked_core_has_gradients():
    attn, x = make_attention(seed=7), make_input(seed=8)
    grads = []
    for core in (FusedCore(), TokenChunkedCore(CHUNK)):
        attn.zero_grad()
        x_ = x.clone().requires_grad_()
        (linfusion_attention(attn, x_, core=core) ** 2).sum().backward()
        grads.append([x_.grad, attn.norm_q.weight.grad.clone(), attn.norm_k.weight.grad.clone()])
    for fused, chunked in zip(*grads):
        torch.testing.assert_close(chunked, fused, rtol=1e-4, atol=1e-5)


def test_low_memory_chunked_self_attention_on_a_unet_with_qk_norm(monkeypatch):
    """A tiny SD 1.5 UNet whose self-attention carries qk-norm, LinFusion mounted: the UNet with
    apply_low_memory's chunked self-attention (chunk 5 of 64 and 16 tokens) equals the plain one,
    and the chunked path is the one that ran (the TokenChunkedCore's state was asked)."""
    unet = make_unet("sd15")
    torch.manual_seed(9)
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            d = module.to_q.out_features // module.heads
            module.norm_q, module.norm_k = nn.LayerNorm(d), nn.LayerNorm(d)
            with torch.no_grad():
                for norm in (module.norm_q, module.norm_k):
                    norm.weight.copy_(1 + 0.5 * torch.randn(d))
                    norm.bias.copy_(0.5 * torch.randn(d))
    make_linfusion(unet).mount_to(unet=unet)
    inputs = unet_inputs("sd15")
    with torch.no_grad():
        ref = unet(**inputs).sample
        calls = []
        real_state = TokenChunkedCore.state

        def counted(self, *args, **kwargs):
            calls.append(args[0].shape[1])
            return real_state(self, *args, **kwargs)

        monkeypatch.setattr(TokenChunkedCore, "state", counted)
        with apply_low_memory(unet, chunked_cfg=False, inplace_silu=False, attn_chunk_size=CHUNK):
            out = unet(**inputs).sample
        # Without the norms the UNet's output moves: the comparison below sees them.
        unnormed = []
        for name, module in unet.named_modules():
            if name.endswith("attn1"):
                unnormed.append((module, module.norm_q, module.norm_k))
                module.norm_q = module.norm_k = None
        moved = (unet(**inputs).sample - ref).abs().max()
        for module, norm_q, norm_k in unnormed:
            module.norm_q, module.norm_k = norm_q, norm_k
    assert calls and max(calls) == CHUNK and min(calls) < CHUNK
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert moved > 1e-3, moved


# ---------------------------------------------------------------------------------------------
# Sequence-parallel core: 2 gloo processes, each with its token slice of the same input.
WORLD = 2


def _sequence_parallel_worker(rank, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    attn, x = make_attention(), make_input()
    attn.set_processor(SequenceParallelLinFusionAttnProcessor())
    weight = torch.randn(B, N, C, generator=torch.Generator().manual_seed(2))
    part = token_slice(N)
    x_r = x[:, part].clone().requires_grad_()
    out = attn(x_r)
    (out * weight[:, part]).sum().backward()
    for p in attn.parameters():
        dist.all_reduce(p.grad)
    with torch.no_grad():
        core_out = linfusion_attention(attn, x[:, part], core=SequenceParallelCore())
    torch.save(
        {
            "out": out.detach(),
            "core_out": core_out,
            "dx": x_r.grad,
            "param_grads": {name: p.grad for name, p in attn.named_parameters()},
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()
    # Results are on disk; skip the interpreter teardown, where a gloo rank occasionally aborts.
    os._exit(0)


def test_sequence_parallel_core_equals_fused_and_reference(tmp_path):
    mp.spawn(_sequence_parallel_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    out = torch.cat([r["out"] for r in ranks], dim=1)
    core_out = torch.cat([r["core_out"] for r in ranks], dim=1)
    dx = torch.cat([r["dx"] for r in ranks], dim=1)

    attn, x = make_attention(), make_input()
    weight = torch.randn(B, N, C, generator=torch.Generator().manual_seed(2))
    x_ = x.clone().requires_grad_()
    fused = attn(x_)
    (fused * weight).sum().backward()
    ref = reference_attention(attn, x)

    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(core_out, out)
    torch.testing.assert_close(out, fused.detach(), **TOL)
    torch.testing.assert_close(out.double(), ref, **TOL)
    torch.testing.assert_close(dx, x_.grad, rtol=1e-4, atol=1e-5)
    for name, p in attn.named_parameters():
        torch.testing.assert_close(ranks[0]["param_grads"][name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    # The qk-norm parameters got gradients through the sequence-parallel path.
    assert ranks[0]["param_grads"]["norm_q.weight"].abs().max() > 0
    assert ranks[0]["param_grads"]["norm_k.weight"].abs().max() > 0
