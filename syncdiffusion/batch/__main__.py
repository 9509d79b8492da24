"""`python -m syncdiffusion.batch`: the batch command line (the package's docstring says how a
batch runs)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError, one_line
from ..request.inputs import OUTPUT_FORMATS
from .jobs import (
    GRID_JOBS,
    expand_grid,
    json_line,
    parse_seeds,
    parse_setting,
    read_jobs,
    read_prompts,
    write_jobs,
)
from .runner import INDEX, LOCK, folder_lock, run


def build_parser() -> argparse.ArgumentParser:
    """The batch command's options."""
    parser = argparse.ArgumentParser(
        prog="python -m syncdiffusion.batch",
        description="Make many panoramas, one model load per process; under accelerate launch "
        "or torchrun the jobs are split between the processes, one device each. A rerun makes "
        "only the jobs not done yet.",
    )
    parser.add_argument(
        "jobs", nargs="?", type=Path, help="JSON Lines file: one request a line, inputs by name"
    )
    parser.add_argument("--out", type=Path, help="folder for the files and index (required)")
    grid = parser.add_argument_group(
        "grid form", f"instead of JOBS: every combination, written to OUT/{GRID_JOBS} and made"
    )
    grid.add_argument("--prompts", type=Path, help="file of prompts, one a line (# comments)")
    grid.add_argument("--seeds", help="seeds, e.g. 0-99 or 1,5,9 (default: the default seed)")
    grid.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="an input's values, e.g. sync_weight=0,20 (repeatable; a JSON list for text "
        "with commas)",
    )
    grid.add_argument(
        "--print-jobs", action="store_true", help="print the grid's JOBS lines and stop"
    )
    parser.add_argument("--weights", type=Path, default=None, help="weights folder")
    parser.add_argument("--model", default=None, help="model folder in the weights folder")
    parser.add_argument("--device", default=None, help="cpu, or the launcher's device per process")
    parser.add_argument("--output-format", choices=OUTPUT_FORMATS, default="png")
    parser.add_argument("--output-quality", type=int, default=80, help="for webp and jpg")
    parser.add_argument(
        "--progress-every", type=float, default=30.0, metavar="SECONDS", help="(default: 30)"
    )
    return parser


def grid_jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The grid form's jobs from the options."""
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    settings = [parse_setting(text) for text in args.set]
    return expand_grid(read_prompts(args.prompts), seeds, settings)


def make_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """Make the output folder and its lock file, or exit naming --out and why it cannot be."""
    allowed = "give a folder for the files and index (made if missing)"
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / LOCK).touch()
    except FileExistsError:
        parser.exit(2, f"error: --out {out} is a file, not a folder: {allowed}\n")
    except OSError as error:
        reason = one_line(error)
        parser.exit(2, f"error: --out {out} cannot be made or written ({reason}): {allowed}\n")


def main(argv: list[str] | None = None) -> int:
    """Run the batch command; 0 if every job is made, 1 if some failed, 2 on a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.jobs is None) == (args.prompts is None):
        parser.error("give either JOBS or --prompts FILE (the grid form)")
    if args.out is None and not args.print_jobs:
        parser.error("--out DIR is required")
    if args.jobs is None:
        try:
            lines = grid_jobs(args)
        except InputError as error:
            parser.exit(2, f"error: {error}\n")
        except OSError as error:
            parser.exit(2, f"error: --prompts {args.prompts}: {one_line(error)}\n")
        if args.print_jobs:
            sys.stdout.write("".join(map(json_line, lines)))
            return 0
    elif args.seeds or args.set or args.print_jobs:
        parser.error("--seeds, --set and --print-jobs belong to the grid form (--prompts)")
    make_out(parser, args.out)

    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    cpu = args.device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    # The main process holds the folder for the whole run, and every process learns whether.
    lock = folder_lock(args.out) if state.is_main_process else contextlib.nullcontext()
    with lock as holder:
        [holder] = broadcast_object_list([holder])
        if holder is not None:
            if state.is_main_process:
                print(
                    f"error: --out {args.out} is in use by another batch run ({holder}): two "
                    "runs in one folder would remove each other's temporary files and make every "
                    "job twice; wait for it to end (the same command then makes only what is "
                    "missing), or give another --out",
                    file=sys.stderr,
                )
            return 2
        return make_batch(args, state, lines if args.jobs is None else [])


def make_batch(args: argparse.Namespace, state: Any, grid: list[dict[str, Any]]) -> int:
    """The batch in `args.out`, which this run holds: the grid form's `grid` written as its
    JOBS first; the exit status, as `main`'s."""
    from ..errors import WeightsError
    from ..pipeline import SyncDiffusionPipeline

    if args.jobs is None:
        args.jobs = args.out / GRID_JOBS
        if state.is_main_process:
            write_jobs(grid, args.jobs)
        state.wait_for_everyone()
    try:
        jobs = read_jobs(args.jobs)
    except OSError as error:
        print(f"error: JOBS {args.jobs}: {one_line(error)}", file=sys.stderr)
        return 2
    try:
        pipe = SyncDiffusionPipeline.from_pretrained(
            args.weights, device=args.device or state.device, model=args.model
        )
    except (OSError, WeightsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    index = run(
        jobs, pipe, args.out, state, args.output_format, args.output_quality, args.progress_every
    )
    if not state.is_main_process:
        return 0
    failed = [record for record in index if "error" in record]
    for record in failed:
        print(f"error: {record['error']}", file=sys.stderr)
    print(
        f"batch: {len(index) - len(failed)} of {len(index)} jobs made; index: {args.out / INDEX}",
        file=sys.stderr,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
