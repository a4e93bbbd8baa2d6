"""LongSD: the T5 text path of LongPromptEncoder, LaVi-Bridge's adapter and the released UNet LoRA
format, offline with a tiny CLIP, a tiny T5 and tiny UNets.

The oracles are literal ports of what LongAlign's official code computes (tools.caption2embed,
modules/adapters.TextAdapter, sample.py, modules/lora's collapse over tests/helpers/official.py's port of
its traversal), one step at a time, independently of the encoder's batching."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

from linfusion_ops import LinFusionAttnProcessor, LongPromptEncoder, LongSDAdapter, load_longsd_lora  # noqa: E402
from tests.helpers.official import official_lora_layers, published_longalign  # noqa: E402
from tests.helpers.tiny_models import (  # noqa: E402
    SD15_UNET,
    WORDS,
    clip_text_config,
    make_linfusion,
    make_unet,
    random_sentences,
    tiny_sd_pipeline,
    tiny_t5_encoder,
    write_clip_vocab,
    write_t5_tokenizer,
)

T5_DIM, INT_DIM, C = 24, 20, 32  # tiny T5 d_model, adapter int_dim, CLIP width = UNet cross-attention dim
TOKENS = 240  # LongSD's token_length: 240 CLIP + 240 T5


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip_tokenizer")
    write_clip_vocab(directory)
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=77)
    torch.manual_seed(0)
    return tokenizer, CLIPTextModel(clip_text_config(tokenizer, hidden=C)).eval()


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    tokenizer = write_t5_tokenizer(tmp_path_factory.mktemp("t5_tokenizer"), WORDS)
    return tokenizer, tiny_t5_encoder(len(tokenizer), d_model=T5_DIM)


def random_adapter(seed=3, dims=(T5_DIM, INT_DIM, C)):
    """An adapter whose every parameter matters (LayerNorm affine randomised too)."""
    torch.manual_seed(seed)
    adapter = LongSDAdapter(*dims).eval()
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return adapter


@pytest.fixture(scope="module")
def adapter():
    return random_adapter()


def longsd_encoder(clip, t5, adapter, **kwargs):
    return LongPromptEncoder(clip[0], clip[1], t5_tokenizer=t5[0], t5_encoder=t5[1], t5_adapter=adapter, **kwargs)


# ---------------------------------------------------------------------------------------------
# Literal ports of the official code.


def official_text_adapter(sd, x):
    """modules/adapters.TextAdapter.forward from its state dict: norm1 -> ff1 -> norm2 -> ff2, each
    FeedForward = GEGLU (proj, chunk into value and gate, value * gelu(gate)) -> Dropout -> Linear."""

    def feed_forward(prefix, h):
        h, gate = F.linear(h, sd[f"{prefix}.net.0.proj.weight"], sd[f"{prefix}.net.0.proj.bias"]).chunk(2, dim=-1)
        h = h * F.gelu(gate)
        return F.linear(h, sd[f"{prefix}.net.2.weight"], sd[f"{prefix}.net.2.bias"])

    x = feed_forward("ff1", F.layer_norm(x, x.shape[-1:], sd["norm1.weight"], sd["norm1.bias"]))
    return feed_forward("ff2", F.layer_norm(x, x.shape[-1:], sd["norm2.weight"], sd["norm2.bias"]))


def official_sample_embeds(prompts, negatives, clip, t5, adapter_sd, token_length=TOKENS):
    """sample.py: caption2embed(prompts + negatives) (the CLIP concat of published_longalign; T5 on
    the whole caption, padded/truncated to token_length, no attention mask), then
    cat([clip_concat, adapter(t5)], dim=1), split into prompts and negatives."""
    captions = prompts + negatives
    clip_concat = published_longalign(captions, clip[0], clip[1], token_length)
    input_ids = t5[0](captions, max_length=token_length, padding="max_length", truncation=True,
                      return_tensors="pt").input_ids
    hidden_t5 = t5[1](input_ids)[0]
    embeds = torch.cat([clip_concat, official_text_adapter(adapter_sd, hidden_t5)], dim=1)
    return embeds.split([len(prompts), len(negatives)], dim=0)


def official_lora_collapse(model, loras):
    """modules/lora: monkeypatch_or_replace_lora_extended over the official traversal (with its
    ndim skip rule) then collapse_lora (W += up @ down), as a list of (module, new weight)."""
    loras = list(loras)
    merged = []
    for module in official_lora_layers(model):
        ndim = 2 if module.__class__ == nn.Linear else 4
        if len(loras[0].shape) != ndim:
            continue
        up, down = loras.pop(0).type(module.weight.dtype), loras.pop(0).type(module.weight.dtype)
        delta = (up.flatten(start_dim=1) @ down.flatten(start_dim=1)).reshape(module.weight.shape)
        merged.append((module, module.weight.data + delta))
    assert not loras
    return merged


def official_lora_file(model, rank, seed):
    """A lora_vis.pt list as save_lora_weight writes it: [up, down] per layer, fp16."""
    g = torch.Generator().manual_seed(seed)
    factors = []
    for module in official_lora_layers(model):
        out_ch, in_ch, *kernel = module.weight.shape
        up = torch.randn(out_ch, rank, *([1] * len(kernel)), generator=g) * 0.1
        down = torch.randn(rank, in_ch, *kernel, generator=g) * 0.1
        factors += [up.half(), down.half()]
    return factors


rng = random.Random(5)
# '.'-ended sentences of at most 75 tokens: where LongPromptEncoder's "longalign" policy is the
# published splitter (see test_long_prompt); 40 sentences overflow both 240-token budgets.
PROMPTS = [random_sentences(rng, n) for n in (1, 3, 12, 40)] + [""]
NEGATIVES = ["", "blurry.", random_sentences(rng, 2), "", random_sentences(rng, 20)]


# ---------------------------------------------------------------------------------------------
# The 480-token conditioning.


def test_conditioning_shape_and_official_parity(clip, t5, adapter):
    out = longsd_encoder(clip, t5, adapter)(PROMPTS, NEGATIVES)
    assert set(out) == {"prompt_embeds", "negative_prompt_embeds"}
    assert out["prompt_embeds"].shape == out["negative_prompt_embeds"].shape == (len(PROMPTS), 2 * TOKENS, C)
    with torch.no_grad():
        expected, expected_negative = official_sample_embeds(PROMPTS, NEGATIVES, clip, t5, adapter.state_dict())
    torch.testing.assert_close(out["prompt_embeds"], expected)
    torch.testing.assert_close(out["negative_prompt_embeds"], expected_negative)
    # The CLIP half is the plain segment-level encoding: the T5 path only appends.
    clip_only = LongPromptEncoder(*clip)(PROMPTS, NEGATIVES)
    assert torch.equal(out["prompt_embeds"][:, :TOKENS], clip_only["prompt_embeds"])
    assert torch.equal(out["negative_prompt_embeds"][:, :TOKENS], clip_only["negative_prompt_embeds"])


def test_t5_truncation_and_lengths(clip, t5, adapter):
    """t5_max_tokens sets the T5 half's length; a caption longer than it is cut (</s> kept last)."""
    long = PROMPTS[3]
    assert len(t5[0](long).input_ids) > TOKENS
    out = longsd_encoder(clip, t5, adapter, max_tokens=100, t5_max_tokens=64)([long, "a red cat."])
    assert out["prompt_embeds"].shape == (2, 164, C)
    with torch.no_grad():
        ids = t5[0]([long, "a red cat."], max_length=64, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids
        assert ids[0, -1] == t5[0].eos_token_id
        expected = official_text_adapter(adapter.state_dict(), t5[1](ids)[0])
    torch.testing.assert_close(out["prompt_embeds"][:, 100:], expected)


def test_batched_equals_one_at_a_time(clip, t5, adapter):
    encoder = longsd_encoder(clip, t5, adapter)
    batched = encoder(PROMPTS, NEGATIVES)
    for i, (prompt, negative) in enumerate(zip(PROMPTS, NEGATIVES)):
        single = encoder(prompt, negative)
        torch.testing.assert_close(single["prompt_embeds"][0], batched["prompt_embeds"][i])
        torch.testing.assert_close(single["negative_prompt_embeds"][0], batched["negative_prompt_embeds"][i])


def test_negatives(clip, t5, adapter):
    encoder = longsd_encoder(clip, t5, adapter)
    prompts = PROMPTS[:3]
    default = encoder(prompts)["negative_prompt_embeds"]  # omitted: "" as in sample.py
    empty = encoder("")["prompt_embeds"]
    torch.testing.assert_close(default, empty.expand(3, -1, -1))
    one = encoder(prompts, PROMPTS[3])["negative_prompt_embeds"]  # one string for every prompt
    torch.testing.assert_close(one, encoder(PROMPTS[3])["prompt_embeds"].expand(3, -1, -1))
    zeros = longsd_encoder(clip, t5, adapter, force_zeros_for_empty_prompt=True)(prompts)
    assert zeros["negative_prompt_embeds"].shape == (3, 2 * TOKENS, C)
    assert torch.count_nonzero(zeros["negative_prompt_embeds"]) == 0


def test_one_batched_call_per_encoder(clip, t5, adapter):
    calls = {}
    handles = [
        module.register_forward_pre_hook(
            lambda mod, args, kwargs: calls.setdefault(mod, []).append(
                (args[0] if args else kwargs.get("input_ids", kwargs.get("hidden_states"))).shape[0]),
            with_kwargs=True)
        for module in (clip[1], t5[1], adapter)
    ]
    try:
        longsd_encoder(clip, t5, adapter)(PROMPTS[:3], NEGATIVES[:3])
    finally:
        for handle in handles:
            handle.remove()
    assert calls[t5[1]] == [6] and calls[adapter] == [6] and len(calls[clip[1]]) == 1


def test_follows_the_text_encoder_dtype_and_device(clip, t5):
    """T5 runs in its dtype, the adapter in its own; the result is in the CLIP encoder's dtype."""
    text_encoder = CLIPTextModel(clip[1].config).to(torch.float64).eval()
    text_encoder.load_state_dict(clip[1].state_dict())
    adapter = random_adapter().to(torch.float64)
    out = LongPromptEncoder(clip[0], text_encoder, t5_tokenizer=t5[0], t5_encoder=t5[1], t5_adapter=adapter)(
        PROMPTS[1], "blurry.")
    assert out["prompt_embeds"].dtype == out["negative_prompt_embeds"].dtype == torch.float64
    assert out["prompt_embeds"].device == text_encoder.device
    with torch.no_grad():
        expected, _ = official_sample_embeds([PROMPTS[1]], ["blurry."], clip, t5, random_adapter().state_dict())
    torch.testing.assert_close(out["prompt_embeds"], expected.double(), rtol=1e-5, atol=1e-5)


def test_grad_reaches_the_adapter_on_request(clip, t5):
    adapter = random_adapter()
    out = longsd_encoder(clip, t5, adapter, requires_grad=True)("a red cat. a dog.")
    out["prompt_embeds"].square().sum().backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in adapter.parameters())
    assert not longsd_encoder(clip, t5, adapter)("a red cat.")["prompt_embeds"].requires_grad


