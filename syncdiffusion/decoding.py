"""From latents to pictures: the VAE decode `D` of the paper and the 8-bit conversion."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """D(z): latents (n, 4, h, w) to images (n, 3, 8h, 8w) in [0, 1]."""
    # `1 / s * z` rather than `z / s`, as the published code writes it: the same up to one rounding.
    images = vae.decode(1 / vae.config.scaling_factor * latents.to(vae.dtype)).sample
    return (images / 2 + 0.5).clamp(0, 1)


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image (3, H, W) in [0, 1] to 8-bit RGB, truncating as torchvision's `ToPILImage` does."""
    pixels = (image.detach().float().cpu() * 255).to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()))
