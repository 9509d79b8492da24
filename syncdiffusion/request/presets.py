"""What a few-step (distilled) model asks of a request that none of its configs says: its
defaults, by the hub repository its folder was downloaded from.

SD-Turbo and SDXL-Turbo were distilled to make a picture in 1 to 4 steps without classifier-free
guidance, with the scheduler their folders declare (Euler, and Euler ancestral, on "trailing"
timesteps). Their model cards ask for `guidance_scale=0.0` in diffusers, which there turns
guidance off: the prompt alone. This model keeps the published SyncDiffusion formula,
`eps_uncond + g * (eps_cond - eps_uncond)`, where the prompt alone is g = 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.schedulers import declared_scheduler
from ..models.folders import read_source

# A panorama needs a few steps where a picture needs one: the windows agree by averaging
# after each step, and the sync step pulls them together in the first ones.
_FEW_STEPS = {"num_inference_steps": 4, "guidance_scale": 1.0, "sync_threshold": 2}
FEW_STEP_MODELS = {
    "stabilityai/sd-turbo": _FEW_STEPS,
    "stabilityai/sdxl-turbo": _FEW_STEPS,
}
"""The few-step models' defaults by hub repository; the scheduler is their folder's own."""


def model_defaults(sd_dir: str | Path) -> dict[str, Any]:
    """The defaults a model folder's request takes beside the published ones: a few-step
    model's (`FEW_STEP_MODELS`, by the repository its download recorded), with the scheduler its
    folder declares; nothing for any other model."""
    source = read_source(sd_dir) or {}
    defaults = FEW_STEP_MODELS.get(source.get("repo_id"))
    if defaults is None:
        return {}
    config = Path(sd_dir) / "scheduler" / "scheduler_config.json"
    try:
        declared = declared_scheduler(json.loads(config.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        declared = None  # the folder's check names an unreadable config when it loads
    return {**defaults, **({"scheduler": declared} if declared else {})}
