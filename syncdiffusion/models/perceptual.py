"""LPIPS, the perceptual distance the sync step follows, built on its VGG16 trunk from disk.

The trunk's file (`lpips_trunk`) is read hash-checked; a trunk that is missing or damaged is a
WeightsError that names the command that fixes the folder.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import WeightsError
from .lpips_trunk import (
    LEGACY_VGG16_RELPATH,
    Features,
    read_torchvision_file,
    read_trunk,
)
from .weights import fix_command

if TYPE_CHECKING:
    import lpips

logger = logging.getLogger(__name__)


def load_lpips(vgg16_path: str | os.PathLike[str]) -> lpips.LPIPS:
    """LPIPS v0.1 on VGG16, its trunk read from `vgg16_path` rather than downloaded."""
    import lpips  # seconds to import: only where a model is loaded

    with warnings.catch_warnings():
        # lpips asks torchvision for an untrained VGG16 the pre-0.13 way; the warning is noise.
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    features = load_vgg16_features(vgg16_path)
    # lpips keeps VGG's `features[k]` as `slice{s}.{k}`: map the torchvision names onto it.
    slice_of = {
        int(k): name for name, part in model.net.named_children() for k, _ in part.named_children()
    }
    model.net.load_state_dict(
        {
            f"{slice_of[int(key.split('.')[1])]}.{key.split('.', 1)[1]}": value
            for key, value in features.items()
            if int(key.split(".")[1]) in slice_of
        }
    )
    return model.eval().requires_grad_(False)


def load_vgg16_features(path: str | os.PathLike[str]) -> Features:
    """The trunk's `features.*` tensors, read once and hash-checked; WeightsError if unusable.

    `path` may also be torchvision's whole VGG16 file (`.pth`). Where `path` is absent but
    torchvision's file lies beside it (the old layout), that file is read, with a notice."""
    path = Path(path)
    legacy = path.parent / Path(LEGACY_VGG16_RELPATH).name
    # The fix can name the folder only when the file sits where the download puts it.
    fix = fix_command(path.parent.parent if path.parent.name == "lpips" else None)
    if path.suffix == ".pth":  # torchvision's whole file, as in the torch hub cache
        features, problem = read_torchvision_file(path)
    elif not path.exists() and legacy.is_file():
        logger.warning("%s is the old layout; `%s` makes %s of it.", legacy, fix[5:], path.name)
        features, problem = read_torchvision_file(legacy)
    else:
        features, problem = read_trunk(path, verify=True)
    if features is None:
        raise WeightsError(f"{problem}. {fix}")
    return features
