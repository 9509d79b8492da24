"""ControlNet weights: their folders, the download (the hub faked as in test_weights.py), the fit
check against a model's UNet, and the tiny ControlNets the tests run on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from syncdiffusion.cli import download
from syncdiffusion.errors import WeightsError
from syncdiffusion.models.family import controlnet_problem
from syncdiffusion.models.folders import controlnet_variant, read_source
from syncdiffusion.models.tiny import (
    TINY_CONTROLNETS,
    TINY_MODELS,
    make_tiny_controlnet,
    make_tiny_weights,
)
from syncdiffusion.models.weights import (
    CONTROLNET_DIRNAME,
    DOWNLOAD_COMMAND,
    KNOWN_CONTROLNETS,
    SD_DIRNAME,
    VGG16_RELPATH,
    check_controlnet,
    check_controlnet_fits,
    controlnet_dir,
    controlnet_repo_id,
    download_controlnet,
)
from syncdiffusion.testing.measure import ARCHITECTURES, SD2_CONFIGS

CANNY = "lllyasviel/sd-controlnet-canny"
WEIGHTS = "diffusion_pytorch_model.safetensors"
FP16_WEIGHTS = "diffusion_pytorch_model.fp16.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Tiny SD2-base- and SDXL-shaped models with their tiny ControlNets; read, never change."""
    return make_tiny_weights(tmp_path_factory.mktemp("controlnets"), ("sd2", "sdxl"), True)


def _tiny_controlnet(tiny: Path, shape: str) -> Path:
    return tiny / CONTROLNET_DIRNAME / TINY_CONTROLNETS[shape]


# --- the tiny ControlNets -----------------------------------------------------------------


def _unet_inputs(unet, seed: int = 0) -> dict:
    """One step's inputs for the UNet (and its ControlNet): latents, timestep, text states and,
    for SDXL, the pooled text and the six size numbers."""
    generator = torch.Generator().manual_seed(seed)
    side, width = unet.config.sample_size, unet.config.cross_attention_dim
    inputs = {
        "sample": torch.randn(1, 4, side, side, generator=generator),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 77, width, generator=generator),
    }
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim
        pooled -= 6 * unet.config.addition_time_embed_dim
        sizes = [8.0 * side] * 2 + [0.0] * 2 + [8.0 * side] * 2
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=generator),
            "time_ids": torch.tensor([sizes]),
        }
    return inputs


