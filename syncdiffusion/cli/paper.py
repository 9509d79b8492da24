"""The paper's comparison at scale, in one command (`scripts/reproduce_paper.py`).

For each prompt, K panoramas at 512x3072 with sync_weight 0 (MultiDiffusion) and the same K
seeds with sync_weight 20 (SyncDiffusion), the other settings those of the authors'
`sample_syncdiffusion.sh` (stride 16, 50 steps, sync decay 0.95, sync threshold 10); and R
single 512x512 pictures per prompt from the same model, the reference set for FID, KID and
GIQA. All three are made by `syncdiffusion.batch` with one model load, split between the
processes of a launcher, and resumable: rerun the same command to finish a killed run.

The table, per method: Intra-LPIPS, Intra-Style-L, Mean-CLIP-S (with --clip) and GIQA as
mean and standard deviation over the panoramas; FID and KID per prompt (each prompt's crops
against its own reference pictures), as mean and standard deviation over the prompts. Written
as Markdown and JSON in the output folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..batch.jobs import Job, read_prompts
from ..batch.runner import run

PANORAMA = {
    "width": 3072,
    "height": 512,
    "stride": 16,
    "num_inference_steps": 50,
    "sync_decay_rate": 0.95,
    "sync_freq": 1,
    "sync_threshold": 10,
}
METHODS = {"multidiffusion": 0.0, "syncdiffusion": 20.0}  # sync_weight
NAMES = {"multidiffusion": "MultiDiffusion", "syncdiffusion": "SyncDiffusion"}
REFERENCE = {"width": 512, "height": 512, "num_inference_steps": 50, "sync_weight": 0.0}
COLUMNS = {
    "intra_lpips": "Intra-LPIPS ↓",
    "intra_style_l": "Intra-Style-L ↓",
    "fid": "FID ↓",
    "kid": "KID ↓",
    "giqa": "Mean-GIQA ↑",
    "clip_score": "Mean-CLIP-S ↑",
}


def paper_jobs(prompts: list[str], per_prompt: int, references: int) -> dict[str, list[dict]]:
    """Each folder's requests: the two methods' panoramas (seeds 0..K-1) and the reference."""
    jobs = {
        method: [
            {"prompt": prompt, **PANORAMA, "sync_weight": weight, "seed": seed}
            for prompt in prompts
            for seed in range(per_prompt)
        ]
        for method, weight in METHODS.items()
    }
    jobs["reference"] = [
        {"prompt": prompt, **REFERENCE, "seed": seed}
        for prompt in prompts
        for seed in range(references)
    ]
    return jobs


def spread(values: list[float]) -> dict[str, float | None]:
    """Mean and (population) standard deviation, or None for no values."""
    if not values or any(v is None for v in values):
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def markdown(table: dict[str, dict[str, dict[str, float | None]]]) -> str:
    """The table as Markdown: a row per method, `mean ± std` per column."""
    lines = ["| Method | " + " | ".join(COLUMNS.values()) + " |"]
    lines.append("|---" * (len(COLUMNS) + 1) + "|")
    for method, figures in table.items():
        cells = []
        for column in COLUMNS:
            figure = figures[column]
            if figure["mean"] is None:
                cells.append("–")
            else:
                digits = ".4f" if abs(figure["mean"]) < 10 else ".2f"
                cells.append(f"{figure['mean']:{digits}} ± {figure['std']:{digits}}")
        lines.append(f"| {NAMES.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def files_by_prompt(folder: Path, index: list[dict[str, Any]]) -> dict[str, list[Path]]:
    """The made files of a folder's index, grouped by their saved prompt, in index order."""
    from ..request.image_file import read_parameters

    groups: dict[str, list[Path]] = defaultdict(list)
    for record in index:
        if "file" in record:
            path = folder / record["file"]
            groups[read_parameters(path)["prompt"]].append(path)
    return groups


