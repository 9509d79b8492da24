"""The fast path against the oracle, timed: what scripts/benchmark.py runs and reports.

`pipelines` loads the fast pipeline and the oracle's for an architecture (the oracle runs the
published algorithm, or the authors' SyncControlNet with a ControlNet); `against_oracle` runs
both on the same inputs, alternating; `sweep` times the fast path alone at several widths;
`schedulers` times it with DDIM against DPM++ 2M Karras at half the steps; `loras` without a
LoRA, with one and with two (its figures: `lora_runs`); `table` writes the rows as BENCHMARKS.md
keeps them.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import ControlNetModel
from PIL import Image

from ..core.chunks import peak_live_bytes
from ..core.sphere import band_height
from ..models.tiny import make_tiny_controlnet, make_tiny_weights, random_controlnet
from ..pipeline import SyncDiffusionPipeline
from .lora import make_lora
from .measure import sd2_pipeline, sdxl_pipeline, timed
from .oracle import oracle_panorama
from .oracle_controlnet import oracle_sync_controlnet


@dataclass
class Pipelines:
    """The fast pipeline, the oracle's (None for SDXL, which has no oracle; the same object
    where both run in fp32) and the oracle's algorithm."""

    fast: SyncDiffusionPipeline
    oracle: SyncDiffusionPipeline | None
    run_oracle: Callable[..., tuple[Image.Image, torch.Tensor]] = oracle_panorama
    controlnet: ControlNetModel | None = field(default=None, repr=False)


def fast_dtype(device: torch.device) -> torch.dtype:
    """The product's dtype on `device`: fp16 on a GPU, fp32 on the CPU. The published wrapper
    keeps fp32 weights (autocast on CUDA), as the oracle does."""
    return torch.float16 if device.type == "cuda" else torch.float32


def pipelines(arch: str, device: torch.device, controlnet: bool = False) -> Pipelines:
    """The pipelines for `arch` ("tiny", "sd2" or "sdxl"), with a ControlNet where asked for
    (the tiny one, or random weights of the architecture's own shape)."""
    dtype = fast_dtype(device)
    net = None
    if arch == "sdxl":
        found = Pipelines(sdxl_pipeline(device, dtype), None)
    elif arch == "sd2":
        fast = sd2_pipeline(device, dtype)
        found = Pipelines(
            fast, sd2_pipeline(device, torch.float32) if dtype != torch.float32 else fast
        )
    else:
        with tempfile.TemporaryDirectory() as folder:  # loaded, the files are not needed
            weights = make_tiny_weights(Path(folder) / "tiny")
            fast = SyncDiffusionPipeline.from_pretrained(weights, device=device, dtype=dtype)
            oracle = fast
            if dtype != torch.float32:
                oracle = SyncDiffusionPipeline.from_pretrained(
                    weights, device=device, dtype=torch.float32
                )
            found = Pipelines(fast, oracle)
            if controlnet:
                folder = make_tiny_controlnet(weights / "stable-diffusion-2-base", weights / "cn")
                net = ControlNetModel.from_pretrained(folder)
    if not controlnet:
        return found
    net = net or random_controlnet(found.fast.unet)

    def controlled(pipe: SyncDiffusionPipeline) -> SyncDiffusionPipeline:
        same = net.dtype == pipe.dtype
        return pipe.with_controlnet(net if same else copy.deepcopy(net).to(pipe.dtype), "random")

    fast = controlled(found.fast)
    oracle = fast if found.oracle is found.fast else found.oracle and controlled(found.oracle)
    return Pipelines(fast, oracle, oracle_sync_controlnet, net)


def edge_map(width: int, height: int, seed: int) -> Image.Image:
    """A random condition image: one pixel in ten white."""
    layout = np.random.default_rng(seed).random((height, width)) > 0.9
    return Image.fromarray(layout.astype(np.uint8) * 255)


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def synced_step_peak(
    pipe: SyncDiffusionPipeline, inputs: dict[str, Any], run: Callable[..., Any]
) -> int:
    """The most bytes of tensors alive at once in one synced step of `inputs` (`run(**inputs)`
    with one step, synced), `pipe`'s weights left out (`chunks.peak_live_bytes`): the same
    count on every device, where the CPU's peak RSS only ever grows within a process."""
    networks = (pipe.unet, pipe.controlnet, pipe.vae, pipe.perceptual, *pipe.text_encoders())
    weights = [
        t for net in networks if net is not None for t in (*net.parameters(), *net.buffers())
    ]
    one = {**inputs, "num_inference_steps": 1, "sync_threshold": 1}
    return peak_live_bytes(lambda: run(**one), weights)


