"""The Cog predictor: its schema is static and published, and it runs in process."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
from PIL import Image

from syncdiffusion import InputError, SyncDiffusionPipeline, __version__, checks
from syncdiffusion.files import read_parameters
from syncdiffusion.testing.cog_schema import published_inputs, python_inputs

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {
    # name: (type, default, ge, le) as the published wrapper has them (docs/ALGORITHM.md),
    # but for the sides, which go up to 4096 (any multiple of 8), and the two output inputs at
    # the end.
    "prompt": ("str", None, None, None),
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
    "output_format": ("str", "png", None, None),
    "output_quality": ("int", 80, 1, 100),
}


def _predict_inputs() -> dict[str, tuple[str, dict[str, ast.expr]]]:
    tree = ast.parse((ROOT / "predict.py").read_text())
    predictor = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Predictor")
    predict = next(n for n in predictor.body if isinstance(n, ast.FunctionDef) and n.name == "run")
    args = predict.args.args[1:]
    defaults = predict.args.defaults
    assert len(args) == len(defaults), "every input needs an Input(...) default"
    inputs = {}
    for arg, default in zip(args, defaults, strict=True):
        assert isinstance(default, ast.Call) and ast.unparse(default.func) == "Input", arg.arg
        assert not default.args, f"{arg.arg}: Input(...) takes keywords only"
        inputs[arg.arg] = (ast.unparse(arg.annotation), {k.arg: k.value for k in default.keywords})
    return inputs


def _constants(tree: ast.Module) -> set[str]:
    return {
        t.id
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }


def test_every_input_field_is_a_literal_cog_build_can_read():
    constants = _constants(ast.parse((ROOT / "predict.py").read_text()))
    for name, (_, keywords) in _predict_inputs().items():
        for key, value in keywords.items():
            if isinstance(value, ast.Name):
                assert value.id in constants, f"{name}.{key} must be a literal or module constant"
            else:
                # literal_eval refuses calls, attributes and names: what `cog build` cannot read.
                ast.literal_eval(value)
        description = keywords.get("description")
        assert isinstance(description, ast.Constant | ast.Name), f"{name} needs a description"


@pytest.mark.parametrize("predictor", ["predict.py", "predict_sdxl.py"])
def test_what_cog_build_publishes_is_what_the_code_means(predictor):
    # cog reads the file with tree-sitter and takes a string's text between its outer quotes:
    # adjacent literals or escapes would be published as written, not as Python joins them.
    published, meant = published_inputs(ROOT / predictor), python_inputs(ROOT / predictor)
    assert list(published) == list(meant)
    for name, fields in published.items():
        assert fields == meant[name], f"{predictor}: {name} is published as {fields}"
        assert "description" in fields, f"{predictor}: {name} has no description cog can read"


def test_inputs_are_the_published_ones():
    inputs = python_inputs(ROOT / "predict.py")
    assert list(inputs) == list(PUBLISHED)
    for name, (kind, default, ge, le) in PUBLISHED.items():
        fields = inputs[name]
        read = (fields["type"], fields.get("default"), fields.get("ge"), fields.get("le"))
        assert read == (kind, default, ge, le), name


def test_pipeline_and_checks_agree_with_the_schema():
    signature = inspect.signature(SyncDiffusionPipeline.__call__).parameters
    for name, (_, default, _, _) in PUBLISHED.items():
        if name not in ("prompt", "output_format", "output_quality"):
            assert signature[name].default == default, name
    assert (checks.MIN_SIDE, checks.MAX_SIDE) == (512, 4096)
    choices = ast.literal_eval(_predict_inputs()["output_format"][1]["choices"])
    assert tuple(choices) == checks.OUTPUT_FORMATS
    assert checks.OUTPUT_QUALITY_RANGE == (1, 100)
    assert checks.GUIDANCE_SCALE_RANGE == (0, 20)
    assert checks.SYNC_WEIGHT_RANGE == (0, 30)
    assert checks.SYNC_DECAY_RATE_RANGE == (0, 1)
    assert checks.SYNC_THRESHOLD_RANGE == (0, 50)
    assert checks.NUM_INFERENCE_STEPS_RANGE == (1, 200)
    assert checks.STRIDE_RANGE == (8, 56)


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


DEFAULTS = {name: default for name, (_, default, _, _) in PUBLISHED.items()}


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
        **{k: v for k, v in DEFAULTS.items() if k not in ("output_format", "output_quality")},
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


def test_cog_yaml_runs_the_predictor_on_the_sdk_the_tests_use():
    config = (ROOT / "cog.yaml").read_text()
    tested = re.search(r"^cog==(\S+)", (ROOT / "requirements-dev.txt").read_text(), re.M)[1]
    assert re.search(rf'^  sdk_version: "{re.escape(tested)}"$', config, re.M), tested
    assert re.search(r'^run: "predict.py:Predictor"$', config, re.M)
    assert not re.search(r"^predict:", config, re.M)  # the deprecated name of run:
