"""LinFusion distillation: train LinFusion's linear attention to reproduce a Stable Diffusion
UNet's softmax self-attention (what Huage001/LinFusion's src/train/distill*.py compute, as a
library). `python -m linfusion_ops.linfusion.distill` is the training script built on it.

One training step, with the student and the teacher sharing one UNet:

    linfusion = init_linfusion(unet, init="teacher")          # mounted on unet
    params = trainable_parameters(unet, linfusion)            # only LinFusion's
    tap = Attn1FeatureTap(unet, linfusion.modules_dict)       # every attn1 output, by name
    target = diffusion_target(scheduler, latents, noise, timesteps)
    loss = distillation_forward(unet, linfusion, tap, noisy_latents, timesteps, target,
                                encoder_hidden_states=text)
    loss.total.backward()

The loss is LinFusion's: noise = MSE(student, target), kd = MSE(student, teacher), feat = the
mean over the attn1 layers of MSE(student layer output, teacher layer output), captured after
to_out; total = 1·noise + 0.5·kd + 0.5·feat. The teacher is the same UNet with LinFusion
unmounted (its own softmax attention), run under no_grad; a separate frozen teacher UNet is an
option (`teacher_unet=`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Dict, Iterable, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # .model needs diffusers; the constants below (the CLI's defaults) do not
    from .model import LinFusion

# The official weights of the noise, kd and feature terms.
DEFAULT_LOSS_WEIGHTS = (1.0, 0.5, 0.5)
INITS = ("teacher", "fresh")

Features = Union[Mapping, Sequence]


class DistillationLoss(NamedTuple):
    """The total loss (weighted sum) and its three terms, fp32 scalars."""

    total: torch.Tensor
    noise: torch.Tensor
    kd: torch.Tensor
    feat: torch.Tensor


def _paired_features(student_feats: Features, teacher_feats: Features) -> List[tuple]:
    if isinstance(student_feats, Mapping) != isinstance(teacher_feats, Mapping):
        raise TypeError(
            "distillation_loss: student_feats and teacher_feats must both be mappings (name -> "
            "tensor, as Attn1FeatureTap gives) or both sequences"
        )
    if isinstance(student_feats, Mapping):
        if student_feats.keys() != teacher_feats.keys():
            missing = sorted(set(student_feats) ^ set(teacher_feats))
            raise ValueError(
                "distillation_loss: student_feats and teacher_feats must hold the same layers; "
                f"found in only one of them: {missing}"
            )
        pairs = [(name, student_feats[name], teacher_feats[name]) for name in student_feats]
    else:
        if len(student_feats) != len(teacher_feats):
            raise ValueError(
                f"distillation_loss: {len(student_feats)} student features but "
                f"{len(teacher_feats)} teacher features"
            )
        pairs = [(str(i), s, t) for i, (s, t) in enumerate(zip(student_feats, teacher_feats))]
    if not pairs:
        raise ValueError("distillation_loss: no attn1 features (student_feats is empty)")
    return pairs


def distillation_loss(
    student_pred: torch.Tensor,
    target: torch.Tensor,
    teacher_pred: torch.Tensor,
    student_feats: Features,
    teacher_feats: Features,
    weights: Sequence[float] = DEFAULT_LOSS_WEIGHTS,
) -> DistillationLoss:
    """LinFusion's distillation loss.

    Args:
        student_pred, target, teacher_pred: (B, C, H, W) UNet outputs and the diffusion target
            (see `diffusion_target`), any float dtype; the loss is computed in fp32.
        student_feats, teacher_feats: the attn1 outputs of the student and teacher passes, as
            mappings from module name to (B, N, C) tensor (`Attn1FeatureTap.capture`) with the same
            names, or as sequences in the same order.
        weights: (noise, kd, feat) weights; LinFusion's are (1, 0.5, 0.5).

    Returns:
        DistillationLoss(total, noise, kd, feat): noise = MSE(student_pred, target),
        kd = MSE(student_pred, teacher_pred), feat = mean over layers of MSE(student layer,
        teacher layer), total = weights · (noise, kd, feat).
    """
    if len(weights) != 3:
        raise ValueError(f"distillation_loss: weights must be (noise, kd, feat), got {tuple(weights)}")
    for name, other in (("target", target), ("teacher_pred", teacher_pred)):
        if other.shape != student_pred.shape:
            raise ValueError(
                f"distillation_loss: {name} has shape {tuple(other.shape)}, student_pred "
                f"{tuple(student_pred.shape)}"
            )
    feat_terms = []
    for name, student, teacher in _paired_features(student_feats, teacher_feats):
        if student.shape != teacher.shape:
            raise ValueError(
                f"distillation_loss: layer {name}: student feature {tuple(student.shape)}, teacher "
                f"feature {tuple(teacher.shape)}"
            )
        if student_pred.requires_grad and not student.requires_grad:
            raise ValueError(
                f"distillation_loss: the student feature of {name} carries no gradient although "
                "student_pred does: it was captured under torch.no_grad or reentrant gradient "
                "checkpointing (use diffusers' default, use_reentrant=False)"
            )
        feat_terms.append(F.mse_loss(student.float(), teacher.float()))
    noise = F.mse_loss(student_pred.float(), target.float())
    kd = F.mse_loss(student_pred.float(), teacher_pred.float())
    feat = torch.stack(feat_terms).mean()
    total = weights[0] * noise + weights[1] * kd + weights[2] * feat
    return DistillationLoss(total, noise, kd, feat)


def _in_backward() -> bool:
    # True while the autograd engine runs a backward on this thread: that is where
    # non-reentrant activation checkpointing (diffusers' gradient checkpointing) re-runs
    # forwards, forward hooks included.
    return torch._C._current_graph_task_id() != -1


class Attn1FeatureTap:
    """Forward hooks that capture the output of each named self-attention (attn1) module of a
    UNet, after to_out: the layer features of LinFusion's feature loss.

    Usage:
        tap = Attn1FeatureTap(unet)                  # every attn1, or the names given
        with tap.capture() as feats:                 # {module name: (B, N, C) tensor}
            unet(...)

    Each module is recorded once per `capture`; the block checks on exit that every module ran.
    The hooks sit on the attn1 modules themselves, which mounting LinFusion keeps (it swaps their
    submodules), so one tap serves the student and the shared teacher. Gradient checkpointing:
    diffusers re-runs checkpointed blocks, forward hooks included, during the backward; those
    recomputations are not recorded, and the tensors recorded in the forward keep their graph
    (non-reentrant checkpointing recomputes what their backward needs). Call `remove()` to take
    the hooks off.
    """

    def __init__(self, unet: nn.Module, module_names: Optional[Iterable[str]] = None):
        if module_names is None:
            from .model import is_self_attention

            module_names = [n for n, m in unet.named_modules() if is_self_attention(n, m)]
        self.module_names = list(module_names)
        if not self.module_names:
            raise ValueError("Attn1FeatureTap: no modules to tap (the UNet has no attn1 modules?)")
        self._features: Optional[Dict[str, torch.Tensor]] = None
        self._handles = [
            unet.get_submodule(name).register_forward_hook(functools.partial(self._record, name))
            for name in self.module_names
        ]

    def _record(self, name, module, args, output):
        if self._features is None or _in_backward():
            return
        if name in self._features:
            raise RuntimeError(
                f"Attn1FeatureTap: {name} ran twice in one capture; use one capture per UNet call"
            )
        self._features[name] = output

    @contextlib.contextmanager
    def capture(self):
        """Context manager yielding a dict that fills with {module name: output} as the UNet runs."""
        if self._features is not None:
            raise RuntimeError("Attn1FeatureTap: capture() blocks cannot be nested")
        features: Dict[str, torch.Tensor] = {}
        self._features = features
        try:
            yield features
        finally:
            self._features = None
        missing = [name for name in self.module_names if name not in features]
        if missing:
            raise RuntimeError(f"Attn1FeatureTap: these modules did not run during the capture: {missing}")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextlib.contextmanager
def teacher_attention(linfusion: LinFusion, unet: nn.Module):
    """Context manager: the UNet runs its own (softmax) self-attention inside, LinFusion outside.
    Unmounting restores the UNet's original attn1 submodules bit for bit, and remounting puts the
    same LinFusion modules back (no copy), so an optimizer over LinFusion's parameters is
    unaffected. LinFusion must be mounted on `unet` and share its dtype."""
    dtype = next(linfusion.parameters()).dtype
    if dtype != unet.dtype:
        raise ValueError(
            f"teacher_attention: LinFusion is {dtype} but the UNet is {unet.dtype}; remounting would "
            "cast LinFusion to the UNet's dtype. Keep the UNet in LinFusion's dtype (use autocast "
            "for mixed precision) or pass a separate teacher UNet"
        )
    linfusion.unmount(unet=unet)
    try:
        yield
    finally:
        linfusion.mount_to(unet=unet)


def teacher_forward(unet: nn.Module, linfusion: LinFusion, *args, teacher_unet=None, **kwargs):
    """The teacher's UNet output under torch.no_grad: `teacher_unet(*args, **kwargs)` when given
    (a separate frozen copy), else `unet(*args, **kwargs)` with LinFusion unmounted for the call
    (`teacher_attention`). Arguments are the UNet's."""
    with torch.no_grad():
        if teacher_unet is not None:
            return teacher_unet(*args, **kwargs)
        with teacher_attention(linfusion, unet):
            return unet(*args, **kwargs)


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict, per `scheduler.config.prediction_type`: the noise
    ("epsilon"), the velocity ("v_prediction", `scheduler.get_velocity`) or the clean latents
    ("sample"). latents, noise: (B, C, H, W); timesteps: (B,) int64."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(
        f"diffusion_target: unknown scheduler prediction_type {prediction_type!r} (expected "
        "'epsilon', 'v_prediction' or 'sample')"
    )


