"""A panorama that starts from an image: where the sampler starts, the image's latent noised to
that step, and the kept region held to the image at every step.

As diffusers' `StableDiffusionImg2ImgPipeline` and (with an ordinary 4-channel UNet)
`StableDiffusionInpaintPipeline` do it: `strength` of the steps run, from the image's VAE latent
(`latent_dist.sample(generator)`, the first draw) noised by `scheduler.add_noise` with the noise
drawn next; with a mask (white: made anew) the kept part of the latent is put back after every
scheduler step, noised to the next timestep, and at the last the clean image latent. An image
whose proportions differ from the panorama's is placed in its middle and the rest is made anew
(`outpaint`).

An inpainting UNet (9 input channels: `stable-diffusion-2-inpainting`) is not held to the image:
as diffusers' inpainting pipeline feeds it, every network call takes the mask at latent size
and the masked image's latent beside the noisy latent (`MaskedImage`), each window its crops.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from .chunks import is_out_of_memory, release_memory
from .decoding import TILE, TILE_ABOVE_PIXELS, TILE_OVERLAP, ramp, tile_starts, vae_scale_factor
from .windows import Window, anchor_index, gather

# Proportions within this fraction of the panorama's count as the panorama's: the image is resized
# to it (img2img), not placed in it (outpainting). A side rounded to a multiple of 8 stays within.
SAME_PROPORTIONS = 0.02


def start_at(scheduler: Any, steps_left: int) -> int:
    """The first of `scheduler.timesteps` (after `set_timesteps`) a run of its last `steps_left`
    steps evaluates, made the scheduler's begin index where it keeps one."""
    start = (scheduler.num_inference_steps - steps_left) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return start


def same_proportions(image: Image.Image, width: int, height: int) -> bool:
    """Whether `image` has a `width` x `height` panorama's proportions (`SAME_PROPORTIONS`)."""
    panorama = image.height * width  # the image's width scaled to the panorama's height, times it
    return abs(image.width * height - panorama) <= SAME_PROPORTIONS * panorama


def outpaint(
    image: Image.Image, mask: Image.Image | None, width: int, height: int
) -> tuple[Image.Image, Image.Image]:
    """`image` scaled to the panorama's height (its width for a vertical panorama), in the middle
    of a `width` x `height` canvas, and the mask that keeps it (black) and makes the rest anew
    (white); where `mask` is given, it is placed likewise. The canvas around the image repeats
    its edge pixels, so a strength below 1 starts the new part from the image's colours."""
    scale = height / image.height if width >= height else width / image.width
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    size = (min(size[0], width), min(size[1], height))
    left, top = (width - size[0]) // 2, (height - size[1]) // 2
    pixels = np.asarray(image.convert("RGB").resize(size, Image.Resampling.LANCZOS))
    around = ((top, height - size[1] - top), (left, width - size[0] - left), (0, 0))
    canvas = Image.fromarray(np.pad(pixels, around, mode="edge"))
    placed = Image.new("L", (width, height), 255)
    kept = mask.convert("L").resize(size) if mask is not None else Image.new("L", size, 0)
    placed.paste(kept, (left, top))
    return canvas, placed


def image_pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """`image` as the VAE encodes it: RGB resized to `width` x `height` (Lanczos, as diffusers'
    pipelines do), (1, 3, height, width) in [-1, 1], fp32."""
    processor = VaeImageProcessor(do_convert_rgb=True)
    return processor.preprocess(image, height=height, width=width).to(torch.float32)


