"""The app's HTTP server: its own page and static files, a small JSON API, and the files it made.

Nothing else is served: the static files are a list made at start-up and the made files a
table of unguessable names, so no path in a URL ever reaches the disk. A request whose Host
is not the address the app listens on is refused (a web page cannot reach it by DNS
rebinding), and the API takes JSON only (a page on another site cannot post a form to it).
"""

from __future__ import annotations

import json
import logging
import mimetypes
import secrets
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import WeightsError, one_line
from ..models.weights import check_controlnet, check_controlnet_fits
from ..request.image_file import read_parameters
from .form import (
    MAX_UPLOAD,
    FormError,
    controlnet_folders,
    folder_geometry,
    form_values,
    model_folders,
    model_form,
    output_form,
    read_form,
)
from .jobs import Job, JobQueue

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
# A form: two prompts of at most 10,000 characters and a few numbers, and a condition image of
# at most MAX_UPLOAD bytes in base64 (4/3 of its size).
MAX_BODY = (1 << 20) + (MAX_UPLOAD + 2) // 3 * 4
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Only this app's own files: the page works without the internet and loads nothing else.
    # Pannellum draws with inline styles, and reads the panorama into a blob: URL.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
    "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
}


def static_files(root: Path = STATIC_DIR) -> dict[str, Path]:
    """The page's files by URL path, listed once: `/` is index.html."""
    files = {"/static/" + p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
    files["/"] = root / "index.html"
    return files


class App:
    """What the server serves: the weights folder's models, the job line and the made files."""

    def __init__(self, weights_dir: Path, default_model: str, jobs: JobQueue) -> None:
        self.weights_dir, self.default_model, self.jobs = weights_dir, default_model, jobs
        self.static = static_files()

    def models(self) -> dict[str, Any]:
        """The model and ControlNet pickers, each model's form, and the largest upload."""
        names = model_folders(self.weights_dir)
        default = self.default_model if self.default_model in names else names[0]
        return {
            "models": [model_form(self.weights_dir / name) for name in names],
            "default_model": default,
            "controlnets": controlnet_folders(self.weights_dir),
            "output": output_form(),
            "max_upload": MAX_UPLOAD,
        }

    def submit(self, body: dict[str, Any]) -> Job:
        """A job for a submitted form; `FormError` where the library refuses it."""
        model = body.get("model")
        if model not in model_folders(self.weights_dir):
            raise FormError(f"model must be a folder in the weights folder; got {model!r}", {})
        controlnet = body.get("controlnet")
        if controlnet is not None:
            self._check_controlnet(model, controlnet)
        fields = body.get("inputs")
        if not isinstance(fields, dict):
            raise FormError("inputs must be an object of the form's fields", {})
        if body.get("random_seed"):
            fields = {**fields, "seed": secrets.randbelow(2**32)}
        geometry = folder_geometry(self.weights_dir / model)
        request, output_format, output_quality = read_form(fields, geometry, controlnet is not None)
        job = Job(model, request, output_format, output_quality, controlnet)
        return self.jobs.submit(job)

    def _check_controlnet(self, model: str, controlnet: Any) -> None:
        """Refuse a ControlNet that is not a folder of controlnet/, is incomplete, or does not
        fit `model` (as `from_pretrained` would, naming both folders), before the job waits."""
        if controlnet not in controlnet_folders(self.weights_dir):
            problem = (
                "controlnet must be a folder in the weights folder's controlnet/ (or none); "
                f"got {controlnet!r}"
            )
            raise FormError(problem, {"controlnet": problem})
        try:
            folder = check_controlnet(self.weights_dir, controlnet)
            check_controlnet_fits(self.weights_dir / model, folder)
        except WeightsError as error:
            raise FormError(str(error), {"controlnet": str(error)}) from None


class Handler(BaseHTTPRequestHandler):
    """One request to the app (`server.app` is the `App`)."""

    server: AppServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    # --- answers --------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**SECURITY_HEADERS, **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        body = json.dumps(value).encode()
        self._send(status, body, "application/json", **{"Cache-Control": "no-store"})

    def _refuse(self, status: HTTPStatus, why: str = "") -> None:
        self._json(status, {"error": why or status.phrase})

    def _file(self, path: Path, **headers: str) -> None:
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        self._send(HTTPStatus.OK, path.read_bytes(), kind, **headers)

    def _host_allowed(self) -> bool:
        host = self.headers.get("Host", "")
        allowed = self.server.allowed_hosts
        return allowed is None or host in allowed

    # --- routes ---------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if not self._host_allowed():
            return self._refuse(HTTPStatus.FORBIDDEN, "unknown Host")
        app, path = self.server.app, urlsplit(self.path).path
        if path in app.static:
            return self._file(app.static[path])
        if path == "/api/models":
            return self._json(HTTPStatus.OK, app.models())
        parts = path.split("/")
        if len(parts) == 3 and parts[1] == "files" and parts[2] in app.jobs.made:
            return self._file(app.jobs.made[parts[2]].path, **{"Cache-Control": "no-store"})
        if len(parts) == 4 and parts[1:3] == ["api", "parameters"] and parts[3] in app.jobs.made:
            return self._parameters(app.jobs.made[parts[3]].path)
        if job := self._job(parts, "events"):
            return self._events(job)
        return self._refuse(HTTPStatus.NOT_FOUND)

    def do_POST(self) -> None:
        if not self._host_allowed():
            return self._refuse(HTTPStatus.FORBIDDEN, "unknown Host")
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self._refuse(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "the API takes JSON")
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or not 0 < int(length) <= MAX_BODY:
            self.close_connection = True  # its body, unread, must not be taken for a request
            return self._refuse(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"a request must have a length of 1 byte to {MAX_BODY >> 20} MiB (a condition "
                f"image at most {MAX_UPLOAD >> 20} MiB); got {length or 'none'}",
            )
        length = int(length)
        try:
            body = json.loads(self.rfile.read(length))
        except (ValueError, RecursionError):  # not JSON, or nested past Python's stack
            return self._refuse(HTTPStatus.BAD_REQUEST, "the body is not JSON")
        app, path = self.server.app, urlsplit(self.path).path
        parts = path.split("/")
        if path == "/api/jobs" and isinstance(body, dict):
            try:
                job = app.submit(body)
            except FormError as error:
                return self._json(
                    HTTPStatus.BAD_REQUEST, {"error": str(error), "fields": error.fields}
                )
            except Exception as error:  # the app stays up; the log keeps the traceback
                logger.exception("a submitted form failed")
                return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": one_line(error)})
            return self._json(HTTPStatus.OK, {"job": job.id})
        if job := self._job(parts, "cancel"):
            app.jobs.cancel(job)
            return self._json(HTTPStatus.OK, {"job": job.id})
        return self._refuse(HTTPStatus.NOT_FOUND)

    def _job(self, parts: list[str], action: str) -> Job | None:
        """The job of `/api/jobs/ID/action`, if that is the path and ID a job's."""
        if len(parts) == 5 and parts[1:3] == ["api", "jobs"] and parts[4] == action:
            return self.server.app.jobs.jobs.get(parts[3])
        return None

    def _parameters(self, path: Path) -> None:
        """A made file's inputs read back as `--from-png` reads them, as the form's fields; its
        ControlNet, and its condition image's record (size and SHA-256), where it had one."""
        saved = read_parameters(path)
        self._json(
            HTTPStatus.OK,
            {
                "fields": form_values(saved),
                "controlnet": saved.get("controlnet"),
                "control_image": saved.get("control_image"),
            },
        )

    def _events(self, job: Job) -> None:
        """The job's events as a server-sent event stream; a watcher that goes away is counted
        out (the job is dropped once nobody has watched it for a while)."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True
        try:
            for event in self.server.app.jobs.watch(job, self.server.heartbeat):
                text = ": still here\n\n" if event is None else f"data: {json.dumps(event)}\n\n"
                self.wfile.write(text.encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass


class AppServer(ThreadingHTTPServer):
    """The HTTP server of one `App`."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: App, heartbeat: float = 1.0) -> None:
        super().__init__(address, Handler)
        self.app, self.heartbeat = app, heartbeat
        host, port = address[0], self.server_address[1]
        self.allowed_hosts: set[str] | None = None  # any, where --host opened it to a network
        if host in LOCAL_HOSTS:
            self.allowed_hosts = {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]")}

    @property
    def url(self) -> str:
        """The address to open in a browser."""
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
