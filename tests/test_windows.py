"""Window geometry against the published rules (docs/ALGORITHM.md, "Windows")."""

from __future__ import annotations

import pytest
import torch

from syncdiffusion.core.windows import (
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


@pytest.mark.parametrize("stride, n_wrap", [(8, 6), (16, 2)])
def test_loop_closure_appends_the_published_wrap_views_stopping_one_short(stride, n_wrap):
    latent_w = 1536 // 8
    grid = panorama_windows(64, latent_w, stride)
    windows = panorama_windows(64, latent_w, stride, loop_closure=True)
    assert windows[: len(grid)] == grid
    wraps = windows[len(grid) :]
    assert len(wraps) == 64 // stride - 2 == n_wrap
    for k, w in enumerate(wraps, start=1):
        assert (w.h0, w.h1, w.w0, w.w1) == (0, 64, latent_w - 64 + k * stride, k * stride)
        assert w.wraps
    assert anchor_index(windows) == len(windows) // 2


def _columns(window: Window, latent_width: int) -> set[int]:
    if window.wraps:
        return set(range(window.w0, latent_width)) | set(range(window.w1))
    return set(range(window.w0, window.w1))


STRIDES = range(8, 64, 8)


@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("height, width", [(512, 2048), (1024, 1536), (520, 1000), (512, 4096)])
def test_every_row_is_joined_across_the_seam_at_every_stride(stride, height, width):
    h, w = height // 8, width // 8
    windows = panorama_windows(h, w, stride, loop_closure=True)
    for h0 in sorted({win.h0 for win in windows}):
        row = [win for win in windows if win.h0 == h0]
        for column, other_side in ((w - 1, 0), (0, w - 1)):
            assert any({column, other_side} <= _columns(win, w) for win in row), (h0, column)


@pytest.mark.parametrize("stride", [24, 32, 40, 48, 56])
def test_where_the_published_wrapper_has_no_wrap_view_one_per_row_straddles_the_seam(stride):
    latent_w = 2048 // 8
    grid = panorama_windows(128, latent_w, stride)
    wraps = panorama_windows(128, latent_w, stride, loop_closure=True)[len(grid) :]
    rows = sorted({win.h0 for win in grid})
    assert [win.h0 for win in wraps] == rows  # the fewest: one each
    for win in wraps:
        assert win.wraps and win.w1 % stride == 0
        # Most nearly centred on the seam among the multiples of the stride.
        offsets = range(stride, WINDOW, stride)
        assert abs(2 * win.w1 - WINDOW) == min(abs(2 * k - WINDOW) for k in offsets)


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


@pytest.mark.parametrize(
    "height, width, stride",
    [(512, 2048, 16), (576, 2112, 24), (3072, 3072, 8), (896, 2688, 56), (768, 1536, 32)],
)
def test_published_sizes_keep_exactly_the_published_grid(height, width, stride):
    n_rows = (height // 8 - 64) // stride + 1
    n_cols = (width // 8 - 64) // stride + 1
    expected = [
        Window(r * stride, r * stride + 64, c * stride, c * stride + 64)
        for r in range(n_rows)
        for c in range(n_cols)
    ]
    assert panorama_windows(height // 8, width // 8, stride) == expected


@pytest.mark.parametrize(
    "height, width, stride",
    [(520, 1000, 16), (512, 4096, 56), (4096, 600, 8), (1032, 2056, 24), (512, 512, 48)],
)
@pytest.mark.parametrize("loop_closure", [False, True])
def test_any_size_covers_every_latent_pixel(height, width, stride, loop_closure):
    h, w = height // 8, width // 8
    windows = panorama_windows(h, w, stride, loop_closure)
    latent = torch.randn(1, 1, h, w)
    value, count = torch.zeros_like(latent), torch.zeros_like(latent)
    scatter_add(value, count, windows, gather(latent, windows))
    assert count.min() >= 1
    assert torch.allclose(value / count, latent)
    grid = [win for win in windows if not win.wraps]
    assert max(win.h1 for win in grid) == h and max(win.w1 for win in grid) == w


def test_loop_closure_wraps_every_row():
    windows = panorama_windows(1024 // 8, 2048 // 8, 16, loop_closure=True)
    wraps = [w for w in windows if w.wraps]
    rows = sorted({w.h0 for w in windows if not w.wraps})
    assert sorted({w.h0 for w in wraps}) == rows
    assert len(wraps) == len(rows) * (64 // 16 - 2)
