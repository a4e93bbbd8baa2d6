"""The FID Inception-v3: the network of the TensorFlow FID graph (inception-2015-12-05) as
pytorch-fid defines it in PyTorch, returning the 2048-d pool3 features.

It differs from torchvision's ImageNet Inception-v3 in four places, all kept here: the average
pools of the A, C and first E blocks exclude the padding from the mean
(``count_include_pad=False``), the last E block max-pools its pool branch, the classifier has
1008 classes, and BatchNorm uses eps 0.001. Module names equal torchvision's and pytorch-fid's,
so pytorch-fid's released weights (``pt_inception-2015-12-05-6726825d.pth``) load as they are
with :func:`load_fid_inception`. Weights are not bundled.

How the images reach 299 × 299 is the ``resize`` mode, named as clean-fid names them:

* ``"clean"`` (default; clean-fid's default, which LinFusion's official evaluation calls): each
  channel of the uint8 image is resized as a float32 image with PIL's bicubic filter
  (antialiased, not clipped, not quantised), then scaled by (x − 128) / 128;
* ``"legacy-pytorch"`` (pytorch-fid): a bilinear ``F.interpolate`` (``align_corners=False``, no
  antialiasing) of the image in [0, 1], then scaled by 2x − 1.

``width`` scales every branch's channels (1.0 is the real network): a narrow random network runs
the same code path in tests. Any module with the :class:`FeatureExtractor` interface can stand
in for the network in :mod:`linfusion_ops.evaluation.metrics`.
"""

import hashlib
import os
from typing import Optional, Protocol, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..optional import needs

with needs(__name__, "eval"):  # a missing extra is a one-line MissingExtraError
    import numpy as np

__all__ = ["FeatureExtractor", "FIDInceptionV3", "load_fid_inception", "file_sha256", "clean_resize", "RESIZE_MODES"]

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
RESIZE_MODES = ("clean", "legacy-pytorch")


