"""Every model family on tiny models in the real layouts: SD 1.x, SD 2.x 768 v-prediction, SDXL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from syncdiffusion import InputError, SyncDiffusionPipeline, WeightsError
from syncdiffusion.core.decoding import decode
from syncdiffusion.core.windows import panorama_windows
from syncdiffusion.models.family import SD, SDXL
from syncdiffusion.models.tiny import TINY_MODELS

MODELS = {shape: TINY_MODELS[shape][0] for shape in ("sd1", "sd2-v", "sdxl")}


@pytest.fixture(scope="module")
def pipes(family_weights) -> dict[str, SyncDiffusionPipeline]:
    return {
        shape: SyncDiffusionPipeline.from_pretrained(family_weights, device="cpu", model=name)
        for shape, name in MODELS.items()
    }


def _small(pipe: SyncDiffusionPipeline, **inputs) -> dict:
    """A non-square panorama one window high and 8 latent pixels wider: two windows."""
    side = pipe.window_pixels
    return dict(
        prompt="a harbour at dawn",
        width=side + 64,
        height=side,
        num_inference_steps=2,
        sync_threshold=1,
        stride=8,
        seed=3,
        output_type="latent",
        **inputs,
    )


def test_family_and_window_are_read_from_the_files(pipes):
    got = {s: (p.family, p.window, p.window_pixels) for s, p in pipes.items()}
    assert got == {"sd1": (SD, 32, 256), "sd2-v": (SD, 48, 384), "sdxl": (SDXL, 32, 256)}
    assert pipes["sd2-v"].new_scheduler().config.prediction_type == "v_prediction"
    assert pipes["sdxl"].vae.config.scaling_factor == 0.13025


@pytest.mark.parametrize("shape", MODELS)
def test_panorama_is_deterministic_and_synced(pipes, shape):
    pipe = pipes[shape]
    synced = pipe(**_small(pipe))
    f = pipe.vae_scale_factor
    assert synced.shape == (1, 4, pipe.window, pipe.window + 8)
    assert torch.equal(synced, pipe(**_small(pipe)))
    plain = pipe(**_small(pipe, sync_weight=0.0))
    assert synced.isfinite().all() and not torch.equal(synced, plain)
    assert pipe.decode(synced).size == (pipe.window * f + 64, pipe.window * f)


@pytest.mark.parametrize("shape, scheduler", [("sdxl", "KarrasDPM"), ("sd2-v", "K_EULER")])
def test_other_schedulers_sync_sdxl_and_v_prediction_models(pipes, shape, scheduler):
    # SDXL's added conditions, and a v-prediction model's x0 under a sigma-scaled scheduler.
    pipe = pipes[shape]
    synced = pipe(**_small(pipe, scheduler=scheduler))
    plain = pipe(**_small(pipe, scheduler=scheduler, sync_weight=0.0))
    assert synced.isfinite().all() and not torch.equal(synced, plain)
    assert not torch.equal(synced, pipe(**_small(pipe)))  # DDIM's


@pytest.mark.parametrize("shape", MODELS)
def test_windows_and_limits_are_the_model_s(pipes, shape):
    pipe = pipes[shape]
    side, w = pipe.window_pixels, pipe.window
    windows = panorama_windows(w, 3 * w, 8, window=w)
    assert all(v.h1 - v.h0 == v.w1 - v.w0 == w for v in windows)
    with pytest.raises(InputError, match=f"height must be a multiple of 8 from {side} to 4096"):
        pipe(**_small(pipe) | {"height": side - 8})
    with pytest.raises(InputError, match=f"from 8 to {w - 8} \\(less than the {w}-latent window"):
        pipe(**_small(pipe) | {"stride": w})


def test_sdxl_prompt_is_two_encoders_pooled_and_sized(pipes):
    pipe = pipes["sdxl"]
    embeddings, added = pipe._encode("a harbour at dawn", "")
    # Each tiny encoder is 32 wide; SDXL concatenates them (768 + 1280 in the real model).
    assert embeddings.shape == (2, 77, 64) and added["text_embeds"].shape == (2, 32)
    # force_zeros_for_empty_prompt (the folder's model_index.json): an empty negative is zeros.
    assert not embeddings[0].any() and not added["text_embeds"][0].any()
    assert embeddings[1].any() and added["text_embeds"][1].any()
    assert added["time_ids"].tolist() == [[256, 256, 0, 0, 256, 256]] * 2
    negative, _ = pipe._encode("a harbour at dawn", "fog")
    assert negative[0].any()


def test_sdxl_vae_stays_fp32_where_fp16_overflows(family_weights):
    pipe = SyncDiffusionPipeline.from_pretrained(
        family_weights, device="cpu", dtype=torch.float16, model=MODELS["sdxl"]
    )
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    # Activations past fp16's 65504, as SDXL's real decoder reaches: fp16 gives inf/NaN.
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight.mul_(1e5)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert decode(pipe.vae, latents.half()).isfinite().all()
        assert not decode(pipe.vae.to(torch.float16), latents).isfinite().all()


def _copy(family_weights: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / "weights"
    shutil.copytree(family_weights / name, out / name)
    shutil.copytree(family_weights / "lpips", out / "lpips")
    return out


def _edit(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_a_folder_of_neither_family_is_refused_naming_what_is_missing(family_weights, tmp_path):
    name = MODELS["sdxl"]
    weights = _copy(family_weights, tmp_path, name)
    _edit(weights / name / "model_index.json", text_encoder_2=None)
    with pytest.raises(WeightsError, match="lists no text_encoder_2") as error:
        SyncDiffusionPipeline.from_pretrained(weights, device="cpu", model=name)
    assert f"--model OWNER/{name}" in str(error.value)
    _edit(weights / name / "unet" / "config.json", addition_embed_type="image")
    with pytest.raises(WeightsError, match="addition_embed_type 'image'"):
        SyncDiffusionPipeline.from_pretrained(weights, device="cpu", model=name)
    shutil.rmtree(weights / name / "text_encoder_2")
    _edit(weights / name / "unet" / "config.json", addition_embed_type="text_time")
    _edit(weights / name / "model_index.json", text_encoder_2=["transformers", "X"])
    with pytest.raises(WeightsError, match=r"text_encoder_2/config\.json is missing"):
        SyncDiffusionPipeline.from_pretrained(weights, device="cpu", model=name)


def test_the_model_folder_comes_from_the_environment(family_weights, monkeypatch):
    monkeypatch.setenv("SYNCDIFFUSION_MODEL", MODELS["sdxl"])
    assert SyncDiffusionPipeline.from_pretrained(family_weights, device="cpu").family is SDXL
    monkeypatch.setenv("SYNCDIFFUSION_MODEL", "stable-diffusion-2-base")
    with pytest.raises(WeightsError, match="stable-diffusion-2-base does not exist"):
        SyncDiffusionPipeline.from_pretrained(family_weights, device="cpu")


def test_download_any_model_into_its_repository_s_folder(family_weights, tmp_path, monkeypatch):
    from test_weights import FakeHub

    from syncdiffusion.models import folders as model_folder
    from syncdiffusion.models import weights

    # A fine-tune with full-precision files only: the fp16 pass finds none, the second fetches.
    hub = FakeHub(family_weights / MODELS["sdxl"]).install(monkeypatch)
    target = tmp_path / "weights"
    shutil.copytree(family_weights / "lpips", target / "lpips")
    assert weights.missing_parts(target, model="someone/my-sdxl") == ["my-sdxl"]
    weights.download_weights(target, progress=False, model="someone/my-sdxl")
    assert hub.calls == ["someone/my-sdxl"] * 2
    weights.check_weights(target, "my-sdxl")
    assert model_folder.read_family(target / "my-sdxl") is SDXL
    assert model_folder.sd_variant(target / "my-sdxl") is None
    with pytest.raises(WeightsError, match="'my-sd' is not a hub repository id"):
        weights.download_weights(target, progress=False, model="my-sd")
    assert weights.repo_id("stable-diffusion-xl-base-1.0").startswith("stabilityai/")
