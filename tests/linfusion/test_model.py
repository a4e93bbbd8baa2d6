"""LinFusion on diffusers: official formula, official checkpoint format, mount / unmount,
pipelines, torch.compile, training, and coexistence with slicing, fused QKV, PEFT LoRA,
ControlNet and IP-Adapter. Offline, on tiny random models shaped like SD 1.5, SD 2.1 and SD XL."""

import copy
import json

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    ControlNetModel,
    StableDiffusionControlNetPipeline,
)
from diffusers.models.attention_processor import (  # noqa: E402
    Attention,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    IPAdapterAttnProcessor2_0,
    SlicedAttnProcessor,
)
from safetensors.torch import load_file, save_file  # noqa: E402

import linfusion_ops  # noqa: E402
from tests.helpers.backends import DEVICES  # noqa: E402
from tests.helpers.tolerances import assert_close_lowp, default_floor  # noqa: E402
from tests.helpers.tiny_models import (  # noqa: E402
    load_tiny_ip_adapter,
    make_linfusion,
    make_unet,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    unet_inputs,
)
from linfusion_ops import LinFusion, LinFusionAttnProcessor  # noqa: E402
from linfusion_ops.reference import official_linear_attention  # noqa: E402

class OfficialLinFusionLayer(nn.Module):
    """The official GeneralizedLinearAttention.forward in plain PyTorch: unfused MLP as a
    residual, heads transposed, LinFusion's formula (reference.official_linear_attention)."""

    def __init__(self, layer):
        super().__init__()
        self.inner = copy.deepcopy(layer)

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        m = self.inner
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = m.to_q(hidden_states + m.to_q_(hidden_states))
        k = m.to_k(context + m.to_k_(context))
        v = m.to_v(context)
        return m.to_out[1](m.to_out[0](official_linear_attention(q, k, v, m.heads)))


def official_unet(unet, linfusion):
    """A copy of the (unmounted) unet with the official modules swapped in, as the official
    mount_to does (replacing whole submodules)."""
    ref = copy.deepcopy(unet)
    for name, layer in linfusion.modules_dict.items():
        parent, attr = name.rsplit(".", 1)
        setattr(ref.get_submodule(parent), attr, OfficialLinFusionLayer(layer))
    return ref


def attn1_modules(unet):
    return {n: m for n, m in unet.named_modules() if isinstance(m, Attention) and n.endswith("attn1")}


def official_keys(modules_list):
    keys = set()
    for i, entry in enumerate(modules_list):
        keys |= {
            f"{i}.to_q.weight",
            f"{i}.to_k.weight",
            f"{i}.to_v.weight",
            f"{i}.to_out.0.weight",
            f"{i}.to_out.0.bias",
        }
        if entry["projection_mid_dim"] != -1:
            keys |= {
                f"{i}.{mlp}.{j}.{p}"
                for mlp in ("to_q_", "to_k_")
                for j in (0, 1, 3)
                for p in ("weight", "bias")
            }
    return keys


# ---------------------------------------------------------------------------------------------
# The mounted UNet computes the official formula.
@pytest.mark.parametrize(
    "kind,mid",
    [("sd15", None), ("sd15", 5), ("sd15", -1), ("sd21", None), ("xl", "xl")],
    ids=["sd15-mid_none", "sd15-mid_int", "sd15-mid_-1", "sd21", "xl-mid_dim/16"],
)
def test_mounted_unet_matches_official(kind, mid):
    unet = make_unet(kind, torch.float64)
    linfusion = make_linfusion(unet, mid)
    ref = official_unet(unet, linfusion)
    linfusion.mount_to(unet=unet)

    for name, attn in unet.attn_processors.items():
        expected = LinFusionAttnProcessor if name.endswith("attn1.processor") else AttnProcessor2_0
        assert type(attn) is expected, name
    for entry in linfusion.config.modules_list:
        layer = linfusion.modules_dict[entry["module_name"]]
        if entry["projection_mid_dim"] == -1:
            assert isinstance(layer.to_q_, nn.Identity)
        else:
            width = entry["projection_mid_dim"] or entry["dim_n"]
            assert layer.to_q_[0].out_features == width and layer.to_k_[3].in_features == width
    heads = {m.heads for m in attn1_modules(unet).values()}
    assert heads == {"sd15": {8}, "sd21": {2, 4}, "xl": {10, 20}}[kind]
    if kind == "xl":
        assert [e["projection_mid_dim"] for e in linfusion.config.modules_list] == [
            e["dim_n"] // 16 for e in linfusion.config.modules_list
        ]

    inputs = unet_inputs(kind, torch.float64)
    with torch.no_grad():
        out = unet(**inputs).sample
        expected = ref(**inputs).sample
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)

    # fp32 against the official formula: the tolerance rule of docs/design.md, fp64 as the truth.
    unet32, ref32 = copy.deepcopy(unet).float(), copy.deepcopy(ref).float()
    with torch.no_grad():
        out32 = unet32(**unet_inputs(kind, torch.float32)).sample
        expected32 = ref32(**unet_inputs(kind, torch.float32)).sample
    assert_close_lowp(out32, expected32, expected, floor=default_floor(torch.float32), name="fp32 UNet")


