"""SyncDiffusion: coherent text-to-panorama images with Stable Diffusion 2.0-base.

The package's rooms, lowest first: `errors` (what a user can cause), `core` (the algorithm:
windows, sync step, sampling loop, precision, decoding), `models` (model families, weights
folders, downloads, the LPIPS trunk, tiny models), `request` (the inputs described once, their
checks and cost, input images, the saved file), `pipeline` (the one class that joins them), the
front-ends `cli`, `batch` and `app`, and `evaluation` (the paper's metrics). `replicate` reads
and writes the Cog predictors' inputs; `testing` is what the tests and benchmarks share.
"""

from typing import TYPE_CHECKING

from .errors import InputError, WeightsError
from .version import __version__

if TYPE_CHECKING:
    from .pipeline import SyncDiffusionPipeline

__all__ = ["InputError", "SyncDiffusionPipeline", "WeightsError", "__version__"]


def __getattr__(name: str):
    # The pipeline pulls in diffusers and transformers (seconds): only load it when asked for.
    if name == "SyncDiffusionPipeline":
        from .pipeline import SyncDiffusionPipeline

        return SyncDiffusionPipeline
    raise AttributeError(f"module 'syncdiffusion' has no attribute {name!r}")
