"""The app's HTTP server: its own page and static files, a small JSON API, and the files it made.

Nothing else is served: the static files are a list made at start-up and the made files a
table of unguessable names, so no path in a URL ever reaches the disk. What another web site's
page can send is refused:

- a Host that is neither an IP address, localhost, this machine's name nor an allowed name, on
  the app's port (DNS rebinding gives a page the app under its own site's name);
- a POST whose `Origin` is not the app's own, or whose `Sec-Fetch-Site` is not `same-origin`
  (a page may post to any site without asking), and a POST that is not JSON;
- and after any refusal the connection is closed, its body read and dropped first where it is
  small: the body of a refused request is never taken for the next request.

Each connection has a timeout (a silent client, or a body shorter than its Content-Length,
lets go of its thread) and there are at most `max_connections` at once; the others are
answered 503 at once and closed. Out of file descriptors (an open-file limit below the cap),
it waits for some to close rather than spinning on the connections it cannot accept.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import mimetypes
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import WeightsError, one_line
from ..models.folders import folder_problem
from ..models.weights import check_controlnet, check_controlnet_fits
from ..request.image_file import read_parameters
from ..request.presets import model_defaults
from .form import (
    MAX_UPLOAD,
    FormError,
    controlnet_folders,
    folder_geometry,
    form_values,
    lora_choices,
    model_folders,
    model_form,
    output_form,
    read_form,
)
from .jobs import Job, JobQueue, LineFull, Made

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
# A form: two prompts of at most 10,000 characters and a few numbers, and a condition image of
# at most MAX_UPLOAD bytes in base64 (4/3 of its size).
MAX_BODY = (1 << 20) + (MAX_UPLOAD + 2) // 3 * 4
# A refused request's body is read and dropped up to this size (its answer then reaches the
# client before the connection closes); a larger one is not read at all.
MAX_DRAINED = 1 << 20
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
CONNECTION_TIMEOUT = 30.0
"""Seconds a connection may stay silent, mid-request or between requests, before it is closed.
The page's event streams send a heartbeat every second, so they never come near it."""
MAX_CONNECTIONS = 64
"""Connections served at once, each on its own thread: a tab holds two or three."""
RETRY_AFTER = 30
"""Seconds the Retry-After of a full line or a turned-away connection asks a client to wait."""
# Python refuses to read an integer of more digits than this from text (sys.int_info).
_MAX_DIGITS = 4300
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
        """The model and ControlNet pickers, each complete model's form, the incomplete ones
        (a download under way or broken: their name and problem), and the largest upload."""
        forms, incomplete = [], []
        for name in model_folders(self.weights_dir):
            if problem := self.model_problem(name):
                incomplete.append({"name": name, "problem": problem})
            else:
                forms.append(model_form(self.weights_dir / name))
        names = [form["name"] for form in forms]
        default = self.default_model if self.default_model in names else next(iter(names), None)
        return {
            "models": forms,
            "incomplete": incomplete,
            "default_model": default,
            "controlnets": controlnet_folders(self.weights_dir),
            "output": output_form(),
            "max_upload": MAX_UPLOAD,
            "loras": lora_choices(self.weights_dir),
        }

    def submit(self, body: dict[str, Any]) -> Job:
        """A job for a submitted form; `FormError` where the library refuses it."""
        model = body.get("model")
        if model not in model_folders(self.weights_dir):
            raise FormError(f"model must be a folder in the weights folder; got {model!r}", {})
        if problem := self.model_problem(model):
            raise FormError(f"model {model!r} cannot be used: {problem}", {})
        self.jobs.check_room()  # before the form's condition image is decoded
        controlnet = body.get("controlnet")
        if controlnet is not None:
            self._check_controlnet(model, controlnet)
        fields = body.get("inputs")
        if not isinstance(fields, dict):
            raise FormError("inputs must be an object of the form's fields", {})
        if body.get("random_seed"):
            fields = {**fields, "seed": secrets.randbelow(2**32)}
        sd_dir = self.weights_dir / model
        request, output_format, output_quality = read_form(
            fields, folder_geometry(sd_dir), controlnet is not None, model_defaults(sd_dir)
        )
        job = Job(model, request, output_format, output_quality, controlnet)
        return self.jobs.submit(job)

    def model_problem(self, name: str) -> str | None:
        """What keeps model folder `name` from being used (one half downloaded, say), or None."""
        sd_dir = self.weights_dir / name
        if problem := folder_problem(sd_dir):
            return problem
        try:
            folder_geometry(sd_dir)
        except (OSError, ValueError, KeyError, TypeError) as error:
            return f"its UNet's or VAE's config cannot be read ({one_line(error)})"
        return None

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

    def setup(self) -> None:
        self.timeout = self.server.connection_timeout  # the socket's, set by setup()
        super().setup()

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

    def _json(self, status: int, value: Any, **headers: str) -> None:
        body = json.dumps(value).encode()
        self._send(status, body, "application/json", **{"Cache-Control": "no-store", **headers})

    def _refuse(self, status: HTTPStatus, why: str = "", **headers: str) -> None:
        """Answer `status` and close the connection, its body (where small) read and dropped:
        what follows a refused request's headers is never taken for the next request."""
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) <= MAX_DRAINED:
            with contextlib.suppress(OSError):  # gone, or silent past the timeout: closed too
                self.rfile.read(int(length))
        headers = {"Cache-Control": "no-store", "Connection": "close", **headers}
        body = json.dumps({"error": why or status.phrase}).encode()
        self._send(status, body, "application/json", **headers)

    def _file(self, path: Path, **headers: str) -> None:
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        self._send(HTTPStatus.OK, path.read_bytes(), kind, **headers)

    def _gone(self, made_name: str) -> None:
        self._json(
            HTTPStatus.NOT_FOUND,
            {"error": f"{made_name} is no longer on disk in the app's output folder"},
        )

    def _cross_site(self) -> str | None:
        """Why a state-changing request comes from another site's page, or None: a browser
        names the page's origin (`Origin`) and how it relates to the app's (`Sec-Fetch-Site`);
        a client that is no browser sends neither."""
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{self.headers.get('Host', '')}":
            return f"Origin {origin!r}"
        site = self.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return f"Sec-Fetch-Site {site!r}"
        return None

    # --- routes ---------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if not self.server.host_allowed(self.headers.get("Host", "")):
            return self._refuse(HTTPStatus.FORBIDDEN, self._unknown_host())
        if "Content-Length" in self.headers or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a body no GET reads must not be taken for a request
        app, path = self.server.app, urlsplit(self.path).path
        if path in app.static:
            return self._file(app.static[path])
        if path == "/api/models":
            return self._json(HTTPStatus.OK, app.models())
        parts = path.split("/")
        if len(parts) == 3 and parts[1] == "files" and parts[2] in app.jobs.made:
            made = app.jobs.made[parts[2]]
            try:
                return self._file(made.path, **{"Cache-Control": "no-store"})
            except OSError:
                return self._gone(made.name)
        if len(parts) == 4 and parts[1:3] == ["api", "parameters"] and parts[3] in app.jobs.made:
            return self._parameters(app.jobs.made[parts[3]])
        if job := self._job(parts, "events"):
            return self._events(job)
        return self._refuse(HTTPStatus.NOT_FOUND)

    def _unknown_host(self) -> str:
        return (
            f"Host {self.headers.get('Host', '')!r} is not this app's: a request must name it by "
            f"an IP address, localhost, this machine's name or an --allowed-host, with port "
            f"{self.server.server_address[1]}"
        )

    def do_POST(self) -> None:
        if not self.server.host_allowed(self.headers.get("Host", "")):
            return self._refuse(HTTPStatus.FORBIDDEN, self._unknown_host())
        if cross_site := self._cross_site():
            return self._refuse(
                HTTPStatus.FORBIDDEN,
                f"a cross-site request is refused ({cross_site}): the API takes requests from "
                "the app's own page only",
            )
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self._refuse(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "the API takes JSON")
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or not 0 < int(length) <= MAX_BODY:
            return self._refuse(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"a request must have a length of 1 byte to {MAX_BODY >> 20} MiB (a condition "
                f"image at most {MAX_UPLOAD >> 20} MiB); got {length or 'none'}",
            )
        length = int(length)
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            data = b""
        if len(data) < length:  # silent past the timeout, or gone
            return self._refuse(
                HTTPStatus.REQUEST_TIMEOUT,
                f"the body did not come whole: Content-Length announced {length} bytes, and "
                f"the connection closed or went silent ({self.timeout:g} s) before them",
            )
        try:
            body = json.loads(data, parse_int=_int)
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
            except LineFull as error:
                return self._json(
                    HTTPStatus.TOO_MANY_REQUESTS,
                    {"error": str(error)},
                    **{"Retry-After": str(RETRY_AFTER)},
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

    def _parameters(self, made: Made) -> None:
        """A made file's inputs read back as `--from-png` reads them, as the form's fields; its
        ControlNet, and its condition image's record (size and SHA-256), where it had one; the
        records of the image it started from and of its mask, where it had them."""
        try:
            saved = read_parameters(made.path)
        except (OSError, ValueError):  # deleted, or another file put in its place
            return self._gone(made.name)
        self._json(
            HTTPStatus.OK,
            {
                "fields": form_values(saved),
                "controlnet": saved.get("controlnet"),
                "control_image": saved.get("control_image"),
                # The image it started from and its mask, by record, where it had them.
                "images": {
                    name: saved[name]
                    for name in ("image", "mask")
                    if isinstance(saved.get(name), dict)
                },
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
        except OSError:  # gone, or not reading past the timeout
            pass


def _int(text: str) -> int | str:
    """A JSON integer; one of more digits than Python reads stays text, so the check of its
    input names it (width must be ...; got '999...') rather than the body being refused."""
    return int(text) if len(text) < _MAX_DIGITS else text


class AppServer(ThreadingHTTPServer):
    """The HTTP server of one `App`, on `address` (IPv4, or IPv6 where the host has a colon).

    Requests must name it, in their Host, by an IP address, localhost, this machine's name
    (where it listens beyond loopback) or one of `allowed_hosts`, with its port: a web page
    reaching it by DNS rebinding names its own site instead.
    """

    daemon_threads = True
    request_queue_size = 128  # connections waiting to be accepted: each is answered at once

    def __init__(
        self,
        address: tuple[str, int],
        app: App,
        heartbeat: float = 1.0,
        allowed_hosts: Iterable[str] = (),
        connection_timeout: float = CONNECTION_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.connection_timeout = connection_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, Handler)
        self.app, self.heartbeat = app, heartbeat
        names = {"localhost", *(name.lower().rstrip(".") for name in allowed_hosts)}
        if host not in LOCAL_HOSTS:  # others reach it by this machine's name too
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        self.host_names = names

    def host_allowed(self, header: str) -> bool:
        """Whether a request's Host names this app: an IP address (no name a page's site could
        rebind), or one of `host_names`, on the port it listens on (80 where none is given)."""
        if not header or any(c in header for c in "@/?#\\ "):
            return False
        try:
            parts = urlsplit("//" + header)
            name, port = (parts.hostname or "").rstrip("."), parts.port or 80
        except ValueError:
            return False
        if port != self.server_address[1]:
            return False
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name in self.host_names

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.1)  # out of file descriptors: wait for some to close, not spin
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread for the connection while fewer than `max_connections` are served; else a
        503 answer at once, and closed."""
        if not self._slots.acquire(blocking=False):
            body = json.dumps(
                {"error": "the app serves as many connections as it can; try again shortly"}
            ).encode()
            answer = (
                f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            try:
                request.settimeout(1.0)
                request.sendall(answer + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    @property
    def url(self) -> str:
        """The address to open in a browser."""
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
