"""Run the model behind the real Cog HTTP server (coglet) and talk to it, as Replicate would.

Used by the server tests and scripts/soak.py:

    with CogServer(weights_dir) as server:
        result = server.predict({"prompt": "a beach", "width": 1024})

As in an image built by `cog build`, the server validates every request against the schema
`cog build` would publish: coglet reads it from `.cog/openapi_schema.json` under its working
directory, so the server runs in a temporary folder holding that file (the project tree is
left as it is) and imports the project's code from the project root.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import requests
from PIL import Image

from syncdiffusion.replicate.schema import write_openapi_schema

# Where coglet looks for the schema, relative to its working directory (coglet's worker.rs).
SCHEMA_FILE = Path(".cog", "openapi_schema.json")


def project_folder(start: Path | None = None) -> Path:
    """The project checkout the predictors live in: `start` (default: the current folder) or
    the nearest folder above it holding cog.yaml. The package alone has no predictors."""
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "cog.yaml").is_file():
            return folder
    raise FileNotFoundError(
        f"no cog.yaml in {start} or above it: CogServer serves a predictor of the project's "
        "checkout; run from the project folder or pass project="
    )


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode_image(data_url: str) -> bytes:
    """The file in a `data:image/...;base64,...` output (png, webp or jpeg)."""
    header, _, data = data_url.partition(",")
    if not (header.startswith("data:image/") and header.endswith(";base64")):
        raise ValueError(f"not an image data URL: {data_url[:40]!r}")
    return base64.b64decode(data)


def decode_png(data_url: str) -> Image.Image:
    """The image in a `data:image/png;base64,...` output."""
    if not data_url.startswith("data:image/png;base64,"):
        raise ValueError(f"not a PNG data URL: {data_url[:40]!r}")
    return Image.open(io.BytesIO(decode_image(data_url)))


class CogServer:
    """`python -m cog.server.http` serving a predictor of the project on loopback, with its schema.

    `predictor` is cog.yaml's `run:` reference, relative to `project` (default: the checkout
    the current folder is in, `project_folder`).
    """

    def __init__(
        self,
        weights_dir: Path,
        setup_timeout: float = 300,
        predictor: str = "predict.py:Predictor",
        project: Path | None = None,
        **env: str,
    ) -> None:
        self.project = project_folder(project)
        self.weights_dir, self.setup_timeout, self.extra_env = weights_dir, setup_timeout, env
        self.predictor = predictor
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="cog-server-"))
        self.log_path = self.workdir / "server.log"
        self._final_logs = ""

    def __enter__(self) -> CogServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server and wait until its setup has finished (READY or SETUP_FAILED)."""
        file, cls = self.predictor.split(":")
        write_openapi_schema(self.project / file, self.workdir / SCHEMA_FILE, cls)
        env = {
            **os.environ,
            "SYNCDIFFUSION_WEIGHTS": str(Path(self.weights_dir).resolve()),
            "COG_PREDICT_TYPE_STUB": f"{self.project / file}:{cls}",
            # The worker runs in the temporary folder; the project's modules come from the project.
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(self.project), os.environ.get("PYTHONPATH")])
            ),
            "PORT": str(self.port),
            # coglet starts its worker with a bare `python`: this environment's must come first.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **self.extra_env,
        }
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=self.workdir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self.setup_timeout
        while self.health().get("status") not in ("READY", "SETUP_FAILED"):
            if self.process.poll() is not None:
                raise RuntimeError(f"the Cog server exited during setup:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Cog server was not ready in time:\n{self.logs()}")
            time.sleep(0.3)

    def stop(self) -> None:
        """Stop the server and its worker."""
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
        self._final_logs = self.logs()  # still readable once the folder is gone
        shutil.rmtree(self.workdir, ignore_errors=True)

    def logs(self) -> str:
        """What the server process printed so far (all of it, once stopped)."""
        if not self.log_path.exists():
            return self._final_logs
        return self.log_path.read_text(errors="replace")

    def openapi(self) -> requests.Response:
        """GET /openapi.json: the schema the server validates against (503 without one)."""
        return requests.get(f"{self.url}/openapi.json", timeout=10)

    def health(self) -> dict[str, Any]:
        """GET /health-check, or {} while the server does not answer yet."""
        try:
            return requests.get(f"{self.url}/health-check", timeout=10).json()
        except requests.ConnectionError:
            return {}

    def settled_status(self, timeout: float = 30) -> str | None:
        """The health-check status once the slot of the prediction that just ended is released.

        coglet answers a prediction before it frees its one slot, so for a moment after a
        result the status can still read BUSY (as `predict` meets 409 then).
        """
        deadline = time.monotonic() + timeout
        while (status := self.health().get("status")) == "BUSY" and time.monotonic() < deadline:
            time.sleep(0.1)
        return status

    def predict(
        self, inputs: dict[str, Any], prediction_id: str | None = None, timeout: float = 900
    ) -> dict[str, Any]:
        """Run one prediction and wait for its result (PUT /predictions/{id} when `id` is given)."""
        response = self.request(inputs, prediction_id, timeout)
        response.raise_for_status()
        return response.json()

    def request(
        self, inputs: dict[str, Any], prediction_id: str | None = None, timeout: float = 900
    ) -> requests.Response:
        """`predict`'s HTTP response as it comes: 422 for inputs the schema refuses."""
        body = {"input": inputs}
        deadline = time.monotonic() + 30
        while True:
            if prediction_id is None:
                response = requests.post(f"{self.url}/predictions", json=body, timeout=timeout)
            else:
                response = requests.put(
                    f"{self.url}/predictions/{prediction_id}",
                    json={**body, "id": prediction_id},
                    timeout=timeout,
                )
            # 409: the one slot is not yet released by the previous prediction; ask again.
            if response.status_code != 409 or time.monotonic() > deadline:
                return response
            time.sleep(0.1)

    def cancel(self, prediction_id: str) -> requests.Response:
        """POST /predictions/{id}/cancel."""
        return requests.post(f"{self.url}/predictions/{prediction_id}/cancel", timeout=10)

    def worker(self) -> psutil.Process:
        """The worker subprocess that holds the model (the server's Python child)."""
        children = psutil.Process(self.process.pid).children(recursive=True)
        workers = [c for c in children if "python" in c.name().lower()]
        if not workers:
            raise RuntimeError("the Cog server has no worker process")
        return max(workers, key=lambda c: c.memory_info().rss)

    def worker_rss(self) -> int:
        """Resident memory of the worker, in bytes."""
        return self.worker().memory_info().rss


