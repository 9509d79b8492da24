"""The prepared GPU check, run as its CPU smoke test so that the GPU run is never its first."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from syncdiffusion.testing import measure


@pytest.fixture
def gpu_check():
    """scripts/gpu_check.py as a module, fresh for each test (tests patch its checks)."""
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_gpu_check_runs_every_section_on_the_cpu(tiny_weights, tmp_path, run_script):
    args = ("--smoke", "--out", str(tmp_path), "--tiny-weights", str(tiny_weights))
    result = run_script("gpu_check.py", *args)
    assert result.returncode == 0, result.stderr

    figures = json.loads((tmp_path / "gpu-check.json").read_text())
    assert list(figures) == [
        "published",
        "repeatable",
        "gradient",
        "controlnet",
        "memory",
        "out-of-memory",
        "huge",
        "sdxl",
        "total",
    ]
    published = figures["published"]
    controlnet = figures["controlnet"]
    assert controlnet["fast_latents_finite"] and controlnet["oracle_latent_finite"]
    assert controlnet["max_pixel_diff"] <= 2  # fp32 on the CPU: the authors' picture
    assert published["fast_latents_finite"] and published["oracle_latent_finite"]
    assert published["max_pixel_diff"] <= 2  # fp32 on the CPU: the oracle's picture
    assert figures["repeatable"]["max_pixel_diff_same_chunks"] == 0
    assert figures["repeatable"]["max_pixel_diff_chunks_of_1"] <= 1
    assert figures["gradient"]["cosine"] == pytest.approx(1, abs=1e-6)  # fp32 against itself
    assert set(figures["memory"]["chunks"]) == {"1", "2"}
    oom = figures["out-of-memory"]
    assert oom["chunks_under_cap"][:2] == [2, 1] and oom["halved_and_succeeded"]
    assert "out of cpu memory even with one window" in oom["one_window_error"]
    assert oom["next_prediction_finite"]
    # fp32 on the CPU: no loss scale, so nothing to back off, but every run says so.
    assert published["fast_loss_scale_back_offs"] == 0
    assert figures["repeatable"]["loss_scale_back_offs"] == [0, 0, 0]
    assert oom["loss_scale_back_offs"] == {"under_cap": 0, "next": 0}
    assert figures["sdxl"]["loss_scale_back_offs"] == figures["huge"]["loss_scale_back_offs"] == 0
    sections = [name for name in figures if name != "total"]
    assert all(figures[name]["wall_seconds"] > 0 for name in sections)
    assert set(figures["total"]["sections"]) == set(sections)

    report = (tmp_path / "gpu-check.md").read_text()
    assert report.startswith("### ") and "gpu_check --smoke" in report
    assert "| published (fp32 weights, autocast) |" in report
    assert "| section | estimated seconds | measured seconds |" in report
    assert result.stdout.index("| total |") < result.stdout.index("Wall time")


def test_the_memory_cap_takes_cuda_as_cuda_does_and_frees_the_cache_first(monkeypatch):
    # A stand-in for torch.cuda as the check calls it, strict about the device argument as
    # set_per_process_memory_fraction is: torch.device("cuda") without an index is refused.
    from torch._utils import _get_device_index

    calls = []

    class Properties:
        total_memory = 80 * 2**30

    def fraction(value, device):
        calls.append(("fraction", round(value, 4), _get_device_index(device)))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Properties)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 8 * 2**30)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", fraction)
    monkeypatch.setattr(measure, "release_memory", lambda: calls.append("release"))
    pipe = SimpleNamespace(device=torch.device("cuda"))  # a pipeline, as far as the cap looks
    with measure.memory_cap(pipe, 2, 4 * 2**30, 8 * 2**30) as capped:
        assert capped is pipe
        calls.append("work")
    # 8 GiB allocated + 8 GiB fixed + 2 windows of 4 GiB = 24 GiB of 80; cached blocks are
    # handed back before the work, since the allocator reuses them without checking the cap.
    assert calls == [("fraction", 0.3, 0), "release", "work", ("fraction", 1.0, 0)]


def test_the_window_cost_comes_from_how_the_peak_grows_with_the_chunk():
    gib = 2**30
    memory = {
        "window_bytes": 3 * gib,
        "chunks": {1: {"measured": 6 * gib}, 4: {"measured": 15 * gib}},
    }
    assert measure.window_cost(memory) == (3 * gib, 3 * gib)  # 3 GiB a window, 3 GiB fixed
    flat = {"window_bytes": 3 * gib, "chunks": {1: {"measured": 6 * gib}, 2: {"measured": 6 * gib}}}
    assert measure.window_cost(flat) == (3 * gib, 0.0)  # no growth: the estimate


def test_the_cpu_stand_in_cap_halves_and_fails_as_a_real_one_and_leaves_the_pipeline(pipe):
    inputs = dict(prompt="a bay", height=512, num_inference_steps=1, sync_threshold=1)
    fitted = []
    with measure.memory_cap(pipe, 1.5, 0) as capped:  # 3 windows: 2 beside the anchor
        capped(
            **inputs,
            width=768,
            output_type="latent",
            view_batch_size=2,
            callback=lambda state: fitted.append(state["view_batch_size"]),
        )
    assert fitted == [1]
    with measure.memory_cap(pipe, 0.3, 0) as capped, pytest.raises(MemoryError) as failure:
        capped(**inputs, width=640, output_type="latent", view_batch_size=1)
    assert "out of cpu memory even with one window" in str(failure.value)
    assert capped.unet is pipe.unet and capped.perceptual.net is not pipe.perceptual.net


def test_a_failing_section_is_reported_and_the_others_still_run(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "load", lambda tiny, device, dtype: SimpleNamespace())

    def broken(report, *args):
        raise RuntimeError("this section broke")

    def fine(report, *args):
        report.add("huge", {"ok": True}, ["fine"])

    monkeypatch.setattr(gpu_check, "check_repeatable", broken)
    monkeypatch.setattr(gpu_check, "check_huge", fine)
    argv = ["--smoke", "--out", str(tmp_path), "--only", "repeatable", "--only", "huge"]
    assert gpu_check.main(argv) == 0
    figures = json.loads((tmp_path / "gpu-check.json").read_text())
    assert list(figures) == ["repeatable", "huge", "total"]
    assert figures["repeatable"]["error"] == "RuntimeError: this section broke"
    assert figures["repeatable"]["wall_seconds"] >= 0  # timed, failed or not
    assert figures["huge"]["ok"] and "estimated_seconds" in figures["huge"]


def _record_sections(gpu_check, monkeypatch) -> list[str]:
    """Every check replaced by one that notes its section in stdout and in the list returned."""
    ran = []
    monkeypatch.setattr(gpu_check, "load", lambda tiny, device, dtype: SimpleNamespace())
    for name in gpu_check.SECTIONS:

        def check(report, *args, name=name):
            ran.append(name)
            report.add(name, {}, [f"ran {name}"])
            return {"chunks": {}}  # what out-of-memory reads from memory's figures

        monkeypatch.setattr(gpu_check, f"check_{name.replace('-', '_')}", check)
    return ran


def test_the_estimate_is_printed_before_any_section_runs_and_only_narrows_it(
    gpu_check, tmp_path, monkeypatch, capsys
):
    ran = _record_sections(gpu_check, monkeypatch)
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    everything = capsys.readouterr().out
    assert ran == list(gpu_check.SECTIONS)
    estimate = everything[: everything.index("ran published")]
    assert estimate.startswith("Estimated seconds on an H100-class GPU")
    assert all(f"| {name} |" in estimate for name in ("loading", *gpu_check.SECTIONS, "total"))

    ran.clear()
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--only", "sdxl"]) == 0
    narrowed = capsys.readouterr().out
    assert ran == ["sdxl"]
    estimate = narrowed[: narrowed.index("ran sdxl")]
    rows = [line.split(" | ")[0] for line in estimate.splitlines() if line.startswith("| ")]
    assert rows == ["| section", "| ---", "| sdxl", "| total"]
    sdxl = gpu_check.section_work("sdxl", gpu_check.SETTINGS["smoke"], smoke=True).seconds
    assert f"| total | | | | {sdxl:.0f} of 480 |" in estimate


def test_the_gpu_run_is_estimated_within_8_minutes_and_each_section_from_its_work(gpu_check):
    settings = gpu_check.SETTINGS["gpu"]
    works = gpu_check.estimate(settings, gpu_check.SECTIONS, smoke=False)
    assert list(works) == ["loading", *gpu_check.SECTIONS]
    assert gpu_check.BUDGET_SECONDS == 480
    assert gpu_check.total_seconds(works) <= 480
    assert gpu_check.fit(settings, gpu_check.SECTIONS, False, 480) == (settings, {})
    # published at 2048x512: 13 windows, 50 steps, 5 synced; the oracle takes the anchor's
    # gradient too and runs its UNet twice, both paths decode the anchor per synced step.
    one = settings["published"]
    assert gpu_check.panorama_work(one) == gpu_check.Work(
        13 * 50,
        12 * 5,
        5 + 4,
        13 * 50 * gpu_check.WINDOW_STEP_SECONDS
        + 12 * 5 * gpu_check.GPU_SECONDS.synced_window_step
        + 9 * gpu_check.GPU_SECONDS.decode,
    )
    published = gpu_check.panorama_work(one, published=True)
    assert published[:3] == (13 * 50 + 5, 13 * 5, 9)
    # SDXL's 1024 px windows count 4 of SD2-base's 512 px ones.
    sdxl = gpu_check.panorama_work(settings["sdxl"], gpu_check.sdxl_geometry(smoke=False))
    assert sdxl.window_steps == 4 * 13 * 50
    # Without the GPU reference, and only what out-of-memory needs, the estimate shrinks.
    huge = gpu_check.estimate(settings, ["huge"], smoke=False)
    assert list(huge) == ["loading", "huge"]
    assert huge["loading"].seconds == gpu_check.LOAD_SECONDS["sd2"]


def test_over_budget_the_dearest_sections_lose_unsynced_steps_or_the_check_refuses(
    gpu_check, tmp_path, monkeypatch, capsys
):
    settings = gpu_check.SETTINGS["gpu"]
    fitted, shrunk = gpu_check.fit(settings, gpu_check.SECTIONS, False, 450)
    assert gpu_check.total_seconds(gpu_check.estimate(fitted, gpu_check.SECTIONS, False)) <= 450
    assert shrunk == {"sdxl": 50}  # the dearest section, and only as far as needed
    assert fitted["sdxl"]["num_inference_steps"] < 50
    assert fitted["sdxl"]["sync_threshold"] == settings["sdxl"]["sync_threshold"]
    assert settings["sdxl"]["num_inference_steps"] == 50  # the table itself is untouched

    ran = _record_sections(gpu_check, monkeypatch)
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--budget", "5"]) == 2
    output = capsys.readouterr()
    assert ran == [] and not (tmp_path / "gpu-check.json").exists()
    assert "| total |" in output.out
    assert "over the budget of 5 s" in output.err and "--only" in output.err
