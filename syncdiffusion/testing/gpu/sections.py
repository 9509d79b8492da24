"""What each section of the GPU check measures: plain functions from their settings (and the
pipelines they run on) to their figures, and `measure`, which runs the chosen ones once each.

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
8. schedulers: scripts/benchmark.py --schedulers' row: the fast path with DDIM at 50 steps
   against KarrasDPM (DPM++ 2M Karras) at 25, 2048x512, stride 16, sync_threshold 3 for both,
   latents only: seconds, the windows the UNet predicted for, the speed-up, peak memory. Left
   out where it does not fit the budget (`budget.DROPPABLE`), unless asked for with --only.
9. lora: scripts/benchmark.py --lora's rows: the fast path without a LoRA, with one random LoRA
   of rank 16 on every attention projection of the UNet and the text encoders, and with two,
   1024x512, 20 steps, sync_threshold 2, latents only, best of 2: seconds, the part that
   fetched, fused and restored the LoRAs, seconds per step and against none, peak memory;
   whether every UNet and text-encoder tensor is afterwards its value before to the bit, and
   whether the LoRAs' latents are finite and differ from none's. Left out where it does not fit
   the budget, as schedulers is.
10. sdxl: SDXL base's architecture (random weights, fp16, its VAE upcast), 4096x1024, 50
    steps, sync_threshold 5, stride 32: seconds and peak memory.

Every section's figures say the device they ran on and the windows' loss-scale back-offs (sync
backward passes redone at a lower fp16 loss scale) of each run, and those of a panorama what
its sync backward chose and why. `SETTINGS["smoke"]` runs the same sections on the CPU with the
tiny model at sizes that take minutes on two cores.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...core.chunks import free_memory, release_memory
from ...core.decoding import decode
from ...core.precision import LossScale, initial_loss_scale
from ...core.sampling import guided_eps, x0_predictor
from ...core.sync import lpips_features, sync_gradient
from ...models.tiny import TINY_MODELS, make_tiny_weights, random_controlnet
from ...pipeline import SyncDiffusionPipeline
from ..bench import LORA_RANK, LORA_ROWS, SCHEDULER_ROWS, WindowEvaluations, lora_runs
from ..measure import memory_cap, sd2_pipeline, sdxl_pipeline, timed, window_cost
from ..oracle import oracle_panorama
from ..oracle_controlnet import oracle_sync_controlnet

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
    "schedulers",
    "lora",
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
        "schedulers": dict(width=2048, height=512, stride=16, sync_threshold=3),
        "scheduler_runs": SCHEDULER_ROWS,  # (scheduler, steps): DDIM 50, KarrasDPM 25
        "lora": dict(width=1024, height=512, stride=16, num_inference_steps=20, sync_threshold=2),
        "lora_repeats": 2,  # best of 2: a step's cost is held to within 10% of none's
    },
    "smoke": {
        "published": dict(width=640, height=512, num_inference_steps=2, sync_threshold=1),
        "repeatable": dict(width=640, height=512, num_inference_steps=1, sync_threshold=1),
        "memory": dict(width=768, height=512, num_inference_steps=1, sync_threshold=1),
        "chunks": (1, 2),
        "huge": dict(width=1024, height=1024, stride=56, num_inference_steps=1, sync_threshold=0),
        "sdxl": dict(width=768, height=256, stride=16, num_inference_steps=2, sync_threshold=1),
        "controlnet": dict(width=640, height=512, num_inference_steps=2, sync_threshold=1),
        "schedulers": dict(width=640, height=512, stride=16, sync_threshold=1),
        "scheduler_runs": (("DDIM", 8), ("KarrasDPM", 4)),
        # No synced step: the sync step is most of a CPU run's time, and no LoRA claim is on it.
        "lora": dict(width=640, height=512, stride=16, num_inference_steps=4, sync_threshold=0),
        "lora_repeats": 1,
    },
}


def selected(wanted: Iterable[str]) -> set[str]:
    """The sections that run for `wanted`: out-of-memory is sized from memory's figures."""
    wanted = set(wanted)
    unknown = wanted - set(SECTIONS)
    if unknown:
        raise ValueError(f"no section {sorted(unknown)}; the sections are {', '.join(SECTIONS)}")
    return wanted | ({"memory"} if "out-of-memory" in wanted else set())


