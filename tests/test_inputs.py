"""The description of the inputs: every rule of the published wrapper, each refusal naming input,
value and rule; defaults that follow the model's window."""

from __future__ import annotations

import math
import re

import pytest

from syncdiffusion.app.form import field_value, read_form
from syncdiffusion.batch.jobs import parse_setting
from syncdiffusion.cli.generate import build_parser
from syncdiffusion.core.windows import Geometry
from syncdiffusion.errors import InputError, shown
from syncdiffusion.request.cost import LIMIT, request_cost
from syncdiffusion.request.inputs import (
    CONTROL_INPUTS,
    OUTPUT_INPUTS,
    check_output,
    panorama_inputs,
    panorama_request,
)

GOOD = dict(
    prompt="a beach",
    negative_prompt="",
    width=2048,
    height=512,
    guidance_scale=7.5,
    sync_weight=20.0,
    sync_decay_rate=0.99,
    sync_freq=1,
    sync_threshold=5,
    num_inference_steps=50,
    stride=16,
    seed=2,
    loop_closure=False,
    sphere=False,
    sky_prompt="",
    ground_prompt="",
    scheduler="DDIM",
    image=None,
    mask=None,
    prompt_strength=0.8,
    lora_weights=None,
    lora_scale=1.0,
    extra_lora=None,
    extra_lora_scale=1.0,
)

ACCEPTED = [
    {},
    {"prompt": ""},
    {"prompt": "   "},
    {"width": 512, "height": 3072},
    {"width": 3072, "height": 512},
    {"width": 4096, "height": 520},
    {"width": 2000, "height": 1000},  # any multiple of 8 now, whatever the stride
    {"width": 4096, "height": 4096, "stride": 56},
    {"loop_closure": True, "height": 1024},  # 360-degree panoramas of any height
    {"guidance_scale": 0},
    {"guidance_scale": 20},
    {"sync_weight": 0.0},
    {"sync_weight": 30},
    {"sync_decay_rate": 0},
    {"sync_decay_rate": 1},
    {"sync_freq": 1000},
    {"sync_threshold": 0},
    {"sync_threshold": 50},
    {"num_inference_steps": 1},
    {"num_inference_steps": 200},
    {"stride": 8, "width": 1024},
    {"stride": 56, "width": 448 * 5, "height": 448 * 2},
    {"seed": 0},
    {"seed": 2**64 - 1},
    {"loop_closure": True},
    # The published wrapper's dearest request is the work limit itself.
    {"width": 3072, "height": 3072, "stride": 8, "num_inference_steps": 200, "sync_threshold": 50},
    # Work is counted at its cost: without a sync step, a window-step is cheap.
    {"width": 4096, "height": 4096, "stride": 8, "num_inference_steps": 200, "sync_weight": 0},
    {"prompt": "x" * 10_000, "negative_prompt": "y" * 10_000},
    # The same as the HeunDiscrete request refused below, with one network evaluation a step.
    {"width": 4096, "height": 4096, "stride": 8, "num_inference_steps": 150},
    {"scheduler": "KarrasDPM", "num_inference_steps": 25},
]

