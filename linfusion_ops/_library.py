"""Loads the compiled module. The package still imports when it is missing or broken: one
warning, and the public functions run linfusion_ops.reference instead.

A build (setup.py, a wheel) writes build_info.json beside the module: the torch and CUDA it was
compiled against and the wheel tag. Under another torch the module would fail with an undefined
symbol, so it is not loaded: the warning names both versions."""

import importlib
import json
import warnings
from pathlib import Path
from typing import Optional

import torch  # noqa: F401  (loads libc10 / libtorch before the extension)

BUILD_INFO_FILE = Path(__file__).with_name("build_info.json")


def recorded_build(path: Path = BUILD_INFO_FILE) -> dict:
    """The build's record (version, torch, torch_cuda, cuda, archs, wheel_tag), or {} when the
    module was built without one (the CMake build)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def torch_mismatch(recorded: dict, version: str = torch.__version__, cuda: Optional[str] = torch.version.cuda) -> Optional[str]:
    """A one-line message when the torch the module was built against (recorded["torch"],
    recorded["torch_cuda"]) is not the installed one (version, e.g. "2.14.1+cu130", and its CUDA,
    None for a CPU build); None when they match (the same release and CUDA) or nothing is
    recorded."""
    built = recorded.get("torch")
    if built is None or (built.split("+")[0] == version.split("+")[0] and recorded.get("torch_cuda") == cuda):
        return None
    return (f"linfusion_ops._C was built against torch {built} (CUDA {recorded.get('torch_cuda') or 'none'}) "
            f"but torch {version} (CUDA {cuda or 'none'}) is installed: install torch=={built.split('+')[0]} "
            "or rebuild linfusion_ops under this torch (`pip install --no-build-isolation .`)")


RECORDED = recorded_build()
MISMATCH = torch_mismatch(RECORDED)
if MISMATCH is not None:
    _C = None
    LOAD_ERROR = ImportError(MISMATCH)
    warnings.warn(
        f"linfusion_ops: {MISMATCH}; falling back to the pure-PyTorch reference implementations "
        "(correct but slow).",
        RuntimeWarning,
        stacklevel=3,
    )
else:
    try:
        # import_module, not `from . import _C`: a missing module then reads "No module named
        # 'linfusion_ops._C'" rather than a circular-import hint.
        _C = importlib.import_module("linfusion_ops._C")  # registers torch.ops.linfusion_ops.*

        LOAD_ERROR = None
    except Exception as exc:  # ImportError, or OSError from a mismatched torch/CUDA
        _C = None
        LOAD_ERROR = exc
        warnings.warn(
            f"linfusion_ops: the compiled module linfusion_ops._C could not be loaded ({exc!r}); "
            "falling back to the pure-PyTorch reference implementations (correct but slow). "
            "Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


def compiled() -> bool:
    """True when linfusion_ops._C loaded and torch.ops.linfusion_ops.* are registered."""
    return _C is not None


def build_info() -> dict:
    """The compiled module's build_info() (version, torch, cuda, cuda_version, archs) and, from
    build_info.json, the wheel tag (wheel_tag); or a dict with "compiled": False and the load
    error when the module is unavailable (with "built_against", the record, when a torch
    mismatch kept it from loading)."""
    if _C is None:
        info = {"compiled": False, "error": repr(LOAD_ERROR), "cuda": False, "archs": []}
        return {**info, "built_against": RECORDED} if MISMATCH else info
    return {"compiled": True, **_C.build_info(), "wheel_tag": RECORDED.get("wheel_tag")}