# The fast path's ways with the sync backward's activations (`recompute`), timed in turn.
RECOMPUTE_ROWS = ("auto", "always", "never")


def against_oracle(
    pipes: Pipelines, inputs: dict[str, Any], repeats: int, device: torch.device, name: str
) -> list[str]:
    """Rows for the oracle (where there is one), the fast path with each `recompute` mode and
    the fast path one window per network call (the bounded-memory setting, as the oracle):
    each the best of `repeats` runs alternating with the oracle's, with its peak memory (CUDA:
    allocated; CPU: the process's RSS, which only grows), one synced step's tensor peak
    (`synced_step_peak`) and the largest latent and pixel differences to the oracle."""
    fast, oracle = pipes.fast, pipes.oracle
    size = f"{inputs['width']}x{inputs['height']}"
    n_windows = len(fast.geometry.windows(inputs))
    oracle_runs, fast_runs = [], {mode: [] for mode in RECOMPUTE_ROWS}
    for _ in range(repeats):
        said = ""
        if oracle is not None:
            oracle_runs.append(timed(lambda: pipes.run_oracle(oracle, **inputs), device))
            said = f"oracle {oracle_runs[-1][1]:.1f}s"
        for mode, runs in fast_runs.items():
            runs.append(
                timed(lambda m=mode: fast(**inputs, output_type="latent", recompute=m), device)
            )
            said += f"  {mode} {runs[-1][1]:.1f}s"
        print(said.strip(), flush=True)

    def fast_step(mode: str, **options: Any) -> Callable[..., Any]:
        return partial(fast, output_type="latent", recompute=mode, **options)

    rows, oracle_s, o_latent, o_image = [], None, None, None
    if oracle is not None:
        (o_image, o_latent), _, _ = oracle_runs[-1]
        oracle_s = min(seconds for _, seconds, _ in oracle_runs)
        peak = max(p for _, _, p in oracle_runs)
        step = synced_step_peak(oracle, inputs, partial(pipes.run_oracle, oracle))
        rows.append(
            f"| oracle ({name}) | {size} | {n_windows} | {oracle_s:.2f} | 1.00x | {gib(peak)} "
            f"| {gib(step)} | | |"
        )

    def row(label: str, runs: list, step: int) -> str:
        seconds = min(s for _, s, _ in runs)
        peak = max(p for _, _, p in runs)
        speedup, diffs = "", " | "
        if oracle_s is not None:
            latent = runs[-1][0]
            latent_diff = (latent.float() - o_latent.float()).abs().max().item()
            pixels = np.abs(
                np.asarray(fast.decode(latent), dtype=int) - np.asarray(o_image, dtype=int)
            ).max()
            speedup, diffs = f"{oracle_s / seconds:.2f}x", f"{latent_diff:.2e} | {pixels}/255"
        return (
            f"| {label} | {size} | {n_windows} | {seconds:.2f} | {speedup} | {gib(peak)} "
            f"| {gib(step)} | {diffs} |"
        )

    for mode, runs in fast_runs.items():
        step = synced_step_peak(fast, inputs, fast_step(mode))
        rows.append(row(f"fast, recompute {mode}", runs, step))
    one = timed(lambda: fast(**inputs, output_type="latent", view_batch_size=1), device)
    step = synced_step_peak(fast, inputs, fast_step("auto", view_batch_size=1))
    rows.append(row("fast, chunks of 1", [one], step))
    return rows


