"""linfusion_ops.highres: LinFusion's ultra-high-resolution generation as diffusers pipelines.

* `plan_stages`, `plan_super_resolution`, `plan_chain` (explicit), `check_stages`, `Stage`: the
  stage plans (pure, no diffusers).
* `LinFusionHighResPipeline` (SD 1.5 / 2.1), `LinFusionHighResXLPipeline` (SD XL): staged
  DemoFusion / SDEdit generation and super-resolution, built with `from_pipe(pipe)`.
* `dilated_convs`, `gaussian_blur`, `match_channel_stats`, `demofusion_weights`: DemoFusion's
  pieces.
* `apply_low_memory`, `LowMemoryHandle`: reversible low-memory inference for a UNet (and
  ControlNet); `low_memory` is its deprecated alias (DeprecationWarning), kept for one release.
* `enable_tiled_vae`, `tiled_decode`, `tiled_encode`: a tiled VAE with whole-image GroupNorm
  statistics.

Every name loads its module on first use, so importing the package costs nothing.
"""

import sys
import types

from ..optional import lazy_getattr

_LAZY = {
    "Stage": ".stages",
    "plan_stages": ".stages",
    "plan_super_resolution": ".stages",
    "plan_chain": ".stages",
    "check_stages": ".stages",
    "DemoFusionWeights": ".demofusion",
    "demofusion_weights": ".demofusion",
    "dilated_convs": ".demofusion",
    "gaussian_kernel": ".demofusion",
    "gaussian_blur": ".demofusion",
    "channel_stats": ".demofusion",
    "match_channel_stats": ".demofusion",
    "LinFusionHighResPipeline": ".pipeline",
    "LinFusionHighResXLPipeline": ".pipeline",
    "LinFusionHighResPipelineOutput": ".pipeline",
    "apply_low_memory": ".low_memory",
    "low_memory": ".low_memory",
    "LowMemoryHandle": ".low_memory",
    "enable_tiled_vae": ".tiled_vae",
    "tiled_decode": ".tiled_vae",
    "tiled_encode": ".tiled_vae",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


class _Package(types.ModuleType):
    """The deprecated function `low_memory` lives in the submodule of the same name. Loading a
    submodule binds it on its package, which would hide the function; keep the function instead
    until the alias goes (the module itself: `from linfusion_ops.highres.low_memory import ...`
    or sys.modules["linfusion_ops.highres.low_memory"])."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == "." + name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = sorted(_LAZY)
