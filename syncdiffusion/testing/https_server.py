"""A loopback HTTPS server for tests that download: routes a test registers, requests counted.

    with HttpsServer() as server:
        server.serve("/a.safetensors", data)
        server.redirect("/old", server.url("/a.safetensors"))
        monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_file))
        ...  # fetch server.url("/old")
        assert server.requests["/a.safetensors"] == 1

`headers[path]` holds the last request's headers there (read in any case); an unregistered
path answers 404. The certificate is self-signed for 127.0.0.1 and localhost, made with the
`openssl` command (the project does not depend on `cryptography`). A client trusts it through
SSL_CERT_FILE, which `ssl.create_default_context()` and huggingface_hub's client both read; a
server in a subprocess is handed it the same way.
"""

from __future__ import annotations

import collections
import contextlib
import email.message
import http.server
import shutil
import ssl
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit


@dataclass
class Route:
    """What the server answers at one path.

    `length`: the Content-Length sent: True the body's true length, False none (the body then
    ends when the connection closes), a number to lie. `stall`: after `stall_after` bytes of
    the body, wait this many seconds (or until the server closes) before sending the rest.
    `trickle`: send the whole response, status line and headers too, a byte at a time, this
    many seconds apart (a server that is never silent long enough to time out)."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    length: bool | int = True
    stall: float = 0.0
    stall_after: int = 0
    trickle: float = 0.0


class HttpsServer:
    """A `ThreadingHTTPServer` on 127.0.0.1 behind TLS, in a daemon thread; see the module."""

    def __init__(self) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="https-server-"))
        self.ca_file = self._folder / "cert.pem"
        key_file = self._folder / "key.pem"
        make_certificate(self.ca_file, key_file)
        self.routes: dict[str, Route] = {}
        self.requests: collections.Counter[str] = collections.Counter()
        self.headers: dict[str, email.message.Message] = {}  # path -> the last request's
        self._closing = threading.Event()
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True  # a stalled request never holds up close()
        self._httpd.handle_error = lambda request, address: None  # clients that give up
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.ca_file, key_file)
        # The handshake in the request's thread: a client that never makes one stalls only it.
        self._httpd.socket = context.wrap_socket(
            self._httpd.socket, server_side=True, do_handshake_on_connect=False
        )
        self.port = self._httpd.server_address[1]
        # A short poll: close() waits for the loop to notice.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        """The https:// URL of `path` on this server (`host`: 127.0.0.1 or localhost)."""
        return f"https://{host}:{self.port}{path}"

    def serve(self, path: str, body: bytes = b"", **route: object) -> None:
        """Answer GET and HEAD at `path` with `body`; `route` holds Route's other fields."""
        self.routes[path] = Route(body, **route)  # type: ignore[arg-type]

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        """Answer `path` with a redirect to `location` (any URL, any scheme)."""
        self.routes[path] = Route(status=status, headers={"Location": location})

    def close(self) -> None:
        """Stop serving, release stalled requests and remove the certificate."""
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> HttpsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def make_certificate(cert_file: Path, key_file: Path) -> None:
    """Write a self-signed certificate for 127.0.0.1 and localhost, valid for two days, and its
    key, with the `openssl` command."""
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,digitalSignature,keyCertSign",
            "-addext", "extendedKeyUsage=serverAuth",
            "-keyout", str(key_file), "-out", str(cert_file),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip


def _handler(server: HttpsServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so a body without Content-Length ends at close.
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def _answer(self, send_body: bool) -> None:
            path = urlsplit(self.path).path
            server.requests[path] += 1
            server.headers[path] = self.headers
            route = server.routes.get(path, Route(b"not found", status=404))
            if route.trickle:
                self._trickle(route)
                return
            self.send_response(route.status)
            for key, value in route.headers.items():
                self.send_header(key, value)
            if route.length is not False:
                length = len(route.body) if route.length is True else route.length
                self.send_header("Content-Length", str(length))
            self.end_headers()
            if not send_body:
                return
            try:
                if route.stall:
                    self.wfile.write(route.body[: route.stall_after])
                    self.wfile.flush()
                    if server._closing.wait(route.stall):
                        return
                    self.wfile.write(route.body[route.stall_after :])
                else:
                    self.wfile.write(route.body)
            except OSError:
                pass  # the client gave up (what a test of a refusal expects)

        def _trickle(self, route: Route) -> None:
            head = f"HTTP/1.0 {route.status} Whatever\r\n"
            for key, value in {**route.headers, "Content-Length": len(route.body)}.items():
                head += f"{key}: {value}\r\n"
            with contextlib.suppress(OSError):
                for byte in (head + "\r\n").encode() + route.body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    if server._closing.wait(route.trickle):
                        return

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: pytest shows the test's own output

    return Handler
