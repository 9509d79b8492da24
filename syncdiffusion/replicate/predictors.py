"""The Cog predictors' `Input(...)` parameters, written from the description of the inputs.

`cog build` reads a predictor's inputs without running it (schema.py says how), so each
predictor states its inputs as literals. They are not written by hand: this module writes them
from `panorama_inputs`, `CUBE_MAP_INPUT` and `OUTPUT_INPUTS` (syncdiffusion/request/inputs.py),
for each predictor's model geometry and ControlNet, into two marked regions of its file:

- the `run(...)` parameters, between `# --- inputs: ...` and `# --- end of inputs ---`;
- at module level, between `# --- input descriptions: ...` and
  `# --- end of input descriptions ---`, the descriptions too long for their line inside
  `Input(...)`, as constants (cog reads a module's top-level literals; one literal each, since
  cog would publish adjacent literals with the quotes between them).

Everything else in a predictor (setup, the mapping onto the pipeline) is written by hand.

    python -m syncdiffusion.replicate.predictors           # rewrite the regions
    python -m syncdiffusion.replicate.predictors --check   # exit 1 naming the stale files

tests/test_predict.py fails while a predictor is stale, naming this command.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..core.windows import SD2_BASE, Geometry
from ..request.inputs import CUBE_MAP_INPUT, OUTPUT_INPUTS, Input, panorama_inputs

ROOT = Path(__file__).resolve().parents[2]
COMMAND = "python -m syncdiffusion.replicate.predictors"
LINE_LENGTH = 100  # ruff's, pyproject.toml
INDENT = " " * 4


@dataclass(frozen=True)
class Predictor:
    """A predictor file's model: its windows and whether a ControlNet lays it out."""

    geometry: Geometry
    control: bool = False


PREDICTORS = {
    "predict.py": Predictor(SD2_BASE),  # SD2-base: 64-latent (512 px) windows
    "predict_sdxl.py": Predictor(Geometry(window=128)),  # SDXL base 1.0: 1024 px windows
    "predict_controlnet.py": Predictor(Geometry(window=64), control=True),  # SD 1.5, canny
}


@dataclass(frozen=True)
class Region:
    """A marked region of a predictor file: the lines strictly between `begin` and `end`."""

    begin: str
    end: str


INPUTS = Region(f"# --- inputs: written by {COMMAND} ---", "# --- end of inputs ---")
DESCRIPTIONS = Region(
    f"# --- input descriptions: written by {COMMAND} ---", "# --- end of input descriptions ---"
)
WHERE = "# From syncdiffusion/request/inputs.py: edit that, then run the command above."


class StaleError(ValueError):
    """A predictor file the generator cannot write: a marker missing or repeated."""


def inputs_of(predictor: Predictor) -> dict[str, Input]:
    """A predictor's inputs by name, in the published order: the panorama's, then the
    file's (a model that makes spheres also lays out their cube maps: `cube_map`)."""
    described = panorama_inputs(predictor.geometry, predictor.control)
    sphere = {CUBE_MAP_INPUT.name: CUBE_MAP_INPUT} if "sphere" in described else {}
    return {**described, **sphere, **OUTPUT_INPUTS}


def cog_type(spec: Input) -> str:
    """The annotation of an input: an image is an uploaded file, which cog passes as a Path;
    an optional one (default None) is `Path | None`, which cog's schema leaves out of the
    required inputs (a plain annotation with a default of None would be required)."""
    kind = "Path" if spec.type is Image.Image else spec.type.__name__
    return f"{kind} | None" if spec.default is None else kind


def keywords(spec: Input) -> dict[str, Any]:
    """The `Input(...)` keywords of an input, with their values, in the order written.

    What cog has no keyword for (`multiple_of`) or cannot hold (a bound a float64 cannot
    hold exactly: the seed's 2**64 - 1) is left to the library's check, which refuses it by
    name. An input where 0 means something (`zero`) is published from 0.
    """
    found: dict[str, Any] = {"description": spec.help}
    if not spec.required:
        found["default"] = spec.default
    bounds = {"ge": 0 if spec.zero else spec.ge, "le": spec.le}
    for key, bound in bounds.items():
        if bound is not None and float(bound) == bound:
            found[key] = bound
    if spec.max_length is not None:
        found["max_length"] = spec.max_length
    if spec.choices is not None:
        found["choices"] = list(spec.choices)
    return found


def published(predictor: Predictor) -> dict[str, dict[str, Any]]:
    """What `cog build` publishes of the predictor's inputs when they are written by this
    module, in schema.published_inputs' shape (bounds as floats)."""
    inputs = {}
    for name, spec in inputs_of(predictor).items():
        fields = {"type": cog_type(spec)}
        for key, value in keywords(spec).items():
            fields[key] = float(value) if key in ("ge", "le") else value
        inputs[name] = fields
    return inputs


def literal(value: Any) -> str:
    """`value` as Python source that cog reads as the same value.

    cog publishes a string as the text between its quotes, so a string that would need an
    escape is refused here rather than published with the backslash.
    """
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cog cannot read the number {value!r}")
        return repr(value)
    if isinstance(value, str):
        if "\\" in value or not value.isprintable():
            raise ValueError(f"{value!r} needs an escape, which cog would publish as written")
        if '"' not in value:
            return f'"{value}"'
        if "'" not in value:
            return f"'{value}'"
        raise ValueError(f"{value!r} has both quotes: one of them needs an escape")
    if isinstance(value, list):
        return "[" + ", ".join(literal(item) for item in value) + "]"
    raise ValueError(f"cog cannot read a {type(value).__name__} literal: {value!r}")


