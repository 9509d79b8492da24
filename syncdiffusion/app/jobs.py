"""One GPU job at a time: a line of panorama jobs, one worker making them, and what each job's
watchers (the browser tabs following it) are told: place in line, steps, result or error.

A job nobody watches any more (its tab closed) is dropped from the line, or stopped, once
`abandon_after` seconds have passed without a watcher. A cancelled or abandoned job stops
before the next network call of the running step (each chunk of windows is one UNet call), not
only at the step's end.

Memory stays bounded: at most `max_waiting` jobs wait (another is refused, `LineFull`), a job
that has ended keeps only its events (its request, a decoded condition image included, is let
go), and only the last `max_kept` ended jobs are kept for a late watcher. Each file gets a name
no other file in the output folder has, reserved by creating it (`open(..., "xb")`), so
neither a restarted app nor a second app on the same folder overwrites one.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.sync_schedule import sync_schedule
from ..errors import InputError, WeightsError, one_line
from ..request.image_file import save_image

logger = logging.getLogger(__name__)

SUFFIXES = {"png": ".png", "webp": ".webp", "jpg": ".jpg"}
FINAL = ("done", "error", "cancelled")
MAX_WAITING = 16
"""Jobs that may wait in line; each may hold a decoded condition image of up to 192 MiB."""
MAX_KEPT = 100
"""Ended jobs kept (their events only) for a watcher that comes late."""


class Cancelled(Exception):
    """Raised from the step callback or a network's call to stop a job that was cancelled or
    abandoned."""


class LineFull(Exception):
    """The line holds as many jobs as it may: try again later."""


@dataclass
class Job:
    """One panorama to make: its model (and ControlNet, if any), its checked request and its
    file's format."""

    model: str
    request: dict[str, Any]
    output_format: str
    output_quality: int
    controlnet: str | None = None
    id: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    events: list[dict[str, Any]] = field(default_factory=list)
    cancelled: bool = False
    watchers: int = 0
    last_watched: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        """Whether the job is done, failed or cancelled."""
        return bool(self.events) and self.events[-1]["state"] in FINAL


@dataclass
class Made:
    """A file the app made: where it is, and the name a download gives it."""

    path: Path
    name: str