@pytest.mark.parametrize("shape", ["sd2", "sdxl"])
def test_a_tiny_controlnet_changes_its_models_output(tiny: Path, shape: str) -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny / TINY_MODELS[shape][0] / "unet").eval()
    controlnet = ControlNetModel.from_pretrained(_tiny_controlnet(tiny, shape)).eval()
    inputs = _unet_inputs(unet)
    side = 8 * unet.config.sample_size  # the control image is the window's size in pixels
    images = torch.rand(2, 1, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = unet(**inputs).sample
        residuals = [controlnet(**inputs, controlnet_cond=i, return_dict=False) for i in images]
        controlled = [
            unet(
                **inputs,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            ).sample
            for down, mid in residuals
        ]
    down, mid = residuals[0]
    assert all(r.abs().mean() > 0.05 for r in [*down, mid])
    assert (controlled[0] - plain).norm() > 0.2 * plain.norm()
    # What the control image holds matters, not only that there is one.
    assert (controlled[0] - controlled[1]).norm() > 0.01 * plain.norm()


def test_the_script_writes_the_same_tiny_controlnet(tiny: Path, tmp_path: Path, run_script):
    result = run_script("make_tiny_weights.py", str(tmp_path), "--controlnets")
    assert result.returncode == 0, result.stderr
    assert "tiny-controlnet-sd2" in result.stdout
    written, expected = _tiny_controlnet(tmp_path, "sd2"), _tiny_controlnet(tiny, "sd2")
    for name in ("config.json", WEIGHTS):
        assert (written / name).read_bytes() == (expected / name).read_bytes(), name
    other_seed = make_tiny_controlnet(tiny / SD_DIRNAME, tmp_path / "seed-1", seed=1)
    assert (other_seed / WEIGHTS).read_bytes() != (expected / WEIGHTS).read_bytes()


# --- folders and their check --------------------------------------------------------------


def test_controlnet_folders_are_named_after_their_repository(tmp_path: Path) -> None:
    folder = tmp_path / CONTROLNET_DIRNAME / "sd-controlnet-canny"
    assert controlnet_dir(tmp_path, CANNY) == folder
    assert controlnet_dir(tmp_path, "sd-controlnet-canny") == folder
    assert controlnet_repo_id("sd-controlnet-canny") == CANNY
    assert controlnet_repo_id("alice/my-controlnet") == "alice/my-controlnet"
    assert set(KNOWN_CONTROLNETS.values()) == {
        CANNY,
        "monster-labs/control_v1p_sd15_qrcode_monster",
        "diffusers/controlnet-canny-sdxl-1.0",
    }
    for bad in ("a/b/c", ".cache", ""):
        with pytest.raises(WeightsError, match=f"controlnet must be .* got {bad!r}"):
            controlnet_dir(tmp_path, bad)
    with pytest.raises(WeightsError, match="nor one of the folders download_weights knows"):
        controlnet_repo_id("my-controlnet")


def test_a_tiny_controlnet_passes_its_check(tiny: Path) -> None:
    for shape in ("sd2", "sdxl"):
        assert check_controlnet(tiny, TINY_CONTROLNETS[shape]) == _tiny_controlnet(tiny, shape)


def _edit_config(**changes: object):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))

    return edit


