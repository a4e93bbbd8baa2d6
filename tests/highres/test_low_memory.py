"""apply_low_memory: every technique gives the plain forward's result (in-place SiLU and skip offload
bit for bit; chunked CFG, chunked feed-forward and chunked self-attention within fp32 rounding, since a GEMM or
convolution of another batch or token count may be blocked differently), with LinFusion
mounted, IP-Adapter and ControlNet; chunked CFG splits every kind of batched argument; the
handle restores everything; max_memory chooses from the memory model and errors when nothing
fits; the memory model matches live bytes counted on real CPU tensors."""

import importlib

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.controlnets.controlnet import ControlNetOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.models.attention_processor import AttnProcessor2_0
from linfusion_ops.highres.low_memory import _concat, _split_batch, apply_low_memory
from linfusion_ops.highres.memory import LiveBytes, model_peak, module_bytes, parse_bytes, tensor_bytes
from tests.helpers.tiny_models import load_tiny_ip_adapter, make_linfusion, make_unet, tiny_controlnet, unet_inputs

TECHNIQUES = {
    "chunked_cfg": dict(chunked_cfg=True, inplace_silu=False),
    "ff_chunks": dict(chunked_cfg=False, inplace_silu=False, ff_chunk_size=24),
    "inplace_silu": dict(chunked_cfg=False, inplace_silu=True),
    "offload_skips": dict(chunked_cfg=False, inplace_silu=False, offload_skips=True),
    "attn_chunks": dict(chunked_cfg=False, inplace_silu=False, attn_chunk_size=5),
    "all": dict(chunked_cfg=True, inplace_silu=True, ff_chunk_size=24, offload_skips=True, attn_chunk_size=7),
}
EXACT = {"inplace_silu", "offload_skips"}


def _unet(kind, with_controlnet=False):
    unet = make_unet(kind)
    # ControlNetModel.from_unet copies the UNet's own attention: built before mounting.
    controlnet = tiny_controlnet(unet) if with_controlnet else None
    make_linfusion(unet, mid="xl" if kind == "xl" else None).mount_to(unet=unet)
    return (unet, controlnet) if with_controlnet else unet


def _snapshot(model):
    """Everything apply_low_memory could change: tensors, processors, instance forwards."""
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        dict(model.attn_processors),
        {name: m.__dict__.get("forward") for name, m in model.named_modules()},
    )


def _assert_restored(model, snapshot):
    state, processors, forwards = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert all(model.attn_processors[k] is v for k, v in processors.items())
    assert {name: m.__dict__.get("forward") for name, m in model.named_modules()} == forwards


def _check(out, ref, exact):
    if exact:
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd15", "sd21", "xl"])
@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_technique_matches_plain_forward_and_is_removable(kind, technique):
    unet = _unet(kind)
    inputs = unet_inputs(kind)
    snapshot = _snapshot(unet)
    with torch.no_grad():
        ref = unet(**inputs).sample
        with apply_low_memory(unet, **TECHNIQUES[technique]) as handle:
            out = unet(**inputs)
            tup = unet(**inputs, return_dict=False)
        assert isinstance(out, UNet2DConditionOutput) and isinstance(tup, tuple) and len(tup) == 1
        _check(out.sample, ref, technique in EXACT)
        assert torch.equal(tup[0], out.sample)
        active = {k: handle.techniques[k] for k in TECHNIQUES[technique]}
        assert active == TECHNIQUES[technique]
        _assert_restored(unet, snapshot)
        assert torch.equal(unet(**inputs).sample, ref)


def test_inplace_silu_keeps_the_time_embedding_and_the_block_input():
    unet = _unet("sd15")
    block = unet.down_blocks[0].resnets[0]
    x = torch.randn(2, 32, 8, 8)
    temb = torch.randn(2, unet.config.block_out_channels[0] * 4)
    x0, temb0 = x.clone(), temb.clone()
    with torch.no_grad():
        ref = block(x, temb)
        with apply_low_memory(unet, inplace_silu=True):
            out = block(x, temb)
    assert torch.equal(out, ref) and torch.equal(x, x0) and torch.equal(temb, temb0)


