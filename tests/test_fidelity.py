"""FID, KID and Mean-GIQA against a reference set, as clean-fid computes them.

clean-fid downloads its Inception at first use, which tests cannot: both sides get the same
small feature extractor made here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from syncdiffusion.evaluation import fidelity
from syncdiffusion.evaluation.crops import CROP, clip_box
from syncdiffusion.evaluation.report import Panorama, evaluate_fidelity, to_json

cleanfid = pytest.importorskip("cleanfid.fid")
CPU = torch.device("cpu")


def local_features(batch: torch.Tensor) -> torch.Tensor:
    """(N, 3, 299, 299) in [0, 255] -> (N, 27): mean colours of a 3x3 grid."""
    return F.adaptive_avg_pool2d(batch / 255, 3).flatten(1)


def noise_images(folder: Path, count: int, size: tuple[int, int], seed: int) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, (4, 4 * size[0] // size[1], 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
        paths.append(folder / f"{i:03d}.png")
        image.save(paths[-1])
    return paths


def test_fid_and_kid_agree_with_clean_fid_called_directly(tmp_path, monkeypatch):
    generated = noise_images(tmp_path / "generated", 5, (CROP, CROP), seed=1)
    reference = noise_images(tmp_path / "reference", 9, (CROP, CROP), seed=2)
    panoramas = [Panorama(path, CROP, CROP) for path in generated]
    figures = evaluate_fidelity(panoramas, reference, CPU, feature_model=local_features)

    options = {"mode": "clean", "num_workers": 0, "device": CPU, "verbose": False}
    folders = (str(tmp_path / "generated"), str(tmp_path / "reference"))
    expected_fid = cleanfid.compute_fid(*folders, custom_feat_extractor=local_features, **options)
    # compute_kid takes no feature extractor: give it the same one in place of Inception.
    monkeypatch.setattr(cleanfid, "build_feature_extractor", lambda *a, **k: local_features)
    np.random.seed(fidelity.KID_SEED)
    expected_kid = cleanfid.compute_kid(*folders, **options)

    assert figures["fid"] == pytest.approx(expected_fid, rel=1e-6)
    assert figures["kid"] == pytest.approx(expected_kid, rel=1e-6)
    # KNN-GIQA, K=8: the sum of 1 / L1 distance to the 8 nearest reference features.
    gen = np.stack([local_features(_pixels(p)).numpy()[0] for p in generated])
    ref = np.stack([local_features(_pixels(p)).numpy()[0] for p in reference])
    nearest = np.sort(np.abs(gen[:, None] - ref[None]).sum(-1), axis=1)[:, :8]
    assert [p.giqa for p in panoramas] == pytest.approx((1 / nearest).sum(1), rel=1e-3)
    assert figures["mean_giqa"] == pytest.approx((1 / nearest).sum(1).mean(), rel=1e-3)
    mean = to_json(panoramas, figures)["mean"]
    assert {"fid", "kid", "mean_giqa"} <= mean.keys() and mean["fid"] == figures["fid"]


def _pixels(path: Path) -> torch.Tensor:
    """What clean-fid's "clean" mode feeds its model: 299x299, PIL bicubic per channel."""
    from cleanfid.resize import make_resizer

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    resized = make_resizer("PIL", False, "bicubic", (299, 299))(array)
    return torch.from_numpy(resized.transpose(2, 0, 1).copy())[None].float()


def test_each_panorama_gives_the_crop_clip_s_takes(tmp_path):
    """One random 512x512 crop per panorama, numpy seed 2023, in name order: the authors'
    crop_panorama.py, and the crop CLIP-S scores."""
    panoramas = noise_images(tmp_path / "panoramas", 3, (1536, CROP), seed=3)
    crops = fidelity.crop_panoramas(panoramas, tmp_path)
    rng = np.random.RandomState(2023)
    for panorama, crop in zip(panoramas, crops, strict=True):
        with Image.open(panorama) as image, Image.open(crop) as cropped:
            top, left = clip_box(image.height, image.width, rng)
            assert top == 0 and cropped.size == (CROP, CROP)
            expected = image.convert("RGB").crop((left, top, left + CROP, top + CROP))
            assert np.array_equal(np.asarray(cropped), np.asarray(expected))


def test_too_few_images_are_refused(tmp_path):
    generated = noise_images(tmp_path / "generated", 2, (CROP, CROP), seed=1)
    with pytest.raises(fidelity.FidelityError, match="K=8 needs at least 8 reference"):
        fidelity.fidelity(generated, generated, local_features, CPU, tmp_path)
    with pytest.raises(fidelity.FidelityError, match="at least 2 images each"):
        fidelity.fidelity(generated[:1], generated, local_features, CPU, tmp_path)
