"""Ports of the official LongAlign code (luping-liu/LongAlign) that tests compare against."""

import re

import torch

from tests.helpers.tiny_models import CLIP_MAX_LENGTH


def published_longalign(captions, tokenizer, text_encoder, token_length):
    """LongAlign's published caption2embed: split on '.' and '?', re-end each sentence with '.',
    tokenize (truncating at 77, padding to the longest), drop end and pad tokens by id, truncate,
    pad with the mean of the last 60 outputs of the empty prompt padded to 77."""
    empty_ids = tokenizer([""], max_length=CLIP_MAX_LENGTH, padding="max_length", return_tensors="pt").input_ids
    pad = text_encoder(empty_ids)[0][0, -60:].mean(dim=0, keepdim=True)
    out = []
    for caption in captions:
        sentences = [s + "." for s in re.split(r'"!|\.|\?|;"', caption) if len(s) > 0] or [caption]
        ids = tokenizer(sentences, max_length=CLIP_MAX_LENGTH, padding=True, truncation=True, return_tensors="pt").input_ids
        hidden = text_encoder(ids)[0]
        keep = (ids != tokenizer.pad_token_id) & (ids != tokenizer.eos_token_id)
        tokens = hidden.reshape(-1, hidden.shape[-1])[keep.reshape(-1)][:token_length]
        out.append(torch.cat([tokens, pad.repeat(token_length - len(tokens), 1)]))
    return torch.stack(out)


def official_lora_layers(unet):
    """A literal port of the official traversal (modules/lora.py _find_modules_v2 over
    UNET_EXTENDED_TARGET_REPLACE), which fixes the order of lora_vis.pt."""
    ancestor_class = {"ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"}
    found = []
    for ancestor in (m for m in unet.modules() if m.__class__.__name__ in ancestor_class):
        for fullname, module in ancestor.named_modules():
            if any(isinstance(module, c) for c in (torch.nn.Linear, torch.nn.Conv2d)):
                found.append(module)
    return found
