"""Low-memory execution of a diffusers UNet (and ControlNet) for very large images, reversible.

`apply_low_memory(unet, controlnet)` patches instance `forward`s only (no module, parameter or
processor is replaced), so `handle.remove()` gives back the models exactly as they were:

* chunked CFG: a call with batch 2B runs as two calls of batch B whose outputs are
  concatenated; every batched argument is split (tensors whose first dim is 2B, inside lists,
  tuples and dicts too: added_cond_kwargs, IP-Adapter image_embeds lists, ControlNet residuals,
  timestep vectors, cross_attention_kwargs), everything else is passed to both halves.
* chunked feed-forward: every diffusers `FeedForward`, and every cross-attention over its
  queries, runs over `ff_chunk_size` tokens at a time, writing into one preallocated output
  (the 4x-8x wide GEGLU hidden layer is the largest tensor of a LinFusion UNet at 16K).
* chunked self-attention: every self-attention running LinFusion's processor runs the
  processor's body (linfusion_ops.linfusion.processor.linfusion_attention) with a
  TokenChunkedCore: two passes over `attn_chunk_size` tokens at a time, keys and values
  (kernel MLP and norm_k included) chunk by chunk into linear attention's fp32 state (the
  chunks' states weighted by their token counts), then queries, linear_attention_apply and
  to_out chunk by chunk into one preallocated output; only the block's input and output are
  full size (unchunked, the processor holds the input and one pass's full-size tensors at
  once: k, v and the key MLP's hidden layers, then q, the query MLP's and the output; the
  peak of SD 1.5 at 16K). Attention masks, cross-attention,
  spatial_norm / group_norm, active dropout, gradients and other processors run the
  processor as it is.
* in-place SiLU: ResnetBlock2D runs its activations, time-embedding add, residual add and
  output scaling in place on tensors the block itself just made; the shared time embedding,
  the block's input and anything autograd needs are never written (with gradients on, the
  original forward runs).
* skip offload: the UNet's down-block skip tensors (and a ControlNet's residuals) are moved to
  `offload_device` as soon as they are made and brought back one at a time when the up block
  that concatenates them runs; ControlNet residuals are added to their skip there. The blocks'
  outputs travel through the host too (the UNet's own frame would pin them on the device while
  the next block runs), up-block resnets compute their shortcut first and free their
  concatenated input once normalised, and the device copies are freed once used.
* `max_memory`: per input shape, the first of a list of technique sets ordered from cheapest
  to most aggressive whose modelled peak (`memory.model_peak`: a dry run on the meta device
  counting live bytes, weights and inputs included) fits; ValueError when none does.

Every technique gives the plain forward's result: chunked CFG, chunked feed-forward and chunked
self-attention up to floating-point rounding (BLAS may block a GEMM of another size
differently, and the chunks' fp32 states are summed in another order), in-place SiLU and skip
offload bit for bit.
"""

import functools
import inspect
import warnings
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..optional import needs

with needs(__name__):  # a missing extra is a one-line MissingExtraError
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.utils import BaseOutput

from ..linfusion.processor import LinFusionAttnProcessor, TokenChunkedCore, linfusion_attention
from .memory import free_storage, host_twin, model_peak, parse_bytes

_MISSING = object()


@dataclass(frozen=True)
class Techniques:
    """One set of low-memory techniques (see the module docstring)."""

    chunked_cfg: bool = False
    ff_chunk_size: Optional[int] = None
    inplace_silu: bool = False
    offload_skips: bool = False
    attn_chunk_size: Optional[int] = None


