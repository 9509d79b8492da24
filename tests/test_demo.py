"""The quick-start demo (syncdiffusion/demo.py): download or fall back, CPU settings, overrides."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import syncdiffusion.cli.generate as cli
from syncdiffusion.cli import demo, download
from syncdiffusion.request.cost import CPU_SECONDS
from syncdiffusion.request.image_file import read_parameters

ROOT = Path(__file__).resolve().parents[1]
# What the CLI takes unless told otherwise: the published wrapper's defaults.
PUBLISHED = demo.published_defaults()
# A run the tiny model finishes in a few seconds.
QUICK = ["--width", "512", "--num-inference-steps", "1", "--sync-threshold", "0"]


def run_demo(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """scripts/demo.py as scripts/demo runs it, in `cwd`, with `env` on top of a clean one."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SYNCDIFFUSION_"))}
    base["PYTHONPATH"] = str(ROOT)  # the package, as an editable install would find it
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), *args],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def in_tmp(tmp_path: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with no weights/, and the tiny model where the demo keeps it."""
    (tmp_path / demo.TINY_WEIGHTS).symlink_to(tiny_weights)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SYNCDIFFUSION_WEIGHTS", raising=False)
    return tmp_path


def assert_fell_back(result: subprocess.CompletedProcess, reason: str, output: str) -> None:
    """The demo ran on the tiny model, said why on one line and, last, that the picture is noise."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    first = next(line for line in lines if line.startswith("No model in weights"))
    assert reason in first and "tiny random test model" in first and "noise" in first
    assert "scripts/demo again" in first  # how to get the real one
    assert lines[-1].startswith(f"{output} is noise")


def test_offline_the_tiny_model_is_made_and_stands_in(tmp_path):
    args = ("--output", "x.png", "--prompt", "a bay")
    result = run_demo(tmp_path, *QUICK, *args, HF_HUB_OFFLINE="yes")  # as huggingface_hub reads it
    assert_fell_back(result, "HF_HUB_OFFLINE is set", "x.png")
    assert not (tmp_path / "weights").exists()  # no download was started
    assert not demo.missing_parts(tmp_path / demo.TINY_WEIGHTS)
    parameters = read_parameters(tmp_path / "x.png")
    assert parameters["prompt"] == "a bay"
    assert (parameters["width"], parameters["num_inference_steps"]) == (512, 1)


def test_an_unreachable_hub_falls_back_to_the_tiny_model(in_tmp):
    # Nothing listens on the discard port: the connection is refused at once.
    result = run_demo(in_tmp, *QUICK, HF_ENDPOINT="http://127.0.0.1:9")
    assert_fell_back(result, "127.0.0.1:9 cannot be reached", "demo.png")
    assert not (in_tmp / "weights").exists()
    assert read_parameters(in_tmp / "demo.png")["prompt"] == demo.PROMPT


class _Answers(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_every_server_the_download_needs_must_answer(monkeypatch):
    from syncdiffusion.models import lpips_trunk

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    everything = [demo.SD_REPO_ID.split("/")[1], demo.VGG16_RELPATH]
    hub, trunk = demo.download_sources(everything)
    assert hub.endswith("/model_index.json") and trunk == lpips_trunk.VGG16_URL
    assert demo.download_sources([demo.VGG16_RELPATH]) == [trunk]  # the model is in place
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        answering = f"http://127.0.0.1:{server.server_address[1]}/model_index.json"
        assert demo.unanswered(answering) is None
        # The hub answers but the trunk's server does not: the demo must not start a download
        # that cannot finish.
        monkeypatch.setattr(
            demo, "download_sources", lambda parts: [answering, "http://127.0.0.1:9/v"]
        )
        why = demo.download_unreachable(everything)
        assert why is not None and why.startswith("127.0.0.1:9 cannot be reached")
    finally:
        server.shutdown()


def test_no_model_and_the_hub_answers_downloads_first(in_tmp, tiny_weights, monkeypatch, capsys):
    calls = []

    def fake_download(argv):
        calls.append(argv)
        shutil.copytree(tiny_weights, argv[1])
        return 0

    monkeypatch.setattr(demo, "download_unreachable", lambda parts: None)
    monkeypatch.setattr(download, "main", fake_download)
    assert demo.main([*QUICK, "--stride", "8"]) == 0
    assert calls == [["--weights", "weights"]]
    out = capsys.readouterr().out
    assert f"downloading the model into weights/ ({demo.DOWNLOAD_SIZE}" in out
    assert "noise" not in out
    assert read_parameters(in_tmp / "demo.png")["stride"] == 8


def test_a_failed_download_stops_the_demo(in_tmp, monkeypatch):
    monkeypatch.setattr(demo, "download_unreachable", lambda parts: None)
    monkeypatch.setattr(download, "main", lambda argv: 1)
    assert demo.main(QUICK) == 1
    assert not (in_tmp / "demo.png").exists()


def test_cpu_settings_and_estimate_any_option_overrides(in_tmp, tiny_weights, capsys):
    # The real (here: tiny) model is in place and there is no GPU: the demo's CPU settings,
    # except the ones given, and an estimate before the run.
    assert not torch.cuda.is_available()
    assert demo.main(["--weights", str(tiny_weights), *QUICK]) == 0
    parameters = read_parameters(in_tmp / "demo.png")
    assert parameters["stride"] == demo.CPU_SETTINGS["stride"]  # the demo's
    assert (parameters["width"], parameters["num_inference_steps"]) == (512, 1)  # the user's
    out = capsys.readouterr().out
    assert "On the CPU: 512x512, stride 32, 1 step (0 synced), to end in reasonable time" in out
    assert "The demo chose --stride; give any to override." in out
    assert "Estimated time on this CPU, as busy as it is now: about " in out
    assert "noise" not in out


def test_demo_settings_per_machine(tiny_weights, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(cli, "main", lambda argv: seen.append(cli.parse_args(argv)) or 0)

    def chosen(*argv: str) -> dict:
        assert demo.main(["--weights", str(tiny_weights), *argv]) == 0
        args = seen.pop()
        # Options not given stay None: the model's defaults fill them in (the published ones).
        return {
            name: PUBLISHED[name] if getattr(args, name) is None else getattr(args, name)
            for name in PUBLISHED
        }

    assert chosen() == {**PUBLISHED, **demo.CPU_SETTINGS}
    assert chosen("--num-inference-steps", "50", "--stride", "16") == {
        **PUBLISHED,
        **demo.CPU_SETTINGS,
        "num_inference_steps": 50,
        "stride": 16,
    }
    capsys.readouterr()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert chosen() == PUBLISHED
    assert "On cuda: 2048x512, stride 16, 50 steps (5 synced)." in capsys.readouterr().out
    assert chosen("--device", "cpu") == {**PUBLISHED, **demo.CPU_SETTINGS}


def test_estimate_scales_with_the_work_and_the_cpu():
    assert (PUBLISHED["width"], PUBLISHED["num_inference_steps"]) == (2048, 50)
    cpu = {**PUBLISHED, **demo.CPU_SETTINGS}
    # Two cores like the measuring machine's, both busy: half its CPU seconds, in wall seconds.
    two_cores = demo.COST_PROBE_CPU_S / 2
    seconds = demo.estimate_cpu_seconds(cpu, two_cores)
    assert 3 * 60 <= seconds <= 15 * 60  # the purpose of the CPU settings
    assert demo.estimate_cpu_seconds(cpu, two_cores / 2) == pytest.approx(seconds / 2)
    assert demo.estimate_cpu_seconds(PUBLISHED, two_cores) > 10 * seconds
    unsynced = demo.estimate_cpu_seconds({**cpu, "sync_threshold": 0}, demo.COST_PROBE_CPU_S)
    synced = demo.estimate_cpu_seconds(cpu, demo.COST_PROBE_CPU_S)
    # 3 windows: the anchor's decode and the two other windows' gradients.
    extra = CPU_SECONDS.decode + 2 * CPU_SECONDS.synced_window_step
    assert synced - unsynced == pytest.approx(extra)


DRIVER_535 = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
)
TOO_OLD = (
    "CUDA initialization: The NVIDIA driver on your system is too old (found version 12020). "
    "Please update your GPU driver by downloading and installing a new version from the URL: "
    "http://www.nvidia.com/Download/index.aspx"
)


@pytest.fixture
def gpu_machine(tmp_path, monkeypatch):
    """A machine with an NVIDIA GPU whose driver torch's CUDA build cannot use: the driver's
    version file and torch's warning are faked, nvidia-smi is not on PATH."""
    version = tmp_path / "version"
    version.write_text(DRIVER_535)
    monkeypatch.setattr(demo, "NVIDIA_DRIVER_FILE", version)
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def is_available() -> bool:
        import warnings

        warnings.warn(TOO_OLD, UserWarning, stacklevel=2)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    return version


def test_an_unusable_gpu_is_named_with_torchs_reason_and_the_fix(gpu_machine):
    note = demo.unusable_gpu_note()
    assert note.startswith("An NVIDIA GPU is here (driver 535.104.05), but torch ")
    assert "The NVIDIA driver on your system is too old (found version 12020)." in note
    assert "CUDA initialization" not in note
    assert "CUDA 13.0 build needs NVIDIA driver 580 or later: update the driver" in note
    assert note.endswith("Until then the demo runs on the CPU, at the CPU's smaller settings.")


def test_torchs_reason_comes_from_init_once_its_warning_was_given(gpu_machine, monkeypatch):
    # torch warns once per process: a second look finds no warning, so init() says why.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def init() -> None:
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 12020)")

    monkeypatch.setattr(torch.cuda, "init", init)
    assert demo.cuda_unavailable_reason() == (
        "The NVIDIA driver on your system is too old (found version 12020)"
    )


def test_nvidia_smi_alone_shows_a_gpu_and_a_cpu_only_torch_is_named(gpu_machine, monkeypatch):
    gpu_machine.unlink()
    assert demo.nvidia_driver() is None
    monkeypatch.setattr(demo.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(torch.version, "cuda", None)
    note = demo.unusable_gpu_note()
    assert note.startswith("An NVIDIA GPU is here (nvidia-smi)")
    assert "is built without CUDA. To use the GPU, install the CUDA build" in note


def test_no_nvidia_gpu_or_a_usable_one_says_nothing(gpu_machine, monkeypatch):
    gpu_machine.unlink()
    assert demo.unusable_gpu_note() is None  # no GPU: the CPU run is expected
    gpu_machine.write_text(DRIVER_535)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert demo.unusable_gpu_note() is None


def test_the_demo_says_why_first_unless_a_device_is_given(
    gpu_machine, tiny_weights, in_tmp, capsys
):
    assert demo.main(["--weights", str(tiny_weights), *QUICK]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("An NVIDIA GPU is here (driver 535.104.05)")
    assert out[1].startswith("On the CPU: ")
    assert demo.main(["--weights", str(tiny_weights), *QUICK, "--device", "cpu"]) == 0
    assert "NVIDIA" not in capsys.readouterr().out
