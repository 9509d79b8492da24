"""The samplers a panorama can take: diffusers' schedulers by the names Replicate's image models
use, what each asks of the sampling loop, and the clean latent each predicts for the sync step.

A scheduler's state (a multistep solver's earlier outputs, Heun's first half-step, PNDM's
counter) belongs to the panorama: the loop averages what the windows predict into one
panorama-level model output and steps the scheduler once per network evaluation on the whole
latent. For the deterministic schedulers this is MultiDiffusion's per-view average exactly (up to
float rounding), since their updates are linear in the sample and the model output with
coefficients that depend only on the step. DDIM keeps its per-view step, which is stateless and
elementwise: the published algorithm's arithmetic, to the bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

# Each name's diffusers class and what its config is given on top of the model's. KarrasDPM is
# DPM++ 2M with Karras sigmas; PNDM skips its Runge-Kutta warm-up, as Stable Diffusion's own
# configs ask, so that it makes one network call per step after the first. Classes by name: the
# request's checks read the names without loading diffusers.
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIM": ("DDIMScheduler", {}),
    "DPMSolverMultistep": ("DPMSolverMultistepScheduler", {}),
    "HeunDiscrete": ("HeunDiscreteScheduler", {}),
    "KarrasDPM": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "K_EULER_ANCESTRAL": ("EulerAncestralDiscreteScheduler", {}),
    "K_EULER": ("EulerDiscreteScheduler", {}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
    "LCM": ("LCMScheduler", {}),
}
SCHEDULERS = tuple(_SCHEDULERS)
"""The scheduler input's choices, as Replicate's image models (cog-sdxl) name them; DDIM, the
published one, first. LCM is the latent consistency models' sampler, for a model distilled to
it (an LCM-LoRA: a few steps, little guidance)."""

MAX_STEPS = {"LCM": 50}
"""The most steps a scheduler takes where it takes fewer than the input's bound: LCM picks its
steps among the 50 of its distillation schedule (`original_inference_steps`)."""

# The k-diffusion schedulers: their sample is x0 + sigma * noise, which the model sees divided
# by sqrt(sigma**2 + 1). The others' sample is sqrt(a) * x0 + sqrt(1 - a) * noise.
_SIGMA_SCALED = (
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
)

Scheduler = Any
"""A diffusers scheduler (`SchedulerMixin`) made by `make_scheduler`."""


def make_scheduler(name: str, config: Mapping[str, Any]) -> Scheduler:
    """A fresh scheduler `name` (one of `SCHEDULERS`) from a model's scheduler config, made with
    `from_config` as cog-sdxl makes its schedulers."""
    import diffusers  # several seconds: loaded where a scheduler is made, not where one is named

    class_name, overrides = _SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)


def declared_scheduler(config: Mapping[str, Any]) -> str | None:
    """The name of the scheduler a model folder's scheduler config declares (its `_class_name`
    and sigmas), or None where it is none of `SCHEDULERS`."""
    class_name = config.get("_class_name")
    if class_name == "DPMSolverMultistepScheduler" and config.get("use_karras_sigmas"):
        return "KarrasDPM"
    return next((name for name, (cls, extra) in _SCHEDULERS.items() if cls == class_name), None)


def _kind(scheduler: Scheduler) -> str:
    return type(scheduler).__name__


def network_calls(name: str, steps: int) -> int:
    """The guided network evaluations of `steps` steps of scheduler `name`: Heun's second-order
    steps take two (its last step, to noise level 0, one), PNDM's first step two (but where it is
    the only one)."""
    if name == "HeunDiscrete":
        return 2 * steps - 1
    if name == "PNDM" and steps > 1:
        return steps + 1
    return steps


def per_view(scheduler: Scheduler) -> bool:
    """Whether each view may be stepped on its own: DDIM's step keeps no state and is
    elementwise, so stepping the views and averaging them is the published arithmetic."""
    return _kind(scheduler) == "DDIMScheduler"


# The clean latent predicted from samples (n, 4, h, w) and the model's output for them.
X0 = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Evaluation:
    """One network evaluation of the sampling loop, in the denoising steps' terms."""

    step: int  # the denoising step it belongs to
    first: bool  # the step's first: the step's own sample, where the sync step may run
    last: bool  # the step's last: after it the step is complete


def evaluations(scheduler: Scheduler) -> list[Evaluation]:
    """Each of `scheduler.timesteps` (after `set_timesteps`) as an `Evaluation`.

    A step is complete where diffusers' pipelines advance their progress bar: past the warm-up
    evaluations (PNDM's first step evaluates twice), every `order`-th one (Heun's second), and the
    last."""
    n = len(scheduler.timesteps)
    order = scheduler.order
    warm_up = n - scheduler.num_inference_steps * order
    done = [k == n - 1 or (k + 1 > warm_up and (k + 1) % order == 0) for k in range(n)]
    return [
        Evaluation(step=sum(done[:k]), first=k == 0 or done[k - 1], last=done[k]) for k in range(n)
    ]


def noise_level(scheduler: Scheduler, k: int) -> tuple[float, float]:
    """(a, s) such that the sample the scheduler holds at the first evaluation `k` of a step is
    `a * x0 + s * noise`."""
    if _kind(scheduler) in _SIGMA_SCALED:
        return 1.0, float(scheduler.sigmas[k])
    if _kind(scheduler) == "DPMSolverMultistepScheduler":
        # DPM-Solver states its steps in sigma but keeps the sample unscaled.
        sigma = float(scheduler.sigmas[k])
        alpha = 1 / math.sqrt(sigma**2 + 1)
        return alpha, sigma * alpha
    alpha_bar = float(scheduler.alphas_cumprod[int(scheduler.timesteps[k])])
    return math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)


def clean_latent(
    scheduler: Scheduler, k: int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The clean latent x0 that `scheduler` predicts at evaluation `k`, the first of a step, as a
    function of samples `x` (n, 4, h, w) and the model's output for them (differentiable in `x`).

    DDIM's own step gives it (`pred_original_sample`); the others' comes from their noise level
    and the model's prediction type, as their steps compute it (Euler's and Heun's
    `pred_original_sample`, DPM-Solver's `convert_model_output`, LCM's `denoised`). The step's
    numbers are read here, once, so that applying it reads nothing back from the device.
    """
    if per_view(scheduler):
        timestep = int(scheduler.timesteps[k])
        return lambda x, output: scheduler.step(output, timestep, x).pred_original_sample
    a, s = noise_level(scheduler, k)
    kind = scheduler.config.prediction_type
    if _kind(scheduler) == "LCMScheduler":
        # LCM's `denoised`: its consistency function's boundary condition mixes the sample into
        # the clean latent, c_skip * x + c_out * x0 (c_skip is below 1e-7 but at the last
        # timesteps).
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(
            int(scheduler.timesteps[k])
        )
        x0 = _x0(kind, a, s)
        return lambda x, output: c_out * x0(x, output) + c_skip * x
    return _x0(kind, a, s)


def _x0(kind: str, a: float, s: float) -> X0:
    """The clean latent of a sample `a * x0 + s * noise` and a model output of `kind`."""
    if kind == "epsilon":
        return lambda x, output: (x - s * output) / a
    if kind == "v_prediction":
        # The model sees the sample at unit variance: x * c = (a * x0 + s * noise) * c.
        c = 1 / math.sqrt(a**2 + s**2)
        return lambda x, output: (a * c) * (x * c) - (s * c) * output
    if kind == "sample":
        return lambda x, output: output
    raise ValueError(f"prediction_type {kind!r} is not epsilon, v_prediction or sample")