def evaluate_method(
    folder: Path,
    index: list[dict[str, Any]],
    reference: dict[str, list[Path]],
    args: argparse.Namespace,
    device: Any,
) -> dict[str, dict[str, float | None]]:
    """One method's row: every column's mean and standard deviation."""
    from ..evaluation.report import Panorama, evaluate, evaluate_fidelity
    from ..models.weights import default_weights_dir

    clip = args.clip or args.clip_model is not None
    fid, kid, panoramas = [], [], []
    for prompt, paths in files_by_prompt(folder, index).items():
        group = [Panorama(p, PANORAMA["width"], PANORAMA["height"], prompt) for p in paths]
        figures = evaluate_fidelity(group, reference.get(prompt, []), device)
        fid.append(figures["fid"])
        kid.append(figures["kid"])
        panoramas += group
    evaluate(panoramas, args.weights or default_weights_dir(), device, clip, args.clip_model)
    per_image = {
        column: spread([getattr(p, column) for p in panoramas])
        for column in ("intra_lpips", "intra_style_l", "giqa", "clip_score")
    }
    return {**per_image, "fid": spread(fid), "kid": spread(kid)}


def build_parser() -> argparse.ArgumentParser:
    """The command's options."""
    parser = argparse.ArgumentParser(
        prog="scripts/reproduce_paper.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--per-prompt", type=int, required=True, metavar="K", help="panoramas")
    parser.add_argument(
        "--references", type=int, default=None, metavar="R", help="per prompt (default: K)"
    )
    parser.add_argument("--out", type=Path, default=Path("paper-run"), help="(default: paper-run)")
    parser.add_argument("--prompts", type=Path, default=None, help="one prompt a line")
    parser.add_argument("--weights", type=Path, default=None, help="weights folder")
    parser.add_argument("--model", default=None, help="model folder (default: SD 2.0-base)")
    parser.add_argument("--device", default=None, help="cpu, or the launcher's device")
    parser.add_argument("--clip", action="store_true", help="also Mean-CLIP-S")
    parser.add_argument("--clip-model", type=Path, default=None, help="local CLIP folder")
    parser.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS")
    return parser


def main(argv: list[str] | None = None, default_prompts: Path | None = None) -> int:
    """Make the three folders (every process of a launcher), then the table (main process)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.per_prompt < 2:
        parser.error(f"--per-prompt must be at least 2 (FID needs two); got {args.per_prompt}")
    prompts_file = args.prompts or default_prompts
    if prompts_file is None:
        parser.error("--prompts FILE is required")
    prompts = read_prompts(prompts_file)
    references = args.references or args.per_prompt

    import torch
    from accelerate import PartialState

    from ..errors import WeightsError
    from ..evaluation.report import EvaluationError
    from ..pipeline import SyncDiffusionPipeline

    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    try:
        pipe = SyncDiffusionPipeline.from_pretrained(
            args.weights, device=args.device or state.device, model=args.model
        )
    except WeightsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    indexes = {}
    for folder, requests in paper_jobs(prompts, args.per_prompt, references).items():
        jobs = [Job(line, inputs) for line, inputs in enumerate(requests, 1)]
        if state.is_main_process:
            print(f"{folder}: {len(jobs)} pictures", file=sys.stderr)
        out = args.out / folder
        indexes[folder] = run(jobs, pipe, out, state, progress_every=args.progress_every)
    if not state.is_main_process:
        return 0
    del pipe
    device = state.device if args.device is None else torch.device(args.device)
    reference = files_by_prompt(args.out / "reference", indexes["reference"])
    try:
        table = {
            method: evaluate_method(args.out / method, indexes[method], reference, args, device)
            for method in METHODS
        }
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = markdown(table)
    (args.out / "table.md").write_text(text)
    setup = {"prompts": prompts, "per_prompt": args.per_prompt, "references": references}
    (args.out / "table.json").write_text(json.dumps({**setup, "table": table}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