def _cut_weights(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


BROKEN = {  # how the folder is broken -> what the message says
    "no folder": (lambda f: shutil.rmtree(f), "does not exist"),
    "no config": (lambda f: (f / "config.json").unlink(), "incomplete: config.json is missing"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{"), "is not valid JSON"),
    "config a list": (lambda f: (f / "config.json").write_text("[]"), "is not a JSON object"),
    "not a ControlNet": (
        _edit_config(_class_name="UNet2DConditionModel"),
        "is not a diffusers ControlNet: config.json is for 'UNet2DConditionModel'",
    ),
    "no weights": (
        lambda f: (f / WEIGHTS).unlink(),
        f"incomplete: {WEIGHTS} is missing (nor is there {FP16_WEIGHTS})",
    ),
    "weights cut": (_cut_weights, f"incomplete: {WEIGHTS} is truncated or corrupt"),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_a_broken_controlnet_folder(tiny: Path, tmp_path: Path, case: str) -> None:
    weights = tmp_path / "weights"
    folder = Path(shutil.copytree(_tiny_controlnet(tiny, "sd2"), controlnet_dir(weights, "x")))
    breakage, expected = BROKEN[case]
    breakage(folder)
    with pytest.raises(WeightsError) as exc:
        check_controlnet(weights, "x")
    message = str(exc.value)
    assert f"ControlNet folder {folder} " in message and expected in message
    # A folder name the download does not know: the fix needs the repository's owner.
    assert f"Run: {DOWNLOAD_COMMAND} --controlnet OWNER/x --weights {weights}" in message


def test_the_fp16_variant_is_checked_and_loads(tiny: Path, tmp_path: Path) -> None:
    from diffusers import ControlNetModel

    folder = Path(shutil.copytree(_tiny_controlnet(tiny, "sd2"), controlnet_dir(tmp_path, "x")))
    assert controlnet_variant(folder) is None
    (folder / WEIGHTS).rename(folder / FP16_WEIGHTS)
    assert controlnet_variant(folder) == "fp16"
    check_controlnet(tmp_path, "x")
    ControlNetModel.from_pretrained(folder, variant="fp16")


# --- the fit check ------------------------------------------------------------------------

# The keys of real configs that the fit reads, and some it does not (they differ between
# ControlNets that fit): lllyasviel/sd-controlnet-canny's (SD 1.5's UNet; no
# addition_embed_type key: diffusers' default, None), diffusers/controlnet-canny-sdxl-1.0's and
# the down blocks of diffusers/controlnet-canny-sdxl-1.0-small (no attention in them).
SD15_CANNY = {
    "_class_name": "ControlNetModel",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "use_linear_projection": False,
}
SDXL_CANNY = {
    "_class_name": "ControlNetModel",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "projection_class_embeddings_input_dim": 2816,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
}
SDXL_CANNY_SMALL = {**SDXL_CANNY, "down_block_types": ["DownBlock2D"] * 3}


def _unet_config(family: str) -> dict:
    return json.loads((ARCHITECTURES / family / "unet.json").read_text())


def test_an_sd1_controlnet_does_not_fit_sd2() -> None:
    problem = controlnet_problem(SD15_CANNY, _unet_config("sd2-base"))
    # Only the text width differs; SD2's attention heads and linear projections do not count.
    assert problem == "cross_attention_dim is 768 in the ControlNet and 1024 in the UNet"
    sd15_unet = {**_unet_config("sd2-base"), "cross_attention_dim": 768, "attention_head_dim": 8}
    assert controlnet_problem(SD15_CANNY, sd15_unet) is None


def test_sd_and_sdxl_controlnets_fit_only_their_family() -> None:
    sdxl, sd2 = _unet_config("sdxl-base"), _unet_config("sd2-base")
    assert controlnet_problem(SDXL_CANNY, sdxl) is None
    assert controlnet_problem(SDXL_CANNY_SMALL, sdxl) is None
    assert controlnet_problem(SD15_CANNY, sdxl) == (
        "the ControlNet is for Stable Diffusion 1.x/2.x, the UNet is SDXL's; "
        "block_out_channels is [320, 640, 1280, 1280] in the ControlNet and [320, 640, 1280] in "
        "the UNet; cross_attention_dim is 768 in the ControlNet and 2048 in the UNet; "
        "addition_embed_type is None in the ControlNet and 'text_time' in the UNet"
    )
    assert "addition_embed_type is 'text_time' in the ControlNet and None" in controlnet_problem(
        SDXL_CANNY, sd2
    )


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"layers_per_block": 1}, "layers_per_block is 1 in the ControlNet and 2 in the UNet"),
        ({"in_channels": 9}, "in_channels is 9 in the ControlNet and 4 in the UNet"),
        (
            {"addition_time_embed_dim": 128},
            "addition_time_embed_dim is 128 in the ControlNet and 256 in the UNet",
        ),
        (
            {"projection_class_embeddings_input_dim": 2560},
            "projection_class_embeddings_input_dim is 2560 in the ControlNet and 2816 in the UNet",
        ),
        (
            {"conditioning_embedding_out_channels": [16, 32, 96]},
            "conditioning_embedding_out_channels is [16, 32, 96] in the ControlNet; it needs 4 "
            "levels to scale the control image down 8x like the latents",
        ),
    ],
)
def test_each_difference_is_named(change: dict, expected: str) -> None:
    assert controlnet_problem({**SDXL_CANNY, **change}, _unet_config("sdxl-base")) == expected


def test_per_level_values_of_a_unet_compare_with_one_number() -> None:
    unet = {**_unet_config("sdxl-base"), "layers_per_block": [2, 2, 2]}
    unet["cross_attention_dim"] = [2048] * 3
    assert controlnet_problem(SDXL_CANNY, unet) is None
    unet["layers_per_block"] = [2, 2, 3]
    assert controlnet_problem(SDXL_CANNY, unet) == (
        "layers_per_block is 2 in the ControlNet and [2, 2, 3] in the UNet"
    )


