"""Measure the CPU costs behind `scripts/demo`'s time estimate, and record them.

    python scripts/demo_costs.py

Builds SD2-base's real architecture with random weights (its configs in
syncdiffusion/testing/architectures/sd2-base, as
`scripts/benchmark.py --arch sd2` does), on the CPU in fp32, and times one 640x512 panorama
(two windows) for two steps, the first synced, then its decode. It counts CPU seconds (all
threads together), which other work on the same cores does not inflate, derives the per-window
costs `scripts/demo.py` estimates with, prints them and appends them to BENCHMARKS.md. Random
weights do the same arithmetic as the real ones, so the seconds carry over.

    python scripts/demo_costs.py --whole-run

checks the estimate instead: the demo's speed probe and estimate, then a whole panorama at the
demo's CPU settings, timed by the wall clock.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import time
from pathlib import Path

import torch

from syncdiffusion.cli.demo import (
    CPU_SETTINGS,
    PROMPT,
    describe,
    estimate_cpu_seconds,
    published_defaults,
    speed_probe_seconds,
)
from syncdiffusion.testing.measure import PeakMemory, machine, publish, sd2_pipeline

ROOT = Path(__file__).resolve().parents[1]


def whole_run(record: Path | None) -> None:
    """The demo's estimate against a whole run at its CPU settings."""
    device = torch.device("cpu")
    settings = {"prompt": PROMPT, **published_defaults(), **CPU_SETTINGS}
    probe = speed_probe_seconds()
    estimate = estimate_cpu_seconds(settings, probe)
    pipe = sd2_pipeline(device, torch.float32)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        pipe(**settings)
        seconds = time.perf_counter() - start
    report = "\n".join(
        [
            f"### {datetime.date.today().isoformat()} · demo estimate against a whole run · cpu",
            "",
            f"- Machine: {machine(device)}",
            f"- Settings: SD2-base architecture, random weights, fp32; {describe(settings)}",
            "- Command: `python scripts/demo_costs.py --whole-run`",
            f"- Speed probe {probe:.3f} s; estimate {estimate / 60:.1f} min; the run "
            f"{seconds / 60:.1f} min (without loading); peak RSS {memory.peak / 2**30:.2f} GiB",
            "",
        ]
    )
    publish(report, record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--whole-run", action="store_true", help="check the estimate instead")
    args = parser.parse_args()
    if args.whole_run:
        whole_run(None if args.no_record else args.record)
        return

    device = torch.device("cpu")
    probe_wall = speed_probe_seconds()
    probe_cpu = speed_probe_seconds(time.process_time)
    pipe = sd2_pipeline(device, torch.float32)

    width, height = 640, 512  # two windows at stride 16: the anchor and one synced window
    wall, cpu = [time.perf_counter()], [time.process_time()]

    def lap(_state: object = None) -> None:
        wall.append(time.perf_counter())
        cpu.append(time.process_time())

    with PeakMemory(device) as memory:
        latent = pipe(
            prompt="a photo of a mountain range at twilight",
            width=width,
            height=height,
            num_inference_steps=2,
            sync_threshold=1,
            stride=16,
            output_type="latent",
            callback=lap,
        )
        lap()
        pipe.decode(latent)
        lap()

    # Laps: the synced step (prompt encoding included), the plain step, the decode.
    cpu_laps = [b - a for a, b in itertools.pairwise(cpu)]
    wall_laps = [b - a for a, b in itertools.pairwise(wall)]
    synced, plain, _, decode = cpu_laps
    unet_s = plain / 2  # both windows, guided (two network passes each)
    decode_s = decode / (width * height / 512**2)
    # The synced step: both windows' UNet passes, the anchor's decode (and LPIPS features), and
    # the other window's gradient through LPIPS, the decoder and the UNet: the extra it costs.
    synced_s = synced - 2 * unet_s - decode_s

    figures = {
        "speed probe (COST_PROBE_CPU_S)": probe_cpu,
        "guided UNet pass per window-step (CPU_SECONDS.window_step)": unet_s,
        "synced window-step beyond its UNet pass (CPU_SECONDS.synced_window_step)": synced_s,
        "VAE decode per 512x512 (CPU_SECONDS.decode)": decode_s,
    }
    rows = [f"| {name} | {value:.3f} |" for name, value in figures.items()]
    report = "\n".join(
        [
            f"### {datetime.date.today().isoformat()} · demo time estimate · cpu",
            "",
            f"- Machine: {machine(device)}",
            "- Settings: SD2-base architecture, random weights, fp32; 640x512 (2 windows), "
            "stride 16, 2 steps, the first synced; then the 640x512 decode",
            "- Command: `python scripts/demo_costs.py`",
            f"- Wall clock: synced step {wall_laps[0]:.1f} s, plain step {wall_laps[1]:.1f} s, "
            f"decode {wall_laps[3]:.1f} s; speed probe {probe_wall:.3f} s. Peak RSS "
            f"{memory.peak / 2**30:.2f} GiB",
            "",
            "| CPU seconds | value |",
            "| --- | --- |",
            *rows,
            "",
        ]
    )
    publish(report, None if args.no_record else args.record)


if __name__ == "__main__":
    main()
