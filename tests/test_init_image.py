"""A panorama from an image: img2img and inpainting against diffusers' own pipelines on one
window, the kept region held exactly, outpainting, the anchor, and every bad image and mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image

from syncdiffusion import InputError
from syncdiffusion.cli.generate import main
from syncdiffusion.core.control import image_record
from syncdiffusion.core.init_image import KeptRegion, encode, image_pixels, mask_latent, outpaint
from syncdiffusion.core.windows import panorama_windows
from syncdiffusion.request.condition_image import open_image
from syncdiffusion.request.image_file import read_parameters

ONE_WINDOW = dict(width=512, height=512, sync_weight=0, guidance_scale=7.5, seed=4)


def picture(width: int = 512, height: int = 512, seed: int = 0) -> Image.Image:
    """A smooth random picture (a photo's low frequencies, not white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def left_half_kept(width: int = 512, height: int = 512) -> Image.Image:
    """A mask that keeps the left half (black) and makes the right half anew (white)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2 :] = 255
    return Image.fromarray(mask)


def max_difference(ours: Image.Image, theirs: Image.Image) -> int:
    return int(np.abs(np.asarray(ours, int) - np.asarray(theirs, int)).max())


def diffusers_pipeline(cls, pipe):
    """diffusers' pipeline `cls` on the same networks and a DDIM scheduler of the same config."""
    theirs = cls(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=DDIMScheduler.from_config(pipe.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    theirs.set_progress_bar_config(disable=True)
    return theirs


def test_img2img_on_one_window_is_diffusers_img2img(pipe):
    theirs_pipe = diffusers_pipeline(StableDiffusionImg2ImgPipeline, pipe)
    image, steps, strength = picture(), 4, 0.6
    reported = []
    ours = pipe(
        prompt="a harbour",
        image=image,
        prompt_strength=strength,
        num_inference_steps=steps,
        callback=reported.append,
        **ONE_WINDOW,
    )
    theirs = theirs_pipe(
        prompt="a harbour",
        image=image,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(4),
    ).images[0]
    assert max_difference(ours, theirs) <= 2
    # int(4 * 0.6) = 2 steps run, counted from 0.
    assert [(state["step"], state["steps"]) for state in reported] == [(0, 2), (1, 2)]
    assert ours.info["parameters"]["prompt_strength"] == strength


def test_inpainting_on_one_window_is_diffusers_inpainting_and_keeps_the_image(pipe):
    theirs_pipe = diffusers_pipeline(StableDiffusionInpaintPipeline, pipe)
    image, mask, steps, strength = picture(seed=1), left_half_kept(), 3, 0.8
    inputs = dict(prompt="a bay", image=image, mask=mask, num_inference_steps=steps)
    ours = pipe(prompt_strength=strength, **inputs, **ONE_WINDOW)
    theirs = theirs_pipe(
        prompt="a bay",
        image=image,
        mask_image=mask,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=7.5,
        height=512,
        width=512,
        generator=torch.Generator("cpu").manual_seed(4),
    ).images[0]
    assert max_difference(ours, theirs) <= 2
    # Where the mask keeps the image, the final latent is the image's encoded latent exactly.
    latent = pipe(prompt_strength=1.0, output_type="latent", **inputs, **ONE_WINDOW)
    with torch.no_grad():
        generator = torch.Generator("cpu").manual_seed(4)
        encoded = encode(pipe.vae, image_pixels(image, 512, 512), generator)
    kept = mask_latent(mask, 512, 512, 8) == 0  # (1, 1, 64, 64)
    assert kept.any()
    assert torch.equal(latent[kept.expand_as(latent)], encoded[kept.expand_as(encoded)])
    assert not torch.equal(latent[~kept.expand_as(latent)], encoded[~kept.expand_as(encoded)])


def test_outpainting_places_the_image_in_the_middle_and_keeps_it(pipe):
    photo = picture(256, 512, seed=2)  # half a window wide: a portrait photo
    canvas, mask = outpaint(photo, None, 768, 512)
    assert canvas.size == mask.size == (768, 512)
    kept = np.asarray(mask) == 0
    assert kept[:, 256:512].all() and not kept[:, :256].any() and not kept[:, 512:].any()
    assert np.array_equal(np.asarray(canvas)[:, 256:512], np.asarray(photo))
    # Around it, the photo's edge columns repeated.
    assert np.array_equal(np.asarray(canvas)[:, 0], np.asarray(photo)[:, 0])
    latent = pipe(
        prompt="a valley",
        image=photo,
        width=768,
        height=512,
        num_inference_steps=2,
        prompt_strength=1.0,
        sync_threshold=0,
        stride=16,
        seed=6,
        output_type="latent",
    )
    with torch.no_grad():
        encoded = encode(pipe.vae, image_pixels(canvas, 768, 512), torch.Generator().manual_seed(6))
    # The photo's latent columns 32..64 are kept exactly; the rest is made anew.
    assert torch.equal(latent[..., 32:64], encoded[..., 32:64])
    assert not torch.equal(latent[..., :32], encoded[..., :32])


def test_the_sync_schedule_counts_the_steps_that_run_from_the_image(pipe):
    reported = []
    pipe(
        prompt="a pier",
        image=picture(576, 512, seed=5),
        mask=left_half_kept(576, 512),
        width=576,
        num_inference_steps=2,
        prompt_strength=0.5,  # the last step of 2, synced as the first that runs
        sync_threshold=1,
        seed=1,
        output_type="latent",
        callback=reported.append,
    )
    assert [(state["step"], state["steps"], state["sync"]) for state in reported] == [(0, 1, True)]


def test_the_anchor_is_the_window_most_covered_by_what_is_kept():
    windows = panorama_windows(64, 128, stride=16)  # 5 windows of 64 latent pixels
    mask = torch.ones(1, 1, 64, 128)
    mask[..., :40] = 0  # the left 40 columns kept: the first window holds most of them
    region = KeptRegion(torch.zeros(1, 4, 64, 128), mask, torch.zeros(1, 4, 64, 128))
    assert region.anchor(windows) == 0
    mask[...] = 1
    mask[..., 56:72] = 0  # the middle kept: every window holds it, the published anchor wins
    assert region.anchor(windows) == len(windows) // 2


def test_a_plain_panorama_records_none_of_the_image_inputs(pipe):
    made = pipe(prompt="a dune", width=512, num_inference_steps=1, sync_threshold=0)
    assert not {"image", "mask", "prompt_strength"} & set(made.info["parameters"])


def grey(value: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.new("L", size, value)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"mask": left_half_kept()}, "mask needs image"),
        ({"image": "photo.png"}, "image must be an image; got 'photo.png'"),
        ({"image": picture(), "prompt_strength": 1.5}, "prompt_strength must be a number from 0"),
        (
            {"image": picture(), "prompt_strength": 0.01},
            "prompt_strength 0.01 of 50 num_inference_steps runs no step",
        ),
        ({"image": picture(), "mask": grey(255)}, "mask keeps nothing: all its 64x64 pixels"),
        ({"image": picture(), "mask": grey(0)}, "mask keeps everything"),
        (
            {"image": picture(), "mask": picture(64, 64)},
            "mask must be one channel (grayscale: white is made anew, black is kept); got a "
            "64x64 image in mode RGB",
        ),
    ],
)
def test_a_bad_image_mask_or_strength_is_named(pipe, inputs, message):
    with pytest.raises(InputError) as refused:
        pipe.request(prompt="a lake", num_inference_steps=50, **inputs)
    assert message in str(refused.value)


