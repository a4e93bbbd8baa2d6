"""Public ops: thin wrappers over torch.ops.linfusion_ops.*, their fake kernels and autograd.

Shapes: B batch, N tokens, H heads, D head dim, C = H * D. Inputs are token-major (B, N, H*D)
as produced by a diffusers to_q / to_k / to_v projection; a channel-contiguous tensor is read in
place whatever its row stride. Accumulation is fp32 (fp64 for fp64 inputs).
"""

from typing import Any, Callable, Optional, Tuple

import torch

from . import reference
from ._library import compiled

_lib = torch.ops.linfusion_ops if compiled() else None


def check_feature_map(feature_map: str) -> None:
    """Raise ValueError unless feature_map is one of reference.FEATURE_MAPS ("elu", "relu",
    "identity"). Callers that build on the ops (processors, sequence parallelism) check it early
    with the ops' own message."""
    if feature_map not in reference.FEATURE_MAPS:
        raise ValueError(
            f"linfusion_ops: feature_map must be one of {reference.FEATURE_MAPS}, got {feature_map!r}"
        )


def check_heads(x: torch.Tensor, heads: int, name: str) -> int:
    """The channels per head of a token-major (B, N, H*D) tensor x, after checking that heads > 0,
    x is 3-D and its last dim divides by heads (RuntimeError naming `name` otherwise; torch._check,
    so it also holds under torch.compile and for fake tensors)."""
    torch._check(heads > 0, lambda: f"linfusion_ops: heads must be positive, got {heads}")
    torch._check(x.dim() == 3, lambda: f"linfusion_ops: {name} must be 3-D (B, N, H*D), got {x.dim()}-D")
    torch._check(
        x.shape[2] % heads == 0,
        lambda: f"linfusion_ops: {name} channels ({x.shape[2]}) must be divisible by heads ({heads})",
    )
    return x.shape[2] // heads


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
def register_op_library(namespace: str) -> None:
    """Registers the fake kernels (shape logic only, so torch.compile(fullgraph=True) traces the
    ops) and the autograd of every op of torch.ops.<namespace>: linfusion_ops, or one of the CUDA
    emulation's namespaces (linfusion_ops.emulated), which share its schemas."""
    lib = getattr(torch.ops, namespace)

    @torch.library.register_fake(f"{namespace}::linear_attention_state")
    def _(k, v, heads, feature_map, key_padding_mask):
        dk = check_heads(k, heads, "k")
        dv = check_heads(v, heads, "v")
        torch._check(k.shape[:2] == v.shape[:2], lambda: "linfusion_ops: k and v must share (B, N)")
        # A meta tensor mixed with a real one dispatches here, not to the real kernel's checks.
        torch._check(k.device == v.device,
                     lambda: f"linfusion_ops: k and v must be on the same device, got {k.device} and {v.device}")
        acc = _acc_dtype(k.dtype)
        b = k.shape[0]
        return k.new_empty((b, heads, dk, dv), dtype=acc), k.new_empty((b, heads, dk), dtype=acc)

    # The kernels write gradients contiguous (token-major), whatever the inputs' strides.
    @torch.library.register_fake(f"{namespace}::linear_attention_state_backward")
    def _(grad_state, grad_key_mean, k, v, heads, feature_map, key_padding_mask):
        return k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake(f"{namespace}::linear_attention_apply")
    def _(q, state, key_mean, heads, feature_map, eps):
        check_heads(q, heads, "q")
        torch._check(q.device == state.device,
                     lambda: f"linfusion_ops: q and state must be on the same device, got {q.device} and {state.device}")
        return q.new_empty((q.shape[0], q.shape[1], heads * state.shape[3]))

    @torch.library.register_fake(f"{namespace}::linear_attention_apply_backward")
    def _(grad_out, q, state, key_mean, heads, feature_map, eps):
        return q.new_empty(q.shape), state.new_empty(state.shape), key_mean.new_empty(key_mean.shape)

    @torch.library.register_fake(f"{namespace}::layer_norm_leaky_relu")
    def _(x, weight, bias, eps, negative_slope):
        stats = x.new_empty(x.shape[:-1], dtype=_acc_dtype(x.dtype))
        return torch.empty_like(x), stats, torch.empty_like(stats)

    @torch.library.register_fake(f"{namespace}::layer_norm_leaky_relu_backward")
    def _(grad_out, x, weight, bias, mean, rstd, negative_slope):
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)

    @torch.library.register_fake(f"{namespace}::merge_segments")
    def _(embeds, keep, segment_ids, num_prompts, max_tokens, pad):
        torch._check(max_tokens > 0, lambda: f"linfusion_ops: max_tokens must be positive, got {max_tokens}")
        merged = embeds.new_empty((num_prompts, max_tokens, embeds.shape[2]))
        return merged, embeds.new_empty((num_prompts,), dtype=torch.int64)

    @torch.library.register_fake(f"{namespace}::merge_segments_backward")
    def _(grad_merged, keep, segment_ids, lengths, pad_per_slot):
        s, l = keep.shape
        c = grad_merged.shape[2]
        grad_pad_shape = (grad_merged.shape[1], c) if pad_per_slot else (c,)
        return grad_merged.new_empty((s, l, c)), grad_merged.new_empty(grad_pad_shape)

    # Autograd. Each backward calls the backward op; setup_context saves only what is needed.
    def _state_setup_context(ctx, inputs, output):
        k, v, heads, feature_map, key_padding_mask = inputs
        ctx.heads, ctx.feature_map = heads, feature_map
        ctx.save_for_backward(k, v, key_padding_mask)
        ctx.state_shape, ctx.key_mean_shape = output[0].shape, output[1].shape

    def _state_backward(ctx, grad_state, grad_key_mean):
        k, v, key_padding_mask = ctx.saved_tensors
        if grad_state is None:
            grad_state = grad_key_mean.new_zeros(ctx.state_shape)
        if grad_key_mean is None:
            grad_key_mean = grad_state.new_zeros(ctx.key_mean_shape)
        grad_k, grad_v = lib.linear_attention_state_backward.default(
            grad_state, grad_key_mean, k, v, ctx.heads, ctx.feature_map, key_padding_mask,
        )
        return grad_k, grad_v, None, None, None

    torch.library.register_autograd(
        f"{namespace}::linear_attention_state", _state_backward, setup_context=_state_setup_context
    )

    def _apply_setup_context(ctx, inputs, output):
        q, state, key_mean, heads, feature_map, eps = inputs
        ctx.heads, ctx.feature_map, ctx.eps = heads, feature_map, eps
        ctx.save_for_backward(q, state, key_mean)

    def _apply_backward(ctx, grad_out):
        q, state, key_mean = ctx.saved_tensors
        grad_q, grad_state, grad_key_mean = lib.linear_attention_apply_backward.default(
            grad_out, q, state, key_mean, ctx.heads, ctx.feature_map, ctx.eps
        )
        return grad_q, grad_state, grad_key_mean, None, None, None

    torch.library.register_autograd(
        f"{namespace}::linear_attention_apply", _apply_backward, setup_context=_apply_setup_context
    )

    def _layer_norm_setup_context(ctx, inputs, output):
        x, weight, bias, eps, negative_slope = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)  # statistics for the backward, not results
        ctx.negative_slope = negative_slope
        ctx.save_for_backward(x, weight, bias, mean, rstd)

    def _layer_norm_backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = lib.layer_norm_leaky_relu_backward.default(
            grad_out, x, weight, bias, mean, rstd, ctx.negative_slope
        )
        return grad_x, grad_weight, grad_bias, None, None

    torch.library.register_autograd(
        f"{namespace}::layer_norm_leaky_relu", _layer_norm_backward,
        setup_context=_layer_norm_setup_context,
    )
    # Under autocast the op runs in fp32, as F.layer_norm does: in mixed-precision training the
    # kernel MLP's LayerNorm keeps fp32 weights while its input (a Linear's output) is fp16/bf16.
    for device_type in ("cpu", "cuda"):
        torch.library.register_autocast(f"{namespace}::layer_norm_leaky_relu", device_type, torch.float32)

    def _merge_setup_context(ctx, inputs, output):
        embeds, keep, segment_ids, num_prompts, max_tokens, pad = inputs
        ctx.pad_per_slot = pad.dim() == 2
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(keep, segment_ids, output[1])

    def _merge_backward(ctx, grad_merged, _grad_lengths):
        keep, segment_ids, lengths = ctx.saved_tensors
        grad_embeds, grad_pad = lib.merge_segments_backward.default(
            grad_merged, keep, segment_ids, lengths, ctx.pad_per_slot
        )
        return grad_embeds, None, None, None, None, grad_pad

    torch.library.register_autograd(
        f"{namespace}::merge_segments", _merge_backward, setup_context=_merge_setup_context
    )


