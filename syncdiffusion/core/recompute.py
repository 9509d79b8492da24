"""Trading recomputation for memory in the sync backward (activation checkpointing).

A synced window's backward runs through the UNet (both guidance inputs), the VAE decoder at the
window's full pixel size and LPIPS. Kept whole, the activations of that one forward are what a
GPU has (SD2-base 9 GiB in fp32, SDXL 50 GiB). Within `recomputing(layers)` each layer keeps
only its inputs, and its forward runs again when the backward reaches it: the same arithmetic
in the same order, so the gradient is the same to the bit, for about one more forward's time.

The layers are the networks' repeated blocks (residual blocks, transformer blocks, attention,
up- and downsamplers, LPIPS's VGG slices): small enough that one block's recomputed
activations are a fraction of the whole, large enough that their inputs are too. Only the sync
backward uses this; plain denoising runs under `no_grad`, which keeps nothing anyway. A call
recomputes only where memory needs it (`chunks.plan_sync_chunks`, `Recomputation`): where a
window kept whole fits, keeping is faster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import lpips
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

# The blocks recomputed in the backward, outermost first found (none nested in another).
RECOMPUTED = (ResnetBlock2D, BasicTransformerBlock, Attention, Upsample2D, Downsample2D)


def recompute_layers(*networks: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers of `networks` to recompute in the sync backward: every block of the kinds in
    `RECOMPUTED` not inside another, and an LPIPS model's VGG slices (`net.slice1`...)."""
    layers: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> None:
        if isinstance(module, RECOMPUTED):
            layers.append(module)
            return
        for child in module.children():
            visit(child)

    for network in networks:
        if isinstance(network, lpips.LPIPS):
            # By name, wherever they sit: a wrapper around the trunk keeps them.
            slices = dict(network.net.named_modules())
            layers.extend(
                module
                for k in range(1, 6)
                for name, module in slices.items()
                if name.rsplit(".", 1)[-1] == f"slice{k}"
            )
        else:
            visit(network)
    return layers


@dataclass
class Recomputation:
    """What one panorama's sync backward recomputes: `layers` now (none: every activation kept)
    and `fallback`, the layers to recompute instead once one window kept does not fit (none:
    out of memory at one window is final). `reason` says why, for logs and reports."""

    layers: Sequence[torch.nn.Module] = ()
    fallback: Sequence[torch.nn.Module] = ()
    reason: str = ""

    @property
    def active(self) -> bool:
        return bool(self.layers)

    def fall_back(self) -> bool:
        """Recompute from now on, if there is a fallback; whether there was."""
        if not self.fallback:
            return False
        self.layers, self.fallback = self.fallback, ()
        self.reason = f"recomputed: one window kept ran out of memory (planned: {self.reason})"
        return True


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


@contextmanager
def recomputing(layers: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Within the block, each of `layers` called with gradients on keeps only its inputs for
    the backward pass and recomputes its activations there (`torch.utils.checkpoint`, the
    non-reentrant kind diffusers' `enable_gradient_checkpointing` uses). On leaving, every
    layer's forward is its own again; a backward started inside may finish outside."""
    saved = [(layer, layer.__dict__.get("forward")) for layer in layers]
    try:
        for layer in layers:
            layer.forward = partial(_checkpointed, layer.forward)
        yield
    finally:
        for layer, forward in saved:
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
