"""linfusion_ops.longalign: LongAlign (Liu et al., 2024), long-text alignment for diffusion models.

* `LongPromptEncoder`, `split_sentences` (long_prompt): segment-level text encoding of prompts
  longer than CLIP's 77 tokens.
* `LongSDAdapter`, `T5TextPath`, `load_longsd_lora` (longsd): LongSD's T5 text path and its
  released UNet LoRA weights.
* `longalign_lora_targets`, `add_longalign_lora`, `lora_to_longalign_list`,
  `lora_from_longalign_list` (lora): the official LoRA layout on a diffusers UNet.
* `CLIPPreferenceScorer`, `RewardSampler`, `decomposed_score`, ... (preference): the decomposed
  preference score and the reward sampler; `linfusion_ops.longalign.finetune` is the
  fine-tuning script built on them (`python -m linfusion_ops.longalign.finetune --help`).

Every name loads its module on first use, so importing the package costs nothing.
"""

from ..optional import lazy_getattr

_LAZY = {
    "LongPromptEncoder": ".long_prompt",
    "split_sentences": ".long_prompt",
    "LongSDAdapter": ".longsd",
    "T5TextPath": ".longsd",
    "load_longsd_lora": ".longsd",
    "LONGALIGN_LORA_BLOCKS": ".lora",
    "longalign_lora_targets": ".lora",
    "add_longalign_lora": ".lora",
    "lora_to_longalign_list": ".lora",
    "lora_from_longalign_list": ".lora",
    "CLIPPreferenceScorer": ".preference",
    "RewardSampler": ".preference",
    "RewardOutput": ".preference",
    "DecomposedScore": ".preference",
    "decomposed_score": ".preference",
    "common_direction": ".preference",
    "prompt_sentences": ".preference",
    "sentence_mean_text_embeds": ".preference",
}

_SUBMODULES = ("long_prompt", "longsd", "lora", "preference", "finetune")


__getattr__ = lazy_getattr(__name__, _LAZY, _SUBMODULES)


__all__ = sorted(_LAZY)
