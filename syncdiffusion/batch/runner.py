"""A batch's run: each process's share of the jobs not yet done, each file written whole
under its job's key, the index parts merged, and progress across processes. The command line
is `syncdiffusion.batch`'s `__main__`.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..request.image_file import TEMPORARY, save_image, whole_file
from .jobs import Job, json_line, resolve, write_whole

INDEX = "index.jsonl"
LOCK = ".lock"  # held by the main process of the run that writes in the folder
PARTS = ".index"  # one index part per process
PROGRESS = ".progress"  # one count file per process, read by the main process


# --- one run per folder -----------------------------------------------------------------------


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[str | None]:
    """Hold `out` for one run: yields None while this process holds DIR/.lock (and has written
    there who holds it), or, without waiting, who holds it if another process does.

    The lock is the system's `flock` on the file, which ends with the process however it ends,
    so a killed run leaves no lock behind; the file and its words stay, and the next run takes
    it over. The file is never removed: a run could otherwise lock a name another had unlinked.
    """
    descriptor = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            words = os.read(descriptor, 200).decode("utf-8", "replace").strip()
            yield words or "a process that has not said which yet"
            return
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        os.ftruncate(descriptor, 0)
        os.write(
            descriptor, f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n".encode()
        )
        yield None
    finally:
        os.close(descriptor)  # and with it the lock


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
    image = pipe(**job.request)
    final = out / output_name(job.key, output_format)
    with whole_file(final) as temporary:
        save_image(image, temporary, image.info["parameters"], output_format, quality)
    return final


def append_record(path: Path, record: dict[str, Any]) -> None:
    """One line of a process's own index part, flushed to disk before the next job starts."""
    with open(path, "a", encoding="utf-8") as part:
        part.write(json_line(record))
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
    write_whole(out / INDEX, "".join(map(json_line, index)))
    return index


# --- progress across processes ---------------------------------------------------------------


def write_count(out: Path, rank: int, done: int, total: int) -> None:
    """This process's count of its jobs done, for the main process's progress line."""
    write_whole(out / PROGRESS / f"{rank}.json", json.dumps({"done": done, "total": total}))


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
    from ..errors import one_line
    from ..request.image_file import model_identity

    rank, processes = state.process_index, state.num_processes
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTS).mkdir(exist_ok=True)
    (out / PROGRESS).mkdir(exist_ok=True)
    resolve(jobs, pipe, model_identity(pipe.unet.config))
    todo = pending(jobs, out, output_format)
    if state.is_main_process:
        for stale in itertools.chain(out.glob(f".*{TEMPORARY}"), (out / PROGRESS).iterdir()):
            stale.unlink(missing_ok=True)  # a killed run's: this run holds the folder
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
