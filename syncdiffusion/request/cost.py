"""What a panorama request costs: one count of the work it asks for, priced by each caller.

The count (`work`) is in SD2-base window shares: a window of another model counts its pixels'
share of a 512 px window ((window_pixels / 512) ** 2; an SDXL window counts 4). Its four kinds
of work are priced by `Rates`: the work limit's (`LIMIT`, in window-steps), the demo's CPU
seconds and the GPU check's estimated seconds all price this one count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..core.schedulers import network_calls
from ..core.sphere import CAPS, sphere_parts
from ..core.sync_schedule import steps_run, synced_steps
from ..core.windows import SD2_BASE, Geometry


@dataclass(frozen=True)
class Work:
    """The work of one or more panoramas, each kind in SD2-base window shares."""

    # Guided UNet passes (a batch of 2, classifier-free guidance) of a window: every window at
    # every network evaluation of the scheduler (one a step but for Heun and PNDM); the
    # published wrapper also runs the anchor's again at each synced step.
    window_steps: float = 0.0
    # Sync gradients of a window, beyond its UNet pass: LPIPS, the VAE decoder and the UNet
    # backward, for every window but the anchor (the published wrapper: the anchor's too; a
    # panorama synced to another's anchor: every window).
    synced_window_steps: float = 0.0
    # VAE decodes of 512x512 pixels: the anchor's at each synced step, then the panorama's.
    decodes: float = 0.0
    # ControlNet passes beside the UNet's: one per window-step, three per synced one (again
    # with gradients, and its backward).
    controlnet_passes: float = 0.0
    # VAE encodes of 512x512 pixels, at the panorama's size: the image a panorama starts from,
    # and an inpainting UNet's masked image.
    encodes: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass(frozen=True)
class Rates:
    """What one unit of each kind of `Work` costs: seconds on some machine, or the limit's units."""

    window_step: float
    synced_window_step: float
    decode: float
    controlnet_pass: float = 0.0
    encode: float = 0.0

    def price(self, work: Work) -> float:
        """The cost of `work` at these rates."""
        return (
            work.window_steps * self.window_step
            + work.synced_window_steps * self.synced_window_step
            + work.decodes * self.decode
            + work.controlnet_passes * self.controlnet_pass
            + work.encodes * self.encode
        )


def work(
    request: Mapping[str, Any],
    geometry: Geometry = SD2_BASE,
    *,
    control: bool = False,
    inpainting: bool = False,
    published: bool = False,
    decoded: bool = True,
    follows: bool = False,
) -> Work:
    """The work of one panorama `request` (its size, stride, steps and sync schedule) on a model
    with `geometry`'s windows; with a ControlNet (`control`); on an inpainting UNet
    (`inpainting`: it encodes the masked image, and at full strength not the image); as the
    published wrapper does it (`published`: it also runs the anchor's UNet again and takes the
    anchor's gradient at each synced step); with the panorama's decode unless only the latent
    is asked for (`decoded`); synced to another panorama's anchor (`follows`: every window
    takes the gradient, and no anchor of its own is decoded). A whole sphere's is its band's
    and its caps' (`sphere`), each cap following the band's anchor and encoding the band's
    projection."""
    options = dict(control=control, inpainting=inpainting, published=published, decoded=decoded)
    if request.get("sphere"):
        band, cap = sphere_parts(request)
        # A cap encodes one picture at full strength: the band's projection (a plain UNet's),
        # or its masked copy (an inpainting UNet's).
        cap_options = {**options, "inpainting": False, "follows": True}
        caps = [work(cap, geometry, **cap_options) for _ in CAPS]
        encodes = len(CAPS) * cap["width"] * cap["height"] / 512**2
        return sum(caps, work(band, geometry, **options)) + Work(encodes=encodes)
    n_windows = len(geometry.windows(request))
    synced = synced_steps(request)
    share = (geometry.window_pixels / 512) ** 2
    # Heun evaluates the network twice in most steps, PNDM twice in its first.
    calls = network_calls(request.get("scheduler", "DDIM"), steps_run(request))
    window_steps = n_windows * calls + (synced if published else 0)
    synced_window_steps = synced * (n_windows if published or follows else n_windows - 1)
    pixels = request["width"] * request["height"] / 512**2
    image = request.get("image") is not None
    full_strength = not image or request.get("prompt_strength") == 1
    encodes = int(image and not (inpainting and full_strength)) + int(inpainting)
    return Work(
        window_steps * share,
        synced_window_steps * share,
        (0 if follows else synced) * share + (pixels if decoded else 0.0),
        (window_steps + 3 * synced_window_steps) * share if control else 0.0,
        encodes * pixels,
    )


# What SD2-base in fp32 costs on the CPU, in CPU seconds (all threads together), measured by
# scripts/demo_costs.py on its architecture (BENCHMARKS.md): a guided UNet pass of a window, a
# synced window beyond it (the gradient through LPIPS, the VAE decoder and the UNet), a VAE
# decode of 512x512 pixels. The demo's estimate prices work with them; the limit and the GPU
# check's estimate take their proportions. An encode of 512x512 pixels is priced as the decode's
# share of its arithmetic: 1,082 against 2,480 GFLOP on SD2-base's VAE (torch's
# FlopCounterMode), 0.44 of a decode.
CPU_SECONDS = Rates(
    window_step=18.3, synced_window_step=151.0, decode=28.3, encode=28.3 * 1082 / 2480
)
# The work limit's rates, in SD2-base window-steps: one guided UNet pass of a 512x512 window.
# A synced window-step adds about 8.3 (in CPU_SECONDS' proportion). A ControlNet's forward
# pass over a window is 0.35 UNet passes: 567 against 1,609 GFLOP on SD2-base's architecture
# at 512 px (torch's FlopCounterMode). Decodes and encodes are left out: the limit counts the
# denoising, which grows with the windows and steps.
LIMIT = Rates(
    window_step=1.0,
    synced_window_step=CPU_SECONDS.synced_window_step / CPU_SECONDS.window_step,
    decode=0.0,
    controlnet_pass=0.35,
)
# The limit is the published wrapper's dearest request: 3072x3072 at stride 8 (41 x 41
# windows), 200 steps, of which the first 50 synced. Larger sizes are welcome at a coarser
# stride, with fewer steps or fewer synced ones.
MAX_COST = LIMIT.price(Work(41 * 41 * 200, 50 * (41 * 41 - 1)))


def request_cost(
    request: Mapping[str, Any], geometry: Geometry = SD2_BASE, control: bool = False
) -> float:
    """What a request costs against the limit, in SD2-base window-steps (`LIMIT`)."""
    return LIMIT.price(work(request, geometry, control=control, decoded=False))
