"""The joint-diffusion sampling loop: every view denoised in batches, synced at the first steps."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import lpips
import torch
from diffusers import UNet2DConditionModel

from .chunks import run_in_chunks
from .control import Control, WindowControl
from .init_image import KeptRegion, MaskedImage
from .precision import LossScale
from .recompute import Recomputation
from .schedulers import X0, Scheduler, clean_latent, evaluations, per_view
from .sync import PredictX0, lpips_features, sync_gradient
from .sync_schedule import SyncSchedule
from .windows import Window, anchor_index, blend, gather

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
    (n, C, s, s: the latent's 4 channels, an inpainting UNet's 9); `text_embeddings` (2, 77, D)
    and each of `added_conditions` (SDXL's pooled text and size/crop numbers, (2, ...)) hold
    [negative, prompt]. With `control`, the ControlNet's residuals for the views' condition
    crops join the UNet's, in both halves."""
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


def x0_predictor(
    scheduler: Scheduler,
    eps: Eps,
    t: torch.Tensor,
    control: WindowControl | None = None,
    k: int = 0,
) -> PredictX0:
    """The clean latent `scheduler` predicts from views at its evaluation `k` (timestep `t`), as
    the sync step calls it (views, their window numbers), with one `control` whatever the
    windows: for measuring a window, not for sampling a panorama."""
    x0 = clean_latent(scheduler, k)
    return lambda x, _windows: x0(x, eps(scheduler.scale_model_input(x, t), t, control))


# The model's output for views (n, 4, s, s) of the windows numbered by the second argument.
ModelOutput = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


class _Rows:
    """A tensor filled chunk by chunk, made in the first chunk's dtype (the network's output)."""

    def __init__(self, n: int) -> None:
        self.n, self.tensor = n, None

    def put(self, rows: range, value: torch.Tensor) -> None:
        if self.tensor is None:
            self.tensor = value.new_empty((self.n, *value.shape[1:]))
        self.tensor[rows.start : rows.stop] = value


class AnchorImages:
    """A panorama's anchor window's predicted clean image (decoded, in [0, 1]) at each of its
    synced steps, kept (`keep`) for other panoramas to be synced to at the same steps (`at`):
    a whole sphere's caps are pulled towards its band's anchor, as the band's windows are."""

    def __init__(self) -> None:
        self.images: dict[int, torch.Tensor] = {}

    def keep(self, step: int, image: torch.Tensor) -> None:
        self.images[step] = image

    def at(self, step: int) -> torch.Tensor | None:
        return self.images.get(step)


