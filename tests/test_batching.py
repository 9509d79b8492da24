"""Chunks of windows: sized from free memory, halved when a chunk runs out of GPU memory."""

from __future__ import annotations

import weakref
from functools import partial

import pytest
import torch

import syncdiffusion.core.sampling as sampling
from syncdiffusion.core import chunks as batching
from syncdiffusion.core.chunks import (
    RECOMPUTE_COST,
    auto_view_batch_size,
    chunk_cost,
    plan_sync_chunks,
    run_in_chunks,
)
from syncdiffusion.core.sampling import guided_eps


def test_run_in_chunks_halves_a_chunk_that_does_not_fit_and_keeps_the_smaller_size():
    seen = []

    def fn(chunk):
        if len(chunk) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        seen.extend(chunk)

    assert run_in_chunks(fn, range(11), 8) == 2
    assert seen == list(range(11))


def test_run_in_chunks_gives_up_only_at_one_window():
    def fn(chunk):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        run_in_chunks(fn, range(3), 4)


def test_run_in_chunks_at_one_window_tries_again_once_fall_back_needs_less_memory():
    fell_back, seen = [], []

    def fn(chunk):
        if not fell_back:
            raise torch.OutOfMemoryError("CUDA out of memory")
        seen.extend(chunk)

    def fall_back():
        fell_back.append(True)
        return len(fell_back) == 1  # a fallback the first time only

    assert run_in_chunks(fn, range(3), 2, fall_back) == 1
    assert seen == [0, 1, 2] and fell_back == [True]


