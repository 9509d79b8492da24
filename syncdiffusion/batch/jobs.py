"""A batch's jobs: JSON Lines of requests, resolved on a model to a key each; the grid form
(prompts x seeds x settings) that writes them. Run by `syncdiffusion.batch` (its module
docstring says how a batch runs).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..core.control import image_record
from ..errors import InputError, one_line
from ..request.condition_image import open_image
from ..request.image_file import whole_file
from ..request.inputs import panorama_inputs

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
    folder: Path | None = None  # JOBS's: an image's relative path is from there


def read_jobs(path: Path) -> list[Job]:
    """The jobs of a JSON Lines file; blank lines are skipped, and a line that is not a JSON
    object becomes a job with its error, so the rest still run.

    A byte that is not UTF-8 is read as a lone surrogate (Python's surrogateescape), so it
    costs only its own line: inside a prompt the input check refuses it with its position."""
    jobs = []
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            text = raw.decode("utf-8", "surrogateescape")
            if not text.strip():
                continue
            allowed = "each line of JOBS must be a JSON object of inputs by name"
            try:
                inputs = json.loads(text)
            except ValueError as error:
                jobs.append(
                    Job(number, {}, error=f"line {number} is not JSON ({error}); {allowed}")
                )
                continue
            except RecursionError:
                error = f"line {number} is not JSON (nested too deeply); {allowed}"
                jobs.append(Job(number, {}, error=error))
                continue
            if not isinstance(inputs, dict):
                kind = type(inputs).__name__
                jobs.append(
                    Job(number, {}, error=f"line {number} must be a JSON object; got {kind}")
                )
                continue
            jobs.append(Job(number, inputs, folder=Path(path).parent))
    return jobs


def job_key(request: dict[str, Any], model: str) -> str:
    """The name of a job's file, without suffix: a short hash of every input (an image by its
    pixels' hash and size) and the model."""
    inputs = {
        name: image_record(value) if isinstance(value, Image.Image) else value
        for name, value in request.items()
    }
    text = json.dumps({**inputs, "model": model}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve(jobs: list[Job], pipe: Any, model: str) -> None:
    """Give each job its full request on `pipe`'s model and its key, or the refusal. An image
    to start from and its mask are files, by path (relative: to the JOBS file's folder), opened
    and checked as the command line's `--image` and `--mask`."""
    for job in jobs:
        if job.error is not None:
            continue
        try:
            inputs = dict(job.inputs)
            for name in IMAGE_FILES:
                if isinstance(inputs.get(name), str):
                    inputs[name] = open_image(_image_path(job, inputs[name]), name)
            job.request = pipe.request(**inputs)
            job.key = job_key(job.request, model)
        except InputError as error:
            job.error = f"line {job.line}: {error}"
        except Exception as error:  # recorded as the line's; the other jobs still run
            job.error = f"line {job.line}: {one_line(error)}"


# The inputs a job gives as image files, by path.
IMAGE_FILES = ("image", "mask")


def _image_path(job: Job, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() or job.folder is None else job.folder / path


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
    """`name=v1,v2` (or `name=[JSON list]`) as the input's name and its values, each read by
    the input's `Input.parse`; InputError naming the input otherwise."""
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
    try:
        return name, [spec.parse(value) for value in values.split(",")]
    except InputError as error:
        raise InputError(f"--set {name}: {error}") from None


def read_prompts(path: Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped. A byte that is not
    UTF-8 is read as a lone surrogate, which the input check refuses in that prompt's jobs."""
    lines = Path(path).read_bytes().decode("utf-8", "surrogateescape").splitlines()
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


def json_line(record: dict[str, Any]) -> str:
    """`record` as one line of JSON Lines, UTF-8 text as it is; a line with text UTF-8 cannot
    encode (a lone surrogate) is written with \\u escapes, so it reads back the same."""
    text = json.dumps(record, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(record)
    return text + "\n"


def write_jobs(jobs: Iterable[dict[str, Any]], path: Path) -> Path:
    """Write `jobs` as JSON Lines, whole or not at all."""
    return write_whole(Path(path), "".join(map(json_line, jobs)))


def write_whole(path: Path, text: str) -> Path:
    """Write `text` to `path` under a temporary name, then rename it: never a half-written file."""
    with whole_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path
