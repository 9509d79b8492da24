"""Everything that needs a GPU, in one command: fp16 numerics, speed, memory, out-of-memory.

    python scripts/gpu_check.py [--out DIR]           # CUDA: SD2-base architecture, random
    python scripts/gpu_check.py --smoke [--out DIR]   # the CPU, the tiny model, small sizes

Before anything runs it prints each selected section's estimated seconds on an H100-class GPU,
from the work its settings ask for; where the total is over `--budget` (8 minutes, so that the
whole check fits a 10-minute slot on a borrowed GPU) the heaviest sections run fewer unsynced
steps, and where that is not enough the check refuses to start. Each section runs even where
an earlier one failed (its error goes into the report), and `--only SECTION` reruns one.
Writes DIR/gpu-check.md (the report that goes into BENCHMARKS.md) and DIR/gpu-check.json (its
figures) after every section, with its wall time beside its estimate and the windows'
loss-scale back-offs (sync backward passes redone at a lower fp16 loss scale) of each run, so a
run cut short still leaves what it measured. Sections:

1. published: the published algorithm as the published wrapper ran it (the oracle, fp32
   weights under autocast) against the fast path (fp16): seconds, peak memory, largest pixel
   difference, whether every latent stayed finite; 2048x512, 50 steps, sync_threshold 5.
2. repeatable: the fast path twice with automatic chunks and once one window at a time.
3. gradient: one view's sync gradient with fp16 networks against fp32 ones (cosine).
4. controlnet: the authors' SyncControlNet (the ControlNet oracle, fp32 weights under
   autocast) against the fast path with the same ControlNet (SD2-base's shape, random
   weights) and a random edge map: seconds, peak memory, largest pixel difference, finite
   latents; 1024x512, 6 steps, sync_threshold 3.
5. memory: the per-window estimate against the measured peak of chunks of 1, 2 and 4.
6. out-of-memory: a memory cap under which 4 windows do not fit (halving, then success), one
   under which 1 does not (a clear MemoryError), then a normal prediction and the free memory.
7. huge: 4096x4096 at stride 56, 2 steps, on CUDA under a cap of 24 GiB in all (a 24 GB
   card's memory): whether it fits, seconds, peak memory.
8. sdxl: SDXL base's architecture (random weights, fp16, its VAE upcast), 4096x1024, 50
   steps, sync_threshold 5, stride 32: seconds and peak memory.

--smoke runs the same sections at sizes that take minutes on two cores (chunks of 1 and 2).

The GPU machine needs this project's pinned diffusers, transformers and lpips:
`scripts/fetch_gpu_wheels.sh` downloads them into `.whl/` to take along.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import tempfile
import time
from collections.abc import Iterable
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from syncdiffusion import SyncDiffusionPipeline, __version__
from syncdiffusion.core.chunks import free_memory, release_memory
from syncdiffusion.core.decoding import decode
from syncdiffusion.core.precision import LossScale, initial_loss_scale
from syncdiffusion.core.sampling import guided_eps, x0_predictor
from syncdiffusion.core.sync import lpips_features, sync_gradient
from syncdiffusion.core.windows import SD2_BASE, Geometry
from syncdiffusion.models.tiny import TINY_MODELS, make_tiny_weights, random_controlnet
from syncdiffusion.request.cost import CPU_SECONDS, Rates, work
from syncdiffusion.request.inputs import panorama_request
from syncdiffusion.testing.measure import (
    SDXL_CONFIGS,
    machine,
    memory_cap,
    sd2_pipeline,
    sdxl_pipeline,
    timed,
    window_cost,
)
from syncdiffusion.testing.oracle import oracle_panorama
from syncdiffusion.testing.oracle_controlnet import oracle_sync_controlnet

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a mountain range at twilight"
HUGE_CAP_BYTES = 24 * 2**30
SECTIONS = (
    "published",
    "repeatable",
    "gradient",
    "controlnet",
    "memory",
    "out-of-memory",
    "huge",
    "sdxl",
)
# Sizes and steps per mode: the GPU check's own, and the CPU smoke run's (same code, minutes).
SETTINGS = {
    "gpu": {
        "published": dict(width=2048, height=512, num_inference_steps=50, sync_threshold=5),
        "repeatable": dict(width=2048, height=512, num_inference_steps=6, sync_threshold=5),
        "memory": dict(width=1024, height=512, num_inference_steps=1, sync_threshold=1),
        "chunks": (1, 2, 4),
        "huge": dict(width=4096, height=4096, stride=56, num_inference_steps=2),
        "sdxl": dict(width=4096, height=1024, stride=32, num_inference_steps=50, sync_threshold=5),
        "controlnet": dict(width=1024, height=512, num_inference_steps=6, sync_threshold=3),
    },
    "smoke": {
        "published": dict(width=640, height=512, num_inference_steps=2, sync_threshold=1),
        "repeatable": dict(width=640, height=512, num_inference_steps=1, sync_threshold=1),
        "memory": dict(width=768, height=512, num_inference_steps=1, sync_threshold=1),
        "chunks": (1, 2),
        "huge": dict(width=1024, height=1024, stride=56, num_inference_steps=1, sync_threshold=0),
        "sdxl": dict(width=768, height=256, stride=16, num_inference_steps=2, sync_threshold=1),
        "controlnet": dict(width=640, height=512, num_inference_steps=2, sync_threshold=1),
    },
}
# The sections whose unsynced steps may be cut to fit the budget: the sync steps, where the
# fast path and the published algorithm differ most and the memory peaks, all stay.
SHRINKABLE = ("published", "repeatable", "sdxl")

# What each unit of work takes on an H100-class GPU in fp16. ESTIMATES, not measurements:
# nothing here has run on a GPU yet. The report puts each section's measured wall time beside
# its estimate; replace these with the first GPU run's figures.
# One window-step, a guided UNet pass (a batch of 2) over one SD2-base 512 px window: SD2-base
# runs about 20-25 guided steps a second at 512 px in fp16 on an A100 (diffusers' published
# figures), an H100 about 1.5 times as many.
WINDOW_STEP_SECONDS = 0.03
# A window's sync gradient beyond its window-step, and a VAE decode of 512x512 px: in the
# proportions SD2-base's architecture shows on the CPU (scripts/demo_costs.py, 151.0 and 28.3
# CPU seconds against 18.3 for the window-step).
GPU_SECONDS = Rates(
    window_step=WINDOW_STEP_SECONDS,
    synced_window_step=WINDOW_STEP_SECONDS
    * CPU_SECONDS.synced_window_step
    / CPU_SECONDS.window_step,
    decode=WINDOW_STEP_SECONDS * CPU_SECONDS.decode / CPU_SECONDS.window_step,
)
# The published wrapper per unit: one view at a time rather than batched (a batch of 2 at
# 64x64 latents leaves much of an H100 idle), fp32 weights under autocast; 2 is on the safe side
# of what batching gains.
PUBLISHED_SLOWDOWN = 2.0
# fp32 networks with TF32 off (the gradient section's reference) against fp16 tensor cores.
FP32_SLOWDOWN = 8.0
# SDXL's VAE runs in fp32 (TF32 convolutions): its decodes, and on the safe side the whole of
# the sync gradients that run through it, take this many times an fp16 VAE's.
FP32_VAE_SLOWDOWN = 2.0
# A ControlNet runs a copy of the UNet's down and middle blocks beside it: about half a UNet.
CONTROLNET_SLOWDOWN = 1.5
# Building a random-weight architecture on the GPU, with the tiny model's tokenizers.
LOAD_SECONDS = {"sd2": 10.0, "sdxl": 20.0}
# 8 minutes: the whole check fits a 10-minute slot on a borrowed GPU, with room to spare.
BUDGET_SECONDS = 480.0


class Work(NamedTuple):
    """What a section asks of the GPU, counted in SD2-base 512 px windows (an SDXL window
    counts its pixels' share, 4, as `cost.work` counts it), and its estimated seconds."""

    window_steps: float = 0.0
    synced_window_steps: float = 0.0
    decodes: float = 0.0
    seconds: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(*(a + b for a, b in zip(self, other, strict=True)))


def panorama_work(
    inputs: dict[str, Any],
    geometry: Geometry = SD2_BASE,
    *,
    published: bool = False,
    decoded: bool = True,
    vae_slowdown: float = 1.0,
) -> Work:
    """One panorama: every window at every step; at each synced step the anchor's decode and
    every other window's gradient; then the panorama's decode unless only the latent is asked
    for (`decoded`). The published wrapper also takes the anchor's gradient, runs its UNet
    twice, and runs one view at a time."""
    request = panorama_request({"prompt": PROMPT, **inputs}, geometry)
    counted = work(request, geometry, published=published, decoded=decoded)
    # The synced window-steps and decodes run through the VAE.
    rates = Rates(
        GPU_SECONDS.window_step,
        GPU_SECONDS.synced_window_step * vae_slowdown,
        GPU_SECONDS.decode * vae_slowdown,
    )
    seconds = rates.price(counted) * (PUBLISHED_SLOWDOWN if published else 1.0)
    return Work(counted.window_steps, counted.synced_window_steps, counted.decodes, seconds)


def sdxl_geometry(smoke: bool) -> Geometry:
    """The SDXL section's windows: SDXL base's (its UNet config), or the tiny SDXL model's."""
    if smoke:
        return Geometry(TINY_MODELS["sdxl"][1])
    return Geometry(json.loads((SDXL_CONFIGS / "unet.json").read_text())["sample_size"])


def section_work(name: str, settings: dict[str, Any], smoke: bool) -> Work:
    """The work of section `name` at `settings`, as its check below does it."""
    if name == "published":  # an untimed 512x512 step of each first, then the two panoramas
        inputs = settings["published"]
        warm_up = {**inputs, "width": 512, "height": 512, "num_inference_steps": 1}
        return sum(
            (panorama_work(i, published=p) for i in (warm_up, inputs) for p in (True, False)),
            Work(),
        )
    if name == "repeatable":
        return sum([panorama_work(settings["repeatable"])] * 3, Work())
    if name == "gradient":  # one view's gradient with fp16 networks twice, fp32 ones once
        one = GPU_SECONDS.window_step + GPU_SECONDS.synced_window_step
        return Work(3, 3, 0, (2 + FP32_SLOWDOWN) * one)
    if name == "memory":
        runs = len(settings["chunks"])
        return sum([panorama_work(settings["memory"], decoded=False)] * runs, Work())
    if name == "out-of-memory":  # the run under the cap and the next prediction (the other fails)
        return sum([panorama_work(settings["memory"], decoded=False)] * 2, Work())
    if name == "huge":
        return panorama_work(settings["huge"])
    if name == "controlnet":  # the oracle and the fast path, each with the ControlNet
        inputs = settings["controlnet"]
        both = panorama_work(inputs, published=True) + panorama_work(inputs)
        return both._replace(seconds=both.seconds * CONTROLNET_SLOWDOWN)
    if name == "sdxl":
        sdxl = panorama_work(settings["sdxl"], sdxl_geometry(smoke), vae_slowdown=FP32_VAE_SLOWDOWN)
        return sdxl + Work(seconds=LOAD_SECONDS["sdxl"])
    raise ValueError(f"no section {name!r}; the sections are {', '.join(SECTIONS)}")


def estimate(settings: dict[str, Any], wanted: Iterable[str], smoke: bool) -> dict[str, Work]:
    """Each section of `wanted` in the order they run, after "loading": SD2-base's architecture
    for every section but sdxl (which loads its own), and again in fp32 on a GPU for the
    published and gradient sections' reference."""
    wanted = set(wanted)
    works = {}
    if wanted - {"sdxl"}:
        loads = 1 + (not smoke and bool(wanted & {"published", "gradient"}))
        works["loading"] = Work(seconds=loads * LOAD_SECONDS["sd2"])
    return works | {
        name: section_work(name, settings, smoke) for name in SECTIONS if name in wanted
    }


def total_seconds(works: dict[str, Work]) -> float:
    return sum(work.seconds for work in works.values())


def fit(
    settings: dict[str, Any], wanted: Iterable[str], smoke: bool, budget: float
) -> tuple[dict[str, Any], dict[str, int]]:
    """`settings` with the unsynced steps of the dearest shrinkable section halved, again and
    again, until the estimate of `wanted` is within `budget` seconds or none can shrink more;
    and the steps each shrunk section had."""
    settings, shrunk = dict(settings), {}
    while total_seconds(works := estimate(settings, wanted, smoke)) > budget:
        shrinkable = [
            name
            for name in SHRINKABLE
            if name in works
            and settings[name]["num_inference_steps"] > settings[name]["sync_threshold"]
        ]
        if not shrinkable:
            break
        name = max(shrinkable, key=lambda name: works[name].seconds)
        inputs = settings[name]
        steps, synced = inputs["num_inference_steps"], inputs["sync_threshold"]
        shrunk.setdefault(name, steps)
        settings[name] = {**inputs, "num_inference_steps": synced + (steps - synced) // 2}
    return settings, shrunk


def estimate_table(works: dict[str, Work], budget: float) -> list[str]:
    """The estimate as a markdown table, with the total against the budget."""
    rows = [
        f"| {name} | {w.window_steps:.0f} | {w.synced_window_steps:.0f} | {w.decodes:.1f} | "
        f"{w.seconds:.0f} |"
        for name, w in works.items()
    ]
    return [
        "| section | window-steps | synced window-steps | decodes (512 px) | seconds |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        f"| total | | | | {total_seconds(works):.0f} of {budget:.0f} |",
    ]


class Report:
    """The figures (JSON) and the markdown report, both rewritten after every section."""

    def __init__(self, out: Path, header: list[str]) -> None:
        self.out, self.header, self.lines, self.figures = out, header, [], {}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, section: str, figures: dict, lines: list[str]) -> None:
        self.figures[section] = figures
        self.lines += [f"**{section}**", "", *lines, ""]
        self._write(lines)

    def wall_time(self, section: str, seconds: float, estimated: float) -> None:
        """A section's measured seconds beside its estimate, after what it reported."""
        self.figures.setdefault(section, {}).update(
            wall_seconds=seconds, estimated_seconds=estimated
        )
        line = f"Wall time {seconds:.1f} s (estimated {estimated:.0f} s on an H100-class GPU)."
        self.lines += [line, ""]
        self._write([line])

    def _write(self, new_lines: list[str]) -> None:
        print("\n".join(new_lines), flush=True)
        (self.out / "gpu-check.json").write_text(json.dumps(self.figures, indent=2) + "\n")
        (self.out / "gpu-check.md").write_text("\n".join([*self.header, *self.lines]))


def pixel_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


class StepLog:
    """A pipeline callback that keeps what each step reports: whether the latent was finite, the
    chunk size that fitted, and the windows' loss-scale back-offs so far."""

    def __init__(self) -> None:
        self.finite: list[bool] = []
        self.chunks: list[int] = []
        self.back_offs = 0

    def __call__(self, state: dict[str, Any]) -> None:
        self.finite.append(bool(state["latent"].isfinite().all()))
        self.chunks.append(state["view_batch_size"])
        self.back_offs = state["loss_scale_back_offs"]


def logged(pipe: SyncDiffusionPipeline, **inputs):
    """The picture (or latent), and its steps' `StepLog`."""
    log = StepLog()
    return pipe(**inputs, callback=log), log


def load(tiny: Path | None, device: torch.device, dtype: torch.dtype) -> SyncDiffusionPipeline:
    """SD2-base's architecture with random weights, or the tiny model in folder `tiny`."""
    if tiny is None:
        return sd2_pipeline(device, dtype)
    if not tiny.is_dir():
        make_tiny_weights(tiny)
    return SyncDiffusionPipeline.from_pretrained(tiny, device=device, dtype=dtype)


def against_oracle(
    report, section: str, oracle_path: str, setting: str, fast, run_oracle, run_fast, inputs, device
) -> None:
    """Time `run_oracle()` (an oracle's picture and latent) against `run_fast()` (the fast
    path's picture and `StepLog`) and report them as section `section`: seconds, peak memory,
    finite latents, the largest pixel difference and loss-scale back-offs."""
    (o_image, o_latent), o_s, o_peak = timed(run_oracle, device)
    (f_image, f_log), f_s, f_peak = timed(run_fast, device)
    n = len(fast.geometry.windows(fast.request(prompt=PROMPT, **inputs)))
    figures = {
        "inputs": inputs,
        "windows": n,
        "oracle_seconds": o_s,
        "fast_seconds": f_s,
        "speed_up": o_s / f_s,
        "oracle_peak_gib": o_peak / 2**30,
        "fast_peak_gib": f_peak / 2**30,
        "max_pixel_diff": pixel_diff(f_image, o_image),
        "oracle_latent_finite": bool(o_latent.isfinite().all()),
        "fast_latents_finite": all(f_log.finite),
        "fast_loss_scale_back_offs": f_log.back_offs,
    }
    report.add(
        section,
        figures,
        [
            f"{inputs['width']}x{inputs['height']}, {n} windows, {inputs['num_inference_steps']} "
            f"steps, sync_threshold {inputs['sync_threshold']}, {setting}",
            "",
            "| path | seconds | speed-up | peak memory | latents finite | max pixel diff "
            "| loss-scale back-offs |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| {oracle_path} (fp32 weights, autocast) | {o_s:.1f} | 1.00x | "
            f"{o_peak / 2**30:.2f} GiB | {figures['oracle_latent_finite']} | | |",
            f"| fast ({str(fast.dtype)[6:]}) | {f_s:.1f} | {o_s / f_s:.2f}x | "
            f"{f_peak / 2**30:.2f} GiB | {figures['fast_latents_finite']} | "
            f"{figures['max_pixel_diff']}/255 | {f_log.back_offs} |",
        ],
    )


def check_published(report, fast, oracle, inputs, device) -> None:
    # One small call of each first, untimed: the first call on a GPU pays for the CUDA context,
    # cuBLAS/cuDNN handles and kernel loading, and the fast path for its memory probe.
    warm_up = {**inputs, "width": 512, "height": 512, "num_inference_steps": 1}
    oracle_panorama(oracle, PROMPT, **warm_up)
    fast(prompt=PROMPT, **warm_up)
    against_oracle(
        report, "published", "published", "stride 16, seed 2", fast,
        lambda: oracle_panorama(oracle, PROMPT, **inputs),
        lambda: logged(fast, prompt=PROMPT, **inputs),
        inputs, device,
    )  # fmt: skip


def check_controlnet(report, fast, oracle, inputs, device) -> None:
    """The fast path with a ControlNet against the authors' SyncControlNet, restated."""
    controlnet = random_controlnet(fast.unet)  # SD2-base's shape (or the tiny model's)
    fast_c, oracle_c = (
        pipe.with_controlnet(copy.deepcopy(controlnet).to(pipe.dtype), "random")
        for pipe in (fast, oracle)
    )
    del controlnet
    edges = np.random.default_rng(0).random((inputs["height"], inputs["width"])) > 0.9
    layout = Image.fromarray(edges.astype(np.uint8) * 255)
    against_oracle(
        report, "controlnet", "SyncControlNet", "a random edge map", fast,
        lambda: oracle_sync_controlnet(oracle_c, layout, PROMPT, **inputs),
        lambda: logged(fast_c, prompt=PROMPT, control_image=layout, **inputs),
        inputs, device,
    )  # fmt: skip


def check_repeatable(report, fast, inputs) -> None:
    first, first_log = logged(fast, prompt=PROMPT, **inputs)
    again, again_log = logged(fast, prompt=PROMPT, **inputs)
    one, one_log = logged(fast, prompt=PROMPT, **inputs, view_batch_size=1)
    back_offs = [log.back_offs for log in (first_log, again_log, one_log)]
    figures = {
        "inputs": inputs,
        "auto_chunk": max(first_log.chunks, default=0),
        "max_pixel_diff_same_chunks": pixel_diff(first, again),
        "max_pixel_diff_chunks_of_1": pixel_diff(first, one),
        "loss_scale_back_offs": back_offs,
    }
    report.add(
        "repeatable",
        figures,
        [
            f"{inputs['width']}x{inputs['height']}, {inputs['num_inference_steps']} steps: the "
            f"same call twice (chunks of {figures['auto_chunk']}) differs by "
            f"{figures['max_pixel_diff_same_chunks']}/255; chunks of 1 against it by "
            f"{figures['max_pixel_diff_chunks_of_1']}/255. Loss-scale back-offs of the three: "
            f"{', '.join(map(str, back_offs))}.",
        ],
    )


def check_gradient(report, fast, reference) -> None:
    """One view's sync gradient at the first step with `fast`'s networks and fp32 ones."""
    view = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(5))
    anchor = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(3))

    def gradient(pipe, loss_scale):
        scheduler = pipe.new_scheduler()
        scheduler.set_timesteps(50)
        eps = partial(guided_eps, pipe.unet, text_embeddings=pipe.encode_prompt(PROMPT))
        eps = partial(eps, guidance_scale=7.5)
        with torch.no_grad():
            features = lpips_features(pipe.perceptual, anchor.to(pipe.device) * 2 - 1)
        return (
            sync_gradient(
                view.to(pipe.device),
                [0],
                x0_predictor(scheduler, eps, scheduler.timesteps[0]),
                partial(decode, pipe.vae),
                pipe.perceptual,
                features,
                loss_scale,
            )
            .cpu()
            .double()
        )

    loss_scale = LossScale(1, initial_loss_scale(fast.dtype))
    with strict_fp32():
        reference_grad = gradient(reference, LossScale(1, 1.0))
        scaled = gradient(fast, loss_scale)
        unscaled = gradient(fast, LossScale(1, 1.0))

    def cosine(g):
        return torch.nn.functional.cosine_similarity(g.flatten(), reference_grad.flatten(), dim=0)

    figures = {
        "cosine": float(cosine(scaled)),
        "cosine_without_loss_scale": float(cosine(unscaled)),
        "norm_ratio": float(scaled.norm() / reference_grad.norm()),
        "zero_share": float((scaled == 0).double().mean()),
        "zero_share_without_loss_scale": float((unscaled == 0).double().mean()),
        "loss_scale_back_offs": loss_scale.back_offs,
    }
    report.add(
        "gradient",
        figures,
        [
            f"One 64x64 view at the first step, {str(fast.dtype)[6:]} networks against fp32: "
            f"cosine {figures['cosine']:.5f} with the loss scale "
            f"({figures['cosine_without_loss_scale']:.5f} without), norm ratio "
            f"{figures['norm_ratio']:.4f}, zeros {figures['zero_share']:.2%} "
            f"({figures['zero_share_without_loss_scale']:.2%} without); loss-scale back-offs "
            f"{loss_scale.back_offs}.",
        ],
    )


