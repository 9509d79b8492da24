"""ControlNet weights: whether a ControlNet fits a model's UNet."""

from __future__ import annotations

import json

import pytest

from syncdiffusion.family import controlnet_problem
from tests.conftest import ROOT

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
