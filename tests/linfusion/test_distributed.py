"""linfusion_ops.linfusion.distributed: sequence-parallel linear attention across processes.

Process groups of 2 and 3 ranks (gloo, CPU) are spawned once per world size; every rank runs all
the CHECKS below and reports each one's failure (or None) to the parent, and each check is one
pytest case. Each rank builds the full inputs from the same seed, runs the single-process op on
them as the oracle, and compares its own slice of the output and of the gradients.
"""

import datetime
import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import linfusion_ops
from tests.helpers.tolerances import assert_close_lowp, default_floor

sp = linfusion_ops.linfusion.distributed

B, H, DK, DV = 2, 2, 5, 3
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "all_to_all", "all_to_all_single", "reduce", "gather",
    "scatter", "barrier",
)

# (query slice sizes, key slice sizes, feature map) per world size: uneven slices, ranks holding
# one token, ranks holding none, and cross-attention lengths (Nq != Nk).
CASES = {
    2: [([1, 6], [1, 6], "elu"), ([5, 5], [5, 5], "relu"), ([2, 5], [6, 3], "identity")],
    3: [([4, 1, 3], [4, 1, 3], "elu"), ([1, 1, 1], [1, 1, 1], "elu"), ([3, 0, 4], [2, 5, 0], "relu")],
}


class CollectiveCounter:
    """Counts calls of the torch.distributed collectives (which linfusion_ops.linfusion.distributed looks up
    as dist.<name> at call time)."""

    def __init__(self):
        self.counts = {}
        for name in COLLECTIVES:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.counts[name] = self.counts.get(name, 0) + 1
            return fn(*args, **kwargs)

        return counted

    def take(self):
        counts, self.counts = self.counts, {}
        return counts


def make_inputs(nq, nk, feature_map, dtype, seed):
    """Full (all ranks') q, k, v and an output weight w, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nq, H * DK, generator=gen, dtype=torch.float64)
    k = torch.randn(B, nk, H * DK, generator=gen, dtype=torch.float64)
    v = torch.randn(B, nk, H * DV, generator=gen, dtype=torch.float64)
    w = torch.randn(B, nq, H * DV, generator=gen, dtype=torch.float64)
    if feature_map == "identity":
        # identity needs positive features to keep the normalizer away from 0
        q, k = q.abs() + 0.1, k.abs() + 0.1
    return [t.to(dtype) for t in (q, k, v, w)]


def own(x, sizes, rank):
    return x.split(sizes, dim=1)[rank]


def oracle(q, k, v, w, feature_map, mask=None):
    """Single-process output and gradients of sum(o * w) on the full tensors."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = linfusion_ops.linear_attention(q, k, v, H, feature_map=feature_map, key_padding_mask=mask)
    grads = torch.autograd.grad((out.double() * w.double()).sum(), (q, k, v))
    return out.detach(), grads


def run_local(q, k, v, w, sizes_q, sizes_k, rank, counter, feature_map, mask=None, **kwargs):
    """This rank's output and gradients, asserting one all-reduce in the forward and one in the
    backward."""
    q_r, k_r, v_r = (
        own(t, s, rank).detach().requires_grad_() for t, s in ((q, sizes_q), (k, sizes_k), (v, sizes_k))
    )
    mask_r = None if mask is None else own(mask, sizes_k, rank)
    counter.take()
    out = sp.linear_attention(q_r, k_r, v_r, H, feature_map=feature_map, key_padding_mask=mask_r, **kwargs)
    assert counter.take() == {"all_reduce": 1}, "forward must do exactly one all-reduce"
    (out.double() * own(w, sizes_q, rank).double()).sum().backward()
    assert counter.take() == {"all_reduce": 1}, "backward must do exactly one all-reduce"
    return out.detach(), (q_r.grad, k_r.grad, v_r.grad)


def compare(out, grads, ref_out, ref_grads, sizes_q, sizes_k, rank, dtype, lowp=None):
    """assert_close_lowp on this rank's slices; lowp = (out, grads) of the single-process op in
    dtype when dtype is below fp64 (None: compare to the reference directly)."""
    lowp_out, lowp_grads = lowp if lowp is not None else (ref_out, ref_grads)
    floor = default_floor(dtype)
    assert out.shape == own(ref_out, sizes_q, rank).shape
    assert_close_lowp(out, own(lowp_out, sizes_q, rank), own(ref_out, sizes_q, rank), floor, "output")
    for name, g, lg, rg, sizes in zip(
        ("dq", "dk", "dv"), grads, lowp_grads, ref_grads, (sizes_q, sizes_k, sizes_k)
    ):
        assert g.dtype == dtype and g.shape == own(rg, sizes, rank).shape, name
        assert_close_lowp(g, own(lg, sizes, rank), own(rg, sizes, rank), floor, name)