def test_run_in_chunks_without_a_fallback_left_raises_at_one_window():
    def fn(chunk):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        run_in_chunks(fn, range(3), 2, lambda: False)


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`",
        "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
        # cuDNN when no algorithm's workspace fits: a known out-of-memory symptom.
        "GET was unable to find an engine to execute this computation",
        # CUDA itself, not PyTorch's allocator (a kernel's own allocation, a context's start).
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some "
        "other API call, so the stacktrace below might be incorrect.",
    ],
)
def test_run_in_chunks_halves_on_cuda_cublas_and_cudnn_allocation_failures_too(message):
    seen = []

    def fn(chunk):
        if len(chunk) > 1:
            raise RuntimeError(message)
        seen.extend(chunk)

    assert run_in_chunks(fn, range(3), 4) == 1
    assert seen == [0, 1, 2]


def test_run_in_chunks_lets_other_errors_through_at_once():
    calls = []

    def fn(chunk):
        calls.append(chunk)
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        run_in_chunks(fn, range(4), 4)
    assert len(calls) == 1


def test_run_in_chunks_frees_the_failed_chunk_before_emptying_the_cache(monkeypatch):
    alive_at_clean_up, refs = [], []
    monkeypatch.setattr(
        batching, "release_memory", lambda: alive_at_clean_up.append(refs[-1]() is not None)
    )

    def fn(chunk):
        activations = torch.empty(len(chunk), 1000)
        refs.append(weakref.ref(activations))
        if len(chunk) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")

    run_in_chunks(fn, range(2), 2)
    assert alive_at_clean_up == [False]


def test_auto_view_batch_size_follows_free_memory(monkeypatch):
    gpu = torch.device("cuda")
    monkeypatch.setattr(batching, "free_memory", lambda device: 10 * 1000)
    assert auto_view_batch_size(100, 1000, gpu) == 7
    assert auto_view_batch_size(3, 1000, gpu) == 3
    monkeypatch.setattr(batching, "free_memory", lambda device: 0)
    assert auto_view_batch_size(100, 1000, gpu) == 1


def test_cpu_chunks_stay_small_whatever_the_memory(monkeypatch):
    monkeypatch.setattr(batching, "free_memory", lambda device: 2**50)
    assert auto_view_batch_size(100, 1000, torch.device("cpu")) == 2


GIB = 2**30
GPU = torch.device("cuda")


def _plan(monkeypatch, free_gib, mode="auto", device=GPU, n=12, view_batch_size=None):
    """The plan for `n` windows, 4.8 GiB a window kept and 1.5 recomputed (SD2-base in fp16,
    by the pipeline's count), with `free_gib` free."""
    monkeypatch.setattr(batching, "free_memory", lambda device: free_gib * GIB)
    return plan_sync_chunks(mode, n, int(4.8 * GIB), int(1.5 * GIB), device, view_batch_size)


def test_auto_keeps_the_activations_in_the_largest_chunk_that_fits_on_a_large_gpu(monkeypatch):
    plan = _plan(monkeypatch, 76)  # 80 GB less the weights: 53 GiB to fill, 11 windows kept
    assert (plan.recompute, plan.view_batch_size) == (False, 11)
    assert plan.reason.startswith("kept: predicted")


def test_auto_keeps_one_window_rather_than_recompute_many_at_the_predicted_costs(monkeypatch):
    plan = _plan(monkeypatch, 8)  # 5.6 GiB to fill: one window kept, three recomputed
    assert (plan.recompute, plan.view_batch_size) == (False, 1)
    assert chunk_cost(False, 1, GPU) < chunk_cost(True, 3, GPU)
    assert plan.reason.startswith(
        "kept: predicted 1.20 a window kept in chunks of 1 against 1.42 a window recomputed in "
        "chunks of 3"
    )


def test_auto_recomputes_where_one_window_kept_does_not_fit(monkeypatch):
    plan = _plan(monkeypatch, 6)  # 4.2 GiB to fill
    assert (plan.recompute, plan.view_batch_size) == (True, 2)
    assert plan.reason.startswith("recomputed: 1 window(s) kept would not fit")
    assert "4.80 GiB kept, 1.50 GiB recomputed; 4.2 GiB to fill" in plan.reason


def test_on_the_cpu_auto_keeps_one_window_at_a_time_as_the_published_algorithm(monkeypatch):
    plan = _plan(monkeypatch, 1000, device=torch.device("cpu"))
    assert (plan.recompute, plan.view_batch_size) == (False, 1)
    # Calls cost nothing beyond their windows there: a larger chunk would only cost memory.
    assert chunk_cost(False, 1, torch.device("cpu")) == chunk_cost(False, 2, torch.device("cpu"))
    assert chunk_cost(True, 1, torch.device("cpu")) == RECOMPUTE_COST


def test_always_and_never_are_obeyed_whatever_the_memory(monkeypatch):
    always = _plan(monkeypatch, 76, mode="always")
    assert (always.recompute, always.view_batch_size) == (True, 12)
    assert always.reason.startswith("recomputed, as asked (recompute='always')")
    never = _plan(monkeypatch, 2, mode="never")
    assert (never.recompute, never.view_batch_size) == (False, 1)


def test_a_given_chunk_size_is_kept_where_it_fits_and_recomputed_where_not(monkeypatch):
    fits = _plan(monkeypatch, 30, view_batch_size=4)  # 21 GiB to fill: 4 kept fit
    assert (fits.recompute, fits.view_batch_size) == (False, 4)
    too_many = _plan(monkeypatch, 30, view_batch_size=6)
    assert (too_many.recompute, too_many.view_batch_size) == (True, 6)


def test_out_of_memory_mid_panorama_retries_smaller_and_changes_nothing(pipe, monkeypatch):
    inputs = dict(
        prompt="a harbour", width=768, height=512, num_inference_steps=2, sync_threshold=1, seed=11
    )
    expected = pipe(**inputs, output_type="latent", view_batch_size=1)

    real_sync_gradient = sampling.sync_gradient
    chunk_sizes = []

    def tight_memory(views, *args, **kwargs):
        chunk_sizes.append(views.shape[0])
        if views.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_sync_gradient(views, *args, **kwargs)

    monkeypatch.setattr(sampling, "sync_gradient", tight_memory)
    reported = []
    latent = pipe(
        **inputs,
        output_type="latent",
        view_batch_size=4,
        callback=lambda state: reported.append(state["view_batch_size"]),
    )
    assert chunk_sizes[0] == 2 and 1 in chunk_sizes  # 2 non-anchor views: tried together first
    # The callback says what fitted, which the next step of its kind starts from: the synced
    # step halved to 1; the plain step, which keeps nothing for a backward, kept its 4.
    assert reported == [1, 4]
    assert torch.allclose(latent, expected, atol=5e-4, rtol=0)


def test_out_of_memory_at_one_window_fails_clearly_and_leaves_nothing_behind(pipe, monkeypatch):
    import syncdiffusion.pipeline as pipeline

    inputs = dict(
        prompt="a harbour", width=640, height=512, num_inference_steps=1, sync_threshold=1, seed=3
    )
    refs, alive_at_clean_up = [], []

    def no_memory(views, *args, **kwargs):
        activations = torch.empty(views.shape[0], 1000)
        refs.append(weakref.ref(activations))
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasSgemm`")

    monkeypatch.setattr(sampling, "sync_gradient", no_memory)
    monkeypatch.setattr(
        pipeline, "release_memory", lambda: alive_at_clean_up.append(refs[-1]() is not None)
    )
    with pytest.raises(MemoryError, match="out of cpu memory even with one window") as failure:
        pipe(**inputs, output_type="latent", view_batch_size=1)
    assert "PyTorch said: CUDA error: CUBLAS_STATUS_ALLOC_FAILED" in str(failure.value)
    # Nothing of the failed chunk is held: not by the error's context, nor at clean-up time.
    assert failure.value.__context__ is None and failure.value.__cause__ is None
    assert alive_at_clean_up == [False]

    monkeypatch.undo()
    assert torch.equal(
        pipe(**inputs, output_type="latent", view_batch_size=1),
        pipe(**inputs, output_type="latent", view_batch_size=1),
    )