@contextmanager
def strict_fp32():
    """fp32 convolutions and matrix products in fp32 itself: PyTorch lets cuDNN use TF32 (a
    10-bit mantissa) for them by default, which would blur the fp32 reference."""
    backends = (torch.backends.cudnn, torch.backends.cuda.matmul)
    saved = [b.allow_tf32 for b in backends]
    for b in backends:
        b.allow_tf32 = False
    try:
        yield
    finally:
        for b, allowed in zip(backends, saved, strict=True):
            b.allow_tf32 = allowed


def check_memory(report, fast, inputs, chunks, device) -> dict:
    rows, figures = [], {"inputs": inputs, "chunks": {}}
    scheduler = fast.new_scheduler()
    scheduler.set_timesteps(inputs["num_inference_steps"])
    eps = partial(guided_eps, fast.unet, text_embeddings=fast.encode_prompt(PROMPT))
    estimate = fast.window_bytes(partial(eps, guidance_scale=7.5), scheduler)
    for k in chunks:
        release_memory()
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        (_, log), _, peak = timed(
            lambda k=k: logged(
                fast, prompt=PROMPT, **inputs, output_type="latent", view_batch_size=k
            ),
            device,
        )
        measured = peak - base
        figures["chunks"][k] = {
            "estimate": k * estimate,
            "measured": measured,
            "loss_scale_back_offs": log.back_offs,
        }
        rows.append(
            f"| {k} | {k * estimate / 2**30:.2f} GiB | {measured / 2**30:.2f} GiB | "
            f"{measured / (k * estimate):.2f} | {log.back_offs} |"
        )
    figures["window_bytes"] = estimate
    report.add(
        "memory",
        figures,
        [
            f"{inputs['width']}x{inputs['height']}, one synced step. Estimate: one window "
            f"{estimate / 2**30:.3f} GiB (saved-tensor count on a probe, scaled); measured: peak "
            "allocated over what was allocated before the call"
            + (" (on the CPU: peak RSS, not comparable)" if device.type == "cpu" else "")
            + ".",
            "",
            "| chunk | estimate | measured | measured / estimate | loss-scale back-offs |",
            "| --- | --- | --- | --- | --- |",
            *rows,
        ],
    )
    return figures