def mask_pixels(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """`mask` at the picture's size, (1, 1, height, width): 1 made anew, 0 kept. As diffusers'
    inpainting: grayscale, resized to the picture, binarized at 0.5."""
    processor = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    return processor.preprocess(mask, height=height, width=width).to(torch.float32)


def mask_latent(mask: Image.Image, width: int, height: int, scale_factor: int) -> torch.Tensor:
    """`mask` at latent size, (1, 1, height / f, width / f): 1 made anew, 0 kept; `mask_pixels`
    then nearest to the latent, as diffusers' inpainting."""
    pixels = mask_pixels(mask, width, height)
    return F.interpolate(pixels, size=(height // scale_factor, width // scale_factor))


def masked_pixels(image: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """What an inpainting UNet sees of the picture: `image` (1, 3, H, W) in [-1, 1] where `mask`
    (1, 1, H, W, `mask_pixels`) keeps it, 0 (mid-grey) where it is made anew, as diffusers'
    `image * (mask < 0.5)`; all grey without an image (everything made anew), in the memory
    layout `image_pixels` gives a picture (channels last), so that the encoder runs the same
    kernels and no picture is a grey picture to the bit."""
    if image is None:
        grey = torch.zeros(1, 3, *mask.shape[-2:])
        return grey.contiguous(memory_format=torch.channels_last)
    return image * (mask < 0.5)


def encode(
    vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """E(x): pixels (1, 3, H, W) in [-1, 1] to a latent (1, 4, H/8, W/8), fp32, sampled from the
    encoder's distribution with `generator` and scaled by the VAE's scaling factor.

    As the panorama is decoded: in one piece up to TILE_ABOVE_PIXELS (as diffusers encodes), in
    cross-faded tiles above it or where the whole does not fit in memory (`encode_moments_tiled`).
    Either way the sample is one draw of the latent's shape from `generator`."""
    fp32 = vae.dtype == torch.float32
    with torch.autocast(pixels.device.type, enabled=False) if fp32 else nullcontext():
        posterior = None
        if pixels.shape[-2] * pixels.shape[-1] <= TILE_ABOVE_PIXELS:
            try:
                posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
        if posterior is None:
            release_memory()  # past the `except`, so the failed encode's tensors are gone
            moments = encode_moments_tiled(vae, pixels).to(vae.device, vae.dtype)
            posterior = DiagonalGaussianDistribution(moments)
        latent = posterior.sample(generator) * vae.config.scaling_factor
    return latent.to(torch.float32)


def encode_moments_tiled(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """The encoder's distribution of pixels (1, 3, H, W), its mean and log-variance
    (1, 2 * 4, H/8, W/8), in overlapping tiles of TILE latent pixels cross-faded as the decoder's
    tiles are (`decoding.decode_tiled`); fp32 on the CPU. Memory is that of one tile's encoder
    plus the moments, whatever the image's size."""
    f = vae_scale_factor(vae)
    h, w = pixels.shape[-2] // f, pixels.shape[-1] // f
    moments = torch.zeros(1, 2 * vae.config.latent_channels, h, w)
    total = torch.zeros(1, 1, h, w)
    rows, cols = tile_starts(h), tile_starts(w)
    for i, h0 in enumerate(rows):
        for j, w0 in enumerate(cols):
            tile = pixels[..., f * h0 : f * (h0 + TILE), f * w0 : f * (w0 + TILE)]
            encoded = vae.encode(tile.to(vae.device, vae.dtype)).latent_dist.parameters
            encoded = encoded.float().cpu()
            th, tw = encoded.shape[-2:]
            weight = torch.outer(
                ramp(th, min(TILE_OVERLAP, th // 2), i > 0, i < len(rows) - 1),
                ramp(tw, min(TILE_OVERLAP, tw // 2), j > 0, j < len(cols) - 1),
            )
            moments[..., h0 : h0 + th, w0 : w0 + tw] += encoded * weight
            total[..., h0 : h0 + th, w0 : w0 + tw] += weight
    return moments / total


def start_latent(
    scheduler: Any,
    image_latent: torch.Tensor,
    noise: torch.Tensor,
    start: int,
    from_noise: bool,
) -> torch.Tensor:
    """The latent the sampler starts from at evaluation `start`: `noise` at the scheduler's
    largest noise level where `from_noise` (inpainting at strength 1, as diffusers' inpainting
    starts), else the image's latent noised to the first timestep run."""
    if from_noise:
        return noise * scheduler.init_noise_sigma
    return scheduler.add_noise(image_latent, noise, scheduler.timesteps[start : start + 1])


class KeptRegion:
    """The part of the panorama a mask keeps, held to the image: after each scheduler step the
    kept latent is the image's latent noised (with the starting noise) to the next timestep,
    and after the last the image's latent itself (diffusers' inpainting with a 4-channel UNet)."""

    def __init__(self, image_latent: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> None:
        # (1, 4, h, w) each; `mask` (1, 1, h, w): 1 made anew, 0 kept.
        self.image_latent, self.mask, self.noise = image_latent, mask, noise

    def hold(self, latent: torch.Tensor, scheduler: Any, k: int) -> torch.Tensor:
        """`latent` after evaluation `k`, its kept part put back."""
        kept = self.image_latent
        if k + 1 < len(scheduler.timesteps):
            kept = scheduler.add_noise(kept, self.noise, scheduler.timesteps[k + 1 : k + 2])
        return (1 - self.mask) * kept.to(latent.dtype) + self.mask * latent

    def anchor(self, windows: list[Window]) -> int:
        """The window most covered by the kept part: the panorama syncs to the image."""
        return kept_anchor(self.mask, windows)


def kept_anchor(mask: torch.Tensor, windows: list[Window]) -> int:
    """The window most covered by what `mask` (1, 1, h, w; 0 kept) keeps (of those, the
    published anchor where it is one, else the first)."""
    kept = (1 - gather(mask, windows)).mean(dim=(1, 2, 3))  # (n_windows,)
    best = [k for k, share in enumerate(kept.tolist()) if share == kept.max().item()]
    default = anchor_index(windows)
    return default if default in best else best[0]


class MaskedImage:
    """What an inpainting UNet takes beside the noisy latent, over the whole panorama: the mask
    at latent size (1, 1, h, w; 1 made anew) and the masked image's latent (1, 4, h, w), each
    window's crops joined to its views in every network call (diffusers' order: latent, mask,
    masked image's latent)."""

    def __init__(self, mask: torch.Tensor, latent: torch.Tensor, windows: list[Window]) -> None:
        self.mask, self.windows = mask, windows
        self.conditioning = torch.cat([mask, latent.to(mask.dtype)], dim=1)  # (1, 5, h, w)

    def inputs(self, views: torch.Tensor, ids: list[int] | range) -> torch.Tensor:
        """The UNet's input for `views` (n, 4, s, s) of the windows numbered `ids`:
        (n, 9, s, s), the crops in the views' dtype."""
        crops = gather(self.conditioning, [self.windows[k] for k in ids])
        return torch.cat([views, crops.to(views.device, views.dtype)], dim=1)

    def anchor(self, windows: list[Window]) -> int:
        """The window most covered by the kept part: the panorama syncs to the image."""
        return kept_anchor(self.mask, windows)
