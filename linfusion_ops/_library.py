"""Loads the compiled module. The package still imports when it is missing or broken: one
warning, and the public functions run linfusion_ops.reference instead."""

import importlib
import warnings

import torch  # noqa: F401  (loads libc10 / libtorch before the extension)

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
    """The compiled module's build_info() (version, torch, cuda, cuda_version, archs), or a dict
    with "compiled": False and the load error when it is unavailable."""
    if _C is None:
        return {"compiled": False, "error": repr(LOAD_ERROR), "cuda": False, "archs": []}
    return {"compiled": True, **_C.build_info()}
