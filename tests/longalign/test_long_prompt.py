"""LongPromptEncoder: LongAlign's segment-level text encoding, offline with a tiny CLIP.

The oracles below encode one prompt at a time with plain Python (loops, boolean indexing,
torch.cat), the way LongAlign's published code does, independently of the encoder's batching."""

import random
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from transformers import (  # noqa: E402
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from linfusion_ops import LongPromptEncoder  # noqa: E402
from linfusion_ops.longalign.long_prompt import split_sentences  # noqa: E402
from tests.helpers.official import published_longalign  # noqa: E402
from tests.helpers.tiny_models import WORDS, clip_text_config, random_sentences, write_clip_vocab  # noqa: E402

L = 77
# ---------------------------------------------------------------------------------------------
# A tiny CLIP: a byte-level BPE vocabulary (every byte alone and word-final, so any text,
# non-ASCII included, tokenizes) with merges that spell WORDS, and 2-layer random encoders.


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip_tokenizer")
    write_clip_vocab(directory)
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=L)
    # SD 2.1's tokenizer and SD XL's tokenizer_2 pad with "!" instead of the end token.
    tokenizer_2 = CLIPTokenizer.from_pretrained(directory, model_max_length=L, pad_token="!")
    assert tokenizer.eos_token_id == len(tokenizer) - 1 and tokenizer_2.pad_token_id != tokenizer_2.eos_token_id
    return tokenizer, tokenizer_2


@pytest.fixture(scope="module")
def encoders(tokenizers):
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(clip_text_config(tokenizers[0])).eval()
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizers[1])).eval()
    return text_encoder, text_encoder_2


RNG = random.Random(0)
LONG_1000_WORDS = " ".join(
    " ".join(RNG.choice(WORDS) for _ in range(n)) + RNG.choice([".", "!", "?", ";", "\n", ","])
    for n in [RNG.randint(4, 20) for _ in range(80)] + [90, 120]
)
NO_PUNCTUATION = " ".join(RNG.choice(WORDS) for _ in range(170))
NON_ASCII = "Ein Hund läuft über die Brücke. 一只猫坐在垫子上！ Кошка спит; café crème.\nÉtoile ✨"

PROMPTS = [
    LONG_1000_WORDS,
    "",
    NO_PUNCTUATION,
    NON_ASCII,
    "a red cat.",
    random_sentences(RNG, 9) + " Wait... then? the end",
]


# ---------------------------------------------------------------------------------------------
# Oracles: one prompt at a time.


def oracle_sentences(text):
    # Split after a delimiter that is not followed by another delimiter.
    return [s.strip() for s in re.split(r"(?<=[.!?;\n])(?![.!?;\n])", text) if s.strip()]


def oracle_pieces(tokenizer, text):
    """Each sentence's content token ids, cut into pieces of at most L - 2 tokens."""
    pieces = []
    for sentence in oracle_sentences(text):
        ids = tokenizer(sentence, add_special_tokens=False, verbose=False).input_ids
        pieces += [ids[i:i + L - 2] for i in range(0, len(ids), L - 2)]
    return pieces


def oracle_pack(pieces):
    chunks = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + len(piece) <= L - 2:
            chunks[-1] = chunks[-1] + piece
        else:
            chunks.append(piece)
    return chunks


def oracle_input_ids(tokenizer, segments):
    rows = [[tokenizer.bos_token_id] + s + [tokenizer.eos_token_id] for s in segments]
    return tokenizer.pad({"input_ids": rows}, padding="max_length", max_length=L, return_tensors="pt").input_ids


def oracle_hidden(text_encoders, tokenizers, segments):
    """SD: the last hidden state; SD XL: penultimate hidden states on channels + pooled."""
    if len(text_encoders) == 1:
        return text_encoders[0](oracle_input_ids(tokenizers[0], segments))[0], None
    hidden = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        out = text_encoder(oracle_input_ids(tokenizer, segments), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), out.text_embeds


