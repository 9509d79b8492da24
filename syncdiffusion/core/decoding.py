"""From latents to pictures: the VAE decode `D` of the paper, the whole-panorama decode (circular
for 360-degree panoramas, tiled for huge ones) and the 8-bit conversion."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

from .chunks import is_out_of_memory, release_memory

logger = logging.getLogger(__name__)

# Panoramas up to this many pixels decode in one piece, as the published wrapper does (so its
# sizes keep its exact pixels); larger ones decode in overlapping tiles within bounded memory.
TILE_ABOVE_PIXELS = 3072 * 3072
TILE = 128  # latent pixels per tile side (1024 px)
TILE_OVERLAP = 32  # latent pixels shared by neighbouring tiles, cross-faded


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Image pixels per latent pixel: 2 per downsampling level of the VAE (8 for SD and SDXL)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """D(z): latents (n, 4, h, w) to images (n, 3, 8h, 8w) in [0, 1], with the VAE's own
    scaling factor (0.18215 for SD 1.x/2.x, 0.13025 for SDXL).

    A VAE in fp32 runs in fp32 inside a caller's autocast too: SDXL's is fp32 because its
    decoder overflows fp16 (`precision`), which autocast would bring back."""
    fp32 = vae.dtype == torch.float32
    with torch.autocast(latents.device.type, enabled=False) if fp32 else nullcontext():
        # `1 / s * z` rather than `z / s`, as the published code writes it: the same up to one
        # rounding.
        images = vae.decode(1 / vae.config.scaling_factor * latents.to(vae.dtype)).sample
        return (images / 2 + 0.5).clamp(0, 1)


@contextmanager
def circular_width(vae: AutoencoderKL) -> Iterator[None]:
    """Within the block, every decoder convolution pads the width circularly (the height with
    zeros, as usual), so the decoded picture's left and right edges continue each other.

    The decoder's other layers (GroupNorm, attention without positions, nearest upsampling)
    commute with a roll of the width already, so the whole decode does.
    """
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0)]
    saved = [(conv, conv.padding) for conv in convs]

    def pad(conv: torch.nn.Conv2d, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
        ph, pw = conv._circular_padding
        x = F.pad(args[0], (pw, pw, 0, 0), mode="circular")
        return (F.pad(x, (0, 0, ph, ph)),)

    hooks = []
    try:
        for conv in convs:
            conv._circular_padding = conv.padding
            conv.padding = (0, 0)
            hooks.append(conv.register_forward_pre_hook(pad))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for conv, padding in saved:
            conv.padding = padding
            del conv._circular_padding


def ramp(length: int, overlap: int, fade_in: bool, fade_out: bool) -> torch.Tensor:
    """Blend weights along one side of a tile: linear cross-fades over the shared overlaps."""
    weights = torch.ones(length)
    ramp = (torch.arange(overlap) + 0.5) / overlap
    if fade_in:
        weights[:overlap] = ramp
    if fade_out:
        weights[-overlap:] = ramp.flip(0)
    return weights


def tile_starts(length: int) -> list[int]:
    """Where the tiles along a side of `length` latent pixels start: TILE apart less their
    TILE_OVERLAP, the last one flush with the end."""
    if length <= TILE:
        return [0]
    starts = list(range(0, length - TILE, TILE - TILE_OVERLAP))
    return [*starts, length - TILE]


def decode_tiled(vae: AutoencoderKL, latent: torch.Tensor) -> torch.Tensor:
    """D(z) of a (1, 4, h, w) latent in overlapping tiles, cross-faded; (1, 3, 8h, 8w) on the CPU.

    Memory is that of one tile plus the finished picture, whatever the panorama's size.
    """
    _, _, h, w = latent.shape
    f = vae_scale_factor(vae)
    image = torch.zeros(1, 3, f * h, f * w)
    total = torch.zeros(1, 1, f * h, f * w)
    rows, cols = tile_starts(h), tile_starts(w)
    for i, h0 in enumerate(rows):
        for j, w0 in enumerate(cols):
            tile = latent[:, :, h0 : h0 + TILE, w0 : w0 + TILE]
            pixels = decode(vae, tile).float().cpu()
            th, tw = pixels.shape[-2:]
            # Neighbours may overlap by more than TILE_OVERLAP at the last row or column.
            overlap_h = min(f * TILE_OVERLAP, th // 2)
            overlap_w = min(f * TILE_OVERLAP, tw // 2)
            weight = torch.outer(
                ramp(th, overlap_h, i > 0, i < len(rows) - 1),
                ramp(tw, overlap_w, j > 0, j < len(cols) - 1),
            )
            image[..., f * h0 : f * h0 + th, f * w0 : f * w0 + tw] += pixels * weight
            total[..., f * h0 : f * h0 + th, f * w0 : f * w0 + tw] += weight
    return image / total


def decode_panorama(vae: AutoencoderKL, latent: torch.Tensor, loop_closure: bool) -> torch.Tensor:
    """The finished panorama (1, 3, H, W) in [0, 1]: circular in width for a 360-degree one,
    tiled above TILE_ABOVE_PIXELS or when the whole one does not fit in memory."""
    _, _, h, w = latent.shape
    f = vae_scale_factor(vae)
    if f * f * h * w <= TILE_ABOVE_PIXELS:
        try:
            if loop_closure:
                with circular_width(vae):
                    return decode(vae, latent)
            return decode(vae, latent)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
        release_memory()  # past the `except`, so the failed decode's tensors are gone
        logger.warning(
            "the %dx%d panorama does not fit in memory in one piece: decoding it in %d px tiles",
            f * w,
            f * h,
            f * TILE,
        )
    if not loop_closure:
        return decode_tiled(vae, latent)
    # Tiles cannot pad circularly; give the edge tiles the far side as context instead.
    pad = TILE_OVERLAP
    wrapped = torch.cat([latent[..., -pad:], latent, latent[..., :pad]], dim=-1)
    return decode_tiled(vae, wrapped)[..., f * pad : -f * pad]


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image (3, H, W) in [0, 1] to 8-bit RGB, truncating as torchvision's `ToPILImage` does."""
    pixels = (image.detach().float().cpu() * 255).to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()))