def test_steps_without_sync_batch_as_many_windows_as_their_own_memory_allows(pipe, monkeypatch):
    import syncdiffusion.pipeline as pipeline

    # Room for one synced window, or for every window of a step that keeps nothing for a backward.
    synced = pipe.window_bytes(*_first_step(pipe))
    monkeypatch.setattr(
        pipeline,
        "auto_view_batch_size",
        lambda n, window_bytes, device: 1 if window_bytes >= synced else n,
    )
    reported = []
    pipe(
        prompt="a harbour", width=768, height=512, num_inference_steps=2, sync_threshold=1,
        output_type="latent", callback=lambda state: reported.append(state["view_batch_size"]),
    )  # fmt: skip
    assert reported == [1, 3]


def _first_step(pipe):
    scheduler = pipe.new_scheduler()
    scheduler.set_timesteps(2)
    eps = partial(
        guided_eps, pipe.unet, text_embeddings=pipe.encode_prompt("a bay"), guidance_scale=7.5
    )
    return eps, scheduler


# Ops that read a device tensor back to the host, or index with a tensor (a blocking copy of
# the index, or a count of its nonzeros, on a GPU).
_BLOCKING = {"aten::index", "aten::index_put_", "aten::nonzero", "aten::item"}
_BLOCKING |= {"aten::_local_scalar_dense", "aten::masked_select"}


def test_a_denoising_step_issues_no_blocking_copy(pipe):
    from torch.profiler import ProfilerActivity, profile

    eps, scheduler = _first_step(pipe)
    views = torch.randn(5, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    t, timestep = scheduler.timesteps[0], int(scheduler.timesteps[0])
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        moved, outputs, _, _ = sampling.denoise_views(
            views, anchor=2, model_output=lambda x, ids: eps(x, t, None), x0=None, decode=None,
            perceptual=None, weight=None, loss_scale=None, view_batch_size=2,
        )  # fmt: skip
        scheduler.step(outputs, timestep, moved)  # as the loop steps DDIM's views
    ops = {event.key for event in profiler.key_averages()}
    assert "aten::convolution" in ops  # the UNet ran, in three chunks
    assert not ops & _BLOCKING


def test_free_memory_under_a_per_process_cap_is_what_the_cap_leaves(monkeypatch):
    gib = 2**30
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (70 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 8 * gib)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)
    assert batching.free_memory(gpu) == 72 * gib  # 70 free on the GPU, 2 cached and unused
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 0.3)
    assert batching.free_memory(gpu) == 16 * gib  # a 24 GiB cap: 14 more reserved, 2 unused


def test_one_window_synced_has_nothing_to_pull_and_runs(pipe):
    # The anchor alone: the sync step moves no window, and the step goes on without one.
    assert pipe(prompt="a cove", width=512, num_inference_steps=1, sync_threshold=1).size == (
        512,
        512,
    )
