"""The coherence report (syncdiffusion.evaluation.report, scripts/evaluate.py) against the paper's
evaluation code (tests/paper_metrics.py).

Both run on the same random VGG16/VGG19 in a temporary torch hub cache and the same tiny
random CLIP. The crop side is 512 in both; these tests shrink it to 64 in both, which changes
no step of either and makes each network call 64 times cheaper.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import paper_metrics
import pytest
import torch
from eval_models import VGG_FILES, write_hub_vgg, write_tiny_clip
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from syncdiffusion.evaluation import coherence, crops, fidelity, report
from syncdiffusion.request.image_file import save_image

WINDOW = 64
# file: (width, height) in windows, and its saved prompt. Names fix the order, as in the report.
PANORAMAS = {
    "a_wide.png": ((3, 1), "a photo of a city skyline at night"),
    "b_tall.png": ((1, 2), "a waterfall"),
    "c_2d.png": ((3, 2), "the sea"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A torch hub cache with random VGG16 and VGG19, a weights folder, a tiny CLIP folder."""
    root = tmp_path_factory.mktemp("eval-models")
    checkpoints = write_hub_vgg(root / "torch")
    (root / "weights" / "lpips").mkdir(parents=True)
    shutil.copy(checkpoints / VGG_FILES["D"], root / "weights" / "lpips")
    return {
        "torch": root / "torch",
        "weights": root / "weights",
        "clip": write_tiny_clip(root / "clip"),
    }


@pytest.fixture
def small_window(monkeypatch):
    for module in (crops, coherence, fidelity, report):  # each binds the crop side it uses
        monkeypatch.setattr(module, "CROP", WINDOW, raising=False)
    monkeypatch.setattr(paper_metrics, "WINDOW", WINDOW)