def check_out_of_memory(report, fast, inputs, largest, device, memory) -> None:
    """Chunks of `largest` windows under a cap that fits fewer, then one that fits none."""
    release_memory()
    free_before = free_memory(device)
    window_bytes, fixed_bytes = window_cost(memory)
    cap = largest - 0.5
    with memory_cap(fast, cap, window_bytes, fixed_bytes) as capped:
        _, capped_log = logged(
            capped, prompt=PROMPT, **inputs, output_type="latent", view_batch_size=largest
        )
    halved = [largest, *capped_log.chunks]  # the chunk asked for, then the one that fitted
    with memory_cap(fast, 0.3, window_bytes) as capped:
        try:
            capped(prompt=PROMPT, **inputs, output_type="latent", view_batch_size=1)
            failure = None
        except MemoryError as error:
            failure = str(error)
    release_memory()
    latent, next_log = logged(fast, prompt=PROMPT, **inputs, output_type="latent")
    release_memory()
    free_after = free_memory(device)
    figures = {
        "chunks_under_cap": halved,
        "halved_and_succeeded": halved[0] == largest and min(halved) < largest,
        "one_window_error": failure,
        "next_prediction_finite": bool(latent.isfinite().all()),
        "free_gib_before": free_before / 2**30,
        "free_gib_after": free_after / 2**30,
        "loss_scale_back_offs": {"under_cap": capped_log.back_offs, "next": next_log.back_offs},
    }
    report.add(
        "out-of-memory",
        figures,
        [
            f"Cap at {cap} windows: the chunk asked for, then the one that fitted per step "
            f"{halved} (halved and succeeded: {figures['halved_and_succeeded']}). "
            "Cap at 0.3 windows: "
            f"{'MemoryError: ' + failure if failure else 'NO ERROR (wrong)'}. Then a normal "
            f"prediction: finite {figures['next_prediction_finite']}; free memory "
            f"{free_before / 2**30:.2f} GiB before, {free_after / 2**30:.2f} GiB after. "
            f"Loss-scale back-offs: {capped_log.back_offs} under the cap, {next_log.back_offs} "
            "in the next prediction.",
        ],
    )


