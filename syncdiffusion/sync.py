"""The SyncDiffusion step: when to sync, how hard, and the LPIPS gradient towards the anchor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import lpips
import torch


@dataclass(frozen=True)
class SyncSchedule:
    """Which denoising steps run the gradient step, and its weight `weight * decay_rate ** i`."""

    weight: float
    decay_rate: float
    freq: int
    threshold: int

    def active(self, step: int) -> bool:
        """Every `freq`-th step (counting from 1) among the first `threshold` steps."""
        return (step + 1) % self.freq == 0 and step < self.threshold

    def weight_at(self, step: int) -> float:
        """The exponentially decayed gradient weight of step `step` (SyncDiffusion, Sec. 4)."""
        return self.weight * self.decay_rate**step


def lpips_features(model: lpips.LPIPS, images: torch.Tensor) -> list[torch.Tensor]:
    """LPIPS v0.1's unit-normalised VGG features of images in [-1, 1], one tensor per layer."""
    return [lpips.normalize_tensor(f) for f in model.net(model.scaling_layer(images))]


def lpips_to_anchor(
    model: lpips.LPIPS, images: torch.Tensor, anchor_features: list[torch.Tensor]
) -> torch.Tensor:
    """LPIPS between each of `images` (n, 3, H, W) in [-1, 1] and the anchor, shape (n,).

    The same sum as `lpips.LPIPS.forward`, with the anchor's features computed once by the caller.
    """
    layers = zip(model.lins, lpips_features(model, images), anchor_features, strict=True)
    distance = sum(lin((f - a) ** 2).mean(dim=(2, 3), keepdim=True) for lin, f, a in layers)
    return distance.flatten()


def sync_gradient(
    views: torch.Tensor,
    predict_x0: Callable[[torch.Tensor], torch.Tensor],
    decode: Callable[[torch.Tensor], torch.Tensor],
    model: lpips.LPIPS,
    anchor_features: list[torch.Tensor],
) -> torch.Tensor:
    """d LPIPS(D(x0(x_v)), anchor) / d x_v for each view, through the decoder and the UNet.

    Views never interact inside the networks, so one backward pass of the summed loss gives
    every view's own gradient.
    """
    views = views.detach().requires_grad_()
    with torch.enable_grad():
        images = decode(predict_x0(views))  # (n, 3, 512, 512) in [0, 1]
        loss = lpips_to_anchor(model, images * 2.0 - 1.0, anchor_features).sum()
        (grad,) = torch.autograd.grad(loss, views)
    return grad
