"""ControlNet weights: whether a ControlNet fits a model's UNet, and the tiny ControlNets the tests
run on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from syncdiffusion.family import controlnet_problem
from syncdiffusion.testing.tiny_models import (
    TINY_CONTROLNETS,
    TINY_MODELS,
    make_tiny_controlnet,
    make_tiny_weights,
)
from syncdiffusion.weights import CONTROLNET_DIRNAME, SD_DIRNAME
from tests.conftest import ROOT

WEIGHTS = "diffusion_pytorch_model.safetensors"


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
    return json.loads((ROOT / "benchmarks" / family / "unet.json").read_text())


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
