"""Time the fast pipeline against the oracle (the published algorithm, literally) and record it.

    python scripts/benchmark.py                      # tiny model, CPU: 1024x512, 6 steps
    python scripts/benchmark.py --arch sd2           # SD2-base's real architecture, random weights
    python scripts/benchmark.py --arch sdxl          # SDXL base's architecture, random weights
    python scripts/benchmark.py --controlnet         # with a ControlNet and a condition image

Runs the oracle and the fast path on the same inputs and seed in one process, alternating,
then the fast path alone at several widths (time per window), prints a table and appends it,
with the machine, date and settings, to BENCHMARKS.md. On a GPU the oracle runs as published
(fp32 weights under CUDA autocast) and the fast path in fp16. The oracle is SD2-base's
algorithm, literally: for SDXL only the fast path runs (4096x1024, stride 32 by default).
With `--controlnet` both run with a ControlNet (the tiny one, or random weights of the
architecture's own shape) and a random edge map, the oracle being the authors' SyncControlNet.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel
from PIL import Image

from syncdiffusion import SyncDiffusionPipeline, __version__
from syncdiffusion.models.tiny import (
    make_tiny_controlnet,
    make_tiny_weights,
    random_controlnet,
)
from syncdiffusion.testing.measure import machine, publish, sd2_pipeline, sdxl_pipeline, timed
from syncdiffusion.testing.oracle import oracle_panorama
from syncdiffusion.testing.oracle_controlnet import oracle_sync_controlnet

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=("tiny", "sd2", "sdxl"), default="tiny")
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
    parser.add_argument("--scaling-widths", default=None, help="default: 1024,2048,4096")
    parser.add_argument(
        "--scaling-steps",
        type=int,
        default=None,
        help="steps for the width sweep (default: 2 on CPU, --steps on GPU)",
    )
    parser.add_argument(
        "--controlnet", action="store_true", help="with a ControlNet and a condition image"
    )
    parser.add_argument("--record", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    real, sdxl = args.arch != "tiny", args.arch == "sdxl"
    width = args.width or {"tiny": 1024, "sd2": 2048, "sdxl": 4096}[args.arch]
    args.height = args.height or (1024 if sdxl else 512)
    args.stride = args.stride or (32 if sdxl else 16)
    args.scaling_widths = args.scaling_widths or ("2048,4096" if sdxl else "1024,2048,4096")
    steps = args.steps or (50 if real else 6)
    threshold = args.sync_threshold if args.sync_threshold is not None else (5 if real else 3)
    inputs = dict(
        prompt="a photo of a mountain range at twilight",
        width=width,
        height=args.height,
        num_inference_steps=steps,
        sync_threshold=threshold,
        sync_weight=args.sync_weight,
        stride=args.stride,
        seed=args.seed,
    )

    # The published wrapper keeps fp32 weights (autocast on CUDA); the product runs fp16 on GPU.
    fast_dtype = torch.float16 if device.type == "cuda" else torch.float32
    if sdxl:
        fast, oracle = sdxl_pipeline(device, fast_dtype), None
    elif real:
        fast = sd2_pipeline(device, fast_dtype)
        oracle = sd2_pipeline(device, torch.float32) if fast_dtype != torch.float32 else fast
    else:
        with tempfile.TemporaryDirectory() as folder:  # loaded, the files are not needed
            weights = make_tiny_weights(Path(folder) / "tiny")
            fast = SyncDiffusionPipeline.from_pretrained(weights, device=device, dtype=fast_dtype)
            oracle = (
                SyncDiffusionPipeline.from_pretrained(weights, device=device, dtype=torch.float32)
                if fast_dtype != torch.float32
                else fast
            )
            if args.controlnet:
                folder = make_tiny_controlnet(weights / "stable-diffusion-2-base", weights / "cn")
                controlnet = ControlNetModel.from_pretrained(folder)
    run_oracle = oracle_panorama
    if args.controlnet:
        if real:  # the architecture's own ControlNet, random weights
            controlnet = random_controlnet(fast.unet)

        def controlled(pipe: SyncDiffusionPipeline) -> SyncDiffusionPipeline:
            same = controlnet.dtype == pipe.dtype
            net = controlnet if same else copy.deepcopy(controlnet).to(pipe.dtype)
            return pipe.with_controlnet(net, "random")

        shared = oracle is fast
        fast = controlled(fast)
        oracle = fast if shared else None if oracle is None else controlled(oracle)
        layout = np.random.default_rng(args.seed).random((args.height, width)) > 0.9
        inputs["control_image"] = Image.fromarray(layout.astype(np.uint8) * 255)

        def run_oracle(pipe: SyncDiffusionPipeline, **given: object) -> tuple:
            return oracle_sync_controlnet(pipe, **given)

    def count(w: int) -> int:
        return len(
            fast.geometry.windows({"width": w, "height": args.height, "stride": args.stride})
        )

    n_windows = count(width)
    rows, oracle_times, fast_times, oracle_peaks, fast_peaks = [], [], [], [], []
    for _ in range(args.repeats):
        if oracle is not None:
            (o_image, o_latent), seconds, peak = timed(lambda: run_oracle(oracle, **inputs), device)
            oracle_times.append(seconds)
            oracle_peaks.append(peak)
        f_latent, seconds, peak = timed(lambda: fast(**inputs, output_type="latent"), device)
        fast_times.append(seconds)
        fast_peaks.append(peak)
        said = f"oracle {oracle_times[-1]:.1f}s  " if oracle_times else ""
        print(f"{said}fast {fast_times[-1]:.1f}s", flush=True)
    fast_s = min(fast_times)
    speedup, diffs = "", " | "
    if oracle is not None:
        f_image = fast.decode(f_latent)
        latent_diff = (f_latent.float() - o_latent.float()).abs().max().item()
        pixels = np.abs(np.asarray(f_image, dtype=int) - np.asarray(o_image, dtype=int))
        oracle_s, diffs = min(oracle_times), f"{latent_diff:.2e} | {pixels.max()}/255"
        name = "authors' SyncControlNet" if args.controlnet else "published"
        rows.append(
            f"| oracle ({name}) | {width}x{args.height} | {n_windows} | {oracle_s:.2f} | "
            f"1.00x | {max(oracle_peaks) / 2**30:.2f} GiB | | |"
        )
        speedup = f"{oracle_s / fast_s:.2f}x"
    rows.append(
        f"| fast | {width}x{args.height} | {n_windows} | {fast_s:.2f} | "
        f"{speedup} | {max(fast_peaks) / 2**30:.2f} GiB | {diffs} |"
    )

    # The bounded-memory setting: one window per network call, as the oracle.
    _, one_s, one_peak = timed(
        lambda: fast(**inputs, output_type="latent", view_batch_size=1), device
    )
    speedup = f"{oracle_s / one_s:.2f}x" if oracle is not None else ""
    rows.append(
        f"| fast, chunks of 1 | {width}x{args.height} | {n_windows} | {one_s:.2f} | "
        f"{speedup} | {one_peak / 2**30:.2f} GiB | | |"
    )

    scaling_steps = args.scaling_steps or (steps if device.type == "cuda" else 2)
    scaling = dict(
        inputs, num_inference_steps=scaling_steps, sync_threshold=min(threshold, scaling_steps)
    )
    sweep = []
    for w in (int(x) for x in args.scaling_widths.split(",") if x):
        n = count(w)
        _, seconds, peak = timed(
            lambda w=w: fast(**dict(scaling, width=w), output_type="latent"), device
        )
        sweep.append(
            f"| fast | {w}x{args.height} | {n} | {seconds:.2f} | "
            f"{seconds / n:.3f} | {peak / 2**30:.2f} GiB |"
        )
        print(sweep[-1], flush=True)

    settings = (
        f"arch {args.arch}, {device.type} fp{torch.finfo(fast_dtype).bits} (oracle fp32), "
        f"{width}x{args.height}, {steps} steps, sync_threshold {threshold}, "
        f"sync_weight {args.sync_weight:g}, "
        f"stride {args.stride}, seed {args.seed}, best of {args.repeats} alternating runs"
        + (", a ControlNet and a random edge map" if args.controlnet else "")
    )
    report = "\n".join(
        [
            f"### {datetime.date.today().isoformat()} · {args.arch} · {device.type}",
            "",
            f"- Machine: {machine(device)}",
            f"- Settings: {settings}; syncdiffusion {__version__}",
            "- Command: `python scripts/benchmark.py " + " ".join(sys.argv[1:]) + "`",
            "",
            "| path | size | windows | seconds | speed-up | peak memory | max latent diff "
            "| max pixel diff |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"Width sweep ({scaling_steps} steps, sync_threshold {scaling['sync_threshold']}): "
            "time per window should stay flat.",
            "",
            "| path | size | windows | seconds | seconds per window | peak memory |",
            "| --- | --- | --- | --- | --- | --- |",
            *sweep,
            "",
        ]
    )
    publish(report, None if args.no_record else args.record)


if __name__ == "__main__":
    main()