# ---------------------------------------------------------------------------------------------
# Checks run by every rank of a spawned group.
def check_matches_single_process(rank, world, counter):
    for i, (sizes_q, sizes_k, feature_map) in enumerate(CASES[world]):
        q, k, v, w = make_inputs(sum(sizes_q), sum(sizes_k), feature_map, torch.float64, seed=i)
        ref_out, ref_grads = oracle(q, k, v, w, feature_map)
        out, grads = run_local(q, k, v, w, sizes_q, sizes_k, rank, counter, feature_map)
        compare(out, grads, ref_out, ref_grads, sizes_q, sizes_k, rank, torch.float64)


def check_masked_keys(rank, world, counter):
    sizes = CASES[world][0][0]
    q, k, v, w = make_inputs(sum(sizes), sum(sizes), "elu", torch.float64, seed=10)
    mask = torch.rand(B, sum(sizes), generator=torch.Generator().manual_seed(11)) > 0.4
    mask[:, : sizes[0]] = False  # every key of rank 0 is masked
    mask[0, sizes[0]] = True  # batch 0 keeps at least one key
    mask[1] = False  # batch 1 has no kept key on any rank: its output is 0
    ref_out, ref_grads = oracle(q, k, v, w, "elu", mask)
    out, grads = run_local(q, k, v, w, sizes, sizes, rank, counter, "elu", mask)
    compare(out, grads, ref_out, ref_grads, sizes, sizes, rank, torch.float64)
    assert (out[1] == 0).all() and (grads[1][1] == 0).all() and (grads[2][1] == 0).all()


def check_low_precision(rank, world, counter):
    sizes_q, sizes_k, feature_map = CASES[world][0]
    full = make_inputs(sum(sizes_q), sum(sizes_k), feature_map, torch.float64, seed=20)
    ref_out, ref_grads = oracle(*full, feature_map)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, w = (t.to(dtype) for t in full)
        lowp = oracle(q, k, v, w, feature_map)
        out, grads = run_local(q, k, v, w, sizes_q, sizes_k, rank, counter, feature_map)
        assert out.dtype == dtype
        compare(out, grads, ref_out, ref_grads, sizes_q, sizes_k, rank, dtype, lowp)


def check_ranks_disagree(rank, world, counter):
    q, k, v, _ = make_inputs(world, world, "elu", torch.float64, seed=30)
    q_r, k_r, v_r = q[:, rank : rank + 1], k[:, rank : rank + 1], v[:, rank : rank + 1]
    with pytest.raises(ValueError, match="different feature_map"):
        sp.linear_attention(q_r, k_r, v_r, H, feature_map="relu" if rank == 0 else "elu")
    # The same all-reduce without the check goes through on every rank.
    sp.linear_attention(q_r, k_r, v_r, H, feature_map="relu" if rank == 0 else "elu", check_ranks=False)
    counter.take()


