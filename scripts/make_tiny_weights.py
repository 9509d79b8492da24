"""Write tiny, randomly initialised models of each family in the real weights layout.

Usage: python scripts/make_tiny_weights.py OUT [--models sd2 sd1 sd2-v sdxl sd2-inpainting]
       [--controlnets]

By default only the SD2-base-shaped model, in weights/'s default folder (stable-diffusion-2-base);
`--models` adds the SD 1.x, SD 2.x 768 v-prediction, SDXL and SD2 inpainting-shaped ones,
`--controlnets` a tiny ControlNet for each, in controlnet/tiny-controlnet-<model>. What they are:
`syncdiffusion.models.tiny`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from syncdiffusion.models.tiny import TINY_CONTROLNETS, TINY_MODELS, make_tiny_weights
from syncdiffusion.models.weights import CONTROLNET_DIRNAME


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the tiny weights into")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(TINY_MODELS),
        default=["sd2"],
        help="which tiny models to write (default: sd2, in stable-diffusion-2-base/)",
    )
    parser.add_argument(
        "--controlnets",
        action="store_true",
        help="also a tiny ControlNet for each model, in controlnet/tiny-controlnet-<model> "
        f"({', '.join(TINY_CONTROLNETS.values())})",
    )
    args = parser.parse_args(argv)
    make_tiny_weights(args.out, tuple(args.models), args.controlnets)
    print(f"Wrote tiny random models to {args.out}: {', '.join(args.models)}")
    if args.controlnets:
        names = ", ".join(TINY_CONTROLNETS[m] for m in args.models)
        print(f"and their ControlNets in {args.out / CONTROLNET_DIRNAME}: {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
