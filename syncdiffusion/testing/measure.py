"""Measurement helpers that the benchmarks (scripts/benchmark.py, gpu_check.py, demo_costs.py)
share: the machine's description, timing with peak memory, publishing a report, real
architectures with random weights, and a memory cap.
"""

from __future__ import annotations

import copy
import json
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTokenizer

from ..core.chunks import release_memory
from ..core.precision import vae_dtype, vae_upcast
from ..models.folders import read_family
from ..models.lpips_trunk import VGG16_RELPATH
from ..models.perceptual import load_lpips
from ..models.tiny import TINY_MODELS, make_tiny_weights
from ..pipeline import SyncDiffusionPipeline

# The real models' configs, kept in the checkout beside the package.
# The real models' configs, shipped in the package (the weights are not needed to build them).
ARCHITECTURES = Path(__file__).parent / "architectures"
SD2_CONFIGS = ARCHITECTURES / "sd2-base"
SDXL_CONFIGS = ARCHITECTURES / "sdxl-base"


class PeakMemory:
    """Peak memory of a block: `torch.cuda.max_memory_allocated` on GPU, sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, int]:
    """`fn()`'s result, its seconds (CUDA work included) and its peak memory in bytes."""
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return result, seconds, memory.peak


def machine(device: torch.device) -> str:
    """The CPU, the number of CPUs, the GPU where `device` is one, and torch's version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{cpu}, {psutil.cpu_count()} CPUs{gpu}; torch {torch.__version__}"


def publish(report: str, record: Path | None) -> None:
    """Print a measurement's report and append it to `record` (BENCHMARKS.md) unless None."""
    print(report)
    if record is not None:
        with record.open("a") as f:
            f.write("\n" + report)
        print(f"appended to {record}")


def _random_pipeline(
    configs_dir: Path, shape: str, device: torch.device, dtype: torch.dtype
) -> SyncDiffusionPipeline:
    """A real architecture (configs in `configs_dir`) with random weights, in `dtype` but for a
    VAE that must be upcast; tokenizers, scheduler and trunk from the tiny model of `shape`."""
    with tempfile.TemporaryDirectory() as folder:
        return _random_pipeline_from(configs_dir, Path(folder) / "tiny", shape, device, dtype)


def _random_pipeline_from(
    configs_dir: Path, tiny: Path, shape: str, device: torch.device, dtype: torch.dtype
) -> SyncDiffusionPipeline:
    make_tiny_weights(tiny, (shape,))  # for its tokenizers, scheduler config and VGG16 trunk
    sd = tiny / TINY_MODELS[shape][0]
    family = read_family(sd)
    configs = {
        name: json.loads((configs_dir / f"{name}.json").read_text())
        for name in ("unet", "vae", *family.text_encoders)
    }
    torch.manual_seed(0)
    with torch.device(device):
        tokenizers = family.tokenizers
        encoders = {
            name: getattr(transformers, cls)(CLIPTextConfig(**configs[name])).to(dtype)
            for name, cls in zip(family.text_encoders, family.text_encoder_classes, strict=True)
        }
        vae = AutoencoderKL.from_config(configs["vae"])
        pipe = SyncDiffusionPipeline(
            unet=UNet2DConditionModel.from_config(configs["unet"]).to(dtype),
            # From the file, as from_pretrained decides: vae.config fills a missing key with true.
            vae=vae.to(vae_dtype(dtype, vae_upcast(configs["vae"], family))),
            **encoders,
            **{name: CLIPTokenizer.from_pretrained(sd, subfolder=name) for name in tokenizers},
            scheduler=DDIMScheduler.from_pretrained(sd, subfolder="scheduler"),
            perceptual=load_lpips(tiny / VGG16_RELPATH),
            force_zeros_for_empty_prompt=family.addition_embed_type is not None,
        )
    return pipe.to(device)


def sd2_pipeline(device: torch.device, dtype: torch.dtype) -> SyncDiffusionPipeline:
    """SD2-base's architecture (configs in architectures/sd2-base) with random weights."""
    return _random_pipeline(SD2_CONFIGS, "sd2", device, dtype)


def sdxl_pipeline(device: torch.device, dtype: torch.dtype) -> SyncDiffusionPipeline:
    """SDXL base 1.0's architecture (configs in architectures/sdxl-base) with random weights: two
    text encoders, 1024 px windows, its VAE upcast to fp32 where `dtype` is fp16."""
    return _random_pipeline(SDXL_CONFIGS, "sdxl", device, dtype)


@contextmanager
def memory_cap(
    pipe: SyncDiffusionPipeline, windows: float, window_bytes: float, fixed_bytes: float = 0
) -> Iterator[SyncDiffusionPipeline]:
    """`pipe` with room for `fixed_bytes` and about `windows` windows over what is allocated now.

    On CUDA `pipe` itself under a real cap (`set_per_process_memory_fraction`); on the CPU a
    stand-in: a pipeline on the same networks whose LPIPS fails chunks of more than `windows`.
    """
    device = pipe.device
    if device.type != "cuda":
        yield _chunks_capped(pipe, windows)
        return
    # The fraction wants a device index: torch.device("cuda") alone is refused.
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    room = torch.cuda.memory_allocated(index) + fixed_bytes + windows * window_bytes
    torch.cuda.set_per_process_memory_fraction(min(1.0, room / total), index)
    # The allocator checks the cap only when it asks CUDA for more: blocks it has cached would
    # be handed out past it. Return them first.
    release_memory()
    try:
        yield pipe
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)


class _RefusesLargeChunks(torch.nn.Module):
    """`net`, but out of memory for a batch of more than `windows` images."""

    def __init__(self, net: torch.nn.Module, windows: float) -> None:
        super().__init__()
        self.net, self.windows = net, windows

    def forward(self, images: torch.Tensor) -> Any:
        if images.shape[0] > self.windows:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated on the CPU)")
        return self.net(images)


def _chunks_capped(pipe: SyncDiffusionPipeline, windows: float) -> SyncDiffusionPipeline:
    """A pipeline on `pipe`'s networks whose LPIPS trunk takes at most `windows` images at once:
    the sync step's chunks, and with `windows` under 1 the anchor too."""
    perceptual = copy.deepcopy(pipe.perceptual)  # a copy: `pipe` keeps its own LPIPS
    perceptual.net = _RefusesLargeChunks(perceptual.net, windows)
    return SyncDiffusionPipeline(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.new_scheduler(),
        perceptual=perceptual,
        text_encoder_2=pipe.text_encoder_2,
        tokenizer_2=pipe.tokenizer_2,
        force_zeros_for_empty_prompt=pipe.force_zeros_for_empty_prompt,
    )


def window_cost(memory: dict) -> tuple[float, float]:
    """Bytes per window and fixed bytes of a call, from the peaks measured for the smallest and
    largest chunk (the estimate where the peaks do not grow with the chunk)."""
    chunks = memory["chunks"]
    small, large = min(chunks), max(chunks)
    slope = (chunks[large]["measured"] - chunks[small]["measured"]) / (large - small)
    if slope <= 0:
        return memory["window_bytes"], 0.0
    return slope, max(0.0, chunks[small]["measured"] - small * slope)
