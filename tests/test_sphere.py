"""The whole sphere's geometry: an equirectangular picture, its cube map and back; the
command line's cube faces."""

from __future__ import annotations

import math
import re
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from syncdiffusion import InputError, SyncDiffusionPipeline
from syncdiffusion.cli.generate import main
from syncdiffusion.core.decoding import decode
from syncdiffusion.core.precision import LossScale
from syncdiffusion.core.sampling import AnchorImages, denoise_views, guided_eps
from syncdiffusion.core.schedulers import clean_latent
from syncdiffusion.core.sphere import (
    CUBE_LAYOUTS,
    FACES,
    band_height,
    cube_coordinates,
    cube_map,
    cube_picture,
    cube_to_equirect,
    equirect_coordinates,
    equirect_directions,
    equirect_to_cube,
    face_directions,
)
from syncdiffusion.core.sync import lpips_features, sync_loss
from syncdiffusion.replicate import predictors
from syncdiffusion.request.image_file import read_parameters


def colour(d: torch.Tensor) -> torch.Tensor:
    """A smooth colour (3, ...) of unit directions `d` (..., 3)."""
    return torch.stack([d[..., 0] + 0.5 * d[..., 1], d[..., 1] * d[..., 2], (2 * d[..., 2]).sin()])


def smooth_sphere(width: int) -> torch.Tensor:
    """A picture of the sphere (1, 3, W/2, W) that is a smooth function of the direction, so
    that it is one colour at each pole and continuous across the seam."""
    return colour(equirect_directions(width, width // 2)).unsqueeze(0).float()


def test_the_faces_look_along_their_axes_with_y_up():
    size = 8
    for face, axis in zip(FACES, torch.eye(3).repeat_interleave(2, 0), strict=True):
        d = face_directions(face, size)
        sign = -1 if face.startswith("n") else 1
        centre = d[size // 2 - 1 : size // 2 + 1, size // 2 - 1 : size // 2 + 1].mean((0, 1))
        assert torch.allclose(centre.float(), sign * axis, atol=1e-6)
    # On the side faces the top row looks up; on the up face the top row looks towards -z.
    for face in ("px", "nx", "pz", "nz"):
        d = face_directions(face, size)
        assert (d[0, :, 1] > 0).all() and (d[-1, :, 1] < 0).all()
    assert (face_directions("py", size)[0, :, 2] < 0).all()


def test_the_middle_column_looks_along_x_and_the_columns_turn_towards_minus_z():
    d = equirect_directions(8, 4)
    u, v = equirect_coordinates(torch.tensor([[1.0, 0, 0], [0, 0, -1], [0, 1, 0], [0, -1, 0]]))
    assert u[:2].tolist() == [0.5, 0.75] and v.tolist() == [0.5, 0.5, 0.0, 1.0]
    assert torch.allclose(d.norm(dim=-1), torch.ones(4, 8, dtype=d.dtype))
    # Rows and columns at +-22.5 degrees of the horizon and the middle: towards +x; right of
    # the middle, towards -z (Unity's panoramic skybox: u = 0.5 - atan2(z, x) / 2pi).
    assert (d[1:3, 3:5, 0] > 0.85).all() and (d[1:3, 5:7, 2] < 0).all()
    unity_u = 0.5 - torch.atan2(d[..., 2], d[..., 0]) / (2 * math.pi)
    assert torch.allclose(unity_u, (torch.arange(8, dtype=d.dtype) + 0.5) / 8)


def dot_picture(width: int, u: float, latitude: float = 0.0) -> torch.Tensor:
    """A black 2:1 picture `width` wide with one white dot at column `u` (0 to 1 from the
    left) and `latitude` degrees."""
    picture = torch.zeros(1, 3, width // 2, width)
    row = round((0.5 - latitude / 180) * (width // 2 - 1))
    picture[..., row - 1 : row + 2, round(u * width) % width] = 255.0
    return picture


def dot_on(face: torch.Tensor) -> tuple[float, float]:
    """Where a face's dot is: its (row, column) in [0, 1] from the face's top left."""
    rows, cols = torch.nonzero(face[0, 0] > 10, as_tuple=True)
    size = face.shape[-1]
    return ((rows.float().mean() + 0.5) / size).item(), ((cols.float().mean() + 0.5) / size).item()


@pytest.mark.parametrize(("face", "middle"), [("px", 0.5), ("nz", 0.75), ("nx", 0.0), ("pz", 0.25)])
def test_each_side_face_is_the_view_along_its_axis_not_its_mirror_image(face, middle):
    # A dot a little right of the face's middle column in the picture (the viewer turned a
    # little to the right) is right of the face's middle too; up in the picture is up.
    for turn, up in ((0.02, 0.0), (-0.02, 0.0), (0.0, 20.0)):
        row, column = dot_on(equirect_to_cube(dot_picture(512, middle + turn, up))[face])
        if turn:
            assert np.sign(column - 0.5) == np.sign(turn) and abs(column - 0.5) > 0.03
        assert (row < 0.45) == (up > 0)


def test_the_up_face_adjoins_pz_and_the_down_face_too():
    # A dot above pz's middle, near the up face's edge, lies on the up face's bottom middle;
    # one below it, on the down face's top middle (the cross: py above pz, ny below).
    row, column = dot_on(equirect_to_cube(dot_picture(512, 0.25, 50.0))["py"])
    assert row > 0.8 and abs(column - 0.5) < 0.05
    row, column = dot_on(equirect_to_cube(dot_picture(512, 0.25, -50.0))["ny"])
    assert row < 0.2 and abs(column - 0.5) < 0.05


def test_every_direction_meets_the_face_that_looks_at_it():
    size = 6
    for k, face in enumerate(FACES):
        found, s, t = cube_coordinates(face_directions(face, size))
        assert (found == k).all()
        expected = (torch.arange(size, dtype=s.dtype) + 0.5) / size
        assert torch.allclose(s, expected.expand(size, size), atol=1e-9)
        assert torch.allclose(t, expected.unsqueeze(1).expand(size, size), atol=1e-9)


def test_the_faces_agree_with_the_picture_and_the_poles_are_points():
    picture = smooth_sphere(256)
    faces = equirect_to_cube(picture)
    assert set(faces) == set(FACES) and all(f.shape == (1, 3, 64, 64) for f in faces.values())
    # Each face is the smooth function at its own directions, within bilinear error.
    for face, pixels in faces.items():
        d = face_directions(face, 64)
        d = d / d.norm(dim=-1, keepdim=True)
        expected = torch.stack(
            [d[..., 0] + 0.5 * d[..., 1], d[..., 1] * d[..., 2], (2 * d[..., 2]).sin()]
        )
        assert (pixels[0] - expected.float()).abs().max() < 0.03, face
    # The up face's centre is the zenith, the top row's colour; the down face's the nadir.
    up, down = faces["py"][0, :, 31:33, 31:33].mean((1, 2)), faces["ny"][0, :, 31:33, 31:33]
    assert torch.allclose(up, picture[0, :, 0].mean(-1), atol=0.02)
    assert torch.allclose(down.mean((1, 2)), picture[0, :, -1].mean(-1), atol=0.02)


@pytest.mark.parametrize("width", [256, 512])
def test_picture_to_cube_and_back_is_the_picture_within_interpolation(width):
    picture = smooth_sphere(width)
    back = cube_to_equirect(equirect_to_cube(picture), width)
    assert back.shape == picture.shape
    error = (back - picture).abs()
    # Bilinear twice on a function whose slope is at most about 2 per radian: a pixel is
    # 2 pi / width radians.
    assert error.max() < 4 * 2 * math.pi / width
    assert error.mean() < 0.5 * 2 * math.pi / width


def test_cube_map_of_a_picture_is_six_quarter_width_faces():
    picture = smooth_sphere(256)
    rgb = Image.fromarray(((picture[0].permute(1, 2, 0) + 2) * 50).round().byte().numpy())
    faces = cube_map(rgb)
    assert list(faces) == list(FACES)
    assert all(face.size == (64, 64) and face.mode == "RGB" for face in faces.values())
    # The up face's centre is the zenith: the top row's colour.
    top = np.asarray(rgb, dtype=float)[0].mean(0)
    assert np.abs(np.asarray(faces["py"], dtype=float)[31:33, 31:33].mean((0, 1)) - top).max() < 3


@pytest.mark.parametrize(("layout", "size"), [("strip", (384, 64)), ("cross", (256, 192))])
def test_a_cube_picture_holds_the_faces_where_its_layout_says(layout, size):
    picture = smooth_sphere(256)
    rgb = Image.fromarray(((picture[0].permute(1, 2, 0) + 2) * 50).round().byte().numpy())
    faces = cube_map(rgb)
    laid_out = cube_picture(faces, layout)
    assert laid_out.size == size and laid_out.mode == "RGB"
    pixels = np.asarray(laid_out, dtype=int)
    for face, (column, row) in CUBE_LAYOUTS[layout].items():
        tile = pixels[row * 64 : (row + 1) * 64, column * 64 : (column + 1) * 64]
        assert np.array_equal(tile, np.asarray(faces[face], dtype=int)), face


def test_in_the_cross_neighbouring_faces_meet_as_neighbouring_pixels_do():
    picture = smooth_sphere(512)
    rgb = Image.fromarray(((picture[0].permute(1, 2, 0) + 2) * 50).round().byte().numpy())
    cross = np.asarray(cube_picture(cube_map(rgb), "cross"), dtype=int)  # 128-px faces
    steps = np.abs(np.diff(cross[128:256], axis=1))  # along the row of side faces
    within = np.delete(steps, [127, 255, 383], axis=1).mean()
    for edge in (127, 255, 383):  # nx|pz, pz|px, px|nz
        assert steps[:, edge].mean() < 2.5 * within, edge
    # The up face's bottom edge meets pz's top, the down face's top meets pz's bottom.
    column = cross[:, 128:256]
    within = np.abs(np.diff(column[128:256], axis=0)).mean()
    assert np.abs(column[128] - column[127]).mean() < 2.5 * within
    assert np.abs(column[256] - column[255]).mean() < 2.5 * within
    # The row of side faces wraps round: nz's right edge meets nx's left.
    assert np.abs(cross[128:256, 511] - cross[128:256, 0]).mean() < 2.5 * within


def test_the_cli_writes_the_cube_faces_beside_a_whole_sphere(family_weights, tmp_path, capsys):
    out = tmp_path / "sky.png"
    argv = ["--prompt", "a sky", "--weights", str(family_weights), "--model", "tiny-sd1"]
    argv += ["--width", "1024", "--sphere", "--stride", "16", "--num-inference-steps", "1"]
    assert main([*argv, "--cubemap", "--output", str(out)]) == 0
    faces = {name: tmp_path / f"sky-{name}.png" for name in FACES}
    assert "wrote 6 cube faces (256x256)" in capsys.readouterr().out
    with Image.open(out) as sphere:
        assert sphere.size == (1024, 512)
        expected = cube_map(sphere)
    for name, path in faces.items():
        with Image.open(path) as face:
            assert face.size == (256, 256)
            assert np.array_equal(np.asarray(face), np.asarray(expected[name]))


@pytest.mark.parametrize(
    ("options", "got"),
    [(["--loop-closure", "--height", "512"], "got 512x512"), ([], "got 512x256 without")],
)
def test_cubemap_without_a_whole_sphere_is_refused_before_any_work(
    family_weights, tmp_path, capsys, options, got
):
    argv = ["--prompt", "a sky", "--weights", str(family_weights), "--model", "tiny-sd1"]
    argv += ["--width", "512", "--height", "256", *options, "--cubemap"]
    assert main([*argv, "--output", str(tmp_path / "sky.png")]) == 2
    error = capsys.readouterr().err
    assert "--cubemap writes the six faces of a whole sphere" in error and got in error
    assert "a height of half the width (512x256 for --width 512)" in error
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def sd1(family_weights) -> SyncDiffusionPipeline:
    return SyncDiffusionPipeline.from_pretrained(family_weights, device="cpu", model="tiny-sd1")


def test_an_anchor_from_another_panorama_pulls_every_window_towards_it(sd1):
    """A cap's windows are synced to the band's anchor image: none of its own is held, each
    moves, and each is nearer the image under LPIPS after the step (the published weight)."""
    eps = partial(guided_eps, sd1.unet, text_embeddings=sd1.encode_prompt("a sky"))
    scheduler = sd1.new_scheduler()
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[0]

    def output(x, _ids):
        return eps(scheduler.scale_model_input(x, t), t, None, guidance_scale=7.5)

    x0, to_image = clean_latent(scheduler, 0), partial(decode, sd1.vae)
    generator = torch.Generator().manual_seed(0)
    views, band_view = torch.randn(3, 4, 32, 32, generator=generator).split([2, 1])
    kept = AnchorImages()
    common = dict(
        model_output=output, x0=x0, decode=to_image, perceptual=sd1.perceptual, weight=20.0,
        loss_scale=LossScale(3, 1.0), view_batch_size=2,
    )  # fmt: skip
    # The band's own sync step keeps its anchor's predicted clean image, the anchor held.
    moved, _, _, _ = denoise_views(
        torch.cat([views[:1], band_view]), anchor=1, keep_anchor=partial(kept.keep, 0), **common
    )
    assert torch.equal(moved[1], band_view[0])
    with torch.no_grad():
        assert torch.equal(kept.at(0), to_image(x0(band_view, output(band_view, [0]))))
    # A cap's: every window moves towards the kept image, anchor=0 notwithstanding.
    moved, _, _, _ = denoise_views(views, anchor=0, anchor_image=kept.at(0), **common)
    features = lpips_features(sd1.perceptual, kept.at(0) * 2 - 1)

    def distances(x):
        with torch.no_grad():
            predict = lambda v, ids: x0(v, output(v, ids))  # noqa: E731
            return sync_loss(x, range(len(x)), predict, to_image, sd1.perceptual, features)

    assert (moved - views).flatten(1).abs().amax(1).min() > 0
    assert (distances(moved) < distances(views)).all()


SPHERE = dict(prompt="a sky over a lake", width=1024, num_inference_steps=2, sync_threshold=1)
SPHERE |= dict(stride=16, seed=3)


def test_a_sphere_is_its_band_near_the_horizon_and_its_caps_at_the_poles(sd1, monkeypatch):
    reported, kept, followed = [], [], []
    keep, at = AnchorImages.keep, AnchorImages.at
    monkeypatch.setattr(AnchorImages, "keep", lambda a, k, x: kept.append(k) or keep(a, k, x))
    monkeypatch.setattr(AnchorImages, "at", lambda a, k: followed.append(k) or at(a, k))
    sphere = sd1(sphere=True, height=256, callback=reported.append, **SPHERE)
    assert sphere.size == (1024, 512)
    saved = sphere.info["parameters"]
    assert (saved["sphere"], saved["height"], saved["loop_closure"]) == (True, 512, True)
    # Two steps each: the band, the sky's face, the ground's, counted as one run.
    assert [(s["part"], s["step"], s["steps"]) for s in reported] == [
        (part, step, 6) for step, part in enumerate(["band", "band", "py", "py", "ny", "ny"])
    ]
    # Within 45 degrees of the horizon (rows 128 to 383 of 512) it is the loop-closure band
    # of the same seed, 1024x344 (60 degrees up and down), to the bit.
    assert band_height(1024) == 344
    band = sd1(height=344, loop_closure=True, **SPHERE)
    pixels, band_pixels = np.asarray(sphere, dtype=int), np.asarray(band, dtype=int)
    above = (512 - 344) // 2
    assert np.array_equal(pixels[128:384], band_pixels[128 - above : 384 - above])
    # Beyond, the caps: not the band's edge rows stretched.
    assert not np.array_equal(pixels[20], band_pixels[0])
    # The zenith and the nadir are points: the top row is one colour, the bottom row too.
    assert (pixels[0] == pixels[0, :1]).all() and (pixels[-1] == pixels[-1, :1]).all()
    # The left and right edges meet as neighbouring columns do.
    seam = np.abs(pixels[:, 0] - pixels[:, -1]).mean()
    neighbours = np.abs(np.diff(pixels, axis=1)).mean()
    assert seam < 1.5 * neighbours
    # The band kept its anchor's image at its synced step (the first), and each cap, at its
    # own, was synced to it; a cap synced to none of the band's (so, one window, not synced)
    # differs, the band not.
    assert kept == [0] and followed == [0, 0]
    monkeypatch.setattr(AnchorImages, "at", lambda a, k: None)
    alone = np.asarray(sd1(sphere=True, **SPHERE), dtype=int)
    assert np.array_equal(alone[128:384], pixels[128:384])
    assert not np.array_equal(alone[:100], pixels[:100])
    assert not np.array_equal(alone[-100:], pixels[-100:])


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"width": 1000}, "width must be a multiple of 32 of at least 1024 with sphere"),
        ({"width": 768}, "at least one 256-px window); got 768"),
        ({"image": Image.new("RGB", (64, 32))}, "it takes no image yet"),
        ({"output_type": "latent"}, "output_type 'latent' is not available with sphere"),
    ],
)
def test_what_a_sphere_cannot_take_is_refused_by_name(sd1, inputs, message):
    with pytest.raises(InputError, match=re.escape(message)):
        sd1(**{**SPHERE, "sphere": True, **inputs})


@pytest.fixture(scope="module")
def sphere_predictor(family_weights):
    """The SD2 Cog predictor in process, on the tiny SD 1.x model (256-px windows, so a
    1024-wide sphere)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SYNCDIFFUSION_WEIGHTS", str(family_weights))
        mp.setenv("SYNCDIFFUSION_MODEL", "tiny-sd1")
        from predict import Predictor

        predictor = Predictor()
        predictor.setup()
        yield predictor


def cog_run(predictor, **inputs):
    """Call the predictor as Cog would: every input given, defaults filled in."""
    described = predictors.inputs_of(predictors.PREDICTORS["predict.py"])
    return predictor.run(**{**{k: spec.default for k, spec in described.items()}, **inputs})


def test_cog_writes_a_sphere_as_a_cross_of_its_cube_faces(sphere_predictor):
    inputs = {**SPHERE, "num_inference_steps": 1, "sync_threshold": 0}
    out = cog_run(sphere_predictor, **inputs, sphere=True, cube_map="cross")
    assert out.name == "cube-cross.png"
    with Image.open(out) as cross:
        assert cross.size == (4 * 256, 3 * 256)
        assert "xmp" not in cross.info and "XML:com.adobe.xmp" not in cross.info  # not 2:1
        pixels = np.asarray(cross)
    saved = read_parameters(out)
    assert (saved["cube_map"], saved["sphere"], saved["width"]) == ("cross", True, 1024)
    # The same request's sphere, laid out: the faces are where the cross puts them.
    sphere = Image.open(cog_run(sphere_predictor, **inputs, sphere=True))
    assert sphere.size == (1024, 512) and "cube_map" not in read_parameters(sphere.filename)
    assert np.array_equal(pixels, np.asarray(cube_picture(cube_map(sphere), "cross")))


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"cube_map": "strip"}, "cube_map 'strip' lays out the six cube faces of a whole sphere"),
        ({"cube_map": "dice", "sphere": True}, "cube_map must be one of none, strip, cross"),
    ],
)
def test_cog_refuses_a_cube_map_it_cannot_write_by_name(sphere_predictor, inputs, message):
    with pytest.raises(InputError, match=re.escape(message)):
        cog_run(sphere_predictor, **{**SPHERE, **inputs})


def test_a_sky_prompt_changes_the_sky_alone_and_is_refused_without_a_sphere(sd1):
    quick = {**SPHERE, "num_inference_steps": 1, "sync_threshold": 0, "sphere": True}
    plain = sd1(**quick)
    sky = sd1(**quick, sky_prompt="a starry night sky")
    assert sky.info["parameters"]["sky_prompt"] == "a starry night sky"
    assert "sky_prompt" not in plain.info["parameters"]  # an empty one is not recorded
    pixels, sky_pixels = np.asarray(plain, dtype=int), np.asarray(sky, dtype=int)
    # Within 45 degrees of the horizon (rows 128 to 383 of 512) and below it, the same; above,
    # the sky cap from its own prompt.
    assert np.array_equal(sky_pixels[128:], pixels[128:])
    assert not np.array_equal(sky_pixels[:100], pixels[:100])
    with pytest.raises(InputError, match=re.escape("ground_prompt is what a whole sphere's cap")):
        sd1(**{**quick, "sphere": False, "ground_prompt": "grass"})
