"""The download command: the model weights into a weights folder (see weights/README.md).

Usage: python scripts/download_weights.py [--model NAME] [--controlnet NAME] [--weights DIR]

Only missing or broken parts are fetched, and an interrupted run continues where it stopped
when run again. Each file fetched is checked against what the hub publishes (an LFS file's
sha256) and its sha256 recorded in the folder; every run re-hashes the recorded files and
fetches again those whose bytes changed (loading compares only their sizes).

DIR defaults to $SYNCDIFFUSION_WEIGHTS, else ./weights. NAME is a hub repository id
(stabilityai/stable-diffusion-xl-base-1.0, any SD 1.x/2.x or SDXL checkpoint in the diffusers
layout) or a known folder name; the model goes into DIR/<repository name>/.
NAME defaults to $SYNCDIFFUSION_MODEL, else stable-diffusion-2-base.

--controlnet NAME fetches a ControlNet (a hub repository id of a diffusers ControlNetModel, or a
known folder name) into DIR/controlnet/<repository name>/: alone, only the ControlNet; with
--model, the model and the trunk too, and then checks that the ControlNet fits the model.
"""

from __future__ import annotations

import argparse
import sys
from argparse import Namespace
from pathlib import Path

from ..errors import WeightsError
from ..models.folders import controlnet_folder_problem
from ..models.weights import (
    KNOWN_CONTROLNETS,
    KNOWN_REPOS,
    MODEL_ENV,
    WEIGHTS_ENV,
    check_controlnet,
    check_controlnet_fits,
    check_weights,
    controlnet_dir,
    controlnet_repo_id,
    default_weights_dir,
    download_controlnet,
    download_weights,
    missing_parts,
    model_dirname,
)


def main(argv: list[str] | None = None) -> int:
    """Download what is missing; return the process exit status."""
    parser = argparse.ArgumentParser(
        description="Download a Stable Diffusion model (2 base by default) and the LPIPS VGG16 "
        "trunk, or a ControlNet."
    )
    parser.add_argument(
        "--model",
        default=None,
        help=f"hub repository id or one of {', '.join(KNOWN_REPOS)} (default: ${MODEL_ENV} if "
        "set, else stable-diffusion-2-base)",
    )
    parser.add_argument(
        "--controlnet",
        default=None,
        metavar="NAME",
        help=f"a ControlNet: hub repository id or one of {', '.join(KNOWN_CONTROLNETS)}; it "
        "goes into WEIGHTS/controlnet/. Alone it fetches only the ControlNet; with --model, both, "
        "and checks that they fit",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help=f"weights folder (default: ${WEIGHTS_ENV} if set, else ./weights)",
    )
    args = parser.parse_args(argv)
    weights_dir: Path = args.weights if args.weights is not None else default_weights_dir()
    # A ControlNet alone is fetched alone: the model it is for need not be the default one.
    with_model = args.model is not None or args.controlnet is None

    try:
        todo = missing_parts(weights_dir, verify=True, model=args.model) if with_model else []
        if args.controlnet is not None:
            folder = controlnet_dir(weights_dir, args.controlnet)
            if controlnet_folder_problem(folder):
                controlnet_repo_id(args.controlnet)  # an unknown name fails before any download
                todo.append(folder.relative_to(weights_dir).as_posix())
        if not todo:
            _check(weights_dir, args, with_model)
            print(f"{weights_dir} already holds every part; nothing to download.")
            return 0
        print(f"Downloading into {weights_dir}: {', '.join(todo)}")
        if with_model:
            download_weights(weights_dir, model=args.model)
        if args.controlnet is not None:
            download_controlnet(weights_dir, args.controlnet)
        _check(weights_dir, args, with_model)
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted; run the same command again to continue.", file=sys.stderr)
        return 130
    print(f"Done: {weights_dir} now holds {', '.join(todo)}.")
    return 0


def _check(weights_dir: Path, args: Namespace, with_model: bool) -> None:
    """Raise WeightsError unless what the command was asked for is whole (and fits)."""
    if with_model:
        check_weights(weights_dir, args.model)
    if args.controlnet is not None:
        folder = check_controlnet(weights_dir, args.controlnet)
        if with_model:
            check_controlnet_fits(weights_dir / model_dirname(args.model), folder)
