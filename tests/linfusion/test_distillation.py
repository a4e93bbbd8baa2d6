"""LinFusion distillation (linfusion_ops.linfusion.distillation and the linfusion_ops.linfusion.distill script): the loss
against the official formula, what is trained, the shared teacher, the attn1 feature tap with and
without gradient checkpointing, convergence on a fixed batch, v-prediction, SD XL conditioning,
bf16 autocast, the script end to end (run, resume, reload, official loader) and two-rank DDP.
Offline, on tiny random UNets and images written here."""

import copy
import datetime
import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from diffusers import ConfigMixin, DDPMScheduler, EulerDiscreteScheduler, ModelMixin  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402

from linfusion_ops import LinFusion, LinFusionAttnProcessor  # noqa: E402
from linfusion_ops.linfusion import distill  # noqa: E402
from linfusion_ops.linfusion.distillation import (  # noqa: E402
    Attn1FeatureTap,
    diffusion_target,
    distillation_forward,
    distillation_loss,
    init_linfusion,
    teacher_forward,
    trainable_parameters,
)
from tests.helpers.tiny_models import (  # noqa: E402
    make_unet,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    unet_inputs,
    write_captioned_images,
)


def student(kind="sd15", init="fresh", dtype=torch.float32, mid_dim_scale=None):
    """A tiny UNet with a LinFusion mounted for distillation, its trainable parameters and a tap."""
    unet = make_unet(kind, dtype)
    torch.manual_seed(3)
    linfusion = init_linfusion(unet, init, mid_dim_scale)
    params = trainable_parameters(unet, linfusion)
    return unet, linfusion, params, Attn1FeatureTap(unet, linfusion.modules_dict)


def step_inputs(kind, dtype=torch.float32, seed=1):
    """(noisy latents, timesteps, target, unet kwargs) of a fixed batch."""
    inputs = unet_inputs(kind, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    target = torch.randn(inputs["sample"].shape, generator=g, dtype=dtype)
    kwargs = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}
    return inputs["sample"], inputs["timestep"], target, kwargs


def official_loss(noise_pred, target, noise_pred_teacher, all_attn_outputs, all_attn_outputs_teacher):
    """A literal port of what the official distill.py computes from its tensors (lists of the
    student's and the teacher's attn1 outputs in call order)."""
    loss_noise = F.mse_loss(noise_pred.float(), target.float(), reduction="mean")
    loss_kd = F.mse_loss(noise_pred.float(), noise_pred_teacher.float(), reduction="mean")
    loss_feat = sum(
        [F.mse_loss(feat.float(), feat_teacher.float()) for feat, feat_teacher in zip(all_attn_outputs, all_attn_outputs_teacher)]
    ) / len(all_attn_outputs_teacher)
    loss = loss_noise + loss_kd * 0.5 + loss_feat * 0.5
    return loss, loss_noise, loss_kd, loss_feat