def new_prediction_id() -> str:
    """An id for PUT /predictions/{id}, so that the prediction can be cancelled by it."""
    return f"pred-{uuid.uuid4().hex[:12]}"


def soak(server: CogServer, count: int, inputs: dict[str, Any]) -> list[tuple[float, int]]:
    """(seconds, worker RSS after) of `count` identical predictions; each must succeed."""
    runs, first_png = [], None
    for i in range(count):
        start = time.perf_counter()
        result = server.predict({**inputs})
        seconds = time.perf_counter() - start
        if result["status"] != "succeeded":
            raise RuntimeError(f"prediction {i + 1} {result['status']}: {result.get('error')}")
        png = decode_png(result["output"]).tobytes()
        if first_png is not None and png != first_png:
            raise RuntimeError(f"prediction {i + 1} differs from the first")
        first_png = first_png or png
        runs.append((seconds, server.worker_rss()))
        print(
            f"{i + 1:3d}  {seconds:7.2f} s  worker RSS {runs[-1][1] / 2**20:8.1f} MiB", flush=True
        )
    return runs


def verdict(runs: list[tuple[float, int]]) -> tuple[float, float]:
    """RSS growth from the 2nd to the last prediction, and the late/early time ratio."""
    growth = runs[-1][1] / runs[1][1] - 1
    times = [s for s, _ in runs[1:]]  # the first warms caches
    half = len(times) // 2
    drift = statistics.median(times[half:]) / statistics.median(times[:half])
    return growth, drift
