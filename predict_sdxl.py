"""Cog predictor for SDXL panoramas: predict.py's model on SDXL base 1.0, with 1024 px windows.

Publish it with `run: "predict_sdxl.py:Predictor"` in cog.yaml (README, "An SDXL model on
Replicate"). `cog build` reads the `Input(...)` fields without running this file, so they are
literals here too, written by `python -m syncdiffusion.replicate.predictors`: the bounds that
differ from predict.py's are the sides (at least one 1024 px window), the stride (below the
128-latent window) and the defaults that follow.
"""

from __future__ import annotations

from cog import Input, Path

import predict

# --- input descriptions: written by python -m syncdiffusion.replicate.predictors ---
# From syncdiffusion/request/inputs.py: edit that, then run the command above.
# The descriptions too long for their line inside Input(...):
STRIDE_HELP = "Latent pixels between windows, a multiple of 8 under 128; smaller: smoother, slower."
SPHERE_HELP = "The whole sphere, sky and ground too: height is half the width, loop_closure on."
GROUND_PROMPT_HELP = "With sphere: what the ground shows, looking straight down; empty: the prompt."
SCHEDULER_HELP = "The sampler: DDIM, the published one, or another; KarrasDPM is DPM++ 2M Karras."
IMAGE_HELP = "A picture to start from: restyled, upscaled, or extended if its proportions differ."
MASK_HELP = "Which part of image to make anew (white) and which to keep (black); needs image."
STRENGTH_HELP = "How much of image is made anew: 1 makes it all from noise, lower keeps more of it."
LORA_WEIGHTS_HELP = "A LoRA: a Hugging Face repo (owner/name, optionally /file.safetensors) or an https URL of a .safetensors file."  # noqa: E501
SCALE_HELP = "How strongly lora_weights is applied: 0 leaves the model as it is, 1 is as trained."
MAP_HELP = "With sphere, the file is its cube map instead: a 6:1 row or 4:3 cross of its faces."
# --- end of input descriptions ---


class Predictor(predict.Predictor):
    MODEL = "stable-diffusion-xl-base-1.0"

    def run(
        self,
        # --- inputs: written by python -m syncdiffusion.replicate.predictors ---
        # From syncdiffusion/request/inputs.py: edit that, then run the command above.
        prompt: str = Input(description="What the panorama shows.", max_length=10000),
        negative_prompt: str = Input(
            description="What the panorama should not show.", default="", max_length=10000
        ),
        width: int = Input(
            description="Width in pixels, a multiple of 8. Wider than high: a horizontal panorama.",
            default=4096,
            ge=1024,
            le=4096,
        ),
        height: int = Input(
            description="Height in pixels, a multiple of 8. Higher than wide: a vertical panorama.",
            default=1024,
            ge=1024,
            le=4096,
        ),
        guidance_scale: float = Input(
            description="Classifier-free guidance: how closely to follow the prompt.",
            default=7.5,
            ge=0,
            le=20,
        ),
        sync_weight: float = Input(
            description="Pull of each window towards the anchor window; 0 is plain MultiDiffusion.",
            default=20.0,
            ge=0,
            le=30,
        ),
        sync_decay_rate: float = Input(
            description="The sync weight is multiplied by this at every denoising step.",
            default=0.99,
            ge=0,
            le=1,
        ),
        sync_freq: int = Input(
            description="Run the sync gradient step every this many denoising steps.",
            default=1,
            ge=1,
        ),
        sync_threshold: int = Input(
            description="Run the sync gradient step only in the first this many denoising steps.",
            default=5,
            ge=0,
            le=50,
        ),
        num_inference_steps: int = Input(
            description="Number of denoising steps.", default=50, ge=1, le=200
        ),
        stride: int = Input(description=STRIDE_HELP, default=32, ge=8, le=120),
        seed: int = Input(
            description="Random seed: the same seed gives the same panorama.", default=2, ge=0
        ),
        loop_closure: bool = Input(
            description="Make a 360-degree panorama: the right edge continues into the left edge.",
            default=False,
        ),
        sphere: bool = Input(description=SPHERE_HELP, default=False),
        sky_prompt: str = Input(
            description="With sphere: what the sky shows, looking straight up; empty: the prompt.",
            default="",
            max_length=10000,
        ),
        ground_prompt: str = Input(description=GROUND_PROMPT_HELP, default="", max_length=10000),
        scheduler: str = Input(
            description=SCHEDULER_HELP,
            default="DDIM",
            choices=[
                "DDIM",
                "DPMSolverMultistep",
                "HeunDiscrete",
                "KarrasDPM",
                "K_EULER_ANCESTRAL",
                "K_EULER",
                "PNDM",
                "LCM",
            ],
        ),
        image: Path | None = Input(description=IMAGE_HELP, default=None),
        mask: Path | None = Input(description=MASK_HELP, default=None),
        prompt_strength: float = Input(description=STRENGTH_HELP, default=0.8, ge=0, le=1),
        lora_weights: str | None = Input(
            description=LORA_WEIGHTS_HELP, default=None, max_length=2000
        ),
        lora_scale: float = Input(description=SCALE_HELP, default=1.0, ge=-1, le=3),
        extra_lora: str | None = Input(
            description="A second LoRA, given as lora_weights is, applied together with it.",
            default=None,
            max_length=2000,
        ),
        extra_lora_scale: float = Input(
            description="How strongly extra_lora is applied.", default=1.0, ge=-1, le=3
        ),
        cube_map: str = Input(
            description=MAP_HELP, default="none", choices=["none", "strip", "cross"]
        ),
        output_format: str = Input(
            description="File format of the panorama. Every input is saved in the file.",
            default="png",
            choices=["png", "webp", "jpg"],
        ),
        output_quality: int = Input(
            description="Quality of webp and jpg files, from 1 to 100 (png is lossless).",
            default=80,
            ge=1,
            le=100,
        ),
        # --- end of inputs ---
    ) -> Path:
        """Make one panorama file."""
        # Every input by its name, as the schema above lists them.
        return self.make_panorama(**{k: v for k, v in locals().items() if k != "self"})
