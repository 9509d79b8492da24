"""SyncDiffusion: coherent text-to-panorama images with Stable Diffusion 2.0-base."""

from typing import TYPE_CHECKING

from .inputs import InputError
from .weights import WeightsError

if TYPE_CHECKING:
    from .pipeline import SyncDiffusionPipeline

__version__ = "0.1.0"
__all__ = ["InputError", "SyncDiffusionPipeline", "WeightsError", "__version__"]


def __getattr__(name: str):
    # The pipeline pulls in diffusers and transformers (seconds): only load it when asked for.
    if name == "SyncDiffusionPipeline":
        from .pipeline import SyncDiffusionPipeline

        return SyncDiffusionPipeline
    raise AttributeError(f"module 'syncdiffusion' has no attribute {name!r}")
