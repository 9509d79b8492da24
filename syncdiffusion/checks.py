"""Every check on a panorama request, in one place, with messages that say what is allowed."""

from __future__ import annotations

import math
from typing import Any

from .windows import WINDOW, panorama_windows

# The smallest side is a model's window (512 px for SD2-base, 1024 px for SDXL).
MIN_SIDE, MAX_SIDE = 512, 4096
GUIDANCE_SCALE_RANGE = (0.0, 20.0)
SYNC_WEIGHT_RANGE = (0.0, 30.0)
SYNC_DECAY_RATE_RANGE = (0.0, 1.0)
SYNC_THRESHOLD_RANGE = (0, 50)
NUM_INFERENCE_STEPS_RANGE = (1, 200)
STRIDE_RANGE = (8, 56)  # SD2-base's; the top is a model's window less 8 latent pixels
SEED_RANGE = (0, 2**64 - 1)  # what torch.manual_seed takes
# The most work one request may ask for, in window-steps (windows x denoising steps): the
# published wrapper's largest request (3072x3072, stride 8, 200 steps). Larger sizes are
# welcome at a coarser stride or with fewer steps.
MAX_WINDOW_STEPS = 41 * 41 * 200
OUTPUT_FORMATS = ("png", "webp", "jpg")
OUTPUT_QUALITY_RANGE = (1, 100)


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


def _side(name: str, value: Any, low: int, factor: int) -> str | None:
    if not _is_int(value) or value % factor or not low <= value <= MAX_SIDE:
        return f"{name} must be a multiple of {factor} from {low} to {MAX_SIDE}; got {value!r}"
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
    window: int = WINDOW,
    vae_scale_factor: int = 8,
) -> None:
    """Raise `InputError` naming every input that breaks a rule, and the rule.

    `window` is the model's view side in latent pixels and `vae_scale_factor` its image pixels
    per latent pixel (SD2-base's by default): sides are at least one window, strides below it.
    """
    errors = []
    for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(value, str):
            errors.append(f"{name} must be a string; got {value!r}")
    stride_error, max_stride = None, window - 8
    if not _is_int(stride) or stride % 8 or not STRIDE_RANGE[0] <= stride <= max_stride:
        stride_error = (
            f"stride must be a multiple of 8 from {STRIDE_RANGE[0]} to "
            f"{max_stride} (less than the {window}-latent window); got {stride!r}"
        )
    min_side = window * vae_scale_factor
    errors += [
        stride_error,
        _side("width", width, min_side, vae_scale_factor),
        _side("height", height, min_side, vae_scale_factor),
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
    errors = [e for e in errors if e]
    if errors:
        raise InputError("; ".join(errors))
    f = vae_scale_factor
    n_windows = len(panorama_windows(height // f, width // f, stride, loop_closure, window))
    if n_windows * num_inference_steps > MAX_WINDOW_STEPS:
        raise InputError(
            f"a {width}x{height} panorama at stride {stride} is {n_windows} windows, times "
            f"num_inference_steps {num_inference_steps} = {n_windows * num_inference_steps} "
            f"window-steps; the limit is {MAX_WINDOW_STEPS}: use a larger stride, fewer steps "
            "or a smaller size"
        )


def check_output(output_format: Any, output_quality: Any) -> None:
    """Raise `InputError` unless the file format and quality are ones we write."""
    errors = []
    if output_format not in OUTPUT_FORMATS:
        errors.append(
            f"output_format must be one of {', '.join(OUTPUT_FORMATS)}; got {output_format!r}"
        )
    errors.append(_int_in("output_quality", output_quality, *OUTPUT_QUALITY_RANGE))
    errors = [e for e in errors if e]
    if errors:
        raise InputError("; ".join(errors))
