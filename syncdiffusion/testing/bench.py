"""The fast path against the oracle, timed: what scripts/benchmark.py runs and reports.

`pipelines` loads the fast pipeline and the oracle's for an architecture (the oracle runs the
published algorithm, or the authors' SyncControlNet with a ControlNet); `against_oracle` runs
both on the same inputs, alternating; `sweep` times the fast path alone at several widths;
`table` writes the rows as BENCHMARKS.md keeps them.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import ControlNetModel
from PIL import Image

from ..models.tiny import make_tiny_controlnet, make_tiny_weights, random_controlnet
from ..pipeline import SyncDiffusionPipeline
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


def against_oracle(
    pipes: Pipelines, inputs: dict[str, Any], repeats: int, device: torch.device, name: str
) -> list[str]:
    """Rows for the oracle (where there is one), the fast path and the fast path one window per
    network call (the bounded-memory setting, as the oracle): each the best of `repeats` runs
    alternating with the oracle's, with the largest latent and pixel differences."""
    fast, oracle = pipes.fast, pipes.oracle
    size = f"{inputs['width']}x{inputs['height']}"
    n_windows = len(fast.geometry.windows(inputs))
    oracle_runs, fast_runs = [], []
    for _ in range(repeats):
        if oracle is not None:
            oracle_runs.append(timed(lambda: pipes.run_oracle(oracle, **inputs), device))
        fast_runs.append(timed(lambda: fast(**inputs, output_type="latent"), device))
        said = f"oracle {oracle_runs[-1][1]:.1f}s  " if oracle_runs else ""
        print(f"{said}fast {fast_runs[-1][1]:.1f}s", flush=True)
    fast_s = min(seconds for _, seconds, _ in fast_runs)
    rows, speedup, diffs, oracle_s = [], "", " | ", None
    if oracle is not None:
        (o_image, o_latent), _, _ = oracle_runs[-1]
        f_latent = fast_runs[-1][0]
        latent_diff = (f_latent.float() - o_latent.float()).abs().max().item()
        f_image = np.asarray(fast.decode(f_latent), dtype=int)
        pixels = np.abs(f_image - np.asarray(o_image, dtype=int)).max()
        oracle_s = min(seconds for _, seconds, _ in oracle_runs)
        diffs, speedup = f"{latent_diff:.2e} | {pixels}/255", f"{oracle_s / fast_s:.2f}x"
        peak = max(p for _, _, p in oracle_runs)
        rows.append(
            f"| oracle ({name}) | {size} | {n_windows} | {oracle_s:.2f} | 1.00x | {gib(peak)} | | |"
        )
    peak = max(p for _, _, p in fast_runs)
    rows.append(
        f"| fast | {size} | {n_windows} | {fast_s:.2f} | {speedup} | {gib(peak)} | {diffs} |"
    )
    _, one_s, one_peak = timed(
        lambda: fast(**inputs, output_type="latent", view_batch_size=1), device
    )
    speedup = f"{oracle_s / one_s:.2f}x" if oracle_s is not None else ""
    rows.append(
        f"| fast, chunks of 1 | {size} | {n_windows} | {one_s:.2f} | {speedup} | {gib(one_peak)} "
        "| | |"
    )
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


def table(header: str, rows: list[str]) -> list[str]:
    """A markdown table: `header` is its columns, `|`-separated."""
    columns = header.count("|") - 1
    return [header, "|" + " --- |" * columns, *rows]