def check_huge(report, fast, inputs, device) -> None:
    release_memory()
    cap = nullcontext(fast)
    if device.type == "cuda":  # the whole process within a 24 GB card's memory
        room = HUGE_CAP_BYTES - torch.cuda.memory_allocated(device)
        cap = memory_cap(fast, 0, 0, fixed_bytes=room)
    log = StepLog()
    with cap as capped:
        try:
            _, seconds, peak = timed(lambda: capped(prompt=PROMPT, **inputs, callback=log), device)
            finite, failure = all(log.finite), None
        except MemoryError as error:
            finite, seconds, peak, failure = False, float("nan"), 0, str(error)
    n = len(capped.geometry.windows(capped.request(prompt=PROMPT, **inputs)))
    figures = {"inputs": inputs, "windows": n, "seconds": seconds, "peak_gib": peak / 2**30}
    figures |= {"cap_gib": HUGE_CAP_BYTES / 2**30 if device.type == "cuda" else None}
    figures |= {"error": failure, "loss_scale_back_offs": log.back_offs}
    within = f"within {HUGE_CAP_BYTES / 2**30:.0f} GiB: " if device.type == "cuda" else ""
    outcome = (
        f"{seconds:.1f} s, peak {peak / 2**30:.2f} GiB, latents finite {finite}, loss-scale "
        f"back-offs {log.back_offs}"
        if failure is None
        else f"MemoryError: {failure}"
    )
    report.add(
        "huge",
        figures,
        [
            f"{inputs['width']}x{inputs['height']}, stride {inputs['stride']}, {n} windows, "
            f"{inputs['num_inference_steps']} steps, {within}{outcome}.",
        ],
    )