def test_a_mask_in_grey_saved_as_rgb_is_one_channel(pipe):
    mask = left_half_kept(64, 64).convert("RGB")
    assert pipe.request(prompt="a lake", image=picture(), mask=mask)["mask"] is mask


@pytest.mark.parametrize("name", ["image", "mask"])
def test_an_image_file_is_checked_as_the_condition_image_naming_its_input(name):
    with pytest.raises(InputError, match=rf"^{name} must be a PNG, JPEG or WebP image; got "):
        open_image(b"GIF89a" + bytes(26), name)
    with pytest.raises(InputError, match=rf"^{name} must be 8-bit RGB or grayscale"):
        open_image(Image.new("RGBA", (8, 8)), name)


def test_from_png_asks_for_the_same_image_and_mask(tiny_weights, tmp_path, capsys):
    photo, mask, other = tmp_path / "photo.png", tmp_path / "mask.png", tmp_path / "other.png"
    picture(seed=3).save(photo)
    left_half_kept().save(mask)
    picture(seed=4).save(other)
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    common = ["--weights", str(tiny_weights), "--output"]
    made = ["--prompt", "a quay", "--width", "512", "--num-inference-steps", "1"]
    made += ["--sync-threshold", "0", "--image", str(photo), "--mask", str(mask)]
    assert main([*made, "--prompt-strength", "1", *common, str(first)]) == 0
    saved = read_parameters(first)
    assert saved["prompt_strength"] == 1
    assert saved["image"] == image_record(Image.open(photo))
    assert saved["mask"] == image_record(Image.open(mask))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--from-png", str(first), *common, str(again)])
    error = capsys.readouterr().err
    assert "was made from an image of 512x512 pixels (sha256" in error
    assert "give it with --image FILE" in error
    argv = ["--from-png", str(first), "--mask", str(mask), *common, str(again)]
    assert main([*argv, "--image", str(other)]) == 2
    assert f"--image {other} is not the image {first} was made with" in capsys.readouterr().err
    assert main([*argv, "--image", str(photo)]) == 0
    with Image.open(first) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()


