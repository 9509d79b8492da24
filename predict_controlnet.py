"""Cog predictor for panoramas laid out by a condition image: predict.py's inputs on Stable
Diffusion 1.5 with the canny ControlNet, the SyncDiffusion authors' SyncControlNet set-up.

Publish it with `run: "predict_controlnet.py:Predictor"` in cog.yaml (docs/replicate.md). An
edge map (white edges on black) as large as the panorama lays it out: a 3072x512 map with no
size given makes a 3072x512 panorama. `cog build` reads the `Input(...)` fields without running
this file, so they are literals here too, written from the library's description by
`python -m syncdiffusion.replicate.predictors`; the descriptions too long for one line are
module constants.
"""

from __future__ import annotations

from cog import Input, Path

import predict

# --- input descriptions: written by python -m syncdiffusion.replicate.predictors ---
# From syncdiffusion/request/inputs.py: edit that, then run the command above.
# The descriptions too long for their line inside Input(...):
CONTROL_IMAGE_HELP = "The layout: a condition image for the ControlNet (an edge map, a QR code), stretched over the whole panorama. Without a size, the panorama takes its size."  # noqa: E501
GUIDANCE_START_HELP = "Fraction of the denoising steps after which the ControlNet starts steering."
GUIDANCE_END_HELP = "Fraction of the denoising steps after which the ControlNet stops steering."
WIDTH_HELP = "Width in pixels, a multiple of 8, or 0 for the control image's. Wider than high: a horizontal panorama."  # noqa: E501
HEIGHT_HELP = "Height in pixels, a multiple of 8, or 0 for the control image's. Higher than wide: a vertical panorama."  # noqa: E501
STRIDE_HELP = "Latent pixels between windows, a multiple of 8 under 64; smaller: smoother, slower."
SCHEDULER_HELP = "The sampler: DDIM, the published one, or another; KarrasDPM is DPM++ 2M Karras."
IMAGE_HELP = "A picture to start from: restyled, upscaled, or extended if its proportions differ."
MASK_HELP = "Which part of image to make anew (white) and which to keep (black); needs image."
STRENGTH_HELP = "How much of image is made anew: 1 makes it all from noise, lower keeps more of it."
LORA_WEIGHTS_HELP = "A LoRA: a Hugging Face repo (owner/name, optionally /file.safetensors) or an https URL of a .safetensors file."  # noqa: E501
SCALE_HELP = "How strongly lora_weights is applied: 0 leaves the model as it is, 1 is as trained."
# --- end of input descriptions ---


class Predictor(predict.Predictor):
    MODEL = "stable-diffusion-v1-5"
    CONTROLNET = "sd-controlnet-canny"

    def run(
        self,
        # --- inputs: written by python -m syncdiffusion.replicate.predictors ---
        # From syncdiffusion/request/inputs.py: edit that, then run the command above.
        prompt: str = Input(description="What the panorama shows.", max_length=10000),
        negative_prompt: str = Input(
            description="What the panorama should not show.", default="", max_length=10000
        ),
        control_image: Path = Input(description=CONTROL_IMAGE_HELP),
        controlnet_conditioning_scale: float = Input(
            description="How strongly the condition image steers the picture; 0 ignores it.",
            default=1.0,
            ge=0,
            le=2,
        ),
        control_guidance_start: float = Input(
            description=GUIDANCE_START_HELP, default=0.0, ge=0, le=1
        ),
        control_guidance_end: float = Input(description=GUIDANCE_END_HELP, default=1.0, ge=0, le=1),
        width: int = Input(description=WIDTH_HELP, default=0, ge=0, le=4096),
        height: int = Input(description=HEIGHT_HELP, default=0, ge=0, le=4096),
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
        stride: int = Input(description=STRIDE_HELP, default=16, ge=8, le=56),
        seed: int = Input(
            description="Random seed: the same seed gives the same panorama.", default=2, ge=0
        ),
        loop_closure: bool = Input(
            description="Make a 360-degree panorama: the right edge continues into the left edge.",
            default=False,
        ),
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
        """Make one panorama file, laid out by `control_image`."""
        # Every input by its name, as the schema above lists them.
        return self.make_panorama(**{k: v for k, v in locals().items() if k != "self"})
