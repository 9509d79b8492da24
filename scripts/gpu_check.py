"""Everything that needs a GPU, in one command: fp16 numerics, speed, memory, out-of-memory.

    python scripts/gpu_check.py [--out DIR]           # CUDA: SD2-base architecture, random
    python scripts/gpu_check.py --smoke [--out DIR]   # the CPU, the tiny model, small sizes

Each section runs even where an earlier one failed (its error goes into the report), and
`--only SECTION` reruns one. Writes DIR/gpu-check.md (the report that goes into BENCHMARKS.md)
and DIR/gpu-check.json (its figures) after every section, so a run cut short still leaves
what it measured. Sections:

1. published: the published algorithm as the published wrapper ran it (the oracle, fp32
   weights under autocast) against the fast path (fp16): seconds, peak memory, largest pixel
   difference, whether every latent stayed finite; 2048x512, 50 steps, sync_threshold 5.
2. repeatable: the fast path twice with automatic chunks and once one window at a time.
3. gradient: one view's sync gradient with fp16 networks against fp32 ones (cosine).
4. memory: the per-window estimate against the measured peak of chunks of 1, 2 and 4.
5. out-of-memory: a memory cap under which 4 windows do not fit (halving, then success), one
   under which 1 does not (a clear MemoryError), then a normal prediction and the free memory.

--smoke runs the same sections at sizes that take minutes on two cores (chunks of 1 and 2).
6. huge: 4096x4096 at stride 56, 2 steps, on CUDA under a cap of 24 GiB in all (a 24 GB
   card's memory): whether it fits, seconds, peak memory.
7. sdxl: SDXL base's architecture (random weights, fp16, its VAE upcast), 4096x1024, 50
   steps, sync_threshold 5, stride 32: seconds and peak memory.

The GPU machine needs this project's pinned diffusers, transformers and lpips:
`scripts/fetch_gpu_wheels.sh` downloads them into `.whl/` to take along.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch

from syncdiffusion import SyncDiffusionPipeline, __version__
from syncdiffusion.batching import free_memory, release_memory
from syncdiffusion.decoding import decode
from syncdiffusion.precision import LossScale, initial_loss_scale
from syncdiffusion.sampling import guided_eps, predict_x0
from syncdiffusion.sync import lpips_features, sync_gradient
from syncdiffusion.testing.measure import (
    machine,
    memory_cap,
    sd2_pipeline,
    sdxl_pipeline,
    timed,
    window_cost,
)
from syncdiffusion.testing.oracle import oracle_panorama
from syncdiffusion.testing.tiny_models import TINY_MODELS, make_tiny_weights

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a mountain range at twilight"
HUGE_CAP_BYTES = 24 * 2**30
SECTIONS = ("published", "repeatable", "gradient", "memory", "out-of-memory", "huge", "sdxl")
# Sizes and steps per mode: the GPU check's own, and the CPU smoke run's (same code, minutes).
SETTINGS = {
    "gpu": {
        "published": dict(width=2048, height=512, num_inference_steps=50, sync_threshold=5),
        "repeatable": dict(width=2048, height=512, num_inference_steps=10, sync_threshold=5),
        "memory": dict(width=1024, height=512, num_inference_steps=1, sync_threshold=1),
        "chunks": (1, 2, 4),
        "huge": dict(width=4096, height=4096, stride=56, num_inference_steps=2),
        "sdxl": dict(width=4096, height=1024, stride=32, num_inference_steps=50, sync_threshold=5),
    },
    "smoke": {
        "published": dict(width=640, height=512, num_inference_steps=2, sync_threshold=1),
        "repeatable": dict(width=640, height=512, num_inference_steps=1, sync_threshold=1),
        "memory": dict(width=768, height=512, num_inference_steps=1, sync_threshold=1),
        "chunks": (1, 2),
        "huge": dict(width=1024, height=1024, stride=56, num_inference_steps=1, sync_threshold=0),
        "sdxl": dict(width=768, height=256, stride=16, num_inference_steps=2, sync_threshold=1),
    },
}


class Report:
    """The figures (JSON) and the markdown report, both rewritten after every section."""

    def __init__(self, out: Path, header: list[str]) -> None:
        self.out, self.header, self.lines, self.figures = out, header, [], {}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, section: str, figures: dict, lines: list[str]) -> None:
        self.figures[section] = figures
        self.lines += [f"**{section}**", "", *lines, ""]
        print("\n".join(lines), flush=True)
        (self.out / "gpu-check.json").write_text(json.dumps(self.figures, indent=2) + "\n")
        (self.out / "gpu-check.md").write_text("\n".join([*self.header, *self.lines]))


def pixel_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


def finite_latents(pipe: SyncDiffusionPipeline, **inputs):
    """The picture, and whether the latent was finite after every step."""
    finite = []
    image = pipe(
        **inputs, callback=lambda state: finite.append(bool(state["latent"].isfinite().all()))
    )
    return image, all(finite)


def chunk_log(sizes: list[int]):
    """A callback that records the chunk size that fitted in each step into `sizes`."""
    return lambda state: sizes.append(state["view_batch_size"])


def load(tiny: Path | None, device: torch.device, dtype: torch.dtype) -> SyncDiffusionPipeline:
    """SD2-base's architecture with random weights, or the tiny model in folder `tiny`."""
    if tiny is None:
        return sd2_pipeline(device, dtype)
    if not tiny.is_dir():
        make_tiny_weights(tiny)
    return SyncDiffusionPipeline.from_pretrained(tiny, device=device, dtype=dtype)


