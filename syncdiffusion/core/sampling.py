"""The joint-diffusion sampling loop: every view denoised in batches, synced at the first steps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lpips
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from .chunks import run_in_chunks
from .control import Control, WindowControl
from .precision import LossScale
from .recompute import Recomputation
from .sync import PredictX0, lpips_features, sync_gradient
from .sync_schedule import SyncSchedule
from .windows import Window, anchor_index, gather, scatter_add

Callback = Callable[[dict[str, Any]], None]
# The guided noise prediction of views at a timestep, with the ControlNet's part in the call.
Eps = Callable[[torch.Tensor, torch.Tensor, WindowControl | None], torch.Tensor]


def _pair(conditions: torch.Tensor, n: int) -> torch.Tensor:
    """[negative, prompt] rows (2, ...) repeated for n views: (2n, ...), negatives first."""
    uncond, cond = conditions.chunk(2)
    return torch.cat([uncond.expand(n, *uncond.shape[1:]), cond.expand(n, *cond.shape[1:])])


def guided_eps(
    unet: UNet2DConditionModel,
    views: torch.Tensor,
    t: torch.Tensor,
    control: WindowControl | None = None,
    *,
    text_embeddings: torch.Tensor,
    guidance_scale: float,
    added_conditions: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Classifier-free guided eps (the model's own output: noise, or v for v-prediction) of views
    (n, 4, s, s); `text_embeddings` (2, 77, D) and each of `added_conditions` (SDXL's pooled
    text and size/crop numbers, (2, ...)) hold [negative, prompt]. With `control`, the
    ControlNet's residuals for the views' condition crops join the UNet's, in both halves."""
    n = views.shape[0]
    added = {k: _pair(v, n) for k, v in (added_conditions or {}).items()} or None
    sample, text = torch.cat([views, views]).to(unet.dtype), _pair(text_embeddings, n)
    residuals = {} if control is None else control.residuals(sample, t, text, added)
    eps = unet(sample, t, encoder_hidden_states=text, added_cond_kwargs=added, **residuals).sample
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def window_time_ids(window_pixels: int, n_prompts: int = 2) -> torch.Tensor:
    """SDXL's size and crop conditioning of every window, (n_prompts, 6): original size, crop
    top-left, target size, as `StableDiffusionXLPipeline._get_add_time_ids` orders them.

    Every window is conditioned as a whole, uncropped `window_pixels`-square picture, crop
    (0, 0): SDXL learned from crop coordinates where a picture's subject was cut off, and a
    window's offset in the panorama would ask each window for a cut-off picture. The same
    numbers for every window also keep the windows interchangeable, as the sync step assumes.
    """
    ids = [window_pixels, window_pixels, 0, 0, window_pixels, window_pixels]
    return torch.tensor([ids] * n_prompts, dtype=torch.float32)


def predict_x0(
    scheduler: DDIMScheduler,
    eps: Eps,
    t: torch.Tensor,
    x: torch.Tensor,
    control: WindowControl | None = None,
) -> torch.Tensor:
    """The clean latent that DDIM predicts from views `x` at timestep `t`."""
    return scheduler.step(eps(x, t, control), t, x).pred_original_sample


def x0_predictor(
    scheduler: DDIMScheduler, eps: Eps, t: torch.Tensor, control: WindowControl | None = None
) -> PredictX0:
    """`predict_x0` at `t` as the sync step calls it (views, their window numbers), with one
    `control` whatever the windows: for measuring a window, not for sampling a panorama."""
    return lambda x, _windows: predict_x0(scheduler, eps, t, x, control)


