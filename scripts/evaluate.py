"""Coherence report: the SyncDiffusion paper's metrics for a folder of panoramas.

    python scripts/evaluate.py DIR [--weights weights]

For each image, the 512x512 crops taken at stride 512 are compared pairwise:
- Intra-LPIPS: mean LPIPS-VGG between all pairs of crops (lower: more coherent);
- Intra-Style-L: mean Gram-matrix style loss on the same VGG features (lower: more coherent).
Prints one row per image and the mean per folder, so settings can be compared (for example
a folder made with sync_weight 0 against one made with sync_weight 20).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from syncdiffusion.pipeline import load_lpips  # noqa: E402
from syncdiffusion.weights import VGG16_RELPATH, default_weights_dir  # noqa: E402

CROP = 512
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def crops(image: Image.Image) -> torch.Tensor:
    """The 512x512 crops at stride 512, (n, 3, 512, 512) in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1)
    pixels = pixels.permute(2, 0, 1)
    _, h, w = pixels.shape
    return torch.stack(
        [
            pixels[:, y : y + CROP, x : x + CROP]
            for y in range(0, h - CROP + 1, CROP)
            for x in range(0, w - CROP + 1, CROP)
        ]
    )


def gram(features: torch.Tensor) -> torch.Tensor:
    """Gram matrices (n, C, C) of features (n, C, H, W), normalised by C * H * W."""
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


@torch.no_grad()
def coherence(model, image: Image.Image, device: torch.device) -> tuple[int, float, float]:
    """(number of crops, Intra-LPIPS, Intra-Style-L) of one panorama."""
    tiles = crops(image).to(device)
    if len(tiles) < 2:
        return len(tiles), float("nan"), float("nan")
    features = model.net(model.scaling_layer(tiles))
    grams = [gram(f) for f in features]
    lpips_values, style_values = [], []
    for i, j in itertools.combinations(range(len(tiles)), 2):
        lpips_values.append(model(tiles[i : i + 1], tiles[j : j + 1]).item())
        style_values.append(sum(torch.mean((g[i] - g[j]) ** 2).item() for g in grams))
    return len(tiles), float(np.mean(lpips_values)), float(np.mean(style_values))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="weights folder with the LPIPS trunk (default: weights/)",
    )
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    files = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        print(f"error: no images in {args.folder}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights = args.weights or default_weights_dir()
    model = load_lpips(weights / VGG16_RELPATH).to(device)

    print(f"{'image':40s} {'crops':>5s} {'Intra-LPIPS':>12s} {'Intra-Style-L':>14s}")
    rows = []
    for path in files:
        with Image.open(path) as image:
            n, intra_lpips, intra_style = coherence(model, image, device)
        rows.append((intra_lpips, intra_style))
        print(f"{path.name:40s} {n:5d} {intra_lpips:12.4f} {intra_style:14.3e}")
    means = np.nanmean(np.array(rows), axis=0)
    print(
        f"{'mean of ' + str(len(files)) + ' images':40s} {'':5s} {means[0]:12.4f} {means[1]:14.3e}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
