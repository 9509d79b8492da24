"""Window geometry against the published rules (ALGORITHM.md, "Windows")."""

from __future__ import annotations

import pytest
import torch

from syncdiffusion.windows import (
    WINDOW,
    Window,
    anchor_index,
    gather,
    panorama_windows,
    scatter_add,
)


def test_default_panorama_is_one_row_of_thirteen_views():
    windows = panorama_windows(512 // 8, 2048 // 8, stride=16)
    assert len(windows) == (256 - 64) // 16 + 1 == 13
    assert windows[0] == Window(0, 64, 0, 64)
    assert windows[-1] == Window(0, 64, 192, 256)
    assert all(w.w0 == 16 * i for i, w in enumerate(windows))
    assert anchor_index(windows) == 6


def test_grid_is_row_major():
    windows = panorama_windows(1024 // 8, 768 // 8, stride=32)
    n_rows, n_cols = (128 - 64) // 32 + 1, (96 - 64) // 32 + 1
    assert len(windows) == n_rows * n_cols == 6
    assert [(w.h0, w.w0) for w in windows] == [
        (0, 0),
        (0, 32),
        (32, 0),
        (32, 32),
        (64, 0),
        (64, 32),
    ]
    assert all(w.h1 - w.h0 == w.w1 - w.w0 == WINDOW for w in windows)


@pytest.mark.parametrize("stride, n_wrap", [(8, 6), (16, 2), (32, 0), (48, 0)])
def test_loop_closure_appends_wrap_views_stopping_one_short(stride, n_wrap):
    latent_w = 1536 // 8
    grid = panorama_windows(64, latent_w, stride)
    windows = panorama_windows(64, latent_w, stride, loop_closure=True)
    assert windows[: len(grid)] == grid
    wraps = windows[len(grid) :]
    assert len(wraps) == max(0, 64 // stride - 2) == n_wrap
    for k, w in enumerate(wraps, start=1):
        assert (w.h0, w.h1, w.w0, w.w1) == (0, 64, latent_w - 64 + k * stride, k * stride)
        assert w.wraps
    assert anchor_index(windows) == len(windows) // 2


def test_wrap_view_is_right_edge_then_left_edge():
    latent = torch.arange(64 * 96, dtype=torch.float32).reshape(1, 1, 64, 96)
    w = Window(0, 64, 96 - 64 + 16, 16)
    view = gather(latent, [w])[0, 0]
    assert torch.equal(view[:, :48], latent[0, 0, :, 48:])
    assert torch.equal(view[:, 48:], latent[0, 0, :, :16])


@pytest.mark.parametrize("loop_closure", [False, True])
def test_scatter_of_gathered_views_averages_back_to_the_latent(loop_closure):
    latent = torch.randn(1, 4, 64, 128)
    windows = panorama_windows(64, 128, 16, loop_closure)
    value, count = torch.zeros_like(latent), torch.zeros_like(latent)
    scatter_add(value, count, windows, gather(latent, windows))
    assert torch.allclose(value / count, latent)
    # Every column is covered; wrap views add to both edges.
    expected_edge = 1 + (2 if loop_closure else 0)
    assert count[0, 0, 0, 0].item() == expected_edge