def oracle_encode(prompts, tokenizers, text_encoders, max_tokens, policy):
    empty, _ = oracle_hidden(text_encoders, tokenizers, [[]])
    pad = empty[0, -60:].mean(dim=0) if policy == "longalign" else empty[0, 1]
    merged, pooled = [], []
    for prompt in prompts:
        segments = oracle_pieces(tokenizers[0], prompt)
        if policy == "chunks":
            segments = oracle_pack(segments)
        segments = segments or [[]]
        hidden, text_embeds = oracle_hidden(text_encoders, tokenizers, segments)
        keep = torch.zeros(hidden.shape[:2], dtype=torch.bool)
        for i, segment in enumerate(segments):
            keep[i, : len(segment) + (2 if policy == "chunks" else 1)] = True
        tokens = hidden[keep][:max_tokens]
        merged.append(torch.cat([tokens, pad.expand(max_tokens - len(tokens), -1)]))
        if text_embeds is not None:
            pooled.append(text_embeds[0])
    return torch.stack(merged), (torch.stack(pooled) if pooled else None)


@pytest.fixture
def count_calls():
    """Counts forward calls and records the batch size of each, per module."""
    handles, calls = [], {}

    def attach(*modules):
        for module in modules:
            calls[module] = []
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, kwargs: calls[mod].append(
                    (args[0] if args else kwargs["input_ids"]).shape[0]), with_kwargs=True))
        return calls

    yield attach
    for handle in handles:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# Segmentation.


def test_split_sentences():
    assert split_sentences("") == []
    assert split_sentences("  \n ") == []
    assert split_sentences("A cat. A dog! Why? Yes; no\nnew line") == [
        "A cat.", "A dog!", "Why?", "Yes;", "no", "new line"]
    assert split_sentences("Wait... then?! end") == ["Wait...", "then?!", "end"]
    assert split_sentences("no punctuation at all") == ["no punctuation at all"]
    for prompt in PROMPTS:
        assert split_sentences(prompt) == oracle_sentences(prompt)