REFUSED = [
    ({"prompt": None}, "prompt must be a string of at most 10,000 characters; got None"),
    (
        {"negative_prompt": 3},
        "negative_prompt must be a string of at most 10,000 characters; got 3",
    ),
    ({"width": 384}, "width must be a multiple of 8 from 512 to 4096; got 384"),
    ({"width": 4104}, "width must be a multiple of 8 from 512 to 4096; got 4104"),
    ({"width": 2001}, "got 2001"),
    ({"height": 602}, "height must be a multiple of 8 from 512 to 4096; got 602"),
    ({"width": 2048.0}, "width must be a multiple of 8 from 512 to 4096; got 2048.0"),
    ({"guidance_scale": -0.1}, "guidance_scale must be a number from 0 to 20; got -0.1"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a number from 0 to 20; got nan"),
    ({"sync_weight": 30.5}, "sync_weight must be a number from 0 to 30; got 30.5"),
    ({"sync_decay_rate": 1.5}, "sync_decay_rate must be a number from 0 to 1; got 1.5"),
    ({"sync_freq": 0}, "sync_freq must be an integer >= 1; got 0"),
    ({"sync_threshold": 51}, "sync_threshold must be an integer from 0 to 50; got 51"),
    ({"num_inference_steps": 0}, "num_inference_steps must be an integer from 1 to 200; got 0"),
    ({"num_inference_steps": True}, "num_inference_steps must be an integer from 1 to 200"),
    ({"stride": 12}, "stride must be a multiple of 8 from 8 to 56"),
    ({"stride": 64}, "stride must be a multiple of 8 from 8 to 56"),
    ({"stride": 0}, "got 0"),
    ({"seed": -1}, "seed must be an integer from 0 to 18446744073709551615; got -1"),
    ({"seed": 2**64}, "seed must be an integer from 0"),
    ({"seed": 10**400}, "seed must be an integer from 0 to 18446744073709551615; got 1000"),
    ({"seed": 10**5000}, "got an integer of thousands of digits"),
    ({"sync_freq": -(10**400)}, "sync_freq must be an integer >= 1; got -1000"),
    ({"loop_closure": list(range(10**5))}, "got [0, 1, 2, 3"),
    ({"loop_closure": "yes"}, "loop_closure must be true or false; got 'yes'"),
    (
        {"scheduler": "Euler"},
        "scheduler must be one of DDIM, DPMSolverMultistep, HeunDiscrete, KarrasDPM, "
        "K_EULER_ANCESTRAL, K_EULER, PNDM, LCM; got 'Euler'",
    ),
    ({"scheduler": "ddim"}, "scheduler must be one of DDIM, "),
    ({"prompt": "x" * 10_001}, "prompt must be a string of at most 10,000 characters; got 10,001"),
    ({"negative_prompt": "x" * 20_000}, "negative_prompt must be a string of at most 10,000"),
    (
        {
            "width": 4096,
            "height": 4096,
            "stride": 8,
            "num_inference_steps": 200,
            "sync_threshold": 50,
        },
        "a 4096x4096 panorama at stride 8 is 3249 windows of 512 px; 200 steps with 50 synced "
        "cost 1,989,822 SD2-base window-steps, and the limit is 1,029,315",
    ),
    (
        {
            "width": 4096,
            "height": 4096,
            "stride": 8,
            "num_inference_steps": 150,
            "scheduler": "HeunDiscrete",
        },
        "a 4096x4096 panorama at stride 8 is 3249 windows of 512 px; 150 steps (299 network "
        "evaluations with HeunDiscrete) with 5 synced cost",
    ),
]


@pytest.mark.parametrize("change", ACCEPTED, ids=str)
def test_accepted(change):
    panorama_request({**GOOD, **change})


@pytest.mark.parametrize("change, message", REFUSED, ids=[message[:60] for _, message in REFUSED])
def test_refused_with_a_message_naming_input_value_and_rule(change, message):
    with pytest.raises(InputError) as error:
        panorama_request({**GOOD, **change})
    assert message in str(error.value)


@pytest.mark.parametrize(
    "output_format, output_quality, message",
    [
        ("gif", 80, "output_format must be one of png, webp, jpg; got 'gif'"),
        ("jpg", 0, "output_quality must be an integer from 1 to 100; got 0"),
        ("webp", 101, "output_quality must be an integer from 1 to 100; got 101"),
    ],
)
def test_output_checks(output_format, output_quality, message):
    with pytest.raises(InputError, match=re.escape(message)):
        check_output(output_format, output_quality)
    check_output("png", 80)


def test_every_bad_input_is_named_at_once():
    with pytest.raises(InputError) as error:
        panorama_request({**GOOD, "width": 100, "seed": -5, "sync_freq": 0})
    assert all(name in str(error.value) for name in ("width", "seed", "sync_freq"))


def test_missing_inputs_take_the_published_defaults():
    assert panorama_request({"prompt": "a beach"}) == GOOD


def test_a_missing_prompt_and_an_unknown_input_are_named():
    with pytest.raises(InputError, match=r"^prompt is required$"):
        panorama_request({})
    with pytest.raises(InputError, match="unknown input 'widht'; the inputs are prompt, "):
        panorama_request({"prompt": "x", "widht": 1024})


@pytest.mark.parametrize(
    "window, side, stride, stride_max",
    [(64, 512, 16, 56), (96, 768, 24, 88), (128, 1024, 32, 120), (32, 256, 8, 24)],
)
def test_window_inputs_follow_the_model(window, side, stride, stride_max):
    described = panorama_inputs(Geometry(window=window))
    assert (described["width"].default, described["width"].ge) == (4 * side, side)
    assert (described["height"].default, described["height"].ge) == (side, side)
    assert (described["stride"].default, described["stride"].le) == (stride, stride_max)
    assert f"a multiple of 8 under {window};" in described["stride"].help
    request = panorama_request({"prompt": "x"}, Geometry(window=window))
    assert (request["width"], request["height"], request["stride"]) == (4 * side, side, stride)
    with pytest.raises(InputError, match=rf"less than the {window}-latent window\); got {window}"):
        panorama_request({"prompt": "x", "stride": window}, Geometry(window=window))


def test_an_sdxl_window_costs_four_sd2_windows():
    # Within the old count of window-steps (2401 x 140 <= 41 x 41 x 200), at four times the cost.
    huge = {"prompt": "x", "width": 4096, "height": 4096, "stride": 8, "num_inference_steps": 140}
    with pytest.raises(InputError, match=r"is 2401 windows of 1024 px; 140 steps with 5 synced "):
        panorama_request(huge, Geometry(window=128))
    fewer_steps = panorama_request({**huge, "num_inference_steps": 50}, Geometry(window=128))
    expected = 4 * (2401 * 50 + 5 * 2400 * LIMIT.synced_window_step)
    assert request_cost(fewer_steps, Geometry(window=128)) == pytest.approx(expected)


def test_a_refusal_quotes_a_huge_value_short():
    with pytest.raises(InputError) as error:
        panorama_request({**GOOD, "loop_closure": list(range(10**5))})
    assert len(str(error.value)) < 400


@pytest.mark.parametrize(
    "name, text, position",
    [
        ("prompt", "\ud800", 0),
        ("prompt", "caf\udce9 au lait", 3),
        ("negative_prompt", "ok\udfff", 2),
    ],
)
def test_text_that_is_not_valid_unicode_is_refused_naming_the_position(name, text, position):
    """A lone surrogate (a Latin-1 byte that a UTF-8 shell or file gave Python as
    surrogateescape) cannot be encoded: refused up front, not left to fail in the tokenizer."""
    with pytest.raises(InputError) as error:
        panorama_request({**GOOD, name: text})
    message = str(error.value)
    assert message.startswith(f"{name} must be valid Unicode text (encodable as UTF-8); got ")
    assert f"{shown(text[position])} at position {position}" in message
    assert message.isascii()  # printable on any terminal
    assert not panorama_inputs()[name].accepts(text)
    with pytest.raises(InputError) as form_refused:  # the app's form, before any job is queued
        read_form({"prompt": "x", name: text}, Geometry(window=64))
    assert form_refused.value.fields == {name: message}


# --- text as an input's value: Input.parse ---------------------------------------------------

DESCRIBED = {**panorama_inputs(), **CONTROL_INPUTS, **OUTPUT_INPUTS}

PARSED = [
    # str: the text as given, spaces and all; bounds and choices are the request's check.
    ("prompt", "a lake at dawn", "a lake at dawn"),
    ("negative_prompt", "  blurry, dark ", "  blurry, dark "),
    ("negative_prompt", "", ""),
    ("output_format", "gif", "gif"),
    # int: what int() reads.
    ("width", "1024", 1024),
    ("width", " 1024\n", 1024),
    ("width", "1_024", 1024),
    ("seed", "+7", 7),
    ("seed", str(2**64 - 1), 2**64 - 1),
    ("sync_freq", "-3", -3),  # bounds are the request's check
    ("width", "0", 0),  # with a ControlNet: the condition image's; otherwise refused later
    ("output_quality", "95", 95),
    # float: what float() reads, an int's text too.
    ("guidance_scale", "7", 7.0),
    ("guidance_scale", " 7.5 ", 7.5),
    ("sync_decay_rate", ".5", 0.5),
    ("sync_weight", "2e1", 20.0),
    ("controlnet_conditioning_scale", "-1.5e-3", -1.5e-3),
    ("control_guidance_end", "inf", math.inf),
]

BOOL_SPELLINGS = [
    ("true", True),
    ("True", True),
    ("TRUE", True),
    ("tRuE", True),
    (" true ", True),
    ("false", False),
    ("False", False),
    ("FALSE", False),
    ("fAlSe", False),
    ("\tfalse\n", False),
]

NOT_PARSED = [
    ("width", "2048.0", "width must be a multiple of 8 from 512 to 4096; got '2048.0'"),
    ("width", "", "width must be a multiple of 8 from 512 to 4096; got ''"),
    ("width", "wide", "width must be a multiple of 8 from 512 to 4096; got 'wide'"),
    ("seed", "0x10", "seed must be an integer from 0 to 18446744073709551615; got '0x10'"),
    ("seed", "1e3", "seed must be an integer from 0 to 18446744073709551615; got '1e3'"),
    ("seed", "1__0", "got '1__0'"),
    ("sync_freq", "1.5", "sync_freq must be an integer >= 1; got '1.5'"),
    ("output_quality", "high", "output_quality must be an integer from 1 to 100; got 'high'"),
    ("guidance_scale", "much", "guidance_scale must be a number from 0 to 20; got 'much'"),
    ("guidance_scale", "7,5", "guidance_scale must be a number from 0 to 20; got '7,5'"),
    ("sync_weight", " ", "sync_weight must be a number from 0 to 30; got ' '"),
    ("loop_closure", "yes", "loop_closure must be true or false; got 'yes'"),
    ("loop_closure", "1", "loop_closure must be true or false; got '1'"),
    ("loop_closure", "on", "loop_closure must be true or false; got 'on'"),
    ("loop_closure", "t", "loop_closure must be true or false; got 't'"),
    ("loop_closure", "", "loop_closure must be true or false; got ''"),
    ("loop_closure", "true false", "loop_closure must be true or false; got 'true false'"),
    (
        "control_image",
        "layout.png",
        "control_image must be an image, given as a file, not as text; got 'layout.png'",
    ),
]


@pytest.mark.parametrize("name, text, value", PARSED, ids=[f"{n}={t!r}" for n, t, _ in PARSED])
def test_parse_reads_text_as_the_input_type(name, text, value):
    parsed = DESCRIBED[name].parse(text)
    assert parsed == value and type(parsed) is DESCRIBED[name].type


def test_parse_reads_nan_as_a_float_the_request_then_refuses():
    spec = DESCRIBED["guidance_scale"]
    assert math.isnan(spec.parse("nan"))
    assert (
        spec.problem(spec.parse("nan")) == "guidance_scale must be a number from 0 to 20; got nan"
    )


@pytest.mark.parametrize("text, value", BOOL_SPELLINGS, ids=[t for t, _ in BOOL_SPELLINGS])
def test_parse_reads_each_bool_spelling(text, value):
    assert DESCRIBED["loop_closure"].parse(text) is value


@pytest.mark.parametrize(
    "name, text, message", NOT_PARSED, ids=[f"{n}={t!r}" for n, t, _ in NOT_PARSED]
)
def test_parse_refuses_naming_input_text_and_what_is_allowed(name, text, message):
    spec = DESCRIBED[name]
    with pytest.raises(InputError) as refused:
        spec.parse(text)
    assert message in str(refused.value)
    assert str(refused.value).startswith(f"{name} must be {spec.allowed()}")
    assert shown(text) in str(refused.value)


def test_parse_refuses_more_digits_than_int_reads_naming_them_short():
    with pytest.raises(InputError) as refused:
        DESCRIBED["seed"].parse("9" * 5000)
    message = str(refused.value)
    assert message.startswith("seed must be an integer from 0 to 18446744073709551615; got an ")
    assert "of 5,000 digits" in message and len(message) < 200


def test_parse_reads_the_type_only_the_request_checks_the_rest():
    spec = DESCRIBED["width"]
    assert spec.parse("700") == 700
    assert spec.problem(spec.parse("700")) == (
        "width must be a multiple of 8 from 512 to 4096; got 700"
    )


# Texts without a comma: the grid form splits its values on commas.
SAME_EVERYWHERE = [
    ("negative_prompt", " blurry "),
    ("width", " 1_024"),
    ("height", "768"),
    ("stride", "+24"),
    ("guidance_scale", "7"),
    ("sync_weight", "2e1"),
    ("sync_decay_rate", ".95"),
    ("num_inference_steps", "30 "),
    ("seed", str(2**64 - 1)),
]


def cli_value(name: str, text: str):
    args = build_parser().parse_args(["--prompt", "x", "--" + name.replace("_", "-"), text])
    return getattr(args, name)


def grid_value(name: str, text: str):
    setting, values = parse_setting(f"{name}={text}")
    assert setting == name and len(values) == 1
    return values[0]


def form_value(name: str, text: str):
    return field_value(panorama_inputs()[name], text)


@pytest.mark.parametrize(
    "name, text", SAME_EVERYWHERE, ids=[f"{n}={t!r}" for n, t in SAME_EVERYWHERE]
)
def test_the_three_front_ends_read_the_same_text_alike(name, text):
    expected = panorama_inputs()[name].parse(text)
    for read in (cli_value, grid_value, form_value):
        value = read(name, text)
        assert value == expected and type(value) is type(expected), read.__name__


def test_the_front_ends_that_take_a_bool_as_text_read_it_alike():
    # The command line's is a flag (--loop-closure / --no-loop-closure), not text.
    for text, value in BOOL_SPELLINGS:
        assert grid_value("loop_closure", text.strip()) is value
        assert form_value("loop_closure", text) is value
    assert build_parser().parse_args(["--prompt", "x", "--loop-closure"]).loop_closure is True
    assert build_parser().parse_args(["--prompt", "x", "--no-loop-closure"]).loop_closure is False


@pytest.mark.parametrize(
    "name, text", [("width", "wide"), ("guidance_scale", "much"), ("seed", "1e3")]
)
def test_the_three_front_ends_refuse_the_same_text_alike(name, text, capsys):
    with pytest.raises(InputError) as refused:
        panorama_inputs()[name].parse(text)
    message = str(refused.value)
    with pytest.raises(SystemExit):
        cli_value(name, text)
    assert f"argument --{name.replace('_', '-')}: {message}" in capsys.readouterr().err
    with pytest.raises(InputError, match=re.escape(f"--set {name}: {message}")):
        grid_value(name, text)
    with pytest.raises(InputError) as form_refused:
        read_form({"prompt": "x", name: text}, Geometry(window=64))
    assert form_refused.value.fields == {name: message}


def test_the_form_gives_what_is_not_text_as_it_came():
    assert form_value("loop_closure", True) is True
    assert form_value("seed", 12) == 12
    assert field_value(CONTROL_INPUTS["control_image"], None) is None
