"""Many panoramas, one model load per process, on every device a launcher gives:

    python -m syncdiffusion.batch JOBS --out DIR [--weights DIR] [--model NAME]
    python -m syncdiffusion.batch --prompts FILE --seeds 0-99 --set sync_weight=0,20 --out DIR
    accelerate launch [--num_processes N] -m syncdiffusion.batch ...
    torchrun --nproc_per_node N -m syncdiffusion.batch ...

JOBS is JSON Lines: one request a line, its inputs by name (`inputs.panorama_inputs`); the
model's defaults fill in the rest. Each job's file is named by a short hash of its resolved
request and the model (`job_key`), so a rerun of the same command finds what is done and makes
only the rest. A file is written under a temporary name in DIR and renamed when whole, so a run
killed at any moment never leaves a half-written file under a job's name. Each process appends
to its own index part (DIR/.index/); the main process merges them into DIR/index.jsonl, one
line per job in JOBS order: its file and seconds, or its error.

The jobs are split between processes by their position among those not yet done; every job is
seeded by its own inputs, so the pictures are the same whatever the number of processes. With
several machines, DIR must be one shared folder.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .inputs import OUTPUT_FORMATS, InputError, panorama_inputs

INDEX = "index.jsonl"
PARTS = ".index"  # one index part per process
PROGRESS = ".progress"  # one count file per process, read by the main process
TEMPORARY = ".tmp"  # suffix of files being written; never an image suffix
GRID_JOBS = "jobs.jsonl"  # where the grid form writes the jobs it expands to


# --- the jobs --------------------------------------------------------------------------------


@dataclass
class Job:
    """One line of JOBS: its inputs as given, and once resolved on a model, its key or error."""

    line: int  # 1-based, in JOBS
    inputs: dict[str, Any]
    key: str | None = None
    request: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def read_jobs(path: Path) -> list[Job]:
    """The jobs of a JSON Lines file; blank lines are skipped, and a line that is not a JSON
    object becomes a job with its error, so the rest still run."""
    jobs = []
    with open(path, encoding="utf-8") as lines:
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                inputs = json.loads(text)
            except ValueError as error:
                jobs.append(Job(number, {}, error=f"line {number} is not JSON ({error})"))
                continue
            if not isinstance(inputs, dict):
                kind = type(inputs).__name__
                jobs.append(
                    Job(number, {}, error=f"line {number} must be a JSON object; got {kind}")
                )
                continue
            jobs.append(Job(number, inputs))
    return jobs


def job_key(request: dict[str, Any], model: str) -> str:
    """The name of a job's file, without suffix: a short hash of every input and the model."""
    text = json.dumps({**request, "model": model}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve(jobs: list[Job], pipe: Any, model: str) -> None:
    """Give each job its full request on `pipe`'s model and its key, or the refusal."""
    for job in jobs:
        if job.error is not None:
            continue
        try:
            job.request = pipe.request(**job.inputs)
        except InputError as error:
            job.error = f"line {job.line}: {error}"
            continue
        job.key = job_key(job.request, model)


# --- the grid form ---------------------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    """Seeds as `0-99`, `1,5,9` or both (`0-9,100`), in the order given."""
    seeds = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            seeds += range(int(low), int(high) + 1) if dash else [int(low)]
        except ValueError:
            raise InputError(f"--seeds must be like 0-99 or 1,5,9; got {text!r}") from None
    return seeds


def parse_setting(text: str) -> tuple[str, list[Any]]:
    """`name=v1,v2` (or `name=[JSON list]`) as the input's name and its values, typed as the
    input is; InputError naming the input otherwise."""
    name, equals, values = text.partition("=")
    described = panorama_inputs()
    if not equals or name not in described:
        raise InputError(
            f"--set must be NAME=VALUE[,VALUE...] with NAME one of {', '.join(described)}; "
            f"got {text!r}"
        )
    spec = described[name]
    if values.startswith("["):
        try:
            parsed = json.loads(values)
        except ValueError as error:
            raise InputError(f"--set {name}: {values!r} is not a JSON list ({error})") from None
        if not isinstance(parsed, list):
            raise InputError(f"--set {name}: {values!r} is not a JSON list")
        return name, parsed
    return name, [_typed(spec.type, name, value) for value in values.split(",")]


def _typed(kind: type, name: str, value: str) -> Any:
    if kind is str:
        return value
    if kind is bool and value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
    except ValueError:
        pass
    raise InputError(f"--set {name}: {value!r} is not a{'n' * (kind is int)} {kind.__name__}")


def read_prompts(path: Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def expand_grid(
    prompts: list[str], seeds: list[int] | None, settings: list[tuple[str, list[Any]]]
) -> list[dict[str, Any]]:
    """Every combination, as JOBS lines: for each prompt, each combination of the settings'
    values (the first setting slowest), each seed. Without seeds, the default seed."""
    names = [name for name, _ in settings]
    jobs = []
    for prompt in prompts:
        for values in itertools.product(*(values for _, values in settings)):
            base = {"prompt": prompt, **dict(zip(names, values, strict=True))}
            jobs += [{**base, "seed": seed} for seed in seeds] if seeds is not None else [base]
    return jobs


def write_jobs(jobs: Iterable[dict[str, Any]], path: Path) -> Path:
    """Write `jobs` as JSON Lines, whole or not at all."""
    text = "".join(json.dumps(job, ensure_ascii=False) + "\n" for job in jobs)
    return _write_whole(Path(path), text)


def _write_whole(path: Path, text: str) -> Path:
    temporary = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


# --- one process's share ---------------------------------------------------------------------


def output_name(key: str, output_format: str) -> str:
    """A job's file name in the output folder."""
    return f"{key}.{output_format}"


def pending(jobs: list[Job], out: Path, output_format: str) -> list[Job]:
    """The resolved jobs whose file is not in `out` yet, each key once, in JOBS order."""
    seen, todo = set(), []
    for job in jobs:
        if job.key is None or job.key in seen:
            continue
        seen.add(job.key)
        if not (out / output_name(job.key, output_format)).is_file():
            todo.append(job)
    return todo


def share(todo: list[Job], rank: int, processes: int) -> list[Job]:
    """This process's jobs: every `processes`-th, from its rank."""
    return todo[rank::processes]


def make(job: Job, pipe: Any, out: Path, output_format: str, quality: int) -> Path:
    """Make one job's panorama and write it under its final name only once it is whole."""
    from .files import save_image

    image = pipe(**job.request)
    final = out / output_name(job.key, output_format)
    temporary = out / f".{final.name}.{os.getpid()}{TEMPORARY}"
    save_image(image, temporary, image.info["parameters"], output_format, quality)
    os.replace(temporary, final)
    return final


def append_record(path: Path, record: dict[str, Any]) -> None:
    """One line of a process's own index part, flushed to disk before the next job starts."""
    with open(path, "a", encoding="utf-8") as part:
        part.write(json.dumps(record, ensure_ascii=False) + "\n")
        part.flush()
        os.fsync(part.fileno())


def read_records(folder: Path) -> Iterator[dict[str, Any]]:
    """Every whole record of every index part; a line cut short by a kill is skipped."""
    for path in sorted(folder.glob("*.jsonl")):
        for text in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(text)
                if isinstance(record, dict) and "job" in record:
                    yield record


def merge_index(jobs: list[Job], out: Path, output_format: str) -> list[dict[str, Any]]:
    """DIR/index.jsonl: one record per job in JOBS order, its file (and seconds, where a run
    recorded them) if the file is there, else its latest error."""
    latest: dict[str, dict[str, Any]] = {}
    for record in read_records(out / PARTS):
        latest[record["job"]] = record  # parts are appended in time order within a process
    index = []
    for job in jobs:
        if job.key is None:
            index.append({"job": None, "line": job.line, "error": job.error})
            continue
        record = {"job": job.key, "line": job.line}
        name = output_name(job.key, output_format)
        made = latest.get(job.key, {})
        if (out / name).is_file():
            record["file"] = name
            if made.get("file") == name:
                record["seconds"] = made["seconds"]
        else:
            record["error"] = made.get("error", "not made yet")
        index.append(record)
    _write_whole(out / INDEX, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in index))
    return index


# --- progress across processes ---------------------------------------------------------------


def write_count(out: Path, rank: int, done: int, total: int) -> None:
    """This process's count of its jobs done, for the main process's progress line."""
    _write_whole(out / PROGRESS / f"{rank}.json", json.dumps({"done": done, "total": total}))


def read_counts(out: Path) -> tuple[int, int]:
    """Jobs done and jobs to do in this run, summed over the processes that have reported."""
    done = total = 0
    for path in (out / PROGRESS).glob("*.json"):
        with contextlib.suppress(ValueError, OSError):
            count = json.loads(path.read_text())
            done, total = done + count["done"], total + count["total"]
    return done, total


def progress_line(done: int, total: int, seconds: float) -> str:
    """`12/200 jobs done, ETA 16m 40s`: the ETA from the rate so far, over all processes."""
    line = f"{done}/{total} jobs done"
    if 0 < done < total:
        left = round(seconds / done * (total - done))
        line += f", ETA {_duration(left)}"
    elif done == total:
        line += f" in {_duration(round(seconds))}"
    return line


def _duration(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return (
        (f"{hours}h " if hours else "")
        + (f"{minutes}m " if hours or minutes else "")
        + (f"{seconds}s")
    )


class Progress:
    """On the main process, a line on stderr whenever the count across processes changes, at
    most every `every` seconds. The counts come from the output folder (`write_count`), so
    no process waits for another between jobs."""

    def __init__(self, out: Path, every: float) -> None:
        self.out, self.every, self.start = out, every, time.monotonic()
        self.stop = threading.Event()
        self.shown: tuple[int, int] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.show()

    def show(self) -> None:
        counts = read_counts(self.out)
        if counts != self.shown and counts[1]:
            self.shown = counts
            line = progress_line(*counts, time.monotonic() - self.start)
            print(f"batch: {line}", file=sys.stderr, flush=True)

    def __enter__(self) -> Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


# --- the run ---------------------------------------------------------------------------------


def run(
    jobs: list[Job],
    pipe: Any,
    out: Path,
    state: Any,
    output_format: str = "png",
    quality: int = 80,
    progress_every: float = 30.0,
) -> list[dict[str, Any]]:
    """Make this process's share of the jobs not done yet; on the main process, return the
    merged index (elsewhere, an empty list). Every process of `state` must call it."""
    from .files import model_identity
    from .perceptual import one_line

    rank, processes = state.process_index, state.num_processes
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTS).mkdir(exist_ok=True)
    (out / PROGRESS).mkdir(exist_ok=True)
    resolve(jobs, pipe, model_identity(pipe.unet.config))
    todo = pending(jobs, out, output_format)
    if state.is_main_process:
        for stale in itertools.chain(out.glob(f".*{TEMPORARY}"), (out / PROGRESS).iterdir()):
            stale.unlink(missing_ok=True)  # left by a killed run: nothing writes them yet
        done = len({job.key for job in jobs if job.key is not None}) - len(todo)
        print(
            f"batch: {len(jobs)} jobs, {done} done already, {len(todo)} to make on "
            f"{processes} process{'es' * (processes > 1)}",
            file=sys.stderr,
            flush=True,
        )
    # Every process has listed what is done before any writes: the same list everywhere.
    state.wait_for_everyone()
    mine = share(todo, rank, processes)
    part = out / PARTS / f"{rank}.jsonl"
    write_count(out, rank, 0, len(mine))
    reporter = Progress(out, progress_every) if state.is_main_process else None
    with reporter or contextlib.nullcontext():
        for done, job in enumerate(mine, 1):
            start = time.monotonic()
            try:
                path = make(job, pipe, out, output_format, quality)
                record = {"job": job.key, "file": path.name}
                record["seconds"] = round(time.monotonic() - start, 3)
            except Exception as error:  # recorded; the other jobs go on
                record = {"job": job.key, "error": f"line {job.line}: {one_line(error)}"}
            append_record(part, record)
            write_count(out, rank, done, len(mine))
            if reporter is not None:
                reporter.show()
        state.wait_for_everyone()
        if reporter is not None:
            reporter.show()
    if not state.is_main_process:
        return []
    return merge_index(jobs, out, output_format)


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
        except (InputError, OSError) as error:
            parser.exit(2, f"error: {error}\n")
        if args.print_jobs:
            sys.stdout.write("".join(json.dumps(job, ensure_ascii=False) + "\n" for job in lines))
            return 0
    elif args.seeds or args.set or args.print_jobs:
        parser.error("--seeds, --set and --print-jobs belong to the grid form (--prompts)")

    import torch
    from accelerate import PartialState

    from . import SyncDiffusionPipeline, WeightsError

    cpu = args.device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if args.jobs is None:
        args.out.mkdir(parents=True, exist_ok=True)
        args.jobs = args.out / GRID_JOBS
        if state.is_main_process:
            write_jobs(lines, args.jobs)
        state.wait_for_everyone()
    try:
        jobs = read_jobs(args.jobs)
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