def test_errors(clip, t5, adapter, tmp_path):
    tokenizer, text_encoder = clip
    with pytest.raises(ValueError, match="t5_tokenizer, t5_encoder and t5_adapter together"):
        LongPromptEncoder(tokenizer, text_encoder, t5_encoder=t5[1], t5_adapter=adapter)
    with pytest.raises(ValueError, match="t5_max_tokens must be a positive int"):
        longsd_encoder(clip, t5, adapter, t5_max_tokens=0)
    with pytest.raises(ValueError, match=f"in_dim = {T5_DIM + 1} channels but t5_encoder outputs d_model = {T5_DIM}"):
        longsd_encoder(clip, t5, LongSDAdapter(T5_DIM + 1, INT_DIM, C))
    with pytest.raises(ValueError, match=f"out_dim = 48 channels but the CLIP embeddings have {C}"):
        longsd_encoder(clip, t5, LongSDAdapter(T5_DIM, INT_DIM, 48))
    with pytest.raises(TypeError, match="t5_adapter must be a LongSDAdapter"):
        longsd_encoder(clip, t5, nn.Linear(T5_DIM, C))
    with pytest.raises(ValueError, match="in_dim = 24 channels"):
        adapter(torch.zeros(1, 3, 25))
    # SD XL has no T5 path.
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer, hidden=C)).eval()
    with pytest.raises(ValueError, match="single-CLIP pipelines .* SD XL"):
        LongPromptEncoder(tokenizer, text_encoder, tokenizer, text_encoder_2,
                          t5_tokenizer=t5[0], t5_encoder=t5[1], t5_adapter=adapter)
    # The adapter must also match the pipeline UNet's cross-attention width.
    pipe = tiny_sd_pipeline(tmp_path, unet=make_unet("sd15"))
    pipe.unet.register_to_config(cross_attention_dim=48)
    with pytest.raises(ValueError, match="the pipeline's UNet has cross_attention_dim = 48"):
        LongPromptEncoder.from_pipeline(pipe, t5_tokenizer=t5[0], t5_encoder=t5[1], t5_adapter=adapter)


