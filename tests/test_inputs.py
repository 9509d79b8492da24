"""The description of the inputs: every rule of the published wrapper, each refusal naming input,
value and rule; defaults that follow the model's window."""

from __future__ import annotations

import re

import pytest

from syncdiffusion.core.windows import Geometry
from syncdiffusion.errors import InputError
from syncdiffusion.request.cost import LIMIT, request_cost
from syncdiffusion.request.inputs import check_output, panorama_inputs, panorama_request

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
