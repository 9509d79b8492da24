"""Chunks of windows: sized from free memory, halved when a chunk runs out of GPU memory."""

from __future__ import annotations

import pytest
import torch

import syncdiffusion.sampling as sampling
from syncdiffusion import batching
from syncdiffusion.batching import auto_view_batch_size, run_in_chunks, window_bytes


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


def test_auto_view_batch_size_follows_free_memory(pipe, monkeypatch):
    per_window = window_bytes(pipe.vae, torch.float16)
    gpu = torch.device("cuda")
    monkeypatch.setattr(batching, "free_memory", lambda device: 10 * per_window)
    assert auto_view_batch_size(100, pipe.vae, gpu, torch.float16) == 7
    assert auto_view_batch_size(3, pipe.vae, gpu, torch.float16) == 3
    monkeypatch.setattr(batching, "free_memory", lambda device: 0)
    assert auto_view_batch_size(100, pipe.vae, gpu, torch.float16) == 1


def test_cpu_chunks_stay_small_whatever_the_memory(pipe, monkeypatch):
    monkeypatch.setattr(batching, "free_memory", lambda device: 2**50)
    assert auto_view_batch_size(100, pipe.vae, torch.device("cpu"), torch.float32) == 2


def test_fp16_windows_cost_half_of_fp32(pipe):
    assert window_bytes(pipe.vae, torch.float16) * 2 == pytest.approx(
        window_bytes(pipe.vae, torch.float32), rel=1e-6
    )


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
    latent = pipe(**inputs, output_type="latent", view_batch_size=4)
    assert chunk_sizes[0] == 2 and 1 in chunk_sizes  # 2 non-anchor views: tried together first
    assert torch.allclose(latent, expected, atol=5e-4, rtol=0)
