"""The form: the models and ControlNets in a weights folder, each model's inputs as the page
draws them (with a ControlNet, its control inputs too), and a submitted form read back into a
request, checked by the library (`inputs.panorama_request`, `control_image.open_control_image`)."""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from ..core.windows import Geometry
from ..errors import InputError, shown
from ..models.lora_files import LORA_FOLDER, cached_loras, folder_loras
from ..models.weights import CONTROLNET_DIRNAME
from ..request.condition_image import open_image
from ..request.inputs import (
    LORA_INPUTS,
    OUTPUT_INPUTS,
    REQUIRED,
    Input,
    check_output,
    panorama_inputs,
    panorama_request,
)
from ..request.presets import model_defaults

MAX_UPLOAD = 32 << 20
"""The largest image file the app takes, in bytes (a condition image, an image to start from, a
mask): an edge map or a QR code is a few hundred kilobytes, a large phone photo some ten
megabytes."""
_UPLOAD_FILES = "a PNG, JPEG or WebP file"


def model_folders(weights_dir: Path) -> list[str]:
    """The model folders in `weights_dir`: those holding a model_index.json, by name."""
    if not weights_dir.is_dir():
        return []
    return sorted(p.name for p in weights_dir.iterdir() if (p / "model_index.json").is_file())


def controlnet_folders(weights_dir: Path) -> list[str]:
    """The ControlNet folders in `weights_dir`'s controlnet/: those holding a config.json, by name
    (whether one is complete, and fits a model, is checked when a job names it)."""
    root = weights_dir / CONTROLNET_DIRNAME
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def folder_geometry(sd_dir: Path) -> Geometry:
    """A model folder's windows, read from its UNet's and VAE's configs without loading them."""
    unet = json.loads((sd_dir / "unet" / "config.json").read_text())
    vae = json.loads((sd_dir / "vae" / "config.json").read_text())
    return Geometry(unet["sample_size"], 2 ** (len(vae["block_out_channels"]) - 1))


def _number_text(value: Any) -> Any:
    # Numbers travel as text: JavaScript's numbers hold integers exactly only up to 2**53,
    # and a seed goes up to 2**64 - 1.
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def describe(spec: Input) -> dict[str, Any]:
    """One input as the page draws its field: name, kind, default, bounds or choices, help."""
    kinds = {bool: "bool", int: "int", float: "float", str: "str", Image.Image: "image"}
    kind = kinds[spec.type]
    field = {
        "name": spec.name,
        "kind": "choice" if spec.choices else kind,
        "help": spec.help,
        "required": spec.required,
        "default": None if spec.default is REQUIRED else _number_text(spec.default),
        "allowed": spec.allowed(),
    }
    for bound in ("ge", "le", "multiple_of", "max_length"):
        if getattr(spec, bound) is not None:
            field[bound] = _number_text(getattr(spec, bound))
    if spec.choices:
        field["choices"] = list(spec.choices)
    if spec.name in LORA_INPUTS:
        field["picker"] = "lora"  # a text field that suggests `lora_choices`
    return field


def lora_choices(weights_dir: Path) -> list[str]:
    """What a LoRA field suggests: the files a person put in the weights folder's lora/ (named
    by file name), then the LoRAs downloaded there before (by their source), most recent first."""
    folder = weights_dir / LORA_FOLDER
    return [*folder_loras(folder), *(lora.source for lora in cached_loras(folder))]


def model_form(sd_dir: Path) -> dict[str, Any]:
    """The form of one model: its panorama inputs (their defaults and bounds follow its window),
    and those with a ControlNet (the control inputs; sides default to the condition image's)."""
    geometry, defaults = folder_geometry(sd_dir), model_defaults(sd_dir)

    def fields(control: bool) -> list[dict[str, Any]]:
        return [describe(spec) for spec in panorama_inputs(geometry, control, defaults).values()]

    return {"name": sd_dir.name, "inputs": fields(False), "control_inputs": fields(True)}


def output_form() -> list[dict[str, Any]]:
    """The file's inputs: format and quality, as the Cog model and the CLI take them."""
    return [describe(spec) for spec in OUTPUT_INPUTS.values()]


