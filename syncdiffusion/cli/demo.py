"""The quick-start demo: a real panorama on a fresh checkout, in a time that suits the machine.

    python scripts/demo.py [CLI options]        (scripts/demo makes the environment, then this)

1. With no model in the weights folder, download it with scripts/download_weights.py (about
   3.1 GB, once). Only when a server the download needs (the model hub, download.pytorch.org)
   cannot be reached, or HF_HUB_OFFLINE is set, fall back to the tiny random test model, whose
   picture is noise, and say so.
2. On a GPU, the published defaults. On the CPU, a smaller panorama (CPU_SETTINGS), with an
   estimate of the time first; where an NVIDIA GPU is present but torch cannot use it (a driver
   too old for its CUDA, a CPU-only torch), say so and why before anything else. Any option
   given on the command line wins over the demo's.
3. Run the CLI (`python -m syncdiffusion`) with them, writing demo.png.
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from ..core.sync_schedule import synced_steps
from ..models.lpips_trunk import VGG16_RELPATH
from ..models.weights import (
    OFFLINE_ENV,
    SD_REPO_ID,
    default_weights_dir,
    hub_offline,
    missing_parts,
)
from ..request.cost import CPU_SECONDS, work
from ..request.inputs import panorama_inputs, panorama_request
from . import download

PROMPT = "a photo of a mountain range at twilight"
OUTPUT = "demo.png"
DOWNLOAD_SIZE = "about 3.1 GB"
# What tells that an NVIDIA GPU is here even when torch cannot use it: its kernel driver's file,
# or the driver's command-line tool.
NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")
NVIDIA_SMI = "nvidia-smi"
# torch's CUDA 13.0 builds (requirements.txt's) need this driver or later (NVIDIA's CUDA 13.0
# release notes).
MIN_DRIVER = 580
TINY_WEIGHTS = Path(".tiny-weights")

# The tiny model is quick at any size; these keep its run to seconds.
TINY_SETTINGS = {"width": 1024, "num_inference_steps": 4, "sync_threshold": 2}
# Without a GPU: a 2:1 panorama of three windows (stride 32 instead of 16), 10 steps of which
# the first syncs (the published 5 of 50 likewise cover the first tenth of the trajectory).
CPU_SETTINGS = {"width": 1024, "stride": 32, "num_inference_steps": 10, "sync_threshold": 1}

# The speed probe's CPU seconds where `cost.CPU_SECONDS` was measured (scripts/demo_costs.py,
# BENCHMARKS.md). CPU seconds do not change when other work shares the cores; the probe's
# wall-clock time on the user's machine turns them into that machine's seconds, its cores and
# its load included.
COST_PROBE_CPU_S = 0.089
# Peak memory of the CPU run (its synced step), as demo_costs.py measured it.
CPU_PEAK_GIB = 16.2

NETWORK_TIMEOUT_S = 10


def published_defaults() -> dict[str, Any]:
    """The inputs' defaults, which are the published wrapper's."""
    return {name: spec.default for name, spec in panorama_inputs().items() if not spec.required}


def speed_probe_seconds(clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds one UNet-sized convolution takes on this CPU (best of ten after two warm-ups),
    by `clock`: wall-clock by default, `time.process_time` for CPU seconds."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 320, 64, 64, generator=generator)
    weight = torch.randn(320, 320, 3, 3, generator=generator)
    best = float("inf")
    with torch.no_grad():
        for _ in range(2):
            torch.nn.functional.conv2d(x, weight, padding=1)
        for _ in range(10):
            start = clock()
            torch.nn.functional.conv2d(x, weight, padding=1)
            best = min(best, clock() - start)
    return best


def estimate_cpu_seconds(settings: dict[str, Any], probe_s: float) -> float:
    """Seconds SD2-base needs for a panorama on a CPU whose speed probe took `probe_s` seconds.

    Model loading is not included.
    """
    seconds = CPU_SECONDS.price(work(settings))
    return seconds * probe_s / COST_PROBE_CPU_S


def describe(settings: dict[str, Any]) -> str:
    """The settings that decide the time, in a few words."""
    s, steps = settings, settings["num_inference_steps"]
    return (
        f"{s['width']}x{s['height']}, stride {s['stride']}, {steps} step{'s' * (steps != 1)} "
        f"({synced_steps(settings)} synced)" + (", 360 degrees" if s["loop_closure"] else "")
    )


def duration(seconds: float) -> str:
    """A rough duration: "40 s", "14 min", "5.8 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def download_sources(parts: list[str]) -> list[str]:
    """A URL on each server the download of `parts` (missing_parts' names) needs."""
    from huggingface_hub import hf_hub_url

    from ..models import lpips_trunk

    hub = [hf_hub_url(SD_REPO_ID, "model_index.json")] if set(parts) - {VGG16_RELPATH} else []
    return hub + ([lpips_trunk.VGG16_URL] if VGG16_RELPATH in parts else [])


