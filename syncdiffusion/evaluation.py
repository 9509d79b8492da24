"""Coherence report: the SyncDiffusion paper's metrics for a folder of panoramas.

    python scripts/evaluate.py DIR [--weights weights] [--json PATH]
                               [--clip [--clip-model DIR] [--prompt TEXT]]

Each figure is computed as the paper's evaluation code computes it (`eval_code/` of
github.com/KAIST-Visual-AI-Group/SyncDiffusion), on the 512x512 crops of each panorama taken at
stride 512, every pair of them in `itertools.combinations` order:

- Intra-LPIPS: the mean over the pairs of LPIPS v0.1 on VGG16, pixels in [-1, 1]
  (lower: more coherent).
- Intra-Style-L: the sum over the pairs of the Gram-matrix style loss on torchvision's ImageNet
  VGG19: ImageNet mean/std on [0, 1] pixels, the outputs of the first five convolutions
  (before their ReLU), Gram / (C*H*W), mean squared difference, summed over the five layers
  (lower: more coherent). A sum, so it grows with the number of crops: compare panoramas of
  one size only.
- Mean-CLIP-S (with --clip): torchmetrics' CLIPScore on openai/clip-vit-base-patch16 between
  one random 512x512 crop per panorama (numpy seed 2023, files in name order) and its prompt
  (higher: closer to the prompt).

The paper's style code first resizes each panorama so that its shorter side is 512: nothing
for its 512-high panoramas (or 512-wide ones), but a 1024x1024 panorama would shrink to one
crop and nothing to compare. Panoramas above 512 both ways are therefore cropped unresized for
Intra-Style-L, and the report marks them.

VGG16 comes from the weights folder's LPIPS trunk when it is there; VGG16 if not,
and VGG19 always, come through torchvision's weights API into the torch hub cache, which
downloads them on first use (set TORCH_HOME to move the cache).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from .files import read_parameters
from .perceptual import load_lpips
from .weights import (
    LEGACY_VGG16_RELPATH,
    VGG16_RELPATH,
    WeightsError,
    default_weights_dir,
)

CROP = 512  # crop side and stride, in pixels, as in the paper's evaluation
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STYLE_CONVS = 5  # the paper's style layers: conv_1 .. conv_5 of vgg19.features
CLIP_MODEL = "openai/clip-vit-base-patch16"
CLIP_SEED = 2023


class EvaluationError(Exception):
    """A problem with the inputs or the models, told to the user in one message."""


@dataclass
class Panorama:
    """One image to evaluate and what the report says about it."""

    path: Path
    width: int
    height: int
    prompt: str | None = None
    intra_lpips: float = float("nan")
    intra_style_l: float = float("nan")
    clip_score: float | None = None

    @property
    def crops(self) -> int:
        return len(crop_boxes(self.height, self.width))

    @property
    def style_unresized(self) -> bool:
        """True where the paper's code would have resized before the style crops."""
        return min(self.width, self.height) != CROP


def crop_boxes(height: int, width: int) -> list[tuple[int, int]]:
    """(top, left) of the CROP x CROP crops at stride CROP, row by row."""
    return [
        (top, left)
        for top in range(0, height - CROP + 1, CROP)
        for left in range(0, width - CROP + 1, CROP)
    ]


def pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1], as torchvision's ToTensor makes it from 8-bit RGB."""
    array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


def crops(image: torch.Tensor) -> torch.Tensor:
    """The crops of `crop_boxes`, (n, 3, CROP, CROP)."""
    _, height, width = image.shape
    return torch.stack(
        [image[:, t : t + CROP, left : left + CROP] for t, left in crop_boxes(height, width)]
    )


def pairs(n: int) -> list[tuple[int, int]]:
    """Every pair of crops once, in the paper's order."""
    return list(itertools.combinations(range(n), 2))