# ---------------------------------------------------------------------------------------------
# The adapter's official weights.


def test_adapter_official_weights_round_trip(adapter, tmp_path):
    """LaVi-Bridge's t5_unet/adapter (.bin) and LongSD's s28750_adapter (.safetensors) folders,
    a bare state dict, and our own save_pretrained all load to the same function."""
    sd = {k: v.clone() for k, v in adapter.state_dict().items()}
    config = {"_class_name": "TextAdapter", "_diffusers_version": "0.28.0",
              "in_dim": T5_DIM, "int_dim": INT_DIM, "out_dim": C}
    lavi, longsd, ours = tmp_path / "lavi", tmp_path / "s28750_adapter", tmp_path / "ours"
    for folder in (lavi, longsd):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
    torch.save(sd, lavi / "diffusion_pytorch_model.bin")
    save_file(sd, longsd / "diffusion_pytorch_model.safetensors")
    torch.save(sd, tmp_path / "adapter.pt")
    adapter.save_pretrained(ours)
    x = torch.randn(2, 7, T5_DIM, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = official_text_adapter(sd, x)
        for path in (lavi, longsd, tmp_path / "adapter.pt", ours):
            loaded = LongSDAdapter.from_pretrained(path)
            assert not loaded.training
            assert (loaded.config.in_dim, loaded.config.int_dim, loaded.config.out_dim) == (T5_DIM, INT_DIM, C)
            torch.testing.assert_close(loaded(x), expected)
        half = LongSDAdapter.from_pretrained(tmp_path / "adapter.pt", torch_dtype=torch.bfloat16)
        assert half.dtype == torch.bfloat16
    # Official names, strictly: a missing or an extra tensor is an error.
    torch.save({k: v for k, v in sd.items() if k != "ff2.net.2.bias"}, tmp_path / "missing.pt")
    with pytest.raises(RuntimeError, match="ff2.net.2.bias"):
        LongSDAdapter.from_pretrained(tmp_path / "missing.pt")
    torch.save({**sd, "ff1.net.3.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(RuntimeError, match="ff1.net.3.weight"):
        LongSDAdapter.from_pretrained(tmp_path / "extra.pt")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an adapter state dict"):
        LongSDAdapter.from_pretrained(tmp_path / "other.pt")


# ---------------------------------------------------------------------------------------------
# The released UNet LoRA format.


def test_lora_matches_the_official_merge(tmp_path):
    """Two official files (alignment, then reward stage), merged as sample.py does."""
    unet, reference = make_unet("sd15"), make_unet("sd15")
    files = []
    for seed in (1, 2):
        factors = official_lora_file(reference, rank=4, seed=seed)
        torch.save(factors, tmp_path / f"lora_{seed}.pt")
        files.append(factors)
        with torch.no_grad():
            for module, weight in official_lora_collapse(reference, factors):
                module.weight.copy_(weight)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    load_longsd_lora(unet, tmp_path / "lora_1.pt", str(tmp_path / "lora_2.pt"))
    after, expected = unet.state_dict(), reference.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(files[0]) // 2  # every LoRA layer's weight, nothing else
    for key in before:
        torch.testing.assert_close(after[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)


def test_lora_with_linfusion_mounted(tmp_path):
    """Loaded after mounting, the attn1 deltas go to LinFusion's projections; the kernel MLPs are
    not LoRA layers; the rest is the plain merge."""
    plain, unet = make_unet("sd15"), make_unet("sd15")
    linfusion = make_linfusion(unet)
    linfusion.mount_to(unet=unet)
    factors = official_lora_file(plain, rank=4, seed=3)
    mounted_before = {k: v.clone() for k, v in unet.state_dict().items()}
    load_longsd_lora(plain, factors)
    load_longsd_lora(unet, factors)
    plain_before = make_unet("sd15").state_dict()
    mounted_after, plain_after = unet.state_dict(), plain.state_dict()
    for key, value in mounted_after.items():
        delta = plain_after[key] - plain_before[key] if key in plain_after else torch.zeros_like(value)
        if "to_q_" in key or "to_k_" in key:
            assert torch.equal(value, mounted_before[key]), key
        torch.testing.assert_close(value - mounted_before[key], delta, rtol=1e-5, atol=1e-6, msg=key)
    assert any("attn1.to_q" in k and not torch.equal(mounted_after[k], mounted_before[k]) for k in mounted_after)
    # The merged attn1 weights are LinFusion's own (mounted modules are shared).
    first = next(iter(linfusion.modules_dict.values()))
    assert any(first.to_q.weight is p for p in unet.parameters())


def test_lora_under_a_peft_adapter():
    """A layer already wrapped by PEFT gets the delta in its base weight."""
    from linfusion_ops.longalign.lora import add_longalign_lora

    plain, wrapped = make_unet("sd15"), make_unet("sd15")
    factors = official_lora_file(plain, rank=4, seed=7)
    add_longalign_lora(wrapped, rank=2)
    load_longsd_lora(plain, factors)
    load_longsd_lora(wrapped, factors)
    base = {k.replace(".base_layer", ""): v for k, v in wrapped.state_dict().items() if "lora_" not in k}
    assert base.keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(base[key], value, rtol=0, atol=0, msg=key)


def test_lora_merge_agrees_with_the_peft_adapter():
    """A PEFT adapter in LongAlign's layout, written as an official list by
    lora.lora_to_longalign_list and merged here, gives the adapted UNet's output."""
    from linfusion_ops.longalign.lora import add_longalign_lora, lora_to_longalign_list
    from tests.helpers.tiny_models import unet_inputs

    adapted, merged = make_unet("sd15"), make_unet("sd15")
    add_longalign_lora(adapted, rank=4)
    torch.manual_seed(8)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    load_longsd_lora(merged, lora_to_longalign_list(adapted, dtype=None))
    inputs = unet_inputs("sd15")
    with torch.no_grad():
        expected, out, base = (unet(**inputs).sample for unet in (adapted, merged, make_unet("sd15")))
    assert not torch.allclose(expected, base, atol=1e-3)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_lora_errors(tmp_path):
    unet = make_unet("sd15")
    factors = official_lora_file(unet, rank=4, seed=4)
    with pytest.raises(ValueError, match=f"holds {len(factors) - 2} tensors, the UNet has {len(factors) // 2}"):
        load_longsd_lora(unet, factors[:-2])
    wrong = list(factors)
    wrong[0] = torch.zeros(wrong[0].shape[0] + 1, 4)
    first_layer = r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q"
    with pytest.raises(ValueError, match=f"does not fit {first_layer}"):
        load_longsd_lora(unet, factors, wrong)
    torch.save({"a": torch.zeros(1)}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="must hold a list of tensors"):
        load_longsd_lora(unet, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="at least one"):
        load_longsd_lora(unet)
    # Nothing was merged by the failed calls.
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), make_unet("sd15").state_dict().values()))


# ---------------------------------------------------------------------------------------------
# End to end: a diffusers pipeline with LinFusion mounted, conditioned on 480 tokens.


def test_stable_diffusion_pipeline_with_linfusion_end_to_end(t5, tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    lora = official_lora_file(pipe.unet, rank=4, seed=6)
    make_linfusion(pipe.unet).mount_to(unet=pipe.unet)
    load_longsd_lora(pipe.unet, lora)
    adapter = random_adapter(dims=(T5_DIM, INT_DIM, SD15_UNET["cross_attention_dim"]))
    encoder = LongPromptEncoder.from_pipeline(pipe, t5_tokenizer=t5[0], t5_encoder=t5[1], t5_adapter=adapter)

    seen, attn2 = [], [m for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
    for module in attn2:
        module.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(kwargs["encoder_hidden_states"]), with_kwargs=True)
    attn1 = [m for n, m in pipe.unet.named_modules() if n.endswith("attn1")]
    assert attn1 and all(isinstance(m.processor, LinFusionAttnProcessor) for m in attn1)

    prompts = ["a red cat sits on the mat. the old house near the river. " * 8, "a dog."]
    embeds = encoder(prompts, ["blurry", ""])
    images = pipe(**embeds, num_inference_steps=2, guidance_scale=5.0, height=16, width=16, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and bool((images >= 0).all() & (images <= 1).all())
    # Classifier-free guidance batches [negative, positive]: every cross-attention layer of
    # every step attends over the 480-token sequences.
    expected = torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]])
    assert expected.shape == (4, 2 * TOKENS, SD15_UNET["cross_attention_dim"])
    assert len(seen) == 2 * len(attn2) and all(torch.equal(s, expected) for s in seen)