def sweep(
    fast: SyncDiffusionPipeline, inputs: dict[str, Any], widths: Sequence[int], device: torch.device
) -> list[str]:
    """Rows for the fast path alone at each of `widths`: time per window should stay flat."""
    rows = []
    for width in widths:
        n = len(fast.geometry.windows({**inputs, "width": width}))
        _, seconds, peak = timed(
            lambda w=width: fast(**{**inputs, "width": w}, output_type="latent"), device
        )
        rows.append(
            f"| fast | {width}x{inputs['height']} | {n} | {seconds:.2f} | {seconds / n:.3f} | "
            f"{gib(peak)} |"
        )
        print(rows[-1], flush=True)
    return rows


# DDIM at the published 50 steps against DPM++ 2M Karras at half of them: `schedulers`.
SCHEDULER_ROWS = (("DDIM", 50), ("KarrasDPM", 25))


class WindowEvaluations:
    """Counts the windows the UNet predicts for while held (`with`): each guided call is a batch
    of two halves (negative, prompt) of the same windows, so a call counts half its batch."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet, self.count = unet, 0

    def __enter__(self) -> WindowEvaluations:
        def count(_module: torch.nn.Module, args: tuple) -> None:
            self.count += args[0].shape[0] // 2

        self.hook = self.unet.register_forward_pre_hook(count)
        return self

    def __exit__(self, *exc: object) -> None:
        self.hook.remove()


def schedulers(
    fast: SyncDiffusionPipeline,
    inputs: dict[str, Any],
    device: torch.device,
    runs: Sequence[tuple[str, int]] = SCHEDULER_ROWS,
    repeats: int = 1,
) -> list[str]:
    """Rows for the fast path with each (scheduler, steps) of `runs`, the same sync threshold:
    seconds (best of `repeats`), the windows the UNet predicted for (the sync step's forwards
    included) and each against the first row."""
    rows, first = [], None
    for name, steps in runs:
        request = {**inputs, "scheduler": name, "num_inference_steps": steps}
        times = []
        for _ in range(repeats):
            with WindowEvaluations(fast.unet) as evaluations:
                _, seconds, peak = timed(lambda r=request: fast(**r, output_type="latent"), device)
            times.append(seconds)
        seconds = min(times)
        first = first or (seconds, evaluations.count)
        rows.append(
            f"| {name} | {steps} | {request['sync_threshold']} | {evaluations.count} "
            f"| {seconds:.2f} | {first[0] / seconds:.2f}x | {gib(peak)} |"
        )
        print(rows[-1], flush=True)
    return rows


# A LoRA of the common shape: rank 16 on every attention projection of the UNet and the text
# encoders (`testing.lora`); `loras` times the model without one, with one and with two.
LORA_RANK = 16
LORA_ROWS = ("none", "one LoRA", "two LoRAs")


def lora_runs(
    fast: SyncDiffusionPipeline,
    inputs: dict[str, Any],
    device: torch.device,
    folder: Path,
    repeats: int = 1,
    callbacks: Mapping[str, Callable[[dict[str, Any]], None]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The fast path without a LoRA, with one and with two (random, rank `LORA_RANK`, written
    to `folder`), latents only, alternating `repeats` times after an untimed call and an untimed
    fusing: for each row of `LORA_ROWS`, the whole panorama's `seconds` (best of `repeats`),
    `fuse_seconds`, the part of it that fetched, fused and afterwards restored the LoRAs (timed
    alone, best of `repeats`), the rest per step (`seconds_per_step`) and against none's
    (`per_step_ratio`), `peak_bytes`, and the last run's `latent`. `callbacks` gives a row's
    runs their pipeline callback, by row."""
    networks = fast.lora_networks()
    files = [
        make_lora(networks, folder / f"lora{i}.safetensors", rank=LORA_RANK, seed=i) for i in (1, 2)
    ]
    one = {"lora_weights": str(files[0])}
    runs = dict(zip(LORA_ROWS, ({}, one, {**one, "extra_lora": str(files[1])}), strict=True))
    callbacks = callbacks or {}
    steps = inputs["num_inference_steps"]
    # The first call's memory probes and the first fusing's imports (diffusers' and peft's
    # loaders), not timed.
    fast(**inputs, output_type="latent")
    with fast.fused_loras(fast.loras(fast.request(**inputs, **one))):
        pass
    totals: dict[str, list[float]] = {label: [] for label in runs}
    fusing: dict[str, list[float]] = {label: [] for label in runs}
    peaks: dict[str, int] = {}
    latents: dict[str, torch.Tensor] = {}
    for _ in range(repeats):  # alternating, so a busy spell of the machine hits all three
        for label, given in runs.items():
            request = {**inputs, **given, "callback": callbacks.get(label)}
            checked = fast.request(**inputs, **given)

            def fuse_only(checked: dict[str, Any] = checked) -> None:
                with fast.fused_loras(fast.loras(checked)):
                    pass

            fusing[label].append(timed(fuse_only, device)[1] if given else 0.0)
            latents[label], seconds, peaks[label] = timed(
                lambda r=request: fast(**r, output_type="latent"), device
            )
            totals[label].append(seconds)
    figures, base = {}, None
    for label in runs:
        total, fused = min(totals[label]), min(fusing[label])
        per_step = (total - fused) / steps
        base = base or per_step
        figures[label] = {
            "seconds": total,
            "fuse_seconds": fused,
            "seconds_per_step": per_step,
            "per_step_ratio": per_step / base,
            "peak_bytes": peaks[label],
            "latent": latents[label],
        }
    return figures


