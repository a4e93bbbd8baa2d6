"""merge_segments: forward and backward against linfusion_ops.reference, gradcheck, opcheck,
torch.compile together with layer_norm_leaky_relu, bad input and deterministic pad gradients."""

import re

import pytest
import torch

import linfusion_ops
from linfusion_ops import reference
from tests.helpers.backends import DEVICES, requires_compiled
from tests.helpers.tolerances import assert_close_lowp, default_floor

pytestmark = requires_compiled

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
OP = torch.ops.linfusion_ops.merge_segments.default
BACKWARD_OP = torch.ops.linfusion_ops.merge_segments_backward.default


def _make(segments, length, channels, ids, num_prompts, max_tokens, device, dtype, seed,
          keep="random", pad_per_slot=False):
    """(embeds, keep, segment_ids, num_prompts, max_tokens, pad). keep: "random", "none" (every
    token dropped) or "longalign" (start token kept, end and padding tokens dropped)."""
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(segments, length, channels, generator=gen, dtype=torch.float64)
    if keep == "random":
        mask = torch.rand(segments, length, generator=gen) < 0.7
    elif keep == "none":
        mask = torch.zeros(segments, length, dtype=torch.bool)
    else:
        # CLIP layout: <start> words <end> <pad>...; LongAlign keeps <start> and the words.
        words = torch.randint(0, length - 1, (segments,), generator=gen)
        mask = torch.arange(length)[None, :] <= words[:, None]
    pad_shape = (max_tokens, channels) if pad_per_slot else (channels,)
    pad = torch.randn(pad_shape, generator=gen, dtype=torch.float64)
    return (embeds.to(device=device, dtype=dtype), mask.to(device),
            torch.tensor(ids, dtype=torch.int64, device=device), num_prompts, max_tokens,
            pad.to(device=device, dtype=dtype))


def sample_inputs(device, dtype):
    """Yields (embeds, keep, segment_ids, num_prompts, max_tokens, pad): C = 1, 33, 768; S = 0 to
    300; segments in shuffled prompt order; prompts without segments; truncation; every token
    dropped; a budget smaller than one segment; pad (C,) and (T, C); non-contiguous embeds."""
    yield _make(1, 5, 1, [0], 1, 3, device, dtype, 1)
    yield _make(7, 11, 33, [2, 0, 1, 0, 2, 1, 0], 3, 20, device, dtype, 2, pad_per_slot=True)
    yield _make(12, 77, 768, [0] * 6 + [1] * 6, 2, 240, device, dtype, 3, keep="longalign")
    ids = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(4)).tolist()
    yield _make(300, 9, 33, ids, 4, 64, device, dtype, 5, pad_per_slot=True)
    yield _make(5, 13, 33, [1, 0, 1, 0, 1], 2, 16, device, dtype, 6, keep="none")
    yield _make(2, 77, 33, [0, 0], 1, 5, device, dtype, 7, keep="longalign", pad_per_slot=True)
    yield _make(0, 7, 33, [], 2, 6, device, dtype, 8)
    yield _make(0, 7, 33, [], 0, 6, device, dtype, 9, pad_per_slot=True)
    yield _make(4, 6, 33, [2, 0, 2, 0], 4, 10, device, dtype, 10)
    embeds, keep, ids, num_prompts, max_tokens, pad = _make(
        6, 20, 66, [1, 1, 0, 2, 0, 1], 3, 24, device, dtype, 11)
    yield embeds[:, ::2, ::2], keep[:, ::2], ids, num_prompts, max_tokens, pad[::2]


def _reference_lengths(keep, segment_ids, num_prompts, max_tokens):
    kept = torch.zeros(num_prompts, dtype=torch.int64)
    for s in range(keep.shape[0]):
        kept[int(segment_ids[s])] += int(keep[s].sum())
    return kept.clamp(max=max_tokens)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_reference(device, dtype):
    for embeds, keep, ids, num_prompts, max_tokens, pad in sample_inputs(device, dtype):
        merged, lengths = OP(embeds, keep, ids, num_prompts, max_tokens, pad)
        ref_merged, ref_lengths = reference.merge_segments(embeds, keep, ids, num_prompts,
                                                           max_tokens, pad)
        assert merged.shape == (num_prompts, max_tokens, embeds.shape[2]) and merged.dtype == dtype
        # A merge copies values: exact equality in every dtype.
        assert torch.equal(merged, ref_merged)
        assert lengths.dtype == torch.int64 and torch.equal(lengths, ref_lengths)
        assert torch.equal(lengths.cpu(), _reference_lengths(keep.cpu(), ids.cpu(), num_prompts,
                                                             max_tokens))


@pytest.mark.parametrize("device", DEVICES)
def test_public_api_matches_op(device):
    embeds, keep, ids, num_prompts, max_tokens, pad = _make(
        5, 9, 33, [1, 0, 1, 1, 0], 2, 12, device, torch.float32, 20)
    merged, lengths = linfusion_ops.merge_segments(embeds, keep, ids, num_prompts, max_tokens, pad)
    ref_merged, ref_lengths = OP(embeds, keep, ids, num_prompts, max_tokens, pad)
    assert torch.equal(merged, ref_merged) and torch.equal(lengths, ref_lengths)


