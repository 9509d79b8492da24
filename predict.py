"""Cog predictor: the published SyncDiffusion wrapper's inputs, mapped onto `SyncDiffusionPipeline`.

`cog build` reads the `Input(...)` fields below without running this file, so every default,
bound and description is one literal, or a module constant holding one: it publishes a string
as the source text between its quotes, so adjacent literals would be published with the quotes
and line break between them (tests/test_predict.py holds what it publishes to what Python
means). The literals are written from syncdiffusion/request/inputs.py between the marker
comments, by `python -m syncdiffusion.replicate.predictors`. A model whose windows differ has
its own predictor file with its own literals (predict_sdxl.py).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import shutil
import sys
import tempfile
import time

import torch
from cog import BaseRunner, Input, Path

from syncdiffusion import SyncDiffusionPipeline, WeightsError
from syncdiffusion.core.sphere import cube_map as cube_faces
from syncdiffusion.core.sphere import cube_picture
from syncdiffusion.models.folders import controlnet_folder_problem
from syncdiffusion.models.weights import (
    CONTROLNET_ENV,
    MODEL_ENV,
    controlnet_dir,
    default_weights_dir,
    download_controlnet,
    download_weights,
    hub_offline,
    missing_parts,
)
from syncdiffusion.request.condition_image import open_image
from syncdiffusion.request.image_file import save_image
from syncdiffusion.request.inputs import check_output

# --- input descriptions: written by python -m syncdiffusion.replicate.predictors ---
# From syncdiffusion/request/inputs.py: edit that, then run the command above.
# The descriptions too long for their line inside Input(...):
STRIDE_HELP = "Latent pixels between windows, a multiple of 8 under 64; smaller: smoother, slower."
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

try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: nothing to trim
    _libc = None


def return_memory() -> None:
    """Give what a prediction freed back to the system: cached CUDA blocks, and the heap glibc
    holds on to (without the trim the worker's RSS grew from 1.8 to 3.5 GiB over the first ten
    predictions of scripts/soak.py)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _libc is not None:
        _libc.malloc_trim(0)


class Predictor(BaseRunner):
    # The model folder under weights/ (None: stable-diffusion-2-base); $SYNCDIFFUSION_MODEL wins.
    MODEL: str | None = None
    # The ControlNet folder under weights/controlnet/, for a model laid out by a condition image.
    CONTROLNET: str | None = None

    def setup(self) -> None:
        """Make sure the weights are on disk (download once), then load them with no network."""
        # The library's notices (a prompt cut to 77 tokens) belong in the prediction's logs.
        notices = logging.getLogger("syncdiffusion")
        if not notices.handlers:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(message)s"))
            notices.addHandler(handler)
            notices.setLevel(logging.INFO)
            notices.propagate = False
        weights_dir, model = default_weights_dir(), os.environ.get(MODEL_ENV) or self.MODEL
        try:
            # HF_HUB_OFFLINE, read as huggingface_hub reads it: never download, only check.
            if missing_parts(weights_dir, model=model) and not hub_offline():
                download_weights(weights_dir, model=model)
            # A ControlNet model's ControlNet; $SYNCDIFFUSION_CONTROLNET wins.
            controlnet = self.CONTROLNET and (os.environ.get(CONTROLNET_ENV) or self.CONTROLNET)
            missing = controlnet and controlnet_folder_problem(
                controlnet_dir(weights_dir, controlnet)
            )
            if missing and not hub_offline():
                download_controlnet(weights_dir, controlnet)
            self.pipe = SyncDiffusionPipeline.from_pretrained(
                weights_dir, model=model, controlnet=controlnet
            )
            # A LoRA comes from the hub or an https URL, never from this machine's files.
            self.pipe.lora_local_files = False
        except WeightsError as error:
            # One clear message (path and fix) as the setup error, not a trace through loaders.
            raise WeightsError(str(error)) from None
        self.outputs = Path(tempfile.mkdtemp(prefix="syncdiffusion-"))

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
            default=2048,
            ge=512,
            le=4096,
        ),
        height: int = Input(
            description="Height in pixels, a multiple of 8. Higher than wide: a vertical panorama.",
            default=512,
            ge=512,
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
        stride: int = Input(description=STRIDE_HELP, default=16, ge=8, le=56),
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

    def make_panorama(
        self, output_format: str, output_quality: int, cube_map: str = "none", **inputs
    ) -> Path:
        """The panorama of the pipeline `inputs`, written as a file; `run` minus the schema.
        With `cube_map` ("strip" or "cross"), a whole sphere's file is its cube map instead."""
        check_output(output_format, output_quality, cube_map, inputs.get("sphere", False))
        # Read in full and checked here, so a bad upload fails with its name, not a trace.
        for name in ("control_image", "image", "mask"):
            if inputs.get(name) is not None:
                inputs[name] = open_image(inputs[name], name)
        seed = inputs["seed"]
        print(f"Using seed: {seed}")
        started = time.monotonic()

        def progress(state: dict) -> None:
            step, steps = state["step"] + 1, state["steps"]
            elapsed = time.monotonic() - started
            eta = elapsed / step * (steps - step)
            sync = " sync" if state["sync"] else ""
            print(f"step {step}/{steps}{sync}  elapsed {elapsed:.1f}s  eta {eta:.1f}s")

        try:
            image = self.pipe(**inputs, callback=progress)
        finally:
            # Succeeded, failed or cancelled: the worker goes back to where it was before.
            return_memory()
        # One output folder, emptied per prediction: a long-running server keeps one file at most.
        shutil.rmtree(self.outputs, ignore_errors=True)
        self.outputs.mkdir(parents=True)
        name, parameters, photo_sphere = "panorama", image.info["parameters"], None
        if cube_map != "none":
            # A game engine's skybox in one file: not equirectangular, so no photo-sphere XMP.
            image = cube_picture(cube_faces(image), cube_map)
            name, parameters = f"cube-{cube_map}", {**parameters, "cube_map": cube_map}
            photo_sphere = False
        path = self.outputs / f"{name}.{output_format}"
        save_image(image, path, parameters, output_format, output_quality, photo_sphere)
        return Path(path)
