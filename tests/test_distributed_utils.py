"""linfusion_ops.distributed_utils.resolve_group: the checks made before a collective, in one
process (a world-size-1 gloo group; the 2-rank paths are in tests/linfusion/test_distributed.py
and tests/longalign/test_preference.py)."""

import datetime

import pytest
import torch
import torch.distributed as dist

from linfusion_ops.distributed_utils import resolve_group


def test_requires_an_initialized_default_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="^my_op: the default process group is not initialized"):
        resolve_group(None, torch.device("cpu"), "my_op")


def test_world_group_and_backend_check(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        assert resolve_group(None, torch.device("cpu"), "my_op") is dist.group.WORLD
        group = dist.new_group([0])
        assert resolve_group(group, torch.device("cpu"), "my_op") is group
        with pytest.raises(ValueError, match=r"^my_op: group: its backend \(cpu:gloo.*\) cannot reduce meta tensors"):
            resolve_group(group, torch.device("meta"), "my_op")
    finally:
        dist.destroy_process_group()
