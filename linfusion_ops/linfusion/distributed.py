"""Sequence-parallel linear attention over torch.distributed.

Each rank holds a slice of the tokens. Linear attention's state is a sum over keys, so the ranks
only need to sum the (B, H, Dk, Dv + 1) state and the key count: one all-reduce per layer, whose
size does not depend on the number of tokens (softmax attention would have to all-gather every
key and value). Queries never leave their rank.

Forward, per rank r with n_r kept keys (see docs/distributed.md):

    S_r, z_r = linear_attention_state(k_r, v_r)          # scaled by 1 / n_r
    [U, u, n] = all_reduce_sum([n_r S_r, n_r z_r, n_r])    # ONE collective, fp32 (fp64 for fp64)
    o_r = linear_attention_apply(q_r, U / n, u / n)        # n = 0 gives S = z = 0, o = 0

Backward: the summed buffer is replicated on every rank and each rank's loss depends on its own
copy, so the gradient of the sum with respect to rank r's contribution is the sum over ranks of
the gradients of their copies: ONE all-reduce of the buffer's gradient. The local parts (the
division by n, the scaling by n_r, the state and apply ops) are differentiated by autograd, so
dk_r and dv_r include the contributions of the queries of every rank.

All ranks of the group must call linear_attention with the same B, H, Dk, Dv, dtype and
feature_map (the slice sizes may differ, including 0 or 1 token), and, when training, must all
run the backward (as with DistributedDataParallel): a rank that skips it leaves the others
waiting in the backward all-reduce.

What is checked:
* before the collective, on each rank: the process group is initialized, this rank belongs to
  `group`, the group's backend can reduce tensors of the inputs' device, and the local shapes,
  dtypes and devices are consistent (an error raised here on one rank only leaves the other
  ranks waiting in the all-reduce until the group's timeout);
* after the collective, on every rank alike: that all ranks passed the same feature_map, dtype,
  B, H, Dk and Dv, from 8 extra values carried in the same all-reduce (a 24-bit fingerprint;
  `check_ranks=False` skips the device-to-host read this needs, and it is skipped inside
  torch.compile and CUDA graph capture).
What is not checked: a mismatch in B, H, Dk or Dv that changes the all-reduced buffer's length
is left to the backend, which does not raise a Python error (gloo aborts the process with a
size-mismatch enforce failure, tested; NCCL may hang or read past the smaller buffer); the
fingerprint catches the mismatches that keep the length; eps is not compared
(it is applied locally, so a rank with another eps gets its own normalizer); a rank that skips
the backward is not detected.
"""

import functools
import zlib
from typing import Optional

import torch
import torch.distributed as dist

from .. import reference
from ..distributed_utils import resolve_group
from ..ops import check_feature_map, check_heads, linear_attention_apply, linear_attention_state
from .processor import LINFUSION_EPS, FusedCore, linfusion_attention

__all__ = ["linear_attention", "token_slice", "SequenceParallelCore", "SequenceParallelLinFusionAttnProcessor"]

# The fingerprint of the arguments that must agree across ranks: _FINGERPRINT_DIGITS digits in
# [1, 64], each all-reduced as (d, d^2). All ranks agree iff world * sum(d^2) == sum(d)^2 for
# every digit (Cauchy-Schwarz equality). d^2 <= 4096, so the fp32 sums stay exact integers for
# up to 4096 ranks (2^24 / 4096); above that the check is skipped rather than risk a false alarm.
_CALLER = "linfusion_ops.linfusion.distributed"  # the prefix of its error messages
_FINGERPRINT_DIGITS = 4
_FINGERPRINT_BASE = 64
_FINGERPRINT_MAX_WORLD = 4096


def _check_local_inputs(q, k, v, heads, key_padding_mask) -> None:
    """Cheap local checks, run before the collective so that bad arguments fail on this rank
    before it enters the all-reduce."""
    dk = check_heads(q, heads, "q")
    if check_heads(k, heads, "k") != dk:
        raise ValueError(
            f"linfusion_ops.linfusion.distributed: q and k must have the same channels per head, got "
            f"{q.shape[2]} and {k.shape[2]} for {heads} heads"
        )
    check_heads(v, heads, "v")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"linfusion_ops.linfusion.distributed: k and v must share (B, N), got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0]:
        raise ValueError(
            "linfusion_ops.linfusion.distributed: q and k must have the same batch size, got "
            f"{q.shape[0]} and {k.shape[0]}"
        )
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(
                f"linfusion_ops.linfusion.distributed: {name} must have q's dtype and device ({q.dtype}, "
                f"{q.device}), got ({x.dtype}, {x.device})"
            )
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != tuple(k.shape[:2])
    ):
        raise ValueError(
            "linfusion_ops.linfusion.distributed: key_padding_mask must be a bool tensor shaped (B, Nk) = "
            f"{tuple(k.shape[:2])} (this rank's keys), got {key_padding_mask.dtype} "
            f"{tuple(key_padding_mask.shape)}"
        )


