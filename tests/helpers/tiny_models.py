"""Tiny random Stable Diffusion components for offline tests: UNets shaped like SD 1.5, SD 2.1
and SD XL, a tiny VAE, a character-level CLIP tokenizer written to disk, tiny CLIP text encoders
and whole tiny pipelines. Shared by every test file that needs a diffusers model (import with
`from tests.helpers.tiny_models import ...`); nothing here downloads anything."""

import json
import string

import torch
from torch import nn

from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers import UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from linfusion_ops import LinFusion

# SD 1.5 shape: 8 heads everywhere (diffusers' attention_head_dim=8 means 8 heads for SD 1.5),
# attention on every level. Head dims 4 and 8 here (40, 80, 160 in the real model).
SD15_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
# SD 2.1 shape: heads growing with the width at a fixed head dim (64 in the real model, 16
# here), linear projections in the transformer blocks, upcast attention.
SD21_UNET = dict(
    SD15_UNET,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    upcast_attention=True,
)
# SD XL shape: no attention on the first level, 10 and 20 heads, two transformer layers on the
# last level, text_time conditioning (pooled text embedding 16 + 6 time ids of 8 channels).
XL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(16, 40, 80),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 1, 2),
    norm_num_groups=8,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
)
XL_MID_DIM_SCALE = 16  # LinFusion-XL: projection_mid_dim = dim_n // 16


def make_unet(kind, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = {"sd15": SD15_UNET, "sd21": SD21_UNET, "xl": XL_UNET}[kind]
    return UNet2DConditionModel(**config).to(dtype).eval()


def unet_inputs(kind, dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    args = dict(
        sample=torch.randn(2, 4, 8, 8, generator=g, dtype=dtype),
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=torch.randn(2, 7, 32, generator=g, dtype=dtype),
    )
    if kind == "xl":
        args["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(2, 16, generator=g, dtype=dtype),
            time_ids=torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2, dtype=dtype),
        )
    return {k: _to(v, device) for k, v in args.items()}


def _to(value, device):
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return value.to(device)


def make_linfusion(unet, mid=None, seed=2):
    """A LinFusion for `unet` with random weights everywhere (LayerNorm affine included), so that
    every parameter matters. mid: None, an int, -1, or "xl" (dim // 16)."""
    config = LinFusion.get_default_config(
        unet=unet, mid_dim_scale=XL_MID_DIM_SCALE if mid == "xl" else None
    )
    if mid not in (None, "xl"):
        for entry in config["modules_list"]:
            entry["projection_mid_dim"] = mid
    torch.manual_seed(seed)
    linfusion = LinFusion(**config).to(device=unet.device, dtype=unet.dtype)
    with torch.no_grad():
        for m in linfusion.modules():
            if isinstance(m, nn.LayerNorm):  # default ones / zeros
                m.weight.add_(0.2 * torch.randn_like(m.weight))
                m.bias.add_(0.2 * torch.randn_like(m.bias))
    return linfusion


def write_tokenizer(folder):
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for ch in string.ascii_lowercase:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=16)


def text_config(hidden_size, **kwargs):
    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=64,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **kwargs,
    )


def tiny_vae():
    torch.manual_seed(8)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )


def euler_scheduler():
    """Euler with steps_offset=1, as in the released SD scheduler configs (diffusers warns about
    the class default 0); with the default "linspace" spacing the timesteps are the same."""
    return EulerDiscreteScheduler(steps_offset=1)


def tiny_sd_pipeline(tok_dir, unet=None):
    torch.manual_seed(9)
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(text_config(32)),
        tokenizer=write_tokenizer(tok_dir),
        unet=unet if unet is not None else make_unet("sd15"),
        scheduler=euler_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(tok_dir, unet=None):
    """SD XL concatenates both encoders' states: 16 + 16 = the XL UNet's cross_attention_dim."""
    torch.manual_seed(9)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(text_config(16)),
        text_encoder_2=CLIPTextModelWithProjection(text_config(16, projection_dim=16)),
        tokenizer=write_tokenizer(tok_dir / "t1"),
        tokenizer_2=write_tokenizer(tok_dir / "t2"),
        unet=unet if unet is not None else make_unet("xl"),
        scheduler=euler_scheduler(),
    )