class JobQueue:
    """The line of jobs and the one worker thread that makes them, one at a time.

    `load(model, controlnet)` gives the pipeline of a model folder's name with a ControlNet
    folder's name (or None); the last one loaded is kept.
    """

    def __init__(
        self,
        load: Callable[[str, str | None], Any],
        output_dir: Path,
        abandon_after: float = 10.0,
        max_waiting: int = MAX_WAITING,
        max_kept: int = MAX_KEPT,
    ) -> None:
        self.load, self.output_dir, self.abandon_after = load, output_dir, abandon_after
        self.max_waiting, self.max_kept = max_waiting, max_kept
        self.jobs: dict[str, Job] = {}
        self.made: dict[str, Made] = {}  # what /files/ serves, by its unguessable token
        self.line: deque[Job] = deque()
        self.running: Job | None = None
        self.changed = threading.Condition()
        self._pipe: tuple[tuple[str, str | None], Any] | None = None
        self._count = 0
        threading.Thread(target=self._work, name="panorama-worker", daemon=True).start()

    # --- what the server asks -------------------------------------------------------------

    def check_room(self) -> None:
        """Raise `LineFull` where `max_waiting` jobs wait already."""
        if len(self.line) >= self.max_waiting:
            raise LineFull(
                f"{len(self.line)} jobs wait in line already, as many as the app takes "
                f"({self.max_waiting} jobs); try again when one has run"
            )

    def submit(self, job: Job) -> Job:
        """Put `job` at the end of the line; `LineFull` where there is no room."""
        with self.changed:
            self.check_room()
            ended = [key for key, kept in self.jobs.items() if kept.finished]
            for key in ended[: max(0, len(ended) - self.max_kept + 1)]:
                del self.jobs[key]
            self.jobs[job.id] = job
            self.line.append(job)
            self._tell(job, {"state": "queued", "ahead": self._ahead(job)})
        return job

    def cancel(self, job: Job) -> None:
        """Stop `job`: out of the line at once, or at its next network call if running."""
        with self.changed:
            job.cancelled = True
            if job in self.line:
                self.line.remove(job)
                self._tell(job, {"state": "cancelled"})
            self.changed.notify_all()

    def watch(self, job: Job, heartbeat: float = 1.0) -> Iterator[dict[str, Any] | None]:
        """The job's events as they come, and None every `heartbeat` seconds without one (a
        chance to find that the watcher is gone). Counts the watcher while it iterates."""
        with self.changed:
            job.watchers += 1
        seen, ahead = 0, None
        try:
            while True:
                with self.changed:
                    if seen == len(job.events):
                        self.changed.wait(heartbeat)
                    new, seen = job.events[seen:], len(job.events)
                    now_ahead = self._ahead(job) if job in self.line else None
                if now_ahead is not None and now_ahead != ahead and not new:
                    new = [{"state": "queued", "ahead": now_ahead}]
                ahead = now_ahead if now_ahead is not None else ahead
                yield from new or [None]
                if new and new[-1]["state"] in FINAL:
                    return
        finally:
            with self.changed:
                job.watchers -= 1
                job.last_watched = time.monotonic()

    # --- the worker -----------------------------------------------------------------------

    def _ahead(self, job: Job) -> int:
        """How many jobs will run before `job`: those before it in line, and the running one."""
        return self.line.index(job) + (self.running is not None)

    def _abandoned(self, job: Job) -> bool:
        with self.changed:
            unwatched = job.watchers == 0
            return unwatched and time.monotonic() - job.last_watched > self.abandon_after

    def _tell(self, job: Job, event: dict[str, Any]) -> None:
        with self.changed:
            job.events.append(event)
            if event["state"] in FINAL:
                job.request = {}  # what the page needs is in the events
            self.changed.notify_all()

    def _next(self) -> Job:
        with self.changed:
            while True:
                while not self.line:
                    self.changed.wait()
                job = self.line.popleft()
                if not job.cancelled and not self._abandoned(job):
                    self.running = job
                    self.changed.notify_all()  # everyone in line moves up one
                    return job
                job.cancelled = True
                self._tell(job, {"state": "cancelled"})

    def _work(self) -> None:
        while True:
            job = self._next()
            try:
                self._tell(job, self._make(job))
            except Cancelled:
                self._tell(job, {"state": "cancelled"})
            except (InputError, WeightsError, MemoryError) as error:
                self._tell(job, {"state": "error", "message": str(error)})
            except Exception as error:  # the app stays up; the log keeps the traceback
                logger.exception("panorama job %s failed", job.id)
                self._tell(job, {"state": "error", "message": one_line(error)})
            finally:
                with self.changed:
                    self.running = None
                    self.changed.notify_all()

    def _pipeline(self, key: tuple[str, str | None]) -> Any:
        if self._pipe is None or self._pipe[0] != key:
            self._pipe = None  # free the last model before loading the next
            self._pipe = (key, self.load(*key))
        return self._pipe[1]

    def _reserve(self, seed: int, suffix: str) -> Path:
        """A new file `panorama-N-seedS.suffix` of the output folder, created empty: the first
        N from this app's count that no file (of an earlier run, or of another app) has."""
        number = self._count
        while True:
            number += 1
            path = self.output_dir / f"panorama-{number}-seed{seed}{suffix}"
            try:
                path.open("xb").close()
            except FileExistsError:
                continue
            self._count = number
            return path

    def _make(self, job: Job) -> dict[str, Any]:
        request, key = job.request, (job.model, job.controlnet)
        if self._pipe is None or self._pipe[0] != key:
            self._tell(job, {"state": "loading", "model": job.model, "controlnet": job.controlnet})
        pipe = self._pipeline(key)
        schedule = sync_schedule(request)
        steps = request["num_inference_steps"]
        synced = [i for i in range(steps) if schedule.active(i)]
        self._tell(job, {"state": "running", "steps": steps, "synced": synced})
        start = time.monotonic()

        def progress(state: dict[str, Any]) -> None:
            done = state["step"] + 1
            elapsed = time.monotonic() - start
            eta = elapsed / done * (state["steps"] - done)
            self._tell(
                job,
                {
                    "state": "step",
                    "step": done,
                    "steps": state["steps"],
                    "sync": bool(state["sync"]),
                    "eta": round(eta, 1),
                },
            )
            if job.cancelled or self._abandoned(job):
                raise Cancelled

        def interrupt(module: Any, args: Any) -> None:
            if job.cancelled or self._abandoned(job):
                raise Cancelled

        if job.cancelled or self._abandoned(job):
            raise Cancelled
        # Checked before each call of the denoising networks too: a step of many windows is
        # many calls, and may take a minute on a CPU.
        networks = [getattr(pipe, name, None) for name in ("unet", "controlnet")]
        hooks = [n.register_forward_pre_hook(interrupt) for n in networks if n is not None]
        try:
            image = pipe(**request, callback=progress)
        finally:
            for hook in hooks:
                hook.remove()
        path = self._reserve(request["seed"], SUFFIXES[job.output_format])
        name = path.name
        token = secrets.token_urlsafe(16) + SUFFIXES[job.output_format]
        parameters = image.info["parameters"]
        try:
            save_image(image, path, parameters, job.output_format, job.output_quality)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        with self.changed:
            self.made[token] = Made(path, name)
        return {
            "state": "done",
            "file": f"/files/{token}",
            "name": name,
            "width": image.width,
            "height": image.height,
            "seed": str(request["seed"]),
            "loop_closure": request["loop_closure"],
            "seconds": round(time.monotonic() - start, 1),
        }
