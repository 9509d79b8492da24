"""Layout control: a ControlNet and one condition image as large as the panorama (SyncControlNet).

Each window is guided by its own crop of the condition image, at every network call of that
window: the anchor's, the synced forward whose gradient the sync step takes (so the gradient
flows through the ControlNet too) and the denoising one. As the SyncDiffusion authors'
`pipeline_sync_controlnet.py` computes it: the image resized to the panorama (diffusers'
`VaeImageProcessor`, values in [0, 1]), the ControlNet run on the same latent input and text
as the UNet, its residuals multiplied by `controlnet_conditioning_scale` and added to the
UNet's, and the ControlNet switched off (scale 0) outside `control_guidance_start` to
`control_guidance_end`. A wrap window of a 360-degree panorama takes its crop across the
image's seam, as its latent view is taken across the latent's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ControlNetModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from .windows import Window, gather


def condition_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """The condition image as the ControlNet takes it: RGB, resized to `width` x `height`
    pixels (Lanczos, as diffusers' pipelines do), (1, 3, height, width) in [0, 1], fp32."""
    processor = VaeImageProcessor(do_convert_rgb=True, do_normalize=False)
    return processor.preprocess(image, height=height, width=width).to(torch.float32)


def image_record(image: Image.Image) -> dict[str, Any]:
    """What a file saves of a condition image: its size and the sha256 of its RGB pixels, so
    that the same picture is recognised whatever file format carried it."""
    rgb = image.convert("RGB")
    return {
        "sha256": hashlib.sha256(rgb.tobytes()).hexdigest(),
        "width": rgb.width,
        "height": rgb.height,
    }


class WindowControl:
    """The ControlNet's part in one network call: its condition crops for the views in the
    call and the step's conditioning scale."""

    def __init__(self, controlnet: ControlNetModel, crops: torch.Tensor, scale: float) -> None:
        self.controlnet, self.crops, self.scale = controlnet, crops, scale

    def residuals(
        self,
        sample: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None,
    ) -> dict[str, Any]:
        """The UNet's extra keyword arguments: the ControlNet's down- and mid-block residuals
        for `sample`, the classifier-free guidance batch [negatives, prompts] of the views."""
        crops = self.crops.to(sample.device, self.controlnet.dtype)
        down, mid = self.controlnet(
            sample.to(self.controlnet.dtype),
            t,
            encoder_hidden_states=encoder_hidden_states.to(self.controlnet.dtype),
            controlnet_cond=torch.cat([crops, crops]),
            conditioning_scale=self.scale,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


@dataclass(frozen=True)
class Control:
    """A ControlNet over a whole panorama: the network, the condition image resized to the
    panorama (1, 3, H, W) in [0, 1], the panorama's windows (latent pixels, `vae_scale_factor`
    image pixels each), and the conditioning scale between the start and end fractions of the
    steps."""

    controlnet: ControlNetModel
    image: torch.Tensor
    windows: Sequence[Window]
    vae_scale_factor: int
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def scale_at(self, step: int, steps: int) -> float:
        """The conditioning scale at step `step` of `steps`: 0 where `step / steps < start` or
        `(step + 1) / steps > end`, as diffusers' ControlNet pipelines keep it."""
        off = step / steps < self.start or (step + 1) / steps > self.end
        return 0.0 if off else self.scale

    def crops(self, ids: Sequence[int]) -> torch.Tensor:
        """The condition image under the windows numbered `ids`, (len(ids), 3, P, P)."""
        f = self.vae_scale_factor
        return gather(self.image, [self.windows[k].scaled(f) for k in ids])

    def at(self, step: int, steps: int, ids: Sequence[int]) -> WindowControl | None:
        """The ControlNet's part in a call for windows `ids` at `step`; None where its scale is
        0 there: zero residuals change nothing, so the ControlNet is not run."""
        scale = self.scale_at(step, steps)
        if scale == 0:
            return None
        return WindowControl(self.controlnet, self.crops(ids), scale)
