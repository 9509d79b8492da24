"""Reproducible files: the panorama saved with every input that made it, and read back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .checks import OUTPUT_FORMATS

PARAMETERS_KEY = "syncdiffusion-parameters"  # PNG text chunk: all parameters as JSON
_EXIF_IMAGE_DESCRIPTION = 0x010E  # where WebP and JPEG files carry the same JSON


def model_identity(unet_config: dict[str, Any]) -> str:
    """A short hash of the UNet's config: which model made a file, without shipping its path."""
    public = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_image(
    image: Image.Image,
    path: str | Path,
    parameters: dict[str, Any],
    output_format: str = "png",
    quality: int = 80,
) -> Path:
    """Write `image` as png, webp or jpg with `parameters` inside (PNG text chunks or EXIF)."""
    path = Path(path)
    text = json.dumps(parameters, sort_keys=True)
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_KEY, text)
        for key, value in parameters.items():
            info.add_text(key, str(value))
        image.save(path, format="PNG", pnginfo=info)
    elif output_format in ("webp", "jpg"):
        exif = Image.Exif()
        exif[_EXIF_IMAGE_DESCRIPTION] = text
        image.save(
            path, format="WEBP" if output_format == "webp" else "JPEG", quality=quality, exif=exif
        )
    else:
        raise ValueError(
            f"output_format must be one of {', '.join(OUTPUT_FORMATS)}; got {output_format!r}"
        )
    return path


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The parameters saved in a panorama file by `save_image`."""
    with Image.open(path) as image:
        text = image.info.get(PARAMETERS_KEY) or image.getexif().get(_EXIF_IMAGE_DESCRIPTION)
    if not text:
        raise ValueError(f"{path} carries no SyncDiffusion parameters")
    return json.loads(text)
