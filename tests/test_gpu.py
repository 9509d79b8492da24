"""What the GPU check claims, as tests of its sections' figures (syncdiffusion.testing.gpu).

Marked `gpu`: skipped without CUDA. `pytest -m gpu` on a GPU measures every selected section
once (SD2-base's and SDXL's architectures, random weights, the GPU check's sizes) and tests
it; `SYNCDIFFUSION_GPU_SMOKE=1 pytest -m gpu` does the same on the CPU with the tiny model at
the smoke sizes (minutes on two cores). `scripts/gpu_check.py` runs these tests over the figures
it has already measured and puts each outcome in its report.
"""

from __future__ import annotations

import os

import pytest
import torch

from syncdiffusion.testing.gpu.plugin import FIGURES, section_of
from syncdiffusion.testing.gpu.sections import SECTIONS, SETTINGS, measure

gpu = pytest.mark.gpu
SMOKE = "SYNCDIFFUSION_GPU_SMOKE"

# What each claim holds to, by the device the figures were measured on. On the CPU (fp32, the
# tiny model: the smoke run) the bounds the smoke test has always held: the fast path is the
# published picture to float rounding. On CUDA (fp16) they are FIRST GUESSES, not yet held
# against a GPU run: the report puts each figure beside its test's outcome, and the first run
# on a GPU confirms or corrects them.
BOUNDS = {
    "cpu": dict(oracle_pixels=2, same_call_pixels=0, chunks_of_1_pixels=1, cosine=1 - 1e-6),
    "cuda": dict(
        oracle_pixels=16,  # fp16 against fp32 weights under autocast, over 50 steps
        same_call_pixels=2,  # cuDNN and the attention kernels need not be deterministic
        chunks_of_1_pixels=4,
        cosine=0.99,
        memory_factor=2.0,  # measured peak over the estimate, either way
        free_gib_drift=1.0,  # free memory after running out against before
        lora_step_ratio=0.1,  # a step with LoRAs fused against one without, either way
    ),
}


@pytest.fixture(scope="session")
def measured(request) -> dict[str, dict]:
    """Each selected section's figures: those gpu_check.py measured, or measured here, once,
    in order (on CUDA at the GPU check's sizes; with SYNCDIFFUSION_GPU_SMOKE=1 on the CPU)."""
    supplied = request.config.stash.get(FIGURES, None)
    if supplied is not None:
        return supplied
    wanted = {section_of(item) for item in request.session.items} - {None}
    if os.environ.get(SMOKE) == "1":
        device, settings = torch.device("cpu"), SETTINGS["smoke"]
        tiny = request.getfixturevalue("tiny_weights")
    else:
        device, settings = torch.device("cuda", torch.cuda.current_device()), SETTINGS["gpu"]
        tiny = None
    return {name: figures for name, figures, _ in measure(settings, wanted, device, tiny)}


@pytest.fixture
def figures(request, measured) -> dict:
    """The figures of this test's section (its `gpu` marker's argument); a failed section
    fails its tests."""
    name = section_of(request.node)
    if measured[name].get("error"):
        pytest.fail(f"the {name} section failed: {measured[name]['error']}", pytrace=False)
    return measured[name]


@pytest.fixture
def bounds(figures) -> dict:
    return BOUNDS[figures["device"]]


@gpu("published")
def test_the_fast_path_is_the_published_picture_to_rounding_and_stays_finite(figures, bounds):
    assert figures["oracle_latent_finite"] and figures["fast_latents_finite"]
    assert figures["max_pixel_diff"] <= bounds["oracle_pixels"]


@gpu("controlnet")
def test_with_a_controlnet_the_fast_path_is_the_authors_picture_to_rounding(figures, bounds):
    assert figures["oracle_latent_finite"] and figures["fast_latents_finite"]
    assert figures["max_pixel_diff"] <= bounds["oracle_pixels"]


@gpu("repeatable")
def test_the_same_call_repeats_and_one_window_at_a_time_agrees(figures, bounds):
    # Else chunks of 1 are no comparison. On the CPU a synced step keeps one window at a time
    # (`recompute="auto"`) and only its denoising goes two at a time, which the log leaves out.
    if figures["device"] == "cuda":
        assert figures["auto_chunk"] > 1
    assert figures["max_pixel_diff_same_chunks"] <= bounds["same_call_pixels"]
    assert figures["max_pixel_diff_chunks_of_1"] <= bounds["chunks_of_1_pixels"]


@gpu("gradient")
def test_the_sync_gradient_points_where_the_fp32_one_does(figures, bounds):
    assert figures["cosine"] >= bounds["cosine"]


@gpu("memory")
def test_the_memory_estimate_is_within_a_factor_of_the_measured_peak(figures, bounds):
    ratios = {k: c["measured"] / c["estimate"] for k, c in figures["chunks"].items()}
    assert len(ratios) >= 2 and all(ratio > 0 for ratio in ratios.values())
    if figures["device"] == "cuda":  # on the CPU the peak is RSS, not comparable
        factor = bounds["memory_factor"]
        assert all(1 / factor <= ratio <= factor for ratio in ratios.values()), ratios
        kept = figures["kept"]
        assert 1 / factor <= kept["measured"] / kept["estimate"] <= factor, kept