def measure(
    settings: dict[str, Any],
    wanted: Iterable[str],
    device: torch.device,
    tiny: Path | None = None,
) -> Iterator[tuple[str, dict, float]]:
    """Each section of `wanted` (with what it needs, `selected`) in the order of `SECTIONS`:
    its name, its figures and its wall seconds. A section that raises has figures
    `{"error": ...}` and the next one runs all the same. The sections but sdxl share one load of
    SD2-base's architecture with random weights (fp16 on CUDA, fp32 on the CPU), or of the tiny
    model in folder `tiny` (made there if missing), and an fp32 copy as the reference of the
    published, gradient and controlnet sections where that differs; the reference is let go
    before the memory sections, the whole model before sdxl, which loads its own."""
    wanted = selected(wanted)

    def run(name: str, section, *args) -> tuple[str, dict, float]:
        started = time.perf_counter()
        try:
            figures = {"device": device.type, **section(*args)}
        except Exception as error:
            release_memory()
            figures = {"device": device.type, "error": f"{type(error).__name__}: {error}"}
        return name, figures, time.perf_counter() - started

    if wanted - {"sdxl"}:
        fast_dtype = torch.float16 if device.type == "cuda" else torch.float32
        fast = reference = load(tiny, device, fast_dtype)
        if fast_dtype != torch.float32 and wanted & {"published", "gradient", "controlnet"}:
            reference = load(tiny, device, torch.float32)
        for name, section, *args in (
            ("published", published, fast, reference, settings["published"], device),
            ("repeatable", repeatable, fast, settings["repeatable"]),
            ("gradient", gradient, fast, reference),
            ("controlnet", controlnet, fast, reference, settings["controlnet"], device),
        ):
            if name in wanted:
                yield run(name, section, *args)
        del reference
        release_memory()
        if "memory" in wanted:
            inputs, chunks = settings["memory"], settings["chunks"]
            yield (done := run("memory", memory, fast, inputs, chunks, device))
            if "out-of-memory" in wanted:
                if "error" in done[1]:
                    yield "out-of-memory", {"error": "not run: the memory section failed"}, 0.0
                else:
                    args = fast, inputs, chunks[-1], device, done[1]
                    yield run("out-of-memory", out_of_memory, *args)
        if "huge" in wanted:
            yield run("huge", huge, fast, settings["huge"], device)
        if "schedulers" in wanted:
            args = fast, settings["schedulers"], settings["scheduler_runs"], device
            yield run("schedulers", schedulers, *args)
        if "lora" in wanted:
            yield run("lora", lora, fast, settings["lora"], settings["lora_repeats"], device)
        del fast
        release_memory()
    if "sdxl" in wanted:
        yield run("sdxl", sdxl, tiny is not None, settings["sdxl"], device)


def pixel_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


class StepLog:
    """A pipeline callback that keeps what each step reports: whether the latent was finite, the
    chunk size that fitted, the windows' loss-scale back-offs so far, and what the synced steps
    did with the sync backward's activations and why (each different reason once, in order)."""

    def __init__(self) -> None:
        self.finite: list[bool] = []
        self.chunks: list[int] = []
        self.back_offs = 0
        self.sync_backward: list[str] = []

    def __call__(self, state: dict[str, Any]) -> None:
        self.finite.append(bool(state["latent"].isfinite().all()))
        self.chunks.append(state["view_batch_size"])
        self.back_offs = state["loss_scale_back_offs"]
        reason = state["recompute_reason"]
        if state["sync"] and reason not in self.sync_backward:
            self.sync_backward.append(reason)


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


def against_oracle(fast, run_oracle, run_fast, inputs, device) -> dict:
    """Time `run_oracle()` (an oracle's picture and latent) against `run_fast()` (the fast
    path's picture and `StepLog`): seconds, peak memory, finite latents, the largest pixel
    difference and loss-scale back-offs."""
    (o_image, o_latent), o_s, o_peak = timed(run_oracle, device)
    (f_image, f_log), f_s, f_peak = timed(run_fast, device)
    return {
        "inputs": inputs,
        "windows": len(fast.geometry.windows(fast.request(prompt=PROMPT, **inputs))),
        "fast_dtype": str(fast.dtype).removeprefix("torch."),
        "oracle_seconds": o_s,
        "fast_seconds": f_s,
        "speed_up": o_s / f_s,
        "oracle_peak_gib": o_peak / 2**30,
        "fast_peak_gib": f_peak / 2**30,
        "max_pixel_diff": pixel_diff(f_image, o_image),
        "oracle_latent_finite": bool(o_latent.isfinite().all()),
        "fast_latents_finite": all(f_log.finite),
        "fast_loss_scale_back_offs": f_log.back_offs,
        "sync_backward": f_log.sync_backward,
    }