def loras(
    fast: SyncDiffusionPipeline,
    inputs: dict[str, Any],
    device: torch.device,
    folder: Path,
    repeats: int = 1,
) -> list[str]:
    """Rows for the fast path without a LoRA, with one and with two (`lora_runs`): the whole
    panorama's seconds, the part of it that fetched, fused and afterwards restored the LoRAs,
    the rest per step and against none, and peak memory."""
    rows = []
    for label, run in lora_runs(fast, inputs, device, folder, repeats).items():
        rows.append(
            f"| {label} | {run['seconds']:.2f} | {run['fuse_seconds']:.2f} "
            f"| {run['seconds_per_step']:.3f} | {run['per_step_ratio']:.3f} "
            f"| {gib(run['peak_bytes'])} |"
        )
        print(rows[-1], flush=True)
    return rows


def table(header: str, rows: list[str]) -> list[str]:
    """A markdown table: `header` is its columns, `|`-separated."""
    columns = header.count("|") - 1
    return [header, "|" + " --- |" * columns, *rows]


# A whole sphere against the two panoramas it may be compared with: its band alone (the
# loop-closure panorama it starts from) and a 2:1 loop-closure panorama (the other way to a
# whole-sphere picture, its poles stretched).
SPHERE_ROWS = ("band alone", "2:1 loop closure", "sphere: band and two caps")


def spheres(
    fast: SyncDiffusionPipeline, inputs: dict[str, Any], device: torch.device, repeats: int = 1
) -> list[str]:
    """Rows for each of `SPHERE_ROWS` at `inputs`' width, pictures (decodes included): seconds
    (best of `repeats`, alternating), the windows the UNet predicted for (the sync step's
    forwards included), the seconds against the band's, and the peak memory."""
    width = inputs["width"]
    requests = (
        {**inputs, "height": band_height(width), "loop_closure": True},
        {**inputs, "height": width // 2, "loop_closure": True},
        {**inputs, "sphere": True},
    )
    runs = dict(zip(SPHERE_ROWS, requests, strict=True))
    times: dict[str, list[float]] = {label: [] for label in runs}
    counts, peaks = {}, {}
    # The first call's memory probes (UNet calls of their own), not timed or counted: one window.
    side = fast.window_pixels
    fast(**{**inputs, "width": side, "height": side}, output_type="latent")
    for _ in range(repeats):  # alternating, so a busy spell of the machine hits all three
        for label, request in runs.items():
            with WindowEvaluations(fast.unet) as evaluations:
                _, seconds, peak = timed(lambda r=request: fast(**r), device)
            times[label].append(seconds)
            counts[label], peaks[label] = evaluations.count, max(peak, peaks.get(label, 0))
    band = min(times[SPHERE_ROWS[0]])
    rows = []
    for label, request in runs.items():
        size = f"{width}x{width // 2}" if request.get("sphere") else f"{width}x{request['height']}"
        seconds = min(times[label])
        rows.append(
            f"| {label} | {size} | {counts[label]} | {seconds:.2f} | {seconds / band:.2f}x "
            f"| {gib(peaks[label])} |"
        )
        print(rows[-1], flush=True)
    return rows