def check_sdxl(report, smoke: bool, inputs, device) -> None:
    if smoke:
        with tempfile.TemporaryDirectory() as folder:
            tiny = make_tiny_weights(Path(folder) / "tiny", models=("sdxl",))
            pipe = SyncDiffusionPipeline.from_pretrained(tiny, device, model=TINY_MODELS["sdxl"][0])
    else:
        pipe = sdxl_pipeline(device, torch.float16)
    release_memory()
    (_, log), seconds, peak = timed(lambda: logged(pipe, prompt=PROMPT, **inputs), device)
    finite = all(log.finite)
    n = len(pipe.geometry.windows(pipe.request(prompt=PROMPT, **inputs)))
    figures = {"inputs": inputs, "windows": n, "seconds": seconds, "peak_gib": peak / 2**30}
    figures |= {"loss_scale_back_offs": log.back_offs}
    report.add(
        "sdxl",
        figures,
        [
            f"{'tiny SDXL-shaped model' if smoke else 'SDXL base architecture'}, "
            f"{inputs['width']}x{inputs['height']}, stride {inputs['stride']}, {n} windows of "
            f"{pipe.window_pixels} px, {inputs['num_inference_steps']} steps, sync_threshold "
            f"{inputs['sync_threshold']}: {seconds:.1f} s, peak {peak / 2**30:.2f} GiB, latents "
            f"finite {finite}, loss-scale back-offs {log.back_offs}.",
        ],
    )