def check_published(report, fast, oracle, inputs, device) -> None:
    # One small call of each first, untimed: the first call on a GPU pays for the CUDA context,
    # cuBLAS/cuDNN handles and kernel loading, and the fast path for its memory probe.
    warm_up = {**inputs, "width": 512, "height": 512, "num_inference_steps": 1}
    oracle_panorama(oracle, PROMPT, **warm_up)
    fast(prompt=PROMPT, **warm_up)
    (o_image, o_latent), o_s, o_peak = timed(
        lambda: oracle_panorama(oracle, PROMPT, **inputs), device
    )
    (f_image, f_finite), f_s, f_peak = timed(
        lambda: finite_latents(fast, prompt=PROMPT, **inputs), device
    )
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
        "fast_latents_finite": f_finite,
    }
    report.add(
        "published",
        figures,
        [
            f"{inputs['width']}x{inputs['height']}, {n} windows, {inputs['num_inference_steps']} "
            f"steps, sync_threshold {inputs['sync_threshold']}, stride 16, seed 2",
            "",
            "| path | seconds | speed-up | peak memory | latents finite | max pixel diff |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| published (fp32 weights, autocast) | {o_s:.1f} | 1.00x | {o_peak / 2**30:.2f} GiB "
            f"| {figures['oracle_latent_finite']} | |",
            f"| fast ({str(fast.dtype)[6:]}) | {f_s:.1f} | {o_s / f_s:.2f}x | "
            f"{f_peak / 2**30:.2f} GiB | {f_finite} | {figures['max_pixel_diff']}/255 |",
        ],
    )


def check_repeatable(report, fast, inputs) -> None:
    auto_chunks = []
    first = fast(prompt=PROMPT, **inputs, callback=chunk_log(auto_chunks))
    again = fast(prompt=PROMPT, **inputs)
    one = fast(prompt=PROMPT, **inputs, view_batch_size=1)
    figures = {
        "inputs": inputs,
        "auto_chunk": max(auto_chunks, default=0),
        "max_pixel_diff_same_chunks": pixel_diff(first, again),
        "max_pixel_diff_chunks_of_1": pixel_diff(first, one),
    }
    report.add(
        "repeatable",
        figures,
        [
            f"{inputs['width']}x{inputs['height']}, {inputs['num_inference_steps']} steps: the "
            f"same call twice (chunks of {figures['auto_chunk']}) differs by "
            f"{figures['max_pixel_diff_same_chunks']}/255; chunks of 1 against it by "
            f"{figures['max_pixel_diff_chunks_of_1']}/255.",
        ],
    )