def check_bad_arguments(rank, world, counter):
    """Local argument errors are raised before the collective (every rank here errs alike)."""
    q, k, v, _ = make_inputs(world, world, "elu", torch.float64, seed=40)
    with pytest.raises(ValueError, match="key_padding_mask"):
        sp.linear_attention(q, k, v, H, key_padding_mask=torch.ones(B, world + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="channels per head"):
        sp.linear_attention(q, k[..., :-H], v, H)
    with pytest.raises(ValueError, match="dtype and device"):
        sp.linear_attention(q, k.float(), v, H)
    with pytest.raises(ValueError, match="feature_map"):
        sp.linear_attention(q, k, v, H, feature_map="softmax")
    meta = [t.to("meta") for t in (q, k, v)]
    with pytest.raises(ValueError, match="cannot reduce meta tensors"):
        sp.linear_attention(*meta, H)
    assert counter.take() == {}


def check_token_slice(rank, world, counter):
    for n in (0, 1, world + 1, 10):
        expected = torch.arange(n).tensor_split(world)[rank].tolist()
        assert list(range(n))[sp.token_slice(n)] == expected


def check_processor(rank, world, counter):
    """The diffusers processor on a LinFusion-style module (kernel-function MLPs to_q_ / to_k_)
    against the official formula on all tokens; the parameter gradients summed over ranks (what
    DDP would do) equal the single-process ones."""
    from diffusers.models.attention_processor import Attention

    channels, heads = 16, 2
    torch.manual_seed(50)
    attn = Attention(query_dim=channels, heads=heads, dim_head=channels // heads).double()
    for name in ("to_q_", "to_k_"):
        setattr(attn, name, torch.nn.Sequential(
            torch.nn.Linear(channels, channels), torch.nn.LayerNorm(channels),
            torch.nn.LeakyReLU(), torch.nn.Linear(channels, channels),
        ).double())
    sizes = CASES[world][0][0]
    x = torch.randn(B, sum(sizes), channels, dtype=torch.float64)
    w = torch.randn(B, sum(sizes), channels, dtype=torch.float64)

    x_full = x.clone().requires_grad_()
    q = attn.to_q(x_full + attn.to_q_(x_full))
    k = attn.to_k(x_full + attn.to_k_(x_full))
    ref = attn.to_out[0](linfusion_ops.reference.official_linear_attention(q, k, attn.to_v(x_full), heads))
    (ref * w).sum().backward()
    ref_param_grads = {n: p.grad.clone() for n, p in attn.named_parameters()}
    attn.zero_grad()

    attn.set_processor(sp.SequenceParallelLinFusionAttnProcessor())
    x_r = own(x, sizes, rank).clone().requires_grad_()
    counter.take()
    out = attn(x_r)
    (out * own(w, sizes, rank)).sum().backward()
    assert counter.take() == {"all_reduce": 2}, "one all-reduce in the forward, one in the backward"
    floor = default_floor(torch.float64)
    assert_close_lowp(out, own(ref.detach(), sizes, rank), own(ref.detach(), sizes, rank), floor, "output")
    assert_close_lowp(x_r.grad, own(x_full.grad, sizes, rank), own(x_full.grad, sizes, rank), floor, "dx")
    for name, p in attn.named_parameters():
        dist.all_reduce(p.grad)
        assert_close_lowp(p.grad, ref_param_grads[name], ref_param_grads[name], floor, name)


CHECKS = [
    check_matches_single_process, check_masked_keys, check_low_precision, check_ranks_disagree,
    check_bad_arguments, check_token_slice, check_processor,
]


def worker(rank, world, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    counter = CollectiveCounter()
    failures = {}
    for check in CHECKS:
        try:
            check(rank, world, counter)
            failures[check.__name__] = None
        except Exception:
            failures[check.__name__] = traceback.format_exc()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(failures, f)
    # The results are on disk. Skip the interpreter's teardown: in about one run of ten a spawned
    # gloo rank aborts there ("terminate called without an active exception", no Python frame
    # left; torch 2.14), after every check has finished.
    os._exit(0)


_RESULTS = {}


def group_results(world, tmp_path_factory):
    """Per-rank failures of every check, from one spawned group of `world` processes."""
    if world not in _RESULTS:
        out_dir = tmp_path_factory.mktemp(f"world{world}")
        mp.spawn(worker, args=(world, str(out_dir / "store"), str(out_dir)), nprocs=world, join=True)
        _RESULTS[world] = []
        for rank in range(world):
            with open(out_dir / f"rank{rank}.json") as f:
                _RESULTS[world].append(json.load(f))
    return _RESULTS[world]


@pytest.mark.parametrize("check", [c.__name__ for c in CHECKS])
@pytest.mark.parametrize("world", [2, 3])
def test_distributed(world, check, tmp_path_factory):
    if check == "check_processor":
        pytest.importorskip("diffusers")  # optional: benchmarks/gpu_check.sh runs without it
    failures = {rank: r[check] for rank, r in enumerate(group_results(world, tmp_path_factory)) if r[check]}
    assert not failures, "\n".join(f"rank {rank}:\n{tb}" for rank, tb in failures.items())


# ---------------------------------------------------------------------------------------------
# Single-process checks (no process group).
def test_requires_initialized_group():
    q = torch.randn(B, 3, H * DK)
    with pytest.raises(RuntimeError, match="not initialized"):
        sp.linear_attention(q, q, q, H)


def test_processor_rejects_unsupported_inputs():
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=8, heads=2, dim_head=4)
    proc = sp.SequenceParallelLinFusionAttnProcessor()
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="cross-attention"):
        proc(attn, x, encoder_hidden_states=x)
    with pytest.raises(ValueError, match="attention_mask"):
        proc(attn, x, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="feature_map"):
        sp.SequenceParallelLinFusionAttnProcessor(feature_map="softmax")
