"""Coherence report: the SyncDiffusion paper's metrics for a folder of panoramas.

    python scripts/evaluate.py DIR [--weights weights] [--json PATH]
                               [--clip [--clip-model DIR] [--prompt TEXT]] [--reference DIR]

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
- FID, KID and Mean-GIQA (with --reference DIR, a folder of single 512x512 pictures of the same
  prompts from the same model): clean-fid's FID and KID between the same random crops and the
  reference pictures, and KNN-GIQA (K=8) of each crop; see `syncdiffusion.evaluation.fidelity`.

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
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import EvaluationError, WeightsError
from ..models.perceptual import load_lpips
from ..models.weights import LEGACY_VGG16_RELPATH, VGG16_RELPATH, default_weights_dir
from ..request.image_file import read_parameters
from .coherence import (
    CLIP_MODEL,
    hub_file,
    intra_lpips,
    intra_style_l,
    load_clip_score,
    load_vgg19_features,
)
from .crops import CROP, clip_box, clip_input, crop_boxes, crops, pixels, rgb8

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
CLIP_SEED = 2023


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
    giqa: float | None = None

    @property
    def crops(self) -> int:
        return len(crop_boxes(self.height, self.width))

    @property
    def style_unresized(self) -> bool:
        """True where the paper's code would have resized before the style crops."""
        return min(self.width, self.height) != CROP


def find_panoramas(folder: Path, clip: bool, prompt: str | None) -> list[Panorama]:
    """The images in `folder`, by name, each decoded once to check it (and its prompt, for
    CLIP); what is not a regular file is skipped, with a notice. EvaluationError has one line
    per bad file."""
    paths = image_files(folder, "panoramas")
    panoramas, problems = [], []
    for path in paths:
        try:
            width, height = check_image(path)
            panorama = Panorama(path, width, height, prompt)
            if clip and prompt is None:
                try:
                    panorama.prompt = str(read_parameters(path)["prompt"])
                except (ValueError, KeyError):
                    raise EvaluationError(
                        f"{shown(path)} carries no saved prompt for the CLIP score; pass "
                        "--prompt TEXT"
                    ) from None
            panoramas.append(panorama)
        except EvaluationError as exc:
            problems.append(str(exc))
    if problems:
        raise EvaluationError("\n".join(problems))
    return panoramas


def shown(path: Path) -> str:
    """A file's name as messages print it: quoted, escapes and all, if it holds control codes."""
    return path.name if path.name.isprintable() else repr(path.name)


def check_image(path: Path) -> tuple[int, int]:
    """The size of the image at `path` after decoding it whole, or EvaluationError (one line,
    naming the file) if it is too small to compare crops of, truncated or of odd pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            too_small = min(width, height) < CROP or max(width, height) < 2 * CROP
            if not too_small:
                image.load()
                rgb8(image)
    except EvaluationError as exc:
        raise EvaluationError(f"{shown(path)}: {exc}") from None
    except Exception as exc:  # Pillow raises many types on a truncated or crafted file
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise EvaluationError(
            f"{shown(path)} is not an image Pillow can read ({message})"
        ) from None
    if too_small:
        raise EvaluationError(
            f"{shown(path)} is {width}x{height}; the metrics compare {CROP}x{CROP} crops, so both "
            f"sides must be at least {CROP} and one at least {2 * CROP}"
        )
    return width, height


def image_files(folder: Path, what: str) -> list[Path]:
    """The image files in `folder`, by name; what is not a regular file is skipped, with a
    notice."""
    if not folder.is_dir():
        raise EvaluationError(f"folder must be a folder of {what}; got {folder}")
    paths = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        if path.is_file():  # never open a FIFO or a device: reading it would wait forever
            paths.append(path)
        else:
            print(f"skipping {shown(path)}: not a regular file", file=sys.stderr)
    if not paths:
        allowed = ", ".join(sorted(IMAGE_SUFFIXES))
        raise EvaluationError(f"folder {folder} holds no images ({allowed})")
    return paths


def evaluate_fidelity(
    panoramas: list[Panorama],
    reference: list[Path],
    device: torch.device,
    feature_model=None,
    num_workers: int = 0,
) -> dict[str, float]:
    """FID, KID and Mean-GIQA of the panoramas against `reference`; each panorama's GIQA is
    filled in. `feature_model` replaces clean-fid's Inception (tests)."""
    from .fidelity import FidelityError, fidelity, load_inception

    try:
        model = feature_model or load_inception(device)
        with tempfile.TemporaryDirectory() as workdir:
            paths = [p.path for p in panoramas]
            figures = fidelity(paths, reference, model, device, Path(workdir), num_workers)
    except FidelityError as exc:
        raise EvaluationError(str(exc)) from None
    for panorama, giqa in zip(panoramas, figures.pop("giqa"), strict=True):
        panorama.giqa = giqa
    return figures


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
        tiles = crops(full.to(device))
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


def to_json(panoramas: list[Panorama], fidelity: dict[str, float] | None = None) -> dict[str, Any]:
    """The figures for --json; FID, KID and Mean-GIQA in "mean" where `fidelity` has them."""
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
                "giqa": p.giqa,
                "prompt": p.prompt,
            }
            for p in panoramas
        ],
        "mean": {
            **means(panoramas),
            "fid": None,
            "kid": None,
            "mean_giqa": None,
            **(fidelity or {}),
        },
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
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of single 512x512 pictures of the same prompts from the same model: also "
        "compute FID, KID and Mean-GIQA (needs clean-fid; its Inception is downloaded once)",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="processes reading images for FID (default: 0)"
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
        fidelity = None
        if args.reference is not None:
            reference = image_files(args.reference, "reference pictures")
            fidelity = evaluate_fidelity(panoramas, reference, device, num_workers=args.workers)
    except (EvaluationError, WeightsError) as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2

    print(report(panoramas, clip))
    if fidelity is not None:
        print(
            f"\nAgainst {len(reference)} reference pictures: FID {fidelity['fid']:.2f}, "
            f"KID {fidelity['kid']:.4f}, Mean-GIQA {fidelity['mean_giqa']:.4g} (KNN-GIQA, K=8, "
            "on clean-fid's Inception features: not the official GIQA code)"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(panoramas, fidelity), indent=2) + "\n")
    return 0