if compiled():
    register_op_library("linfusion_ops")


def _check_segment_ids_on_host(segment_ids: torch.Tensor, num_prompts: int) -> None:
    """The CUDA kernel cannot raise (it device-asserts, which poisons the CUDA context), so the
    public function checks the ids first, at the cost of one host sync per call; merging runs once
    per prompt encoding. Same message as the CPU kernel's check."""
    bad = ((segment_ids < 0) | (segment_ids >= num_prompts)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise RuntimeError(
            f"linfusion_ops: segment_ids must be in [0, num_prompts = {num_prompts}), "
            f"got segment_ids[{i}] = {int(segment_ids[i])}"
        )


# ---------------------------------------------------------------------------------------------
# Public API.
def _kernel_device_asserts(segment_ids: torch.Tensor) -> bool:
    return (
        segment_ids.is_cuda and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()
    )


class OpLibrary:
    """The public functions over one op namespace: torch.ops.linfusion_ops (this module's
    functions), or one of the CUDA emulation's (linfusion_ops.emulated).

    Args:
        namespace: returns the torch.ops namespace object to call, or None for the pure-PyTorch
            reference (the compiled module is missing).
        check_ids_on_host: whether merge_segments checks segment_ids on the host first, for
            tensors whose kernel device-asserts instead of raising.
    """

    def __init__(self, namespace: Callable[[], Any], check_ids_on_host: Callable[[torch.Tensor], bool]):
        self._namespace = namespace
        self._check_ids_on_host = check_ids_on_host

    def linear_attention_state(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        heads: int,
        *,
        feature_map: str = "elu",
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pass 1 of linear attention: reduce the keys and values to a fixed-size state.

        Args:
            k: (B, Nk, H*Dk) keys; float32, float16, bfloat16 or float64.
            v: (B, Nk, H*Dv) values, same dtype and device as k.
            heads: H.
            feature_map: "elu" (elu(x)+1, LinFusion), "relu" or "identity".
            key_padding_mask: optional (B, Nk) bool, True = keep the key.

        Returns:
            state (B, H, Dk, Dv) = (1/n) sum_j phi(k_j) v_j^T and key_mean (B, H, Dk) =
            (1/n) sum_j phi(k_j), fp32 (fp64 for fp64 inputs); n = number of kept keys, and n = 0
            gives zeros. The state of several token shards can be summed (weighted by n) before
            linear_attention_apply, e.g. across GPUs.
        """
        check_feature_map(feature_map)
        lib = self._namespace()
        if lib is None:
            return reference.linear_attention_state(
                k, v, heads, feature_map=feature_map, key_padding_mask=key_padding_mask
            )
        return lib.linear_attention_state.default(k, v, heads, feature_map, key_padding_mask)

    def linear_attention_apply(
        self,
        q: torch.Tensor,
        state: torch.Tensor,
        key_mean: torch.Tensor,
        heads: int,
        *,
        feature_map: str = "elu",
        eps: float = 1e-4,
    ) -> torch.Tensor:
        """Pass 2 of linear attention: o_i = phi(q_i)^T state / (phi(q_i) . key_mean + eps).

        Args:
            q: (B, Nq, H*Dk) queries; float32, float16, bfloat16 or float64.
            state: (B, H, Dk, Dv) and key_mean: (B, H, Dk) from linear_attention_state (fp32, or
                fp64 for fp64 q).
            heads: H. feature_map: as for the state. eps: >= 0, added to the normalizer.

        Returns:
            (B, Nq, H*Dv) in q's dtype.
        """
        check_feature_map(feature_map)
        lib = self._namespace()
        if lib is None:
            if eps < 0:
                raise ValueError(f"linfusion_ops: eps must be finite and >= 0, got {eps}")
            return reference.linear_attention_apply(q, state, key_mean, heads, feature_map=feature_map, eps=eps)
        return lib.linear_attention_apply.default(q, state, key_mean, heads, feature_map, float(eps))

    def linear_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        heads: int,
        *,
        feature_map: str = "elu",
        eps: float = 1e-4,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """LinFusion's generalized linear attention (normalized, non-causal).

        o_i = phi(q_i)^T S / (phi(q_i) . z + eps), S = (1/n) sum_j phi(k_j) v_j^T,
        z = (1/n) sum_j phi(k_j), per batch and head.

        Args:
            q: (B, Nq, H*Dk); k: (B, Nk, H*Dk); v: (B, Nk, H*Dv). Same dtype (float32, float16,
                bfloat16, float64) and device. Nq may differ from Nk (cross-attention). Slices of a
                fused qkv projection are read in place.
            heads: H.
            feature_map: "elu" (elu(x)+1, LinFusion's), "relu" or "identity".
            eps: added to the normalizer (LinFusion: 1e-4).
            key_padding_mask: optional (B, Nk) bool, True = keep.

        Returns:
            (B, Nq, H*Dv) in q's dtype. Differentiable in q, k and v; the backward keeps only the
            inputs and the fp32 state.
        """
        # The two passes check k against v and q against the state; q against k is checked here.
        # (Plain raises: torch._check's message closure may not capture tensors under torch.compile.)
        if q.dtype != k.dtype:
            raise RuntimeError(f"linfusion_ops: q and k must have the same dtype, got {q.dtype} and {k.dtype}")
        if q.device != k.device:
            raise RuntimeError(f"linfusion_ops: q and k must be on the same device, got {q.device} and {k.device}")
        if q.dim() == 3 and k.dim() == 3 and q.shape[0] != k.shape[0]:
            raise RuntimeError(
                f"linfusion_ops: q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}"
            )
        state, key_mean = self.linear_attention_state(
            k, v, heads, feature_map=feature_map, key_padding_mask=key_padding_mask
        )
        return self.linear_attention_apply(q, state, key_mean, heads, feature_map=feature_map, eps=eps)

    def layer_norm_leaky_relu(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        *,
        eps: float = 1e-5,
        negative_slope: float = 0.01,
    ) -> torch.Tensor:
        """Fused leaky_relu(layer_norm(x)) over the last dim, as in LinFusion's kernel-function MLP.

        Args:
            x: (..., C) float32, float16, bfloat16 or float64.
            weight, bias: (C,), same dtype and device as x.
            eps: LayerNorm epsilon (> 0). negative_slope: LeakyReLU slope.

        Returns:
            Tensor shaped and typed like x. Differentiable in x, weight and bias.
        """
        lib = self._namespace()
        if lib is None:
            return reference.layer_norm_leaky_relu(x, weight, bias, eps=eps, negative_slope=negative_slope)
        out, _, _ = lib.layer_norm_leaky_relu.default(x, weight, bias, float(eps), float(negative_slope))
        return out

    def merge_segments(
        self,
        embeds: torch.Tensor,
        keep: torch.Tensor,
        segment_ids: torch.Tensor,
        num_prompts: int,
        max_tokens: int,
        pad: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """LongAlign's merge of per-segment text embeddings into one sequence per prompt.

        Args:
            embeds: (S, L, C) encoder outputs of S segments (float dtypes).
            keep: (S, L) bool, the tokens to keep.
            segment_ids: (S,) int64, the prompt of each segment, in [0, num_prompts). Within a
                prompt, segments are taken in increasing segment index. On CUDA this function
                checks the range with one host sync (outside graph capture and torch.compile);
                the op itself, torch.ops.linfusion_ops.merge_segments, device-asserts instead.
            num_prompts: B. max_tokens: T, the token budget (> 0).
            pad: (C,) or (T, C), same dtype as embeds, fills the slots after the kept tokens.

        Returns:
            merged (B, T, C) in embeds' dtype, and lengths (B,) int64: the slots filled from
            segments (the kept tokens, truncated to T). Differentiable in embeds and pad.
        """
        lib = self._namespace()
        if lib is None:
            return reference.merge_segments(embeds, keep, segment_ids, num_prompts, max_tokens, pad)
        if self._check_ids_on_host(segment_ids):
            _check_segment_ids_on_host(segment_ids, num_prompts)
        return lib.merge_segments.default(embeds, keep, segment_ids, int(num_prompts), int(max_tokens), pad)


_ops = OpLibrary(lambda: _lib, _kernel_device_asserts)
linear_attention_state = _ops.linear_attention_state
linear_attention_apply = _ops.linear_attention_apply
linear_attention = _ops.linear_attention
layer_norm_leaky_relu = _ops.layer_norm_leaky_relu
merge_segments = _ops.merge_segments
