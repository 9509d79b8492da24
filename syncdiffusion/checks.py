"""Every check on a panorama request, in one place, with messages that say what is allowed."""

from __future__ import annotations

import math
from typing import Any

from .windows import WINDOW

MIN_SIDE, MAX_SIDE = 512, 3072
GUIDANCE_SCALE_RANGE = (0.0, 20.0)
SYNC_WEIGHT_RANGE = (0.0, 30.0)
SYNC_DECAY_RATE_RANGE = (0.0, 1.0)
SYNC_THRESHOLD_RANGE = (0, 50)
NUM_INFERENCE_STEPS_RANGE = (1, 200)
STRIDE_RANGE = (8, 56)
SEED_RANGE = (0, 2**64 - 1)  # what torch.manual_seed takes
LOOP_CLOSURE_HEIGHT = 512


class InputError(ValueError):
    """A request the model cannot make; the message names each bad input, its value and the rule."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_in(name: str, value: Any, low: int, high: int | None = None) -> str | None:
    allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
    if not _is_int(value) or value < low or (high is not None and value > high):
        return f"{name} must be {allowed}; got {value!r}"
    return None


def _number_in(name: str, value: Any, low: float, high: float) -> str | None:
    if not _is_number(value) or not math.isfinite(value) or not low <= value <= high:
        return f"{name} must be a number from {low:g} to {high:g}; got {value!r}"
    return None


def _side(name: str, value: Any, stride: Any) -> str | None:
    if not _is_int(value):
        return f"{name} must be an integer number of pixels; got {value!r}"
    multiple = 8 * stride if _is_int(stride) and stride > 0 else 8
    if not MIN_SIDE <= value <= MAX_SIDE or value % multiple:
        return (
            f"{name} must be a multiple of {multiple} (8 * stride) from {MIN_SIDE} to "
            f"{MAX_SIDE}; got {value!r}"
        )
    return None


def check_inputs(
    prompt: Any,
    negative_prompt: Any,
    width: Any,
    height: Any,
    guidance_scale: Any,
    sync_weight: Any,
    sync_decay_rate: Any,
    sync_freq: Any,
    sync_threshold: Any,
    num_inference_steps: Any,
    stride: Any,
    seed: Any,
    loop_closure: Any,
) -> None:
    """Raise `InputError` naming every input that breaks the published rules."""
    errors = []
    for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(value, str):
            errors.append(f"{name} must be a string; got {value!r}")
    stride_error = None
    if not _is_int(stride) or stride % 8 or not STRIDE_RANGE[0] <= stride <= STRIDE_RANGE[1]:
        stride_error = (
            f"stride must be a multiple of 8 from {STRIDE_RANGE[0]} to "
            f"{STRIDE_RANGE[1]} (less than the {WINDOW}-latent window); got {stride!r}"
        )
    errors += [
        stride_error,
        _side("width", width, stride),
        _side("height", height, stride),
        _number_in("guidance_scale", guidance_scale, *GUIDANCE_SCALE_RANGE),
        _number_in("sync_weight", sync_weight, *SYNC_WEIGHT_RANGE),
        _number_in("sync_decay_rate", sync_decay_rate, *SYNC_DECAY_RATE_RANGE),
        _int_in("sync_freq", sync_freq, 1),
        _int_in("sync_threshold", sync_threshold, *SYNC_THRESHOLD_RANGE),
        _int_in("num_inference_steps", num_inference_steps, *NUM_INFERENCE_STEPS_RANGE),
        _int_in("seed", seed, *SEED_RANGE),
    ]
    if not isinstance(loop_closure, bool):
        errors.append(f"loop_closure must be true or false; got {loop_closure!r}")
    elif loop_closure and height != LOOP_CLOSURE_HEIGHT:
        errors.append(
            f"loop_closure needs height {LOOP_CLOSURE_HEIGHT} (one row of windows); "
            f"got height {height!r}"
        )
    errors = [e for e in errors if e]
    if errors:
        raise InputError("; ".join(errors))