def test_the_fit_check_names_both_folders(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    model, controlnet = weights / SD_DIRNAME, controlnet_dir(weights, CANNY)
    (model / "unet").mkdir(parents=True)
    shutil.copy(SD2_CONFIGS / "unet.json", model / "unet" / "config.json")
    controlnet.mkdir(parents=True)
    (controlnet / "config.json").write_text(json.dumps(SD15_CANNY))
    with pytest.raises(WeightsError) as exc:
        check_controlnet_fits(model, controlnet)
    assert str(exc.value) == (
        f"{controlnet} does not fit {model}: cross_attention_dim is 768 in the ControlNet and "
        "1024 in the UNet"
    )


def test_tiny_controlnets_fit_their_own_model_only(tiny: Path) -> None:
    sd2, sdxl = tiny / SD_DIRNAME, tiny / TINY_MODELS["sdxl"][0]
    check_controlnet_fits(sd2, _tiny_controlnet(tiny, "sd2"))
    check_controlnet_fits(sdxl, _tiny_controlnet(tiny, "sdxl"))
    with pytest.raises(WeightsError, match="the ControlNet is for SDXL, the UNet is Stable"):
        check_controlnet_fits(sd2, _tiny_controlnet(tiny, "sdxl"))
    with pytest.raises(WeightsError, match="addition_embed_type is None in the ControlNet"):
        check_controlnet_fits(sdxl, _tiny_controlnet(tiny, "sd2"))


# --- the download -------------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tiny: Path, tmp_path: Path):
    """The canny ControlNet's repository behind a fake hub (the tiny SD2 ControlNet, with what
    the real one holds beside it and the download must skip), and the tiny SD2 model's as any
    other repository."""
    from test_weights import FakeHub

    controlnet = _tiny_controlnet(tiny, "sd2")
    repo = Path(shutil.copytree(controlnet, tmp_path / "hub" / "canny"))
    (repo / "diffusion_pytorch_model.bin").write_bytes(b"pickled weights")
    (repo / "control_sd15_canny.safetensors").write_bytes(b"a single-file checkpoint")
    (repo / "README.md").write_text("a model card")
    shutil.copytree(controlnet, repo / "v2")  # another version, in a subfolder
    hub = FakeHub(Path(shutil.copytree(tiny / SD_DIRNAME, tmp_path / "hub" / "sd2")))
    hub.repos[CANNY] = repo
    return hub.install(monkeypatch)


def _with_fp16(repo: Path) -> None:
    shutil.copy(repo / WEIGHTS, repo / FP16_WEIGHTS)


def _fetched(hub) -> list[str]:
    """The repositories fetched, in order (a repository without fp16 files is fetched twice)."""
    return list(dict.fromkeys(hub.calls))


def test_download_fetches_only_what_diffusers_reads(tmp_path: Path, hub) -> None:
    from diffusers import ControlNetModel

    folder = download_controlnet(tmp_path / "w", "sd-controlnet-canny", progress=False)
    assert folder == controlnet_dir(tmp_path / "w", CANNY) and _fetched(hub) == [CANNY]
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert got == ["config.json", WEIGHTS, "syncdiffusion-source.json"]
    source = read_source(folder)
    assert {k: source[k] for k in ("repo_id", "revision")} == {
        "repo_id": CANNY,
        "revision": hub.revision,
    }
    assert set(source["files"]) == {"config.json", WEIGHTS}  # each checked against the hub
    assert check_controlnet(tmp_path / "w", CANNY) == folder
    ControlNetModel.from_pretrained(folder)
    hub.calls.clear()
    download_controlnet(tmp_path / "w", CANNY, progress=False)  # complete: nothing to fetch
    assert hub.calls == []


def test_download_takes_the_fp16_file_where_there_is_one(tmp_path: Path, hub) -> None:
    _with_fp16(hub.repos[CANNY])
    folder = download_controlnet(tmp_path / "w", CANNY, progress=False)
    assert controlnet_variant(folder) == "fp16" and not (folder / WEIGHTS).exists()
    check_controlnet(tmp_path / "w", CANNY)


def test_a_failed_download_is_continued(tmp_path: Path, hub) -> None:
    _with_fp16(hub.repos[CANNY])
    hub.fail = True  # after the config, before the weights
    with pytest.raises(WeightsError) as exc:
        download_controlnet(tmp_path / "w", "sd-controlnet-canny", progress=False)
    folder = controlnet_dir(tmp_path / "w", CANNY)
    message = str(exc.value)
    assert f"Downloading {CANNY} into {folder} failed (ConnectionError" in message
    assert f"--controlnet sd-controlnet-canny --weights {tmp_path / 'w'}" in message
    assert (folder / "config.json").is_file() and not (folder / FP16_WEIGHTS).exists()
    with pytest.raises(WeightsError, match=f"{WEIGHTS} is missing"):
        check_controlnet(tmp_path / "w", CANNY)
    hub.fail = False
    download_controlnet(tmp_path / "w", "sd-controlnet-canny", progress=False)
    assert controlnet_variant(check_controlnet(tmp_path / "w", CANNY)) == "fp16"


def test_download_refuses_what_it_cannot_fetch(
    tmp_path: Path, hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(WeightsError, match="sd-controlnet-canny, control_v1p_sd15_qrcode"):
        download_controlnet(tmp_path / "w", "my-controlnet", progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE=1 forbids downloads"):
        download_controlnet(tmp_path / "w", CANNY, progress=False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    download_controlnet(tmp_path / "w", CANNY, progress=False)
    with pytest.raises(WeightsError) as exc:  # another owner's ControlNet of the same name
        download_controlnet(tmp_path / "w", "bob/sd-controlnet-canny", progress=False)
    assert f"holds {CANNY}, not bob/sd-controlnet-canny: ControlNets of one name" in str(exc.value)
    assert "--controlnet bob/sd-controlnet-canny --weights" in str(exc.value)
    assert _fetched(hub) == [CANNY]


def test_the_command_fetches_a_controlnet_alone(tmp_path: Path, hub, capsys) -> None:
    target = tmp_path / "w"
    assert download.main(["--controlnet", "sd-controlnet-canny", "--weights", str(target)]) == 0
    assert f"Downloading into {target}: controlnet/sd-controlnet-canny" in capsys.readouterr().out
    assert _fetched(hub) == [CANNY]  # no model, no trunk
    assert not (target / SD_DIRNAME).exists() and not (target / VGG16_RELPATH).exists()
    assert download.main(["--controlnet", CANNY, "--weights", str(target)]) == 0
    assert "nothing to download" in capsys.readouterr().out


def test_the_command_fetches_a_model_and_its_controlnet_and_checks_the_fit(
    tiny: Path, tmp_path: Path, hub, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from syncdiffusion.models import lpips_trunk

    target = tmp_path / "w"
    shutil.copytree(tiny / "lpips", target / "lpips")  # the trunk is test_weights.py's
    monkeypatch.setattr(lpips_trunk, "VGG16_URL", (tmp_path / "gone.pth").as_uri())
    argv = ["--model", "alice/tiny-sd", "--controlnet", CANNY, "--weights", str(target)]
    assert download.main(argv) == 0
    assert "tiny-sd, controlnet/sd-controlnet-canny" in capsys.readouterr().out
    assert _fetched(hub) == ["alice/tiny-sd", CANNY]

    # The repository's config changed to a ControlNet for another UNet, fetched again: a local
    # edit would be undone, as the file no longer matches what the download recorded.
    config, published = (
        controlnet_dir(target, CANNY) / "config.json",
        hub.repos[CANNY] / "config.json",
    )
    published.write_text(json.dumps({**json.loads(config.read_text()), "cross_attention_dim": 768}))
    config.unlink()
    assert download.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert f"{config.parent} does not fit {target / 'tiny-sd'}: cross_attention_dim is 768" in err


def test_the_help_lists_the_known_controlnets(run_script) -> None:
    result = run_script("download_weights.py", "--help")
    assert result.returncode == 0, result.stderr
    assert "--controlnet NAME" in result.stdout
    text = "".join(result.stdout.split())  # argparse wraps lines at hyphens
    assert all(name in text for name in KNOWN_CONTROLNETS)
