"""The reader of predictor files as `cog build` reads them, on small predictors of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from syncdiffusion.replicate.schema import (
    SchemaError,
    published_inputs,
    python_inputs,
    write_openapi_schema,
)

ROOT = Path(__file__).resolve().parents[1]

PREDICTOR = """
from cog import BaseRunner, Input, Path

HELP = "One literal, resolved by name."
JOINED = "two " "literals"


class Predictor(BaseRunner):
    def run(
        self,
        # a comment, which cog passes over
        prompt: str = Input(description="What it shows."),
        steps: int = Input(description="Steps " "in two pieces.", default=5, ge=1, le=-1),
        scale: float = Input(description=HELP, default=7.5),
        mode: str = Input(description=JOINED, default="a", choices=["a", "b"]),
        quoted: str = Input(description="a \\"quote\\"", default="x\\ty"),
        flag: bool = False,
    ) -> Path:
        pass
"""


@pytest.fixture
def predictor(tmp_path) -> Path:
    path = tmp_path / "predict.py"
    path.write_text(PREDICTOR)
    return path


def test_strings_are_published_as_written_between_the_outer_quotes(predictor):
    published = published_inputs(predictor)
    assert list(published) == ["prompt", "steps", "scale", "mode", "quoted", "flag"]
    assert published["prompt"] == {"type": "str", "description": "What it shows."}
    assert published["steps"] == {
        "type": "int",
        "description": 'Steps " "in two pieces.',
        "default": 5,
        "ge": 1.0,
        "le": -1.0,
    }
    assert published["scale"]["description"] == "One literal, resolved by name."
    assert published["mode"]["description"] == 'two " "literals'
    assert published["mode"]["choices"] == ["a", "b"]
    assert published["quoted"]["description"] == 'a \\"quote\\"'
    assert published["quoted"]["default"] == "x\\ty"
    assert published["flag"] == {"type": "bool", "default": False}


def test_python_means_the_joined_and_unescaped_strings(predictor):
    meant = python_inputs(predictor)
    assert meant["steps"]["description"] == "Steps in two pieces."
    assert meant["mode"]["description"] == "two literals"
    assert meant["quoted"]["description"] == 'a "quote"'
    assert meant["quoted"]["default"] == "x\ty"
    published = published_inputs(predictor)
    same = [name for name in meant if meant[name] == published[name]]
    assert same == ["prompt", "scale", "flag"]


def test_a_bound_cog_cannot_read_is_dropped_and_unreadable_choices_stop_it(tmp_path):
    path = tmp_path / "predict.py"
    path.write_text(
        PREDICTOR.replace("ge=1,", "ge=LOW,").replace('choices=["a", "b"]', "choices=MODES")
    )
    with pytest.raises(SchemaError, match="choices MODES"):
        published_inputs(path)
    path.write_text(PREDICTOR.replace("ge=1,", "ge=LOW,"))
    assert "ge" not in published_inputs(path)["steps"]
    with pytest.raises(SchemaError, match="LOW is not a literal"):
        python_inputs(path)


def test_the_schema_file_is_what_coglet_validates_against(tmp_path):
    out = write_openapi_schema(ROOT / "predict.py", tmp_path / ".cog" / "openapi_schema.json")
    schema = json.loads(out.read_text())
    assert schema["openapi"] == "3.0.2"
    components = schema["components"]["schemas"]
    inputs = components["Input"]
    assert inputs["required"] == ["prompt"]
    # An optional upload (`Path | None`) may be left out or null: the published inputs stand.
    image = inputs["properties"]["image"]
    assert image["nullable"] is True and image["format"] == "uri" and "default" not in image
    assert list(inputs["properties"])[:3] == ["prompt", "negative_prompt", "width"]
    width = inputs["properties"]["width"]
    assert width == {
        "default": 2048,
        "description": "Width in pixels, a multiple of 8. Wider than high: a horizontal panorama.",
        "maximum": 4096,
        "minimum": 512,
        "title": "Width",
        "type": "integer",
        "x-order": 2,
    }
    assert inputs["properties"]["output_format"]["allOf"] == [
        {"$ref": "#/components/schemas/output_format"}
    ]
    assert components["output_format"]["enum"] == ["png", "webp", "jpg"]
    assert components["Output"] == {"format": "uri", "title": "Output", "type": "string"}
    assert '"maximum":4096,' in out.read_text()  # Go writes a whole float64 as 4096
