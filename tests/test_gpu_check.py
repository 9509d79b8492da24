"""The prepared GPU check, run as its CPU smoke test so that the GPU run is never its first."""

from __future__ import annotations

import json

import gpu_check
import pytest


@pytest.mark.slow
def test_the_gpu_check_runs_every_section_on_the_cpu(tiny_weights, tmp_path):
    assert (
        gpu_check.main(["--smoke", "--out", str(tmp_path), "--tiny-weights", str(tiny_weights)])
        == 0
    )

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