@functools.lru_cache(maxsize=256)
def _fingerprint(
    feature_map: str, dtype: torch.dtype, state_shape: tuple, device: torch.device
) -> torch.Tensor:
    """(d_1, d_1^2, ..., d_4, d_4^2) on device, for _FINGERPRINT_DIGITS digits d in
    [1, _FINGERPRINT_BASE] of a checksum of what must agree across ranks. zlib.crc32 rather than
    hash(): Python's string hash differs per process. Cached, so that calls after the first make
    no host-to-device copy (which CUDA graph capture would reject)."""
    crc = zlib.crc32(repr((feature_map, str(dtype), state_shape)).encode())
    values = []
    for _ in range(_FINGERPRINT_DIGITS):
        digit = crc % _FINGERPRINT_BASE + 1
        values += [digit, digit * digit]
        crc //= _FINGERPRINT_BASE
    return torch.tensor(values, dtype=dtype, device=device)


def _check_fingerprint(summed: torch.Tensor, world: int) -> None:
    """Raise on every rank alike if the ranks' fingerprints differ. summed holds, per digit,
    (sum of d, sum of d^2) over the ranks."""
    sums = [round(x) for x in summed.tolist()]
    if any(world * sq != s * s for s, sq in zip(sums[0::2], sums[1::2])):
        raise ValueError(
            "linfusion_ops.linfusion.distributed: the ranks of the group passed different feature_map, "
            "dtype or (B, H, Dk, Dv); every rank must call linear_attention with the same "
            "arguments except the token slices"
        )


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x, replicated on every rank. Since every rank's loss depends on its
    own copy of y, dL/dx_r = sum over ranks of dL/dy: the backward is the same all-reduce."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.mark_dirty(x)
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        # A private contiguous copy: autograd may still hold grad elsewhere.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _skip_host_checks() -> bool:
    """A device-to-host read breaks torch.compile graphs and CUDA graph capture."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
    group: Optional["dist.ProcessGroup"] = None,
    feature_map: str = "elu",
    eps: float = 1e-4,
    key_padding_mask: Optional[torch.Tensor] = None,
    check_ranks: bool = True,
) -> torch.Tensor:
    """Sequence-parallel linear attention: this rank's token slices in, its output slice out.

    The result equals linfusion_ops.linear_attention on the tokens of all ranks concatenated
    (in any order: the state is a sum), computed with one all-reduce of B*H*Dk*(Dv+1) + B + 8
    fp32 values (fp64 for fp64 inputs) in the forward and one in the backward.

    Args:
        q: (B, Nq_r, H*Dk) this rank's queries; float32, float16, bfloat16 or float64.
        k: (B, Nk_r, H*Dk) this rank's keys; v: (B, Nk_r, H*Dv) its values; same dtype and
            device as q. Nq_r and Nk_r may differ from rank to rank and from each other, and may
            be 0 or 1.
        heads: H.
        group: the process group holding the slices (default: the world group). Its backend
            must reduce q's device type (gloo: CPU and CUDA; NCCL: CUDA).
        feature_map: "elu" (LinFusion), "relu" or "identity"; the same on every rank.
        eps: added to the normalizer.
        key_padding_mask: optional (B, Nk_r) bool for this rank's keys, True = keep. A rank may
            have all its keys masked; a batch element with no kept key on any rank gives 0.
        check_ranks: verify after the all-reduce that every rank passed the same feature_map,
            dtype and shapes (costs one device-to-host read of 8 values; skipped inside
            torch.compile and CUDA graph capture).

    Returns:
        (B, Nq_r, H*Dv) in q's dtype: the attention of this rank's queries over all kept keys.
        Differentiable in q, k and v; every rank must run the backward.
    """
    check_feature_map(feature_map)
    _check_local_inputs(q, k, v, heads, key_padding_mask)
    core = SequenceParallelCore(
        resolve_group(group, q.device, _CALLER), feature_map=feature_map, eps=eps, check_ranks=check_ranks
    )
    state, key_mean = core.state(k, v, heads, key_padding_mask)
    state, key_mean = core.combine(state, key_mean, key_padding_mask, k.shape[1])
    return core.apply(q, state, key_mean, heads)


class SequenceParallelCore(FusedCore):
    """The linfusion_attention core for one rank's token slice: the local state of the slice's
    keys, ONE all-reduce of (n_r S_r, n_r z_r, n_r) plus the rank fingerprint (see the module
    docstring), the queries applied to the global state. Empty slices take the reference ops
    (no kernel launch on an empty tensor) and still join the collectives, forward and backward.

    Args:
        group: the process group holding the slices (default: the world group).
        feature_map, eps: as for FusedCore; feature_map the same on every rank.
        check_ranks: as for linear_attention.
    """

    def __init__(
        self,
        group: Optional["dist.ProcessGroup"] = None,
        *,
        feature_map: str = "elu",
        eps: float = LINFUSION_EPS,
        check_ranks: bool = True,
    ):
        super().__init__(feature_map, eps)
        self.group = group
        self.check_ranks = check_ranks

    def state(self, key, value, heads, key_padding_mask):
        state_fn = reference.linear_attention_state if key.shape[1] == 0 else linear_attention_state
        return state_fn(key, value, heads, feature_map=self.feature_map, key_padding_mask=key_padding_mask)

    def combine(self, state, key_mean, key_padding_mask, num_keys):
        group = resolve_group(self.group, state.device, _CALLER)
        acc = state.dtype
        b, h, dk, dv = state.shape
        if key_padding_mask is None:
            count = torch.full((b,), num_keys, dtype=acc, device=state.device)
        else:
            count = key_padding_mask.sum(dim=1).to(acc)
        digits = _fingerprint(self.feature_map, acc, tuple(state.shape), state.device)

        packed = torch.cat(
            [
                (state * count[:, None, None, None]).flatten(),
                (key_mean * count[:, None, None]).flatten(),
                count,
                digits,
            ]
        )
        total = _AllReduceSum.apply(packed, group)

        world = dist.get_world_size(group)
        if self.check_ranks and world <= _FINGERPRINT_MAX_WORLD and not _skip_host_checks():
            _check_fingerprint(total[-digits.numel():], world)

        state_size, key_mean_size = b * h * dk * dv, b * h * dk
        n = total[state_size + key_mean_size : state_size + key_mean_size + b].detach()
        inv_n = torch.where(n > 0, 1.0 / n.clamp(min=1), torch.zeros_like(n))
        global_state = total[:state_size].view(b, h, dk, dv) * inv_n[:, None, None, None]
        global_key_mean = total[state_size : state_size + key_mean_size].view(b, h, dk) * inv_n[:, None, None]
        return global_state, global_key_mean

    def apply(self, query, state, key_mean, heads):
        apply_fn = reference.linear_attention_apply if query.shape[1] == 0 else linear_attention_apply
        return apply_fn(query, state, key_mean, heads, feature_map=self.feature_map, eps=self.eps)


def token_slice(num_tokens: int, group: Optional["dist.ProcessGroup"] = None) -> slice:
    """This rank's contiguous share of num_tokens tokens under a near-even split (sizes differ by
    at most one; lower ranks take the extra tokens, as torch.tensor_split does). No collective.

    Use it to cut a flat (B, N, C) sequence: x[:, token_slice(N, group)]. A row-split image
    latent (patch parallelism) already gives each rank a contiguous token range of its own size;
    linear_attention accepts any sizes, so it needs no helper there.
    """
    if num_tokens < 0:
        raise ValueError(f"linfusion_ops.linfusion.distributed: num_tokens must be >= 0, got {num_tokens}")
    if group is None:
        group = dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    base, extra = divmod(num_tokens, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class SequenceParallelLinFusionAttnProcessor(SequenceParallelCore):
    """A diffusers attention processor for LinFusion self-attention over a token slice.

    Set it on the self-attention modules (`attn1`) of a UNet whose activations a
    sequence- or patch-parallel framework has split by tokens: each rank's `hidden_states` is
    its contiguous slice (B, N_r, C) of the image tokens (a row-split latent flattens to a
    contiguous range). The projections run on the local tokens; only the linear-attention state
    crosses ranks (SequenceParallelCore above), never the keys and values.

    It runs LinFusionAttnProcessor's body (linfusion_ops.linfusion.processor.linfusion_attention)
    and is its own core (a SequenceParallelCore with the same arguments). The module follows the
    layout of the official LinFusion checkpoints, a diffusers `Attention` with `to_q`, `to_k`,
    `to_v`, `to_out` and optional kernel-function MLPs `to_q_` / `to_k_` applied as residuals,
    q = to_q(x + to_q_(x)), k = to_k(x + to_k_(x)), v = to_v(x), each through the module's
    per-head qk-norm (norm_q / norm_k) when it has one. Without the MLPs it is plain linear
    attention over to_q/to_k/to_v.

    Args:
        group: the process group holding the token slices (default: the world group).
        feature_map, eps: as for linear_attention (LinFusion: "elu", 1e-4).
        check_ranks: as for linear_attention; False saves one device-to-host sync per layer.

    Not supported (ValueError): cross-attention (LinFusion keeps softmax cross-attention over
    the replicated text tokens, so it needs no communication), attention masks, 4-D inputs,
    and modules with group_norm or spatial_norm (they normalize over all tokens).
    """

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        if encoder_hidden_states is not None:
            raise ValueError(
                "SequenceParallelLinFusionAttnProcessor: encoder_hidden_states: cross-attention is "
                "not sequence-parallel here; keep the module's own processor for attn2"
            )
        if attention_mask is not None:
            raise ValueError("SequenceParallelLinFusionAttnProcessor: attention_mask is not supported")
        if hidden_states.dim() != 3:
            raise ValueError(
                "SequenceParallelLinFusionAttnProcessor: hidden_states must be (B, N_r, C), got "
                f"{hidden_states.dim()}-D"
            )
        if getattr(attn, "group_norm", None) is not None or getattr(attn, "spatial_norm", None) is not None:
            raise ValueError(
                "SequenceParallelLinFusionAttnProcessor: attn: group_norm / spatial_norm normalize "
                "over all tokens and are not supported"
            )
        return linfusion_attention(attn, hidden_states, core=self)
