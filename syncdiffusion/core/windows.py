"""Window geometry: where a panorama's square latent views lie, and moving latents in and out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

WINDOW = 64
"""SD2-base's view side in latent pixels (512 px over the VAE factor 8); a model's own is its
UNet's `sample_size`, passed as `window`."""


@dataclass(frozen=True)
class Window:
    """A view `latent[..., h0:h1, w0:w1]`; when `w1 <= w0` it wraps around the width (360°)."""

    h0: int
    h1: int
    w0: int
    w1: int

    @property
    def wraps(self) -> bool:
        """Whether the view crosses the panorama's right edge back to its left edge."""
        return self.w1 <= self.w0

    def scaled(self, factor: int) -> Window:
        """The same window in units `factor` times smaller: latent pixels to image pixels."""
        return Window(self.h0 * factor, self.h1 * factor, self.w0 * factor, self.w1 * factor)


def _offsets(length: int, stride: int, cover_edge: bool, window: int) -> list[int]:
    """Window starts along one side: every `stride`, plus one flush with the end if asked."""
    offsets = list(range(0, length - window + 1, stride))
    if cover_edge and offsets[-1] != length - window:
        offsets.append(length - window)
    return offsets


def wrap_offsets(stride: int, window: int = WINDOW) -> list[int]:
    """Where each row's wrap views end on the left edge: `k * stride` for the `k` listed.

    The published wrapper's wrap views, `k = 1 .. window // stride - 2` (one short of the last
    offset), where it has any: stride 8 and 16. At stride 24 and above that formula gives none,
    and nothing would join the right edge to the left in latent space; there one view does, the
    one at a multiple of the stride most nearly centred on the seam.
    """
    published = [k * stride for k in range(1, window // stride - 1)]
    if published:
        return published
    return [min(range(stride, window, stride), key=lambda w1: abs(2 * w1 - window))]


def panorama_windows(
    latent_height: int,
    latent_width: int,
    stride: int,
    loop_closure: bool = False,
    window: int = WINDOW,
) -> list[Window]:
    """The views: a row-major grid at `stride`, then, with loop closure, each row's wrap views.

    Sizes the published wrapper takes (both sides multiples of `stride`) get exactly its
    grid. Other sizes get one more row or column flush with the bottom or right edge where the
    grid stops short, so every latent pixel is in a view. With loop closure every row then
    gets the wrap views of `wrap_offsets`, which straddle the seam between the right and left
    edges. `window` is the view side in latent pixels.
    """
    cover_edges = bool(latent_height % stride or latent_width % stride)
    rows = _offsets(latent_height, stride, cover_edges, window)
    cols = _offsets(latent_width, stride, cover_edges, window)
    windows = [Window(h0, h0 + window, w0, w0 + window) for h0 in rows for w0 in cols]
    if loop_closure:
        for h0 in rows:
            for w1 in wrap_offsets(stride, window):
                windows.append(Window(h0, h0 + window, latent_width - window + w1, w1))
    return windows


@dataclass(frozen=True)
class Geometry:
    """What a model's windows are: their side in latent pixels (its UNet's `sample_size`) and
    the image pixels per latent pixel (its VAE's factor). SD2-base's by default."""

    window: int = WINDOW
    vae_scale_factor: int = 8

    @property
    def window_pixels(self) -> int:
        """A window's side in image pixels (512 SD2-base, 768 SD 2.1, 1024 SDXL)."""
        return self.window * self.vae_scale_factor

    def windows(self, request: Mapping[str, Any]) -> list[Window]:
        """The views of a request's panorama: its `width` x `height` pixels at its `stride`,
        with its `loop_closure` (default false). Every count of a request's windows is this."""
        f = self.vae_scale_factor
        return panorama_windows(
            request["height"] // f,
            request["width"] // f,
            request["stride"],
            request.get("loop_closure", False),
            self.window,
        )


SD2_BASE = Geometry()


def anchor_index(windows: list[Window]) -> int:
    """The anchor is the middle view, wrap views counted."""
    return len(windows) // 2


def gather(latent: torch.Tensor, windows: list[Window]) -> torch.Tensor:
    """Stack the views of a `(1, C, H, W)` latent into `(len(windows), C, side, side)`."""
    views = []
    for w in windows:
        rows = latent[:, :, w.h0 : w.h1]
        if w.wraps:
            views.append(torch.cat([rows[..., w.w0 :], rows[..., : w.w1]], dim=-1))
        else:
            views.append(rows[..., w.w0 : w.w1])
    return torch.cat(views)


def scatter_add(
    value: torch.Tensor, count: torch.Tensor, windows: list[Window], views: torch.Tensor
) -> None:
    """Add `views` (n, C, side, side) into `value`, and 1 into `count`, over each window."""
    for w, view in zip(windows, views, strict=True):
        view = view.unsqueeze(0)
        if w.wraps:
            split = value.shape[-1] - w.w0
            value[:, :, w.h0 : w.h1, w.w0 :] += view[..., :split]
            value[:, :, w.h0 : w.h1, : w.w1] += view[..., split:]
            count[:, :, w.h0 : w.h1, w.w0 :] += 1
            count[:, :, w.h0 : w.h1, : w.w1] += 1
        else:
            value[:, :, w.h0 : w.h1, w.w0 : w.w1] += view
            count[:, :, w.h0 : w.h1, w.w0 : w.w1] += 1


def blend(like: torch.Tensor, windows: list[Window], views: torch.Tensor) -> torch.Tensor:
    """The panorama (shaped and typed as `like`, (1, C, H', W')) whose every pixel is the mean of
    `views` (n, C, side, side) over it: MultiDiffusion's joint step; 0 where no window lies."""
    value, count = torch.zeros_like(like), torch.zeros_like(like)
    scatter_add(value, count, windows, views)
    return torch.where(count > 0, value / count, value)
