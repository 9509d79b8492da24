"""Which networks and which arithmetic run in which floating-point type, and why.

The policy, in one place:

- **UNet, VAE and text encoders** run in the pipeline's `dtype`: fp16 on CUDA (half the memory
  and several times the speed of fp32 on tensor cores), fp32 on the CPU.
- **Except a VAE that must be upcast** (`vae_upcast`: SDXL's): it stays fp32 when `dtype` is
  fp16, because SDXL's VAE decoder overflows fp16 (its activations pass 65504 and the picture
  comes out black or NaN), as diffusers' own SDXL pipeline upcasts it. A fix-up VAE that is
  fp16-safe says `force_upcast: false` in its config (madebyollin's sdxl-vae-fp16-fix does):
  put it in the model folder's vae/ and it runs in fp16. SD 1.x/2.x VAEs run in fp16 whatever
  their config says, as in diffusers' Stable Diffusion pipeline. Latents are cast to the VAE's
  dtype on the way in, so the sync gradient flows through the fp32 decoder into the fp16 UNet.
- **The perceptual network (LPIPS on VGG16) and all its arithmetic** run in fp32 whatever
  `dtype` is: the scaling layer, the VGG features, `lpips.normalize_tensor` and the distances.
  `normalize_tensor` divides by `sqrt(sum(x**2)) + 1e-10`: in fp16 1e-10 is 0, so a position
  whose features are all zero after ReLU gives 0/0 = NaN, and a sum of squares above 65504 is
  inf, which zeroes that position's features. One NaN in the anchor's features would reach
  every view's gradient and then the panorama. The published wrapper ran under autocast,
  where these reductions are fp32 too. The decoded images are cast to fp32 on the way in.
- **The latent panorama, the scheduler's arithmetic and the sync gradient's update** stay
  fp32 (the latent is drawn in fp32 and networks' outputs are promoted when combined with it;
  a scheduler other than DDIM steps on the windows' mean output, taken in fp32, so its history
  is fp32 and Euler's step, which casts its result to the output's dtype, returns fp32).
- **The sync backward is loss-scaled** in fp16. LPIPS averages over every pixel of a 512x512
  window, so the gradient reaching each fp16 pixel is of order 1e-6 or less: subnormal or
  zero in fp16 (smallest normal 6.1e-5) before it has gone back through the VAE decoder and
  the UNet. Each window's loss is multiplied by its own scale before the backward pass and
  the gradient is divided by it again in fp32, as `torch.amp.GradScaler` does; a window whose
  gradient is not finite is redone at a lower scale, never used. The scale is per window, so
  a window's gradient does not depend on which other windows share its chunk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..models.family import SDXL, Family

PERCEPTUAL_DTYPE = torch.float32

# GradScaler's initial scale: a 1e-6 pixel gradient becomes about 0.07, far from both ends of
# fp16's range.
FP16_LOSS_SCALE = 2.0**16
# A window whose scaled gradient overflows is redone at a sixteenth of its scale (GradScaler
# halves, but it has thousands of steps to settle; here each retry is a whole extra pass).
BACKOFF = 1 / 16
# Below this even the unscaled gradient overflows fp16: no scale can help.
MIN_LOSS_SCALE = 2.0**-8


def vae_upcast(vae_config: Mapping[str, Any], family: Family) -> bool:
    """Whether the VAE must run in fp32 under fp16 networks, as diffusers' pipelines decide:
    SDXL's as its config's `force_upcast` says (a file without the key: true), SD 1.x/2.x's
    never (diffusers' SD pipeline ignores the key, which any VAE saved by diffusers 0.19 or
    later carries, true by default; their decoders are fp16-safe).

    `vae_config` is the file as written: a model built from it fills a missing key with true."""
    return family is SDXL and bool(vae_config.get("force_upcast", True))


def vae_dtype(dtype: torch.dtype, force_upcast: bool) -> torch.dtype:
    """The VAE's dtype when the other networks run in `dtype` (see the policy above)."""
    return torch.float32 if dtype == torch.float16 and force_upcast else dtype


def initial_loss_scale(dtype: torch.dtype) -> float:
    """The sync backward's starting loss scale for networks in `dtype` (1 where none is needed).

    bf16 and fp32 have fp32's exponent range, so their gradients do not underflow.
    """
    return FP16_LOSS_SCALE if dtype == torch.float16 else 1.0


class LossScale:
    """One dynamic loss scale per window for a panorama's sync backward passes.

    A window keeps the scale that last worked for it across the sync steps of one panorama;
    there is no growth, since a panorama has only a few sync steps (5 by default).
    `back_offs` counts the scales lowered so far, one per window each time: every one cost
    that window a second backward pass.
    """

    def __init__(self, n_windows: int, initial: float) -> None:
        self.initial = initial
        self.scales = torch.full((n_windows,), initial, dtype=torch.float64)
        self.back_offs = 0

    def of(self, windows: torch.Tensor) -> torch.Tensor:
        """The current scales of `windows` (window numbers), shape (len(windows),)."""
        return self.scales[windows]

    def back_off(self, windows: Sequence[int]) -> None:
        """Lower the scale of `windows`, whose scaled gradient was not finite.

        Raises FloatingPointError when a window is already at the lowest scale (or was never
        scaled: fp32 and bf16 gradients that are not finite are not an underflow problem).
        """
        windows = list(windows)
        if not windows:
            return
        stuck = [k for k in windows if self.initial == 1.0 or self.scales[k] <= MIN_LOSS_SCALE]
        if stuck:
            raise FloatingPointError(
                f"the sync gradient of window {stuck[0]} is not finite even at loss scale "
                f"{self.scales[stuck[0]].item():g}; the networks overflow in their precision: "
                "load the pipeline with dtype=torch.float32"
            )
        self.scales[windows] *= BACKOFF
        self.back_offs += len(windows)