def field_value(spec: Input, value: Any) -> Any:
    """A field's value for its input: text read by `Input.parse`, as the command line reads its
    options. What is not text (a checkbox's true or false, a number a client sent as JSON) is
    given as it came, and so is text that does not parse: the library's check then names it as
    given, with every other bad field at once."""
    if not isinstance(value, str):
        return value
    try:
        return spec.parse(value)
    except InputError:
        return value


def read_upload(upload: Any, input_name: str = "control_image") -> Image.Image:
    """The image of input `input_name` in an uploaded file, `{"name": its name, "data": its bytes
    in base64}`, opened and checked by `condition_image.open_image`; `InputError` naming the
    input."""
    if upload is None:
        raise InputError(f"{input_name} is required: upload the condition image, {_UPLOAD_FILES}")
    if not isinstance(upload, dict) or not isinstance(upload.get("data"), str):
        raise InputError(
            f"{input_name} must be an uploaded file, {{name, data (base64)}}; got {shown(upload)}"
        )
    name = upload.get("name") if isinstance(upload.get("name"), str) else "the upload"
    # A file's base64 is 4/3 of its size: the text alone tells when the file is too large.
    if len(upload["data"]) > (MAX_UPLOAD + 2) // 3 * 4:
        raise InputError(
            f"{input_name} must be {_UPLOAD_FILES} of at most {MAX_UPLOAD >> 20} MiB; got "
            f"{shown(name)} of {len(upload['data']) * 3 / 4 / 2**20:.0f} MiB"
        )
    try:
        data = base64.b64decode(upload["data"], validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            f"{input_name} must be {_UPLOAD_FILES} in base64; got {shown(name)}, whose data is "
            "not base64"
        ) from None
    file = io.BytesIO(data)
    file.name = name  # what open_image's refusals call it
    return open_image(file, input_name)


def read_form(
    fields: dict[str, Any],
    geometry: Geometry,
    control: bool = False,
    defaults: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], str, int]:
    """The request, file format and quality of a submitted form, checked by the library; with
    `control` (a ControlNet picked), its inputs too, the condition image an upload (`read_upload`);
    `defaults`, the model's own (`presets.model_defaults`).

    Raises `FormError`: the library's message, and each bad field's own part of it.
    """
    described = panorama_inputs(geometry, control, defaults)
    # Unknown names go on to the library, which names them and lists the inputs.
    inputs = {
        name: field_value(described[name], value) if name in described else value
        for name, value in fields.items()
        if name not in OUTPUT_INPUTS
    }
    output = {
        name: field_value(spec, fields.get(name, spec.default))
        for name, spec in OUTPUT_INPUTS.items()
    }
    upload_problems = {}
    for name in [name for name, spec in described.items() if spec.type is Image.Image]:
        if fields.get(name) is None and not described[name].required:
            continue  # an optional image not given
        try:
            inputs[name] = read_upload(fields.get(name), name)
        except InputError as error:
            upload_problems[name] = str(error)
            inputs.pop(name, None)
    given = {**inputs, **output}
    problems = {
        name: problem
        for name, spec in (*described.items(), *OUTPUT_INPUTS.items())
        if name in given and (problem := spec.problem(given[name])) is not None
    }
    messages, request = [], {}
    if upload_problems:
        # No request without its images: the other fields are checked one by one.
        problems = {**upload_problems, **problems}
        messages.append("; ".join(problems[name] for name in problems if name in described))
    else:
        try:
            request = panorama_request(inputs, geometry, control, defaults)
        except InputError as error:
            messages.append(str(error))
    try:
        check_output(output["output_format"], output["output_quality"])
    except InputError as error:
        messages.append(str(error))
    if messages:
        raise FormError("; ".join(messages), problems)
    return request, output["output_format"], output["output_quality"]


class FormError(InputError):
    """A form the library refuses: its message, and each bad field's part of it by name."""

    def __init__(self, message: str, fields: dict[str, str]) -> None:
        super().__init__(message)
        self.fields = fields


def form_values(parameters: dict[str, Any]) -> dict[str, Any]:
    """The form's fields for a saved panorama's parameters (`files.read_parameters`): its
    inputs, the ControlNet's numbers among them, as text; what is not a field left out (model,
    version, the ControlNet's name, the condition image's record: a file input cannot be filled)."""
    described = {**panorama_inputs(), **panorama_inputs(control=True)}  # sphere: no ControlNet
    return {
        name: _number_text(value)
        for name, value in parameters.items()
        if name in described and described[name].type is not Image.Image
    }
