"""How many windows go through the networks at once, and falling back when a chunk does not fit."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psutil
import torch
from accelerate.utils.memory import should_reduce_batch_size
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Share of the free memory the chunks may fill: the rest is left to what the estimate leaves
# out (the backward pass's gradient buffers, cuDNN/cuBLAS workspaces) and the allocator's slack.
_MEMORY_SHARE = 0.7
# On the CPU every network call already uses all cores, and chunks past two windows ran no
# faster per window (LPIPS-VGG16 forward and backward at 512x512: 3.6 s a window alone or in
# twos, 3.7-4.1 s in fours, on two cores): larger chunks would only cost memory.
_CPU_MAX_CHUNK = 2
# What recomputing costs, in the time of the same synced window kept: a forward and a backward
# of about twice its time, and recomputation adds about one more forward (4 forwards' time for 3).
RECOMPUTE_COST = 4 / 3
# What one network call costs beyond its windows, in one window's time: the share of a call
# that does not shrink with fewer windows (kernel launches, layers too small to fill the
# device). On the CPU none: SD2-base's networks ran as fast a window alone as in twos
# (`_CPU_MAX_CHUNK`). On a GPU an estimate, not yet measured: a 512x512 window fills most of
# the device, but not all of it.
_GPU_CALL_OVERHEAD = 0.2

# What `recompute` may ask of the sync backward (`SyncDiffusionPipeline.__call__`).
RECOMPUTE_MODES = ("auto", "always", "never")

# accelerate's list of out-of-memory messages lacks the allocation failures that cuBLAS and
# cuDNN report as plain RuntimeErrors when they cannot get a workspace, and CUDA's own (its
# list has " out of memory." with a period; CUDA's message goes on "out of memory\nCUDA kernel
# errors might be...").
# cuDNN's "GET/FIND was unable to find an engine to execute this computation" is how it says
# that no algorithm's workspace fits in what is left (pytorch#102596 and its many duplicates).
_LIBRARY_OUT_OF_MEMORY = (
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDA error: out of memory",
    "unable to find an engine",
)


def _storages(tensors: Any) -> Iterator[torch.UntypedStorage]:
    for tensor in tree_leaves(tensors):
        if isinstance(tensor, torch.Tensor):
            yield tensor.untyped_storage()


def saved_bytes(
    forward: Callable[[], Any],
    parameters: Iterable[torch.Tensor],
    layers: Sequence[torch.nn.Module] = (),
) -> tuple[int, int]:
    """Bytes of the tensors that autograd keeps for the backward pass of `forward()`: those
    kept outside `layers`, and the most that one call of one of `layers` keeps.

    Counted with autograd's saved-tensor hooks, each storage once, the networks' parameters
    (resident anyway) left out. Where `layers` are recomputed in the backward
    (`recompute.recomputing`), the first figure is what the forward leaves for the backward
    and the second what recomputing one layer adds at the backward's peak; with `layers`
    empty, the first is all a backward through these networks holds.
    """
    resident = {p.untyped_storage().data_ptr() for p in parameters}
    outside: dict[int, int] = {}
    inside: list[dict[int, int]] = []  # per call of a layer, while it runs
    depth = 0

    def enter(*_: Any) -> None:
        nonlocal depth
        depth += 1
        if depth == 1:
            inside.append({})

    def leave(*_: Any) -> None:
        nonlocal depth
        depth -= 1

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        # A layer's own input is kept outside it already.
        if ptr not in resident and not (depth and ptr in outside):
            (inside[-1] if depth else outside)[ptr] = storage.nbytes()
        return tensor

    def keep_args(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        enter()
        # A layer's inputs are what recomputing it starts from: kept outside it.
        for storage in _storages((args, kwargs)):
            if storage.data_ptr() not in resident:
                outside[storage.data_ptr()] = storage.nbytes()

    hooks = [
        hook
        for layer in layers
        for hook in (
            layer.register_forward_pre_hook(keep_args, with_kwargs=True),
            layer.register_forward_hook(leave),
        )
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            forward()
    finally:
        for hook in hooks:
            hook.remove()
    return sum(outside.values()), max((sum(call.values()) for call in inside), default=0)


def sync_window_bytes(
    sync_loss: Callable[[torch.Tensor], torch.Tensor],
    probe: torch.Tensor,
    window: int,
    parameters: Iterable[torch.Tensor],
    layers: Sequence[torch.nn.Module] = (),
) -> int:
    """One window's memory in a sync chunk: what the backward of its loss keeps through the UNet
    (both classifier-free guidance inputs), the VAE decoder and LPIPS, with `layers`
    recomputed in the backward (`recompute`): their inputs, everything outside them, and at the
    backward's peak the largest layer's recomputed activations.

    Counted on `probe`, a small latent view (1, c, s, s), and scaled to a `window` x `window`
    one: every kept activation grows with the pixels (attention kernels keep no n x n maps).
    """
    side = probe.shape[-1]
    probe = probe.detach().requires_grad_()
    with torch.enable_grad():
        kept, recomputed = saved_bytes(lambda: sync_loss(probe), parameters, layers)
    return (kept + recomputed) * window**2 // side**2


def peak_live_bytes(forward: Callable[[], Any], parameters: Iterable[torch.Tensor]) -> int:
    """The most bytes of tensors that `forward()` holds alive at once, its result included and
    `parameters` left out: a forward under `no_grad` frees each activation once it is used."""
    resident = {p.untyped_storage().data_ptr() for p in parameters}
    live: dict[int, int] = {}
    peak = 0

    def free(ptr: int) -> None:
        live.pop(ptr, None)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal peak
            out = func(*args, **(kwargs or {}))
            for storage in _storages(out):
                ptr = storage.data_ptr()
                if ptr not in live and ptr not in resident and storage.nbytes():
                    live[ptr] = storage.nbytes()
                    weakref.finalize(storage, free, ptr)
            peak = max(peak, sum(live.values()))
            return out

    with Count():
        forward()
    return peak


def plain_window_bytes(
    denoise: Callable[[torch.Tensor], torch.Tensor],
    probe: torch.Tensor,
    window: int,
    parameters: Iterable[torch.Tensor],
) -> int:
    """One window's memory in a step without sync: the peak of the UNet's guided forward under
    `no_grad` (both guidance inputs) and the DDIM step, counted on `probe` (1, c, s, s) as
    `sync_window_bytes` is and scaled to a `window` x `window` view."""
    side = probe.shape[-1]
    with torch.no_grad():
        peak = peak_live_bytes(lambda: denoise(probe), parameters)
    return peak * window**2 // side**2


def free_memory(device: torch.device) -> int:
    """Bytes free for tensors on `device`: the GPU's free memory plus what PyTorch's allocator
    holds cached but unused, within this process's cap where one is set
    (`torch.cuda.set_per_process_memory_fraction`), or the machine's available RAM."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        unused = reserved - torch.cuda.memory_allocated(device)
        # The allocator refuses to reserve past the cap, whatever the GPU has free.
        cap = torch.cuda.get_per_process_memory_fraction(device) * total
        return min(free, max(0, int(cap) - reserved)) + unused
    return psutil.virtual_memory().available