# ---------------------------------------------------------------------------------------------
# The official checkpoint format.
def test_save_load_round_trip_official_format(tmp_path):
    unet = make_unet("xl")
    linfusion = make_linfusion(unet, "xl")
    linfusion.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "LinFusion"
    assert config["modules_list"] == linfusion.config.modules_list
    assert all(
        set(e) == {"module_name", "dim_n", "heads", "projection_mid_dim"} for e in config["modules_list"]
    )
    tensors = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert set(tensors) == official_keys(config["modules_list"])
    assert {n for n, _ in linfusion.named_parameters()} == set(tensors)

    loaded = LinFusion.from_pretrained(tmp_path)
    assert loaded.config.modules_list == linfusion.config.modules_list
    for name, p in linfusion.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name

    inputs = unet_inputs("xl")
    unet_a, unet_b = make_unet("xl"), make_unet("xl")
    linfusion.mount_to(unet=unet_a)
    loaded.mount_to(unet=unet_b)
    with torch.no_grad():
        assert torch.equal(unet_a(**inputs).sample, unet_b(**inputs).sample)


def test_loads_folder_written_with_official_keys(tmp_path):
    """A folder as downloaded from Yuanshi/LinFusion-*: config.json written by the official
    class and a safetensors file with the official keys, built here by hand."""
    unet = make_unet("sd15")
    modules_list = [
        {"module_name": name, "dim_n": m.to_q.in_features, "heads": m.heads, "projection_mid_dim": mid}
        for (name, m), mid in zip(attn1_modules(unet).items(), [None, 8, -1, None, 16, None, None])
    ]
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"_class_name": "LinFusion", "_diffusers_version": "0.30.0", "modules_list": modules_list}
        )
    )
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for i, e in enumerate(modules_list):
        dim, mid = e["dim_n"], e["projection_mid_dim"] or e["dim_n"]
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            tensors[f"{i}.{proj}.weight"] = torch.randn(dim, dim, generator=g) / dim**0.5
        tensors[f"{i}.to_out.0.bias"] = torch.randn(dim, generator=g)
        if e["projection_mid_dim"] != -1:
            for mlp in ("to_q_", "to_k_"):
                tensors[f"{i}.{mlp}.0.weight"] = torch.randn(mid, dim, generator=g) / dim**0.5
                tensors[f"{i}.{mlp}.0.bias"] = torch.randn(mid, generator=g)
                tensors[f"{i}.{mlp}.1.weight"] = 1 + 0.1 * torch.randn(mid, generator=g)
                tensors[f"{i}.{mlp}.1.bias"] = 0.1 * torch.randn(mid, generator=g)
                tensors[f"{i}.{mlp}.3.weight"] = torch.randn(dim, mid, generator=g) / mid**0.5
                tensors[f"{i}.{mlp}.3.bias"] = torch.randn(dim, generator=g)
    assert set(tensors) == official_keys(modules_list)
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")

    base = copy.deepcopy(unet)
    linfusion = LinFusion.construct_for(unet=unet, pretrained_model_name_or_path=str(tmp_path))
    assert {n: p for n, p in linfusion.state_dict().items()}.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(linfusion.state_dict()[name], t), name
    # The checkpoint's projections, not the UNet's, now run in attn1 (shared with LinFusion).
    first = unet.get_submodule(modules_list[0]["module_name"])
    assert first.to_q.weight is linfusion.get_parameter("0.to_q.weight")
    assert torch.equal(first.to_out[0].bias, tensors["0.to_out.0.bias"])

    inputs = unet_inputs("sd15")
    with torch.no_grad():
        torch.testing.assert_close(
            unet(**inputs).sample, official_unet(base, linfusion)(**inputs).sample, rtol=1e-4, atol=1e-5
        )


