"""Command line: `python -m syncdiffusion --prompt "..." --output pano.png [--weights DIR]`."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from tqdm import tqdm

from . import InputError, SyncDiffusionPipeline, WeightsError

# The panorama inputs, as the pipeline (and the Cog model) names them; defaults come from there.
INPUTS = (
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "guidance_scale",
    "sync_weight",
    "sync_decay_rate",
    "sync_freq",
    "sync_threshold",
    "num_inference_steps",
    "stride",
    "seed",
    "loop_closure",
)


def build_parser() -> argparse.ArgumentParser:
    """Every pipeline input as `--input-name`, with the pipeline's own default."""
    parser = argparse.ArgumentParser(
        prog="python -m syncdiffusion",
        description="Make a coherent panorama PNG with SyncDiffusion on Stable Diffusion 2.0-base.",
    )
    defaults = inspect.signature(SyncDiffusionPipeline.__call__).parameters
    for name in INPUTS:
        flag = "--" + name.replace("_", "-")
        default = defaults[name].default
        if name == "prompt":
            parser.add_argument(flag, required=True, help="what the panorama shows")
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help="360-degree panorama")
        else:
            parser.add_argument(
                flag, type=type(default), default=default, help=f"default: {default!r}"
            )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("panorama.png"),
        help="PNG file to write (default: panorama.png)",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="weights folder (default: $SYNCDIFFUSION_WEIGHTS or weights/)",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument(
        "--view-batch-size",
        type=int,
        default=None,
        help="windows per network call (default: as many as fit in memory)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        pipe = SyncDiffusionPipeline.from_pretrained(args.weights, device=args.device)
        with tqdm(total=args.num_inference_steps, unit="step") as bar:

            def progress(state: dict) -> None:
                bar.set_postfix_str("sync" if state["sync"] else "")
                bar.update(1)

            image = pipe(
                **{name: getattr(args, name) for name in INPUTS},
                view_batch_size=args.view_batch_size,
                callback=progress,
            )
    except (InputError, WeightsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    image.save(args.output)
    print(f"wrote {args.output} ({image.width}x{image.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
