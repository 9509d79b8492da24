"""The one description of a panorama request: each input's name, type, default, bounds and help,
and the rules between inputs.

The checks and their messages, the command line (`__main__`), the parameters saved in files and
the pipeline's call all come from `panorama_inputs`. The Cog predictors state it in literals,
which `cog build` reads without running Python: `python -m syncdiffusion.replicate.predictors`
writes their `Input(...)` parameters from it, and tests/test_predict.py holds every one to it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..core.schedulers import MAX_STEPS, SCHEDULERS, network_calls
from ..core.sphere import CAP_PROMPTS, CUBE_LAYOUTS
from ..core.sync_schedule import steps_run, synced_steps
from ..core.windows import SD2_BASE, Geometry
from ..errors import InputError, shown
from .cost import MAX_COST, request_cost

logger = logging.getLogger(__name__)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""The default of an input that has none: the request must give it."""

MAX_TEXT_LENGTH = 10_000  # characters of a prompt; the text encoder reads its first 77 tokens
MAX_SOURCE_LENGTH = 2_000  # characters of a LoRA's hub id, URL or file name
MAX_SIDE = 4096


@dataclass(frozen=True)
class Input:
    """One input: what it is called, what it takes and what it does.

    `ge`/`le` bound a number, `multiple_of` an integer's step, `choices` a string's values.
    `note` says why a bound is where it is, in the refusal's message. `zero`, where given, is
    what the integer 0 means, outside the bounds (published as the lower bound 0).
    """

    name: str
    type: type
    help: str
    default: Any = REQUIRED
    ge: int | float | None = None
    le: int | float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] | None = None
    max_length: int | None = None
    note: str = ""
    zero: str = ""

    @property
    def required(self) -> bool:
        """Whether a request must give this input."""
        return self.default is REQUIRED

    def allowed(self) -> str:
        """What the input takes, as a refusal says it."""
        if self.type is bool:
            return "true or false"
        if self.type is Image.Image:
            return "an image"
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.type is str and self.max_length is not None:
            return f"a string of at most {self.max_length:,} characters"
        if self.type is str:
            return "a string"
        if self.multiple_of is not None:
            zero = f"0 ({self.zero}) or " if self.zero else ""
            return f"{zero}a multiple of {self.multiple_of} from {self.ge} to {self.le}{self.note}"
        if self.type is float:
            return f"a number from {self.ge:g} to {self.le:g}"
        if self.le is None:
            return f"an integer >= {self.ge}"
        return f"an integer from {self.ge} to {self.le}"

    def accepts(self, value: Any) -> bool:
        """Whether `value` is one this input takes (an int is a float; a bool is neither)."""
        if value is None:
            return self.default is None  # an optional image or LoRA not given
        if self.type in (bool, Image.Image):
            return isinstance(value, self.type)
        if self.type is str:
            return (
                isinstance(value, str)
                and (self.choices is None or value in self.choices)
                and (self.max_length is None or len(value) <= self.max_length)
                and _unencodable_at(value) is None
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.type is int and not isinstance(value, int):
            return False
        if self.zero and value == 0:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.multiple_of is not None and value % self.multiple_of:
            return False
        return (self.ge is None or value >= self.ge) and (self.le is None or value <= self.le)

    def problem(self, value: Any) -> str | None:
        """The refusal of `value`, naming this input, the value and what is allowed; or None."""
        if self.accepts(value):
            return None
        if isinstance(value, str) and self.max_length is not None and len(value) > self.max_length:
            return f"{self.name} must be {self.allowed()}; got {len(value):,} characters"
        if isinstance(value, str) and (position := _unencodable_at(value)) is not None:
            return (
                f"{self.name} must be valid Unicode text (encodable as UTF-8); got a lone "
                f"surrogate {shown(value[position])} at position {position} of {shown(value)}, "
                "the mark of a byte that is not UTF-8 (Latin-1 text read by a UTF-8 shell or file)"
            )
        return f"{self.name} must be {self.allowed()}; got {shown(value)}"

    def parse(self, text: str) -> Any:
        """`text` as a value of this input's type: the one rule by which the command line's
        options, the grid form's `--set name=v1,v2` and the app's fields read text.

        - str: the text as given, spaces and all.
        - int: what Python's `int()` reads: an optional sign and decimal digits, `_` between
          digits allowed (`1_024`); not `2048.0`, `0x10` or `1e3`.
        - float: what Python's `float()` reads: `7`, `.5`, `-1.5e-3`, `inf`, `nan`.
        - bool: `true` or `false`, in any case (`True`, `FALSE`). The command line spells a
          flag `--loop-closure` / `--no-loop-closure` and the app's page sends a checkbox's
          true/false, neither as text; other spellings (`yes`, `1`, `on`) are refused.
        - an image (`control_image`): refused: an image is given as a file, opened and checked
          by `condition_image.open_control_image` (the command line's `--control-image FILE`,
          the app's upload), not as text.

        Spaces around a number or a bool are ignored, as `int()` and `float()` ignore them.
        Only the type is read: the bounds, choices and lengths are `problem`'s, checked with the
        rest of the request (the sides' and stride's bounds follow the model's window).

        Raises `InputError` naming this input, the text (`errors.shown`) and what is allowed,
        as `problem` says it: `width must be a multiple of 8 from 512 to 4096; got 'wide'`.
        """
        if self.type is str:
            return text
        if self.type is Image.Image:
            raise InputError(
                f"{self.name} must be {self.allowed()}, given as a file, not as text; "
                f"got {shown(text)}"
            )
        if self.type not in (bool, int, float):
            raise TypeError(f"{self.name}: no rule reads text as {self.type.__name__}")
        stripped = text.strip()
        if self.type is bool:
            if stripped.lower() in ("true", "false"):
                return stripped.lower() == "true"
        else:
            try:
                return self.type(stripped)
            except ValueError:
                # int() reads at most so many digits: say so rather than quote them all.
                digits, most = stripped.lstrip("+-").replace("_", ""), sys.get_int_max_str_digits()
                if self.type is int and digits.isdecimal() and len(digits) > most:
                    got = f"an integer of {len(digits):,} digits, more than are read ({most:,})"
                    raise InputError(f"{self.name} must be {self.allowed()}; got {got}") from None
        raise InputError(f"{self.name} must be {self.allowed()}; got {shown(text)}")


def _unencodable_at(text: str) -> int | None:
    """The position of the first character of `text` that UTF-8 cannot encode (a lone surrogate,
    as Python reads a byte that is not UTF-8 from argv or a file), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


# SD2-base's inputs: those of the published wrapper, with its defaults. `panorama_inputs` gives
# any model's, whose window sets the sides' lower bound and the stride's upper one.
_PANORAMA_INPUTS = (
    Input("prompt", str, "What the panorama shows.", max_length=MAX_TEXT_LENGTH),
    Input(
        "negative_prompt",
        str,
        "What the panorama should not show.",
        default="",
        max_length=MAX_TEXT_LENGTH,
    ),
    Input(
        "width",
        int,
        "Width in pixels, a multiple of 8. Wider than high: a horizontal panorama.",
        default=2048,
        ge=512,
        le=MAX_SIDE,
        multiple_of=8,
    ),
    Input(
        "height",
        int,
        "Height in pixels, a multiple of 8. Higher than wide: a vertical panorama.",
        default=512,
        ge=512,
        le=MAX_SIDE,
        multiple_of=8,
    ),
    Input(
        "guidance_scale",
        float,
        "Classifier-free guidance: how closely to follow the prompt.",
        default=7.5,
        ge=0,
        le=20,
    ),
    Input(
        "sync_weight",
        float,
        "Pull of each window towards the anchor window; 0 is plain MultiDiffusion.",
        default=20.0,
        ge=0,
        le=30,
    ),
    Input(
        "sync_decay_rate",
        float,
        "The sync weight is multiplied by this at every denoising step.",
        default=0.99,
        ge=0,
        le=1,
    ),
    Input(
        "sync_freq",
        int,
        "Run the sync gradient step every this many denoising steps.",
        default=1,
        ge=1,
    ),
    Input(
        "sync_threshold",
        int,
        "Run the sync gradient step only in the first this many denoising steps.",
        default=5,
        ge=0,
        le=50,
    ),
    Input("num_inference_steps", int, "Number of denoising steps.", default=50, ge=1, le=200),
    Input(
        "stride",
        int,
        "Latent pixels between windows, a multiple of 8 under {window}; smaller: smoother, slower.",
        default=16,
        ge=8,
        le=56,
        multiple_of=8,
        note=" (less than the {window}-latent window)",
    ),
    Input(
        "seed",
        int,
        "Random seed: the same seed gives the same panorama.",
        default=2,
        ge=0,
        le=2**64 - 1,  # what torch.manual_seed takes
    ),
    Input(
        "loop_closure",
        bool,
        "Make a 360-degree panorama: the right edge continues into the left edge.",
        default=False,
    ),
    Input(
        "sphere",
        bool,
        "The whole sphere, sky and ground too: height is half the width, loop_closure on.",
        default=False,
    ),
    Input(
        "sky_prompt",
        str,
        "With sphere: what the sky shows, looking straight up; empty: the prompt.",
        default="",
        max_length=MAX_TEXT_LENGTH,
    ),
    Input(
        "ground_prompt",
        str,
        "With sphere: what the ground shows, looking straight down; empty: the prompt.",
        default="",
        max_length=MAX_TEXT_LENGTH,
    ),
    Input(
        "scheduler",
        str,
        "The sampler: DDIM, the published one, or another; KarrasDPM is DPM++ 2M Karras.",
        default="DDIM",
        choices=SCHEDULERS,
    ),
    Input(
        "image",
        Image.Image,
        "A picture to start from: restyled, upscaled, or extended if its proportions differ.",
        default=None,
    ),
    Input(
        "mask",
        Image.Image,
        "Which part of image to make anew (white) and which to keep (black); needs image.",
        default=None,
    ),
    Input(
        "prompt_strength",
        float,
        "How much of image is made anew: 1 makes it all from noise, lower keeps more of it.",
        default=0.8,
        ge=0,
        le=1,
    ),
    # cog-flux's LoRA inputs, with its bounds of the scales.
    Input(
        "lora_weights",
        str,
        "A LoRA: a Hugging Face repo (owner/name, optionally /file.safetensors) or an https URL "
        "of a .safetensors file.",
        default=None,
        max_length=MAX_SOURCE_LENGTH,
    ),
    Input(
        "lora_scale",
        float,
        "How strongly lora_weights is applied: 0 leaves the model as it is, 1 is as trained.",
        default=1.0,
        ge=-1,
        le=3,
    ),
    Input(
        "extra_lora",
        str,
        "A second LoRA, given as lora_weights is, applied together with it.",
        default=None,
        max_length=MAX_SOURCE_LENGTH,
    ),
    Input(
        "extra_lora_scale",
        float,
        "How strongly extra_lora is applied.",
        default=1.0,
        ge=-1,
        le=3,
    ),
)
IMAGE_INPUTS = ("image", "mask", "prompt_strength")
"""The inputs of a panorama that starts from an image (`init_image`); without `image` they
change nothing and files do not record them."""

LORA_INPUTS = {"lora_weights": "lora_scale", "extra_lora": "extra_lora_scale"}
"""Each LoRA input and its scale (`models.lora`); without the LoRA its scale changes nothing
and files record neither."""

OUTPUT_INPUTS = {
    spec.name: spec
    for spec in (
        Input(
            "output_format",
            str,
            "File format of the panorama. Every input is saved in the file.",
            default="png",
            choices=("png", "webp", "jpg"),
        ),
        Input(
            "output_quality",
            int,
            "Quality of webp and jpg files, from 1 to 100 (png is lossless).",
            default=80,
            ge=1,
            le=100,
        ),
    )
}
"""How the panorama is written to a file (the Cog model's last two inputs)."""
OUTPUT_FORMATS = OUTPUT_INPUTS["output_format"].choices

CUBE_MAP_INPUT = Input(
    "cube_map",
    str,
    "With sphere, the file is its cube map instead: a 6:1 row or 4:3 cross of its faces.",
    default="none",
    choices=("none", *CUBE_LAYOUTS),
)
"""The Cog models' choice of what a whole sphere's file holds: the equirectangular picture
("none"), or its cube map laid out in one picture (`core.sphere.cube_picture`), which a game
engine imports as it is. Before the output inputs, on the models that take `sphere`."""

CONTROL_INPUTS = {
    spec.name: spec
    for spec in (
        Input(
            "control_image",
            Image.Image,
            "The layout: a condition image for the ControlNet (an edge map, a QR code), "
            "stretched over the whole panorama. Without a size, the panorama takes its size.",
        ),
        Input(
            "controlnet_conditioning_scale",
            float,
            "How strongly the condition image steers the picture; 0 ignores it.",
            default=1.0,
            ge=0,
            le=2,
        ),
        Input(
            "control_guidance_start",
            float,
            "Fraction of the denoising steps after which the ControlNet starts steering.",
            default=0.0,
            ge=0,
            le=1,
        ),
        Input(
            "control_guidance_end",
            float,
            "Fraction of the denoising steps after which the ControlNet stops steering.",
            default=1.0,
            ge=0,
            le=1,
        ),
    )
}
"""The inputs of a panorama laid out by a ControlNet (`control`), after the prompts."""

# The inputs whose default, bounds or help follow the model's window.
_WINDOW_INPUTS = ("width", "height", "stride")


def panorama_inputs(
    geometry: Geometry = SD2_BASE, control: bool = False, defaults: Mapping[str, Any] | None = None
) -> dict[str, Input]:
    """The panorama inputs of a model with `geometry`, by name, in the published order; with
    `control`, those of its ControlNet (`CONTROL_INPUTS`) after the prompts, and sides that
    default to the condition image's; `defaults` are the model's own where it has any (a
    few-step model's: `presets.model_defaults`).

    Sides are at least one window; the default is four windows by one (SD2-base: 2048x512).
    The stride is below the window; its default a quarter of it (SD2-base: 16).
    """
    side = geometry.window_pixels
    fields = {"window": geometry.window}
    stride_default = max(8, geometry.window // 4 // 8 * 8)
    window_inputs = {
        "width": {"default": 4 * side, "ge": side},
        "height": {"default": side, "ge": side},
        "stride": {"default": stride_default, "le": geometry.window - 8},
    }
    described = {}
    for spec in _PANORAMA_INPUTS:
        if spec.name in _WINDOW_INPUTS:
            spec = dataclasses.replace(
                spec,
                help=spec.help.format(**fields),
                note=spec.note.format(**fields),
                **window_inputs[spec.name],
            )
        if spec.name in (defaults or {}):
            spec = dataclasses.replace(spec, default=defaults[spec.name])
        described[spec.name] = spec
    if not control:
        return described
    for name in ("sphere", *CAP_PROMPTS.values()):  # a sphere is not yet laid out
        del described[name]
    for name in ("width", "height"):
        described[name] = dataclasses.replace(
            described[name],
            default=0,
            help=described[name].help.replace(
                "a multiple of 8.", "a multiple of 8, or 0 for the control image's."
            ),
            zero="the control image's",
        )
    # The layout right after the text: on a form, what the panorama is comes first.
    names = list(described)
    order = [*names[:2], *CONTROL_INPUTS, *names[2:]]
    return {name: described.get(name) or CONTROL_INPUTS[name] for name in order}


def _refuse(problems: list[str | None]) -> None:
    if problems := [p for p in problems if p]:
        raise InputError("; ".join(problems))


def panorama_request(
    inputs: Mapping[str, Any],
    geometry: Geometry = SD2_BASE,
    control: bool = False,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every input of one panorama by name, in the published order: those given, checked, and
    the model's defaults for the rest. Raises `InputError` naming every input that breaks a rule
    (an unknown or missing one too), its value and the rule.

    With `control` (a model with a ControlNet) the control inputs join them, and a side not
    given is the condition image's, rounded to the rules (the logs say how). `defaults`: the
    model's own (`panorama_inputs`).
    """
    described = panorama_inputs(geometry, control, defaults)
    unknown = [name for name in inputs if name not in described]
    if unknown:
        raise InputError(
            f"unknown input{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"the inputs are {', '.join(described)}"
        )
    missing = [name for name, spec in described.items() if spec.required and name not in inputs]
    _refuse([f"{name} is required" for name in missing])
    request = {name: inputs.get(name, spec.default) for name, spec in described.items()}
    for name in LORA_INPUTS:
        if request[name] == "":  # a form's empty field: no LoRA
            request[name] = None
        elif isinstance(request[name], os.PathLike):  # a local file, from Python
            request[name] = os.fspath(request[name])
    _refuse([spec.problem(request[name]) for name, spec in described.items()])
    _refuse([steps_problem(request)])
    _refuse([sphere_problem(request, geometry)])
    if request.get("sphere"):
        if request["height"] != request["width"] // 2:
            logger.info(
                "sphere: the height is half the width, %d, not the %d given",
                request["width"] // 2,
                request["height"],
            )
        request["height"], request["loop_closure"] = request["width"] // 2, True
    if control:
        _refuse([_control_problem(request)])
        _size_from_condition(request, geometry)
    _refuse(image_problems(request))
    if (cost := request_cost(request, geometry, control)) > MAX_COST:
        n_windows = len(geometry.windows(request))
        steps = request["num_inference_steps"]
        calls = network_calls(request["scheduler"], steps)
        calls = (
            "" if calls == steps else f" ({calls} network evaluations with {request['scheduler']})"
        )
        raise InputError(
            f"a {request['width']}x{request['height']} panorama at stride {request['stride']} is "
            f"{n_windows} windows of {geometry.window_pixels} px; {steps} steps{calls} with "
            f"{synced_steps(request)} synced cost {cost:,.0f} SD2-base window-steps, "
            f"and the limit is {MAX_COST:,.0f}: use a larger stride, fewer steps, fewer synced "
            "steps or a smaller size"
        )
    return request


def image_problems(request: Mapping[str, Any]) -> list[str]:
    """Why a request's `image`, `mask` and `prompt_strength` cannot go together: a mask without
    an image, a mask of colours or one that keeps nothing or everything, a strength that runs
    no step."""
    image, mask = request["image"], request["mask"]
    if image is None:
        if mask is not None:
            return ["mask needs image (the picture whose black part it keeps); got no image"]
        return []
    problems = []
    if steps_run(request) < 1:
        steps, strength = request["num_inference_steps"], request["prompt_strength"]
        problems.append(
            f"prompt_strength {shown(strength)} of {steps} num_inference_steps runs no step "
            f"(int({steps} * {strength:g}) is 0): prompt_strength must be at least "
            f"{1 / steps:.3g} with {steps} steps, or use more steps"
        )
    if mask is not None:
        problems += [_mask_problem(mask)]
    return [problem for problem in problems if problem]


def sphere_problem(request: Mapping[str, Any], geometry: Geometry) -> str | None:
    """Why a request cannot be a whole sphere, or None: its width must make cube faces (a
    quarter of it) of at least one window, and it starts from the prompt alone. A cap's own
    prompt (`CAP_PROMPTS`) is a sphere's only."""
    if not request.get("sphere"):
        for name in CAP_PROMPTS.values():
            if request.get(name):
                return (
                    f"{name} is what a whole sphere's cap shows: it needs sphere true, or "
                    f"{name} empty; got {name} {shown(request[name])} without sphere"
                )
        return None
    if request["image"] is not None:
        return "sphere makes the whole sphere from the prompt alone: it takes no image yet"
    width, least = request["width"], 4 * geometry.window_pixels
    if width < least or width % 32:
        return (
            f"width must be a multiple of 32 of at least {least} with sphere (the sky and the "
            f"ground are each made as a cube face a quarter of the width square, at least one "
            f"{geometry.window_pixels}-px window); got {shown(width)}"
        )
    return None


def _mask_problem(mask: Image.Image) -> str | None:
    """Why `mask` is not a mask: colours rather than one channel, or nothing or everything kept
    (white, pixels of 128 and more, is made anew, as diffusers binarizes a mask)."""
    pixels = np.asarray(mask.convert("RGB") if mask.mode not in ("L", "1") else mask.convert("L"))
    if pixels.ndim == 3:
        if (pixels != pixels[..., :1]).any():
            return (
                f"mask must be one channel (grayscale: white is made anew, black is kept); got a "
                f"{mask.width}x{mask.height} image in mode {mask.mode} whose red, green and blue "
                "differ: convert it to grayscale (mode L)"
            )
        pixels = pixels[..., 0]
    white = pixels >= 128
    if white.all():
        return (
            f"mask keeps nothing: all its {mask.width}x{mask.height} pixels are white (made "
            "anew); paint black what to keep, or give no mask to restyle the whole image"
        )
    if not white.any():
        return (
            f"mask keeps everything: all its {mask.width}x{mask.height} pixels are black (kept), "
            "so nothing would be made; paint white what to make anew"
        )
    return None


def steps_problem(request: Mapping[str, Any]) -> str | None:
    """Why the scheduler cannot take the request's steps (LCM takes at most 50), or None."""
    scheduler, steps = request["scheduler"], request["num_inference_steps"]
    most = MAX_STEPS.get(scheduler)
    if most is None or steps <= most:
        return None
    return (
        f"num_inference_steps must be at most {most} with scheduler {scheduler} (it picks its "
        f"steps among the {most} of its distillation); got {shown(steps)}"
    )


def _control_problem(request: Mapping[str, Any]) -> str | None:
    start, end = request["control_guidance_start"], request["control_guidance_end"]
    if start >= end:
        return (
            "control_guidance_start must be below control_guidance_end; "
            f"got {shown(start)} and {shown(end)}"
        )
    return None


def _size_from_condition(request: dict[str, Any], geometry: Geometry) -> None:
    """Give the sides left 0 the condition image's size, within the rules."""
    if request["width"] and request["height"]:
        return
    width, height, note = panorama_size(request["control_image"], geometry)
    request["width"] = request["width"] or width
    request["height"] = request["height"] or height
    if note is not None:
        logger.info(note)


def check_output(
    output_format: Any, output_quality: Any, cube_map: Any = "none", sphere: Any = False
) -> None:
    """Raise `InputError` unless the file format and quality are ones we write, and the cube
    map layout (`CUBE_MAP_INPUT`) is one, asked for of a whole sphere (`sphere`) only."""
    problems = [
        OUTPUT_INPUTS["output_format"].problem(output_format),
        OUTPUT_INPUTS["output_quality"].problem(output_quality),
        CUBE_MAP_INPUT.problem(cube_map),
    ]
    if cube_map != "none" and CUBE_MAP_INPUT.accepts(cube_map) and sphere is not True:
        problems.append(
            f"cube_map {cube_map!r} lays out the six cube faces of a whole sphere: it needs "
            f"sphere true (got sphere {sphere!r}); without it, cube_map must be 'none'"
        )
    _refuse(problems)


def panorama_size(image: Image.Image, geometry: Geometry = SD2_BASE) -> tuple[int, int, str | None]:
    """The panorama width and height a condition image implies when no size is given, and a
    one-line note of how they differ from the image's (None when they do not).

    Sides are multiples of 8 from one window (`geometry.window_pixels`) to MAX_SIDE. The image's
    sides are rounded to the nearest multiples of 8; where that leaves a side out of bounds the
    image is scaled first, both sides alike, so the condition is not stretched. Only an image
    more elongated than a panorama can be (8:1 for 512-pixel windows) is then stretched.
    """
    least, most = geometry.window_pixels, MAX_SIDE
    width, height = image.size
    scale, how = 1.0, []
    if _multiple_of_8(min(width, height)) < least:
        scale, bound = least / min(width, height), f"at least {least}"
    if _multiple_of_8(max(width, height)) > most or scale * max(width, height) > most:
        scale, bound = most / max(width, height), f"at most {most}"
    if scale != 1:
        how.append(f"scaled by {scale:.3g} to {bound} pixels on a side, keeping its proportions")
    scaled = [side * scale for side in image.size]
    if any(abs(side - _multiple_of_8(side)) > 1e-6 for side in scaled):
        how.append("sides rounded to multiples of 8")
    sides = [min(most, max(least, _multiple_of_8(side))) for side in scaled]
    for name, side, exact in zip(("width", "height"), sides, scaled, strict=True):
        if side != _multiple_of_8(exact):
            how.append(
                f"the {name} then raised to {least}, which stretches the image: it is more "
                f"elongated than a panorama can be ({most / least:.3g}:1)"
            )
    panorama_width, panorama_height = sides
    if not how:
        return panorama_width, panorama_height, None
    return (
        panorama_width,
        panorama_height,
        f"control_image is {width}x{height}; the panorama is {panorama_width}x{panorama_height} "
        f"({'; '.join(how)})",
    )


def _multiple_of_8(length: float) -> int:
    """The multiple of 8 nearest `length`, halves up."""
    return 8 * math.floor(length / 8 + 0.5)