def _line(text: str) -> str:
    """One line, marked for ruff where it has to be longer than its limit."""
    return text if len(text) <= LINE_LENGTH else f"{text}  # noqa: E501"


def _constant(name: str, value: str, taken: dict[str, str]) -> str:
    """The name of the module constant holding an input's description: `<NAME>_HELP`, its
    first words dropped where that lets the assignment fit on its line (which ruff format
    would otherwise wrap in parentheses, an expression cog does not read)."""
    words = name.upper().split("_")
    names = [f"{'_'.join(words[i:])}_HELP" for i in range(len(words))]
    names = [constant for constant in names if constant not in taken]
    if not names:
        raise ValueError(f"no name left for the description of {name}")
    fits = [constant for constant in names if len(f"{constant} = {value}") <= LINE_LENGTH]
    return fits[0] if fits else names[0]


def _parameter(name: str, spec: Input, indent: str, constants: dict[str, str]) -> list[str]:
    """The parameter's lines, laid out as ruff format lays them out: on one line where it
    fits, else its keywords on one line inside the call, else one keyword a line (and a list
    too long for that, one item a line). A description too long for its own line inside the
    call becomes a module constant."""
    raw = keywords(spec)
    values = {key: literal(value) for key, value in raw.items()}
    inner = indent + INDENT
    if len(f"{inner}description={values['description']},") > LINE_LENGTH:
        constant = _constant(name, values["description"], constants)
        constants[constant] = values["description"]
        values["description"] = constant
    arguments = [f"{key}={value}" for key, value in values.items()]
    head = f"{indent}{name}: {cog_type(spec)} = Input("
    if len(one_line := f"{head}{', '.join(arguments)}),") <= LINE_LENGTH:
        return [one_line]
    if len(hugged := f"{inner}{', '.join(arguments)}") <= LINE_LENGTH:
        return [head, hugged, f"{indent}),"]
    lines = [head]
    for key, value in values.items():
        if len(line := f"{inner}{key}={value},") <= LINE_LENGTH or not isinstance(raw[key], list):
            lines.append(line)
        else:  # a list too long for its line: one item a line
            items = [f"{inner}{INDENT}{literal(item)}," for item in raw[key]]
            lines += [f"{inner}{key}=[", *items, f"{inner}],"]
    return [*lines, f"{indent}),"]


def regions(predictor: Predictor, indent: str) -> dict[Region, list[str]]:
    """The lines of each region, the parameters at `indent`."""
    constants: dict[str, str] = {}
    parameters = [indent + WHERE]
    for name, spec in inputs_of(predictor).items():
        parameters += _parameter(name, spec, indent, constants)
    descriptions = [WHERE]
    if constants:
        descriptions.append("# The descriptions too long for their line inside Input(...):")
    descriptions += [_line(f"{name} = {value}") for name, value in constants.items()]
    return {INPUTS: parameters, DESCRIPTIONS: descriptions}


def _span(lines: list[str], region: Region, path: str) -> tuple[int, int, str]:
    """(begin line, end line, the begin marker's indentation) of `region` in `lines`."""
    found = []
    for marker in (region.begin, region.end):
        at = [i for i, line in enumerate(lines) if line.strip() == marker]
        if len(at) != 1:
            how = "no" if not at else f"{len(at)} lines"
            raise StaleError(f"{path} has {how} {marker!r}: put the line back once")
        found.append(at[0])
    begin, end = found
    if end < begin:
        raise StaleError(f"{path}: {region.end!r} comes before {region.begin!r}")
    return begin, end, re.match(r"\s*", lines[begin])[0]


def generate(text: str, predictor: Predictor, path: str = "the predictor") -> str:
    """The predictor's source `text` with its two regions written afresh."""
    lines = text.splitlines()
    spans = {region: _span(lines, region, path) for region in (INPUTS, DESCRIPTIONS)}
    written = regions(predictor, spans[INPUTS][2])
    # The later region first, so the earlier one's line numbers still hold.
    for region, (begin, end, _) in sorted(spans.items(), key=lambda item: -item[1][0]):
        lines[begin + 1 : end] = written[region]
    return "\n".join(lines) + "\n"


def stale(root: Path = ROOT) -> dict[str, str]:
    """The predictor files under `root` that are not what this module writes: {file name: the
    text it writes}."""
    found = {}
    for name, predictor in PREDICTORS.items():
        text = (root / name).read_text()
        if (fresh := generate(text, predictor, name)) != text:
            found[name] = fresh
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description="Write the Cog predictors' Input(...) parameters "
        f"({', '.join(PREDICTORS)}) from syncdiffusion/request/inputs.py.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1, naming them, if any file is not what would be written",
    )
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="the checkout that holds the predictors"
    )
    args = parser.parse_args(argv)
    try:
        changed = stale(args.root)
    except (OSError, StaleError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.check:
        if changed:
            print(
                f"{', '.join(changed)}: the inputs are not those of syncdiffusion/request/inputs.py"
                f"; run: {COMMAND}",
                file=sys.stderr,
            )
            return 1
        print(f"{', '.join(PREDICTORS)}: up to date")
        return 0
    for name, text in changed.items():
        (args.root / name).write_text(text)
        print(f"wrote {name}")
    if not changed:
        print(f"{', '.join(PREDICTORS)}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