def denoise_views(
    views: torch.Tensor,
    step: int,
    t: torch.Tensor,
    *,
    timestep: int,
    anchor: int,
    eps: Eps,
    scheduler: DDIMScheduler,
    decode: Callable[[torch.Tensor], torch.Tensor],
    perceptual: lpips.LPIPS,
    sync: SyncSchedule,
    loss_scale: LossScale,
    view_batch_size: int,
    plain_batch_size: int | None = None,
    recompute: Recomputation | None = None,
    control: Control | None = None,
) -> tuple[torch.Tensor, int, int]:
    """One DDIM step of every view (n, 4, s, s), after the sync gradient step when it is due.

    `t` is the step's timestep on the views' device, for the UNet, and `timestep` the same as a
    Python int, for DDIM's arithmetic on its host tables: neither is copied per chunk. Chunks
    of views are contiguous slices, so a step waits on the device only where the sync step must
    read back whether its gradients are finite.
    Views go through the sync step's forward and backward `view_batch_size` at a time, and
    through the denoising, which keeps nothing for a backward, `plain_batch_size` at a time
    (default the same), synced or not.
    `recompute`: what the sync backward recomputes, and what it falls back to when one window
    does not fit (`recompute.Recomputation`; default: nothing). `control`: the
    ControlNet, which every call of a view runs with the view's condition crop.
    Returns the denoised views and the two chunk sizes that fitted.
    """
    plain_batch_size = plain_batch_size or view_batch_size
    steps = len(scheduler.timesteps)
    recompute = recompute or Recomputation()

    def control_of(ids: Sequence[int]) -> WindowControl | None:
        return None if control is None else control.at(step, steps, ids)

    def denoise(x: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
        with torch.no_grad():
            noise = eps(x, t, control_of(ids))
            return scheduler.step(noise, timestep, x).prev_sample.to(views.dtype)

    if not sync.active(step):
        denoised = torch.empty_like(views)

        def plain(rows: range) -> None:
            denoised[rows.start : rows.stop] = denoise(views[rows.start : rows.stop], rows)

        return denoised, view_batch_size, run_in_chunks(plain, range(len(views)), plain_batch_size)

    with torch.no_grad():
        x_anchor = views[anchor : anchor + 1]
        anchor_step = scheduler.step(eps(x_anchor, t, control_of([anchor])), timestep, x_anchor)
        # The anchor is never moved, so this eps is also the one of its denoising step.
        anchor_denoised = anchor_step.prev_sample.to(views.dtype)
        anchor_image = decode(anchor_step.pred_original_sample)
        anchor_features = lpips_features(perceptual, anchor_image * 2 - 1)
    weight = sync.weight_at(step)

    def x0(x: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
        return scheduler.step(eps(x, t, control_of(ids)), timestep, x).pred_original_sample

    # The other views side by side, so that each chunk is a slice of them.
    others = torch.cat([views[:anchor], views[anchor + 1 :]])
    numbers = [k for k in range(len(views)) if k != anchor]
    synced, moved = torch.empty_like(others), torch.empty_like(others)

    def sync(rows: range) -> None:
        x, ids = others[rows.start : rows.stop], numbers[rows.start : rows.stop]
        grad = sync_gradient(
            x, ids, x0, decode, perceptual, anchor_features, loss_scale, recompute.layers
        )
        synced[rows.start : rows.stop] = x - weight * grad.to(x.dtype)

    def denoise_synced(rows: range) -> None:
        ids = numbers[rows.start : rows.stop]
        moved[rows.start : rows.stop] = denoise(synced[rows.start : rows.stop], ids)

    batch = run_in_chunks(sync, range(len(others)), view_batch_size, recompute.fall_back)
    plain_batch = run_in_chunks(denoise_synced, range(len(others)), plain_batch_size)
    return torch.cat([moved[:anchor], anchor_denoised, moved[anchor:]]), batch, plain_batch


def sample_panorama(
    latent: torch.Tensor,
    windows: list[Window],
    *,
    eps: Eps,
    scheduler: DDIMScheduler,
    decode: Callable[[torch.Tensor], torch.Tensor],
    perceptual: lpips.LPIPS,
    sync: SyncSchedule,
    view_batch_size: int,
    plain_batch_size: int | None = None,
    recompute: Recomputation | None = None,
    initial_loss_scale: float = 1.0,
    control: Control | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Denoise a panorama latent (1, 4, H', W') over `scheduler.timesteps` (SyncDiffusion, Alg. 1).

    `eps(views, t, control)` is the guided noise prediction (with `control`'s ControlNet
    where given: `control.Control`) and `decode` the VAE decode to [0, 1];
    views go through the sync step's forward and backward `view_batch_size` at a time and
    through the denoising, which keeps nothing for a backward, `plain_batch_size` at a time
    (default the same); a chunk that runs out of memory is halved, and each kind of chunk goes
    on from the size that fitted it.
    `recompute` says what the sync backward recomputes (default: nothing, every activation
    kept) and what it falls back to. `initial_loss_scale` starts every
    window's loss scale for the sync backward (`precision`): 1 for fp32 networks. `callback`
    gets each step's state, with the chunk size that fitted (`view_batch_size`), which
    measurements of memory read, whether a synced step recomputed and why, and the windows'
    loss-scale back-offs so far.
    """
    recompute = recompute or Recomputation()
    anchor = anchor_index(windows)
    loss_scale = LossScale(len(windows), initial_loss_scale)
    steps = len(scheduler.timesteps)
    batch_sizes = {True: view_batch_size, False: plain_batch_size or view_batch_size}
    # Every timestep goes to the device, and to Python ints, once for the whole loop.
    on_device, timesteps = scheduler.timesteps.to(latent.device), scheduler.timesteps.tolist()
    for i, (t, timestep) in enumerate(zip(on_device, timesteps, strict=True)):
        synced = sync.active(i)
        denoised, batch_sizes[True], batch_sizes[False] = denoise_views(
            gather(latent, windows),
            i,
            t,
            timestep=timestep,
            anchor=anchor,
            eps=eps,
            scheduler=scheduler,
            decode=decode,
            perceptual=perceptual,
            sync=sync,
            loss_scale=loss_scale,
            view_batch_size=batch_sizes[True],
            plain_batch_size=batch_sizes[False],
            recompute=recompute,
            control=control,
        )
        value = torch.zeros_like(latent)
        count = torch.zeros_like(latent)
        scatter_add(value, count, windows, denoised)
        latent = torch.where(count > 0, value / count, value)
        if callback is not None:
            callback(
                {
                    "step": i,
                    "steps": steps,
                    "t": t,
                    "sync": synced,
                    "latent": latent,
                    "view_batch_size": batch_sizes[synced],
                    "recompute": synced and recompute.active,
                    "recompute_reason": recompute.reason if synced else "",
                    "loss_scale_back_offs": loss_scale.back_offs,
                }
            )
    return latent