def download_unreachable(parts: list[str]) -> str | None:
    """Why the download of `parts` cannot run now (offline mode, a server that does not
    answer), or None if every server it needs answers."""
    if hub_offline():
        return f"{OFFLINE_ENV} is set"
    return next(filter(None, map(unanswered, download_sources(parts))), None)


def unanswered(url: str, timeout: float = NETWORK_TIMEOUT_S) -> str | None:
    """Why the server of `url` does not answer a HEAD request, or None if it answers."""
    host = urllib.parse.urlsplit(url).netloc
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:
        # Any answer short of a server error means the server is there; the download itself
        # reports anything else, with its fix.
        return None if exc.code < 500 else f"{host} answered HTTP {exc.code}"
    except (OSError, http.client.HTTPException) as exc:  # refused, unknown host, timeout, ...
        reason = getattr(exc, "reason", exc)
        return f"{host} cannot be reached ({' '.join(str(reason).split())})"


def nvidia_driver() -> str | None:
    """How an NVIDIA GPU shows itself here, whether or not torch can use it: "driver 535.104.05"
    (the kernel module's version file), "nvidia-smi" (on PATH), or None."""
    try:
        text = NVIDIA_DRIVER_FILE.read_text(errors="replace")
    except OSError:
        text = None
    if text is not None:
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", text)
        return f"driver {found.group(1)}" if found else f"{NVIDIA_DRIVER_FILE}"
    return NVIDIA_SMI if shutil.which(NVIDIA_SMI) else None