def init_linfusion(
    unet: nn.Module,
    init: str = "teacher",
    mid_dim_scale: Optional[int] = None,
    pretrained_model_name_or_path=None,
) -> LinFusion:
    """A LinFusion for `unet`, mounted on it, to distil.

    init: "teacher" starts each layer's to_q/to_k/to_v/to_out from the UNet's own attn1
    projections (kernel MLPs random); "fresh" starts every layer from PyTorch's default
    initialisation, as the official training does. mid_dim_scale: kernel-MLP width
    dim_n // mid_dim_scale (LinFusion-XL used 16); None for dim_n. pretrained_model_name_or_path:
    continue from a LinFusion checkpoint instead (init and mid_dim_scale are then unused).
    """
    from .model import LinFusion

    if pretrained_model_name_or_path is not None:
        return LinFusion.construct_for(unet=unet, pretrained_model_name_or_path=pretrained_model_name_or_path)
    if init not in INITS:
        raise ValueError(f"init_linfusion: init must be one of {INITS}, got {init!r}")
    linfusion = LinFusion(**LinFusion.get_default_config(unet=unet, mid_dim_scale=mid_dim_scale))
    if init == "teacher":
        linfusion._copy_projections_from(unet)
    linfusion.mount_to(unet=unet)
    return linfusion


