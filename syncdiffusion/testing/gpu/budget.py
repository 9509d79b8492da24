"""The GPU check's budget planner: each section's work (window-steps, synced window-steps,
decodes) from its settings, its estimated seconds on an H100-class GPU, and the sections and
settings cut to fit a budget: the optional sections are left out, then the heaviest sections
lose unsynced steps, until the estimate fits, or nothing more can go.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, NamedTuple

from ...core.windows import SD2_BASE, Geometry
from ...models.tiny import TINY_MODELS
from ...request.cost import CPU_SECONDS, Rates, work
from ...request.inputs import panorama_request
from ..measure import SDXL_CONFIGS
from .sections import PROMPT, SECTIONS, scheduler_requests

# The sections whose unsynced steps may be cut to fit the budget: the sync steps, where the
# fast path and the published algorithm differ most and the memory peaks, all stay.
SHRINKABLE = ("published", "repeatable", "sdxl")
# The sections left out, last first, where the whole check is over the budget before any
# shrinking (`plan`), unless asked for by name (--only): what they measure would be spoiled by
# fewer steps, and the others come first. The schedulers section (DDIM 50 against KarrasDPM 25,
# about 50 s by the estimate) does not fit beside the rest in 8 minutes, nor does the lora section
# (no LoRA, one and two, twice, about 55 s), which goes first.
DROPPABLE = ("schedulers", "lora")

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
SYNCED_WINDOW_STEP_SECONDS = (
    WINDOW_STEP_SECONDS * CPU_SECONDS.synced_window_step / CPU_SECONDS.window_step
)
DECODE_SECONDS = WINDOW_STEP_SECONDS * CPU_SECONDS.decode / CPU_SECONDS.window_step
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
# One LoRA of SD2-base's attention projections (rank 16) fetched, checked, loaded by diffusers,
# fused, and its 220 layers' base weights copied back. On two shared CPU cores in fp32 this took
# 8 s, three quarters of it peft's 220 merges (B @ A, added to W) and the copies, which a GPU
# makes in milliseconds; the rest, peft putting its layers in and taking them out, is Python.
LORA_FUSE_SECONDS = 1.5
# Building a random-weight architecture on the GPU, with the tiny model's tokenizers.
LOAD_SECONDS = {"sd2": 10.0, "sdxl": 20.0}
# 8 minutes: the whole check fits a 10-minute slot on a borrowed GPU, with room to spare.
BUDGET_SECONDS = 480.0


class Work(NamedTuple):
    """What a section asks of the GPU, counted in SD2-base 512 px windows (an SDXL window
    counts its pixels' share, 4, as `cost.work` counts it), and its seconds."""

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
        WINDOW_STEP_SECONDS,
        SYNCED_WINDOW_STEP_SECONDS * vae_slowdown,
        DECODE_SECONDS * vae_slowdown,
    )
    seconds = rates.price(counted) * (PUBLISHED_SLOWDOWN if published else 1.0)
    return Work(counted.window_steps, counted.synced_window_steps, counted.decodes, seconds)


def sdxl_geometry(smoke: bool) -> Geometry:
    """The SDXL section's windows: SDXL base's (its UNet config), or the tiny SDXL model's."""
    if smoke:
        return Geometry(TINY_MODELS["sdxl"][1])
    return Geometry(json.loads((SDXL_CONFIGS / "unet.json").read_text())["sample_size"])


def section_work(name: str, settings: dict[str, Any], smoke: bool) -> Work:
    """The work of section `name` at `settings`, as `sections` measures it."""
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
        one = WINDOW_STEP_SECONDS + SYNCED_WINDOW_STEP_SECONDS
        return Work(3, 3, 0, (2 + FP32_SLOWDOWN) * one)
    if name == "memory":  # each chunk recomputed, and one window kept
        runs = len(settings["chunks"]) + 1
        return sum([panorama_work(settings["memory"], decoded=False)] * runs, Work())
    if name == "out-of-memory":  # the run under the cap and the next prediction (the other fails)
        return sum([panorama_work(settings["memory"], decoded=False)] * 2, Work())
    if name == "huge":
        return panorama_work(settings["huge"])
    if name == "controlnet":  # the oracle and the fast path, each with the ControlNet
        inputs = settings["controlnet"]
        both = panorama_work(inputs, published=True) + panorama_work(inputs)
        return both._replace(seconds=both.seconds * CONTROLNET_SLOWDOWN)
    if name == "schedulers":  # an untimed small call of each scheduler, then each run; latents
        # only. `cost.work` counts each scheduler's network evaluations a step.
        warm_ups, runs = scheduler_requests(settings["schedulers"], settings["scheduler_runs"])
        return sum((panorama_work(r, decoded=False) for r in (*warm_ups, *runs)), Work())
    if name == "lora":  # an untimed call and fusing, then each repeat: the panorama without a
        # LoRA, and with one and with two, each LoRA fused twice (timed alone, and in the call).
        inputs, repeats = settings["lora"], settings["lora_repeats"]
        runs = sum([panorama_work(inputs, decoded=False)] * (1 + 3 * repeats), Work())
        return runs + Work(seconds=(1 + 6 * repeats) * LORA_FUSE_SECONDS)
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


class Plan(NamedTuple):
    """The settings fitted to a budget, their estimate per section, what was cut to fit (a
    phrase for each shrunk section), the sections left out to fit and the sections to run."""

    settings: dict[str, Any]
    works: dict[str, Work]
    shrinks: list[str]
    dropped: list[str]
    wanted: set[str]


def plan(
    settings: dict[str, Any],
    wanted: Iterable[str],
    smoke: bool,
    budget: float,
    droppable: Iterable[str] = DROPPABLE,
) -> Plan:
    """The `droppable` sections of `wanted` left out, last first, while the estimate is over
    `budget`; then `fit`, with the estimate of the fitted settings."""
    wanted, dropped = set(wanted), []
    for name in reversed(tuple(droppable)):
        if name in wanted and total_seconds(estimate(settings, wanted, smoke)) > budget:
            wanted.discard(name)
            dropped.append(name)
    fitted, shrunk = fit(settings, wanted, smoke, budget)
    shrinks = [
        f"{name}: {fitted[name]['num_inference_steps']} steps rather than {steps}"
        for name, steps in shrunk.items()
    ]
    return Plan(fitted, estimate(fitted, wanted, smoke), shrinks, dropped, wanted)