def test_long_sentence_is_split_not_cut(tokenizers, encoders):
    (tokenizer, _), (text_encoder, _) = tokenizers, encoders
    n = len(tokenizer(NO_PUNCTUATION, add_special_tokens=False, verbose=False).input_ids)
    pieces = -(-n // (L - 2))
    assert n > 2 * (L - 2)
    encoder = LongPromptEncoder(tokenizer, text_encoder, max_tokens=n + 2 * pieces + 5)
    merged = encoder(NO_PUNCTUATION)["prompt_embeds"][0]
    pad = encoder("")["prompt_embeds"][0, -1]
    # Every token and each piece's start token is kept: the pad starts right after them.
    filled = n + pieces
    assert not torch.equal(merged[filled - 1], pad)
    assert torch.equal(merged[filled:], pad.expand(merged.shape[0] - filled, -1))


# ---------------------------------------------------------------------------------------------
# Policies against the per-prompt oracle.


@pytest.mark.parametrize("policy", ["longalign", "chunks"])
@pytest.mark.parametrize("max_tokens", [240, 1500])
def test_policy_matches_per_prompt_oracle(tokenizers, encoders, policy, max_tokens):
    tokenizer, text_encoder = tokenizers[0], encoders[0]
    negatives = [PROMPTS[(i + 2) % len(PROMPTS)] for i in range(len(PROMPTS))]
    encoder = LongPromptEncoder(tokenizer, text_encoder, max_tokens=max_tokens, policy=policy)
    out = encoder(PROMPTS, negatives)
    assert set(out) == {"prompt_embeds", "negative_prompt_embeds"}
    with torch.no_grad():
        expected, _ = oracle_encode(PROMPTS, [tokenizer], [text_encoder], max_tokens, policy)
        expected_negative, _ = oracle_encode(negatives, [tokenizer], [text_encoder], max_tokens, policy)
    torch.testing.assert_close(out["prompt_embeds"], expected)
    torch.testing.assert_close(out["negative_prompt_embeds"], expected_negative)


@pytest.mark.parametrize("policy", ["longalign", "chunks"])
def test_pad_token_other_than_end_token(tokenizers, encoders, policy):
    """SD 2.1's tokenizer pads with "!": the keep mask is positional, so a "!" in the text is
    kept and the pad positions are not."""
    tokenizer, text_encoder = tokenizers[1], encoders[0]
    prompts = ["Wow! a red cat!! the big dog.", NON_ASCII]
    out = LongPromptEncoder(tokenizer, text_encoder, max_tokens=60, policy=policy)(prompts, "!")
    with torch.no_grad():
        expected, _ = oracle_encode(prompts, [tokenizer], [text_encoder], 60, policy)
        expected_negative, _ = oracle_encode(["!"], [tokenizer], [text_encoder], 60, policy)
    torch.testing.assert_close(out["prompt_embeds"], expected)
    torch.testing.assert_close(out["negative_prompt_embeds"], expected_negative.expand(2, -1, -1))


def test_longalign_is_the_published_encoding(tokenizers, encoders):
    """For prompts whose sentences end in '.' (and fit in 75 tokens), the policy reproduces
    LongAlign's published encoding."""
    tokenizer, text_encoder = tokenizers[0], encoders[0]
    rng = random.Random(1)
    captions = [random_sentences(rng, n) for n in (1, 3, 12, 40)] + [""]
    out = LongPromptEncoder(tokenizer, text_encoder, max_tokens=240)(captions)
    with torch.no_grad():
        expected = published_longalign(captions, tokenizer, text_encoder, 240)
    torch.testing.assert_close(out["prompt_embeds"], expected)


def test_empty_prompt(tokenizers, encoders):
    tokenizer, text_encoder = tokenizers[0], encoders[0]
    with torch.no_grad():
        empty = text_encoder(oracle_input_ids(tokenizer, [[]]))[0][0]
    longalign = LongPromptEncoder(tokenizer, text_encoder, max_tokens=10)("")["prompt_embeds"][0]
    torch.testing.assert_close(longalign[0], empty[0])  # only the start token is kept
    torch.testing.assert_close(longalign[1:], empty[-60:].mean(0).expand(9, -1))
    chunks = LongPromptEncoder(tokenizer, text_encoder, max_tokens=10, policy="chunks")("")["prompt_embeds"][0]
    torch.testing.assert_close(chunks[:2], empty[:2])  # start and end tokens
    torch.testing.assert_close(chunks[2:], empty[1].expand(8, -1))


def test_negative_longer_than_positive(tokenizers, encoders):
    tokenizer, text_encoder = tokenizers[0], encoders[0]
    assert len(LONG_1000_WORDS.split()) >= 1000
    encoder = LongPromptEncoder(tokenizer, text_encoder, max_tokens=300)
    out = encoder(["a red cat.", "blue sky"], negative_prompt=LONG_1000_WORDS)
    assert out["prompt_embeds"].shape == out["negative_prompt_embeds"].shape == (2, 300, 32)
    with torch.no_grad():
        expected, _ = oracle_encode([LONG_1000_WORDS], [tokenizer], [text_encoder], 300, "longalign")
    torch.testing.assert_close(out["negative_prompt_embeds"], expected.expand(2, -1, -1))


def test_default_negative_is_the_empty_prompt(tokenizers, encoders):
    encoder = LongPromptEncoder(tokenizers[0], encoders[0], max_tokens=50)
    out = encoder(["a red cat.", "a dog"])
    torch.testing.assert_close(out["negative_prompt_embeds"], encoder("")["prompt_embeds"].expand(2, -1, -1))


@pytest.mark.parametrize("sdxl", [False, True])
def test_one_batched_call_per_encoder(tokenizers, encoders, count_calls, sdxl):
    """All segments of all prompts and negatives, plus the empty prompt, in one call each."""
    if sdxl:
        encoder = LongPromptEncoder(tokenizers[0], encoders[0], tokenizers[1], encoders[1])
    else:
        encoder = LongPromptEncoder(tokenizers[0], encoders[0])
    calls = count_calls(*encoder.text_encoders)
    prompts, negatives = PROMPTS[:4], PROMPTS[2:6]
    encoder(prompts, negatives)
    segments = sum(max(1, len(oracle_pieces(tokenizers[0], p))) for p in prompts + negatives)
    assert all(batches == [segments + 1] for batches in calls.values()), calls


# ---------------------------------------------------------------------------------------------
# SD XL.


@pytest.mark.parametrize("policy", ["longalign", "chunks"])
def test_sdxl_matches_per_prompt_oracle(tokenizers, encoders, policy):
    prompts = [LONG_1000_WORDS, NON_ASCII, "", "a red cat. a blue dog sits on the mat."]
    negatives = ["", "small", NO_PUNCTUATION, "a"]
    encoder = LongPromptEncoder(tokenizers[0], encoders[0], tokenizers[1], encoders[1], policy=policy)
    out = encoder(prompts, negatives)
    assert out["prompt_embeds"].shape == (4, 240, 64)
    assert out["pooled_prompt_embeds"].shape == out["negative_pooled_prompt_embeds"].shape == (4, 32)
    with torch.no_grad():
        expected, pooled = oracle_encode(prompts, tokenizers, encoders, 240, policy)
        expected_negative, pooled_negative = oracle_encode(negatives, tokenizers, encoders, 240, policy)
    torch.testing.assert_close(out["prompt_embeds"], expected)
    torch.testing.assert_close(out["negative_prompt_embeds"], expected_negative)
    torch.testing.assert_close(out["pooled_prompt_embeds"], pooled)
    torch.testing.assert_close(out["negative_pooled_prompt_embeds"], pooled_negative)


def test_sdxl_pooled_is_the_first_segments(tokenizers, encoders):
    """A multi-sentence prompt's pooled vector is its first segment's: SD XL's own pooled
    output for the first sentence alone."""
    encoder = LongPromptEncoder(tokenizers[0], encoders[0], tokenizers[1], encoders[1])
    long = encoder("a red cat sits on the mat. the old house near the river!")["pooled_prompt_embeds"]
    first = encoder("a red cat sits on the mat.")["pooled_prompt_embeds"]
    with torch.no_grad():
        ids = tokenizers[1]("a red cat sits on the mat.", padding="max_length", max_length=L,
                            return_tensors="pt").input_ids
        sdxl = encoders[1](ids).text_embeds
    torch.testing.assert_close(long, first)
    torch.testing.assert_close(long, sdxl)


def test_force_zeros_for_empty_prompt(tokenizers, encoders, count_calls):
    encoder = LongPromptEncoder(tokenizers[0], encoders[0], tokenizers[1], encoders[1],
                                force_zeros_for_empty_prompt=True)
    calls = count_calls(*encoder.text_encoders)
    out = encoder(["a red cat.", "a dog"])
    assert all(batches == [3] for batches in calls.values()), "negatives are not encoded"
    assert torch.count_nonzero(out["negative_prompt_embeds"]) == 0
    assert torch.count_nonzero(out["negative_pooled_prompt_embeds"]) == 0
    assert out["negative_prompt_embeds"].shape == out["prompt_embeds"].shape
    # An explicit negative prompt, "" included, is encoded.
    assert torch.count_nonzero(encoder("a cat", "")["negative_prompt_embeds"]) > 0


def test_misaligned_tokenizers_are_rejected(tokenizers, encoders, tmp_path):
    # Without merges every character is its own token: same vocabulary, other token counts.
    write_clip_vocab(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    other = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=L)
    encoder = LongPromptEncoder(tokenizers[0], encoders[0], other, encoders[1])
    with pytest.raises(ValueError, match="different numbers of tokens"):
        encoder("a red cat")


# ---------------------------------------------------------------------------------------------
# dtype, device, autograd, errors.


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_follows_the_encoder_dtype(tokenizers, encoders, dtype):
    text_encoder = CLIPTextModel(encoders[0].config).to(dtype).eval()
    text_encoder.load_state_dict(encoders[0].state_dict())
    out = LongPromptEncoder(tokenizers[0], text_encoder)(NON_ASCII, "a dog")
    assert out["prompt_embeds"].dtype == out["negative_prompt_embeds"].dtype == dtype
    assert out["prompt_embeds"].device == text_encoder.device
    with torch.no_grad():
        expected, _ = oracle_encode([NON_ASCII], [tokenizers[0]], [text_encoder], 240, "longalign")
    torch.testing.assert_close(out["prompt_embeds"], expected)


def test_no_grad_by_default_and_grad_on_request(tokenizers, encoders):
    tokenizer, text_encoder = tokenizers[0], encoders[0]
    out = LongPromptEncoder(tokenizer, text_encoder)("a red cat. a dog.")
    assert not out["prompt_embeds"].requires_grad
    out = LongPromptEncoder(tokenizer, text_encoder, max_tokens=20, requires_grad=True)("a red cat. a dog.")
    (out["prompt_embeds"].square().sum() + out["negative_prompt_embeds"].sum()).backward()
    grad = text_encoder.get_input_embeddings().weight.grad
    text_encoder.zero_grad(set_to_none=True)
    assert grad is not None and torch.count_nonzero(grad) > 0


def test_errors(tokenizers, encoders):
    tokenizer, text_encoder = tokenizers[0], encoders[0]
    with pytest.raises(ValueError, match="policy must be one of"):
        LongPromptEncoder(tokenizer, text_encoder, policy="truncate")
    with pytest.raises(ValueError, match="max_tokens"):
        LongPromptEncoder(tokenizer, text_encoder, max_tokens=0)
    with pytest.raises(ValueError, match="tokenizer_2 and text_encoder_2 together"):
        LongPromptEncoder(tokenizer, text_encoder, tokenizers[1])
    with pytest.raises(ValueError, match="model_max_length"):
        LongPromptEncoder(CLIPTokenizer.from_pretrained(tokenizer.name_or_path), text_encoder)
    encoder = LongPromptEncoder(tokenizer, text_encoder)
    with pytest.raises(TypeError, match="prompt must be a str or a list of str"):
        encoder(3)
    with pytest.raises(ValueError, match="prompt is an empty list"):
        encoder([])
    with pytest.raises(ValueError, match="negative_prompt has 1 entries, prompt has 2"):
        encoder(["a", "b"], ["c"])


def test_import_does_not_load_transformers_or_diffusers():
    code = (
        "import sys, warnings; warnings.simplefilter('ignore'); import linfusion_ops; "
        "assert not {'transformers', 'diffusers'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# Tiny pipelines end to end.


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         steps_offset=1)


def _capture_cross_attention(unet):
    """Records the encoder_hidden_states every cross-attention layer receives."""
    seen = []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            module.register_forward_pre_hook(
                lambda mod, args, kwargs: seen.append(kwargs["encoder_hidden_states"]), with_kwargs=True)
    return seen


def _run_and_check(pipe, encoder, prompts, negative, **kwargs):
    seen = _capture_cross_attention(pipe.unet)
    embeds = encoder(prompts, negative)
    images = pipe(**embeds, num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
                  output_type="np", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert images.shape == (len(prompts), 32, 32, 3) and bool((images >= 0).all() & (images <= 1).all())
    # Classifier-free guidance batches [negative, positive]: every cross-attention layer of
    # every step attends over exactly the returned sequences.
    expected = torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]])
    assert seen and all(torch.equal(s, expected) for s in seen)


def test_stable_diffusion_pipeline_end_to_end(tokenizers, encoders):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=2,
    )
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet,
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    encoder = LongPromptEncoder.from_pipeline(pipe, max_tokens=200)
    assert not encoder.is_sdxl and not encoder.force_zeros_for_empty_prompt
    _run_and_check(pipe, encoder, [LONG_1000_WORDS, "a red cat."], ["blurry", NO_PUNCTUATION])


def test_stable_diffusion_xl_pipeline_end_to_end(tokenizers, encoders):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64, norm_num_groups=2,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unet, scheduler=_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    encoder = LongPromptEncoder.from_pipeline(pipe, policy="chunks")
    assert encoder.is_sdxl and encoder.force_zeros_for_empty_prompt  # SD XL's default config
    _run_and_check(pipe, encoder, [NON_ASCII, LONG_1000_WORDS], None)