def _kept_exactly(pipe, latent, canvas, width, height, seed, columns):
    """Whether the latent's `columns` are the canvas's own latent, as encoded for that seed."""
    with torch.no_grad():
        pixels = image_pixels(canvas, width, height).to(pipe.device, pipe.vae.dtype)
        encoded = encode(pipe.vae, pixels, torch.Generator().manual_seed(seed))
    return torch.equal(latent[..., columns], encoded[..., columns].to(latent.dtype))


def _photo_columns(pipe, width: int) -> slice:
    """The latent columns of a photo half a window wide in the middle of a panorama."""
    f, photo = pipe.vae_scale_factor, pipe.window_pixels // 2
    start = (width - photo) // 2 // f
    return slice(start, start + photo // f)


def _synced_from_a_photo(pipe, **more):
    """A synced panorama two windows wide around a photo half a window wide, from noise around
    it; its latent, the canvas it was made on and its width."""
    side = pipe.window_pixels
    width, photo = 2 * side, picture(side // 2, side, seed=3)
    canvas, _ = outpaint(photo, None, width, side)
    inputs = dict(prompt="a coast", image=photo, width=width, height=side, prompt_strength=1.0)
    inputs |= dict(num_inference_steps=2, sync_threshold=1, seed=7, output_type="latent")
    inputs |= dict(stride=pipe.window // 2)  # three windows
    reported = []
    latent = pipe(**inputs, **more, callback=reported.append)
    assert [state["sync"] for state in reported] == [True, False]
    return latent, canvas, width


def test_a_synced_360_panorama_around_a_photo_keeps_it(pipe):
    latent, canvas, width = _synced_from_a_photo(pipe, loop_closure=True)
    middle = _photo_columns(pipe, width)
    assert _kept_exactly(pipe, latent, canvas, width, pipe.window_pixels, 7, middle)
    assert latent.isfinite().all()
    image = pipe.decode(latent, loop_closure=True)
    assert image.size == (width, pipe.window_pixels)


def test_a_synced_sdxl_panorama_around_a_photo_keeps_it(family_weights):
    from syncdiffusion import SyncDiffusionPipeline

    sdxl = SyncDiffusionPipeline.from_pretrained(family_weights, device="cpu", model="tiny-sdxl")
    latent, canvas, width = _synced_from_a_photo(sdxl)
    middle = _photo_columns(sdxl, width)
    assert _kept_exactly(sdxl, latent, canvas, width, sdxl.window_pixels, 7, middle)
    assert not _kept_exactly(sdxl, latent, canvas, width, sdxl.window_pixels, 7, slice(0, 4))


def test_a_synced_panorama_laid_out_by_a_controlnet_around_a_photo_keeps_it(tiny_weights, tmp_path):
    from syncdiffusion import SyncDiffusionPipeline
    from syncdiffusion.models.tiny import make_tiny_controlnet

    make_tiny_controlnet(tiny_weights / "stable-diffusion-2-base", tmp_path / "controlnet" / "cn")
    for part in tiny_weights.iterdir():
        if part.name not in ("controlnet", "lora"):
            (tmp_path / part.name).symlink_to(part)
    controlled = SyncDiffusionPipeline.from_pretrained(tmp_path, device="cpu", controlnet="cn")
    edges = Image.fromarray((np.random.default_rng(2).random((512, 1024)) > 0.9) * np.uint8(255))
    latent, canvas, width = _synced_from_a_photo(controlled, control_image=edges)
    middle = _photo_columns(controlled, width)
    assert _kept_exactly(controlled, latent, canvas, width, 512, 7, middle)


def test_a_huge_image_is_encoded_in_tiles_close_to_the_whole(pipe, monkeypatch):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from syncdiffusion.core import init_image
    from syncdiffusion.core.init_image import encode_moments_tiled

    pixels = image_pixels(picture(1536, 1024, seed=8), 1536, 1024)  # two tiles, overlapping
    with torch.no_grad():
        whole = pipe.vae.encode(pixels).latent_dist.parameters
        tiled = encode_moments_tiled(pipe.vae, pixels)
        assert tiled.shape == whole.shape and tiled.isfinite().all()
        # Each tile's encoder normalises over its own pixels: close to the whole, not equal.
        mean, tiled_mean = whole[:, :4].flatten(), tiled[:, :4].flatten()
        assert torch.corrcoef(torch.stack([mean, tiled_mean]))[0, 1] > 0.98
        assert (mean - tiled_mean).abs().mean() < 0.1 * mean.std()
        # Above the threshold `encode` takes the tiles, one draw from the generator as before.
        monkeypatch.setattr(init_image, "TILE_ABOVE_PIXELS", 1024 * 1024)
        latent = encode(pipe.vae, pixels, torch.Generator().manual_seed(3))
        expected = DiagonalGaussianDistribution(tiled).sample(torch.Generator().manual_seed(3))
    assert torch.equal(latent, expected * pipe.vae.config.scaling_factor)
