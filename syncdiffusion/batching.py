"""How many windows go through the networks at once, and falling back when a chunk does not fit."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import psutil
import torch
from diffusers import AutoencoderKL

# Saved activations per pixel of a 512x512 window for one sync-gradient pass, in tensor elements:
# the VAE decoder's (about 30 per channel of each level, weighted by that level's area) plus
# LPIPS-VGG16's (about 450). An estimate, checked against SD2-base on a GPU (BENCHMARKS.md);
# a GPU chunk that still does not fit is halved and retried.
_DECODER_ELEMENTS_PER_CHANNEL = 30
_VGG_ELEMENTS = 450
_WINDOW_PIXELS = 512 * 512
# Share of the free memory the chunks may fill: the rest is left to the allocator's slack.
_MEMORY_SHARE = 0.7
# On the CPU every network call already uses all cores, and chunks past two windows ran no
# faster per window (LPIPS-VGG16 forward and backward at 512x512: 3.6 s a window alone or in
# twos, 3.7-4.1 s in fours, on two cores): larger chunks would only cost memory.
_CPU_MAX_CHUNK = 2


def window_bytes(vae: AutoencoderKL, dtype: torch.dtype) -> int:
    """Estimated peak memory of one window's sync gradient, through the decoder and LPIPS."""
    # Level i of the VAE runs at 1/2**i of the window's side, so 1/4**i of its pixels.
    decoder = sum(c / 4**i for i, c in enumerate(vae.config.block_out_channels))
    elements = _DECODER_ELEMENTS_PER_CHANNEL * decoder + _VGG_ELEMENTS
    return int(elements * _WINDOW_PIXELS * torch.finfo(dtype).bits // 8)


def free_memory(device: torch.device) -> int:
    """Bytes free for tensors on `device`: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def auto_view_batch_size(
    n_windows: int, vae: AutoencoderKL, device: torch.device, dtype: torch.dtype
) -> int:
    """The largest chunk of windows that should fit in the memory free now, at least 1."""
    fits = int(free_memory(device) * _MEMORY_SHARE) // window_bytes(vae, dtype)
    if device.type == "cpu":
        fits = min(fits, _CPU_MAX_CHUNK)
    return max(1, min(n_windows, fits))


def run_in_chunks(fn: Callable[[list[int]], None], indices: Sequence[int], batch_size: int) -> int:
    """Call `fn` on consecutive chunks of `indices`; a chunk out of GPU memory is halved, retried.

    `fn` must write its results only once it has them all, so a failed chunk leaves no trace.
    Returns the chunk size that last succeeded, so later steps start from a size that fits.
    """
    start = 0
    while start < len(indices):
        chunk = list(indices[start : start + batch_size])
        try:
            fn(chunk)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size = max(1, batch_size // 2)
            torch.cuda.empty_cache()
            continue
        start += len(chunk)
    return batch_size
