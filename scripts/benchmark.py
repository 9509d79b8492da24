"""Time the fast pipeline against the oracle (the published algorithm, literally) and record it.

    python scripts/benchmark.py                      # tiny model, CPU: 1024x512, 6 steps
    python scripts/benchmark.py --arch sd2           # SD2-base's real architecture, random weights
    python scripts/benchmark.py --arch sdxl          # SDXL base's architecture, random weights
    python scripts/benchmark.py --controlnet         # with a ControlNet and a condition image
    python scripts/benchmark.py --schedulers         # DDIM 50 steps against DPM++ 2M Karras 25
    python scripts/benchmark.py --lora               # no LoRA, one, two: a step's cost fused
    python scripts/benchmark.py --sphere             # a whole sphere against its band alone

Runs the oracle and the fast path (with each `recompute` mode: auto, always, never) on the same
inputs and seed in one process, alternating, counts one synced step's tensor peak of each, then
the fast path alone at several widths (time per window), prints a table and appends it,
with the machine, date and settings, to BENCHMARKS.md. On a GPU the oracle runs as published
(fp32 weights under CUDA autocast) and the fast path in fp16. The oracle is SD2-base's
algorithm, literally: for SDXL only the fast path runs (4096x1024, stride 32 by default).
With `--controlnet` both run with a ControlNet (the tiny one, or random weights of the
architecture's own shape) and a random edge map, the oracle being the authors' SyncControlNet.
With `--schedulers` the fast path alone runs with DDIM at 50 steps and DPM++ 2M Karras at 25
(`--steps` and `--sync-threshold` left out: 3 synced), and the table gives each one's seconds
and the windows its UNet predicted for. With `--lora` the fast path alone runs without a LoRA,
with one and with two (random, rank 16 on every attention projection), and the table splits
each panorama's seconds into the LoRAs' fetching, fusing and restoring, and the steps. With
`--sphere` the fast path alone makes a whole sphere (`sphere`, at least four windows wide: 2048
on the tiny model and SD2's architecture by default), its band alone and a 2:1 loop-closure
panorama of the same width, pictures, and the table gives each one's seconds and windows.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from syncdiffusion import __version__
from syncdiffusion.testing.bench import (
    LORA_RANK,
    SCHEDULER_ROWS,
    against_oracle,
    edge_map,
    fast_dtype,
    loras,
    pipelines,
    schedulers,
    spheres,
    sweep,
    table,
)
from syncdiffusion.testing.measure import machine, publish

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {  # per architecture: width, height, steps, sync_threshold, stride, sweep widths
    "tiny": (1024, 512, 6, 3, 16, "1024,2048,4096"),
    "sd2": (2048, 512, 50, 5, 16, "1024,2048,4096"),
    "sdxl": (4096, 1024, 50, 5, 32, "2048,4096"),
}


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options; those left out take the architecture's defaults (DEFAULTS)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=tuple(DEFAULTS), default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--width", type=int, default=None, help="default: 1024 tiny, 2048 sd2, 4096 sdxl"
    )
    parser.add_argument("--height", type=int, default=None, help="default: 1024 sdxl, else 512")
    parser.add_argument("--steps", type=int, default=None, help="default: 6 tiny, else 50")
    parser.add_argument("--sync-threshold", type=int, default=None, help="default: 3 tiny, else 5")
    parser.add_argument(
        "--sync-weight",
        type=float,
        default=20.0,
        help="default: 20; at 0 the fast path skips the sync step the oracle still computes",
    )
    parser.add_argument("--stride", type=int, default=None, help="default: 32 sdxl, else 16")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="oracle/fast pairs")
    parser.add_argument(
        "--scaling-widths", default=None, help='default: 1024,2048,4096; "" for no sweep'
    )
    parser.add_argument(
        "--scaling-steps",
        type=int,
        default=None,
        help="steps for the width sweep (default: 2 on CPU, --steps on GPU)",
    )
    parser.add_argument(
        "--controlnet", action="store_true", help="with a ControlNet and a condition image"
    )
    parser.add_argument(
        "--schedulers",
        action="store_true",
        help="the fast path with DDIM at 50 steps (or --steps) against KarrasDPM at half as many "
        "(sync threshold 3)",
    )
    parser.add_argument(
        "--lora",
        action="store_true",
        help="only the fast path, without a LoRA, with one and with two (random, rank 16)",
    )
    parser.add_argument(
        "--sphere",
        action="store_true",
        help="only the fast path: a whole sphere against its band alone and a 2:1 loop-closure "
        "panorama (default width: four windows)",
    )
    parser.add_argument("--record", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-record", action="store_true")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    width, height, steps, threshold, stride, widths = DEFAULTS[args.arch]
    given = (args.width, args.height, args.steps, args.sync_threshold, args.stride)
    width, height, steps, threshold, stride = (
        default if value is None else value
        for value, default in zip(given, (width, height, steps, threshold, stride), strict=True)
    )
    if args.schedulers:
        threshold = 3 if args.sync_threshold is None else args.sync_threshold
    inputs = dict(
        prompt="a photo of a mountain range at twilight",
        width=width,
        height=height,
        num_inference_steps=steps,
        sync_threshold=threshold,
        sync_weight=args.sync_weight,
        stride=stride,
        seed=args.seed,
    )
    if args.schedulers:
        return compare_schedulers(args, device, inputs)
    if args.lora:
        return compare_loras(args, device, inputs)
    if args.sphere:
        return compare_spheres(args, device, inputs)
    pipes = pipelines(args.arch, device, args.controlnet)
    if args.controlnet:
        inputs["control_image"] = edge_map(width, height, args.seed)
    name = "authors' SyncControlNet" if args.controlnet else "published"
    rows = against_oracle(pipes, inputs, args.repeats, device, name)
    print("\n".join(rows), flush=True)  # kept in the log should the sweep not finish

    scaling_steps = args.scaling_steps or (steps if device.type == "cuda" else 2)
    scaling = dict(
        inputs, num_inference_steps=scaling_steps, sync_threshold=min(threshold, scaling_steps)
    )
    # `--scaling-widths ""` sweeps nothing.
    given = widths if args.scaling_widths is None else args.scaling_widths
    scaling_widths = [int(x) for x in given.split(",") if x]
    swept = sweep(pipes.fast, scaling, scaling_widths, device)

    settings = (
        f"arch {args.arch}, {device.type} fp{torch.finfo(fast_dtype(device)).bits} (oracle fp32), "
        f"{width}x{height}, {steps} steps, sync_threshold {threshold}, "
        f"sync_weight {args.sync_weight:g}, "
        f"stride {stride}, seed {args.seed}, best of {args.repeats} alternating runs"
        + (", a ControlNet and a random edge map" if args.controlnet else "")
    )
    report = "\n".join(
        [
            f"### {datetime.date.today().isoformat()} · {args.arch} · {device.type}",
            "",
            f"- Machine: {machine(device)}",
            f"- Settings: {settings}; syncdiffusion {__version__}",
            "- Command: `python scripts/benchmark.py " + shlex.join(sys.argv[1:]) + "`",
            "",
            *table(
                "| path | size | windows | seconds | speed-up | peak memory "
                "| synced step's tensors | max latent diff | max pixel diff |",
                rows,
            ),
            "",
            *(
                [
                    f"Width sweep ({scaling_steps} steps, sync_threshold "
                    f"{scaling['sync_threshold']}): time per window should stay flat.",
                    "",
                    *table(
                        "| path | size | windows | seconds | seconds per window | peak memory |",
                        swept,
                    ),
                    "",
                ]
                if swept
                else []
            ),
        ]
    )
    publish(report, None if args.no_record else args.record)


def compare_schedulers(args: argparse.Namespace, device: torch.device, inputs: dict) -> None:
    """The fast path with each of `SCHEDULER_ROWS` (or `--steps` for DDIM and half as many for
    DPM++), recorded as its own entry."""
    pipes = pipelines(args.arch, device)
    # --steps gives DDIM's steps, and DPM++ half of them.
    runs = [(name, args.steps // (50 // n)) for name, n in SCHEDULER_ROWS] if args.steps else None
    rows = schedulers(pipes.fast, inputs, device, runs or SCHEDULER_ROWS, args.repeats)
    size = f"{inputs['width']}x{inputs['height']}"
    settings = (
        f"{size}, stride {inputs['stride']}, sync_threshold {inputs['sync_threshold']}, "
        f"sync_weight {args.sync_weight:g}, seed {args.seed}"
    )
    header = (
        "| scheduler | steps | synced | window evaluations | seconds | speed-up | peak memory |"
    )
    record_entry(args, device, "schedulers", settings, header, rows)


def compare_loras(args: argparse.Namespace, device: torch.device, inputs: dict) -> None:
    """The fast path without a LoRA, with one and with two, recorded as its own entry."""
    pipes = pipelines(args.arch, device)
    with tempfile.TemporaryDirectory() as folder:
        rows = loras(pipes.fast, inputs, device, Path(folder), args.repeats)
    size = f"{inputs['width']}x{inputs['height']}"
    settings = (
        f"{size}, stride {inputs['stride']}, {inputs['num_inference_steps']} steps, "
        f"sync_threshold {inputs['sync_threshold']}, sync_weight {args.sync_weight:g}, "
        f"seed {args.seed}, random LoRAs of rank {LORA_RANK}"
    )
    header = (
        "| LoRAs | seconds | of which fetch, fuse, restore | seconds per step "
        "| per step against none | peak memory |"
    )
    record_entry(args, device, "LoRAs", settings, header, rows)


def compare_spheres(args: argparse.Namespace, device: torch.device, inputs: dict) -> None:
    """A whole sphere against its band alone and a 2:1 loop-closure panorama, recorded as its
    own entry."""
    pipes = pipelines(args.arch, device)
    if args.width is None:  # four windows: the narrowest sphere
        inputs = {**inputs, "width": 4 * pipes.fast.window_pixels}
    rows = spheres(pipes.fast, inputs, device, args.repeats)
    settings = (
        f"width {inputs['width']}, stride {inputs['stride']}, {inputs['num_inference_steps']} "
        f"steps, sync_threshold {inputs['sync_threshold']}, sync_weight {args.sync_weight:g}, "
        f"seed {args.seed}, pictures"
    )
    header = "| panorama | size | window evaluations | seconds | against the band | peak memory |"
    record_entry(args, device, "sphere", settings, header, rows)


def record_entry(
    args: argparse.Namespace,
    device: torch.device,
    kind: str,
    settings: str,
    header: str,
    rows: list[str],
) -> None:
    """Publish one entry of its own (`kind`): the machine, the arch and precision then
    `settings`, the repeats and version, the command, and the table of `rows` under `header`."""
    report = "\n".join(
        [
            f"### {datetime.date.today().isoformat()} · {args.arch} · {device.type} · {kind}",
            "",
            f"- Machine: {machine(device)}",
            f"- Settings: arch {args.arch}, {device.type} "
            f"fp{torch.finfo(fast_dtype(device)).bits}, {settings}, best of {args.repeats}; "
            f"syncdiffusion {__version__}",
            "- Command: `python scripts/benchmark.py " + shlex.join(sys.argv[1:]) + "`",
            "",
            *table(header, rows),
            "",
        ]
    )
    publish(report, None if args.no_record else args.record)


if __name__ == "__main__":
    main()
