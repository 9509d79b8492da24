"""When the SyncDiffusion step runs and how hard it pulls: its decayed weight per step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SyncSchedule:
    """Which denoising steps run the gradient step, and its weight `weight * decay_rate ** i`."""

    weight: float
    decay_rate: float
    freq: int
    threshold: int

    def active(self, step: int) -> bool:
        """Every `freq`-th step (counting from 1) among the first `threshold` steps, unless its
        weight is 0: a step that would move no window runs no gradient (about 9x a plain step)."""
        return (step + 1) % self.freq == 0 and step < self.threshold and self.weight_at(step) != 0

    def weight_at(self, step: int) -> float:
        """The exponentially decayed gradient weight of step `step` (SyncDiffusion, Sec. 4)."""
        return self.weight * self.decay_rate**step


def sync_schedule(request: Mapping[str, Any]) -> SyncSchedule:
    """When a request's sync step runs, and how hard (its inputs of those names)."""
    return SyncSchedule(
        request["sync_weight"],
        request["sync_decay_rate"],
        request["sync_freq"],
        request["sync_threshold"],
    )


def synced_steps(request: Mapping[str, Any]) -> int:
    """How many of a request's denoising steps run the sync gradient step."""
    schedule = sync_schedule(request)
    return sum(schedule.active(i) for i in range(steps_run(request)))


def steps_run(request: Mapping[str, Any]) -> int:
    """The denoising steps a request runs: all of `num_inference_steps`, or with an `image` the
    last `int(steps * prompt_strength)` of them (diffusers' `get_timesteps`)."""
    steps = request["num_inference_steps"]
    if request.get("image") is None:
        return steps
    return min(int(steps * request["prompt_strength"]), steps)