@torch.no_grad()
def intra_lpips(model, tiles: torch.Tensor) -> float:
    """Mean LPIPS over all pairs of `tiles` ((n, 3, h, w) in [0, 1])."""
    # LPIPS(a, b) is a sum over layers of lin((normalise(f(a)) - normalise(f(b)))^2), averaged
    # over space: the normalised features of each crop are computed once, not once per pair.
    import lpips

    features = []
    for tile in tiles:
        outs = model.net(model.scaling_layer(tile[None] * 2 - 1))
        features.append([lpips.normalize_tensor(out) for out in outs])
    values = []
    for i, j in pairs(len(tiles)):
        value = 0
        for layer, lin in enumerate(model.lins):
            diff = (features[i][layer] - features[j][layer]) ** 2
            value += lpips.spatial_average(lin(diff), keepdim=True)
        values.append(value.item())
    return sum(values) / len(values)


def gram(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix of one crop's features (1, C, H, W), divided by C * H * W."""
    _, c, h, w = features.shape
    flat = features.reshape(c, h * w)
    return torch.mm(flat, flat.t()).div(c * h * w)


@torch.no_grad()
def style_grams(vgg19_features: torch.nn.Sequential, tile: torch.Tensor) -> list[torch.Tensor]:
    """Gram matrices of the first STYLE_CONVS convolution outputs (before ReLU) of one crop."""
    mean = torch.tensor(IMAGENET_MEAN, device=tile.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=tile.device).view(-1, 1, 1)
    x = (tile[None] - mean) / std
    grams = []
    for layer in vgg19_features:
        # torchvision's ReLUs work in place and would overwrite the conv output kept here.
        x = torch.relu(x) if isinstance(layer, torch.nn.ReLU) else layer(x)
        if isinstance(layer, torch.nn.Conv2d):
            grams.append(gram(x))
            if len(grams) == STYLE_CONVS:
                return grams
    raise ValueError(f"the network has fewer than {STYLE_CONVS} convolutions")


def intra_style_l(vgg19_features: torch.nn.Sequential, tiles: torch.Tensor) -> float:
    """Sum over all pairs of `tiles` ((n, 3, h, w) in [0, 1]) of the summed Gram style loss."""
    grams = [style_grams(vgg19_features, tile) for tile in tiles]
    total = 0.0
    for i, j in pairs(len(tiles)):
        # A float32 sum over the layers, then a float64 sum over pairs, as in the paper's code.
        pair_loss = 0
        for target, current in zip(grams[i], grams[j], strict=True):
            pair_loss += F.mse_loss(current, target)
        total += pair_loss.item()
    return total


def clip_box(height: int, width: int, rng: np.random.RandomState) -> tuple[int, int]:
    """(top, left) of the random CLIP crop: the paper's `randint(0, W - 512)` on each long side."""
    left = rng.randint(0, width - CROP) if width > CROP else 0
    top = rng.randint(0, height - CROP) if height > CROP else 0
    return top, left


def clip_input(image: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """The crop of `image` ((3, H, W) in [0, 1]) as the paper's CLIP code feeds it: int64 0..255."""
    tile = image[:, top : top + CROP, left : left + CROP]
    return (tile * 255.0).type(torch.int64)


# --- models -----------------------------------------------------------------------------


def hub_file(weights) -> Path:
    """The file of torchvision `weights` in the torch hub cache, downloaded there if missing."""
    from urllib.parse import urlparse

    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not path.is_file():
        try:
            weights.get_state_dict(progress=True, check_hash=True)
        except (OSError, RuntimeError) as exc:
            raise EvaluationError(
                f"{path.name} (torchvision's {weights}) is not in the torch hub cache and could "
                f"not be downloaded ({type(exc).__name__}: {exc}). Download {weights.url} to "
                f"{path} (TORCH_HOME moves the cache), then run again."
            ) from exc
    return path


def load_vgg19_features(path: Path) -> torch.nn.Sequential:
    """torchvision's VGG19 convolutional trunk with the weights in `path`."""
    from torchvision.models.vgg import cfgs, make_layers

    state = torch.load(path, map_location="cpu", weights_only=True)
    features = make_layers(cfgs["E"])
    features.load_state_dict(
        {
            key.removeprefix("features."): v
            for key, v in state.items()
            if key.startswith("features.")
        }
    )
    return features.eval().requires_grad_(False)


class ProjectedCLIP(CLIPModel):
    """CLIPModel whose get_image_features and get_text_features return the projected embeddings.

    That is what torchmetrics' CLIPScore expects; transformers 5 wraps them in an output object
    (its `pooler_output`), which torchmetrics 1.9 does not unwrap (Lightning-AI/torchmetrics#3407).
    """

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _embedding(super().get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _embedding(super().get_text_features(*args, **kwargs))


def _embedding(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_clip_score(model_dir: Path | None):
    """torchmetrics' CLIPScore on the paper's CLIP, or on the same model saved in `model_dir`."""
    try:
        from torchmetrics.multimodal import CLIPScore
    except ImportError as exc:
        raise EvaluationError(
            f"--clip needs torchmetrics ({exc}): pip install -r requirements-eval.txt"
        ) from exc

    source = str(model_dir) if model_dir is not None else CLIP_MODEL
    try:
        # What CLIPScore(model_name_or_path=CLIP_MODEL) loads, through ProjectedCLIP, and from a
        # local folder too (torchmetrics takes only hub names, or a callable).
        return CLIPScore(
            model_name_or_path=lambda: (
                ProjectedCLIP.from_pretrained(source),
                CLIPProcessor.from_pretrained(source),
            )
        )
    except OSError as exc:
        raise EvaluationError(
            f"CLIP model {source} could not be loaded ({exc}). Without network, download "
            f"{CLIP_MODEL} where there is (hf download {CLIP_MODEL} --local-dir DIR) and pass "
            "--clip-model DIR."
        ) from exc


# --- the report --------------------------------------------------------------------------


def find_panoramas(folder: Path, clip: bool, prompt: str | None) -> list[Panorama]:
    """The images in `folder`, by name, each checked for size (and prompt, for CLIP)."""
    if not folder.is_dir():
        raise EvaluationError(f"folder must be a folder of panoramas; got {folder}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        allowed = ", ".join(sorted(IMAGE_SUFFIXES))
        raise EvaluationError(f"folder {folder} holds no images ({allowed})")
    panoramas = []
    for path in paths:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except OSError as exc:
            raise EvaluationError(f"{path.name} is not an image Pillow can read ({exc})") from exc
        if min(width, height) < CROP or max(width, height) < 2 * CROP:
            raise EvaluationError(
                f"{path.name} is {width}x{height}; the metrics compare {CROP}x{CROP} crops, so "
                f"both sides must be at least {CROP} and one at least {2 * CROP}"
            )
        panorama = Panorama(path, width, height, prompt)
        if clip and prompt is None:
            try:
                panorama.prompt = str(read_parameters(path)["prompt"])
            except (ValueError, KeyError) as exc:
                raise EvaluationError(
                    f"{path.name} carries no saved prompt for the CLIP score; pass --prompt TEXT"
                ) from exc
        panoramas.append(panorama)
    return panoramas


def evaluate(
    panoramas: list[Panorama],
    weights: Path,
    device: torch.device,
    clip: bool,
    clip_model: Path | None,
) -> None:
    """Fill in every panorama's figures."""
    vgg16 = weights / VGG16_RELPATH
    if not (vgg16.is_file() or (weights / LEGACY_VGG16_RELPATH).is_file()):
        from torchvision.models import VGG16_Weights

        vgg16 = hub_file(VGG16_Weights.IMAGENET1K_V1)
    from torchvision.models import VGG19_Weights

    vgg19 = hub_file(VGG19_Weights.IMAGENET1K_V1)
    lpips_model = load_lpips(vgg16).to(device)
    vgg19_features = load_vgg19_features(vgg19).to(device)
    clip_score = load_clip_score(clip_model).to(device) if clip else None
    rng = np.random.RandomState(CLIP_SEED)

    for panorama in panoramas:
        with Image.open(panorama.path) as image:
            full = pixels(image)
        if clip_score is not None:
            top, left = clip_box(panorama.height, panorama.width, rng)
            score = clip_score(clip_input(full, top, left).to(device), panorama.prompt)
            panorama.clip_score = score.item()
        tiles = crops(full).to(device)
        panorama.intra_lpips = intra_lpips(lpips_model, tiles)
        panorama.intra_style_l = intra_style_l(vgg19_features, tiles)


def means(panoramas: list[Panorama]) -> dict[str, float | None]:
    """The folder's figures: the mean over panoramas, as in the paper's code."""
    clip = [p.clip_score for p in panoramas]
    return {
        "intra_lpips": float(np.mean([p.intra_lpips for p in panoramas])),
        "intra_style_l": float(np.mean([p.intra_style_l for p in panoramas])),
        "clip_score": None if None in clip else float(np.mean(clip)),
    }


def report(panoramas: list[Panorama], clip: bool) -> str:
    """The printed table, with what each column is and which figures are not the paper's."""
    header = (
        f"{'image':36s} {'size':>10s} {'crops':>5s} {'Intra-LPIPS':>11s} {'Intra-Style-L':>14s}"
    )
    lines = [header + (f" {'CLIP-S':>7s}" if clip else "")]

    def row(name: str, size: str, crops: str, figures: dict[str, Any], mark: str) -> str:
        line = f"{name:36s} {size:>10s} {crops:>5s} {figures['intra_lpips']:11.4f}"
        line += f" {figures['intra_style_l']:13.4e}{mark or ' '}"
        return line + (f" {figures['clip_score']:7.2f}" if clip else "")

    for p in panoramas:
        figures = {"intra_lpips": p.intra_lpips, "intra_style_l": p.intra_style_l}
        figures["clip_score"] = p.clip_score
        size = f"{p.width}x{p.height}"
        lines.append(row(p.path.name, size, str(p.crops), figures, "*" * p.style_unresized))
    unresized = any(p.style_unresized for p in panoramas)
    lines.append(row(f"mean of {len(panoramas)} images", "", "", means(panoramas), "*" * unresized))
    lines += [
        "",
        f"Intra-LPIPS: mean LPIPS-VGG over all pairs of {CROP}x{CROP} crops at stride {CROP}.",
        "Intra-Style-L: sum over the same pairs of the VGG19 Gram style loss (conv1_1..conv3_1);"
        " it grows with the number of crops.",
    ]
    if clip:
        lines.append(
            f"CLIP-S: CLIPScore of one random {CROP}x{CROP} crop (seed {CLIP_SEED}) against the"
            " prompt; its mean is the paper's Mean-CLIP-S."
        )
    if unresized:
        lines.append(
            f"* Both sides above {CROP}: the paper's code would first shrink the shorter side to"
            f" {CROP} ({2 * CROP}x{2 * CROP} to a single crop); cropped unresized here, so this"
            " Intra-Style-L is not the paper's."
        )
    return "\n".join(lines)


def to_json(panoramas: list[Panorama]) -> dict[str, Any]:
    """The figures for --json."""
    return {
        "images": [
            {
                "file": p.path.name,
                "width": p.width,
                "height": p.height,
                "crops": p.crops,
                "intra_lpips": p.intra_lpips,
                "intra_style_l": p.intra_style_l,
                "style_unresized": p.style_unresized,
                "clip_score": p.clip_score,
                "prompt": p.prompt,
            }
            for p in panoramas
        ],
        "mean": means(panoramas),
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path, help="folder of panoramas (png, jpg, webp)")
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="weights folder whose LPIPS trunk to use (default: weights/); "
        "without it, VGG16 comes from the torch hub cache",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--clip", action="store_true", help=f"also compute Mean-CLIP-S (needs {CLIP_MODEL})"
    )
    parser.add_argument(
        "--clip-model",
        type=Path,
        default=None,
        help=f"local folder holding {CLIP_MODEL} (implies --clip)",
    )
    parser.add_argument(
        "--prompt", default=None, help="prompt for CLIP-S (default: the one saved in each file)"
    )
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if any)")
    args = parser.parse_args(argv)

    try:
        if args.clip_model is not None and not args.clip_model.is_dir():
            raise EvaluationError(
                f"--clip-model must be a folder holding {CLIP_MODEL}; got {args.clip_model}"
            )
        clip = args.clip or args.clip_model is not None
        panoramas = find_panoramas(args.folder, clip, args.prompt)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        weights = args.weights or default_weights_dir()
        evaluate(panoramas, weights, device, clip, args.clip_model)
    except (EvaluationError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    print(report(panoramas, clip))
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(panoramas), indent=2) + "\n")
    return 0
