"""Long prompts for diffusers Stable Diffusion pipelines: LongAlign's segment-level text encoding.

CLIP text encoders see at most 77 tokens. LongAlign (arXiv 2410.11817) splits a long prompt into
sentences, encodes each sentence on its own, and concatenates the per-sentence token embeddings
into one conditioning sequence of ``max_tokens`` tokens, which the UNet's cross-attention takes
whatever its length. The concatenation is the ``linfusion_ops.merge_segments`` op; this module
only segments, tokenizes, runs the encoders (one batched call each) and builds the keep mask and
the pad embedding that a policy asks for.
"""

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from ..optional import needs

with needs(__name__):  # a missing extra is a one-line MissingExtraError
    from diffusers.utils.torch_utils import get_module_execution_device

from ..ops import merge_segments
from .longsd import T5TextPath, config_value

__all__ = ["LongPromptEncoder"]

# A sentence is a run of non-delimiters followed by its run of delimiters (or the end of the
# text): "Wait... then" gives "Wait..." and "then", and the punctuation stays with its sentence.
_SENTENCE = re.compile(r"[^.!?;\n]*(?:[.!?;\n]+|$)")


def split_sentences(text: str) -> List[str]:
    """Split ``text`` into sentences ended by ``.``, ``!``, ``?``, ``;`` or a newline.

    Each sentence keeps its own punctuation and is stripped of surrounding whitespace;
    whitespace-only pieces are dropped, so ``""`` gives ``[]``.
    """
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def _longalign_pad(empty: torch.Tensor) -> torch.Tensor:
    # LongAlign's pad: the mean of the last 60 positions of the empty prompt encoded at full
    # length, i.e. the mean of the encoder's outputs at pad tokens.
    return empty[-60:].mean(dim=0)


def _end_token_pad(empty: torch.Tensor) -> torch.Tensor:
    # The empty prompt's end token (position 1, right after the start token): the chunks
    # convention fills the unused budget with end-of-text embeddings.
    return empty[1]


@dataclass(frozen=True)
class _Policy:
    pack_sentences: bool  # pack consecutive sentences into segments of up to 75 tokens
    keep_end_token: bool  # keep each segment's end token (the start token is always kept)
    pad: Callable[[torch.Tensor], torch.Tensor]  # (L, C) encoded empty prompt -> (C,)


_POLICIES = {
    "longalign": _Policy(pack_sentences=False, keep_end_token=False, pad=_longalign_pad),
    "chunks": _Policy(pack_sentences=True, keep_end_token=True, pad=_end_token_pad),
}


def _pack(pieces: List[List[List[int]]], content: int) -> List[List[List[int]]]:
    """Greedily pack consecutive pieces (each a list, one per tokenizer, of at most ``content``
    token ids) into chunks of at most ``content`` tokens."""
    chunks = []
    for piece in pieces:
        if chunks and len(chunks[-1][0]) + len(piece[0]) <= content:
            chunks[-1] = [a + b for a, b in zip(chunks[-1], piece)]
        else:
            chunks.append(piece)
    return chunks