class FeatureExtractor(Protocol):
    """What the FID code needs from a network: ``extractor(images)`` maps (B, 3, H, W) uint8
    images (any H, W; the extractor resizes) to (B, feature_dim) float features; ``name``
    identifies the network, its weights and its resizing in the cached statistics' settings hash."""

    name: str
    feature_dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 0.001) + ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool(x):
    # The TF graph's average pools ignore the zero padding.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int, w):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, w(64), 1)
        self.branch5x5_1 = BasicConv2d(cin, w(48), 1)
        self.branch5x5_2 = BasicConv2d(w(48), w(64), 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, w(64), 1)
        self.branch3x3dbl_2 = BasicConv2d(w(64), w(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(w(96), w(96), 3, padding=1)
        self.branch_pool = BasicConv2d(cin, w(pool_features), 1)
        self.out_channels = 2 * w(64) + w(96) + w(pool_features)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int, w):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, w(384), 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, w(64), 1)
        self.branch3x3dbl_2 = BasicConv2d(w(64), w(96), 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(w(96), w(96), 3, stride=2)
        self.out_channels = w(384) + w(96) + cin

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int, w):
        super().__init__()
        c7 = w(channels_7x7)
        self.branch1x1 = BasicConv2d(cin, w(192), 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, w(192), (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, w(192), (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, w(192), 1)
        self.out_channels = 4 * w(192)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int, w):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, w(192), 1)
        self.branch3x3_2 = BasicConv2d(w(192), w(320), 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, w(192), 1)
        self.branch7x7x3_2 = BasicConv2d(w(192), w(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(w(192), w(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(w(192), w(192), 3, stride=2)
        self.out_channels = w(320) + w(192) + cin

    def forward(self, x):
        b7 = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(b7),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionE(nn.Module):
    """``pool="avg"`` for Mixed_7b, ``"max"`` for Mixed_7c (the TF graph's last block)."""

    def __init__(self, cin: int, pool: str, w):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, w(320), 1)
        self.branch3x3_1 = BasicConv2d(cin, w(384), 1)
        self.branch3x3_2a = BasicConv2d(w(384), w(384), (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(w(384), w(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, w(448), 1)
        self.branch3x3dbl_2 = BasicConv2d(w(448), w(384), 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(w(384), w(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(w(384), w(384), (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, w(192), 1)
        self.out_channels = w(320) + 4 * w(384) + w(192)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], 1)


def clean_resize(images: torch.Tensor, size: int = 299) -> torch.Tensor:
    """clean-fid's "clean" resize: (B, 3, H, W) uint8 (or float in [0, 255]) → (B, 3, size, size)
    float32 in about [0, 255] (bicubic overshoot kept), each channel resized as a PIL "F" image
    with the bicubic filter (PIL antialiases when it shrinks)."""
    from PIL import Image

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"clean_resize: expected (B, 3, H, W) images, got {getattr(images, 'shape', type(images).__name__)}")
    arrays = images.detach().cpu().to(torch.float32).numpy()
    out = np.empty((arrays.shape[0], 3, size, size), np.float32)
    for b, image in enumerate(arrays):
        for c, channel in enumerate(image):
            # A float32 array becomes a 32-bit float ("F") image.
            out[b, c] = np.asarray(Image.fromarray(channel).resize((size, size), Image.BICUBIC))
    return torch.from_numpy(out)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (random weights until loaded; see :func:`load_fid_inception`).

    Forward: (B, 3, H, W) uint8 images (or float images in [0, 1]) → resized to ``input_size``
    × ``input_size`` (299) and scaled to about [−1, 1] as ``resize`` says (module docstring) →
    (B, feature_dim) fp32 pool3 features (feature_dim 2048 at ``width`` 1). Runs in eval mode
    (BatchNorm running statistics) under ``torch.no_grad``.

    Args:
        width: channel multiplier of every branch (1.0: the real network; tests use less).
        input_size: the resize target; 299 for FID (75 is the smallest the network accepts).
        resize: ``"clean"`` (clean-fid) or ``"legacy-pytorch"`` (pytorch-fid).
    """

    def __init__(self, width: float = 1.0, input_size: int = 299, resize: str = "clean"):
        super().__init__()
        if not width > 0:
            raise ValueError(f"FIDInceptionV3: width must be > 0, got {width!r}")
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 75:
            raise ValueError(f"FIDInceptionV3: input_size must be an int >= 75, got {input_size!r}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"FIDInceptionV3: resize must be one of {RESIZE_MODES}, got {resize!r}")

        def w(channels: int) -> int:
            return max(1, round(channels * width))

        self.width = width
        self.input_size = input_size
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, w(32), 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(w(32), w(32), 3)
        self.Conv2d_2b_3x3 = BasicConv2d(w(32), w(64), 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(w(64), w(80), 1)
        self.Conv2d_4a_3x3 = BasicConv2d(w(80), w(192), 3)
        blocks = []
        cin = w(192)
        for name, make in (
            ("Mixed_5b", lambda c: InceptionA(c, 32, w)),
            ("Mixed_5c", lambda c: InceptionA(c, 64, w)),
            ("Mixed_5d", lambda c: InceptionA(c, 64, w)),
            ("Mixed_6a", lambda c: InceptionB(c, w)),
            ("Mixed_6b", lambda c: InceptionC(c, 128, w)),
            ("Mixed_6c", lambda c: InceptionC(c, 160, w)),
            ("Mixed_6d", lambda c: InceptionC(c, 160, w)),
            ("Mixed_6e", lambda c: InceptionC(c, 192, w)),
            ("Mixed_7a", lambda c: InceptionD(c, w)),
            ("Mixed_7b", lambda c: InceptionE(c, "avg", w)),
            ("Mixed_7c", lambda c: InceptionE(c, "max", w)),
        ):
            block = make(cin)
            setattr(self, name, block)
            blocks.append(name)
            cin = block.out_channels
        self._blocks = blocks
        self.feature_dim = cin
        # Unused for the features; present so that the released weights load strictly.
        self.fc = nn.Linear(cin, 1008)
        self.name = self._describe("random")
        self.eval()

    def _describe(self, weights: str) -> str:
        return f"fid-inception-v3(width={self.width}, input={self.input_size}, resize={self.resize}, weights={weights})"

    def train(self, mode: bool = True):
        # The features are defined with the running BatchNorm statistics only.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if (not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3
                or not (images.dtype == torch.uint8 or images.is_floating_point())):
            raise ValueError(f"FIDInceptionV3: images must be a (B, 3, H, W) uint8 tensor or a float one in [0, 1], got "
                             f"{(tuple(images.shape), images.dtype) if isinstance(images, torch.Tensor) else type(images).__name__}")
        weight = self.Conv2d_1a_3x3.conv.weight
        size = (self.input_size, self.input_size)
        if self.resize == "clean":
            pixels = images if images.dtype == torch.uint8 else images.float() * 255
            x = (clean_resize(pixels, self.input_size).to(weight.device) - 128) / 128
        else:
            x = images.to(weight.device, torch.float32)
            x = x / 255 if images.dtype == torch.uint8 else x
            x = 2 * F.interpolate(x, size=size, mode="bilinear", align_corners=False) - 1
        x = x.to(weight.dtype)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in self._blocks:
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1).float()


def file_sha256(path: Union[str, os.PathLike], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def load_fid_inception(path: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None,
                       resize: str = "clean") -> FIDInceptionV3:
    """The FID Inception-v3 with weights from ``path``: pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth`` (a state dict saved with ``torch.save``) or the same
    tensors as ``.safetensors``, resizing as ``resize`` says. Raises a one-line error for a
    missing file or foreign weights. ``name`` records the file's SHA-256 and the resize mode so
    cached statistics follow both."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--inception-weights: no such file {path!r} (the FID Inception weights are not bundled: "
            f"download pytorch-fid's {FID_WEIGHTS_NAME})"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"--inception-weights: {path!r} holds a {type(state).__name__}, expected a state dict")
    stem = state.get("Conv2d_1a_3x3.conv.weight")
    # A narrower network (tests) is recognised by its stem; the released weights are width 1.
    width = stem.shape[0] / 32 if isinstance(stem, torch.Tensor) and stem.dim() == 4 else 1.0
    model = FIDInceptionV3(width=width, resize=resize)
    expected = set(model.state_dict())
    missing = sorted(k for k in expected - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"--inception-weights: {path!r} is not an FID Inception-v3 state dict "
            f"({len(missing)} missing keys, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise ValueError(f"--inception-weights: {path!r}: {str(error).splitlines()[-1].strip()}") from None
    model.name = model._describe(f"sha256:{file_sha256(path)[:16]}")
    return model.to(device) if device is not None else model
