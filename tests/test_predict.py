"""The Cog predictor: its schema is static and published, and it runs in process."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
from PIL import Image

from syncdiffusion import InputError, SyncDiffusionPipeline, checks

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {
    # name: (type, default, ge, le) as the published wrapper has them (ALGORITHM.md).
    "prompt": ("str", None, None, None),
    "negative_prompt": ("str", "", None, None),
    "width": ("int", 2048, 512, 3072),
    "height": ("int", 512, 512, 3072),
    "guidance_scale": ("float", 7.5, 0, 20),
    "sync_weight": ("float", 20.0, 0, 30),
    "sync_decay_rate": ("float", 0.99, 0, 1),
    "sync_freq": ("int", 1, 1, None),
    "sync_threshold": ("int", 5, 0, 50),
    "num_inference_steps": ("int", 50, 1, 200),
    "stride": ("int", 16, 8, 56),
    "seed": ("int", 2, 0, None),
    "loop_closure": ("bool", False, None, None),
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
        assert isinstance(keywords.get("description"), ast.Constant), f"{name} needs a description"


def test_inputs_are_the_published_ones():
    inputs = _predict_inputs()
    assert list(inputs) == list(PUBLISHED)
    for name, (kind, default, ge, le) in PUBLISHED.items():
        annotation, keywords = inputs[name]
        values = {k: ast.literal_eval(v) for k, v in keywords.items()}
        assert annotation == kind, name
        assert values.get("default") == default, name
        assert values.get("ge") == ge, name
        assert values.get("le") == le, name


def test_pipeline_and_checks_agree_with_the_schema():
    signature = inspect.signature(SyncDiffusionPipeline.__call__).parameters
    for name, (_, default, _, _) in PUBLISHED.items():
        if name != "prompt":
            assert signature[name].default == default, name
    assert (checks.MIN_SIDE, checks.MAX_SIDE) == (512, 3072)
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


def test_predict_returns_a_png_of_the_asked_size(predictor, capsys):
    out = predictor.run(
        prompt="a mountain lake",
        negative_prompt="",
        width=768,
        height=512,
        guidance_scale=7.5,
        sync_weight=20.0,
        sync_decay_rate=0.99,
        sync_freq=1,
        sync_threshold=1,
        num_inference_steps=2,
        stride=16,
        seed=3,
        loop_closure=False,
    )
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (768, 512)
    logs = capsys.readouterr().out
    assert "Using seed: 3" in logs
    assert "step 2/2" in logs
    assert "LPIPS" not in logs


def test_predict_refuses_a_bad_input_by_name(predictor):
    with pytest.raises(InputError, match=r"width must be a multiple of 128.*got 700"):
        predictor.run(
            prompt="x",
            negative_prompt="",
            width=700,
            height=512,
            guidance_scale=7.5,
            sync_weight=20.0,
            sync_decay_rate=0.99,
            sync_freq=1,
            sync_threshold=5,
            num_inference_steps=2,
            stride=16,
            seed=2,
            loop_closure=False,
        )