def as_prompt_list(value: Union[str, Sequence[str]], name: str, caller: str = "LongPromptEncoder") -> List[str]:
    """``value`` (a str, or a list or tuple of str) as a list of prompts; TypeError naming
    ``caller`` and the argument ``name`` otherwise."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{caller}: {name} must be a str or a list of str, got {type(value).__name__}")


class LongPromptEncoder:
    """Encode prompts of any length for SD 1.5 / 2.1 / XL pipelines with LongAlign's
    segment-level text encoding.

    Segmentation: a prompt is split into sentences (see :func:`split_sentences`); a sentence
    longer than the tokenizer's max length minus 2 (75 for CLIP) is split at token boundaries
    into pieces of at most 75 tokens instead of being cut off; a prompt without any sentence (the
    empty prompt) is one empty segment. Each segment is encoded as ``<start> tokens <end> <pad>...``
    padded to the tokenizer's max length, all segments of all prompts and negative prompts in one
    batched call per text encoder.

    Policies (they differ only in the segments, the keep mask and the pad):

    * ``"longalign"``: one segment per sentence (or sentence piece); keep each segment's start
      token and its content tokens, drop the end and pad tokens; concatenate, truncate to
      ``max_tokens`` and pad with the mean of the last 60 token embeddings of the empty prompt
      encoded at full length. For prompts whose sentences end in ``.`` this is exactly
      LongAlign's published encoding (which splits only on ``.`` and ``?``, re-ends every sentence
      with ``.`` and cuts sentences at 77 tokens).
    * ``"chunks"``: pack consecutive sentences into chunks of at most 75 tokens, keep each chunk's
      start, content and end tokens, pad with the empty prompt's end-token embedding.

    Hidden states follow each pipeline's convention: the last hidden state of ``text_encoder``
    for SD 1.5 and SD 2.1 (SD 2.1's checkpoint already drops the last layer); for SD XL
    (``text_encoder_2`` given) the penultimate hidden states ``hidden_states[-2]`` of both
    encoders concatenated on channels (both encoders get the same text), and the pooled vector is ``text_encoder_2``'s
    ``text_embeds`` of the prompt's FIRST segment: the first sentence for ``"longalign"``, the
    first up-to-75 tokens cut at a sentence boundary for ``"chunks"`` (what SD XL's own 77-token
    truncation gives). A real pooled output of a real text keeps the vector in the distribution
    SD XL was trained on, which a mean over segments would not.

    Args:
        tokenizer, text_encoder: the CLIP tokenizer and ``CLIPTextModel`` of the pipeline.
        tokenizer_2, text_encoder_2: SD XL's second tokenizer and ``CLIPTextModelWithProjection``
            (both or neither). Its tokens must align with ``tokenizer``'s (true for SD XL: same
            vocabulary, different pad token).
        max_tokens: T, the length of the returned sequences: the cross-attention key/value
            length of every cross-attention layer of the UNet (LongAlign uses 240).
        policy: ``"longalign"`` or ``"chunks"``.
        force_zeros_for_empty_prompt: when the negative prompt is omitted, return zeros for the
            negative embeddings (and pooled embeddings), as SD XL pipelines configured so do;
            otherwise the omitted negative prompt is ``""``. ``from_pipeline`` copies the
            pipeline's config value.
        requires_grad: build the autograd graph through the encoders (training); by default
            encoding runs under ``torch.no_grad()``.
        t5_tokenizer, t5_encoder, t5_adapter: LongSD's T5 text path (all three or none): a T5
            tokenizer, a ``T5EncoderModel`` and a `linfusion_ops.LongSDAdapter` mapping its
            d_model to the CLIP channels C (= the UNet's cross-attention dim). With them the
            conditioning is ``[CLIP segments (max_tokens) ; adapter(T5(text, t5_max_tokens))]``
            on the token axis, (B, max_tokens + t5_max_tokens, C): 240 + 240 = 480 for the
            released LongSD (SD 1.5). Each text goes to T5 whole, in one batched call for all
            prompts and negatives (see `linfusion_ops.longalign.longsd.T5TextPath`). Single-CLIP
            pipelines only (SD 1.5, 2.x): SD XL raises ``ValueError``.
        t5_max_tokens: the T5 half's length (LongSD: 240).
    """

    def __init__(
        self,
        tokenizer,
        text_encoder,
        tokenizer_2=None,
        text_encoder_2=None,
        *,
        max_tokens: int = 240,
        policy: str = "longalign",
        force_zeros_for_empty_prompt: bool = False,
        requires_grad: bool = False,
        t5_tokenizer=None,
        t5_encoder=None,
        t5_adapter=None,
        t5_max_tokens: int = 240,
    ):
        if tokenizer is None or text_encoder is None:
            raise ValueError("LongPromptEncoder: tokenizer and text_encoder are required")
        if (tokenizer_2 is None) != (text_encoder_2 is None):
            raise ValueError("LongPromptEncoder: pass tokenizer_2 and text_encoder_2 together (SD XL), or neither")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ValueError(f"LongPromptEncoder: max_tokens must be a positive int, got {max_tokens!r}")
        if policy not in _POLICIES:
            raise ValueError(f"LongPromptEncoder: policy must be one of {sorted(_POLICIES)}, got {policy!r}")
        self.tokenizers = [tokenizer] if tokenizer_2 is None else [tokenizer, tokenizer_2]
        self.text_encoders = [text_encoder] if text_encoder_2 is None else [text_encoder, text_encoder_2]
        self.length = self._check_tokenizers()
        self.max_tokens = max_tokens
        self.policy = policy
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.requires_grad = requires_grad
        self.t5 = None
        if any(part is not None for part in (t5_tokenizer, t5_encoder, t5_adapter)):
            if self.is_sdxl:
                raise ValueError(
                    "LongPromptEncoder: the T5 path (LongSD) is for single-CLIP pipelines (SD 1.5, SD 2.x; the "
                    "released LongSD is SD 1.5); SD XL's conditioning (two CLIP encoders and a pooled "
                    "embedding) has no T5 counterpart"
                )
            channels = config_value(text_encoder, "hidden_size")
            self.t5 = T5TextPath(t5_tokenizer, t5_encoder, t5_adapter, t5_max_tokens, channels)

    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> "LongPromptEncoder":
        """Build from a diffusers pipeline's ``tokenizer``/``text_encoder`` (and ``tokenizer_2``/
        ``text_encoder_2`` for SD XL); keyword arguments go to the constructor. LongSD:
        ``from_pipeline(pipe, t5_tokenizer=..., t5_encoder=..., t5_adapter=...)``, the adapter's
        out_dim checked against the pipeline UNet's cross_attention_dim."""
        if getattr(pipe, "text_encoder", None) is None:
            raise ValueError(
                "LongPromptEncoder.from_pipeline: the pipeline has no text_encoder "
                "(pipelines with only text_encoder_2, such as the SD XL refiner, are not supported)"
            )
        if "force_zeros_for_empty_prompt" not in kwargs:
            kwargs["force_zeros_for_empty_prompt"] = bool(
                getattr(pipe.config, "force_zeros_for_empty_prompt", False)
            )
        encoder = cls(
            pipe.tokenizer,
            pipe.text_encoder,
            getattr(pipe, "tokenizer_2", None),
            getattr(pipe, "text_encoder_2", None),
            **kwargs,
        )
        cross_attention_dim = config_value(getattr(pipe, "unet", None), "cross_attention_dim")
        if encoder.t5 is not None and cross_attention_dim not in (None, encoder.t5.out_dim):
            raise ValueError(
                f"LongPromptEncoder.from_pipeline: t5_adapter outputs out_dim = {encoder.t5.out_dim} channels, "
                f"the pipeline's UNet has cross_attention_dim = {cross_attention_dim}"
            )
        return encoder

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    def _check_tokenizers(self) -> int:
        """The context length L shared by the tokenizers, checked against the encoders."""
        names = ["tokenizer", "tokenizer_2"]
        lengths = {tok.model_max_length for tok in self.tokenizers}
        if len(lengths) != 1:
            raise ValueError(f"LongPromptEncoder: tokenizer and tokenizer_2 differ in model_max_length ({lengths})")
        length = lengths.pop()
        for name, tok, encoder in zip(names, self.tokenizers, self.text_encoders):
            # A tokenizer loaded without its config reports a huge sentinel as its max length.
            positions = config_value(encoder, "max_position_embeddings")
            if length < 3 or (positions is not None and length > positions):
                raise ValueError(
                    f"LongPromptEncoder: {name}.model_max_length must be the text encoder's context length "
                    f"(max_position_embeddings = {positions}, 77 for CLIP), got {length}"
                )
            for special in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if getattr(tok, special) is None:
                    raise ValueError(f"LongPromptEncoder: {name} has no {special}")
        return length

    def _token_ids(self, sentences: List[str]) -> List[List[List[int]]]:
        """Per tokenizer, the content token ids (no special tokens, not truncated) of each
        sentence: one tokenizer call each. The tokenizers must agree on every sentence's length,
        since their embeddings are concatenated position by position."""
        if not sentences:
            return [[] for _ in self.tokenizers]
        ids = [tok(sentences, add_special_tokens=False, verbose=False)["input_ids"] for tok in self.tokenizers]
        for sentence, *lengths in zip(sentences, *([len(i) for i in tok_ids] for tok_ids in ids)):
            if len(set(lengths)) != 1:
                raise ValueError(
                    f"LongPromptEncoder: tokenizer and tokenizer_2 split {sentence!r} into different "
                    f"numbers of tokens {lengths}; their embeddings cannot be aligned"
                )
        return ids

    def _segments(self, texts: List[str]) -> Tuple[List[List[List[int]]], List[int], List[int]]:
        """Segment every text. Returns the segments, each a list (one per tokenizer) of content
        token ids, the text index of each segment, and the index of each text's first segment."""
        content = self.length - 2
        sentences = [split_sentences(t) for t in texts]
        ids = self._token_ids([s for text in sentences for s in text])
        segments, segment_ids, first_segment = [], [], []
        k = 0
        for index, text in enumerate(sentences):
            pieces = []
            for _ in text:
                # A sentence longer than the context is split at token boundaries, not cut.
                for begin in range(0, len(ids[0][k]), content):
                    pieces.append([tok_ids[k][begin:begin + content] for tok_ids in ids])
                k += 1
            if _POLICIES[self.policy].pack_sentences:
                pieces = _pack(pieces, content)
            if not pieces:
                pieces = [[[] for _ in self.tokenizers]]
            first_segment.append(len(segments))
            segments.extend(pieces)
            segment_ids.extend([index] * len(pieces))
        return segments, segment_ids, first_segment

    def _encode(self, texts: List[str]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(len(texts), max_tokens, C) merged embeddings (+ t5_max_tokens with the T5 path) and,
        for SD XL, (len(texts), P) pooled."""
        policy = _POLICIES[self.policy]
        segments, segment_ids, first_segment = self._segments(texts)
        hidden, pooled = [], None
        for t, (tok, encoder) in enumerate(zip(self.tokenizers, self.text_encoders)):
            # Every segment, plus the empty prompt (last row) that the pad is taken from.
            rows = [seg[t] for seg in segments] + [[]]
            input_ids = torch.tensor(
                [[tok.bos_token_id] + r + [tok.eos_token_id] + [tok.pad_token_id] * (self.length - 2 - len(r))
                 for r in rows],
                dtype=torch.int64,
                device=get_module_execution_device(encoder),
            )
            if self.is_sdxl:
                out = encoder(input_ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                if t == 1:
                    if out[0].dim() != 2:
                        raise ValueError(
                            "LongPromptEncoder: text_encoder_2 must return pooled text embeddings first "
                            "(a CLIPTextModelWithProjection)"
                        )
                    pooled = out[0]
            else:
                hidden.append(encoder(input_ids)[0])
        dtype = self.text_encoders[-1].dtype
        device = hidden[-1].device
        embeds = torch.cat([h.to(device=device, dtype=dtype) for h in hidden], dim=-1)

        lengths = torch.tensor([len(seg[0]) for seg in segments], dtype=torch.int64, device=device)
        # Keep the start token (position 0), the content (1..n) and, by policy, the end (n + 1).
        kept = lengths + 1 + int(policy.keep_end_token)
        keep = torch.arange(self.length, device=device)[None, :] < kept[:, None]
        merged, _ = merge_segments(
            embeds[:-1],
            keep,
            torch.tensor(segment_ids, dtype=torch.int64, device=device),
            len(texts),
            self.max_tokens,
            policy.pad(embeds[-1]),
        )
        if pooled is not None:
            pooled = pooled.to(device=device, dtype=dtype)[first_segment]
        if self.t5 is not None:
            merged = torch.cat([merged, self.t5(texts).to(device=device, dtype=dtype)], dim=1)
        return merged, pooled

    def __call__(
        self,
        prompt: Union[str, Sequence[str]],
        negative_prompt: Optional[Union[str, Sequence[str]]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Encode prompts and negative prompts into pipeline keyword arguments.

        Args:
            prompt: a str or a list of B str.
            negative_prompt: None, a str (used for every prompt) or a list of B str. None means
                ``""``, or zeros with ``force_zeros_for_empty_prompt``.

        Returns:
            ``{"prompt_embeds", "negative_prompt_embeds"}``, each (B, T, C) with T = max_tokens
            (+ t5_max_tokens with the T5 path) in the text encoder's dtype (``text_encoder_2``'s
            for SD XL, C = C1 + C2) on its execution device;
            for SD XL also ``"pooled_prompt_embeds"`` and ``"negative_pooled_prompt_embeds"``,
            (B, P). Pass them to the pipeline as ``pipe(**encoder(prompt), ...)``.
        """
        prompts = as_prompt_list(prompt, "prompt")
        if not prompts:
            raise ValueError("LongPromptEncoder: prompt is an empty list")
        zero_negative = negative_prompt is None and self.force_zeros_for_empty_prompt
        if negative_prompt is None:
            negatives = [] if zero_negative else [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = as_prompt_list(negative_prompt, "negative_prompt")
            if len(negatives) != len(prompts):
                raise ValueError(
                    f"LongPromptEncoder: negative_prompt has {len(negatives)} entries, prompt has {len(prompts)}"
                )
        with contextlib.nullcontext() if self.requires_grad else torch.no_grad():
            embeds, pooled = self._encode(prompts + negatives)

        b = len(prompts)
        result = {"prompt_embeds": embeds[:b]}
        result["negative_prompt_embeds"] = torch.zeros_like(embeds) if zero_negative else embeds[b:]
        if self.is_sdxl:
            result["pooled_prompt_embeds"] = pooled[:b]
            result["negative_pooled_prompt_embeds"] = torch.zeros_like(pooled) if zero_negative else pooled[b:]
        return result
