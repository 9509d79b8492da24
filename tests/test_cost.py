"""One count of a request's work (`request.cost.work`), priced by the work limit, the demo's
estimate and the GPU check alike."""

from __future__ import annotations

import dataclasses

import pytest

from syncdiffusion.cli import demo
from syncdiffusion.core.windows import Geometry
from syncdiffusion.request.cost import CPU_SECONDS, LIMIT, MAX_COST, Rates, Work, request_cost, work
from syncdiffusion.request.inputs import panorama_inputs, panorama_request

# The published defaults: 2048x512 at stride 16 is 13 windows; 50 steps, the first 5 synced.
PUBLISHED = panorama_request({"prompt": "a beach"})


def test_the_published_defaults_count_every_window_step_and_every_synced_window():
    assert work(PUBLISHED) == Work(
        window_steps=13 * 50,
        synced_window_steps=5 * 12,  # every window but the anchor
        decodes=5 + 2048 * 512 / 512**2,  # the anchor's at each synced step, then the panorama
        controlnet_passes=0,
    )
    assert work(PUBLISHED, decoded=False).decodes == 5


def test_the_published_wrapper_runs_the_anchor_again_and_takes_its_gradient():
    ours, theirs = work(PUBLISHED), work(PUBLISHED, published=True)
    assert theirs.window_steps - ours.window_steps == 5
    assert theirs.synced_window_steps - ours.synced_window_steps == 5
    assert theirs.decodes == ours.decodes


def test_a_controlnet_runs_beside_every_unet_pass_and_three_times_per_synced_one():
    assert work(PUBLISHED, control=True).controlnet_passes == 13 * 50 + 3 * 5 * 12
    extra = (13 * 50 + 3 * 5 * 12) * LIMIT.controlnet_pass
    assert request_cost(PUBLISHED, control=True) == pytest.approx(request_cost(PUBLISHED) + extra)


def test_an_image_in_is_one_encode_of_the_panorama_s_size_outside_the_limit():
    from PIL import Image

    photo = Image.new("RGB", (640, 480))
    request = panorama_request({"prompt": "a beach", "image": photo, "prompt_strength": 0.5})
    counted = work(request)
    assert counted.encodes == 2048 * 512 / 512**2  # the canvas the image is placed on
    assert work(PUBLISHED).encodes == 0
    # Half the steps run from the image; the encode is priced by the demo, not by the limit.
    assert counted.window_steps == 13 * 25
    without = dataclasses.replace(counted, encodes=0)
    assert CPU_SECONDS.price(counted) == pytest.approx(
        CPU_SECONDS.price(without) + 4 * CPU_SECONDS.encode
    )
    assert LIMIT.price(counted) == LIMIT.price(without)
    assert 0.4 < CPU_SECONDS.encode / CPU_SECONDS.decode < 0.5


def test_an_inpainting_unet_also_encodes_the_masked_image_and_at_strength_1_not_the_image():
    from PIL import Image

    canvases = 2048 * 512 / 512**2
    assert work(PUBLISHED, inpainting=True).encodes == canvases  # the grey masked picture
    photo = Image.new("RGB", (640, 480))
    for strength, image_encodes in ((0.5, 1), (1.0, 0)):
        inputs = {"prompt": "a beach", "image": photo, "prompt_strength": strength}
        request = panorama_request(inputs)
        assert work(request).encodes == canvases
        assert work(request, inpainting=True).encodes == (image_encodes + 1) * canvases


def test_a_larger_window_counts_its_pixels_share():
    sdxl = Geometry(window=128)  # 1024 px windows: 4 times SD2-base's pixels
    request = panorama_request({"prompt": "a beach"}, sdxl)
    n = len(sdxl.windows(request))
    counted = work(request, sdxl, decoded=False)
    assert counted.window_steps == 4 * n * request["num_inference_steps"]
    assert request_cost(request, sdxl) == pytest.approx(
        4 * (n * request["num_inference_steps"] + 5 * (n - 1) * LIMIT.synced_window_step)
    )


def test_the_limit_is_the_published_wrappers_dearest_request():
    dearest = {"prompt": "a beach", "width": 3072, "height": 3072, "stride": 8}
    dearest |= {"num_inference_steps": 200, "sync_threshold": 50}
    request = panorama_request(dearest)  # exactly at the limit: accepted
    assert request_cost(request) == pytest.approx(MAX_COST)
    assert panorama_inputs()["num_inference_steps"].le == 200


def test_the_limit_and_the_demo_price_the_same_count():
    """The limit's synced window-step is the demo's CPU seconds' proportion, so both grow alike
    with every kind of work but the decodes, which the limit leaves out."""
    cpu = {**demo.CPU_SETTINGS, "prompt": demo.PROMPT}
    request = panorama_request(cpu)
    seconds = demo.estimate_cpu_seconds(request, demo.COST_PROBE_CPU_S)
    counted = work(request)
    assert seconds == pytest.approx(CPU_SECONDS.price(counted))
    decodes = counted.decodes * CPU_SECONDS.decode
    assert (seconds - decodes) / CPU_SECONDS.window_step == pytest.approx(request_cost(request))


def test_rates_price_each_kind_of_work():
    rates = Rates(window_step=1, synced_window_step=10, decode=100, controlnet_pass=1000)
    assert rates.price(Work(1, 2, 3, 4)) == 1 + 20 + 300 + 4000
    assert Work(1, 2, 3, 4) + Work(1, 1, 1, 1) == Work(2, 3, 4, 5)


def test_a_sphere_counts_its_band_and_its_two_caps():
    sphere = panorama_request({"prompt": "a sky", "sphere": True})  # 2048 wide
    assert (sphere["width"], sphere["height"], sphere["loop_closure"]) == (2048, 1024, True)
    band = panorama_request({"prompt": "a sky", "height": 680, "loop_closure": True})
    cap = panorama_request({"prompt": "a sky", "width": 512, "height": 512})
    # Each cap encodes the band's projection, and is synced to the band's anchor: its one
    # window takes the sync gradient at each of the 5 synced steps, and decodes no anchor.
    alone = work(cap)
    assert (alone.synced_window_steps, alone.decodes) == (0, 5 + 1)
    faces = dataclasses.replace(alone, synced_window_steps=5, decodes=1.0, encodes=1.0)
    assert work(cap, follows=True) == dataclasses.replace(faces, encodes=0.0)
    assert work(sphere) == work(band) + faces + faces
    extra = 2 * 5 * LIMIT.synced_window_step  # the limit does not price decodes
    assert request_cost(sphere) == pytest.approx(request_cost(band) + 2 * request_cost(cap) + extra)