# ---------------------------------------------------------------------------------------------
# The loss.
def test_loss_matches_official_formula():
    g = torch.Generator().manual_seed(0)
    pred, target, teacher = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float16) for _ in range(3))
    shapes = [(2, 64, 32), (2, 16, 64), (2, 64, 32)]
    feats = {f"layer{i}.attn1": torch.randn(s, generator=g).bfloat16() for i, s in enumerate(shapes)}
    teacher_feats = {name: torch.randn(f.shape, generator=g) for name, f in feats.items()}
    expected = official_loss(pred, target, teacher, list(feats.values()), list(teacher_feats.values()))

    loss = distillation_loss(pred, target, teacher, feats, teacher_feats)
    for got, want in zip(loss, expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # Sequences in call order work as the official lists do; the weights are (noise, kd, feat).
    listed = distillation_loss(pred, target, teacher, list(feats.values()), list(teacher_feats.values()))
    torch.testing.assert_close(listed.total, expected[0], rtol=1e-6, atol=0)
    weighted = distillation_loss(pred, target, teacher, feats, teacher_feats, weights=(0.3, 2.0, 0.0))
    torch.testing.assert_close(weighted.total, 0.3 * expected[1] + 2.0 * expected[2], rtol=1e-6, atol=0)


def test_loss_rejects_bad_inputs():
    x = torch.randn(1, 4, 2, 2, requires_grad=True)
    f = {"a": torch.randn(1, 3, 2)}
    with pytest.raises(ValueError, match="same layers.*'b'"):
        distillation_loss(x, x, x, f, {"b": f["a"]})
    with pytest.raises(ValueError, match="teacher_pred has shape"):
        distillation_loss(x, x, x[:, :2], f, f)
    with pytest.raises(ValueError, match="weights must be"):
        distillation_loss(x, x, x, f, f, weights=(1.0, 0.5))
    with pytest.raises(ValueError, match="no attn1 features"):
        distillation_loss(x, x, x, {}, {})
    # A student feature without a graph (no_grad, reentrant checkpointing) would silently drop
    # the feature loss's gradient.
    with pytest.raises(ValueError, match="carries no gradient"):
        distillation_loss(x, x, x, f, f)


def test_diffusion_target():
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    timesteps = torch.tensor([0, 400, 999])
    assert diffusion_target(DDPMScheduler(), latents, noise, timesteps) is noise
    assert diffusion_target(DDPMScheduler(prediction_type="sample"), latents, noise, timesteps) is latents
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    v = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(diffusion_target(scheduler, latents, noise, timesteps), v)
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="unknown scheduler prediction_type 'flow'"):
        diffusion_target(scheduler, latents, noise, timesteps)


# ---------------------------------------------------------------------------------------------
# What is trained, the shared teacher, the initialisations.
def test_gradients_reach_only_linfusion_parameters():
    unet, linfusion, params, tap = student()
    ids = {id(p) for p in params}
    assert ids == {id(p) for p in linfusion.parameters()}
    noisy, t, target, kwargs = step_inputs("sd15")
    distillation_forward(unet, linfusion, tap, noisy, t, target, **kwargs).total.backward()
    for name, p in unet.named_parameters():
        if id(p) in ids:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    linfusion.unmount(unet=unet)
    # Unmounted, the UNet's own attn1 projections are frozen and got nothing.
    assert all(p.grad is None and not p.requires_grad for p in unet.parameters())