def check_gradient(report, fast, reference) -> None:
    """One view's sync gradient at the first step with `fast`'s networks and fp32 ones."""
    view = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(5))
    anchor = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(3))

    def gradient(pipe, scale):
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
                partial(predict_x0, scheduler, eps, scheduler.timesteps[0]),
                partial(decode, pipe.vae),
                pipe.perceptual,
                features,
                LossScale(1, scale),
            )
            .cpu()
            .double()
        )

    with strict_fp32():
        reference_grad = gradient(reference, 1.0)
        scaled = gradient(fast, initial_loss_scale(fast.dtype))
        unscaled = gradient(fast, 1.0)

    def cosine(g):
        return torch.nn.functional.cosine_similarity(g.flatten(), reference_grad.flatten(), dim=0)

    figures = {
        "cosine": float(cosine(scaled)),
        "cosine_without_loss_scale": float(cosine(unscaled)),
        "norm_ratio": float(scaled.norm() / reference_grad.norm()),
        "zero_share": float((scaled == 0).double().mean()),
        "zero_share_without_loss_scale": float((unscaled == 0).double().mean()),
    }
    report.add(
        "gradient",
        figures,
        [
            f"One 64x64 view at the first step, {str(fast.dtype)[6:]} networks against fp32: "
            f"cosine {figures['cosine']:.5f} with the loss scale "
            f"({figures['cosine_without_loss_scale']:.5f} without), norm ratio "
            f"{figures['norm_ratio']:.4f}, zeros {figures['zero_share']:.2%} "
            f"({figures['zero_share_without_loss_scale']:.2%} without).",
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
        _, _, peak = timed(
            lambda k=k: fast(prompt=PROMPT, **inputs, output_type="latent", view_batch_size=k),
            device,
        )
        measured = peak - base
        figures["chunks"][k] = {"estimate": k * estimate, "measured": measured}
        rows.append(
            f"| {k} | {k * estimate / 2**30:.2f} GiB | {measured / 2**30:.2f} GiB | "
            f"{measured / (k * estimate):.2f} |"
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
            "| chunk | estimate | measured | measured / estimate |",
            "| --- | --- | --- | --- |",
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
    fitted = []
    with memory_cap(fast, cap, window_bytes, fixed_bytes) as capped:
        capped(
            prompt=PROMPT,
            **inputs,
            output_type="latent",
            view_batch_size=largest,
            callback=chunk_log(fitted),
        )
    halved = [largest, *fitted]  # the chunk asked for, then the one that fitted in each step
    with memory_cap(fast, 0.3, window_bytes) as capped:
        try:
            capped(prompt=PROMPT, **inputs, output_type="latent", view_batch_size=1)
            failure = None
        except MemoryError as error:
            failure = str(error)
    release_memory()
    latent = fast(prompt=PROMPT, **inputs, output_type="latent")
    release_memory()
    free_after = free_memory(device)
    figures = {
        "chunks_under_cap": halved,
        "halved_and_succeeded": halved[0] == largest and min(halved) < largest,
        "one_window_error": failure,
        "next_prediction_finite": bool(latent.isfinite().all()),
        "free_gib_before": free_before / 2**30,
        "free_gib_after": free_after / 2**30,
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
            f"{free_before / 2**30:.2f} GiB before, {free_after / 2**30:.2f} GiB after.",
        ],
    )


def check_huge(report, fast, inputs, device) -> None:
    release_memory()
    cap = nullcontext(fast)
    if device.type == "cuda":  # the whole process within a 24 GB card's memory
        room = HUGE_CAP_BYTES - torch.cuda.memory_allocated(device)
        cap = memory_cap(fast, 0, 0, fixed_bytes=room)
    with cap as capped:
        try:
            (_, finite), seconds, peak = timed(
                lambda: finite_latents(capped, prompt=PROMPT, **inputs), device
            )
            failure = None
        except MemoryError as error:
            finite, seconds, peak, failure = False, float("nan"), 0, str(error)
    n = len(capped.geometry.windows(capped.request(prompt=PROMPT, **inputs)))
    figures = {"inputs": inputs, "windows": n, "seconds": seconds, "peak_gib": peak / 2**30}
    figures |= {"cap_gib": HUGE_CAP_BYTES / 2**30 if device.type == "cuda" else None}
    figures |= {"error": failure}
    within = f"within {HUGE_CAP_BYTES / 2**30:.0f} GiB: " if device.type == "cuda" else ""
    outcome = (
        f"{seconds:.1f} s, peak {peak / 2**30:.2f} GiB, latents finite {finite}"
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
    (_, finite), seconds, peak = timed(
        lambda: finite_latents(pipe, prompt=PROMPT, **inputs), device
    )
    n = len(pipe.geometry.windows(pipe.request(prompt=PROMPT, **inputs)))
    figures = {"inputs": inputs, "windows": n, "seconds": seconds, "peak_gib": peak / 2**30}
    report.add(
        "sdxl",
        figures,
        [
            f"{'tiny SDXL-shaped model' if smoke else 'SDXL base architecture'}, "
            f"{inputs['width']}x{inputs['height']}, stride {inputs['stride']}, {n} windows of "
            f"{pipe.window_pixels} px, {inputs['num_inference_steps']} steps, sync_threshold "
            f"{inputs['sync_threshold']}: {seconds:.1f} s, peak {peak / 2**30:.2f} GiB, latents "
            f"finite {finite}.",
        ],
    )


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
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU here; --smoke runs the same checks on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu")
    if not args.smoke:  # with its index: set_per_process_memory_fraction wants one
        device = torch.device("cuda", torch.cuda.current_device())
    settings = SETTINGS["smoke" if args.smoke else "gpu"]
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
            "",
        ],
    )
    fast_dtype = torch.float16 if device.type == "cuda" else torch.float32
    tiny = args.tiny_weights if args.smoke else None
    wanted = set(args.only or SECTIONS)

    def section(name: str, check, *check_args):
        """Run one check; a failure is reported and the run goes on to the next section."""
        if name not in wanted:
            return None
        try:
            return check(report, *check_args)
        except Exception as error:
            failure = f"{type(error).__name__}: {error}"
            report.add(name, {"error": failure}, [f"FAILED: {failure}"])
            release_memory()
            return None

    chunks = settings["chunks"]
    if wanted - {"sdxl"}:
        fast = load(tiny, device, fast_dtype)
        reference = fast
        if fast_dtype != torch.float32 and wanted & {"published", "gradient"}:
            reference = load(tiny, device, torch.float32)
        section("published", check_published, fast, reference, settings["published"], device)
        section("repeatable", check_repeatable, fast, settings["repeatable"])
        section("gradient", check_gradient, fast, reference)
        del reference
        release_memory()
        if wanted & {"memory", "out-of-memory"}:
            wanted.add("memory")  # the out-of-memory check is sized from its figures
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
    report.add("total", {"seconds": seconds}, [f"{seconds:.0f} s in all."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
