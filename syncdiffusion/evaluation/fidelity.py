"""The paper's fidelity figures: FID, KID and Mean-GIQA of panoramas against a reference set.

As the authors' `eval_code/` does it: each panorama gives one random 512x512 crop (numpy seed
2023, `randint(0, W - 512)` along the long side: the crop `crops.clip_box` takes for
CLIP-S, files in name order), saved losslessly; FID and KID compare these crops with the
reference images (single 512x512 pictures of the same prompts from the same model) through
clean-fid in its "clean" mode, on the Inception features it downloads at first use
(`inception-2015-12-05.pt`, NVIDIA's TorchScript port of TensorFlow's FID Inception, from
nvlabs-fi-cdn.nvidia.com, cached in the system's temporary folder).

Mean-GIQA is KNN-GIQA with K=8 (Gu et al. 2020): a crop's score is the sum over its K nearest
reference images of 1 / (L1 distance between their Inception pool features), averaged over
crops. The official GIQA code (github.com/cientgu/GIQA) cannot be used here: the repository
carries no licence, its scripts parse arguments and move tensors to CUDA on import, and the
feature-writing script its README names is not in it. This is the definition re-stated, on
clean-fid's Inception features (the official code uses pytorch-fid's port of the same network,
which resizes inside): compare Mean-GIQA figures made by this code with each other, not with
the paper's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .crops import CROP, clip_box, rgb8

CROP_SEED = 2023  # the authors' crop_panorama.py seeds numpy with it
GIQA_K = 8
KID_SEED = 0  # clean-fid's KID draws its subsets from numpy's global generator

FeatureModel = Callable[[torch.Tensor], torch.Tensor]
"""(N, 3, 299, 299) pixels in [0, 255] -> (N, D) features, as clean-fid calls its models."""


class FidelityError(Exception):
    """What stops the fidelity figures, in one message."""


def crop_panoramas(paths: Sequence[Path], folder: Path) -> list[Path]:
    """Each panorama's random 512x512 crop, in `paths` order, saved as PNG in `folder`."""
    rng = np.random.RandomState(CROP_SEED)
    crops = []
    for number, path in enumerate(paths):
        with Image.open(path) as image:
            top, left = clip_box(image.height, image.width, rng)
            crop = rgb8(image).crop((left, top, left + CROP, top + CROP))
        crops.append(folder / f"{number:06d}.png")
        crop.save(crops[-1])
    return crops


def load_inception(device: torch.device) -> FeatureModel:
    """clean-fid's Inception in its "clean" mode, downloaded at first use."""
    try:
        from cleanfid.features import build_feature_extractor
    except ImportError as error:
        raise FidelityError(
            f"FID, KID and GIQA need clean-fid ({error}): pip install -r requirements-eval.txt"
        ) from None
    try:
        return build_feature_extractor("clean", device, use_dataparallel=False)
    except OSError as error:  # urllib's errors included
        raise FidelityError(
            "clean-fid could not download its Inception weights (inception-2015-12-05.pt from "
            f"nvlabs-fi-cdn.nvidia.com) ({error}); run once where there is network, or copy "
            "the file into this machine's temporary folder"
        ) from None


def features(
    files: Sequence[Path],
    model: FeatureModel,
    device: torch.device,
    batch_size: int = 32,
    num_workers: int = 0,
) -> np.ndarray:
    """(len(files), D) features of image files, read and resized as clean-fid does."""
    from cleanfid.fid import get_files_features

    return get_files_features(
        [str(f) for f in files],
        model,
        num_workers=num_workers,
        batch_size=batch_size,
        device=device,
        mode="clean",
        verbose=False,
    )


def fid(generated: np.ndarray, reference: np.ndarray) -> float:
    """clean-fid's FID between two sets of features."""
    from cleanfid.fid import fid_from_feats

    return float(fid_from_feats(generated, reference))


def kid(generated: np.ndarray, reference: np.ndarray) -> float:
    """clean-fid's KID between two sets of features, its random subsets drawn from seed
    KID_SEED (numpy's global state is restored after)."""
    from cleanfid.fid import kernel_distance

    saved = np.random.get_state()
    np.random.seed(KID_SEED)
    try:
        return kernel_distance(generated, reference)
    finally:
        np.random.set_state(saved)


def knn_giqa(generated: np.ndarray, reference: np.ndarray, k: int = GIQA_K) -> np.ndarray:
    """Each generated image's KNN-GIQA: the sum of 1 / L1 distance to its k nearest references."""
    if len(reference) < k:
        raise FidelityError(f"KNN-GIQA with K={k} needs at least {k} reference images")
    from scipy.spatial.distance import cdist

    distances = np.sort(cdist(generated, reference, "cityblock"), axis=1)[:, :k]
    return (1 / distances).sum(axis=1)


def fidelity(
    panoramas: Sequence[Path],
    reference: Sequence[Path],
    model: FeatureModel,
    device: torch.device,
    workdir: Path,
    num_workers: int = 0,
) -> dict[str, float | list[float]]:
    """FID, KID and Mean-GIQA of `panoramas`' crops (written in `workdir`) against `reference`,
    and each panorama's GIQA."""
    if len(panoramas) < 2 or len(reference) < 2:
        raise FidelityError(
            f"FID and KID need at least 2 images each; got {len(panoramas)} panoramas and "
            f"{len(reference)} reference images"
        )
    crops = crop_panoramas(panoramas, workdir)
    generated = features(crops, model, device, num_workers=num_workers)
    references = features(reference, model, device, num_workers=num_workers)
    giqa = knn_giqa(generated, references)
    return {
        "fid": fid(generated, references),
        "kid": kid(generated, references),
        "mean_giqa": float(giqa.mean()),
        "giqa": giqa.tolist(),
    }
