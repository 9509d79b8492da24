"""A LoRA a request names, turned into a verified local .safetensors file.

A source is an https:// URL, a Hugging Face Hub repository id (owner/name, optionally
/path/in/repo.safetensors) or, where the caller allows it, a local file. The Cog server runs
this on strangers' input, so a URL is fetched warily: https at every hop of at most
MAX_REDIRECTS redirects, from public addresses only (each host resolved once, its addresses
vetted, and the connection made to a vetted address: a second DNS answer cannot point it
elsewhere), within a size cap, a timeout per read and a deadline for the whole download. A file
is used only if its safetensors header checks out; nothing is ever unpickled.

Downloads land in a bounded cache (weights/lora/, LORA_FOLDER): per source, `<key>.safetensors`
and a sidecar `<key>.json` recording its sha256, checked again on every use; the least recently
used entries make room for a new one. Processes sharing the folder take turns under a file lock.

Read at each call: SYNCDIFFUSION_LORA_ALLOWED_HOSTS (hosts exempt from the address check, for
tests and private mirrors; still https), SYNCDIFFUSION_LORA_TIMEOUT (seconds per connect and
read, 30), SYNCDIFFUSION_LORA_DEADLINE (seconds for a whole download, 600),
SYNCDIFFUSION_LORA_MAX_BYTES (per file, 1 GiB), SYNCDIFFUSION_LORA_CACHE_BYTES (the cache, 10
GiB); for the hub, HF_ENDPOINT and HF_HUB_OFFLINE, as huggingface_hub reads them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import ipaddress
import json
import math
import os
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

from ..errors import InputError, one_line, shown
from ..version import __version__
from .folders import sha256_of, share
from .weights import OFFLINE_ENV, hub_offline

LORA_FOLDER = "lora"  # the cache's folder under the weights folder
ALLOWED_HOSTS_ENV = "SYNCDIFFUSION_LORA_ALLOWED_HOSTS"
TIMEOUT_ENV, DEADLINE_ENV = "SYNCDIFFUSION_LORA_TIMEOUT", "SYNCDIFFUSION_LORA_DEADLINE"
MAX_BYTES_ENV, CACHE_BYTES_ENV = "SYNCDIFFUSION_LORA_MAX_BYTES", "SYNCDIFFUSION_LORA_CACHE_BYTES"
DEFAULT_TIMEOUT, DEFAULT_DEADLINE = 30.0, 600.0  # seconds
DEFAULT_MAX_BYTES, DEFAULT_CACHE_BYTES = 2**30, 10 * 2**30
MAX_SOURCE_LENGTH = 2_000  # characters
MAX_REDIRECTS = 5
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header
HUB_DEFAULT_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' trainers save
STALE_PART_SECONDS = 3600  # a .part file this old was left by a process that died
USER_AGENT = f"syncdiffusion/{__version__}"

# Bits per element of each dtype safetensors defines (F4 and F6 pack several to a byte).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip

_HUB_FORM = "a Hugging Face repository id (owner/name, optionally /file.safetensors)"
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_REPO_PART = re.compile(r"[A-Za-z0-9._-]{1,96}")
_KEY = re.compile(r"[0-9a-f]{16}-[A-Za-z0-9._-]+")
_REDIRECTS = {301, 302, 303, 307, 308}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv4 addresses as an IPv6-only network sees them
_CHUNK = 1 << 20


@dataclass(frozen=True)
class LoraFile:
    """A LoRA ready to load: where it is, and what its bytes are."""

    source: str  # what the user gave, as given
    path: Path  # the verified local .safetensors file
    sha256: str  # hex digest of the file's bytes
    size: int  # bytes


def fetch_lora(source: str, name: str, cache_dir: Path, local_files: bool = True) -> LoraFile:
    """The verified local file of LoRA `source`, given as input `name`; InputError if refused.

    An https:// URL or a hub repository id is fetched into `cache_dir` (created if missing)
    unless an intact copy is there; a damaged copy is fetched again. A local file is read only
    where `local_files` (the CLI, the library; never a server) and checked where it is; a file
    a person put in `cache_dir` may be named by its file name alone (`folder_loras`)."""
    given = _Given(name, source)
    if isinstance(source, str) and source in folder_loras(cache_dir):
        parsed = _Source("local", str(Path(cache_dir) / source))
    else:
        parsed = _parse(given, local_files)
    if parsed.kind == "local":
        path = Path(parsed.text)
        check_safetensors(path, name, source)
        try:
            return LoraFile(source, path.resolve(), sha256_of(path), path.stat().st_size)
        except OSError as exc:
            raise given.refuse(f"cannot be read ({one_line(exc)})") from exc
    limits = _Limits.from_env()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(parsed)
    file, sidecar = cache_dir / f"{key}.safetensors", cache_dir / f"{key}.json"
    with _locked(cache_dir):
        _remove_stale_parts(cache_dir)
        record = _read_record(sidecar)
        if record and record["source"] == parsed.text and _intact(file, record, name, source):
            _write_record(sidecar, {**record, "last_used": time.time()})
            return LoraFile(source, file, record["sha256"], record["size"])
        _remove(file, sidecar)  # absent, damaged or changed: fetched afresh
        return _fetch(given, parsed, cache_dir, key, limits, local_files)


def cached_loras(cache_dir: Path) -> list[LoraFile]:
    """The cache's entries (for an app's picker), most recently used first; entries whose file
    is missing, of another size than recorded or no safetensors file are left out. The bytes are
    not hashed here (that would read the whole cache): `fetch_lora` does, on every use."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    found = []
    for sidecar in cache_dir.glob("*.json"):
        file = cache_dir / f"{sidecar.stem}.safetensors"
        record = _read_record(sidecar) if _KEY.fullmatch(sidecar.stem) else None
        if record is None:
            continue
        try:
            if file.stat().st_size != record["size"]:
                continue
            check_safetensors(file, "lora", record["source"])
        except (OSError, InputError):
            continue
        lora = LoraFile(record["source"], file, record["sha256"], record["size"])
        found.append((record["last_used"], lora))
    return [lora for _, lora in sorted(found, key=lambda pair: pair[0], reverse=True)]