def time_table(
    figures: dict[str, dict], estimated: dict[str, Work], seconds: float
) -> tuple[dict, list[str]]:
    """The whole run's figures and its table of measured seconds beside the estimates: what the
    first GPU run calibrates the estimate's constants with. Loading, and whatever else ran
    outside the sections, is the run's time less theirs."""
    measured = {
        name: figures[name]["wall_seconds"]
        for name in estimated
        if "wall_seconds" in figures.get(name, {})
    }
    rest = estimated.get("loading", Work()).seconds
    rows = [f"| loading and the rest | {rest:.0f} | {seconds - sum(measured.values()):.1f} |"]
    rows += [
        f"| {name} | {work.seconds:.0f} | "
        + (f"{measured[name]:.1f} |" if name in measured else "did not run |")
        for name, work in estimated.items()
        if name != "loading"
    ]
    total = total_seconds(estimated)
    return {"seconds": seconds, "estimated_seconds": total, "sections": measured}, [
        f"{seconds:.0f} s in all, against an estimate of {total:.0f} s on an H100-class GPU.",
        "",
        "| section | estimated seconds | measured seconds |",
        "| --- | --- | --- |",
        *rows,
        f"| total | {total:.0f} | {seconds:.1f} |",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--smoke", action="store_true", help="the CPU and the tiny model")
    parser.add_argument(
        "--tiny-weights",
        type=Path,
        default=ROOT / ".tiny-weights",
        help="the tiny model's folder for --smoke, written there if missing",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run this section alone (repeatable); memory runs with out-of-memory",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=BUDGET_SECONDS,
        help="seconds the sections may take by the estimate for an H100-class GPU; the heaviest "
        f"run fewer unsynced steps to fit (default {BUDGET_SECONDS:.0f})",
    )
    args = parser.parse_args(argv)
    wanted = set(args.only or SECTIONS)
    if "out-of-memory" in wanted:
        wanted.add("memory")  # the out-of-memory check is sized from its figures
    settings, shrunk = fit(
        SETTINGS["smoke" if args.smoke else "gpu"], wanted, args.smoke, args.budget
    )
    estimated = estimate(settings, wanted, args.smoke)
    shrinks = [
        f"{name}: {settings[name]['num_inference_steps']} steps rather than {steps}"
        for name, steps in shrunk.items()
    ]
    print(
        "Estimated seconds on an H100-class GPU"
        + (" (at --smoke's sizes; this run is on the CPU)" if args.smoke else "")
        + ":",
        *estimate_table(estimated, args.budget),
        *(["Shrunk to fit the budget: " + "; ".join(shrinks)] if shrinks else []),
        sep="\n",
        flush=True,
    )
    if total_seconds(estimated) > args.budget:
        print(
            f"error: the sections are estimated at {total_seconds(estimated):.0f} s, over the "
            f"budget of {args.budget:.0f} s even with their unsynced steps cut; run fewer with "
            "--only, or give a larger --budget",
            file=sys.stderr,
        )
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU here; --smoke runs the same checks on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu")
    if not args.smoke:  # with its index: set_per_process_memory_fraction wants one
        device = torch.device("cuda", torch.cuda.current_device())
    started = time.perf_counter()
    mode = " --smoke" if args.smoke else ""
    report = Report(
        args.out,
        [
            f"### {datetime.date.today().isoformat()} · gpu_check{mode}",
            "",
            f"- Machine: {machine(device)}",
            f"- Model: {'tiny' if args.smoke else 'SD2-base architecture'}, random weights; "
            f"syncdiffusion {__version__}",
            "- Command: `python scripts/gpu_check.py " + " ".join(argv or sys.argv[1:]) + "`",
            f"- Estimate: {total_seconds(estimated):.0f} s on an H100-class GPU, budget "
            f"{args.budget:.0f} s" + "".join(f"; {shrink}" for shrink in shrinks),
            "",
        ],
    )
    fast_dtype = torch.float16 if device.type == "cuda" else torch.float32
    tiny = args.tiny_weights if args.smoke else None

    def section(name: str, check, *check_args):
        """Run one check, timed; a failure is reported and the run goes on to the next section."""
        if name not in wanted:
            return None
        section_started = time.perf_counter()
        try:
            result = check(report, *check_args)
        except Exception as error:
            failure = f"{type(error).__name__}: {error}"
            report.add(name, {"error": failure}, [f"FAILED: {failure}"])
            release_memory()
            result = None
        report.wall_time(name, time.perf_counter() - section_started, estimated[name].seconds)
        return result

    chunks = settings["chunks"]
    if wanted - {"sdxl"}:
        fast = load(tiny, device, fast_dtype)
        reference = fast
        if fast_dtype != torch.float32 and wanted & {"published", "gradient", "controlnet"}:
            reference = load(tiny, device, torch.float32)
        section("published", check_published, fast, reference, settings["published"], device)
        section("repeatable", check_repeatable, fast, settings["repeatable"])
        section("gradient", check_gradient, fast, reference)
        section("controlnet", check_controlnet, fast, reference, settings["controlnet"], device)
        del reference
        release_memory()
        memory = section("memory", check_memory, fast, settings["memory"], chunks, device)
        if memory is not None:
            section(
                "out-of-memory", check_out_of_memory, fast, settings["memory"], chunks[-1],
                device, memory,
            )  # fmt: skip
        section("huge", check_huge, fast, settings["huge"], device)
        del fast
        release_memory()
    section("sdxl", check_sdxl, args.smoke, settings["sdxl"], device)
    seconds = time.perf_counter() - started
    report.add("total", *time_table(report.figures, estimated, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
