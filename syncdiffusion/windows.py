"""Window geometry: where a panorama's 64x64-latent views lie, and moving latents in and out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

WINDOW = 64
"""Side of one view in latent pixels: SD2-base's 512 px training size over the VAE factor 8."""


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


def _offsets(length: int, stride: int, cover_edge: bool) -> list[int]:
    """Window starts along one side: every `stride`, plus one flush with the end if asked."""
    offsets = list(range(0, length - WINDOW + 1, stride))
    if cover_edge and offsets[-1] != length - WINDOW:
        offsets.append(length - WINDOW)
    return offsets


def wrap_offsets(stride: int) -> list[int]:
    """Where each row's wrap views end on the left edge: `k * stride` for the `k` listed.

    The published wrapper's wrap views, `k = 1 .. WINDOW // stride - 2` (one short of the last
    offset), where it has any: stride 8 and 16. At stride 24 and above that formula gives none,
    and nothing would join the right edge to the left in latent space; there one view does, the
    one at a multiple of the stride most nearly centred on the seam.
    """
    published = [k * stride for k in range(1, WINDOW // stride - 1)]
    if published:
        return published
    return [min(range(stride, WINDOW, stride), key=lambda w1: abs(2 * w1 - WINDOW))]


def panorama_windows(
    latent_height: int, latent_width: int, stride: int, loop_closure: bool = False
) -> list[Window]:
    """The views: a row-major grid at `stride`, then, with loop closure, each row's wrap views.

    Sizes the published wrapper takes (both sides multiples of `stride`) get exactly its
    grid. Other sizes get one more row or column flush with the bottom or right edge where the
    grid stops short, so every latent pixel is in a view. With loop closure every row then
    gets the wrap views of `wrap_offsets`, which straddle the seam between the right and left
    edges.
    """
    cover_edges = bool(latent_height % stride or latent_width % stride)
    rows = _offsets(latent_height, stride, cover_edges)
    cols = _offsets(latent_width, stride, cover_edges)
    windows = [Window(h0, h0 + WINDOW, w0, w0 + WINDOW) for h0 in rows for w0 in cols]
    if loop_closure:
        for h0 in rows:
            for w1 in wrap_offsets(stride):
                windows.append(Window(h0, h0 + WINDOW, latent_width - WINDOW + w1, w1))
    return windows


def anchor_index(windows: list[Window]) -> int:
    """The anchor is the middle view, wrap views counted."""
    return len(windows) // 2


def gather(latent: torch.Tensor, windows: list[Window]) -> torch.Tensor:
    """Stack the views of a `(1, C, H, W)` latent into `(len(windows), C, WINDOW, WINDOW)`."""
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
    """Add `views` (n, C, WINDOW, WINDOW) into `value`, and 1 into `count`, over each window."""
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
