"""The download command: the model weights into a weights folder (see weights/README.md).

Usage: python scripts/download_weights.py [--model NAME] [--weights DIR]

Only missing or broken parts are fetched, and an interrupted run continues where it stopped
when run again. DIR defaults to $SYNCDIFFUSION_WEIGHTS, else ./weights. NAME is a hub
repository id (stabilityai/stable-diffusion-xl-base-1.0, any SD 1.x/2.x or SDXL checkpoint in
the diffusers layout) or a known folder name; the model goes into DIR/<repository name>/.
NAME defaults to $SYNCDIFFUSION_MODEL, else stable-diffusion-2-base.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .weights import (
    KNOWN_REPOS,
    MODEL_ENV,
    WEIGHTS_ENV,
    WeightsError,
    check_weights,
    default_weights_dir,
    download_weights,
    missing_parts,
)


def main(argv: list[str] | None = None) -> int:
    """Download what is missing; return the process exit status."""
    parser = argparse.ArgumentParser(
        description="Download a Stable Diffusion model (2 base by default) and the LPIPS VGG16 "
        "trunk."
    )
    parser.add_argument(
        "--model",
        default=None,
        help=f"hub repository id or one of {', '.join(KNOWN_REPOS)} (default: ${MODEL_ENV} if "
        "set, else stable-diffusion-2-base)",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help=f"weights folder (default: ${WEIGHTS_ENV} if set, else ./weights)",
    )
    args = parser.parse_args(argv)
    weights_dir: Path = args.weights if args.weights is not None else default_weights_dir()

    try:
        todo = missing_parts(weights_dir, verify=True, model=args.model)
        if not todo:
            check_weights(weights_dir, args.model)
            print(f"{weights_dir} already holds every part; nothing to download.")
            return 0
        print(f"Downloading into {weights_dir}: {', '.join(todo)}")
        download_weights(weights_dir, model=args.model)
        check_weights(weights_dir, args.model)
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted; run the same command again to continue.", file=sys.stderr)
        return 130
    print(f"Done: {weights_dir} now holds {', '.join(todo)}.")
    return 0
