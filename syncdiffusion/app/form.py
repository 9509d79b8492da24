"""The form: the models in a weights folder, each model's inputs as the page draws them, and a
submitted form read back into a request, checked by the library (`inputs.panorama_request`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..inputs import (
    OUTPUT_INPUTS,
    REQUIRED,
    Input,
    InputError,
    check_output,
    panorama_inputs,
    panorama_request,
)
from ..windows import Geometry

_INTEGER = re.compile(r"[+-]?\d+")


def model_folders(weights_dir: Path) -> list[str]:
    """The model folders in `weights_dir`: those holding a model_index.json, by name."""
    if not weights_dir.is_dir():
        return []
    return sorted(p.name for p in weights_dir.iterdir() if (p / "model_index.json").is_file())


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
    kind = {bool: "bool", int: "int", float: "float", str: "str"}[spec.type]
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
    return field


def model_form(sd_dir: Path) -> dict[str, Any]:
    """The form of one model: its panorama inputs (their defaults and bounds follow its window)."""
    inputs = panorama_inputs(folder_geometry(sd_dir))
    return {"name": sd_dir.name, "inputs": [describe(spec) for spec in inputs.values()]}


def output_form() -> list[dict[str, Any]]:
    """The file's inputs: format and quality, as the Cog model and the CLI take them."""
    return [describe(spec) for spec in OUTPUT_INPUTS.values()]


def coerce(spec: Input, value: Any) -> Any:
    """A field's text as its input's type, as argparse's `type` reads the CLI's; text that is
    not one stays text, so the library's check names it as given."""
    if not isinstance(value, str) or spec.type is str:
        return value
    text = value.strip()
    if spec.type is int and _INTEGER.fullmatch(text):
        return int(text)
    if spec.type is float:
        try:
            return float(text)
        except ValueError:
            return value
    return value


def read_form(fields: dict[str, Any], geometry: Geometry) -> tuple[dict[str, Any], str, int]:
    """The request, file format and quality of a submitted form, checked by the library.

    Raises `FormError`: the library's message, and each bad field's own part of it.
    """
    described = panorama_inputs(geometry)
    # Unknown names go on to the library, which names them and lists the inputs.
    inputs = {
        name: coerce(described[name], value) if name in described else value
        for name, value in fields.items()
        if name not in OUTPUT_INPUTS
    }
    output = {
        name: coerce(spec, fields.get(name, spec.default)) for name, spec in OUTPUT_INPUTS.items()
    }
    given = {**inputs, **output}
    problems = {
        name: problem
        for name, spec in (*described.items(), *OUTPUT_INPUTS.items())
        if name in given and (problem := spec.problem(given[name])) is not None
    }
    messages, request = [], {}
    try:
        request = panorama_request(inputs, geometry)
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
    inputs, numbers as text; what is not an input (model, version) left out."""
    described = panorama_inputs()
    return {name: _number_text(value) for name, value in parameters.items() if name in described}