def tiny_clip_model(seed=10, image_size=16):
    """A tiny random CLIPModel (the class of the preference models Denscore, PickScore and HPS)
    whose text tower reads `write_tokenizer`'s ids, with 16-channel projections."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
        image_size=image_size, patch_size=4,
    )
    config = CLIPConfig(text_config=text_config(32).to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    return CLIPModel(config).eval()


def write_t5_tokenizer(folder, words=()):
    """A T5 tokenizer written to `folder` and loaded back as users load T5's: a Unigram model
    with T5's special ids (<pad> 0, </s> 1, <unk> 2, no sentinels), every lowercase letter and
    common punctuation mark (so most text tokenizes), and a cheap "▁word" piece per `words`."""
    from transformers import AutoTokenizer, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(c, -6.0) for c in string.ascii_lowercase + ".,!?;"]
    vocab += [("▁" + c, -6.5) for c in string.ascii_lowercase]
    vocab += [("▁" + w, -2.0) for w in dict.fromkeys(words) if len(w) > 1]
    T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def tiny_t5_encoder(vocab_size, d_model=24, seed=11):
    """A 2-layer random T5EncoderModel (relative positions: any sequence length)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=40, num_layers=2, num_heads=3,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def write_captioned_images(folder, sizes=((24, 20), (20, 28), (16, 16), (30, 18)), captions="txt", seed=0):
    """Random RGB images of the given (width, height) sizes in `folder`, captioned in a .txt file
    beside each image (captions="txt") or in a metadata.jsonl (captions="jsonl", the layout that
    datasets' imagefolder reads). Returns [(file name, caption)]."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    written = []
    for i, (width, height) in enumerate(sizes):
        pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
        name = f"img{i}.png"
        Image.fromarray(pixels.numpy()).save(folder / name)
        caption = " ".join(string.ascii_lowercase[(i + j) % 26] * 2 for j in range(3))
        if captions == "txt":
            (folder / f"img{i}.txt").write_text(caption)
        written.append((name, caption))
    if captions == "jsonl":
        lines = [json.dumps({"file_name": name, "text": caption}) for name, caption in written]
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return written
def tiny_controlnet(unet, seed=11):
    """A ControlNet built from an unmounted `unet` (SD or XL) for tiny_vae's 2x latents, with its
    zero-initialised convolutions randomised so that the control image changes the UNet's output."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():
        zero_convs = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block]
        for conv in [*controlnet.controlnet_down_blocks, *zero_convs]:
            conv.weight.normal_(0, 0.1)
    return controlnet.to(device=unet.device, dtype=unet.dtype).eval()


def load_tiny_ip_adapter(unet, clip_dim=12, seed=7):
    """Loads a random IP-Adapter (4 image tokens from a clip_dim image embedding) into `unet`;
    pipelines then take ip_adapter_image_embeds=[(B or 2B with CFG, 1, clip_dim) tensor]."""
    cross = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(seed)
    ip, key_id = {}, 1  # diffusers numbers the weights 1, 3, 5, ... over the cross-attention modules
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name[: -len(".processor")]).to_q.out_features
            ip[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.1
            ip[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.1
            key_id += 2
    state = {
        "image_proj": {
            "proj.weight": torch.randn(4 * cross, clip_dim, generator=g) * 0.1,
            "proj.bias": torch.zeros(4 * cross),
            "norm.weight": torch.ones(cross),
            "norm.bias": torch.zeros(cross),
        },
        "ip_adapter": ip,
    }
    unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    return unet


def tiny_deep_vae(seed=12, mid_block_add_attention=True):
    """A 3-level AutoencoderKL (downsampling factor 4, two resnets per level as in the real SD and
    XL VAEs, SD-XL's scaling factor) with random GroupNorm affines, so that every normalisation's
    statistics matter."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=2,
        scaling_factor=0.13025,
        mid_block_add_attention=mid_block_add_attention,
    ).eval()
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
                m.bias.add_(0.3 * torch.randn_like(m.bias))
    return vae


# A tiny CLIP text side: a byte-level BPE vocabulary that spells WORDS and a 2-layer config.
CLIP_MAX_LENGTH = 77
WORDS = (
    "a the cat dog red blue green sits on mat under tree in garden with and of is big small "
    "old house near river light sky cloud window painting soft warm morning"
).split()


def write_clip_vocab(directory):
    """Writes vocab.json and merges.txt of a tiny byte-level BPE CLIP vocabulary into directory
    (a Path): every byte alone and word-final, so any text, non-ASCII included, tokenizes, and
    merges that spell WORDS; the end token has the largest id, as in CLIP."""
    chars = sorted(ByteLevel.alphabet())
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merge = f"{symbols[0]} {symbols[1]}"
            if merge not in merges:
                merges.append(merge)
                vocab.append(symbols[0] + symbols[1])
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    # The end token has the largest id, as in CLIP (SD XL's pooling relies on it).
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(vocab))}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def clip_text_config(tokenizer, hidden=32):
    """A 2-layer CLIPTextConfig for a tokenizer of write_clip_vocab (77 positions)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def random_sentences(rng, count, low=3, high=14, end="."):
    """count sentences of low..high words of WORDS drawn with rng (a random.Random), each ended
    by end, joined by spaces."""
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) + end for _ in range(count))


class NoisePipeline:
    """A stand-in text-to-image pipeline for the evaluation tests (no model): image i of a call is
    uint8 noise drawn from the call's i-th generator, so a sample depends on its seed only. On call
    number ``die_at`` (1-based) it raises KeyboardInterrupt, as a stopped run; on ``hang_at`` it
    sleeps until its process is killed."""

    def __init__(self, die_at=None, hang_at=None):
        self.calls, self.die_at, self.hang_at = 0, die_at, hang_at

    def __call__(self, prompt, generator, height, width, **kwargs):
        import time
        from types import SimpleNamespace

        from PIL import Image

        self.calls += 1
        if self.calls == self.die_at:
            raise KeyboardInterrupt
        while self.calls == self.hang_at:
            time.sleep(1)
        images = [
            Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())
            for g in generator
        ]
        return SimpleNamespace(images=images)