def test_construct_for_pipeline_mapping(tmp_path, monkeypatch):
    """The official pipeline-name -> repository mapping, with the hub load replaced by local
    folders (no network in tests)."""
    folders = {"Yuanshi/LinFusion-1-5": tmp_path / "sd15", "Yuanshi/LinFusion-XL": tmp_path / "xl"}
    make_linfusion(make_unet("sd15")).save_pretrained(folders["Yuanshi/LinFusion-1-5"])
    make_linfusion(make_unet("xl"), "xl").save_pretrained(folders["Yuanshi/LinFusion-XL"])
    asked = []
    real = LinFusion.from_pretrained.__func__

    def fake_from_pretrained(cls, name, **kwargs):
        asked.append(name)
        return real(cls, str(folders[name]), **kwargs)

    monkeypatch.setattr(LinFusion, "from_pretrained", classmethod(fake_from_pretrained))
    pipe = tiny_sd_pipeline(tmp_path / "tok")
    pipe.register_to_config(_name_or_path="runwayml/stable-diffusion-v1-5")
    LinFusion.construct_for(pipe)
    LinFusion.construct_for(unet=make_unet("sd15"), pipe_name_path="Lykon/dreamshaper-8")
    xl = LinFusion.construct_for(
        unet=make_unet("xl"), pipe_name_path="stabilityai/stable-diffusion-xl-base-1.0"
    )
    assert asked == ["Yuanshi/LinFusion-1-5", "Yuanshi/LinFusion-1-5", "Yuanshi/LinFusion-XL"]
    assert xl.config.modules_list[0]["projection_mid_dim"] == xl.config.modules_list[0]["dim_n"] // 16
    with pytest.raises(ValueError, match="no checkpoint known for pipeline 'my/model'"):
        LinFusion.construct_for(unet=make_unet("sd15"), pipe_name_path="my/model")


# ---------------------------------------------------------------------------------------------
# Unmount.
def test_unmount_restores_unet_exactly():
    unet = make_unet("sd15")
    inputs = unet_inputs("sd15")
    params = {n: p.detach().clone() for n, p in unet.state_dict().items()}
    modules = {n: dict(m._modules) for n, m in attn1_modules(unet).items()}
    processors = unet.attn_processors
    with torch.no_grad():
        before = unet(**inputs).sample

    linfusion = LinFusion.construct_for(unet=unet, load_pretrained=False)
    with torch.no_grad():
        assert not torch.equal(unet(**inputs).sample, before)
    with pytest.raises(ValueError, match="already mounted"):
        linfusion.mount_to(unet=unet)
    with pytest.raises(ValueError, match="already runs LinFusion"):
        LinFusion.construct_for(unet=unet, load_pretrained=False)
    linfusion.unmount(unet=unet)

    assert unet.state_dict().keys() == params.keys()
    for name, p in unet.state_dict().items():
        assert torch.equal(p, params[name]), name
    for name, m in attn1_modules(unet).items():
        assert m._modules == modules[name] and "set_processor" not in m.__dict__
    assert all(unet.attn_processors[n] is p for n, p in processors.items())
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, before)
    with pytest.raises(ValueError, match="not mounted"):
        linfusion.unmount(unet=unet)


def test_construct_from_scratch_starts_from_unet_projections():
    unet = make_unet("sd15")
    originals = {n: m.to_q.weight.detach().clone() for n, m in attn1_modules(unet).items()}
    linfusion = LinFusion.construct_for(unet=unet, load_pretrained=False)
    for name, layer in linfusion.modules_dict.items():
        assert torch.equal(layer.to_q.weight, originals[name])


def test_mount_rejects_mismatched_checkpoint():
    linfusion = make_linfusion(make_unet("sd15"))
    with pytest.raises(ValueError, match="has no module"):
        linfusion.mount_to(unet=make_unet("xl"))
    config = copy.deepcopy(linfusion.config.modules_list)
    config[0]["heads"] = 4
    with pytest.raises(ValueError, match="wrong checkpoint"):
        LinFusion(modules_list=config).mount_to(unet=make_unet("sd15"))