def folder_loras(cache_dir: Path) -> list[str]:
    """The .safetensors files a person put in the LoRA folder themselves (not the cache's
    downloads), by name: a request may name one by its file name alone, even where local files
    are not read (`fetch_lora`)."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    return sorted(
        path.name
        for path in cache_dir.glob("*.safetensors")
        if path.is_file() and not _KEY.fullmatch(path.stem)
    )


def check_safetensors(path: Path, name: str, source: str) -> None:
    """Raise InputError unless `path` is a complete safetensors file: an 8-byte header length,
    a JSON header whose tensors have known dtypes, sizes that match their shapes, and data that
    fills the rest of the file exactly. Reads the header only; never unpickles anything."""
    given = _Given(name, source)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(8)
            length = int.from_bytes(first, "little")
            if len(first) < 8:
                raise _not_safetensors(given, first, f"it is only {size} bytes")
            if length > min(MAX_HEADER_BYTES, size - 8):
                limit = "more than 100 MB" if length > MAX_HEADER_BYTES else f"in {size:,} bytes"
                detail = f"its first 8 bytes give a header of {length:,} bytes, {limit}"
                raise _not_safetensors(given, first, detail)
            raw = f.read(length)
    except OSError as exc:
        raise given.refuse(f"cannot be read ({one_line(exc)})") from exc
    try:
        # A header is an object (safetensors insists on the "{"); deep nesting is not JSON here.
        header = json.loads(raw.decode("utf-8")) if raw[:1] == b"{" else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise _not_safetensors(given, first, "its header is not a JSON object")
    _check_header(given, header, size, 8 + length)


def address_problem(address: str) -> str | None:
    """Why the server does not connect to `address` (an IP address as getaddrinfo gives it), as
    "a loopback address" and the like; None for a public address. An IPv4 address inside an
    IPv6 one (mapped, NAT64, 6to4) is judged too."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope (fe80::1%eth0) aside
    judged: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # the IPv4 address itself is what the socket reaches
            judged = [ip.ipv4_mapped]
        elif ip in _NAT64:
            judged = [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
        elif ip.sixtofour is not None:
            judged.append(ip.sixtofour)
    for each in judged:
        inside = "" if each == ip else f" (inside {ip})"
        for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
            if getattr(each, f"is_{kind}"):
                return f"a {kind.replace('_', '-')} address{inside}"
        if not each.is_global:  # shared (100.64/10) and the like
            return f"not a public address{inside}"
    return None


# --- sources --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Given:
    """An input as the user gave it, for the messages that refuse it."""

    name: str
    source: str

    def refuse(self, problem: str) -> InputError:
        return InputError(f"{self.name} {shown(self.source)} {problem}")


@dataclass(frozen=True)
class _Source:
    kind: str  # "url", "hub" or "local"
    text: str  # the source without surrounding blanks
    repo_id: str = ""
    filename: str | None = None  # in the repository; None: the one to choose


def _parse(given: _Given, local_files: bool) -> _Source:
    if local_files:
        forms = f"an https:// URL, {_HUB_FORM} or a local .safetensors file"
    else:
        forms = f"an https:// URL or {_HUB_FORM}"

    def wrong(got: str) -> InputError:
        return given.refuse(f"must be {forms}; got {got}")

    if not isinstance(given.source, str):
        raise wrong(f"a {type(given.source).__name__}")
    text = given.source.strip()
    if not text:
        raise wrong("nothing")
    if len(text) > MAX_SOURCE_LENGTH:
        raise wrong(f"{len(text):,} characters, more than the {MAX_SOURCE_LENGTH:,} allowed")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise wrong("control characters")
    if scheme := _SCHEME.match(text):
        if scheme.group(1).lower() != "https":
            raise wrong(f"a {scheme.group(1).lower()}:// URL")
        return _Source("url", text)
    # Only a caller that reads local files looks at the disk: a server does not say what exists.
    if local_files and os.path.isfile(text):
        return _Source("local", text)
    repo_id, filename, problem = _hub_parts(text)
    if problem is None:
        return _Source("hub", text, repo_id, filename)
    if not local_files and not text.startswith(("/", ".", "~")) and "/" in text:
        raise wrong(f"a repository id that is not valid: {problem}")
    if not local_files:
        raise wrong("something else: this server does not read local files")
    raise wrong(f"no such file, nor a valid repository id ({problem})")


def _hub_parts(text: str) -> tuple[str, str | None, str | None]:
    """(repository id, file in it or None, what is wrong or None) of `owner/name[/file]`."""
    parts = text.split("/")
    if len(parts) < 2:
        return "", None, "a repository id is owner/name"
    for what, part in (("owner", parts[0]), ("name", parts[1])):
        if not _REPO_PART.fullmatch(part):
            return "", None, f"its {what} must be 1 to 96 of A-Z a-z 0-9 . _ -"
        if ".." in part or part[0] in ".-" or part[-1] in ".-":
            return "", None, f"its {what} may not hold '..' nor start or end with '.' or '-'"
    repo_id, path = f"{parts[0]}/{parts[1]}", parts[2:]
    if not path:
        return repo_id, None, None
    if any(p in ("", ".", "..") or "\\" in p for p in path):
        return "", None, "a file in it is a path of names, without '', '.', '..' or '\\'"
    if not path[-1].endswith(".safetensors"):
        return "", None, "a file in it must be a .safetensors file"
    return repo_id, "/".join(path), None


def _cache_key(source: _Source) -> str:
    """The first 16 hex digits of the source's sha256 and a short name a person recognises."""
    if source.kind == "url":
        short = unquote(urlsplit(source.text).path).rsplit("/", 1)[-1]
    else:
        short = (source.filename or source.repo_id).rsplit("/", 1)[-1]
    short = re.sub(r"[^A-Za-z0-9._-]+", "_", short).removesuffix(".safetensors")
    digest = hashlib.sha256(source.text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{digest}-{short.strip('._-')[:48] or 'lora'}"


# --- limits ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Limits:
    timeout: float  # seconds per connect and per read
    deadline: float  # seconds for a whole download
    max_bytes: int  # per file
    cache_bytes: int  # the whole cache

    @classmethod
    def from_env(cls) -> _Limits:
        return cls(
            _positive(TIMEOUT_ENV, DEFAULT_TIMEOUT),
            _positive(DEADLINE_ENV, DEFAULT_DEADLINE),
            int(_positive(MAX_BYTES_ENV, DEFAULT_MAX_BYTES)),
            int(_positive(CACHE_BYTES_ENV, DEFAULT_CACHE_BYTES)),
        )


def _positive(env: str, default: float) -> float:
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{env} must be a positive number; got {text!r}")
    return value


def _check_size(given: _Given, size: int, limits: _Limits, said: str) -> None:
    """Refuse a file of `size` bytes (`said`: how it is known) that no cache entry may be."""
    if size > limits.max_bytes:
        raise given.refuse(
            f"is {size:,} bytes ({said}), more than the {limits.max_bytes:,} a LoRA may be here; "
            f"{MAX_BYTES_ENV} raises the cap"
        )
    if size > limits.cache_bytes:
        raise given.refuse(
            f"is {size:,} bytes ({said}), more than the whole LoRA cache may hold "
            f"({CACHE_BYTES_ENV}={limits.cache_bytes:,} bytes)"
        )


# --- the cache ------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    # flock holds per open file, so threads of one process take turns as processes do.
    with open(cache_dir / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_stale_parts(cache_dir: Path) -> None:
    cutoff = time.time() - STALE_PART_SECONDS
    for part in cache_dir.glob("*.part"):
        with contextlib.suppress(OSError):
            if part.lstat().st_mtime < cutoff:
                _remove(part)


def _remove(*paths: Path) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _read_record(sidecar: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    fields = {"source": str, "sha256": str, "size": int, "fetched": float, "last_used": float}
    ok = isinstance(record, dict) and all(
        isinstance(record.get(key), (int, float) if kind is float else kind)
        for key, kind in fields.items()
    )
    return record if ok else None


def _write_record(sidecar: Path, record: dict[str, Any]) -> None:
    # Whole or not at all: a reader never sees half a record.
    written = sidecar.with_name(f"{sidecar.name}.part")
    written.write_text(json.dumps(record, indent=1), encoding="utf-8")
    share(written)
    os.replace(written, sidecar)


def _intact(file: Path, record: dict[str, Any], name: str, source: str) -> bool:
    """Whether `file` still holds the bytes `record` names, and they are a safetensors file."""
    try:
        if file.stat().st_size != record["size"]:
            return False
        check_safetensors(file, name, source)
        return sha256_of(file) == record["sha256"]
    except (OSError, InputError):
        return False


def _evict(cache_dir: Path, keep: str, room: int, cap: int) -> None:
    """Remove the least recently used entries (never `keep`) until `room` more bytes fit."""
    entries: dict[str, tuple[float, int]] = {}  # key -> (last used, bytes)
    for path in cache_dir.iterdir():
        key, suffix = path.name.rsplit(".", 1) if "." in path.name else (path.name, "")
        if suffix not in ("json", "safetensors") or key == keep or not _KEY.fullmatch(key):
            continue
        record = _read_record(cache_dir / f"{key}.json")
        file = cache_dir / f"{key}.safetensors"
        size = file.stat().st_size if file.is_file() else 0
        entries[key] = (record["last_used"] if record else 0.0, size)  # half entries go first
    total = sum(size for _, size in entries.values())
    for key, (_, size) in sorted(entries.items(), key=lambda item: item[1][0]):
        if total + room <= cap:
            break
        _remove(cache_dir / f"{key}.safetensors", cache_dir / f"{key}.json")
        total -= size


def _fetch(
    given: _Given, source: _Source, cache_dir: Path, key: str, limits: _Limits, trusted: bool
) -> LoraFile:
    """Download `source` beside the cache, check it, make room, and move it in. `trusted`: the
    caller is the machine's own user, whose hub token may be sent."""
    handle, name = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}-", suffix=".part")
    os.close(handle)
    part, folder = Path(name), None
    try:
        if source.kind == "url":
            sha256, size = _download_url(given, source.text, part, limits)
        else:
            folder = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{key}-", suffix=".part"))
            os.replace(_download_hub(given, source, folder, limits, trusted), part)
            sha256, size = sha256_of(part), part.stat().st_size
        check_safetensors(part, given.name, given.source)
        _check_size(given, size, limits, "downloaded")
        _evict(cache_dir, key, size, limits.cache_bytes)
        share(part)
        file = cache_dir / f"{key}.safetensors"
        os.replace(part, file)
        now = time.time()
        record = {"source": source.text, "sha256": sha256, "size": size, "fetched": now}
        _write_record(cache_dir / f"{key}.json", {**record, "last_used": now})
        return LoraFile(given.source, file, sha256, size)
    finally:  # on success the file has moved, so this only clears what a failure left
        _remove(part, *([folder] if folder else []))


# --- https ----------------------------------------------------------------------------------


class _PinnedConnection(http.client.HTTPSConnection):
    """HTTPS to `host` at an address vetted beforehand: TCP to that address, TLS (SNI and the
    certificate) for the host name, so a second DNS answer cannot send it elsewhere."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        self.tls = ssl.create_default_context()  # reads SSL_CERT_FILE now; verifies the name
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.address = address
        self.tls_socket: ssl.SSLSocket | None = None

    def connect(self) -> None:
        raw = socket.create_connection((self.address, self.port), self.timeout)
        try:
            self.sock = self.tls_socket = self.tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise

    def cut(self) -> None:
        """End the connection from another thread: a blocked read returns at once."""
        if self.tls_socket is not None:
            with contextlib.suppress(OSError):  # the plain socket's shutdown, not TLS's
                socket.socket.shutdown(self.tls_socket, socket.SHUT_RDWR)


def _allowed_hosts() -> set[str]:
    return {_host_key(host) for host in os.environ.get(ALLOWED_HOSTS_ENV, "").split(",")} - {""}


def _download_url(given: _Given, url: str, part: Path, limits: _Limits) -> tuple[str, int]:
    """Stream `url` into `part`, following redirects; its sha256 and size."""
    deadline = time.monotonic() + limits.deadline
    for hop in range(MAX_REDIRECTS + 1):
        via = f"(redirected to {shown(url)}) " if hop else ""
        host, port, target = _vet_url(given, url, via)
        addresses = _resolve(given, host, port, via)
        conn = _connect(given, host, port, addresses, limits, deadline, via)
        # The watchdog holds the deadline where no read timeout can (a server trickling bytes).
        watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), conn.cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request("GET", target, headers={"User-Agent": USER_AGENT, "Connection": "close"})
            response = conn.getresponse()
            if response.status in _REDIRECTS:
                location = (response.getheader("Location") or "").strip()
                if not location:
                    raise given.refuse(f"{via}answered {response.status} without a Location")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise given.refuse(
                    f"{via}could not be downloaded: {host} answered HTTP {response.status} "
                    f"{response.reason}".rstrip()
                )
            return _stream(given, response, part, limits, deadline, via)
        except (OSError, http.client.HTTPException) as exc:
            raise _network_error(given, exc, host, limits, deadline, via) from exc
        finally:
            watchdog.cancel()
            conn.close()
    raise given.refuse(f"was redirected more than {MAX_REDIRECTS} times (last to {shown(url)})")


def _vet_url(given: _Given, url: str, via: str) -> tuple[str, int, str]:
    """(host, port, request target) of an https URL, or InputError."""
    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError as exc:
        raise given.refuse(f"{via}is not a URL that can be fetched ({one_line(exc)})") from exc
    if parts.scheme.lower() != "https":
        raise given.refuse(
            f"{via}is a {parts.scheme or 'relative'}:// URL: only https:// is fetched, "
            "at every redirect too"
        )
    if not parts.hostname:
        raise given.refuse(f"{via}names no host")
    # Only what http.client cannot send is quoted; the rest goes as the server wrote it.
    target = quote(parts.path or "/", safe="".join(map(chr, range(33, 127))))
    query = quote(parts.query, safe="".join(map(chr, range(33, 127))))
    return parts.hostname, port, target + (f"?{query}" if query else "")


def _resolve(given: _Given, host: str, port: int, via: str) -> list[str]:
    """The host's addresses, each vetted (unless the host is allowed by name), or InputError."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise given.refuse(
            f"{via}names host {host}, which does not resolve ({one_line(exc)})"
        ) from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
    if _host_key(host) in _allowed_hosts():
        return addresses
    for address in addresses:
        if problem := address_problem(address):
            raise given.refuse(
                f"{via}names host {host}, which resolves to {address}, {problem}: this server "
                f"does not fetch from its own network ({ALLOWED_HOSTS_ENV} lists hosts exempt)"
            )
    return addresses


def _host_key(host: str) -> str:
    """A host as the allow-list holds it: in lower case, an IP address in its usual form."""
    host = host.strip().strip("[]").lower()
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    return host


def _connect(
    given: _Given,
    host: str,
    port: int,
    addresses: list[str],
    limits: _Limits,
    deadline: float,
    via: str,
) -> _PinnedConnection:
    """A connection to the first of `addresses` that answers (all of them vetted)."""
    failure: Exception = OSError("no address")
    for address in addresses:
        conn = _PinnedConnection(host, port, address, limits.timeout)
        try:
            conn.connect()
            return conn
        except ssl.SSLError as exc:  # another address of the host would present the same
            conn.close()
            raise _network_error(given, exc, host, limits, deadline, via) from exc
        except OSError as exc:
            conn.close()
            failure = exc
    raise _network_error(given, failure, host, limits, deadline, via) from failure


def _stream(
    given: _Given,
    response: http.client.HTTPResponse,
    part: Path,
    limits: _Limits,
    deadline: float,
    via: str,
) -> tuple[str, int]:
    length = (response.getheader("Content-Length") or "").strip()
    expected = int(length) if length.isdigit() else None
    if expected is not None:
        _check_size(given, expected, limits, "its Content-Length")
    cap = min(limits.max_bytes, limits.cache_bytes)
    digest, size = hashlib.sha256(), 0
    with open(part, "wb") as out:
        while True:
            if time.monotonic() >= deadline:
                raise TimeoutError("deadline")
            chunk = response.read1(_CHUNK)  # one read: a slow server is stopped at the deadline
            if not chunk:
                break
            size += len(chunk)
            if size > cap:  # no Content-Length, or a false one
                _check_size(given, size, limits, "at least, counting what was read")
            digest.update(chunk)
            out.write(chunk)
    if time.monotonic() >= deadline:  # the watchdog cut it short
        raise TimeoutError("deadline")
    if expected is not None and size < expected:
        raise given.refuse(
            f"{via}is truncated: the server sent {size:,} of the {expected:,} bytes it announced"
        )
    return digest.hexdigest(), size


def _network_error(
    given: _Given, exc: Exception, host: str, limits: _Limits, deadline: float, via: str
) -> InputError:
    if time.monotonic() >= deadline:
        return given.refuse(
            f"{via}took longer than {limits.deadline:g} s to download from {host} ({DEADLINE_ENV})"
        )
    if isinstance(exc, TimeoutError):
        return given.refuse(
            f"{via}timed out: {host} sent nothing for {limits.timeout:g} s ({TIMEOUT_ENV})"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return given.refuse(
            f"{via}could not be downloaded: the certificate of {host} does not verify "
            f"({exc.verify_message})"
        )
    return given.refuse(f"{via}could not be downloaded from {host} ({one_line(exc)})")


# --- the Hugging Face Hub -------------------------------------------------------------------


def _download_hub(
    given: _Given, source: _Source, folder: Path, limits: _Limits, trusted: bool
) -> Path:
    """Download the LoRA of a hub repository into `folder`; the file's path there. Only a
    `trusted` caller's requests carry the machine's hub token: a server does not lend it to
    strangers (their LoRAs would then include its private and gated repositories)."""
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if hub_offline():
        raise given.refuse(
            f"is not in the LoRA cache, and {OFFLINE_ENV}="
            f"{os.environ.get(OFFLINE_ENV)} forbids downloading it from the Hugging Face Hub"
        )
    endpoint = os.environ.get("HF_ENDPOINT") or None  # None: huggingface_hub's own default
    token = None if trusted else False  # None: huggingface_hub's own (HF_TOKEN, the login)
    repo_id, filename = source.repo_id, source.filename
    try:
        if filename is None:
            files = huggingface_hub.HfApi(endpoint=endpoint, token=token).list_repo_files(repo_id)
            filename = _choose_file(given, files)
        url = huggingface_hub.hf_hub_url(repo_id, filename, endpoint=endpoint)
        size = huggingface_hub.get_hf_file_metadata(url, token=token, timeout=limits.timeout).size
        if size is not None:
            _check_size(given, size, limits, "as the hub lists it")
        path = huggingface_hub.hf_hub_download(
            repo_id,
            filename,
            local_dir=folder,
            endpoint=endpoint,
            token=token,
            etag_timeout=limits.timeout,
        )
    except InputError:
        raise
    except GatedRepoError as exc:
        raise given.refuse("is a gated repository this server has no access to") from exc
    except RepositoryNotFoundError as exc:
        raise given.refuse(
            "names no repository on the Hugging Face Hub (or a private one)"
        ) from exc
    except RemoteEntryNotFoundError as exc:
        raise given.refuse(f"names a file the repository {repo_id} does not have") from exc
    except Exception as exc:  # network and hub errors come in many types
        raise given.refuse(
            f"could not be downloaded from the Hugging Face Hub ({one_line(exc)})"
        ) from exc
    return Path(path)


def _choose_file(given: _Given, files: list[str]) -> str:
    """The LoRA of a repository: HUB_DEFAULT_FILE, else its only .safetensors file."""
    if HUB_DEFAULT_FILE in files:
        return HUB_DEFAULT_FILE
    found = [f for f in files if f.endswith(".safetensors")]
    if len(found) == 1:
        return found[0]
    listed = found or files
    names = ", ".join(listed[:10]) + (f" and {len(listed) - 10} more" if len(listed) > 10 else "")
    what = "several .safetensors files" if found else "no .safetensors file"
    raise given.refuse(
        f"is a repository with {what} and no {HUB_DEFAULT_FILE} ({names or 'no files'}): "
        "name the file, as owner/name/file.safetensors"
    )


# --- the safetensors header -----------------------------------------------------------------


def _not_safetensors(given: _Given, first: bytes, detail: str) -> InputError:
    zipped = first.startswith(b"PK\x03\x04")  # torch.save since PyTorch 1.6
    pickled = len(first) >= 2 and first[0] == 0x80 and 2 <= first[1] <= 5  # a bare pickle
    if zipped or pickled:
        return given.refuse(
            "is not a safetensors file: it looks like a PyTorch pickle (a .ckpt, .bin or .pt "
            "file), which is never loaded because unpickling runs code; convert it to "
            "safetensors"
        )
    return given.refuse(f"is not a safetensors file: {detail}")


def _check_header(given: _Given, header: dict[str, Any], size: int, start: int) -> None:
    """Each tensor's dtype, shape and offsets, and the data exactly filling the file after
    `start` (the header's end), as safetensors itself checks before it loads a file."""
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise given.refuse("has a __metadata__ that is not a mapping of text to text")
            continue
        tensor = f"tensor {shown(key, 80)}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise given.refuse(f"is not a safetensors file: {tensor} lacks dtype, shape or offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise given.refuse(
                f"has {tensor} of dtype {shown(dtype, 40)}, not one safetensors defines "
                f"({', '.join(DTYPE_BITS)})"
            )
        if not _ints(shape) or not _ints(offsets) or len(offsets) != 2:
            raise given.refuse(
                f"is not a safetensors file: {tensor} has a shape or offsets that are not "
                "whole numbers"
            )
        begin, end = offsets
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if begin > end or bits % 8 or end - begin != bits // 8:
            raise given.refuse(
                f"is not a safetensors file: {tensor} ({dtype}, shape {shape}) takes "
                f"{bits / 8:g} bytes, but its offsets {offsets} give {end - begin}"
            )
        spans.append((begin, end))
    if not spans:
        raise given.refuse("holds no tensors")
    spans.sort()
    declared = start + spans[-1][1]
    if declared > size:
        raise given.refuse(
            f"is truncated: the file is {size:,} bytes, its header says {declared:,}"
        )
    ends = [0] + [end for _, end in spans[:-1]]
    if any(begin != last for (begin, _), last in zip(spans, ends, strict=True)):
        raise given.refuse("is not a safetensors file: its tensors overlap or leave gaps")
    if declared < size:
        raise given.refuse(
            f"is not a safetensors file: it is {size:,} bytes, but its header says {declared:,}"
        )


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )
