"""The Cog predictor: its schema is static and published, and it runs in process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from syncdiffusion import InputError, __version__
from syncdiffusion.core.control import image_record
from syncdiffusion.core.windows import Geometry
from syncdiffusion.replicate import predictors
from syncdiffusion.replicate.schema import (
    openapi_document,
    openapi_text,
    published_inputs,
    python_inputs,
    write_openapi_schema,
)
from syncdiffusion.request.image_file import read_parameters
from syncdiffusion.request.inputs import (
    CUBE_MAP_INPUT,
    IMAGE_INPUTS,
    LORA_INPUTS,
    OUTPUT_INPUTS,
    REQUIRED,
    Input,
    panorama_inputs,
)

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {
    # name: (type, default, ge, le) as the published wrapper has them (docs/ALGORITHM.md),
    # but for the sides, which go up to 4096 (any multiple of 8), the seed's top bound (the
    # library's, not published), the whole sphere (off by default) and its caps' own prompts,
    # the scheduler (DDIM, the published one, by default) and the inputs of a panorama from an
    # image and the LoRAs, as cog-flux's with its bounds (all optional, so a request without
    # them is published as before), the sphere's cube map in one file (none by default) and
    # the two output inputs at the end.
    "prompt": ("str", REQUIRED, None, None),
    "negative_prompt": ("str", "", None, None),
    "width": ("int", 2048, 512, 4096),
    "height": ("int", 512, 512, 4096),
    "guidance_scale": ("float", 7.5, 0, 20),
    "sync_weight": ("float", 20.0, 0, 30),
    "sync_decay_rate": ("float", 0.99, 0, 1),
    "sync_freq": ("int", 1, 1, None),
    "sync_threshold": ("int", 5, 0, 50),
    "num_inference_steps": ("int", 50, 1, 200),
    "stride": ("int", 16, 8, 56),
    "seed": ("int", 2, 0, None),
    "loop_closure": ("bool", False, None, None),
    "sphere": ("bool", False, None, None),
    "sky_prompt": ("str", "", None, None),
    "ground_prompt": ("str", "", None, None),
    "scheduler": ("str", "DDIM", None, None),
    "image": ("Image", None, None, None),
    "mask": ("Image", None, None, None),
    "prompt_strength": ("float", 0.8, 0, 1),
    "lora_weights": ("str", None, None, None),
    "lora_scale": ("float", 1.0, -1, 3),
    "extra_lora": ("str", None, None, None),
    "extra_lora_scale": ("float", 1.0, -1, 3),
    "cube_map": ("str", "none", None, None),
    "output_format": ("str", "png", None, None),
    "output_quality": ("int", 80, 1, 100),
}
# Each predictor's model geometry, and whether it has a ControlNet.
PREDICTORS = {
    "predict.py": (Geometry(), False),
    "predict_sdxl.py": (Geometry(window=128), False),
    "predict_controlnet.py": (Geometry(), True),
}
# A condition image is an uploaded file, which cog passes as a Path.
COG_TYPES = {"Image": "Path"}
# cog reads a bound as a float64, which cannot hold the seed's top bound 2**64 - 1: the
# library's check holds that one, and the schema leaves it out.
FLOAT64_EXACT = 2**53


def _published(spec_le: float | None) -> float | None:
    return None if spec_le is None or spec_le > FLOAT64_EXACT else float(spec_le)


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_what_cog_build_publishes_is_what_the_code_means(predictor):
    # cog reads the file with tree-sitter and takes a string's text between its outer quotes:
    # adjacent literals or escapes would be published as written, not as Python joins them.
    published, meant = published_inputs(ROOT / predictor), python_inputs(ROOT / predictor)
    assert list(published) == list(meant)
    for name, fields in published.items():
        assert fields == meant[name], f"{predictor}: {name} is published as {fields}"
        assert "description" in fields, f"{predictor}: {name} has no description cog can read"


@pytest.mark.parametrize("predictor, model", PREDICTORS.items())
def test_every_predictor_input_is_the_library_description(predictor, model):
    """Input by input, as `cog build` publishes it: type, default, bounds, length, choices
    and help, as the library describes them for the predictor's model. An input where 0 means
    something (a side taken from the condition image) is published with the lower bound 0."""
    published = published_inputs(ROOT / predictor)
    described = panorama_inputs(*model)
    # A model that makes spheres also writes their cube maps.
    sphere = {"cube_map": CUBE_MAP_INPUT} if "sphere" in described else {}
    described = {**described, **sphere, **OUTPUT_INPUTS}
    assert list(published) == list(described)
    for name, spec in described.items():
        fields = dict(published[name])
        kind = spec.type.__name__
        optional = " | None" if spec.default is None else ""  # an upload that may be left out
        assert fields.pop("type") == COG_TYPES.get(kind, kind) + optional, name
        assert fields.pop("description") == spec.help, name
        assert fields.pop("default", REQUIRED) == spec.default, name
        ge = 0 if spec.zero else spec.ge
        assert fields.pop("ge", None) == (None if ge is None else float(ge)), name
        assert fields.pop("le", None) == _published(spec.le), name
        assert fields.pop("max_length", None) == spec.max_length, name
        choices = fields.pop("choices", None)
        assert (tuple(choices) if choices else None) == spec.choices, name
        assert not fields, f"{predictor}: {name}: {fields} are not in the library's description"


def test_the_predictors_inputs_are_written_from_the_description():
    """Each predictor's Input(...) parameters are what the generator writes from
    syncdiffusion/request/inputs.py: an input edited there and not regenerated fails here."""
    assert {
        name: (predictor.geometry, predictor.control)
        for name, predictor in predictors.PREDICTORS.items()
    } == PREDICTORS
    stale = predictors.stale(ROOT)
    assert not stale, (
        f"{', '.join(stale)}: the inputs are not those of syncdiffusion/request/inputs.py; "
        f"run: {predictors.COMMAND}"
    )


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_the_published_schema_is_the_descriptions_byte_for_byte(predictor, tmp_path):
    # The schema `cog build` writes from the file's literals, against the one of the inputs
    # as the library describes them: the generated literals read back as the same values.
    out = write_openapi_schema(ROOT / predictor, tmp_path / "openapi_schema.json")
    described = predictors.published(predictors.PREDICTORS[predictor])
    assert out.read_bytes() == openapi_text(openapi_document(described)).encode()


def _copy_predictors(folder: Path) -> None:
    for name in PREDICTORS:
        (folder / name).write_text((ROOT / name).read_text())


def test_check_names_the_stale_predictor_and_the_command(tmp_path, capsys):
    _copy_predictors(tmp_path)
    sdxl = tmp_path / "predict_sdxl.py"
    sdxl.write_text(sdxl.read_text().replace("default=4096,", "default=3072,"))
    assert predictors.main(["--check", "--root", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "predict_sdxl.py:" in error and "predict.py" not in error
    assert "run: python -m syncdiffusion.replicate.predictors" in error
    assert predictors.main(["--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "wrote predict_sdxl.py\n"
    assert sdxl.read_text() == (ROOT / "predict_sdxl.py").read_text()
    assert predictors.main(["--check", "--root", str(tmp_path)]) == 0
    sdxl.write_text(sdxl.read_text().replace("        # --- end of inputs ---\n", ""))
    assert predictors.main(["--check", "--root", str(tmp_path)]) == 2
    assert "predict_sdxl.py has no '# --- end of inputs ---'" in capsys.readouterr().err


def test_a_new_input_is_one_edit_and_the_command(tmp_path, monkeypatch):
    # One more input in the description; the generator puts it in every predictor, as cog
    # will publish it, and the predictor passes it on with the rest.
    _copy_predictors(tmp_path)
    text = "Whether the panorama is also written upside down, for a test of one more input."
    monkeypatch.setitem(OUTPUT_INPUTS, "upside_down", Input("upside_down", bool, text, False))
    assert set(predictors.stale(tmp_path)) == set(PREDICTORS)
    assert predictors.main(["--root", str(tmp_path)]) == 0
    for name in PREDICTORS:
        published = published_inputs(tmp_path / name)
        assert list(published)[-1] == "upside_down"
        assert published["upside_down"] == {"type": "bool", "description": text, "default": False}
        assert python_inputs(tmp_path / name)["upside_down"] == published["upside_down"]


@pytest.mark.parametrize(
    "value", ["a \\ backslash", "a\nline break", "both ' and \" quotes", float("inf")]
)
def test_the_generator_refuses_a_literal_cog_would_publish_wrong(value):
    with pytest.raises(ValueError, match=r"escape|cannot read"):
        predictors.literal(value)


def test_the_library_describes_the_published_inputs():
    described = {**panorama_inputs(), "cube_map": CUBE_MAP_INPUT, **OUTPUT_INPUTS}
    assert list(described) == list(PUBLISHED)
    for name, (kind, default, ge, le) in PUBLISHED.items():
        spec = described[name]
        assert spec.type.__name__ == kind, name
        assert spec.default == default, name
        assert (spec.ge, _published(spec.le)) == (ge, le), name


@pytest.fixture(scope="module")
def predictor(tiny_weights, monkeypatch_module):
    monkeypatch_module.setenv("SYNCDIFFUSION_WEIGHTS", str(tiny_weights))
    from predict import Predictor

    predictor = Predictor()
    predictor.setup()
    return predictor


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


DEFAULTS = {
    name: None if default is REQUIRED else default for name, (_, default, _, _) in PUBLISHED.items()
}


def run(predictor, **inputs):
    """Call the predictor in process as Cog would: every input given, defaults filled in."""
    return predictor.run(**{**DEFAULTS, **inputs})


def test_predict_returns_a_png_of_the_asked_size(predictor, capsys):
    out = run(
        predictor,
        prompt="a mountain lake",
        width=768,
        sync_threshold=1,
        num_inference_steps=2,
        seed=3,
    )
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (768, 512)
    logs = capsys.readouterr().out
    assert "Using seed: 3" in logs
    assert re.search(r"^step 1/2 sync  elapsed \d+\.\ds  eta \d+\.\ds$", logs, re.MULTILINE)
    assert "step 2/2  elapsed" in logs
    assert "LPIPS" not in logs
    assert read_parameters(out) | {"model": None} == {
        # Without an image, a LoRA or a sphere, none of their inputs: a file records what it
        # recorded before they were inputs.
        **{
            k: v
            for k, v in DEFAULTS.items()
            if k
            not in (*OUTPUT_INPUTS, *IMAGE_INPUTS, *LORA_INPUTS, *LORA_INPUTS.values(), "sphere")
            and k not in ("cube_map", "sky_prompt", "ground_prompt")
        },
        "prompt": "a mountain lake",
        "width": 768,
        "sync_threshold": 1,
        "num_inference_steps": 2,
        "seed": 3,
        "model": None,
        "syncdiffusion": __version__,
    }


def test_predict_writes_webp_and_jpg_and_any_size_loops(predictor):
    out = run(
        predictor,
        prompt="a dune",
        width=1000,
        height=520,
        loop_closure=True,
        sync_threshold=0,
        num_inference_steps=1,
        output_format="webp",
        output_quality=70,
    )
    assert out.suffix == ".webp"
    with Image.open(out) as image:
        assert (image.format, image.size) == ("WEBP", (1000, 520))
    assert read_parameters(out)["loop_closure"] is True
    out = run(
        predictor,
        prompt="a dune",
        width=512,
        height=512,
        sync_threshold=0,
        num_inference_steps=1,
        output_format="jpg",
    )
    with Image.open(out) as image:
        assert image.format == "JPEG"


def test_predict_refuses_a_bad_input_by_name(predictor):
    with pytest.raises(
        InputError, match=r"width must be a multiple of 8 from 512 to 4096; got 700"
    ):
        run(predictor, prompt="x", width=700)
    with pytest.raises(InputError, match=r"output_format must be one of png, webp, jpg; got 'gif'"):
        run(predictor, prompt="x", output_format="gif")


def test_predict_takes_an_image_and_a_mask_as_uploads(predictor, tmp_path):
    photo, mask = tmp_path / "photo.png", tmp_path / "mask.jpg"
    Image.effect_noise((256, 128), 40).convert("RGB").save(photo)
    Image.linear_gradient("L").resize((256, 128)).save(mask)
    out = run(
        predictor,
        prompt="a quay",
        width=1024,
        num_inference_steps=1,
        prompt_strength=1.0,
        sync_threshold=0,
        image=Path(photo),
        mask=Path(mask),
    )
    saved = read_parameters(out)
    assert saved["image"] == image_record(Image.open(photo))
    assert saved["mask"] == image_record(Image.open(mask).convert("L"))
    Image.new("RGBA", (64, 64)).save(tmp_path / "alpha.png")
    with pytest.raises(InputError, match=r"^mask must be 8-bit RGB or grayscale .* mode RGBA"):
        run(predictor, prompt="x", image=Path(photo), mask=tmp_path / "alpha.png")


def test_cog_yaml_runs_the_predictor_on_the_sdk_the_tests_use():
    config = (ROOT / "cog.yaml").read_text()
    tested = re.search(r"^cog==(\S+)", (ROOT / "requirements-dev.txt").read_text(), re.M)[1]
    assert re.search(rf'^  sdk_version: "{re.escape(tested)}"$', config, re.M), tested
    assert re.search(r'^run: "predict.py:Predictor"$', config, re.M)
    assert not re.search(r"^predict:", config, re.M)  # the deprecated name of run:
