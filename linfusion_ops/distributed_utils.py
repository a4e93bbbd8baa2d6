"""torch.distributed helpers shared by the features that reduce across ranks (LinFusion's
sequence-parallel attention, LongAlign's common direction). Needs only torch."""

import torch
import torch.distributed as dist

__all__ = ["resolve_group"]


def resolve_group(group, device: torch.device, caller: str):
    """The process group to reduce tensors of ``device`` over: ``group``, or the default group
    (``torch.distributed.group.WORLD``) when it is None.

    Raises RuntimeError when torch.distributed is unavailable or the default group is not
    initialized, and ValueError when this process is not a member of ``group`` or the group's
    backend cannot reduce tensors of ``device.type`` (e.g. gloo and CUDA tensors); every message
    starts with ``caller`` (the public function the user called).
    """
    if not dist.is_available():
        raise RuntimeError(f"{caller}: this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{caller}: the default process group is not initialized; call "
            "torch.distributed.init_process_group(...) on every rank first"
        )
    if group is None:
        group = dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"{caller}: group: this process (global rank {dist.get_rank()}) is not a member of the "
            "given process group"
        )
    # get_backend_config gives "device:backend" pairs, e.g. "cpu:gloo,cuda:nccl" or "cuda:nccl".
    config = dist.get_backend_config(group)
    backends = dict(pair.split(":", 1) for pair in config.split(",") if ":" in pair)
    if backends and device.type not in backends:
        raise ValueError(
            f"{caller}: group: its backend ({config}) cannot reduce {device.type} tensors; use gloo "
            "for CPU tensors, NCCL for CUDA tensors, or a group created with "
            "backend='cpu:gloo,cuda:nccl'"
        )
    return group