def test_shared_teacher_equals_pristine_teacher_and_leaves_unet_intact():
    unet = make_unet("sd15")
    pristine = copy.deepcopy(unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    processors = {k: type(v) for k, v in unet.attn_processors.items()}
    linfusion = init_linfusion(unet, "fresh")
    params = trainable_parameters(unet, linfusion)
    tap = Attn1FeatureTap(unet, linfusion.modules_dict)
    pristine_tap = Attn1FeatureTap(pristine, linfusion.modules_dict)
    noisy, t, _, kwargs = step_inputs("sd15")

    with tap.capture() as shared_feats:
        shared = teacher_forward(unet, linfusion, noisy, t, **kwargs).sample
    with pristine_tap.capture() as pristine_feats:
        expected = pristine(noisy, t, **kwargs).sample
    assert torch.equal(shared, expected) and not shared.requires_grad
    assert shared_feats.keys() == pristine_feats.keys()
    for name in shared_feats:
        assert torch.equal(shared_feats[name], pristine_feats[name]), name
    with torch.no_grad():
        separate = teacher_forward(unet, linfusion, noisy, t, teacher_unet=pristine, **kwargs).sample
    assert torch.equal(separate, expected)

    # Still the student, with the very same parameter objects (an optimizer over them is intact).
    assert all(isinstance(unet.get_submodule(n).processor, LinFusionAttnProcessor) for n in linfusion.modules_dict)
    assert [id(p) for p in linfusion.parameters()] == [id(p) for p in params]
    mounted_ids = {id(p) for p in unet.parameters()}
    assert all(id(p) in mounted_ids for p in params)
    with torch.no_grad():
        assert not torch.equal(unet(noisy, t, **kwargs).sample, expected)

    linfusion.unmount(unet=unet)
    after = unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == processors


def test_teacher_refuses_mismatched_dtypes():
    unet = make_unet("sd15")
    linfusion = init_linfusion(unet, "fresh")
    nn.Module.to(linfusion, torch.float64)
    noisy, t, _, kwargs = step_inputs("sd15")
    with pytest.raises(ValueError, match="LinFusion is torch.float64 but the UNet is torch.float32"):
        teacher_forward(unet, linfusion, noisy, t, **kwargs)


def test_init_teacher_copies_projections_fresh_does_not():
    unet = make_unet("xl")
    pristine = copy.deepcopy(unet)
    teacher_init = init_linfusion(copy.deepcopy(unet), "teacher", mid_dim_scale=16)
    fresh = init_linfusion(unet, "fresh")
    for entry in teacher_init.config.modules_list:
        assert entry["projection_mid_dim"] == entry["dim_n"] // 16
    for name in teacher_init.modules_dict:
        original = pristine.get_submodule(name)
        for proj in ("to_q", "to_k", "to_v"):
            assert torch.equal(getattr(teacher_init.modules_dict[name], proj).weight, getattr(original, proj).weight)
            assert not torch.equal(getattr(fresh.modules_dict[name], proj).weight, getattr(original, proj).weight)
        assert torch.equal(teacher_init.modules_dict[name].to_out[0].bias, original.to_out[0].bias)
    with pytest.raises(ValueError, match="init must be one of"):
        init_linfusion(make_unet("sd15"), "random")


# ---------------------------------------------------------------------------------------------
# The feature tap.
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_tap_records_every_layer_once_and_keeps_the_graph(checkpointing):
    unet, linfusion, params, tap = student("sd21")
    calls = {name: 0 for name in tap.module_names}
    for name in calls:
        unet.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls[name] + 1))
    assert tap.module_names == [n for n, m in unet.named_modules() if isinstance(m, Attention) and n.endswith("attn1")]
    noisy, t, _, kwargs = step_inputs("sd21")
    w = {name: torch.randn(unet.get_submodule(name).to_out[0].out_features) for name in tap.module_names}

    def feature_grads():
        with tap.capture() as feats:
            unet(noisy, t, **kwargs)
        assert sorted(feats) == sorted(tap.module_names) and all(calls[n] == 1 for n in calls)
        recorded = {n: f for n, f in feats.items()}
        loss = sum((f * w[n]).sum() for n, f in feats.items())
        grads = torch.autograd.grad(loss, params)
        assert {n: f for n, f in feats.items()} == recorded  # nothing added during the backward
        return grads, calls.copy()

    plain, _ = feature_grads()
    if checkpointing:
        for name in calls:
            calls[name] = 0
        unet.enable_gradient_checkpointing()
        checkpointed, seen = feature_grads()
        # diffusers re-ran the blocks (hooks included) in the backward; the tap ignored that.
        assert sum(seen.values()) > len(seen)
        for a, b in zip(plain, checkpointed):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(g.abs().sum() > 0 for g in plain)


def test_tap_errors():
    unet, linfusion, _, tap = student()
    noisy, t, _, kwargs = step_inputs("sd15")
    with pytest.raises(RuntimeError, match="ran twice in one capture"):
        with tap.capture(), torch.no_grad():
            unet(noisy, t, **kwargs)
            unet(noisy, t, **kwargs)
    with pytest.raises(RuntimeError, match="did not run during the capture"):
        with tap.capture():
            pass
    with pytest.raises(RuntimeError, match="cannot be nested"):
        with tap.capture(), tap.capture():
            pass
    tap.remove()
    with pytest.raises(RuntimeError, match="did not run"):  # removed: nothing is recorded
        with tap.capture(), torch.no_grad():
            unet(noisy, t, **kwargs)


