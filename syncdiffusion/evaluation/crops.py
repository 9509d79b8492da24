"""The crops every figure of the report is taken on, as the paper's evaluation code takes them:
CROP x CROP at stride CROP, row by row; one random crop per panorama for CLIP and fidelity; the
pixels as 8-bit RGB in [0, 1].
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from PIL import Image

from ..errors import EvaluationError

CROP = 512  # crop side and stride, in pixels, as in the paper's evaluation


def crop_boxes(height: int, width: int) -> list[tuple[int, int]]:
    """(top, left) of the CROP x CROP crops at stride CROP, row by row."""
    rows, columns = range(0, height - CROP + 1, CROP), range(0, width - CROP + 1, CROP)
    return list(itertools.product(rows, columns))


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's 16-bit greyscale


def rgb8(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB: 16-bit greyscale scaled to 0..255 (`convert` would clip it), the
    other modes through `convert`; EvaluationError for pixels without a fixed range."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise EvaluationError(
                f"its mode {image.mode} pixels run from {values.min()} to {values.max()}; "
                "16-bit greyscale runs from 0 to 65535"
            )
        grey = (values * 255 + 65535 // 2) // 65535  # round(v / 257)
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    try:
        if image.mode == "F":  # floats of no fixed range: `convert` would clip them to 0..255
            raise ValueError("floating-point pixels have no fixed range")
        return image.convert("RGB")
    except ValueError as exc:
        raise EvaluationError(
            f"its pixels (mode {image.mode}) do not convert to RGB ({exc}); save it as 8-bit "
            "or 16-bit RGB or greyscale"
        ) from None


def pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1], as torchvision's ToTensor makes it from 8-bit RGB."""
    array = np.asarray(rgb8(image))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


def crops(image: torch.Tensor) -> list[torch.Tensor]:
    """The crops of `crop_boxes`, each (3, CROP, CROP): views of `image`, not copies."""
    _, height, width = image.shape
    return [image[:, t : t + CROP, left : left + CROP] for t, left in crop_boxes(height, width)]


def clip_box(height: int, width: int, rng: np.random.RandomState) -> tuple[int, int]:
    """(top, left) of the random CLIP crop: the paper's `randint(0, W - 512)` on each long side."""
    left = rng.randint(0, width - CROP) if width > CROP else 0
    top = rng.randint(0, height - CROP) if height > CROP else 0
    return top, left


def clip_input(image: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """The crop of `image` ((3, H, W) in [0, 1]) as the paper's CLIP code feeds it: int64 0..255."""
    tile = image[:, top : top + CROP, left : left + CROP]
    return (tile * 255.0).type(torch.int64)
