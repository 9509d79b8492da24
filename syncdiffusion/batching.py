"""How many windows go through the networks at once, and falling back when a chunk does not fit."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Sequence

import psutil
import torch
from accelerate.utils.memory import should_reduce_batch_size

# Share of the free memory the chunks may fill: the rest is left to what the estimate leaves
# out (the backward pass's gradient buffers, cuDNN/cuBLAS workspaces) and the allocator's slack.
_MEMORY_SHARE = 0.7
# On the CPU every network call already uses all cores, and chunks past two windows ran no
# faster per window (LPIPS-VGG16 forward and backward at 512x512: 3.6 s a window alone or in
# twos, 3.7-4.1 s in fours, on two cores): larger chunks would only cost memory.
_CPU_MAX_CHUNK = 2
# accelerate's list of out-of-memory messages lacks the allocation failures that cuBLAS and
# cuDNN report as plain RuntimeErrors when they cannot get a workspace, and CUDA's own (its
# list has " out of memory." with a period; CUDA's message goes on "out of memory\nCUDA kernel
# errors might be...").
_LIBRARY_OUT_OF_MEMORY = (
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDA error: out of memory",
)


def saved_bytes(forward: Callable[[], torch.Tensor], parameters: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors that autograd keeps for the backward pass of `forward()`.

    Counted with autograd's saved-tensor hooks, each storage once, the networks' parameters
    (resident anyway) left out: exactly what a backward pass through these networks holds.
    """
    resident = {p.untyped_storage().data_ptr() for p in parameters}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(kept.values())


def sync_window_bytes(
    sync_loss: Callable[[torch.Tensor], torch.Tensor],
    probe: torch.Tensor,
    window: int,
    parameters: Iterable[torch.Tensor],
) -> int:
    """One window's memory in a sync chunk: what the backward of its loss keeps through the UNet
    (both classifier-free guidance inputs), the VAE decoder and LPIPS.

    Counted on `probe`, a small latent view (1, c, s, s), and scaled to a `window` x `window`
    one: every kept activation grows with the pixels (attention kernels keep no n x n maps).
    """
    side = probe.shape[-1]
    probe = probe.detach().requires_grad_()
    with torch.enable_grad():
        kept = saved_bytes(lambda: sync_loss(probe), parameters)
    return kept * window**2 // side**2


def free_memory(device: torch.device) -> int:
    """Bytes free for tensors on `device`: the GPU's free memory plus what PyTorch's allocator
    holds cached but unused, or the machine's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return psutil.virtual_memory().available


def auto_view_batch_size(n_windows: int, window_bytes: int, device: torch.device) -> int:
    """The largest chunk of windows that should fit in the memory free now, at least 1.

    `window_bytes` is one window's peak (`SyncDiffusionPipeline.window_bytes`).
    """
    fits = int(free_memory(device) * _MEMORY_SHARE) // window_bytes
    if device.type == "cpu":
        fits = min(fits, _CPU_MAX_CHUNK)
    return max(1, min(n_windows, fits))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says an allocation failed (PyTorch's allocator, cuBLAS or cuDNN)."""
    return (
        isinstance(error, torch.OutOfMemoryError)
        or should_reduce_batch_size(error)
        or (
            isinstance(error, RuntimeError)
            and any(message in str(error) for message in _LIBRARY_OUT_OF_MEMORY)
        )
    )


def release_memory() -> None:
    """Return what failed work left to the GPU, once nothing references it any more."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_in_chunks(fn: Callable[[list[int]], None], indices: Sequence[int], batch_size: int) -> int:
    """Call `fn` on consecutive chunks of `indices`; a chunk out of memory is halved, retried.

    `fn` must write its results only once it has them all, so a failed chunk leaves no trace.
    Returns the chunk size that last succeeded, so later steps start from a size that fits.
    Out of memory at one window is raised as it came.
    """
    start = 0
    while start < len(indices):
        chunk = list(indices[start : start + batch_size])
        try:
            fn(chunk)
            start += len(chunk)
            continue
        except Exception as error:
            if batch_size == 1 or not is_out_of_memory(error):
                raise
        # Only here, past the `except`, are the error, its traceback and the failed chunk's
        # tensors gone, so the cache can give all of it back.
        batch_size = max(1, batch_size // 2)
        release_memory()
    return batch_size