# ---------------------------------------------------------------------------------------------
# Training.
def test_kd_and_feature_losses_fall_on_a_fixed_batch():
    unet, linfusion, params, tap = student("sd15", init="fresh")
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    noisy, t, target, kwargs = step_inputs("sd15")
    history = []
    # A random teacher is no denoiser, so the noise term would pull the student away from it:
    # train on the distillation terms alone.
    for _ in range(30):
        loss = distillation_forward(unet, linfusion, tap, noisy, t, target, weights=(0.0, 0.5, 0.5), **kwargs)
        loss.total.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append((loss.kd.item(), loss.feat.item()))
    (kd0, feat0), (kd1, feat1) = history[0], history[-1]
    assert kd1 <= 0.5 * kd0, history
    assert feat1 <= 0.5 * feat0, history


def test_xl_conditioning_and_v_prediction_step():
    unet, linfusion, params, tap = student("xl", mid_dim_scale=16)
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    inputs = unet_inputs("xl")
    latents = inputs["sample"]
    noise = torch.randn_like(latents)
    target = diffusion_target(scheduler, latents, noise, inputs["timestep"])
    noisy = scheduler.add_noise(latents, noise, inputs["timestep"])
    conds = inputs["added_cond_kwargs"]
    loss = distillation_forward(
        unet, linfusion, tap, noisy, inputs["timestep"], target,
        encoder_hidden_states=inputs["encoder_hidden_states"], added_cond_kwargs=conds,
    )
    # The time ids reach the student: other sizes give another prediction.
    other = dict(conds, time_ids=conds["time_ids"] * 2)
    with torch.no_grad():
        a = unet(noisy, inputs["timestep"], inputs["encoder_hidden_states"], added_cond_kwargs=conds).sample
        b = unet(noisy, inputs["timestep"], inputs["encoder_hidden_states"], added_cond_kwargs=other).sample
    assert not torch.allclose(a, b)
    loss.total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


def test_bf16_autocast_step_is_finite():
    unet, linfusion, params, tap = student("sd15")
    unet.enable_gradient_checkpointing()
    noisy, t, target, kwargs = step_inputs("sd15")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = distillation_forward(unet, linfusion, tap, noisy, t, target, **kwargs)
    assert all(torch.isfinite(term) and term.dtype == torch.float32 for term in loss)
    loss.total.backward()
    assert all(p.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)


# ---------------------------------------------------------------------------------------------
# The script.
class OfficialGeneralizedLinearAttention(Attention):
    """A literal port of the official GeneralizedLinearAttention's construction (its parameters
    and names; the forward is not needed to load)."""

    def __init__(self, *args, projection_mid_dim=None, **kwargs):
        super().__init__(*args, **kwargs)
        dim = self.to_q.weight.shape[0]
        for name in ("to_q_", "to_k_"):
            mid = projection_mid_dim or dim
            setattr(self, name, nn.Identity() if projection_mid_dim == -1 else nn.Sequential(
                nn.Linear(dim, mid), nn.LayerNorm(mid), nn.LeakyReLU(inplace=True), nn.Linear(mid, dim)))


