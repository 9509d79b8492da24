"""The SyncDiffusion step: the LPIPS gradient that pulls every window towards the anchor
(when and how hard: `sync_schedule`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lpips
import torch

from .precision import LossScale
from .recompute import recomputing


def lpips_features(model: lpips.LPIPS, images: torch.Tensor) -> list[torch.Tensor]:
    """LPIPS v0.1's unit-normalised VGG features of images in [-1, 1], one tensor per layer.

    In the perceptual network's own dtype (fp32, see `precision`) whatever the images' dtype,
    and outside any autocast region, so the normalisation never runs in fp16.
    """
    dtype = next(model.parameters()).dtype
    with torch.autocast(images.device.type, enabled=False):
        features = model.net(model.scaling_layer(images.to(dtype)))
        return [lpips.normalize_tensor(f) for f in features]


def lpips_to_anchor(
    model: lpips.LPIPS, images: torch.Tensor, anchor_features: list[torch.Tensor]
) -> torch.Tensor:
    """LPIPS between each of `images` (n, 3, H, W) in [-1, 1] and the anchor, shape (n,).

    The same sum as `lpips.LPIPS.forward`, with the anchor's features computed once by the caller.
    """
    with torch.autocast(images.device.type, enabled=False):
        layers = zip(model.lins, lpips_features(model, images), anchor_features, strict=True)
        distance = sum(lin((f - a) ** 2).mean(dim=(2, 3), keepdim=True) for lin, f, a in layers)
        return distance.flatten()


# The clean latents DDIM predicts from views (n, 4, h, w) of the windows numbered by the second
# argument (which a ControlNet's condition crops follow).
PredictX0 = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


def sync_loss(
    views: torch.Tensor,
    windows: Sequence[int],
    predict_x0: PredictX0,
    decode: Callable[[torch.Tensor], torch.Tensor],
    model: lpips.LPIPS,
    anchor_features: list[torch.Tensor],
) -> torch.Tensor:
    """LPIPS(D(x0(x_v)), anchor) of each view (n, 4, h, w) of the windows numbered `windows`,
    shape (n,): the sync step's loss."""
    images = decode(predict_x0(views, windows))  # (n, 3, 512, 512) in [0, 1]
    return lpips_to_anchor(model, images * 2.0 - 1.0, anchor_features)


def scaled_sync_gradient(
    views: torch.Tensor,
    windows: Sequence[int],
    predict_x0: PredictX0,
    decode: Callable[[torch.Tensor], torch.Tensor],
    model: lpips.LPIPS,
    anchor_features: list[torch.Tensor],
    loss_scale: torch.Tensor,
    recompute: Sequence[torch.nn.Module] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """d LPIPS(D(x0(x_v)), anchor) / d x_v for each view, through the decoder and the UNet.

    Each view's loss is multiplied by its `loss_scale` (n,) for the backward pass, so that fp16
    gradients do not underflow, and its gradient divided by it again in fp32. Views never
    interact inside the networks, so one backward pass of the summed loss gives every view's
    own gradient. The layers in `recompute` keep only their inputs and run again in the backward
    (`recompute.recomputing`): the same gradient, in less memory. Returns the gradients
    (n, 4, h, w) in fp32 and the distances (n,); a view's gradient that overflowed is not finite.
    """
    views = views.detach().requires_grad_()
    scale = loss_scale.to(views.device, torch.float32)
    with torch.enable_grad(), recomputing(recompute):
        distance = sync_loss(views, windows, predict_x0, decode, model, anchor_features)
        (grad,) = torch.autograd.grad((distance * scale).sum(), views)
    unscale = (1 / loss_scale).to(views.device, torch.float32)
    return grad.float() * unscale.view(-1, *[1] * (grad.dim() - 1)), distance.detach()


def sync_gradient(
    views: torch.Tensor,
    windows: Sequence[int],
    predict_x0: PredictX0,
    decode: Callable[[torch.Tensor], torch.Tensor],
    model: lpips.LPIPS,
    anchor_features: list[torch.Tensor],
    loss_scale: LossScale,
    recompute: Sequence[torch.nn.Module] = (),
) -> torch.Tensor:
    """The sync gradient of `views` (n, 4, h, w), the windows numbered `windows`, in fp32, with
    the layers in `recompute` recomputed in the backward (`scaled_sync_gradient`).

    A view whose scaled gradient is not finite is redone alone at its lowered scale; one whose
    distance to the anchor is not finite cannot be helped by any scale and raises.
    """
    ids = torch.as_tensor(list(windows))
    grad = None
    todo = torch.arange(len(ids))  # positions in `views` still without a finite gradient
    x = views
    while len(todo):
        g, distance = scaled_sync_gradient(
            x,
            ids[todo].tolist(),
            predict_x0,
            decode,
            model,
            anchor_features,
            loss_scale.of(ids[todo]),
            recompute,
        )
        # One read back to the host per pass, which the loss scale needs: what is finite.
        near, finite = torch.stack([distance.isfinite(), g.flatten(1).isfinite().all(dim=1)]).cpu()
        if not near.all():
            bad = ids[todo][~near][0].item()
            raise FloatingPointError(
                f"the LPIPS distance of window {bad} to the anchor is not finite: the networks "
                "overflow in their precision; load the pipeline with dtype=torch.float32"
            )
        if grad is None and finite.all():
            return g  # every gradient finite at the first try: the usual case, nothing copied
        if grad is None:
            grad = torch.empty(views.shape, dtype=torch.float32, device=views.device)
        grad[todo[finite]] = g[finite]
        todo = todo[~finite]
        loss_scale.back_off(ids[todo].tolist())
        x = views[todo]
    return grad
