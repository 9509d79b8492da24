"""The prepared GPU check, run as its CPU smoke test so that the GPU run is never its first:
its budget planner, its report, and `pytest -m gpu` (tests/test_gpu.py) run inside it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from syncdiffusion.testing import measure
from syncdiffusion.testing.gpu import budget, sections
from syncdiffusion.testing.gpu.sections import SECTIONS, SETTINGS


@pytest.fixture
def gpu_check():
    """scripts/gpu_check.py as a module, fresh for each test."""
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A figure of each section that its tests read, as it lands in the report's JSON.
FIGURE = {
    "published": "max_pixel_diff",
    "repeatable": "max_pixel_diff_chunks_of_1",
    "gradient": "cosine",
    "controlnet": "max_pixel_diff",
    "memory": "window_bytes",
    "out-of-memory": "chunks_under_cap",
    "huge": "latents_finite",
    "schedulers": "evaluations_ratio",
    "lora": "per_step_ratio",
    "sdxl": "latents_finite",
}


@pytest.mark.slow
def test_the_gpu_check_runs_every_section_and_its_tests_on_the_cpu(
    tiny_weights, tmp_path, run_script
):
    args = ("--smoke", "--out", str(tmp_path), "--tiny-weights", str(tiny_weights))
    result = run_script("gpu_check.py", *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr

    figures = json.loads((tmp_path / "gpu-check.json").read_text())
    assert list(figures) == [*SECTIONS, "tests", "total"]
    report = (tmp_path / "gpu-check.md").read_text()
    for name in SECTIONS:
        assert "error" not in figures[name] and figures[name]["device"] == "cpu"
        assert FIGURE[name] in figures[name]
        assert figures[name]["wall_seconds"] > 0 and "estimated_seconds" in figures[name]
        assert f"**{name}**" in report
    assert "FAILED" not in report and "not described" not in report
    assert set(figures["memory"]["chunks"]) == {"1", "2"}

    # The claims, tested on those figures: every section's, and every test passed.
    tests = figures["tests"]
    assert {test["section"] for test in tests.values()} == set(SECTIONS)
    assert {test["outcome"] for test in tests.values()} == {"passed"}
    assert len(tests) >= 2 * len(SECTIONS)
    assert f"`pytest -m gpu` over these figures (tests/test_gpu.py): {len(tests)} passed." in report
    assert "| test_a_huge_panorama_fits_a_24_gb_card | huge | passed |" in report

    assert report.startswith("### ") and "gpu_check --smoke" in report
    assert "| published (fp32 weights, autocast) |" in report
    assert "| section | estimated seconds | measured seconds |" in report
    assert set(figures["total"]["sections"]) == set(SECTIONS)
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
    monkeypatch.setattr(sections, "load", lambda tiny, device, dtype: SimpleNamespace())

    def broken(*args):
        raise RuntimeError("this section broke")

    monkeypatch.setattr(sections, "repeatable", broken)
    monkeypatch.setattr(sections, "huge", lambda *args: {"ok": True})
    monkeypatch.setattr(gpu_check, "run_tests", lambda figures: {})
    argv = ["--smoke", "--out", str(tmp_path), "--only", "repeatable", "--only", "huge"]
    assert gpu_check.main(argv) == 0
    figures = json.loads((tmp_path / "gpu-check.json").read_text())
    assert list(figures) == ["repeatable", "huge", "tests", "total"]
    assert figures["repeatable"]["error"] == "RuntimeError: this section broke"
    assert figures["repeatable"]["wall_seconds"] >= 0  # timed, failed or not
    assert figures["huge"]["ok"] and "estimated_seconds" in figures["huge"]
    report = (tmp_path / "gpu-check.md").read_text()
    assert "FAILED: RuntimeError: this section broke" in report
    assert "(figures not described: KeyError" in report  # kept, though not what huge says


def _record_sections(gpu_check, monkeypatch) -> list[str]:
    """Every section replaced by one that notes its name in stdout and in the list returned,
    and no tests run over their figures."""
    ran = []
    monkeypatch.setattr(sections, "load", lambda tiny, device, dtype: SimpleNamespace())
    monkeypatch.setattr(gpu_check, "run_tests", lambda figures: {})
    for name in SECTIONS:

        def section(*args, name=name):
            ran.append(name)
            print(f"ran {name}")
            return {}

        monkeypatch.setattr(sections, name.replace("-", "_"), section)
    return ran


def test_the_estimate_is_printed_before_any_section_runs_and_only_narrows_it(
    gpu_check, tmp_path, monkeypatch, capsys
):
    ran = _record_sections(gpu_check, monkeypatch)
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    everything = capsys.readouterr().out
    assert ran == list(SECTIONS)
    estimate = everything[: everything.index("ran published")]
    assert estimate.startswith("Estimated seconds on an H100-class GPU")
    assert all(f"| {name} |" in estimate for name in ("loading", *SECTIONS, "total"))

    ran.clear()
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--only", "sdxl"]) == 0
    narrowed = capsys.readouterr().out
    assert ran == ["sdxl"]
    estimate = narrowed[: narrowed.index("ran sdxl")]
    rows = [line.split(" | ")[0] for line in estimate.splitlines() if line.startswith("| ")]
    assert rows == ["| section", "| ---", "| sdxl", "| total"]
    sdxl = budget.section_work("sdxl", SETTINGS["smoke"], smoke=True).seconds
    assert f"| total | | | | {sdxl:.0f} of 480 |" in estimate


# The sections that always run by default: the others are left out where they do not fit.
CORE = [name for name in SECTIONS if name not in budget.DROPPABLE]


def test_the_gpu_run_is_estimated_within_8_minutes_and_each_section_from_its_work():
    settings = SETTINGS["gpu"]
    works = budget.estimate(settings, CORE, smoke=False)
    assert list(works) == ["loading", *CORE]
    assert budget.BUDGET_SECONDS == 480
    assert budget.total_seconds(works) <= 480
    assert budget.fit(settings, CORE, False, 480) == (settings, {})
    # The schedulers and lora sections do not fit beside them: left out, the last named first,
    # and nothing else shrinks.
    assert budget.DROPPABLE == ("schedulers", "lora")
    plan = budget.plan(settings, SECTIONS, False, 480)
    assert (plan.dropped, plan.shrinks, plan.wanted) == (["lora", "schedulers"], [], set(CORE))
    assert plan.settings == settings and plan.works == works
    everything = budget.estimate(settings, SECTIONS, smoke=False)
    assert list(everything) == ["loading", *SECTIONS]
    roomy = budget.plan(settings, SECTIONS, False, budget.total_seconds(everything))
    assert (roomy.dropped, roomy.shrinks, roomy.wanted) == ([], [], set(SECTIONS))
    # Asked for by name (no droppable sections), each runs alone within the budget.
    for name in budget.DROPPABLE:
        alone = budget.plan(settings, [name], False, 480, droppable=())
        assert list(alone.works) == ["loading", name] and alone.dropped == []
        assert budget.total_seconds(alone.works) <= 480
    # Its runs at 2048x512, stride 16: 13 windows, DDIM's 50 network calls a window against
    # KarrasDPM's 25 (`cost.work` reads the request's scheduler), 3 synced steps each.
    ddim, karras = (
        budget.panorama_work({**settings["schedulers"], "scheduler": s, "num_inference_steps": n})
        for s, n in settings["scheduler_runs"]
    )
    assert settings["scheduler_runs"] == (("DDIM", 50), ("KarrasDPM", 25))
    assert (ddim.window_steps, karras.window_steps) == (13 * 50, 13 * 25)
    assert ddim.synced_window_steps == karras.synced_window_steps == 12 * 3
    assert everything["schedulers"].window_steps == 13 * 75 + 2 * 2  # and a 2-window warm-up each
    # lora's at 1024x512, stride 16: 5 windows, 20 steps, 2 synced, latents only, an untimed
    # call and then 2 repeats of 3 (none, one LoRA, two); beside them the LoRA fusings: one
    # untimed, then in each repeat each LoRA of a row twice (timed alone, and in its call).
    assert settings["lora"] == dict(
        width=1024, height=512, stride=16, num_inference_steps=20, sync_threshold=2
    )
    assert settings["lora_repeats"] == 2
    runs = 1 + 3 * 2
    lora = budget.panorama_work(settings["lora"], decoded=False)
    assert lora[:3] == (5 * 20, 4 * 2, 2)  # the anchor decoded at each synced step
    fusings = 1 + 2 * (2 * 1 + 2 * 2)
    assert everything["lora"][:3] == (runs * 100, runs * 8, runs * 2)
    seconds = runs * lora.seconds + fusings * budget.LORA_FUSE_SECONDS
    assert everything["lora"].seconds == pytest.approx(seconds)
    # published at 2048x512: 13 windows, 50 steps, 5 synced; the oracle takes the anchor's
    # gradient too and runs its UNet twice, both paths decode the anchor per synced step.
    one = settings["published"]
    assert budget.panorama_work(one) == budget.Work(
        13 * 50,
        12 * 5,
        5 + 4,
        13 * 50 * budget.WINDOW_STEP_SECONDS
        + 12 * 5 * budget.SYNCED_WINDOW_STEP_SECONDS
        + 9 * budget.DECODE_SECONDS,
    )
    published = budget.panorama_work(one, published=True)
    assert published[:3] == (13 * 50 + 5, 13 * 5, 9)
    # SDXL's 1024 px windows count 4 of SD2-base's 512 px ones.
    sdxl = budget.panorama_work(settings["sdxl"], budget.sdxl_geometry(smoke=False))
    assert sdxl.window_steps == 4 * 13 * 50
    # Without the GPU reference, and only what out-of-memory needs, the estimate shrinks.
    huge = budget.estimate(settings, ["huge"], smoke=False)
    assert list(huge) == ["loading", "huge"]
    assert huge["loading"].seconds == budget.LOAD_SECONDS["sd2"]


def test_over_budget_the_dearest_sections_lose_unsynced_steps_or_the_check_refuses(
    gpu_check, tmp_path, monkeypatch, capsys
):
    settings = SETTINGS["gpu"]
    fitted, shrunk = budget.fit(settings, CORE, False, 450)
    assert budget.total_seconds(budget.estimate(fitted, CORE, False)) <= 450
    assert shrunk == {"sdxl": 50}  # the dearest section, and only as far as needed
    assert fitted["sdxl"]["num_inference_steps"] < 50
    assert fitted["sdxl"]["sync_threshold"] == settings["sdxl"]["sync_threshold"]
    assert settings["sdxl"]["num_inference_steps"] == 50  # the table itself is untouched
    plan = budget.plan(settings, SECTIONS, False, 450)
    assert plan.settings == fitted
    assert plan.shrinks == [f"sdxl: {fitted['sdxl']['num_inference_steps']} steps rather than 50"]
    assert plan.dropped == ["lora", "schedulers"]  # left out before anything shrinks

    ran = _record_sections(gpu_check, monkeypatch)
    smoke = SETTINGS["smoke"]

    def smoke_seconds(wanted) -> float:
        return budget.total_seconds(budget.estimate(smoke, wanted, smoke=True))

    core, everything = smoke_seconds(CORE), smoke_seconds(SECTIONS)
    with_schedulers = smoke_seconds([*CORE, "schedulers"])
    # Just short of room for the lora section: it alone is left out.
    between = f"{(with_schedulers + everything) / 2:.3f}"
    assert with_schedulers < float(between) < everything
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--budget", between]) == 0
    assert ran == [name for name in SECTIONS if name != "lora"]
    assert "Left out to fit the budget: lora (run with --only)" in capsys.readouterr().out
    assert "left out: lora (run with --only)" in (tmp_path / "gpu-check.md").read_text()
    # Just short of room for the schedulers section: both are left out, unless asked for by name.
    ran.clear()
    between = f"{(core + with_schedulers) / 2:.3f}"
    assert core < float(between) < with_schedulers
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--budget", between]) == 0
    assert ran == CORE
    out = capsys.readouterr().out
    assert "Left out to fit the budget: lora, schedulers (run with --only)" in out
    assert "left out: lora, schedulers" in (tmp_path / "gpu-check.md").read_text()
    for name in budget.DROPPABLE:
        ran.clear()
        argv = ["--smoke", "--out", str(tmp_path), "--budget", between, "--only", name]
        assert gpu_check.main(argv) == 0 and ran == [name]
        assert "Left out" not in capsys.readouterr().out

    ran.clear()
    tmp_path = tmp_path / "refused"
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--budget", "5"]) == 2
    output = capsys.readouterr()
    assert ran == [] and not (tmp_path / "gpu-check.json").exists()
    assert "| total |" in output.out
    assert "over the budget of 5 s" in output.err and "--only" in output.err


def test_the_tests_run_over_the_figures_given_and_report_each_outcome(gpu_check):
    """tests/test_gpu.py inside this run, as gpu_check runs it: only the given sections' tests,
    on the given figures, each outcome with what a failure said."""
    published = {
        "device": "cpu",
        "oracle_latent_finite": True,
        "fast_latents_finite": True,
        "max_pixel_diff": 1,
        "fast_loss_scale_back_offs": 0,
    }
    outcomes = gpu_check.run_tests({"published": published})
    assert {test["section"] for test in outcomes.values()} == {"published"}
    assert {test["outcome"] for test in outcomes.values()} == {"passed"} and len(outcomes) == 2

    outcomes = gpu_check.run_tests({"published": {**published, "max_pixel_diff": 200}})
    failed = [test for test in outcomes.values() if test["outcome"] == "failed"]
    assert len(failed) == 1 and "200" in failed[0]["message"]
    assert any(gpu_check.failed(test) for test in outcomes.values())

    outcomes = gpu_check.run_tests({"sdxl": {"device": "cpu", "error": "RuntimeError: broke"}})
    messages = {test["outcome"]: test["message"] for test in outcomes.values()}
    assert list(messages) == ["error"]  # at setup: the figures fixture fails
    assert messages["error"] == "Failed: the sdxl section failed: RuntimeError: broke"