class OfficialLinFusion(ModelMixin, ConfigMixin):
    """A literal port of the official LinFusion class's construction, used only to load."""

    def __init__(self, modules_list, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.modules_dict = {}
        self.register_to_config(modules_list=modules_list)
        for i, entry in enumerate(modules_list):
            layer = OfficialGeneralizedLinearAttention(
                query_dim=entry["dim_n"], out_dim=entry["dim_n"], dim_head=entry["dim_n"] // entry["heads"],
                projection_mid_dim=entry["projection_mid_dim"],
            )
            self.add_module(f"{i}", layer)
            self.modules_dict[entry["module_name"]] = layer


def save_pipeline(tmp_path, kind, prediction_type="epsilon"):
    folder = tmp_path / f"pipe_{kind}"
    if kind == "xl":
        pipe = tiny_sdxl_pipeline(tmp_path / "tok_xl")
    else:
        pipe = tiny_sd_pipeline(tmp_path / "tok", unet=make_unet(kind))
    pipe.scheduler = EulerDiscreteScheduler(prediction_type=prediction_type, steps_offset=1)
    pipe.save_pretrained(folder)
    return folder


def run_script(args):
    """The script's main in this process; accelerate keeps one process-wide state, reset for each run."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return distill.main(args)


def cli_args(pipe, data, out, *extra):
    return distill.parse_args([
        "--pretrained_model_name_or_path", str(pipe), "--train_data_dir", str(data), "--output_dir", str(out),
        "--train_batch_size", "2", "--seed", "0", "--checkpointing_steps", "2", *extra,
    ])


class StepCounter:
    """Wraps distill's distillation_forward to count the steps and keep their UNet kwargs."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = distill.distillation_forward

        def counted(*args, **kwargs):
            self.calls.append(kwargs)
            return original(*args, **kwargs)

        monkeypatch.setattr(distill, "distillation_forward", counted)


def test_script_runs_resumes_and_saves_official_format(tmp_path, monkeypatch):
    pipe = save_pipeline(tmp_path, "sd21", prediction_type="v_prediction")
    data = tmp_path / "images"
    write_captioned_images(data, captions="txt")
    # 4 images, batch 2: two steps per epoch.
    straight = run_script(cli_args(pipe, data, tmp_path / "straight", "--max_train_steps", "4"))

    counter = StepCounter(monkeypatch)
    out = tmp_path / "resumed"
    run_script(cli_args(pipe, data, out, "--max_train_steps", "3"))
    assert len(counter.calls) == 3
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    counter.calls.clear()
    resumed = run_script(cli_args(pipe, data, out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"))
    assert len(counter.calls) == 2  # steps 3 and 4, from checkpoint-2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # Same batches, noise and timesteps as the uninterrupted run: bitwise the same weights.
    assert_weights_equal(straight.state_dict(), resumed.state_dict())

    for folder in (out, out / "checkpoint-4" / "linfusion"):
        config = json.loads((folder / "config.json").read_text())
        assert config["_class_name"] == "LinFusion"
        loaded = LinFusion.from_pretrained(folder)
        official = OfficialLinFusion.from_pretrained(folder)
        expected = resumed.state_dict()
        assert official.state_dict().keys() == expected.keys() == loaded.state_dict().keys()
        for key, value in expected.items():
            assert torch.equal(official.state_dict()[key], value), key
            assert torch.equal(loaded.state_dict()[key], value), key
    # The reloaded LinFusion mounts on the pipeline's UNet and runs.
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipe, subfolder="unet")
    LinFusion.from_pretrained(out).mount_to(unet=unet)
    noisy, t, _, kwargs = step_inputs("sd21")
    with torch.no_grad():
        assert torch.isfinite(unet(noisy, t, **kwargs).sample).all()


def checkpoint_state(folder):
    """(LinFusion state dict, optimizer state dict) of a saved checkpoint folder."""
    linfusion = LinFusion.from_pretrained(folder / "linfusion").state_dict()
    optimizer = torch.load(folder / "optimizer.bin", weights_only=False)
    return linfusion, optimizer


def assert_weights_equal(a, b):
    """Two state dicts hold the same names and bitwise the same tensors."""
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), f"{name}: max abs difference {(value - b[name]).abs().max().item():.3g}"


def assert_optimizer_states_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key, state in a["state"].items():
        assert state.keys() == b["state"][key].keys()
        for name, value in state.items():
            assert torch.equal(value, b["state"][key][name]), (key, name)


# 3 images, batch 2: two batches per epoch (the second a single image). With accumulation 2 an
# optimizer step is a whole epoch; with accumulation 1, step 1 is mid-epoch and step 2 an epoch end.
@pytest.mark.parametrize(
    "accumulation, total, resume_at",
    [(1, 3, 1), (1, 3, 2), (2, 2, 1)],
    ids=["mid_epoch", "epoch_boundary", "accumulation2"],
)
def test_script_resume_is_bitwise_equal_to_uninterrupted_run(tmp_path, monkeypatch, accumulation, total, resume_at):
    pipe = save_pipeline(tmp_path, "sd15")
    data = tmp_path / "images"
    write_captioned_images(data, sizes=((24, 20), (20, 28), (16, 16)), captions="txt")
    extra = ("--checkpointing_steps", "1", "--gradient_accumulation_steps", str(accumulation))

    counter = StepCounter(monkeypatch)
    straight_dir = tmp_path / "straight"
    straight = run_script(cli_args(pipe, data, straight_dir, "--max_train_steps", str(total), *extra))
    straight_calls = list(counter.calls)

    out = tmp_path / "resumed"
    run_script(cli_args(pipe, data, out, "--max_train_steps", str(resume_at), *extra))
    counter.calls.clear()
    resumed = run_script(
        cli_args(pipe, data, out, "--max_train_steps", str(total), "--resume_from_checkpoint", "latest", *extra)
    )
    # The resumed run made the uninterrupted run's last forward passes, on the same inputs.
    tail = straight_calls[len(straight_calls) - len(counter.calls):]
    assert len(straight_calls) == total * accumulation
    assert len(counter.calls) == (total - resume_at) * accumulation
    for a, b in zip(tail, counter.calls):
        assert torch.equal(a["encoder_hidden_states"], b["encoder_hidden_states"])
    assert_weights_equal(straight.state_dict(), resumed.state_dict())
    final = f"checkpoint-{total}"
    straight_weights, straight_optimizer = checkpoint_state(straight_dir / final)
    resumed_weights, resumed_optimizer = checkpoint_state(out / final)
    assert_weights_equal(straight_weights, resumed_weights)
    assert_optimizer_states_equal(straight_optimizer, resumed_optimizer)


def test_script_rejects_bad_data_before_loading_models(tmp_path, monkeypatch):
    def no_models(args):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(distill, "load_models", no_models)
    empty = tmp_path / "empty"
    empty.mkdir()
    no_caption = tmp_path / "no_caption"
    write_captioned_images(no_caption, sizes=((16, 16),) * 2, captions="txt")
    (no_caption / "img1.txt").unlink()
    unreadable = tmp_path / "unreadable"
    write_captioned_images(unreadable, sizes=((16, 16),), captions="txt")
    (unreadable / "img0.txt").write_bytes(b"\xff\xfe\xfa caption")
    bad_jsonl = tmp_path / "bad_jsonl"
    write_captioned_images(bad_jsonl, sizes=((16, 16),), captions="jsonl")
    (bad_jsonl / "metadata.jsonl").write_text("{not json\n")
    cases = [
        (tmp_path / "missing", "is not a folder"),
        (empty, "no images"),
        (no_caption, "no caption for"),
        (unreadable, "cannot read"),
        (bad_jsonl, "line 1 is not a JSON object"),
    ]
    for folder, message in cases:
        out = tmp_path / f"out_{folder.name}"
        with pytest.raises(ValueError, match=message) as caught:
            run_script(cli_args("no-such-pipeline", folder, out, "--max_train_steps", "1"))
        assert "\n" not in str(caught.value) and str(caught.value).startswith("--train_data_dir: ")
        assert not out.exists(), folder.name


def test_script_rejects_bad_checkpoints_and_another_seed_before_loading_models(tmp_path, monkeypatch):
    def no_models(args):
        raise AssertionError("a model was loaded before the checkpoint was checked")

    monkeypatch.setattr(distill, "load_models", no_models)
    data = tmp_path / "images"
    write_captioned_images(data, sizes=((16, 16),), captions="txt")
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "seed.json").write_text('{"seed": 3}')
    (tmp_path / "final").mkdir()
    cases = [
        (("--seed", "4", "--resume_from_checkpoint", "latest"), "--seed 4 differs from the seed 3 that checkpoint"),
        (("--resume_from_checkpoint", str(tmp_path / "none")), "is not a folder"),
        (("--resume_from_checkpoint", str(tmp_path / "final")), "is not named checkpoint-<step>"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message) as caught:
            run_script(cli_args("no-such-pipeline", data, out, "--max_train_steps", "3", *extra))
        assert "\n" not in str(caught.value)
    # The command line prints it as one line, without a traceback.
    with pytest.raises(SystemExit) as exited:
        distill.cli(["--pretrained_model_name_or_path", "x", "--train_data_dir", str(data), "--output_dir", str(out),
                     "--seed", "4", "--resume_from_checkpoint", "latest"])
    assert str(exited.value.code).startswith("error: --seed 4 differs") and "\n" not in str(exited.value.code)


def test_script_sdxl_time_ids_and_dataset_name(tmp_path, monkeypatch):
    pipe = save_pipeline(tmp_path, "xl")
    data = tmp_path / "images"
    write_captioned_images(data, sizes=((24, 20),) * 2, captions="jsonl")
    counter = StepCounter(monkeypatch)
    args = distill.parse_args([
        "--pretrained_model_name_or_path", str(pipe), "--dataset_name", str(data), "--cache_dir", str(tmp_path / "cache"),
        "--output_dir", str(tmp_path / "out"), "--train_batch_size", "2", "--max_train_steps", "1",
        "--gradient_checkpointing", "--mixed_precision", "bf16", "--loss_weights", "1,0.5,0.25",
        "--separate_teacher", "--init", "fresh",
    ])
    linfusion = run_script(args)
    (call,) = counter.calls
    assert call["weights"] == (1.0, 0.5, 0.25)
    assert call["teacher_unet"] is not None and call["teacher_unet"].dtype == torch.bfloat16
    conds = call["added_cond_kwargs"]
    # 24 x 20 px resized to 19 x 16 (shorter side 16), centre crop at left 1: original size
    # (20, 24), crop corner (0, 1), target size (16, 16).
    expected = torch.tensor([[20.0, 24, 0, 1, 16, 16]] * 2)
    assert torch.equal(conds["time_ids"].float(), expected)
    assert conds["text_embeds"].shape == (2, 16) and call["encoder_hidden_states"].shape[-1] == 32
    assert [e["projection_mid_dim"] for e in linfusion.config.modules_list] == [
        e["dim_n"] // 16 for e in linfusion.config.modules_list
    ]
    assert (tmp_path / "out" / "config.json").exists()


def test_image_folder_captions(tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(save_pipeline(tmp_path, "sd15"), subfolder="tokenizer")
    for captions in ("txt", "jsonl"):
        folder = tmp_path / captions
        written = write_captioned_images(folder, captions=captions)
        dataset = distill.build_dataset(
            distill.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", str(folder)]), [tokenizer], 16
        )
        assert len(dataset) == len(written)
        for item, (_, caption) in zip(dataset, written):
            assert item["pixel_values"].shape == (3, 16, 16)
            assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
            assert torch.equal(item["input_ids"], tokenizer(
                caption, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                return_tensors="pt").input_ids[0])
    (tmp_path / "txt" / "img2.txt").unlink()
    with pytest.raises(ValueError, match="no caption for .*img2.png"):
        distill._folder_samples(tmp_path / "txt")
    with pytest.raises(SystemExit):
        distill.parse_args(["--pretrained_model_name_or_path", "x"])  # no data


# ---------------------------------------------------------------------------------------------
# Two-rank DDP (gloo): the gradients equal a single process on the whole batch.
def ddp_worker(rank, world, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    failure = None
    try:
        unet, linfusion, params, tap = student("sd15", dtype=torch.float64)
        noisy, t, target, kwargs = step_inputs("sd15", torch.float64)
        distillation_forward(unet, linfusion, tap, noisy, t, target, **kwargs).total.backward()
        whole = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        unet.enable_gradient_checkpointing()
        ddp = nn.parallel.DistributedDataParallel(unet)
        half = slice(rank, rank + 1)
        local = {k: v[half] for k, v in kwargs.items()}
        distillation_forward(unet, linfusion, tap, noisy[half], t[half], target[half], student=ddp, **local).total.backward()
        for p, g in zip(params, whole):
            torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
    except Exception:
        failure = traceback.format_exc()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(failure, f)
    os._exit(0)  # as in test_distributed.py: skip the teardown where gloo ranks may abort


def test_ddp_two_ranks_match_single_process(tmp_path):
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    failures = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert failures == [None, None], "\n".join(f or "" for f in failures)


# ---------------------------------------------------------------------------------------------
# Two processes (gloo, through accelerate as `accelerate launch --cpu --num_processes 2` would): a resume mid-epoch
# reproduces the uninterrupted run on every rank.
def resume_worker(rank, world, port, pipe, data, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
        ACCELERATE_USE_CPU="true",  # what `accelerate launch --cpu` sets
    )
    torch.set_num_threads(1)
    failure = None
    try:
        optimizers = []

        class RecordedAdamW(torch.optim.AdamW):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                optimizers.append(self)

        torch.optim.AdamW = RecordedAdamW
        calls = []
        forward = distill.distillation_forward

        def counted(*args, **kwargs):
            calls.append(kwargs["encoder_hidden_states"])
            return forward(*args, **kwargs)

        distill.distillation_forward = counted

        def run(out, steps, *extra):
            args = cli_args(pipe, data, out, "--max_train_steps", str(steps), "--train_batch_size", "1",
                            "--checkpointing_steps", "1", *extra)
            return run_script(args).state_dict(), copy.deepcopy(optimizers[-1].state_dict())

        # 4 images, batch 1 on each of 2 processes: 2 steps per epoch. Resumed after step 1
        # (mid-epoch), the run crosses the epoch end.
        straight, straight_optimizer = run(os.path.join(out_dir, "straight"), 3)
        straight_calls = list(calls)
        resumed_dir = os.path.join(out_dir, "resumed")
        run(resumed_dir, 1)
        del calls[:]
        resumed, resumed_optimizer = run(resumed_dir, 3, "--resume_from_checkpoint", "latest")
        assert len(straight_calls) == 3 and len(calls) == 2, (len(straight_calls), len(calls))
        for a, b in zip(straight_calls[1:], calls):
            assert torch.equal(a, b)
        assert_weights_equal(straight, resumed)
        assert_optimizer_states_equal(straight_optimizer, resumed_optimizer)
        assert resumed_optimizer["state"]  # the resumed optimizer did step
    except Exception:
        failure = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(failure, f)
    os._exit(0)  # as in test_distributed.py: skip the teardown where gloo ranks may abort


def test_script_resume_two_processes_is_bitwise_equal(tmp_path):
    import socket

    pipe = save_pipeline(tmp_path, "sd15")
    data = tmp_path / "images"
    write_captioned_images(data, captions="txt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(resume_worker, args=(2, port, str(pipe), str(data), str(tmp_path)), nprocs=2, join=True)
    failures = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert failures == [None, None], "\n".join(f or "" for f in failures)
    # Both processes saved their RNG states: the run was distributed.
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert json.loads((checkpoint / "seed.json").read_text()) == {"seed": 0}