# ---------------------------------------------------------------------------------------------
# The processor on its own.
def test_processor_4d_group_norm_spatial_norm_residual_rescale():
    torch.manual_seed(4)
    attn = Attention(
        query_dim=32,
        heads=4,
        dim_head=8,
        norm_num_groups=4,
        spatial_norm_dim=3,
        residual_connection=True,
        rescale_output_factor=2.0,
        bias=True,
        processor=LinFusionAttnProcessor(),
    ).double()
    x = torch.randn(2, 32, 4, 5, dtype=torch.float64)
    temb = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    out = attn(x, temb=temb)

    h = attn.spatial_norm(x, temb)
    h = attn.group_norm(h.flatten(2)).transpose(1, 2)
    o = official_linear_attention(attn.to_q(h), attn.to_k(h), attn.to_v(h), attn.heads)
    o = attn.to_out[0](o).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(out, (o + x) / 2.0, rtol=1e-12, atol=1e-12)


def test_processor_cross_attention_and_key_padding_mask():
    torch.manual_seed(5)
    attn = Attention(
        query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, processor=LinFusionAttnProcessor()
    ).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    ctx = torch.randn(2, 6, 12, dtype=torch.float64)
    kept = [6, 4]
    additive = torch.zeros(2, 1, 6, dtype=torch.float64)
    additive[1, :, 4:] = -10000.0
    out = attn(x, encoder_hidden_states=ctx, attention_mask=additive)
    out_bool = attn(x, encoder_hidden_states=ctx, attention_mask=additive[:, 0] == 0)
    for b, n in enumerate(kept):
        q, k, v = attn.to_q(x[b : b + 1]), attn.to_k(ctx[b : b + 1, :n]), attn.to_v(ctx[b : b + 1, :n])
        expected = attn.to_out[0](official_linear_attention(q, k, v, attn.heads))
        torch.testing.assert_close(out[b : b + 1], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_bool, out, rtol=0, atol=0)
    # A mask shared by the batch (1, 1, 1, N_k): dropping keys 4 and 5 = cutting them off.
    shared = torch.zeros(1, 1, 1, 6, dtype=torch.float64)
    shared[..., 4:] = torch.finfo(torch.float64).min
    torch.testing.assert_close(
        attn(x, encoder_hidden_states=ctx, attention_mask=shared),
        attn(x, encoder_hidden_states=ctx[:, :4]),
        rtol=1e-12,
        atol=1e-12,
    )

    with pytest.raises(ValueError, match="can only drop keys"):
        attn(x, encoder_hidden_states=ctx, attention_mask=torch.zeros(2, 9, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="can only drop keys"):
        attn(x, encoder_hidden_states=ctx, attention_mask=torch.zeros(2, 1, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot re-weight keys"):
        attn(
            x, encoder_hidden_states=ctx, attention_mask=torch.full((2, 1, 6), -0.5, dtype=torch.float64)
        )


def test_processor_uses_fused_layer_norm_leaky_relu(monkeypatch):
    """The MLP middle goes through linfusion_ops.layer_norm_leaky_relu, with the LayerNorm's eps
    and the LeakyReLU's slope."""
    from linfusion_ops.linfusion import kernel_mlp as module

    calls = []
    real = module.layer_norm_leaky_relu

    def spy(x, weight, bias, *, eps, negative_slope):
        calls.append((tuple(x.shape), eps, negative_slope))
        return real(x, weight, bias, eps=eps, negative_slope=negative_slope)

    monkeypatch.setattr(module, "layer_norm_leaky_relu", spy)
    layer = LinFusion(
        modules_list=[{"module_name": "a.attn1", "dim_n": 16, "heads": 2, "projection_mid_dim": 6}]
    ).get_submodule("0")
    layer(torch.randn(2, 5, 16))
    assert calls == [((2, 5, 6), 1e-5, 0.01)] * 2


# ---------------------------------------------------------------------------------------------
# Training through the processors, torch.compile.
def test_training_step_gradients_match_reference():
    unet = make_unet("sd15", torch.float64).requires_grad_(False)
    linfusion = make_linfusion(unet)
    ref = official_unet(unet, linfusion).requires_grad_(False)
    linfusion.mount_to(unet=unet)
    linfusion.requires_grad_(True)
    for m in ref.modules():
        if isinstance(m, OfficialLinFusionLayer):
            m.requires_grad_(True)

    inputs = unet_inputs("sd15", torch.float64)
    unet(**inputs).sample.square().mean().backward()
    ref(**inputs).sample.square().mean().backward()
    for i, (name, layer) in enumerate(linfusion.modules_dict.items()):
        official = ref.get_submodule(name).inner
        for pname, p in layer.named_parameters():
            torch.testing.assert_close(
                p.grad, official.get_parameter(pname).grad, rtol=1e-9, atol=1e-12, msg=f"{i}.{pname}"
            )

    # The optimizer over linfusion.parameters() trains the mounted UNet (shared parameters).
    with torch.no_grad():
        before = unet(**inputs).sample
    torch.optim.SGD(linfusion.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert not torch.equal(unet(**inputs).sample, before)


def test_compile_fullgraph_unet():
    unet = make_unet("sd15")
    LinFusion.construct_for(unet=unet, load_pretrained=False)
    inputs = unet_inputs("sd15")
    torch._dynamo.reset()
    compiled = torch.compile(unet, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(**inputs).sample, unet(**inputs).sample, rtol=1e-5, atol=1e-5
        )


def test_compile_fullgraph_processor_with_mask_and_backward():
    torch.manual_seed(6)
    layer = LinFusion(
        modules_list=[{"module_name": "a.attn1", "dim_n": 16, "heads": 2, "projection_mid_dim": None}]
    ).get_submodule("0")
    x = torch.randn(2, 7, 16, requires_grad=True)
    mask = torch.zeros(2, 1, 7)
    mask[0, :, 5:] = -float("inf")
    # aot_eager traces the backward through the custom ops' fake kernels and autograd. The
    # pure-PyTorch fallback (no _C) hits a torch 2.14 aot_eager bug in the backward of its head
    # reshapes ("view size is not compatible"), so without _C only Dynamo's graph is checked.
    backend = "aot_eager" if linfusion_ops.compiled() else "eager"
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    out = compiled(x, attention_mask=mask)
    torch.testing.assert_close(out, layer(x, attention_mask=mask), rtol=1e-5, atol=1e-6)
    (grad_compiled,) = torch.autograd.grad(out.sum(), x)
    (grad_eager,) = torch.autograd.grad(layer(x, attention_mask=mask).sum(), x)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Coexistence with diffusers features.
def test_slicing_fused_qkv_and_set_attn_processor_keep_linfusion():
    unet = make_unet("sd15")
    linfusion = make_linfusion(unet)
    ref = official_unet(unet, linfusion)
    linfusion.mount_to(unet=unet)
    inputs = unet_inputs("sd15")
    with torch.no_grad():
        expected = ref(**inputs).sample

    with pytest.warns(
        UserWarning, match="keeping LinFusionAttnProcessor .* instead of SlicedAttnProcessor"
    ):
        unet.set_attention_slice(1)
    procs = unet.attn_processors
    assert all(
        type(p) is (LinFusionAttnProcessor if n.endswith("attn1.processor") else SlicedAttnProcessor)
        for n, p in procs.items()
    )
    with torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, expected, rtol=1e-4, atol=1e-5)

    with pytest.warns(UserWarning, match="instead of FusedAttnProcessor2_0"):
        unet.fuse_qkv_projections()
    procs = unet.attn_processors
    assert all(
        type(p) is (LinFusionAttnProcessor if n.endswith("attn1.processor") else FusedAttnProcessor2_0)
        for n, p in procs.items()
    )
    with torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, expected, rtol=1e-4, atol=1e-5)

    with pytest.raises(
        ValueError, match="Cannot call `set_default_attn_processor`"
    ):  # diffusers' own check
        unet.set_default_attn_processor()
    with pytest.warns(UserWarning, match="instead of AttnProcessor2_0"):
        unet.set_attn_processor(AttnProcessor2_0())
    procs = unet.attn_processors
    assert all(
        type(p) is (LinFusionAttnProcessor if n.endswith("attn1.processor") else AttnProcessor2_0)
        for n, p in procs.items()
    )

    linfusion.unmount(unet=unet)
    assert all(
        not hasattr(m, "to_qkv") and not hasattr(m, "to_q_") for m in attn1_modules(unet).values()
    )
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


def test_peft_lora_on_projections():
    peft = pytest.importorskip("peft")
    unet = make_unet("sd15")
    linfusion = make_linfusion(unet)
    names = [n for n, _ in linfusion.named_parameters()]
    linfusion.mount_to(unet=unet)
    inputs = unet_inputs("sd15")
    with torch.no_grad():
        before = unet(**inputs).sample
    unet.add_adapter(
        peft.LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
    )
    for attn in attn1_modules(unet).values():
        assert hasattr(attn.to_q, "base_layer") and hasattr(attn.to_out[0], "base_layer")
    assert [n for n, _ in linfusion.named_parameters()] == names
    attn1 = next(iter(attn1_modules(unet).values()))
    x = torch.randn(2, 16, attn1.to_q.in_features)
    with torch.no_grad():
        attn1_lora, with_lora = attn1(x), unet(**inputs).sample
        unet.disable_adapters()
        assert not torch.allclose(attn1(x), attn1_lora)  # the adapters act inside LinFusion's attn1
        assert not torch.allclose(with_lora, before)
        torch.testing.assert_close(unet(**inputs).sample, before, rtol=0, atol=0)

    fresh = make_unet("sd15")
    fresh.add_adapter(peft.LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with pytest.raises(ValueError, match="mount LinFusion before loading LoRA"):
        make_linfusion(fresh).mount_to(unet=fresh)


def test_ip_adapter_keeps_linfusion_on_self_attention():
    unet = make_unet("sd15")
    linfusion = make_linfusion(unet)
    linfusion.mount_to(unet=unet)
    clip_dim = 12
    load_tiny_ip_adapter(unet, clip_dim=clip_dim)
    g = torch.Generator().manual_seed(8)
    for name, p in unet.attn_processors.items():
        assert type(p) is (
            LinFusionAttnProcessor if name.endswith("attn1.processor") else IPAdapterAttnProcessor2_0
        )
    inputs = unet_inputs("sd15")
    outs = []
    for _ in range(2):
        inputs["added_cond_kwargs"] = {"image_embeds": [torch.randn(2, 1, clip_dim, generator=g)]}
        with torch.no_grad():
            outs.append(unet(**inputs).sample)
    assert outs[0].shape == (2, 4, 8, 8) and torch.isfinite(outs[0]).all()
    assert not torch.allclose(outs[0], outs[1])  # the image prompt reaches the UNet


# ---------------------------------------------------------------------------------------------
# Pipelines end to end.
def run_pipe(pipe, **kwargs):
    return pipe(
        "a cat",
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def test_sd_pipeline_end_to_end(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    base_unet = copy.deepcopy(pipe.unet)
    linfusion = LinFusion.construct_for(pipe, load_pretrained=False)
    image = run_pipe(pipe)
    assert image.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(image)).all()

    pipe.unet = official_unet(base_unet, linfusion)
    torch.testing.assert_close(
        torch.from_numpy(run_pipe(pipe)), torch.from_numpy(image), rtol=1e-4, atol=1e-4
    )


def test_sdxl_pipeline_end_to_end(tmp_path):
    torch.manual_seed(10)
    unet = make_unet("xl")
    pipe = tiny_sdxl_pipeline(tmp_path, unet)
    linfusion = make_linfusion(unet, "xl")
    ref_unet = official_unet(unet, linfusion)
    linfusion.mount_to(pipe)
    image = run_pipe(pipe)
    assert image.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(image)).all()

    pipe.unet = ref_unet
    torch.testing.assert_close(
        torch.from_numpy(run_pipe(pipe)), torch.from_numpy(image), rtol=1e-4, atol=1e-4
    )


def test_controlnet_pipeline_leaves_controlnet_untouched(tmp_path):
    sd = tiny_sd_pipeline(tmp_path)
    torch.manual_seed(11)
    controlnet = ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(8, 16))
    pipe = StableDiffusionControlNetPipeline(**sd.components, controlnet=controlnet)
    control_procs = dict(controlnet.attn_processors)
    linfusion = LinFusion.construct_for(pipe, load_pretrained=False)
    assert all(controlnet.attn_processors[n] is p for n, p in control_procs.items())
    image = run_pipe(pipe, image=torch.rand(1, 3, 16, 16))
    assert image.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(image)).all()
    linfusion.unmount(pipe)
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())


# ---------------------------------------------------------------------------------------------
# fp16.
@pytest.mark.parametrize("device", DEVICES)
def test_fp16_unet(device):
    unet = make_unet("xl").to(device)
    linfusion = make_linfusion(unet, "xl")
    ref32 = official_unet(unet, linfusion)
    ref16 = copy.deepcopy(ref32).half()
    unet16 = copy.deepcopy(unet).half()
    linfusion16 = copy.deepcopy(linfusion)
    linfusion16.mount_to(unet=unet16)
    assert linfusion16.dtype == torch.float16
    with torch.no_grad():
        out = unet16(**unet_inputs("xl", torch.float16, device)).sample
        expected16 = ref16(**unet_inputs("xl", torch.float16, device)).sample
        expected = ref32(**unet_inputs("xl", torch.float32, device)).sample
    assert out.dtype == torch.float16
    assert_close_lowp(out, expected16, expected, floor=default_floor(torch.float16), name="fp16 UNet")