def published(fast, oracle, inputs, device) -> dict:
    # One small call of each first, untimed: the first call on a GPU pays for the CUDA context,
    # cuBLAS/cuDNN handles and kernel loading, and the fast path for its memory probe.
    warm_up = {**inputs, "width": 512, "height": 512, "num_inference_steps": 1}
    oracle_panorama(oracle, PROMPT, **warm_up)
    fast(prompt=PROMPT, **warm_up)
    return against_oracle(
        fast,
        lambda: oracle_panorama(oracle, PROMPT, **inputs),
        lambda: logged(fast, prompt=PROMPT, **inputs),
        inputs,
        device,
    )


def controlnet(fast, oracle, inputs, device) -> dict:
    """The fast path with a ControlNet against the authors' SyncControlNet, restated."""
    net = random_controlnet(fast.unet)  # SD2-base's shape (or the tiny model's)
    fast_c, oracle_c = (
        pipe.with_controlnet(copy.deepcopy(net).to(pipe.dtype), "random") for pipe in (fast, oracle)
    )
    del net
    edges = np.random.default_rng(0).random((inputs["height"], inputs["width"])) > 0.9
    layout = Image.fromarray(edges.astype(np.uint8) * 255)
    return against_oracle(
        fast,
        lambda: oracle_sync_controlnet(oracle_c, layout, PROMPT, **inputs),
        lambda: logged(fast_c, prompt=PROMPT, control_image=layout, **inputs),
        inputs,
        device,
    )


def repeatable(fast, inputs) -> dict:
    first, first_log = logged(fast, prompt=PROMPT, **inputs)
    again, again_log = logged(fast, prompt=PROMPT, **inputs)
    one, one_log = logged(fast, prompt=PROMPT, **inputs, view_batch_size=1)
    return {
        "inputs": inputs,
        "auto_chunk": max(first_log.chunks, default=0),
        "max_pixel_diff_same_chunks": pixel_diff(first, again),
        "max_pixel_diff_chunks_of_1": pixel_diff(first, one),
        "loss_scale_back_offs": [log.back_offs for log in (first_log, again_log, one_log)],
    }


def gradient(fast, reference) -> dict:
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

    return {
        "fast_dtype": str(fast.dtype).removeprefix("torch."),
        "cosine": float(cosine(scaled)),
        "cosine_without_loss_scale": float(cosine(unscaled)),
        "norm_ratio": float(scaled.norm() / reference_grad.norm()),
        "zero_share": float((scaled == 0).double().mean()),
        "zero_share_without_loss_scale": float((unscaled == 0).double().mean()),
        "loss_scale_back_offs": loss_scale.back_offs,
    }


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


def memory(fast, inputs, chunks, device) -> dict:
    """The per-window estimate (saved-tensor count on a probe, scaled) against the measured
    peak over what was allocated before the call (on the CPU: peak RSS, not comparable)."""
    figures = {"inputs": inputs, "chunks": {}}
    scheduler = fast.new_scheduler()
    scheduler.set_timesteps(inputs["num_inference_steps"])
    eps = partial(guided_eps, fast.unet, text_embeddings=fast.encode_prompt(PROMPT))
    estimate = fast.window_bytes(partial(eps, guidance_scale=7.5), scheduler)
    for k in chunks:
        release_memory()
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        (_, log), _, peak = timed(
            lambda k=k: logged(
                fast,
                prompt=PROMPT,
                **inputs,
                output_type="latent",
                view_batch_size=k,
                recompute="always",
            ),
            device,
        )
        figures["chunks"][k] = {
            "estimate": k * estimate,
            "measured": peak - base,
            "loss_scale_back_offs": log.back_offs,
        }
    figures["window_bytes"] = estimate
    # One window kept whole, against its own count: what `recompute="auto"` plans with.
    kept = fast.window_bytes(partial(eps, guidance_scale=7.5), scheduler, recompute=False)
    release_memory()
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    (_, log), _, peak = timed(
        lambda: logged(
            fast, prompt=PROMPT, **inputs, output_type="latent", view_batch_size=1,
            recompute="never",
        ),
        device,
    )  # fmt: skip
    figures["kept"] = {"estimate": kept, "measured": peak - base}
    figures["sync_backward"] = log.sync_backward
    return figures