def test_gradients_flow_through_low_memory():
    """With gradients on, ResnetBlock2D runs its original forward (in place would destroy what
    autograd saved); the gradients match the plain ones."""
    unet = _unet("sd15")
    inputs = unet_inputs("sd15")
    unet(**inputs).sample.square().mean().backward()
    ref = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    unet.zero_grad()
    with apply_low_memory(unet, chunked_cfg=False, ff_chunk_size=24):
        unet(**inputs).sample.square().mean().backward()
    for name, grad in ref.items():
        torch.testing.assert_close(dict(unet.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["sd15", "xl"])
def test_ip_adapter_embeds_are_split_per_adapter(kind):
    unet = _unet(kind)
    load_tiny_ip_adapter(unet)
    inputs = unet_inputs(kind)
    g = torch.Generator().manual_seed(4)
    added = dict(inputs.get("added_cond_kwargs", {}))
    # One adapter, batch 2 (uncond, cond): the list has one (2, 1, 12) tensor. Slicing the list
    # instead of the tensor (the official defect) would hand the cond half no embedding.
    added["image_embeds"] = [torch.randn(2, 1, 12, generator=g)]
    inputs["added_cond_kwargs"] = added
    with torch.no_grad():
        ref = unet(**inputs).sample
        with apply_low_memory(unet, **TECHNIQUES["all"]):
            out = unet(**inputs).sample
        other = dict(inputs, added_cond_kwargs=dict(added, image_embeds=[added["image_embeds"][0].flip(0)]))
        assert not torch.allclose(unet(**other).sample, ref, atol=1e-4)  # the embeds matter
    _check(out, ref, exact=False)


@pytest.mark.parametrize("kind", ["sd15", "xl"])
@pytest.mark.parametrize("technique", ["chunked_cfg", "offload_skips", "all"])
def test_controlnet_residuals(kind, technique):
    unet, controlnet = _unet(kind, with_controlnet=True)
    inputs = unet_inputs(kind)
    cond = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    snapshots = _snapshot(unet), _snapshot(controlnet)

    def step(return_dict):
        res = controlnet(**inputs, controlnet_cond=cond, conditioning_scale=0.7, return_dict=return_dict)
        down, mid = (res.down_block_res_samples, res.mid_block_res_sample) if return_dict else res
        return res, unet(**inputs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    with torch.no_grad():
        ref_res, ref = step(True)
        with apply_low_memory(unet, controlnet, **TECHNIQUES[technique]):
            res, out = step(True)
            tup_res, tup_out = step(False)
    exact = technique in EXACT
    assert isinstance(res, ControlNetOutput) and isinstance(tup_res, tuple)
    assert type(res.down_block_res_samples) is type(ref_res.down_block_res_samples)
    for a, b in zip([*res.down_block_res_samples, res.mid_block_res_sample],
                    [*ref_res.down_block_res_samples, ref_res.mid_block_res_sample]):
        _check(a, b, exact)
    _check(out, ref, exact)
    assert torch.equal(tup_out, out)
    _assert_restored(unet, snapshots[0])
    _assert_restored(controlnet, snapshots[1])


def test_split_batch_handles_every_kind_of_argument():
    b = 4
    t = torch.arange(b * 3.0).reshape(b, 3)
    kwargs = dict(
        sample=t,
        timestep=torch.tensor(7),
        timesteps_vector=torch.arange(b),
        single=torch.ones(1, 3),
        added_cond_kwargs={"text_embeds": t + 1, "time_ids": t + 2, "image_embeds": [t + 3, (t + 4)[:, None]]},
        residuals=(t + 5, t + 6),
        cross_attention_kwargs={"scale": 0.5, "ip_adapter_masks": [torch.ones(1, 2, 2)]},
        flag=True,
        none=None,
    )
    first, second = _split_batch(kwargs, b)
    for half, rows in ((first, slice(0, 2)), (second, slice(2, 4))):
        assert torch.equal(half["sample"], t[rows])
        assert half["timestep"] is kwargs["timestep"] and half["single"] is kwargs["single"]
        assert torch.equal(half["timesteps_vector"], torch.arange(b)[rows])
        assert torch.equal(half["added_cond_kwargs"]["time_ids"], (t + 2)[rows])
        embeds = half["added_cond_kwargs"]["image_embeds"]
        assert isinstance(embeds, list) and len(embeds) == 2  # the list is kept, its tensors split
        assert torch.equal(embeds[1], (t + 4)[:, None][rows])
        assert isinstance(half["residuals"], tuple) and torch.equal(half["residuals"][1], (t + 6)[rows])
        assert half["cross_attention_kwargs"]["scale"] == 0.5
        assert half["cross_attention_kwargs"]["ip_adapter_masks"][0] is kwargs["cross_attention_kwargs"]["ip_adapter_masks"][0]
        assert half["flag"] is True and half["none"] is None
    out = _concat(
        ControlNetOutput(down_block_res_samples=(t[:2],), mid_block_res_sample=t[:2] + 1),
        ControlNetOutput(down_block_res_samples=(t[2:],), mid_block_res_sample=t[2:] + 1),
    )
    assert isinstance(out, ControlNetOutput) and torch.equal(out.down_block_res_samples[0], t)
    assert torch.equal(out.mid_block_res_sample, t + 1)


def test_odd_batch_and_timestep_vector():
    unet = _unet("sd15")
    inputs = unet_inputs("sd15")
    with torch.no_grad():
        ref = unet(**inputs).sample
        single = {k: v[:1] for k, v in inputs.items()}
        ref_single = unet(**single).sample
        with apply_low_memory(unet, chunked_cfg=True):
            out = unet(**inputs).sample  # timestep tensor([10, 500]): one per half
            out_single = unet(**single).sample  # batch 1: not split
            out_scalar = unet(**dict(inputs, timestep=500)).sample
        ref_scalar = unet(**dict(inputs, timestep=500)).sample
    _check(out, ref, exact=False)
    assert torch.equal(out_single, ref_single)
    _check(out_scalar, ref_scalar, exact=False)


def test_parse_bytes():
    assert parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("20GiB") == 20 * 2**30
    assert parse_bytes("1.5 mb") == 1_500_000
    assert parse_bytes(123) == 123
    for bad in ("lots", "-3GB", 0, 1.5, True):
        with pytest.raises((TypeError, ValueError), match="max_memory"):
            parse_bytes(bad)


def _budget_peaks(unet, inputs):
    with torch.no_grad(), apply_low_memory(unet, max_memory=10**12) as handle:
        unet(**inputs)
    return handle.plans[0]


def test_max_memory_chooses_and_errors():
    unet = _unet("sd15")
    inputs = unet_inputs("sd15")
    with torch.no_grad():
        ref = unet(**inputs).sample
    roomy = _budget_peaks(unet, inputs)
    assert roomy["techniques"] == dict(
        chunked_cfg=False, ff_chunk_size=None, inplace_silu=True, offload_skips=False, attn_chunk_size=None
    )
    # Just below the cheapest set's peak: a more aggressive set is chosen, and fits.
    budget = roomy["modelled_peak_bytes"] - 1
    with torch.no_grad(), apply_low_memory(unet, max_memory=budget) as handle:
        assert handle.techniques is None  # nothing chosen before the first call
        out = unet(**inputs).sample
    plan = handle.plans[0]
    assert plan["techniques"]["chunked_cfg"] and plan["modelled_peak_bytes"] <= budget
    assert handle.techniques["chunked_cfg"]
    _check(out, ref, exact=False)
    # Less than the weights: nothing fits, and the error says what would be needed.
    with apply_low_memory(unet, max_memory=module_bytes([unet]) // 2):
        with pytest.raises(ValueError, match="max_memory=.*too small.*smallest modelled peak"):
            with torch.no_grad():
                unet(**inputs)
    assert "forward" not in unet.__dict__


def test_memory_model_matches_live_bytes_on_cpu_and_each_technique_saves():
    """The meta-device dry run counts what a real CPU run counts (same ops, same shapes), and
    on a larger latent every technique lowers the modelled peak."""
    unet = _unet("sd15")
    g = torch.Generator().manual_seed(3)
    inputs = dict(
        sample=torch.randn(2, 4, 32, 32, generator=g),
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
    )
    resident = module_bytes([unet]) + tensor_bytes(inputs)
    peaks = {}
    for name, kwargs in [
        ("none", dict(chunked_cfg=False, inplace_silu=False)),
        ("chunked_cfg", dict(chunked_cfg=True, inplace_silu=False)),
        ("ff_chunks", dict(chunked_cfg=False, inplace_silu=False, ff_chunk_size=64)),
        ("offload_skips", dict(chunked_cfg=False, inplace_silu=False, offload_skips=True)),
    ]:
        with apply_low_memory(unet, **kwargs):
            peaks[name] = model_peak(lambda meta: unet(**meta), [unet], inputs)
            if name != "offload_skips":  # on a CPU-only machine the skips stay where they are
                with torch.no_grad(), LiveBytes("cpu") as counter:
                    unet(**inputs)
                assert abs(resident + counter.peak - peaks[name]) <= 0.02 * peaks[name], name
    for name, peak in peaks.items():
        if name != "none":
            assert peak < peaks["none"], (name, peaks)
    # In-place SiLU: one ResnetBlock2D holds fewer tensors at once.
    block = unet.down_blocks[0].resnets[0]
    args = (torch.randn(2, 32, 32, 32), torch.randn(2, 128))
    block_peaks = []
    for inplace in (False, True):
        with apply_low_memory(unet, chunked_cfg=False, inplace_silu=inplace):
            block_peaks.append(model_peak(lambda meta: block(*meta), [block], args))
    assert block_peaks[1] < block_peaks[0]


def _attn1(unet):
    """The UNet's first self-attention (attn1) module."""
    return next(m for name, m in unet.named_modules() if name.endswith("attn1"))


@pytest.mark.parametrize("kind", ["sd15", "xl"])
@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
def test_chunked_self_attention_matches_the_linfusion_processor(kind, chunk):
    """One LinFusion attn1 on its own, 3-D and 4-D inputs, with a residual connection and an
    output rescale, over chunks of 1, an odd size, exactly N and more than N tokens."""
    unet = _unet(kind)
    attn = _attn1(unet)
    width = attn.to_q.in_features
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 37, width, generator=g)
    x4 = torch.randn(2, width, 5, 7, generator=g)
    with torch.no_grad():
        refs = [attn(x), attn(x4)]
        attn.residual_connection, attn.rescale_output_factor = True, 2.0
        refs += [attn(x), attn(x4)]
        attn.residual_connection, attn.rescale_output_factor = False, 1.0
        with apply_low_memory(unet, chunked_cfg=False, inplace_silu=False, attn_chunk_size=chunk) as handle:
            assert handle.techniques["attn_chunk_size"] == chunk
            outs = [attn(x), attn(x4)]
            attn.residual_connection, attn.rescale_output_factor = True, 2.0
            outs += [attn(x), attn(x4)]
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and out.dtype == ref.dtype and out.is_contiguous()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert not torch.equal(refs[0], refs[2])  # the residual and the rescale were exercised


def test_chunked_self_attention_falls_back_to_the_processor(monkeypatch):
    """Masks, encoder states, gradients, active dropout and another processor run the module as
    it is (the chunked path, linfusion_attention with a TokenChunkedCore, is not taken)."""
    unet = _unet("sd15")
    attn = _attn1(unet)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 12, attn.to_q.in_features, generator=g)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.no_grad():
        ref_mask = attn(x, attention_mask=mask)
        ref_context = attn(x, encoder_hidden_states=x[:, :5])
    ref_grad = attn(x)

    def fail(*args, **kwargs):
        raise AssertionError("the chunked path ran")

    with apply_low_memory(unet, chunked_cfg=False, inplace_silu=False, attn_chunk_size=5):
        # The module, not the deprecated function of the same name that linfusion_ops.highres
        # exports; the processor itself calls processor.linfusion_attention, not this name.
        module = importlib.import_module("linfusion_ops.highres.low_memory")
        monkeypatch.setattr(module, "linfusion_attention", fail)
        with torch.no_grad():
            assert torch.equal(attn(x, attention_mask=mask), ref_mask)
            assert torch.equal(attn(x, encoder_hidden_states=x[:, :5]), ref_context)
        out = attn(x)  # gradients on
        assert out.requires_grad and torch.equal(out, ref_grad)
        attn.to_out[1].p = 0.5
        attn.train()
        with torch.no_grad():
            attn(x)
        attn.eval()
        attn.to_out[1].p = 0.0
        with pytest.raises(AssertionError, match="the chunked path ran"), torch.no_grad():
            attn(x)
        monkeypatch.undo()
    # A softmax processor (a UNet without LinFusion) keeps running as it is.
    plain = make_unet("sd15")
    _attn1(plain).set_processor(AttnProcessor2_0())
    inputs = unet_inputs("sd15")
    with torch.no_grad():
        ref = plain(**inputs).sample
        with apply_low_memory(plain, chunked_cfg=False, inplace_silu=False, attn_chunk_size=5):
            assert torch.equal(plain(**inputs).sample, ref)


def test_chunked_self_attention_lowers_the_modelled_peak():
    unet = _unet("sd15")
    attn = _attn1(unet)
    x = torch.randn(2, 4096, attn.to_q.in_features)
    peaks = []
    for chunk in (None, 256):
        with apply_low_memory(unet, chunked_cfg=False, inplace_silu=False, attn_chunk_size=chunk):
            peaks.append(model_peak(lambda meta: attn(meta), [attn], x))
    # Unchunked: the input and, at once, three more full-size tensors of one pass (the key MLP's
    # hidden layers and k, or q and the output); chunked: the input and the output, plus a few
    # temporaries of one chunk (256 of 4096 tokens).
    x_bytes, weights = tensor_bytes(x), module_bytes([attn])
    assert peaks[0] >= weights + 4 * x_bytes, peaks
    assert peaks[1] <= weights + 2 * x_bytes + 8 * x_bytes // 16, peaks
    with apply_low_memory(unet, chunked_cfg=False, inplace_silu=False, attn_chunk_size=256):
        with torch.no_grad(), LiveBytes("cpu") as counter:
            attn(x)
    assert abs(module_bytes([attn]) + tensor_bytes(x) + counter.peak - peaks[1]) <= 0.02 * peaks[1]


def test_attn_chunk_size_is_checked():
    unet = make_unet("sd15")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="attn_chunk_size must be a positive int or None"):
            apply_low_memory(unet, attn_chunk_size=bad)
    assert "forward" not in unet.__dict__


def test_low_memory_is_a_deprecated_alias_of_apply_low_memory():
    """linfusion_ops.highres.low_memory (the function) still works for one release, with a
    DeprecationWarning, and patches the same forwards as apply_low_memory."""
    import linfusion_ops.highres as highres

    unet = _unet("sd15")
    inputs = unet_inputs("sd15")
    with torch.no_grad():
        ref = unet(**inputs).sample
        with pytest.warns(DeprecationWarning, match="apply_low_memory"):
            handle = highres.low_memory(unet, chunked_cfg=False, inplace_silu=False, attn_chunk_size=5)
        with handle:
            assert handle.techniques["attn_chunk_size"] == 5
            assert "forward" in _attn1(unet).__dict__
            torch.testing.assert_close(unet(**inputs).sample, ref, rtol=1e-5, atol=1e-5)
    assert "forward" not in _attn1(unet).__dict__
    assert highres.apply_low_memory is importlib.import_module("linfusion_ops.highres.low_memory").apply_low_memory
