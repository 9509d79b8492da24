"""The prepared GPU check, run as its CPU smoke test so that the GPU run is never its first."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from syncdiffusion.testing import measure


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
        "memory",
        "out-of-memory",
        "huge",
        "sdxl",
        "total",
    ]
    published = figures["published"]
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

    report = (tmp_path / "gpu-check.md").read_text()
    assert report.startswith("### ") and "gpu_check --smoke" in report
    assert "| published (fp32 weights, autocast) |" in report


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


def test_a_failing_section_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
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