def denoise_views(
    views: torch.Tensor,
    *,
    anchor: int,
    model_output: ModelOutput,
    x0: X0 | None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None,
    perceptual: lpips.LPIPS | None,
    weight: float | None,
    loss_scale: LossScale | None,
    view_batch_size: int,
    plain_batch_size: int | None = None,
    recompute: Recomputation | None = None,
    anchor_image: torch.Tensor | None = None,
    keep_anchor: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The model's output for every view (n, 4, s, s), after the sync gradient step moved them
    towards the anchor with `weight` (None: no sync step at this evaluation).

    The anchor is view `anchor`, which stays where it is, and its predicted clean image, which
    `keep_anchor` gets; or, where `anchor_image` is given (another panorama's, (1, 3, H, W) in
    [0, 1]), that image, and then every view is moved towards it.

    `model_output(x, ids)` is the guided prediction for views of the windows numbered `ids`
    (the ControlNet's crops follow them), `x0(x, output)` the scheduler's clean latent.
    Chunks of views are contiguous slices, so an evaluation waits on the device only where the
    sync step must read back whether its gradients are finite. Views go through the sync step's
    forward and backward `view_batch_size` at a time, and through the plain prediction, which
    keeps nothing for a backward, `plain_batch_size` at a time (default the same).
    `recompute`: what the sync backward recomputes, and what it falls back to when one window
    does not fit (`recompute.Recomputation`; default: nothing).
    Returns the views as the sync step left them, the model's outputs and the two chunk sizes
    that fitted.
    """
    plain_batch_size = plain_batch_size or view_batch_size
    recompute = recompute or Recomputation()

    def predict(x: torch.Tensor, numbers: Sequence[int]) -> tuple[int, torch.Tensor]:
        outputs = _Rows(len(x))

        def plain(rows: range) -> None:
            with torch.no_grad():
                ids = numbers[rows.start : rows.stop]
                outputs.put(rows, model_output(x[rows.start : rows.stop], ids))

        return run_in_chunks(plain, range(len(x)), plain_batch_size), outputs.tensor

    if weight is None:
        plain_batch, outputs = predict(views, range(len(views)))
        return views, outputs, view_batch_size, plain_batch

    held = anchor_image is None  # the anchor is one of the views, held where it is
    with torch.no_grad():
        if held:
            x_anchor = views[anchor : anchor + 1]
            # The anchor is never moved, so this output is also the one of its denoising.
            anchor_output = model_output(x_anchor, [anchor])
            anchor_image = decode(x0(x_anchor, anchor_output))
            if keep_anchor is not None:
                keep_anchor(anchor_image)
        anchor_features = lpips_features(perceptual, anchor_image * 2 - 1)

    if held and len(views) == 1:  # the anchor alone: nothing to pull towards it
        return views, anchor_output, view_batch_size, plain_batch_size

    def predict_x0(x: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
        return x0(x, model_output(x, ids))

    # The views that move side by side, so that each chunk is a slice of them.
    others = torch.cat([views[:anchor], views[anchor + 1 :]]) if held else views
    numbers = [k for k in range(len(views)) if not (held and k == anchor)]
    synced = torch.empty_like(others)

    def sync(rows: range) -> None:
        x, ids = others[rows.start : rows.stop], numbers[rows.start : rows.stop]
        grad = sync_gradient(
            x, ids, predict_x0, decode, perceptual, anchor_features, loss_scale, recompute.layers
        )
        synced[rows.start : rows.stop] = x - weight * grad.to(x.dtype)

    batch = run_in_chunks(sync, range(len(others)), view_batch_size, recompute.fall_back)
    plain_batch, outputs = predict(synced, numbers)
    if not held:
        return synced, outputs, batch, plain_batch
    moved = torch.cat([synced[:anchor], x_anchor, synced[anchor:]])
    outputs = torch.cat([outputs[:anchor], anchor_output.to(outputs.dtype), outputs[anchor:]])
    return moved, outputs, batch, plain_batch


def sample_panorama(
    latent: torch.Tensor,
    windows: list[Window],
    *,
    eps: Eps,
    scheduler: Scheduler,
    decode: Callable[[torch.Tensor], torch.Tensor],
    perceptual: lpips.LPIPS,
    sync: SyncSchedule,
    view_batch_size: int,
    plain_batch_size: int | None = None,
    recompute: Recomputation | None = None,
    initial_loss_scale: float = 1.0,
    control: Control | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    start: int = 0,
    kept: KeptRegion | None = None,
    masked: MaskedImage | None = None,
    lead: AnchorImages | None = None,
    follow: AnchorImages | None = None,
) -> torch.Tensor:
    """Denoise a panorama latent (1, 4, H', W') over `scheduler.timesteps` (SyncDiffusion, Alg. 1).

    `eps(views, t, control)` is the guided model output (with `control`'s ControlNet where
    given: `control.Control`) and `decode` the VAE decode to [0, 1]. At each network evaluation
    every view is predicted; at the first evaluation of a synced step the views are first
    moved by the sync gradient step. DDIM then steps each view and the panorama is their mean
    (the published algorithm); any other scheduler steps once on the whole latent, from the
    views' mean output and, after a sync step, their mean moved sample, so its state (a
    multistep solver's history, Heun's half-step) is the panorama's (`schedulers`); ancestral
    noise comes from `generator`, once per step for the whole panorama.
    Views go through the sync step's forward and backward `view_batch_size` at a time and
    through the plain prediction `plain_batch_size` at a time (default the same); a chunk that
    runs out of memory is halved, and each kind of chunk goes on from the size that fitted it.
    `recompute` says what the sync backward recomputes (default: nothing, every activation
    kept) and what it falls back to. `initial_loss_scale` starts every window's loss scale for
    the sync backward (`precision`): 1 for fp32 networks. `callback` gets each completed step's
    state, with the chunk size that fitted (`view_batch_size`), which measurements of memory
    read, whether a synced step recomputed and why, and the windows' loss-scale back-offs so far.
    A panorama that starts from an image (`init_image`) starts at evaluation `start` (the sync
    schedule, the ControlNet's and the callback count the steps from there); with `kept`, the
    kept region is held to the image after every evaluation and its best-covered window is the
    anchor. With `masked` (an inpainting UNet's), every network call takes its windows' crops of
    the mask and the masked image's latent beside the views, and its best-covered window is the
    anchor. `lead` keeps the anchor's predicted clean image at each synced step (counted from
    `start`); at a synced step where `follow` holds one, every window is pulled towards that
    image instead of towards a window of its own.
    """
    recompute = recompute or Recomputation()
    region = kept or masked
    anchor = anchor_index(windows) if region is None else region.anchor(windows)
    loss_scale = LossScale(len(windows), initial_loss_scale)
    plan = evaluations(scheduler)[start:]
    first_step = plan[0].step
    steps = plan[-1].step + 1 - first_step
    batch_sizes = {True: view_batch_size, False: plain_batch_size or view_batch_size}
    step_kwargs = {"generator": generator} if _takes_generator(scheduler) else {}
    # Every timestep goes to the device, and to Python ints, once for the whole loop.
    on_device, timesteps = scheduler.timesteps.to(latent.device), scheduler.timesteps.tolist()
    for k, (t, evaluation) in enumerate(zip(on_device[start:], plan, strict=True), start=start):
        step = evaluation.step - first_step
        synced = evaluation.first and sync.active(step)

        moved, outputs, batch_sizes[True], batch_sizes[False] = denoise_views(
            gather(latent, windows),
            anchor=anchor,
            model_output=_model_output(eps, scheduler, control, k, t, step, steps, masked),
            x0=clean_latent(scheduler, k) if synced else None,
            decode=decode,
            perceptual=perceptual,
            weight=sync.weight_at(step) if synced else None,
            loss_scale=loss_scale,
            view_batch_size=batch_sizes[True],
            plain_batch_size=batch_sizes[False],
            recompute=recompute,
            anchor_image=follow.at(step) if synced and follow is not None else None,
            keep_anchor=partial(lead.keep, step) if lead is not None else None,
        )
        if per_view(scheduler):
            denoised = scheduler.step(outputs, timesteps[k], moved).prev_sample
            latent = blend(latent, windows, denoised.to(latent.dtype))
        else:
            # The views' mean in fp32, so the scheduler's state and the latent stay fp32.
            sample = blend(latent, windows, moved) if synced else latent
            output = blend(latent, windows, outputs.to(latent.dtype))
            latent = scheduler.step(output, scheduler.timesteps[k], sample, **step_kwargs)
            latent = latent.prev_sample.to(sample.dtype)
        if kept is not None:
            latent = kept.hold(latent, scheduler, k)
        if callback is not None and evaluation.last:
            step_synced = sync.active(step)  # at its first evaluation, which may be this one
            callback(
                {
                    "step": step,
                    "steps": steps,
                    "t": t,
                    "sync": step_synced,
                    "latent": latent,
                    "view_batch_size": batch_sizes[step_synced],
                    "recompute": step_synced and recompute.active,
                    "recompute_reason": recompute.reason if step_synced else "",
                    "loss_scale_back_offs": loss_scale.back_offs,
                }
            )
    return latent


def _model_output(
    eps: Eps,
    scheduler: Scheduler,
    control: Control | None,
    k: int,
    t: torch.Tensor,
    step: int,
    steps: int,
    masked: MaskedImage | None = None,
) -> ModelOutput:
    """The guided model output at evaluation `k` (timestep `t` on the views' device) of step
    `step` of `steps`: the views scaled as the scheduler's model expects them
    (`scale_model_input`: Euler's sqrt(sigma**2 + 1), nothing for DDIM), the ControlNet's crops
    of the windows numbered `ids` where it steers at that step, and an inpainting UNet's crops
    of the mask and the masked image's latent joined to the scaled views (`masked`)."""
    timestep = scheduler.timesteps[k]

    def output(x: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
        window_control = None if control is None else control.at(step, steps, ids)
        x = scheduler.scale_model_input(x, timestep)
        return eps(x if masked is None else masked.inputs(x, ids), t, window_control)

    return output


def _takes_generator(scheduler: Scheduler) -> bool:
    """Whether `scheduler.step` draws noise from a `generator` (the ancestral ones)."""
    return "generator" in inspect.signature(scheduler.step).parameters