def auto_view_batch_size(n_windows: int, window_bytes: int, device: torch.device) -> int:
    """The largest chunk of windows that should fit in the memory free now, at least 1.

    `window_bytes` is one window's peak (`SyncDiffusionPipeline.window_bytes`).
    """
    fits = int(free_memory(device) * _MEMORY_SHARE) // window_bytes
    if device.type == "cpu":
        fits = min(fits, _CPU_MAX_CHUNK)
    return max(1, min(n_windows, fits))


@dataclass(frozen=True)
class SyncChunks:
    """How a sync step's windows go through the networks: `recompute` or keep the backward's
    activations, `view_batch_size` windows per call, and why (for logs and reports)."""

    recompute: bool
    view_batch_size: int
    reason: str


def chunk_cost(recompute: bool, batch: int, device: torch.device) -> float:
    """A synced window's predicted time in chunks of `batch`, in units of one window kept in a
    call of many: the call's overhead shared by its windows, times `RECOMPUTE_COST` where
    recomputed."""
    overhead = 0.0 if device.type == "cpu" else _GPU_CALL_OVERHEAD
    return (RECOMPUTE_COST if recompute else 1.0) * (1 + overhead / batch)


def plan_sync_chunks(
    mode: Literal["auto", "always", "never"],
    n_windows: int,
    kept_bytes: int,
    recomputed_bytes: int,
    device: torch.device,
    view_batch_size: int | None = None,
) -> SyncChunks:
    """Keep or recompute the sync backward's activations, and how many windows per call.

    `kept_bytes` and `recomputed_bytes` are one window's memory in a sync chunk either way
    (`SyncDiffusionPipeline.window_bytes`). `mode` "always" recomputes and "never" keeps;
    "auto" predicts each way's time per window (`chunk_cost`) at the largest chunk that fits
    the free memory and takes the faster, keeping where they tie; one window kept that does
    not fit leaves only recomputation. Each way's chunk is the smallest that is as fast as
    the largest that fits: on the CPU, where calls cost nothing beyond their windows, one
    window, which holds no more than the published algorithm. A given `view_batch_size` is
    the chunk either way, kept under "auto" if that many windows kept fit.
    """
    budget = int(free_memory(device) * _MEMORY_SHARE)

    def fitting(window_bytes: int) -> int:
        fits = min(n_windows, budget // window_bytes)
        return min(fits, _CPU_MAX_CHUNK) if device.type == "cpu" else fits

    def chunk(recompute: bool) -> int:
        if view_batch_size is not None:
            return view_batch_size
        fits = max(1, fitting(recomputed_bytes if recompute else kept_bytes))
        best = chunk_cost(recompute, fits, device)
        return min(b for b in range(1, fits + 1) if chunk_cost(recompute, b, device) <= best)

    gib = 2**30
    memory = (
        f"a window {kept_bytes / gib:.2f} GiB kept, {recomputed_bytes / gib:.2f} GiB "
        f"recomputed; {budget / gib:.1f} GiB to fill"
    )
    if mode != "auto":
        recompute = mode == "always"
        way = "recomputed" if recompute else "kept"
        return SyncChunks(
            recompute, chunk(recompute), f"{way}, as asked (recompute={mode!r}); {memory}"
        )
    kept_chunk = view_batch_size or 1
    if fitting(kept_bytes) < kept_chunk:
        return SyncChunks(
            True, chunk(True), f"recomputed: {kept_chunk} window(s) kept would not fit; {memory}"
        )
    sizes = {False: chunk(False), True: chunk(True)}
    costs = {way: chunk_cost(way, size, device) for way, size in sizes.items()}
    faster = costs[True] < costs[False]

    def said(way: bool) -> str:
        return f"{costs[way]:.2f} a window {('kept', 'recomputed')[way]} in chunks of {sizes[way]}"

    return SyncChunks(
        faster,
        sizes[faster],
        f"{('kept', 'recomputed')[faster]}: predicted {said(faster)} against "
        f"{said(not faster)}; {memory}",
    )


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says an allocation failed (PyTorch's allocator, cuBLAS or cuDNN, cuDNN's
    "unable to find an engine" included)."""
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


def run_in_chunks(
    fn: Callable[[Sequence[int]], None],
    indices: Sequence[int],
    batch_size: int,
    fall_back: Callable[[], bool] | None = None,
) -> int:
    """Call `fn` on consecutive chunks of `indices` (its slices: ranges where it is a range, so
    a chunk of views is a slice, not an index); a chunk out of memory is halved, retried.

    `fn` must write its results only once it has them all, so a failed chunk leaves no trace.
    Returns the chunk size that last succeeded, so later steps start from a size that fits.
    Out of memory at one window is raised as it came, unless `fall_back()` says it has made
    `fn` need less memory (it returns True), and that window is tried again.
    """
    start = 0
    while start < len(indices):
        chunk = indices[start : start + batch_size]
        try:
            fn(chunk)
            start += len(chunk)
            continue
        except Exception as error:
            if not is_out_of_memory(error) or (
                batch_size == 1 and (fall_back is None or not fall_back())
            ):
                raise
        # Only here, past the `except`, are the error, its traceback and the failed chunk's
        # tensors gone, so the cache can give all of it back.
        batch_size = max(1, batch_size // 2)
        release_memory()
    return batch_size