def out_of_memory(fast, inputs, largest, device, memory) -> dict:
    """Chunks of `largest` windows under a cap that fits fewer, then one that fits none, then a
    normal prediction; the caps are sized from the memory section's figures (`memory`)."""
    release_memory()
    free_before = free_memory(device)
    window_bytes, fixed_bytes = window_cost(memory)
    cap = largest - 0.5
    with memory_cap(fast, cap, window_bytes, fixed_bytes) as capped:
        _, capped_log = logged(
            capped,
            prompt=PROMPT,
            **inputs,
            output_type="latent",
            view_batch_size=largest,
            recompute="always",  # the cap is sized in recomputed windows
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
    return {
        "cap_windows": cap,
        "chunks_under_cap": halved,
        "halved_and_succeeded": halved[0] == largest and min(halved) < largest,
        "one_window_error": failure,
        "next_prediction_finite": bool(latent.isfinite().all()),
        "free_gib_before": free_before / 2**30,
        "free_gib_after": free_after / 2**30,
        "loss_scale_back_offs": {"under_cap": capped_log.back_offs, "next": next_log.back_offs},
        "sync_backward": next_log.sync_backward,
    }


def huge(fast, inputs, device) -> dict:
    """One large panorama; on CUDA the whole process within a 24 GB card's memory."""
    release_memory()
    cap = nullcontext(fast)
    if device.type == "cuda":
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
    return {
        "inputs": inputs,
        "windows": n,
        "seconds": seconds,
        "peak_gib": peak / 2**30,
        "cap_gib": HUGE_CAP_BYTES / 2**30 if device.type == "cuda" else None,
        "memory_error": failure,
        "latents_finite": finite,
        "loss_scale_back_offs": log.back_offs,
        "sync_backward": log.sync_backward,
    }


# The schedulers section's untimed first call of each scheduler: two windows, one synced step.
SCHEDULER_WARM_UP = dict(width=640, num_inference_steps=1, sync_threshold=1)


def scheduler_requests(inputs, runs) -> tuple[list[dict], list[dict]]:
    """The schedulers section's calls for each (scheduler, steps) of `runs` at `inputs`: the
    untimed warm-ups, then the timed ones."""
    warm_ups = [{**inputs, **SCHEDULER_WARM_UP, "scheduler": name} for name, _ in runs]
    return warm_ups, [
        {**inputs, "scheduler": name, "num_inference_steps": steps} for name, steps in runs
    ]


def schedulers(fast, inputs, runs, device) -> dict:
    """The fast path with each (scheduler, steps) of `runs` at `inputs`, latents only, as
    scripts/benchmark.py --schedulers times it (`bench.schedulers`): seconds, peak memory, the
    windows the UNet predicted for (`WindowEvaluations`: the sync step's forwards too), each
    against the first run; after an untimed small call of each (CUDA's start-up, the memory
    probe)."""
    warm_ups, requests = scheduler_requests(inputs, runs)
    for request in warm_ups:
        fast(prompt=PROMPT, **request, output_type="latent")
    measured = []
    for request in requests:
        release_memory()
        with WindowEvaluations(fast.unet) as evaluations:
            (_, log), seconds, peak = timed(
                lambda r=request: logged(fast, prompt=PROMPT, **r, output_type="latent"), device
            )
        measured.append(
            {
                "scheduler": request["scheduler"],
                "steps": request["num_inference_steps"],
                "window_evaluations": evaluations.count,
                "seconds": seconds,
                "peak_gib": peak / 2**30,
                "latents_finite": all(log.finite),
                "loss_scale_back_offs": log.back_offs,
                "sync_backward": log.sync_backward,
            }
        )
    first, last = measured[0], measured[-1]
    for run in measured:
        run["speed_up"] = first["seconds"] / run["seconds"]
        run["evaluations_ratio"] = run["window_evaluations"] / first["window_evaluations"]
    return {
        "inputs": inputs,
        "windows": len(fast.geometry.windows(fast.request(prompt=PROMPT, **inputs))),
        "runs": measured,
        "speed_up": last["speed_up"],
        "evaluations_ratio": last["evaluations_ratio"],
        # Every run's reasons, each once, in order (the runs' own are in `runs`).
        "sync_backward": list(dict.fromkeys(r for run in measured for r in run["sync_backward"])),
    }


def base_tensors(pipe: SyncDiffusionPipeline) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `pipe`'s UNet and text encoders (parameters and buffers), by name."""
    for component, network in pipe.lora_networks().items():
        for name, tensor in network.state_dict().items():
            yield f"{component}.{name}", tensor


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s bytes, so that equal means bit for bit (-0.0 is not 0.0, a NaN is itself)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def lora(fast, inputs, repeats, device) -> dict:
    """The fast path without a LoRA, with one and with two, as scripts/benchmark.py --lora times
    it (`bench.lora_runs`: random LoRAs of rank `LORA_RANK` on every attention projection of
    the UNet and the text encoders, latents only, best of `repeats`): seconds, the part of it
    that fetched, fused and afterwards restored the LoRAs, the rest per step and against none's,
    peak memory; each run's steps' latents finite and its latent's largest difference to
    none's; and whether every UNet and text-encoder tensor is afterwards what it was before,
    to the bit (kept on the CPU meanwhile)."""
    # A copy, on the CPU: `.cpu()` of a CPU tensor would be the tensor itself.
    before = {name: bits(t).to("cpu", copy=True) for name, t in base_tensors(fast)}
    logs = {label: StepLog() for label in LORA_ROWS}
    with tempfile.TemporaryDirectory() as folder:
        measured = lora_runs(
            fast, {"prompt": PROMPT, **inputs}, device, Path(folder), repeats, logs
        )
    after = dict(base_tensors(fast))
    identical = after.keys() == before.keys() and all(
        torch.equal(bits(t).cpu(), before[name]) for name, t in after.items()
    )
    del before
    plain = measured[LORA_ROWS[0]]["latent"].float()
    runs = []
    for label, run in measured.items():
        latent, log = run["latent"].float(), logs[label]
        runs.append(
            {
                "loras": label,
                "seconds": run["seconds"],
                "fuse_seconds": run["fuse_seconds"],
                "seconds_per_step": run["seconds_per_step"],
                "per_step_ratio": run["per_step_ratio"],
                "peak_gib": run["peak_bytes"] / 2**30,
                "latents_finite": all(log.finite) and bool(latent.isfinite().all()),
                "max_latent_diff_to_none": float((latent - plain).abs().max()),
                "loss_scale_back_offs": log.back_offs,
                "sync_backward": log.sync_backward,
            }
        )
    return {
        "inputs": inputs,
        "windows": len(fast.geometry.windows(fast.request(prompt=PROMPT, **inputs))),
        "fast_dtype": str(fast.dtype).removeprefix("torch."),
        "lora_rank": LORA_RANK,
        "repeats": repeats,
        "runs": runs,
        # The two LoRAs' step against none's (each run's is in `runs`).
        "per_step_ratio": runs[-1]["per_step_ratio"],
        "base_bit_identical": identical,
        "base_tensors": len(after),
        "sync_backward": list(dict.fromkeys(r for run in runs for r in run["sync_backward"])),
    }


def sdxl(tiny: bool, inputs, device) -> dict:
    """SDXL base's architecture with random weights in fp16, or (`tiny`) the tiny SDXL model."""
    if tiny:
        with tempfile.TemporaryDirectory() as folder:
            weights = make_tiny_weights(Path(folder) / "tiny", models=("sdxl",))
            model = TINY_MODELS["sdxl"][0]
            pipe = SyncDiffusionPipeline.from_pretrained(weights, device, model=model)
    else:
        pipe = sdxl_pipeline(device, torch.float16)
    release_memory()
    (_, log), seconds, peak = timed(lambda: logged(pipe, prompt=PROMPT, **inputs), device)
    return {
        "model": "tiny SDXL-shaped model" if tiny else "SDXL base architecture",
        "inputs": inputs,
        "windows": len(pipe.geometry.windows(pipe.request(prompt=PROMPT, **inputs))),
        "window_pixels": pipe.window_pixels,
        "seconds": seconds,
        "peak_gib": peak / 2**30,
        "latents_finite": all(log.finite),
        "loss_scale_back_offs": log.back_offs,
        "sync_backward": log.sync_backward,
    }
