"""The tiled VAE of linfusion_ops.highres equals the untiled decode and encode (whole-image
GroupNorm statistics, one global mid-block attention), with tiles several times smaller than
the image, and holds one tile's activations plus the output, not the image's activations."""

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.autoencoders.vae import DecoderOutput
from linfusion_ops.highres.memory import LiveBytes, tensor_bytes
from linfusion_ops.highres.tiled_vae import default_halo, enable_tiled_vae, tiled_decode, tiled_encode
from tests.helpers.tiny_models import tiny_deep_vae, tiny_vae


def _factor(vae):
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _rel(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


VAES = {
    "sd_like": lambda: tiny_vae().eval(),  # 2 levels, one resnet per level, factor 2
    "xl_like": tiny_deep_vae,  # 3 levels, two resnets per level, factor 4
    "no_mid_attention": lambda: tiny_deep_vae(mid_block_add_attention=False),
}


@pytest.mark.parametrize(
    "name, latent_hw",
    [("sd_like", (13, 19)), ("sd_like", (16, 10)), ("xl_like", (11, 13)), ("no_mid_attention", (9, 13))],
)
def test_tiled_decode_equals_untiled(name, latent_hw):
    vae = VAES[name]()
    f = _factor(vae)
    z = torch.randn(2, 4, *latent_hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vae.decode(z).sample
        diffusers_tiles = None
        if name == "xl_like":
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = 4 * f, 4
            diffusers_tiles = vae.decode(z).sample
            vae.disable_tiling()
    out = tiled_decode(vae, z, tile_size=4 * f)  # tiles of 4 x 4 latents: 9 to 20 tiles
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert _rel(out, ref) < 1e-3
    if diffusers_tiles is not None:
        # What the per-tile statistics of diffusers' tiling cost on the same tiles.
        assert _rel(diffusers_tiles, ref) > 1e-2


@pytest.mark.parametrize("name, latent_hw", [("sd_like", (13, 19)), ("xl_like", (11, 9)), ("no_mid_attention", (9, 7))])
def test_tiled_encode_equals_untiled(name, latent_hw):
    vae = VAES[name]()
    f = _factor(vae)
    x = torch.rand(1, 3, latent_hw[0] * f, latent_hw[1] * f, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref = vae.encode(x).latent_dist
    dist = tiled_encode(vae, x, tile_size=4 * f)
    assert _rel(dist.mean, ref.mean) < 1e-3
    assert _rel(dist.logvar, ref.logvar) < 1e-3
    g = torch.Generator().manual_seed(3)
    assert dist.sample(g).shape == ref.mean.shape


def test_enable_tiled_vae_patches_and_restores():
    vae = tiny_vae().eval()
    z = torch.randn(1, 4, 10, 10, generator=torch.Generator().manual_seed(2))
    x = torch.rand(1, 3, 20, 20, generator=torch.Generator().manual_seed(3)) * 2 - 1
    small = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_dec = vae.decode(z).sample
        ref_enc = vae.encode(x).latent_dist.mean
        ref_small = vae.decode(small).sample
        with enable_tiled_vae(vae, tile_size=8) as handle:
            assert "decode" in vae.__dict__ and "encode" in vae.__dict__
            out = vae.decode(z)
            assert isinstance(out, DecoderOutput)
            assert _rel(out.sample, ref_dec) < 1e-3
            assert not torch.equal(out.sample, ref_dec)  # it did run tiled
            (dist,) = vae.encode(x, return_dict=False)
            assert _rel(dist.mean, ref_enc) < 1e-3
            # One tile or less: the original, untiled method.
            assert torch.equal(vae.decode(small, return_dict=False)[0], ref_small)
        assert "decode" not in vae.__dict__ and "encode" not in vae.__dict__
        handle.remove()  # a second remove is a no-op
        assert torch.equal(vae.decode(z).sample, ref_dec)
        assert torch.equal(vae.encode(x).latent_dist.mean, ref_enc)
        # Every GroupNorm forward restored after the runs.
        assert not any("forward" in m.__dict__ for m in vae.modules())


def test_bad_arguments():
    vae = tiny_deep_vae()
    z = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="tile_size"):
        tiled_decode(vae, z, tile_size=10)
    with pytest.raises(ValueError, match="halo"):
        tiled_decode(vae, z, tile_size=16, halo=4)
    with pytest.raises(ValueError, match="divisible by 4"):
        tiled_encode(vae, torch.rand(1, 3, 30, 32), tile_size=16)
    # A larger halo than needed changes nothing but the cost.
    with torch.no_grad():
        ref = vae.decode(z).sample
    assert _rel(tiled_decode(vae, z, tile_size=16, halo=64), ref) < 1e-3


def _peak(fn):
    with torch.no_grad(), LiveBytes("cpu") as counter:
        out = fn()
    return counter.peak, out


def test_tiled_decode_memory_is_one_tile_plus_output():
    """Peak live bytes (every tensor the ops create, until it dies) of the tiled decode of an
    80 x 80 latent (160 px image) with 32 px tiles is at most: the output, the two
    latent-resolution maps of the mid-block attention, and the activations of one untiled
    decode of a tile-with-halo crop; and far below the untiled decode's."""
    vae = tiny_vae().eval()
    f, mid = _factor(vae), vae.config.block_out_channels[-1]
    z = torch.randn(1, 4, 80, 80, generator=torch.Generator().manual_seed(5))
    untiled, ref = _peak(lambda: vae.decode(z).sample)
    tiled, out = _peak(lambda: tiled_decode(vae, z, tile_size=32))
    assert _rel(out, ref) < 1e-3
    crop = (32 + 2 * default_halo(vae)) // f
    tile, _ = _peak(lambda: vae.decode(z[..., :crop, :crop]).sample)
    latent_maps = 2 * mid * 80 * 80 * z.element_size()
    bound = tensor_bytes(out) + latent_maps + tile
    assert tiled <= bound, (tiled, bound)
    assert tiled < untiled / 2, (tiled, untiled)