def write_panoramas(folder: Path) -> Path:
    """The three panoramas of PANORAMAS, random pixels, each with its prompt saved inside."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, ((columns, rows), prompt) in PANORAMAS.items():
        # Coarse random blocks, so crops differ in content and style as a scene's parts do.
        blocks = rng.integers(0, 256, (rows * 8, columns * 8, 3), dtype=np.uint8)
        pixels = blocks.repeat(WINDOW // 8, axis=0).repeat(WINDOW // 8, axis=1)
        pixels = np.clip(pixels + rng.integers(0, 32, pixels.shape), 0, 255).astype(np.uint8)
        save_image(Image.fromarray(pixels), folder / name, {"prompt": prompt, "seed": 2})
    return folder


def test_the_crop_is_the_papers():
    assert crops.CROP == paper_metrics.WINDOW == 512


def test_figures_are_the_papers(models, small_window, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_HOME", str(models["torch"]))
    folder = write_panoramas(tmp_path / "panoramas")
    out = tmp_path / "figures.json"
    argv = [str(folder), "--weights", str(models["weights"]), "--json", str(out), "--clip"]
    assert report.main([*argv, "--clip-model", str(models["clip"]), "--device", "cpu"]) == 0
    figures = json.loads(out.read_text())
    ours = {image["file"]: image for image in figures["images"]}
    assert list(ours) == list(PANORAMAS)

    lpips_ref = paper_metrics.intra_lpips(folder)
    style_ref = paper_metrics.intra_style_loss(folder)
    for name in PANORAMAS:
        assert ours[name]["intra_lpips"] == pytest.approx(lpips_ref[name], rel=1e-5)
    # A side of 512 (WINDOW here): the paper's resize changes nothing, its figures are ours.
    for name in ("a_wide.png", "b_tall.png"):
        assert not ours[name]["style_unresized"]
        assert ours[name]["intra_style_l"] == pytest.approx(style_ref[name], rel=1e-5)
    # Taller both ways: the paper's code shrinks it to one crop and finds nothing to compare;
    # the report compares its crops unresized, with the paper's style loss, and says so.
    assert style_ref["c_2d.png"] == 0.0 and ours["c_2d.png"]["style_unresized"]
    alone = tmp_path / "2d"
    alone.mkdir()
    shutil.copy(folder / "c_2d.png", alone)
    unresized_ref = paper_metrics.intra_style_loss(alone, resize=False)["c_2d.png"]
    assert ours["c_2d.png"]["intra_style_l"] == pytest.approx(unresized_ref, rel=1e-5)
    assert [ours[name]["crops"] for name in PANORAMAS] == [3, 2, 6]

    # CLIP: the paper's crop_panorama (512-high panoramas only) and eval_clip_score, on the wide
    # panorama, the first in name order; the others continue the same seeded numpy stream.
    def clip_model():
        folder = models["clip"]
        model = coherence.ProjectedCLIP.from_pretrained(folder)
        return model, CLIPProcessor.from_pretrained(folder)

    wide_only = tmp_path / "wide"
    wide_only.mkdir()
    shutil.copy(folder / "a_wide.png", wide_only)
    paper_metrics.crop_panorama(wide_only, tmp_path / "crops")
    wide_ref = paper_metrics.clip_scores(tmp_path / "crops", PANORAMAS["a_wide.png"][1], clip_model)
    assert ours["a_wide.png"]["clip_score"] == pytest.approx(wide_ref["a_wide.png"], rel=1e-5)
    rng = np.random.RandomState(2023)
    rng.randint(0, 3 * WINDOW - WINDOW)  # the wide panorama's crop
    boxes = {"b_tall.png": (rng.randint(0, WINDOW), 0)}
    left = rng.randint(0, 2 * WINDOW)
    boxes["c_2d.png"] = (rng.randint(0, WINDOW), left)
    for name, (top, left) in boxes.items():
        crop_dir = tmp_path / f"crop-{name}"
        crop_dir.mkdir()
        with Image.open(folder / name) as image:
            image.crop((left, top, left + WINDOW, top + WINDOW)).save(crop_dir / name)
        ref = paper_metrics.clip_scores(crop_dir, PANORAMAS[name][1], clip_model)[name]
        assert ours[name]["clip_score"] == pytest.approx(ref, rel=1e-5)

    for key in ("intra_lpips", "intra_style_l", "clip_score"):
        mean = np.mean([ours[name][key] for name in PANORAMAS])
        assert figures["mean"][key] == pytest.approx(mean)

    printed = capsys.readouterr().out
    assert "Intra-LPIPS" in printed and "Intra-Style-L" in printed and "CLIP-S" in printed
    assert "mean of 3 images" in printed
    rows = {line.split()[0]: line for line in printed.splitlines() if line.strip()}
    assert "*" in rows["c_2d.png"] and "*" not in rows["a_wide.png"]
    assert "not the paper's" in printed


def test_projected_clip_gives_the_projected_embeddings(models):
    """torchmetrics needs the embeddings as tensors; transformers 5 returns output objects."""
    plain = CLIPModel.from_pretrained(models["clip"])
    projected = coherence.ProjectedCLIP.from_pretrained(models["clip"])
    pixels = torch.rand(1, 3, 224, 224)
    tokens = torch.tensor([[0, 5, 2]])
    with torch.no_grad():
        image = plain.visual_projection(plain.vision_model(pixel_values=pixels).pooler_output)
        text = plain.text_projection(plain.text_model(input_ids=tokens).pooler_output)
        assert torch.equal(projected.get_image_features(pixels), image)
        assert torch.equal(projected.get_text_features(tokens), text)


def test_without_clip_the_score_is_null(models, small_window, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(models["torch"]))
    folder = tmp_path / "panoramas"
    folder.mkdir()
    Image.new("RGB", (2 * WINDOW, WINDOW), (10, 200, 30)).save(folder / "flat.png")
    out = tmp_path / "figures.json"
    assert report.main([str(folder), "--weights", str(tmp_path), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["images"][0]["clip_score"] is None and figures["mean"]["clip_score"] is None
    # Two identical crops: perfectly coherent.
    assert figures["images"][0]["intra_lpips"] < 1e-6
    assert figures["images"][0]["intra_style_l"] == 0.0


def test_offline_without_vgg19_says_which_file_and_where(monkeypatch, tmp_path, capsys):
    write_hub_vgg(tmp_path / "torch", configs="D")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    folder = tmp_path / "panoramas"
    folder.mkdir()
    Image.new("RGB", (1024, 512)).save(folder / "p.png")
    assert report.main([str(folder), "--weights", str(tmp_path / "none")]) == 2
    error = capsys.readouterr().err
    expected = tmp_path / "torch" / "hub" / "checkpoints" / VGG_FILES["E"]
    assert error.count("\n") == 1 and "no network" in error
    assert str(expected) in error and "https://download.pytorch.org/models/vgg19" in error


@pytest.mark.parametrize(
    ("size", "extra", "message"),
    [
        ((512, 512), [], "p.png is 512x512; the metrics compare 512x512 crops"),
        ((1024, 500), [], "p.png is 1024x500"),
        ((1024, 512), ["--clip"], "p.png carries no saved prompt for the CLIP score"),
    ],
)
def test_refusals_name_the_file(size, extra, message, tmp_path, capsys):
    Image.new("RGB", size).save(tmp_path / "p.png")
    assert report.main([str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_refuses_an_unreadable_image(tmp_path, capsys):
    (tmp_path / "p.png").write_text("not a picture")
    assert report.main([str(tmp_path)]) == 2
    assert "p.png is not an image Pillow can read" in capsys.readouterr().err


def test_refuses_an_empty_folder_and_a_missing_clip_model(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert f"folder {tmp_path} holds no images" in capsys.readouterr().err
    Image.new("RGB", (1024, 512)).save(tmp_path / "p.png")
    assert report.main([str(tmp_path), "--clip-model", str(tmp_path / "clip")]) == 2
    assert "--clip-model must be a folder" in capsys.readouterr().err


def _figures(folder: Path, models: dict[str, Path], out: Path) -> dict[str, dict]:
    argv = [str(folder), "--weights", str(models["weights"]), "--json", str(out)]
    assert report.main([*argv, "--device", "cpu"]) == 0
    return {image["file"]: image for image in json.loads(out.read_text())["images"]}


def test_sixteen_bit_and_palette_images_are_read_as_their_8_bit_rgb(
    models, small_window, monkeypatch, tmp_path
):
    monkeypatch.setenv("TORCH_HOME", str(models["torch"]))
    odd, rgb = tmp_path / "odd", tmp_path / "rgb"
    odd.mkdir(), rgb.mkdir()
    rng = np.random.default_rng(1)
    grey16 = rng.integers(0, 65536, (WINDOW, 2 * WINDOW), dtype=np.uint16)
    Image.fromarray(grey16).save(odd / "grey16.png")
    with Image.open(odd / "grey16.png") as image:
        assert image.mode == "I;16"
    grey8 = np.round(grey16 / 257).astype(np.uint8)
    Image.fromarray(grey8).convert("RGB").save(rgb / "grey16.png")
    colours = Image.fromarray(rng.integers(0, 256, (WINDOW, 2 * WINDOW, 3), dtype=np.uint8))
    palette = colours.quantize(16)
    palette.save(odd / "palette.png")
    palette.convert("RGB").save(rgb / "palette.png")
    ours = _figures(odd, models, tmp_path / "odd.json")
    expected = _figures(rgb, models, tmp_path / "rgb.json")
    assert ours == expected
    assert ours["grey16.png"]["intra_lpips"] > 0.01  # not the flat white of a clipped image


def test_bad_files_get_one_line_each_and_a_fifo_is_skipped(tmp_path, capsys):
    Image.new("RGB", (1024, 512)).save(tmp_path / "good.png")
    whole = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    Image.new("RGB", (512, 512)).save(tmp_path / "small.png")
    Image.new("F", (1024, 512)).save(tmp_path / "float.tiff", format="TIFF")
    (tmp_path / "float.tiff").rename(tmp_path / "float.png")  # Pillow reads it by content
    os.mkfifo(tmp_path / "fifo.png")  # opening it would wait for a writer forever
    assert report.main([str(tmp_path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "skipping fifo.png: not a regular file"
    assert lines[1].startswith("error: cut.png is not an image Pillow can read (OSError: ")
    assert lines[2].startswith("error: float.png: its pixels (mode F) do not convert to RGB")
    assert lines[3].startswith("error: small.png is 512x512")
    assert len(lines) == 4


def _live_tensor_bytes() -> int:
    """The bytes of every tensor storage alive now."""
    storages = {}
    with warnings.catch_warnings():  # some of gc's objects warn when asked their class
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_memory_does_not_grow_with_the_number_of_crops(models, small_window, monkeypatch, tmp_path):
    """The peak of live tensor bytes, sampled as each crop's features are computed, is the same
    for 8 crops as for 2, give or take the larger image: not one more crop's features."""
    monkeypatch.setenv("TORCH_HOME", str(models["torch"]))
    peak = [0]

    def sample(*_):
        peak[0] = max(peak[0], _live_tensor_bytes())

    load_lpips, load_vgg19 = report.load_lpips, report.load_vgg19_features

    def lpips_sampled(path):
        model = load_lpips(path)
        model.net.register_forward_hook(sample)
        return model

    def vgg19_sampled(path):
        features = load_vgg19(path)
        convs = [layer for layer in features if isinstance(layer, torch.nn.Conv2d)]
        convs[coherence.STYLE_CONVS - 1].register_forward_hook(sample)
        return features

    monkeypatch.setattr(report, "load_lpips", lpips_sampled)
    monkeypatch.setattr(report, "load_vgg19_features", vgg19_sampled)
    peaks = {}
    for n_crops in (2, 8):
        folder = tmp_path / f"{n_crops}-crops"
        folder.mkdir()
        pixels = np.random.default_rng(n_crops).integers(0, 256, (WINDOW, n_crops * WINDOW, 3))
        Image.fromarray(pixels.astype(np.uint8)).save(folder / "p.png")
        gc.collect()
        peak[0] = 0
        argv = [str(folder), "--weights", str(models["weights"]), "--device", "cpu"]
        assert report.main(argv) == 0
        peaks[n_crops] = peak[0]
    lpips_model = load_lpips(models["weights"] / "lpips" / VGG_FILES["D"])
    with torch.no_grad():
        one_crop = sum(out.nbytes for out in lpips_model.net(torch.zeros(1, 3, WINDOW, WINDOW)))
    image_growth = 6 * 3 * WINDOW * WINDOW * (4 + 1)  # float32 pixels and the 8-bit array
    assert peaks[8] - peaks[2] < image_growth + one_crop / 4