def trainable_parameters(unet: nn.Module, linfusion: LinFusion) -> List[nn.Parameter]:
    """Freezes the UNet, its own attn1 projections (set aside while LinFusion is mounted)
    included, and returns LinFusion's parameters, the only ones distillation trains."""
    with teacher_attention(linfusion, unet):
        unet.requires_grad_(False)
    linfusion.requires_grad_(True)
    return list(linfusion.parameters())


def distillation_forward(
    unet: nn.Module,
    linfusion: LinFusion,
    tap: Attn1FeatureTap,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    target: torch.Tensor,
    *,
    weights: Sequence[float] = DEFAULT_LOSS_WEIGHTS,
    student=None,
    teacher_unet=None,
    teacher_tap: Optional[Attn1FeatureTap] = None,
    **unet_kwargs,
) -> DistillationLoss:
    """The teacher pass, the student pass and the loss of one distillation step.

    Args:
        unet: the UNet with `linfusion` mounted (the student; with LinFusion unmounted, the
            teacher). tap: an Attn1FeatureTap on it.
        noisy_latents: (B, 4, h, w); timesteps: (B,); target: `diffusion_target(...)`.
        weights: (noise, kd, feat) loss weights.
        student: what to call for the student pass, when not `unet` itself (a
            DistributedDataParallel wrapper of it).
        teacher_unet, teacher_tap: a separate frozen teacher and a tap on it, instead of the
            shared UNet.
        unet_kwargs: the UNet's other arguments (encoder_hidden_states, added_cond_kwargs, ...).

    Returns:
        DistillationLoss (see `distillation_loss`); backpropagate `.total`.
    """
    if (teacher_unet is None) != (teacher_tap is None):
        raise ValueError("distillation_forward: pass teacher_unet and teacher_tap together")
    with (teacher_tap or tap).capture() as teacher_feats:
        teacher_pred = teacher_forward(
            unet, linfusion, noisy_latents, timesteps, teacher_unet=teacher_unet, return_dict=False, **unet_kwargs
        )[0]
    with tap.capture() as student_feats:
        student_pred = (student or unet)(noisy_latents, timesteps, return_dict=False, **unet_kwargs)[0]
    return distillation_loss(student_pred, target, teacher_pred, student_feats, teacher_feats, weights)
