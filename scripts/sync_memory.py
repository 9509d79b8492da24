"""Measure what one synced window costs on the CPU, and record it.

    python scripts/sync_memory.py [--no-record]

SD2-base's real architecture with random weights (`measure.sd2_pipeline`), fp32, 640x512 (the
anchor and one synced window), one step: the peak RSS of that step synced and not synced, each
in a fresh process (glibc does not hand the heap back), their difference, and the synced
step's seconds, the synced step recomputing its activations (`recompute="always"`) and
keeping them (`"never"`, which `"auto"` chooses where they fit). Prints the figures and appends
them, with the machine, date and settings, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from syncdiffusion.testing.measure import PeakMemory, machine, publish, sd2_pipeline

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(prompt="a photo of a mountain range at twilight", width=640, height=512)


def one(kind: str) -> None:
    """One run in this process: print its peak RSS and seconds as JSON."""
    device = torch.device("cpu")
    pipe = sd2_pipeline(device, torch.float32)
    sync_threshold = 0 if kind == "plain" else 1
    recompute = "never" if kind == "keep" else "always"
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        pipe(
            **SETTINGS,
            num_inference_steps=1,
            sync_threshold=sync_threshold,
            recompute=recompute,
            output_type="latent",
        )
        seconds = time.perf_counter() - start
    print(json.dumps({"peak": memory.peak, "seconds": seconds}))


def run(kind: str) -> dict:
    command = [sys.executable, __file__, "--one", kind]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--one", choices=("plain", "synced", "keep"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one)
        return
    kinds = ("plain", "synced", "keep")
    figures = {kind: run(kind) for kind in kinds}
    gib = 2**30
    plain = figures["plain"]
    rows = [
        f"| {label} | {f['peak'] / gib:.2f} GiB | {(f['peak'] - plain['peak']) / gib:.2f} GiB "
        f"| {f['seconds']:.1f} |"
        for label, f in (
            ("not synced", plain),
            ("synced, recomputing", figures["synced"]),
            ("synced, keeping every activation", figures["keep"]),
        )
    ]
    report = "\n".join(
        [
            f"### {datetime.date.today().isoformat()} · one synced window's memory · cpu",
            "",
            f"- Machine: {machine(torch.device('cpu'))}",
            "- Settings: SD2-base architecture, random weights, fp32; 640x512 (the anchor and "
            "one synced window), stride 16, one step; each run a fresh process",
            "- Command: `python scripts/sync_memory.py`",
            "",
            "| run | peak RSS | over not synced | seconds (step, prompt included) |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )
    publish(report, None if args.no_record else args.record)


if __name__ == "__main__":
    main()