@gpu("out-of-memory")
def test_out_of_memory_halves_the_chunk_and_then_succeeds(figures):
    asked, *fitted = figures["chunks_under_cap"]
    assert figures["halved_and_succeeded"]
    assert fitted and max(fitted) <= asked // 2


@gpu("out-of-memory")
def test_out_of_memory_at_one_window_is_a_memory_error_saying_what_to_do(figures):
    error = figures["one_window_error"]
    assert error is not None, "no MemoryError under a cap that fits no window"
    assert f"out of {figures['device']} memory even with one window at a time" in error
    assert "GiB free after clean-up" in error
    assert "the GPU is too small for this model or is shared with other work" in error


@gpu("out-of-memory")
def test_after_running_out_the_next_prediction_has_the_free_memory_back(figures, bounds):
    assert figures["next_prediction_finite"]
    if figures["device"] == "cuda":  # on the CPU other processes move the free memory
        drift = bounds["free_gib_drift"]
        assert figures["free_gib_after"] >= figures["free_gib_before"] - drift


@gpu("huge")
def test_a_huge_panorama_fits_a_24_gb_card(figures):
    assert figures["memory_error"] is None
    assert figures["latents_finite"]
    if figures["cap_gib"] is not None:  # CUDA: the whole process under the cap
        assert figures["peak_gib"] <= figures["cap_gib"]


@gpu("schedulers")
def test_karras_dpm_at_half_ddims_steps_makes_about_half_its_window_evaluations_sooner(figures):
    # On the GPU DDIM at 50 steps against KarrasDPM at 25; at the smoke sizes 8 against 4.
    ddim, karras = ({r["scheduler"]: r for r in figures["runs"]}[n] for n in ("DDIM", "KarrasDPM"))
    assert ddim["latents_finite"] and karras["latents_finite"]
    assert 2 * karras["steps"] == ddim["steps"]
    # Every window at every step, and the sync step's forwards beyond them.
    for run in (ddim, karras):
        assert run["window_evaluations"] >= figures["windows"] * run["steps"], run
    ratio = karras["window_evaluations"] / ddim["window_evaluations"]
    assert ratio < 0.6, (karras["window_evaluations"], ddim["window_evaluations"])
    # On the CPU (the smoke run, two cores shared with other work, the costly synced step
    # much of both runs) the wall time is not a comparison.
    if figures["device"] == "cuda":
        assert karras["seconds"] < ddim["seconds"], (karras["seconds"], ddim["seconds"])


@gpu("lora")
def test_with_loras_fused_a_step_costs_what_it_costs_without(figures, bounds):
    none, *fused = figures["runs"]
    assert [run["loras"] for run in figures["runs"]] == ["none", "one LoRA", "two LoRAs"]
    assert none["per_step_ratio"] == 1 and all(run["fuse_seconds"] > 0 for run in fused)
    # On the CPU (the smoke run, two cores shared with other work, a few steps) the wall time
    # is not a comparison.
    if figures["device"] == "cuda":
        ratios = [run["per_step_ratio"] for run in fused]
        assert all(abs(ratio - 1) <= bounds["lora_step_ratio"] for ratio in ratios), ratios


@gpu("lora")
def test_loras_change_the_picture_stay_finite_and_leave_the_base_weights_to_the_bit(figures):
    none, *fused = figures["runs"]
    assert all(run["latents_finite"] for run in figures["runs"])
    assert none["max_latent_diff_to_none"] == 0
    assert all(run["max_latent_diff_to_none"] > 0 for run in fused), fused  # fused, not left out
    assert figures["base_bit_identical"] and figures["base_tensors"] > 0


@gpu("sdxl")
def test_an_sdxl_panorama_runs_and_stays_finite(figures):
    assert figures["windows"] > 1 and figures["latents_finite"]


def back_offs(value, counted: bool = False) -> list:
    """Every loss-scale back-off count in `value` (figures, nested), as a flat list."""
    if isinstance(value, dict):
        return [
            n
            for key, inner in value.items()
            for n in back_offs(inner, counted or "loss_scale_back_offs" in str(key))
        ]
    if isinstance(value, list):
        return [n for inner in value for n in back_offs(inner, counted)]
    return [value] if counted else []


@pytest.mark.parametrize("section", [pytest.param(name, marks=gpu(name)) for name in SECTIONS])
def test_every_run_counts_its_loss_scale_back_offs_and_fp32_has_none(section, figures):
    counts = back_offs(figures)
    assert counts and all(isinstance(n, int) and n >= 0 for n in counts)
    if figures["device"] == "cpu":  # fp32: no loss scale, so nothing to back off
        assert set(counts) == {0}