# max_memory tries these in order, cheapest first: in-place SiLU costs nothing, chunked CFG a
# second launch of every kernel, small feed-forward chunks more launches, offload PCIe traffic;
# self-attention chunks (a second read of the input) come last, with the offload.
_BUDGET_LADDER = (
    Techniques(inplace_silu=True),
    Techniques(inplace_silu=True, chunked_cfg=True),
    Techniques(inplace_silu=True, chunked_cfg=True, ff_chunk_size=65536),
    Techniques(inplace_silu=True, chunked_cfg=True, ff_chunk_size=16384),
    Techniques(inplace_silu=True, chunked_cfg=True, ff_chunk_size=4096),
    Techniques(inplace_silu=True, chunked_cfg=True, ff_chunk_size=4096, offload_skips=True),
    Techniques(inplace_silu=True, chunked_cfg=True, ff_chunk_size=1024, offload_skips=True),
    Techniques(inplace_silu=True, chunked_cfg=True, ff_chunk_size=1024, offload_skips=True, attn_chunk_size=65536),
    Techniques(inplace_silu=True, chunked_cfg=True, ff_chunk_size=1024, offload_skips=True, attn_chunk_size=4096),
)


def _format_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _split_batch(value, batch: int):
    """(first half, second half) of every tensor whose first dim is `batch`, recursively."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch:
            return value[: batch // 2], value[batch // 2 :]
        return value, value
    if isinstance(value, (list, tuple)):
        halves = [_split_batch(v, batch) for v in value]
        return type(value)(h[0] for h in halves), type(value)(h[1] for h in halves)
    if isinstance(value, dict):
        halves = {k: _split_batch(v, batch) for k, v in value.items()}
        return {k: h[0] for k, h in halves.items()}, {k: h[1] for k, h in halves.items()}
    return value, value


def _concat(first, second):
    """The output of one call on the whole batch from the outputs of its two halves."""
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])
    if isinstance(first, BaseOutput):
        return type(first)(**{k: _concat(first[k], second[k]) for k in first.keys()})
    if isinstance(first, (list, tuple)):
        return type(first)(_concat(a, b) for a, b in zip(first, second))
    if isinstance(first, dict):
        return {k: _concat(first[k], second[k]) for k in first}
    return first


def _tensor_leaves(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensor_leaves(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensor_leaves(v)]
    return []


class _LoadingTuple(tuple):
    """A tuple of offloaded skip tensors that brings each one to the device when indexed (the
    up blocks index res_hidden_states_tuple[-1] one resnet at a time)."""

    def __new__(cls, items, load):
        obj = super().__new__(cls, items)
        obj._load = load
        return obj

    def __getitem__(self, index):
        item = tuple.__getitem__(self, index)
        if isinstance(index, slice):
            return _LoadingTuple(item, self._load)
        return self._load(item)


class _ModelState:
    """What the patches of one model (UNet or ControlNet) read while it runs."""

    def __init__(self, model: nn.Module, techniques: Optional[Techniques], offload_device):
        self.model = model
        self.fixed = techniques
        self.current = techniques or Techniques()
        self.offload_device = torch.device(offload_device)
        self.plans: Dict[tuple, tuple] = {}
        # Per call (skip offload): ControlNet residuals by skip index, the mid residual, and
        # the skip index of each offloaded tensor.
        self.residuals = None
        self.mid_residual = None
        # id of each tensor this call offloaded -> its skip index (None: not a skip).
        self.offloaded: Dict[int, Optional[int]] = {}
        self.next_skip = 0
        self.offload_hidden = True
        # Device copies made for an up block's concatenation, dead once it is done but still
        # referenced by the block's frame: freed when its next resnet starts.
        self.pending_free: List[torch.Tensor] = []

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def offload(self, tensor: torch.Tensor, skip: bool = True) -> torch.Tensor:
        if tensor.is_meta:
            moved = host_twin(tensor)
        else:
            moved = tensor.to(self.offload_device)
        self.offloaded[id(moved)] = self.next_skip if skip else None
        self.next_skip += skip
        return moved

    def load(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_meta:
            # A dry run: the host-to-device copy is a fresh device allocation.
            return torch.empty_like(tensor)
        return tensor.to(self.device)

    def load_offloaded(self, tensor: torch.Tensor, free_when_used: bool = False) -> torch.Tensor:
        """`tensor` on the device if this state offloaded it, else `tensor` itself."""
        if id(tensor) not in self.offloaded:
            return tensor
        loaded = self.load(tensor)
        if free_when_used and loaded is not tensor:
            self.pending_free.append(loaded)
        return loaded

    def load_skip(self, tensor: torch.Tensor) -> torch.Tensor:
        index = self.offloaded.get(id(tensor))
        loaded = self.load(tensor)
        if self.residuals is not None and index is not None:
            loaded = loaded + self.load(self.residuals[index])
        if loaded is not tensor:
            self.pending_free.append(loaded)
        return loaded


class LowMemoryHandle:
    """Undoes `apply_low_memory`: `remove()` (or leaving its `with` block) restores every patched
    `forward` as it was. `techniques` is the UNet's active set (with max_memory: the one
    chosen for the latest input shape, None before the first call), `controlnet_techniques`
    the ControlNet's; `plans` lists each choice max_memory made, with its modelled peak."""

    def __init__(self, states: Dict[str, _ModelState], max_memory: Optional[int]):
        self._states = states
        self.max_memory = max_memory
        self._patched: List[tuple] = []
        self.plans: List[dict] = []

    def _patch(self, module: nn.Module, forward) -> None:
        previous = module.__dict__.get("forward", _MISSING)
        self._patched.append((module, previous))
        module.forward = functools.partial(forward, module.forward)

    @staticmethod
    def _describe(state: Optional[_ModelState]) -> Optional[dict]:
        if state is None or (state.fixed is None and not state.plans):
            return None
        return dict(asdict(state.current), offload_device=str(state.offload_device))

    @property
    def techniques(self) -> Optional[dict]:
        return self._describe(self._states.get("unet"))

    @property
    def controlnet_techniques(self) -> Optional[dict]:
        return self._describe(self._states.get("controlnet"))

    def remove(self) -> None:
        while self._patched:
            module, previous = self._patched.pop()
            if previous is _MISSING:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = previous

    def __enter__(self) -> "LowMemoryHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _as_kwargs(signature: inspect.Signature, args, kwargs) -> dict:
    bound = signature.bind(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _silu(block: ResnetBlock2D, x: torch.Tensor, inplace: bool) -> torch.Tensor:
    if inplace and isinstance(block.nonlinearity, nn.SiLU):
        return F.silu(x, inplace=True)
    return block.nonlinearity(x)


def _add(x: torch.Tensor, y: torch.Tensor, inplace: bool) -> torch.Tensor:
    """x + y, written into x when asked and when that changes neither dtype nor shape."""
    if inplace and torch.result_type(x, y) == x.dtype and torch.broadcast_shapes(x.shape, y.shape) == x.shape:
        return x.add_(y)
    return x + y


def _resnet_forward(state: _ModelState, block: ResnetBlock2D, role: Optional[str], original, input_tensor, temb, *args, **kwargs):
    """ResnetBlock2D.forward, the same operations in the same order, with in-place activations
    and adds (inplace_silu). With skip offload, the device copies the block's caller made and
    will not read again are freed: in an up block (role "up": the input is the block's fresh
    concatenation) the shortcut is computed first and the input's memory given back before
    conv1, and the copies that were concatenated are freed on entry; in a down block (role
    "down") the copy of the block's input, once its first resnet is done with it."""
    inplace = state.current.inplace_silu
    consume = role == "up" and state.current.offload_skips
    if role == "down" and state.current.offload_skips and state.pending_free:
        pending, state.pending_free = state.pending_free, []
        out = _resnet_forward(state, block, None, original, input_tensor, temb, *args, **kwargs)
        for tensor in pending:
            free_storage(tensor)
        return out
    if (
        not (inplace or consume)
        or args
        or kwargs
        or (torch.is_grad_enabled() and input_tensor.requires_grad)
        or (torch.is_grad_enabled() and any(p.requires_grad for p in block.parameters()))
    ):
        return original(input_tensor, temb, *args, **kwargs)
    shortcut = None
    if consume:
        for tensor in state.pending_free:
            free_storage(tensor)
        state.pending_free = []
        if block.conv_shortcut is not None and block.upsample is None and block.downsample is None:
            shortcut = block.conv_shortcut(input_tensor)
    hidden = _silu(block, block.norm1(input_tensor), inplace)
    if shortcut is not None:
        free_storage(input_tensor)
    elif block.upsample is not None:
        if hidden.shape[0] >= 64:
            input_tensor, hidden = input_tensor.contiguous(), hidden.contiguous()
        input_tensor, hidden = block.upsample(input_tensor), block.upsample(hidden)
    elif block.downsample is not None:
        input_tensor, hidden = block.downsample(input_tensor), block.downsample(hidden)
    hidden = block.conv1(hidden)
    if block.time_emb_proj is not None:
        # temb is shared by every block of the UNet: never in place.
        if not block.skip_time_act:
            temb = block.nonlinearity(temb)
        temb = block.time_emb_proj(temb)[:, :, None, None]
    if block.time_embedding_norm == "default":
        if temb is not None:
            hidden = _add(hidden, temb, inplace)
        hidden = block.norm2(hidden)
    elif block.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(" `temb` should not be None when `time_embedding_norm` is scale_shift")
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        hidden = block.norm2(hidden)
        hidden = _add(hidden.mul_(1 + time_scale) if inplace else hidden * (1 + time_scale), time_shift, inplace)
    else:
        hidden = block.norm2(hidden)
    hidden = block.dropout(_silu(block, hidden, inplace))
    hidden = block.conv2(hidden)
    if shortcut is None:
        shortcut = input_tensor if block.conv_shortcut is None else block.conv_shortcut(input_tensor)
    # input + hidden == hidden + input bit for bit (IEEE addition commutes); x / 1.0 == x.
    hidden = _add(hidden, shortcut, inplace)
    if block.output_scale_factor != 1:
        hidden = hidden.div_(block.output_scale_factor) if inplace else hidden / block.output_scale_factor
    return hidden


def _chunk_tokens(state: _ModelState, original, hidden_states, *args, **kwargs):
    """original(hidden_states (B, N, C), ...) over `ff_chunk_size` tokens at a time, into one
    preallocated output: diffusers' FeedForward, and cross-attention (attn2), whose queries
    are independent of each other (unless a per-query mask or IP-Adapter masks are given)."""
    chunk = state.current.ff_chunk_size
    mask = kwargs.get("attention_mask")
    if (
        chunk is None
        or hidden_states.dim() != 3
        or hidden_states.shape[1] <= chunk
        or (mask is not None and mask.dim() >= 3 and mask.shape[-2] != 1)
        or kwargs.get("ip_adapter_masks") is not None
    ):
        return original(hidden_states, *args, **kwargs)
    out = None
    for start in range(0, hidden_states.shape[1], chunk):
        part = original(hidden_states[:, start : start + chunk], *args, **kwargs)
        if out is None:
            out = part.new_empty((hidden_states.shape[0], hidden_states.shape[1], part.shape[2]))
        out[:, start : start + chunk] = part
    return out


def _cross_attention(state: _ModelState, original, hidden_states, encoder_hidden_states=None, *args, **kwargs):
    if encoder_hidden_states is None:
        return original(hidden_states, encoder_hidden_states, *args, **kwargs)
    return _chunk_tokens(state, original, hidden_states, encoder_hidden_states, *args, **kwargs)


def _self_attention(state: _ModelState, attn: Attention, original, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
    """LinFusionAttnProcessor's body run with a TokenChunkedCore of `attn_chunk_size` tokens
    (see the module docstring); anything the chunked path does not reproduce runs `original`.
    Extra keyword arguments are ignored, as the processor ignores them."""
    chunk = state.current.attn_chunk_size
    dropout = attn.to_out[1] if len(attn.to_out) > 1 else None
    if (
        chunk is None
        or type(attn.processor) is not LinFusionAttnProcessor
        or torch.is_grad_enabled()
        or encoder_hidden_states is not None
        or attention_mask is not None
        or attn.spatial_norm is not None
        or attn.group_norm is not None
        or hidden_states.dim() not in (3, 4)
        or hidden_states.numel() == 0
        or (isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0)
    ):
        return original(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
    return linfusion_attention(attn, hidden_states, core=TokenChunkedCore(chunk))


def _offload_output(state: _ModelState, original, *args, **kwargs):
    """conv_in of the UNet: its output is the first skip tensor."""
    out = original(*args, **kwargs)
    return state.offload(out) if state.current.offload_skips else out


def _load_input(state: _ModelState, args, kwargs, free_when_used: bool):
    """A block's (args, kwargs) with its hidden_states brought back if this state offloaded it."""
    if args:
        return (state.load_offloaded(args[0], free_when_used),) + args[1:], kwargs
    return args, dict(kwargs, hidden_states=state.load_offloaded(kwargs["hidden_states"], free_when_used))


def _down_block(state: _ModelState, original, *args, **kwargs):
    """Skips to the host; the output too (it is the last skip), so that the UNet's own
    reference to it pins no device memory while the next block runs."""
    if not state.current.offload_skips:
        return original(*args, **kwargs)
    args, kwargs = _load_input(state, args, kwargs, free_when_used=True)
    try:
        hidden, skips = original(*args, **kwargs)
    finally:
        state.pending_free = []
    moved = tuple(state.offload(s) for s in skips)
    if not state.offload_hidden:
        return hidden, moved
    return (moved[-1] if skips and hidden is skips[-1] else state.offload(hidden, skip=False)), moved


def _up_block(state: _ModelState, block: nn.Module, original, *args, **kwargs):
    if not state.current.offload_skips:
        return original(*args, **kwargs)
    args, kwargs = _load_input(state, args, kwargs, free_when_used=True)
    kwargs["res_hidden_states_tuple"] = _LoadingTuple(kwargs["res_hidden_states_tuple"], state.load_skip)
    try:
        out = original(*args, **kwargs)
    finally:
        state.pending_free = []
    last = block is state.model.up_blocks[-1]
    return out if last or not state.offload_hidden else state.offload(out, skip=False)


def _mid_block(state: _ModelState, original, *args, **kwargs):
    if not state.current.offload_skips:
        return original(*args, **kwargs)
    args, kwargs = _load_input(state, args, kwargs, free_when_used=False)
    out = original(*args, **kwargs)
    if state.mid_residual is not None:
        out = out + state.load(state.mid_residual)
    is_unet = hasattr(state.model, "up_blocks")
    return state.offload(out, skip=False) if is_unet and state.offload_hidden else out


def _controlnet_block(state: _ModelState, original, x):
    """A ControlNet zero conv: its input is an offloaded skip, its output a residual."""
    if not state.current.offload_skips:
        return original(x)
    return state.offload(original(state.load_offloaded(x)))


def _run_call(state: _ModelState, original, kwargs: dict, is_unet: bool):
    """One call of the model's original forward with the state's techniques."""
    down = kwargs.get("down_block_additional_residuals")
    mid = kwargs.get("mid_block_additional_residual")
    take_residuals = (
        is_unet
        and state.current.offload_skips
        and down is not None
        and mid is not None
        and kwargs.get("down_intrablock_additional_residuals") is None
    )
    if is_unet and down is not None and not take_residuals:
        # Residuals offloaded by a ControlNet come back for the UNet's own addition.
        kwargs["down_block_additional_residuals"] = tuple(
            r if r.device == state.device else state.load(r) for r in down
        )
    if take_residuals:
        kwargs = dict(kwargs, down_block_additional_residuals=None, mid_block_additional_residual=None)
        state.residuals, state.mid_residual = tuple(down), mid
    state.offloaded, state.next_skip = {}, 0
    # T2I-Adapter residuals are added in place to the blocks' outputs by the UNet itself.
    state.offload_hidden = kwargs.get("down_intrablock_additional_residuals") is None
    try:
        return original(**kwargs)
    finally:
        state.residuals = state.mid_residual = None
        state.offloaded = {}


def _run(state: _ModelState, original, kwargs: dict, is_unet: bool):
    sample = kwargs["sample"]
    batch = sample.shape[0]
    if not state.current.chunked_cfg or batch < 2 or batch % 2:
        return _run_call(state, original, kwargs, is_unet)
    first, second = _split_batch(kwargs, batch)
    out_first = _run_call(state, original, first, is_unet)
    return _concat(out_first, _run_call(state, original, second, is_unet))


def _choose(state: _ModelState, original, kwargs: dict, is_unet: bool, handle: LowMemoryHandle):
    """The first technique set of _BUDGET_LADDER whose modelled peak fits handle.max_memory."""
    leaves = _tensor_leaves(kwargs)
    key = tuple((tuple(t.shape), t.dtype) for t in leaves)
    if key not in state.plans:

        def peak(techniques):
            state.current = techniques
            return model_peak(lambda meta: _run(state, original, meta, is_unet), [state.model], kwargs)

        # The most aggressive set first: when even it does not fit, say so at once.
        last = _BUDGET_LADDER[-1]
        smallest = peak(last)
        if smallest > handle.max_memory:
            raise ValueError(
                f"apply_low_memory: max_memory={_format_bytes(handle.max_memory)} is too small for "
                f"{type(state.model).__name__} at sample shape {tuple(kwargs['sample'].shape)}: "
                f"the smallest modelled peak is {_format_bytes(smallest)} (weights included), "
                f"with {last}"
            )
        for techniques in _BUDGET_LADDER[:-1]:
            bytes_needed = peak(techniques)
            if bytes_needed <= handle.max_memory:
                break
        else:
            techniques, bytes_needed = last, smallest
        state.plans[key] = (techniques, bytes_needed)
        handle.plans.append(
            {
                "model": type(state.model).__name__,
                "sample_shape": tuple(kwargs["sample"].shape),
                "techniques": asdict(techniques),
                "modelled_peak_bytes": bytes_needed,
            }
        )
    state.current = state.plans[key][0]


def _model_forward(state: _ModelState, handle: LowMemoryHandle, signature, is_unet: bool, original, *args, **kwargs):
    kwargs = _as_kwargs(signature, args, kwargs)
    if state.fixed is None and not kwargs["sample"].is_meta:
        _choose(state, original, kwargs, is_unet, handle)
    return _run(state, original, kwargs, is_unet)


def apply_low_memory(
    unet: nn.Module,
    controlnet: Optional[nn.Module] = None,
    *,
    chunked_cfg: bool = True,
    ff_chunk_size: Optional[int] = None,
    inplace_silu: bool = True,
    offload_skips: bool = False,
    attn_chunk_size: Optional[int] = None,
    max_memory: Union[int, str, None] = None,
    offload_device: Union[str, torch.device] = "cpu",
) -> LowMemoryHandle:
    """Run `unet` (a diffusers UNet2DConditionModel) and `controlnet` (a ControlNetModel or
    None) with less memory; returns a LowMemoryHandle (`remove()`, or use it as a context
    manager).

    Args:
        chunked_cfg: run a batch of 2B as two batches of B (classifier-free guidance halves).
        ff_chunk_size: tokens per feed-forward chunk (None: unchunked).
        inplace_silu: in-place activations and adds in every ResnetBlock2D.
        offload_skips: keep the UNet's skip tensors and the ControlNet's residuals on
            `offload_device` between the down block that makes them and the up block that
            uses them.
        attn_chunk_size: tokens per chunk of LinFusion's self-attention (None: unchunked).
        max_memory: bytes, or a string such as "24GB" (10^9 bytes) or "20GiB": the device
            memory one UNet (or ControlNet) call may use, weights and inputs included. The
            techniques are then chosen per input shape from the memory model, and the five
            technique arguments above are ignored; ValueError (at the call) when nothing fits.
        offload_device: where offloaded skip tensors live (default "cpu").

    The models' outputs keep their types (UNet2DConditionOutput, ControlNetOutput or tuples
    with return_dict=False), shapes and dtypes; inputs are those of the models' forwards.
    """
    for name, size in (("ff_chunk_size", ff_chunk_size), ("attn_chunk_size", attn_chunk_size)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"apply_low_memory: {name} must be a positive int or None, got {size!r}")
    for name, model in (("unet", unet), ("controlnet", controlnet)):
        if model is not None and not hasattr(model, "down_blocks"):
            raise TypeError(f"apply_low_memory: {name} must be a diffusers UNet2DConditionModel or ControlNetModel, got {type(model).__name__}")
    budget = None if max_memory is None else parse_bytes(max_memory)
    fixed = None if budget is not None else Techniques(bool(chunked_cfg), ff_chunk_size, bool(inplace_silu), bool(offload_skips), attn_chunk_size)
    states = {"unet": _ModelState(unet, fixed, offload_device)}
    if controlnet is not None:
        states["controlnet"] = _ModelState(controlnet, fixed, offload_device)
    handle = LowMemoryHandle(states, budget)
    try:
        for name, state in states.items():
            model, is_unet = state.model, name == "unet"
            up_resnets = {id(r) for block in getattr(model, "up_blocks", ()) for r in getattr(block, "resnets", ())}
            down_resnets = {id(block.resnets[0]) for block in model.down_blocks if getattr(block, "resnets", None)}
            for module in model.modules():
                if type(module) is ResnetBlock2D:
                    role = "up" if id(module) in up_resnets else "down" if id(module) in down_resnets else None
                    handle._patch(module, functools.partial(_resnet_forward, state, module, role))
                elif isinstance(module, FeedForward):
                    handle._patch(module, functools.partial(_chunk_tokens, state))
                elif isinstance(module, Attention) and module.is_cross_attention:
                    handle._patch(module, functools.partial(_cross_attention, state))
                elif isinstance(module, Attention):
                    handle._patch(module, functools.partial(_self_attention, state, module))
            for block in model.down_blocks:
                handle._patch(block, functools.partial(_down_block, state))
            if model.mid_block is not None:
                handle._patch(model.mid_block, functools.partial(_mid_block, state))
            if is_unet:
                handle._patch(model.conv_in, functools.partial(_offload_output, state))
                for block in model.up_blocks:
                    handle._patch(block, functools.partial(_up_block, state, block))
            else:
                for block in model.controlnet_down_blocks:
                    handle._patch(block, functools.partial(_controlnet_block, state))
            signature = inspect.signature(model.forward)
            handle._patch(model, functools.partial(_model_forward, state, handle, signature, is_unet))
    except Exception:
        handle.remove()
        raise
    return handle


def low_memory(*args, **kwargs) -> LowMemoryHandle:
    """Deprecated alias of `apply_low_memory` (same arguments), kept for one release: the
    function was named like its module, which hid one or the other on the package."""
    warnings.warn(
        "linfusion_ops.highres.low_memory(...) is deprecated and will be removed in the next "
        "release; call linfusion_ops.highres.apply_low_memory(...) instead",
        DeprecationWarning,
        stacklevel=2,
    )
    return apply_low_memory(*args, **kwargs)


__all__ = ["apply_low_memory", "low_memory", "LowMemoryHandle", "Techniques"]
