"""The whole-panorama decode: seam-free 360-degree output, and tiles for huge panoramas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from syncdiffusion.core import decoding
from syncdiffusion.core.decoding import (
    circular_width,
    decode,
    decode_panorama,
    decode_tiled,
    to_pil,
)


@pytest.mark.parametrize("k", [1, 7, 40])
def test_circular_decode_commutes_with_rolling_the_width(pipe, k):
    latent = torch.randn(1, 4, 64, 96, generator=torch.Generator().manual_seed(k))
    with torch.no_grad():
        image = np.asarray(
            to_pil(decode_panorama(pipe.vae, latent, loop_closure=True)[0]), dtype=int
        )
        rolled = np.asarray(
            to_pil(decode_panorama(pipe.vae, latent.roll(k, dims=-1), loop_closure=True)[0]),
            dtype=int,
        )
    assert np.abs(rolled - np.roll(image, 8 * k, axis=1)).max() <= 1


def test_plain_decode_is_the_published_one_and_the_vae_is_left_as_it_was(pipe):
    latent = torch.randn(1, 4, 64, 80)
    with torch.no_grad():
        before = decode(pipe.vae, latent)
        with circular_width(pipe.vae):
            circular = decode(pipe.vae, latent)
        after = decode(pipe.vae, latent)
        assert torch.equal(decode_panorama(pipe.vae, latent, loop_closure=False), before)
    assert torch.equal(before, after)
    assert not torch.equal(before, circular)  # the edges differ, as they should


def test_tiles_blend_without_seams(pipe, monkeypatch):
    monkeypatch.setattr(decoding, "TILE", 32)
    monkeypatch.setattr(decoding, "TILE_OVERLAP", 8)
    # A smooth latent: any tile seam would show as a jump between neighbouring pixel columns.
    y, x = torch.meshgrid(torch.linspace(0, 2, 72), torch.linspace(0, 3, 100), indexing="ij")
    latent = torch.stack([torch.sin(x + y), torch.cos(x), torch.sin(y), x - y])[None] * 0.5
    with torch.no_grad():
        whole = decode(pipe.vae, latent)
        tiled = decode_tiled(pipe.vae, latent)
    assert tiled.shape == whole.shape == (1, 3, 576, 800)

    # Jumps across columns in the tiled picture are no larger than in the whole one.
    def jumps(image):
        return (image[..., 1:] - image[..., :-1]).abs().amax(dim=(0, 1, 2))

    assert jumps(tiled).max() <= jumps(whole).max() * 1.5 + 0.02
    # One tile is the whole decode, to the last bit.
    with torch.no_grad():
        small = latent[..., :32, :32]
        assert torch.equal(decode_tiled(pipe.vae, small), decode(pipe.vae, small))


def test_huge_panoramas_decode_in_tiles(pipe, monkeypatch):
    calls = []
    monkeypatch.setattr(decoding, "TILE_ABOVE_PIXELS", 512 * 1024)
    monkeypatch.setattr(
        decoding,
        "decode_tiled",
        lambda vae, z: calls.append(z.shape) or torch.zeros(1, 3, 8 * z.shape[2], 8 * z.shape[3]),
    )
    assert decode_panorama(pipe.vae, torch.zeros(1, 4, 64, 192), False).shape[-1] == 1536
    wrapped = decode_panorama(pipe.vae, torch.zeros(1, 4, 64, 192), True)
    assert wrapped.shape[-1] == 1536  # wrap padding cropped off again
    assert calls[0][-1] == 192 and calls[1][-1] == 192 + 2 * decoding.TILE_OVERLAP


def test_a_panorama_too_big_to_decode_whole_is_decoded_in_tiles(pipe, monkeypatch, caplog):
    monkeypatch.setattr(decoding, "TILE", 32)
    monkeypatch.setattr(decoding, "TILE_OVERLAP", 8)
    latent = torch.randn(1, 4, 64, 80, generator=torch.Generator().manual_seed(4))
    real_decode = decoding.decode

    def tight_memory(vae, latents):
        if latents.shape[-1] > 32:  # the whole panorama, not a tile
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real_decode(vae, latents)

    monkeypatch.setattr(decoding, "decode", tight_memory)
    with torch.no_grad():
        image = decode_panorama(pipe.vae, latent, loop_closure=False)
        assert torch.equal(image, decode_tiled(pipe.vae, latent))
    assert "does not fit in memory in one piece" in caplog.text


def test_an_fp32_vae_decodes_in_fp32_inside_a_callers_autocast(pipe):
    latent = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = decode(pipe.vae, latent)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            image = decode(pipe.vae, latent)
    assert image.dtype == torch.float32 and torch.equal(image, expected)