def _grads(fn, sample, grad_merged):
    embeds, keep, ids, num_prompts, max_tokens, pad = sample
    embeds, pad = embeds.detach().requires_grad_(), pad.detach().requires_grad_()
    merged, _ = fn(embeds, keep, ids, num_prompts, max_tokens, pad)
    return torch.autograd.grad(merged, (embeds, pad), grad_merged.to(merged.dtype),
                               allow_unused=True)


def _reference_fp64(embeds, keep, ids, num_prompts, max_tokens, pad):
    return reference.merge_segments(embeds.double(), keep, ids, num_prompts, max_tokens,
                                    pad.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_reference(device, dtype):
    for i, sample in enumerate(sample_inputs(device, dtype)):
        embeds, _, _, num_prompts, max_tokens, pad = sample
        grad_merged = torch.randn(num_prompts, max_tokens, embeds.shape[2], dtype=torch.float64,
                                  generator=torch.Generator().manual_seed(100 + i)).to(device, dtype)
        grad_embeds, grad_pad = _grads(linfusion_ops.merge_segments, sample, grad_merged)
        ref_embeds, ref_pad = _grads(_reference_fp64, sample, grad_merged)
        # The reference leaves the gradient of an unused input (S = 0, or no pad slot) undefined.
        if ref_embeds is None:
            ref_embeds = torch.zeros_like(embeds, dtype=torch.float64)
        if ref_pad is None:
            ref_pad = torch.zeros_like(pad, dtype=torch.float64)
        # Scattering copies values, exactly in every dtype; the pad gradient is a sum, held to the
        # tolerance rule against the reference in the same dtype (one more reference run for
        # fp16 / bf16, the fp64 one serving for fp32 and fp64).
        assert grad_embeds.dtype == dtype and torch.equal(grad_embeds.double(), ref_embeds)
        assert grad_pad.shape == pad.shape and grad_pad.dtype == dtype
        ref_pad_lowp = ref_pad
        if dtype in (torch.float16, torch.bfloat16):
            ref_pad_lowp = _grads(reference.merge_segments, sample, grad_merged)[1]
            if ref_pad_lowp is None:
                ref_pad_lowp = ref_pad
        assert_close_lowp(grad_pad, ref_pad_lowp, ref_pad,
                          floor=default_floor(dtype) * max(1.0, ref_pad.abs().max().item()),
                          name="grad_pad")


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64(device):
    for pad_per_slot in (False, True):
        embeds, keep, ids, num_prompts, max_tokens, pad = _make(
            5, 6, 3, [1, 0, 1, 1, 0], 3, 7, device, torch.float64, 30, pad_per_slot=pad_per_slot)

        def fn(embeds, pad):
            return linfusion_ops.merge_segments(embeds, keep, ids, num_prompts, max_tokens, pad)[0]

        assert torch.autograd.gradcheck(fn, (embeds.requires_grad_(), pad.requires_grad_()))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    # Registration (schema, fake kernel, autograd) does not depend on the dtype: fp32 samples only.
    for embeds, keep, ids, num_prompts, max_tokens, pad in sample_inputs(device, torch.float32):
        torch.library.opcheck(OP, (embeds.requires_grad_(), keep, ids, num_prompts, max_tokens,
                                   pad.requires_grad_()))
        _, lengths = OP(embeds.detach(), keep, ids, num_prompts, max_tokens, pad.detach())
        grad_merged = torch.randn(num_prompts, max_tokens, embeds.shape[2], device=device)
        torch.library.opcheck(BACKWARD_OP, (grad_merged, keep, ids, lengths, pad.dim() == 2))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_with_layer_norm(device):
    """Both ops of the text path in one compiled graph, forward and backward."""
    embeds, keep, ids, num_prompts, max_tokens, pad = _make(
        6, 10, 33, [1, 0, 1, 0, 0, 1], 2, 16, device, torch.float32, 40, keep="longalign")
    weight = torch.randn(33, device=device)
    bias = torch.randn(33, device=device)

    def fn(embeds, weight, bias, pad):
        hidden = linfusion_ops.layer_norm_leaky_relu(embeds, weight, bias)
        merged, lengths = linfusion_ops.merge_segments(hidden, keep, ids, num_prompts, max_tokens,
                                                       pad)
        return merged * 2.0, lengths

    # aot_eager runs Dynamo and AOTAutograd (the fake kernels, the autograd registration), which
    # is what fullgraph=True checks; inductor would add a C++ build of the `* 2.0` (~20 s of CPU).
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    inputs = [t.clone().requires_grad_() for t in (embeds, weight, bias, pad)]
    eager_inputs = [t.clone().requires_grad_() for t in (embeds, weight, bias, pad)]
    merged, lengths = compiled(*inputs)
    eager_merged, eager_lengths = fn(*eager_inputs)
    assert torch.equal(merged, eager_merged) and torch.equal(lengths, eager_lengths)
    merged.square().sum().backward()
    eager_merged.square().sum().backward()
    for got, expected in zip(inputs, eager_inputs):
        torch.testing.assert_close(got.grad, expected.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_pad_gradient_is_deterministic(device):
    embeds, keep, ids, num_prompts, max_tokens, pad = _make(
        40, 77, 64, list(range(8)) * 5, 8, 512, device, torch.float32, 50, keep="longalign")
    _, lengths = OP(embeds, keep, ids, num_prompts, max_tokens, pad)
    grad_merged = torch.randn(num_prompts, max_tokens, 64, device=device)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append([BACKWARD_OP(grad_merged, keep, ids, lengths, per_slot)[1]
                            for per_slot in (False, True)])
    finally:
        torch.set_num_threads(previous)
    for grads in results[1:]:
        for got, first in zip(grads, results[0]):
            assert torch.equal(got, first)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_without_slots(device):
    """grad_merged with T = 0 (no slot to take a gradient from): every gradient is zero, and a
    (C,) pad's gradient is the empty sum, zeros, not uninitialised memory."""
    keep = torch.ones(3, 4, dtype=torch.bool, device=device)
    ids = torch.tensor([0, 1, 0], device=device)
    lengths = torch.zeros(2, dtype=torch.int64, device=device)
    grad_merged = torch.empty(2, 0, 8, device=device)
    for pad_per_slot, pad_shape in ((False, (8,)), (True, (0, 8))):
        grad_embeds, grad_pad = BACKWARD_OP(grad_merged, keep, ids, lengths, pad_per_slot)
        assert torch.equal(grad_embeds, torch.zeros(3, 4, 8, device=device))
        assert torch.equal(grad_pad, torch.zeros(pad_shape, device=device))


def _bad_inputs(device):
    embeds, keep, ids, num_prompts, max_tokens, pad = _make(
        4, 6, 8, [0, 1, 0, 1], 2, 10, device, torch.float32, 60)
    good = dict(embeds=embeds, keep=keep, segment_ids=ids, num_prompts=num_prompts,
                max_tokens=max_tokens, pad=pad)
    cases = [
        (dict(keep=keep[:, :5]), "keep must have shape (4, 6)"),
        (dict(keep=keep.to(torch.uint8)), "keep must be bool"),
        (dict(segment_ids=torch.tensor([0, 1, 2, 1], device=device)),
         "segment_ids must be in [0, num_prompts = 2), got segment_ids[2] = 2"),
        (dict(segment_ids=torch.tensor([0, -1, 0, 1], device=device)),
         "segment_ids must be in [0, num_prompts = 2), got segment_ids[1] = -1"),
        (dict(num_prompts=0), "segment_ids must be in [0, num_prompts = 0)"),
        (dict(segment_ids=ids.to(torch.int32)), "segment_ids must be int64"),
        (dict(segment_ids=ids[:3]), "segment_ids must have shape (4,)"),
        (dict(max_tokens=0), "max_tokens must be positive"),
        (dict(max_tokens=-3), "max_tokens must be positive"),
        (dict(num_prompts=-1), "num_prompts must be >= 0"),
        (dict(pad=pad[:7]), "pad must have shape (8,) or (10, 8)"),
        (dict(pad=torch.zeros(9, 8, device=device)), "pad must have shape (8,) or (10, 8)"),
        (dict(pad=pad.double()), "embeds and pad must have the same dtype"),
        (dict(embeds=embeds[0]), "embeds must be 3-D"),
        (dict(embeds=embeds.to(torch.int64)), "embeds must be float32, float16, bfloat16 or float64"),
    ]
    for change, message in cases:
        yield {**good, **change}, message


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    # Through the public function: on CUDA the op itself only device-asserts on out-of-range
    # segment ids (no host sync in the kernel), and the public function checks them first.
    for args, message in _bad_inputs(device):
        with pytest.raises(RuntimeError, match=re.escape(message)):
            linfusion_ops.merge_segments(**args)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_bad_input(device):
    embeds, keep, ids, num_prompts, max_tokens, pad = _make(
        4, 6, 8, [0, 1, 0, 1], 2, 10, device, torch.float32, 61)
    _, lengths = OP(embeds, keep, ids, num_prompts, max_tokens, pad)
    grad = torch.randn(num_prompts, max_tokens, 8, device=device)
    cases = [
        ((grad, keep, ids, lengths[:1]), "lengths must have shape (2,)"),
        ((grad, keep, ids, lengths.int()), "lengths must be int64"),
        ((grad[0], keep, ids, lengths), "grad_merged must be 3-D"),
    ]
    if device == "cpu":
        # Value checks need the data on the host; the CUDA backward re-plans from keep and
        # segment_ids (never reading lengths' values) and device-asserts on bad ids.
        cases += [
            ((grad, keep, ids, lengths + 1), "lengths must be the forward's output"),
            ((grad[:1], keep, ids, lengths[:1]), "segment_ids must be in [0, num_prompts = 1)"),
        ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            BACKWARD_OP(*args, False)