def cuda_unavailable_reason() -> str:
    """Why torch cannot use CUDA, in torch's own words where it gave any: the warning that
    `torch.cuda.is_available()` gives once per process, else the error of `torch.cuda.init()`."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.is_available()
    said = [str(w.message) for w in caught]
    if not said:
        try:
            torch.cuda.init()
        except Exception as error:  # torch raises RuntimeError or AssertionError, by cause
            said = [str(error)]
    text = " ".join(" ".join(said).split()).removeprefix("CUDA initialization: ")
    return text.rstrip(".") or "torch gave no reason"


def unusable_gpu_note() -> str | None:
    """What to say before a CPU run on a machine whose NVIDIA GPU torch cannot use, or None
    where there is no such GPU or torch can use it."""
    if torch.cuda.is_available() or (driver := nvidia_driver()) is None:
        return None
    if torch.version.cuda is None:
        fix = (
            "install the CUDA build that requirements.txt names (scripts/env.sh does; it needs "
            f"NVIDIA driver {MIN_DRIVER} or later)"
        )
    else:
        fix = (
            f"torch's CUDA {torch.version.cuda} build needs NVIDIA driver {MIN_DRIVER} or later: "
            "update the driver (nvidia-smi shows its version), or install a torch built for a "
            "CUDA release your driver supports (README, Requirements)"
        )
    return (
        f"An NVIDIA GPU is here ({driver}), but torch {torch.__version__} cannot use it: "
        f"{cuda_unavailable_reason()}. To use the GPU, {fix}. Until then the demo runs on the "
        "CPU, at the CPU's smaller settings."
    )


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """The options argv sets, by destination, with their values (argparse's errors and help)."""
    unset = object()
    parser.set_defaults(**dict.fromkeys(vars(parser.parse_args([])), unset))
    return {
        name: value for name, value in vars(parser.parse_args(argv)).items() if value is not unset
    }


def as_options(settings: dict[str, Any]) -> list[str]:
    """Settings as CLI options: {"num_inference_steps": 10} -> ["--num-inference-steps", "10"]."""
    return [
        item
        for name, value in settings.items()
        for item in ("--" + name.replace("_", "-"), str(value))
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit status."""
    from ..models.tiny import make_tiny_weights
    from .generate import INPUTS, build_parser, parse_args
    from .generate import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parser.prog = "scripts/demo"
    parser.description = (
        f"Make {OUTPUT} with SyncDiffusion, downloading the model first if needed. "
        "The options are the CLI's; any given wins over the demo's own choices."
    )
    given = given_options(parser, argv)
    # Said first: a GPU owner should know before a long download and a CPU run.
    if "device" not in given and (note := unusable_gpu_note()):
        print(note)

    # 1. The model: download it, or say why the tiny one stands in.
    weights = given.get("weights") or default_weights_dir()
    offline = None
    if parts := missing_parts(weights):
        offline = download_unreachable(parts)
        if offline is None:
            print(
                f"First run: downloading the model into {weights}/ ({DOWNLOAD_SIZE}, once; "
                "if it stops, running the demo again continues)."
            )
            status = download.main(["--weights", str(weights)])
            if status != 0:
                return status
    forced = []
    if offline is not None:
        again = (
            "unset HF_HUB_OFFLINE and run scripts/demo again"
            if "HF_HUB_OFFLINE" in offline
            else "run scripts/demo again with network access"
        )
        fix = f"For a real picture, {again}: it downloads the model ({DOWNLOAD_SIZE}) first."
        print(
            f"No model in {weights}/ and {offline}: using the tiny random test model, "
            f"so the picture will be noise. {fix}"
        )
        if missing_parts(TINY_WEIGHTS):
            make_tiny_weights(TINY_WEIGHTS)
        forced = ["--weights", str(TINY_WEIGHTS)]

    # 2. The settings: the demo's choices for what the command line leaves open.
    cuda = torch.cuda.is_available()
    device = torch.device(given.get("device") or ("cuda" if cuda else "cpu")).type
    choices = TINY_SETTINGS if offline else CPU_SETTINGS if device == "cpu" else {}
    if "from_png" in given:
        choices = {}  # the file holds every input
    defaults = {"prompt": PROMPT, "output": OUTPUT, **choices}
    cli_argv = as_options({k: v for k, v in defaults.items() if k not in given}) + argv + forced
    args = parse_args(cli_argv)
    # SD2-base's defaults: the demo's estimates are SD2-base's.
    settings = panorama_request(
        {name: value for name in INPUTS if (value := getattr(args, name)) is not None}
    )
    if offline is None and device == "cpu":
        chose = [name for name in choices if name not in given]
        if chose:
            print(
                f"On the CPU: {describe(settings)}, to end in reasonable time (the published "
                f"defaults: {describe(published_defaults())}). The demo chose "
                f"{', '.join('--' + name.replace('_', '-') for name in chose)}; "
                "give any to override."
            )
        else:
            print(f"On the CPU: {describe(settings)}.")
        estimate = estimate_cpu_seconds(settings, speed_probe_seconds())
        print(
            f"Estimated time on this CPU, as busy as it is now: about {duration(estimate)}, "
            "plus loading the model."
        )
        available = psutil.virtual_memory().available / 2**30
        if synced_steps(settings) and available < CPU_PEAK_GIB:
            print(
                f"Memory: the synced steps need about {CPU_PEAK_GIB:.0f} GiB and "
                f"{available:.1f} GiB is available; should the system run out, "
                "--sync-threshold 0 skips them (plain MultiDiffusion, less coherent)."
            )
    elif offline is None:
        print(f"On {device}: {describe(settings)}.")

    # 3. The panorama.
    status = cli_main(cli_argv)
    if status == 0 and offline is not None:
        print(f"{args.output} is noise: the tiny random test model made it. {fix}")
    return status
