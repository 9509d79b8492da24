"""LoRA sources turned into verified local files: what is refused and why, downloads from a
loopback HTTPS server (redirects, caps, stalls, truncation), the cache, and the hub's files."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file

from syncdiffusion.errors import InputError, shown
from syncdiffusion.models.lora_files import (
    ALLOWED_HOSTS_ENV,
    CACHE_BYTES_ENV,
    DEADLINE_ENV,
    MAX_BYTES_ENV,
    TIMEOUT_ENV,
    USER_AGENT,
    address_problem,
    cached_loras,
    check_safetensors,
    fetch_lora,
    folder_loras,
)
from syncdiffusion.testing.https_server import HttpsServer

NAME = "lora_weights"


def lora_bytes(tmp_path: Path, seed: int = 0) -> bytes:
    """A small, valid safetensors file shaped as a LoRA's, as bytes."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "unet.a.lora.down.weight": torch.randn(4, 8, generator=generator),
        "unet.a.lora.up.weight": torch.randn(8, 4, generator=generator).half(),
    }
    path = tmp_path / f"made-{seed}.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path.read_bytes()


def raw_safetensors(header: object, data: bytes = b"") -> bytes:
    """A file of `header` (as JSON) and `data`, whatever they say."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def refused(match: str, source: str, *args, **kwargs) -> InputError:
    """The InputError fetch_lora raises for `source`, checked to quote it and to say `match`."""
    with pytest.raises(InputError, match=match) as caught:
        fetch_lora(source, NAME, *args, **kwargs)
    assert str(caught.value).startswith(f"{NAME} {shown(source)} "), caught.value
    return caught.value


def parts_left(cache: Path) -> list[Path]:
    return list(cache.glob("*.part")) if cache.exists() else []


@pytest.fixture
def server(monkeypatch):
    """A loopback HTTPS server the client trusts, on the allow-list by its address."""
    with HttpsServer() as running:
        monkeypatch.setenv("SSL_CERT_FILE", str(running.ca_file))
        monkeypatch.setenv(ALLOWED_HOSTS_ENV, "127.0.0.1")
        yield running


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "weights" / "lora"


# --- sources ------------------------------------------------------------------------------


def test_local_file_only_where_local_files_are_read(tmp_path, cache):
    path = tmp_path / "mine.safetensors"
    path.write_bytes(lora_bytes(tmp_path))
    lora = fetch_lora(str(path), NAME, cache)
    assert lora.path == path.resolve() and lora.size == path.stat().st_size
    assert lora.source == str(path) and len(lora.sha256) == 64
    assert not cache.exists()  # checked where it is, not copied
    refused("this server does not read local files", str(path), cache, local_files=False)


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("http://x/y.safetensors", "must be an https:// URL or a Hugging Face .*; got a http://"),
        ("file:///etc/passwd", "got a file:// URL"),
        ("FTP://host/x.safetensors", "got a ftp:// URL"),
        ("", "got nothing"),
        ("   ", "got nothing"),
        ("https://x/" + "a" * 2001, "more than the 2,000 allowed"),
        ("https://x/y\r\nHost: evil", "control characters"),
        ("owner/na..me", "may not hold '..'"),
        ("-owner/name", "may not hold '..' nor start or end"),
        ("own er/name", "must be 1 to 96 of"),
        (f"owner/{'n' * 97}", "must be 1 to 96 of"),
        ("owner/name/weights.bin", "must be a .safetensors file"),
        ("owner/name/../x.safetensors", "without '', '.', '..'"),
        ("lora", "this server does not read local files"),
    ],
)
def test_bad_sources_are_refused(source, match, cache):
    refused(match, source, cache, local_files=False)
    assert not cache.exists()


def test_a_missing_local_file_is_named_as_such(tmp_path, cache):
    refused("no such file, nor a valid repository id", str(tmp_path / "nothing.safetensors"), cache)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1%eth0", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("100.64.0.1", "not a public address"),
        ("2002:7f00:1::", "loopback address (inside 2002:7f00:1::)"),  # 6to4
        ("64:ff9b::a00:1", "private address (inside 64:ff9b::a00:1)"),  # NAT64 of 10.0.0.1
        ("::ffff:10.0.0.1", "private"),
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::808:808", None),
    ],
)
def test_address_vetting(address, problem):
    found = address_problem(address)
    assert (found is None) if problem is None else (problem in (found or "")), found


# --- downloads ----------------------------------------------------------------------------


def test_a_loopback_host_is_refused_without_the_allow_list(server, cache, monkeypatch):
    monkeypatch.delenv(ALLOWED_HOSTS_ENV)
    server.serve("/a.safetensors", b"never read")
    error = refused(
        "names host 127.0.0.1, which resolves to 127.0.0.1, a loopback address: this server "
        "does not fetch from its own network",
        server.url("/a.safetensors"),
        cache,
    )
    assert ALLOWED_HOSTS_ENV in str(error)
    assert server.requests["/a.safetensors"] == 0


def test_download_is_verified_cached_and_hit(server, cache, tmp_path):
    data = lora_bytes(tmp_path)
    server.serve("/loras/style.safetensors", data)
    url = server.url("/loras/style.safetensors")
    lora = fetch_lora(url, NAME, cache, local_files=False)
    assert lora.path.read_bytes() == data and lora.size == len(data) and lora.source == url
    assert lora.path.parent == cache and lora.path.name.endswith("-style.safetensors")
    record = json.loads(lora.path.with_suffix(".json").read_text())
    assert record["source"] == url and record["sha256"] == lora.sha256
    assert server.headers["/loras/style.safetensors"]["User-Agent"] == USER_AGENT
    again = fetch_lora(url, NAME, cache, local_files=False)
    assert again == lora and server.requests["/loras/style.safetensors"] == 1  # a hit
    assert parts_left(cache) == []


def test_the_certificate_is_checked_against_the_host_name(server, cache, tmp_path, monkeypatch):
    """The connection goes to the vetted address, but TLS is for the name: a name the
    certificate does not hold fails, though it resolves to the server's address."""
    server.serve("/a.safetensors", lora_bytes(tmp_path))
    resolve = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        return resolve("127.0.0.1" if host == "lora.test" else host, *args, **kwargs)

    monkeypatch.setattr("socket.getaddrinfo", getaddrinfo)
    monkeypatch.setenv(ALLOWED_HOSTS_ENV, "lora.test, localhost")
    url = f"https://lora.test:{server.port}/a.safetensors"
    refused("the certificate of lora.test does not verify", url, cache)
    fetch_lora(server.url("/a.safetensors", host="localhost"), NAME, cache)  # a name it holds
    assert parts_left(cache) == []


def test_redirects_are_followed_and_vetted(server, cache, tmp_path, monkeypatch):
    server.serve("/real.safetensors", lora_bytes(tmp_path))
    server.redirect("/moved", "/real.safetensors", status=301)  # relative, as servers write it
    assert fetch_lora(server.url("/moved"), NAME, cache).size > 0

    server.redirect("/to-http", f"http://127.0.0.1:{server.port}/real.safetensors")
    error = refused(
        "only https:// is fetched, at every redirect too", server.url("/to-http"), cache
    )
    assert "(redirected to 'http://127.0.0.1" in str(error)

    server.redirect("/loop", "/loop")
    refused("redirected more than 5 times", server.url("/loop"), cache)
    assert server.requests["/loop"] == 6

    # Allowed by name, then sent to an address that is not: vetted again, and refused.
    monkeypatch.setenv(ALLOWED_HOSTS_ENV, "localhost")
    server.redirect("/inward", server.url("/real.safetensors"))
    refused(
        "names host 127.0.0.1, which resolves to 127.0.0.1, a loopback address",
        server.url("/inward", host="localhost"),
        cache,
    )
    assert server.requests["/real.safetensors"] == 1
    assert parts_left(cache) == []


def test_a_content_length_over_the_cap_is_refused_before_the_body(server, cache, monkeypatch):
    monkeypatch.setenv(MAX_BYTES_ENV, "1000")
    monkeypatch.setenv(TIMEOUT_ENV, "20")
    # Reading the body would wait the stall out, or time out, and say so instead.
    server.serve("/huge.safetensors", b"x", length=5_000_000_000, stall=60)
    error = refused(
        "is 5,000,000,000 bytes \\(its Content-Length\\), more than the 1,000 a LoRA may be here",
        server.url("/huge.safetensors"),
        cache,
    )
    assert MAX_BYTES_ENV in str(error) and parts_left(cache) == []


def test_a_body_over_the_cap_is_cut_off(server, cache, monkeypatch):
    monkeypatch.setenv(MAX_BYTES_ENV, "1000")
    server.serve("/unsized", b"x" * 3_000_000, length=False)
    refused("more than the 1,000 a LoRA may be here", server.url("/unsized"), cache)
    server.serve("/understated", b"x" * 3_000_000, length=500)  # http.client reads 500 only
    refused("is not a safetensors file", server.url("/understated"), cache)
    assert parts_left(cache) == []


def test_a_file_over_the_whole_cache_is_refused(server, cache, tmp_path, monkeypatch):
    data = lora_bytes(tmp_path)
    monkeypatch.setenv(CACHE_BYTES_ENV, str(len(data) - 1))
    server.serve("/a.safetensors", data)
    refused(
        f"is {len(data):,} bytes .*more than the whole LoRA cache may hold \\({CACHE_BYTES_ENV}",
        server.url("/a.safetensors"),
        cache,
    )
    assert parts_left(cache) == []


def test_a_stalled_server_times_out(server, cache, tmp_path, monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "1")
    server.serve("/slow.safetensors", lora_bytes(tmp_path), stall=60, stall_after=10)
    started = time.monotonic()
    refused(
        f"timed out: 127.0.0.1 sent nothing for 1 s \\({TIMEOUT_ENV}\\)",
        server.url("/slow.safetensors"),
        cache,
    )
    assert time.monotonic() - started < 15  # the stall is 60 s
    assert parts_left(cache) == []


def test_the_deadline_holds_however_the_server_sends(server, cache, tmp_path, monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "30")
    monkeypatch.setenv(DEADLINE_ENV, "1")
    # Never silent for a second, so no read times out: its headers alone would take 20 s.
    server.serve("/slow.safetensors", lora_bytes(tmp_path), trickle=0.5)
    started = time.monotonic()
    refused(
        f"took longer than 1 s to download from 127.0.0.1 \\({DEADLINE_ENV}\\)",
        server.url("/slow.safetensors"),
        cache,
    )
    assert time.monotonic() - started < 15
    assert parts_left(cache) == []


def test_an_error_status_is_named(server, cache):
    refused("127.0.0.1 answered HTTP 404 Not Found", server.url("/missing.safetensors"), cache)
    server.serve("/forbidden", b"no", status=403)
    refused("answered HTTP 403", server.url("/forbidden"), cache)
    assert parts_left(cache) == []


def test_truncated_files_are_refused(server, cache, tmp_path):
    data = lora_bytes(tmp_path)
    server.serve("/cut.safetensors", data[:-10])
    refused(
        f"is truncated: the file is {len(data) - 10:,} bytes, its header says {len(data):,}",
        server.url("/cut.safetensors"),
        cache,
    )
    server.serve("/short.safetensors", data, length=len(data) + 100)  # the connection ends early
    refused(
        f"is truncated: the server sent {len(data):,} of the {len(data) + 100:,} bytes",
        server.url("/short.safetensors"),
        cache,
    )
    assert parts_left(cache) == [] and list(cache.glob("*.safetensors")) == []


class Planted:
    """What a malicious checkpoint holds: unpickling it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickles_are_refused_and_never_unpickled(server, cache, tmp_path):
    marker = tmp_path / "unpickled"
    zipped, bare = tmp_path / "model.ckpt", tmp_path / "model.pkl"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": Planted(marker)}, zipped)
    bare.write_bytes(pickle.dumps({"x": Planted(marker)}, protocol=4))
    assert zipped.read_bytes()[:4] == b"PK\x03\x04" and bare.read_bytes()[:1] == b"\x80"
    for path in (zipped, bare):
        with pytest.raises(InputError, match=r"looks like a PyTorch pickle.*unpickling runs code"):
            check_safetensors(path, NAME, str(path))
        refused("looks like a PyTorch pickle", str(path), cache)
    server.serve("/model.ckpt", zipped.read_bytes())
    refused("looks like a PyTorch pickle", server.url("/model.ckpt"), cache)
    assert not marker.exists()
    assert parts_left(cache) == [] and list(cache.glob("*.safetensors")) == []


def _entry(offsets: list[int], dtype: str = "F32", shape: list[int] | None = None) -> dict:
    return {"dtype": dtype, "shape": shape or [2], "data_offsets": offsets}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x01\x02", "is not a safetensors file: it is only 2 bytes"),
        (struct.pack("<Q", 10**9) + b"{}", "header of 1,000,000,000 bytes, more than 100 MB"),
        (struct.pack("<Q", 500) + b"{}", "header of 500 bytes, in 10 bytes"),
        (struct.pack("<Q", 4) + b"[1] ", "its header is not a JSON object"),
        (struct.pack("<Q", 2) + b"\xff{", "its header is not a JSON object"),
        (raw_safetensors({"__metadata__": {"a": "b"}}), "holds no tensors"),
        (raw_safetensors({"__metadata__": {"a": 1}, "w": _entry([0, 8])}, bytes(8)), "text"),
        (raw_safetensors({"w": _entry([0, 8], "F31")}, bytes(8)), "dtype 'F31', not one"),
        (raw_safetensors({"w": _entry([0, 12])}, bytes(12)), "takes 8 bytes, but its offsets"),
        (raw_safetensors({"w": _entry([0, 8], shape=[2.0])}, bytes(8)), "not whole numbers"),
        (raw_safetensors({"w": {"dtype": "F32"}}, bytes(8)), "lacks dtype, shape or offsets"),
        (raw_safetensors({"w": _entry([0, 8])}, bytes(4)), "is truncated: the file is"),
        (raw_safetensors({"w": _entry([0, 8])}, bytes(9)), "but its header says"),
        (raw_safetensors({"w": _entry([0, 8]), "v": _entry([4, 12])}, bytes(12)), "overlap"),
    ],
)
def test_check_safetensors_refuses_damaged_headers(content, match, tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(InputError, match=match) as caught:
        check_safetensors(path, NAME, "some/source")
    assert str(caught.value).startswith(f"{NAME} 'some/source' ")


def test_check_safetensors_accepts_what_safetensors_writes(tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(lora_bytes(tmp_path))
    check_safetensors(path, NAME, str(path))
    path.write_bytes(raw_safetensors({"w": _entry([0, 1], "F4", [2]), "__metadata__": {}}, b"x"))
    check_safetensors(path, NAME, str(path))


# --- the cache ----------------------------------------------------------------------------


def test_a_tampered_cache_entry_is_fetched_again(server, cache, tmp_path):
    data = lora_bytes(tmp_path)
    server.serve("/a.safetensors", data)
    lora = fetch_lora(server.url("/a.safetensors"), NAME, cache)
    changed = bytearray(data)
    changed[-1] ^= 0xFF  # a byte of the last tensor: the header still checks out
    lora.path.write_bytes(bytes(changed))
    again = fetch_lora(server.url("/a.safetensors"), NAME, cache)
    assert again.path.read_bytes() == data and server.requests["/a.safetensors"] == 2
    lora.path.write_bytes(data[:-4])  # cut short
    assert cached_loras(cache) == []  # a damaged entry is not offered
    fetch_lora(server.url("/a.safetensors"), NAME, cache)
    assert lora.path.read_bytes() == data and server.requests["/a.safetensors"] == 3


def test_the_least_recently_used_make_room(server, cache, tmp_path, monkeypatch):
    data = lora_bytes(tmp_path)
    monkeypatch.setenv(CACHE_BYTES_ENV, str(int(len(data) * 2.5)))
    urls = {}
    for name in "abc":
        server.serve(f"/{name}.safetensors", data)
        urls[name] = server.url(f"/{name}.safetensors")
    fetch_lora(urls["a"], NAME, cache)
    fetch_lora(urls["b"], NAME, cache)
    fetch_lora(urls["a"], NAME, cache)  # a hit: "a" is now the more recent
    assert [lora.source for lora in cached_loras(cache)] == [urls["a"], urls["b"]]
    fetch_lora(urls["c"], NAME, cache)  # room for one more: "b" goes
    assert [lora.source for lora in cached_loras(cache)] == [urls["c"], urls["a"]]
    assert len(list(cache.glob("*.safetensors"))) == 2
    fetch_lora(urls["a"], NAME, cache)
    assert server.requests["/a.safetensors"] == 1  # never evicted, never fetched again


def test_requests_for_one_source_take_turns(server, cache, tmp_path):
    """The lock: of several requests at once for one source, one downloads, the rest hit."""
    server.serve("/a.safetensors", lora_bytes(tmp_path), stall=0.3, stall_after=100)
    url = server.url("/a.safetensors")
    with ThreadPoolExecutor(4) as pool:
        loras = list(pool.map(lambda _: fetch_lora(url, NAME, cache), range(4)))
    assert len(set(loras)) == 1 and server.requests["/a.safetensors"] == 1


def test_stale_part_files_are_cleared(server, cache, tmp_path):
    cache.mkdir(parents=True)
    stale, fresh = cache / ".old-1.part", cache / ".new-1.part"
    stale.write_bytes(b"left by a process that died")
    fresh.write_bytes(b"another process's download")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    server.serve("/a.safetensors", lora_bytes(tmp_path))
    fetch_lora(server.url("/a.safetensors"), NAME, cache)
    assert not stale.exists() and fresh.exists()


def test_cached_loras_of_no_folder(tmp_path):
    assert cached_loras(tmp_path / "absent") == []


# --- the hub ------------------------------------------------------------------------------


@pytest.fixture
def hub(server, monkeypatch):
    """The loopback server as the Hugging Face Hub: HF_ENDPOINT names it."""
    monkeypatch.setenv("HF_ENDPOINT", server.url(""))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # read at import
    huggingface_hub.close_session()  # its client reads SSL_CERT_FILE when it is made
    yield server
    huggingface_hub.close_session()


def publish(server: HttpsServer, repo: str, files: dict[str, bytes]) -> None:
    """Serve `files` as hub repository `repo` serves them: its tree, and each file."""
    tree = [
        {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        for name, data in files.items()
    ]
    server.serve(f"/api/models/{repo}/tree/main", json.dumps(tree).encode())
    for name, data in files.items():
        headers = {"X-Repo-Commit": "0" * 40, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        server.serve(f"/{repo}/resolve/main/{name}", data, headers=headers)


def test_hub_repositories(hub, cache, tmp_path, monkeypatch):
    one, two = lora_bytes(tmp_path, 1), lora_bytes(tmp_path, 2)
    publish(hub, "o/default", {"pytorch_lora_weights.safetensors": one, "b.safetensors": two})
    publish(hub, "o/single", {"README.md": b"hi", "sub/only.safetensors": two})
    publish(hub, "o/several", {"a.safetensors": one, "b.safetensors": two})
    publish(hub, "o/none", {"model.ckpt": b"PK"})

    # A server does not lend the machine's hub token to strangers; the machine's user has it.
    monkeypatch.setenv("HF_TOKEN", "hf_the_servers_own")
    assert fetch_lora("o/default", NAME, cache, local_files=False).path.read_bytes() == one
    assert all("Authorization" not in headers for headers in hub.headers.values())
    fetch_lora("o/several/a.safetensors", NAME, cache)
    used = hub.headers["/o/several/resolve/main/a.safetensors"]["Authorization"]
    assert used == "Bearer hf_the_servers_own"
    single = fetch_lora("o/single", NAME, cache, local_files=False)
    assert single.path.read_bytes() == two and single.path.name.endswith("-single.safetensors")
    named = fetch_lora("o/several/b.safetensors", NAME, cache, local_files=False)
    assert named.path.read_bytes() == two
    refused("several .safetensors files .*\\(a.safetensors, b.safetensors\\)", "o/several", cache)
    refused("no .safetensors file .*\\(model.ckpt\\): name the file", "o/none", cache)
    refused("could not be downloaded from the Hugging Face Hub", "o/missing", cache)
    hub.serve("/api/models/o/gone/tree/main", status=404, headers={"X-Error-Code": "RepoNotFound"})
    refused("names no repository on the Hugging Face Hub", "o/gone", cache)
    assert parts_left(cache) == [] and not any(p.is_dir() for p in cache.iterdir())

    # A hit needs no hub: offline, what is cached is served and nothing else is fetched.
    hits = hub.requests["/o/default/resolve/main/pytorch_lora_weights.safetensors"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch_lora("o/default", NAME, cache).path.read_bytes() == one
    assert hub.requests["/o/default/resolve/main/pytorch_lora_weights.safetensors"] == hits
    refused("HF_HUB_OFFLINE=1 forbids downloading it", "o/single/sub/only.safetensors", cache)


def test_hub_files_over_the_cap_are_refused_before_download(hub, cache, tmp_path, monkeypatch):
    data = lora_bytes(tmp_path)
    publish(hub, "o/big", {"pytorch_lora_weights.safetensors": data})
    monkeypatch.setenv(MAX_BYTES_ENV, str(len(data) - 1))
    refused(f"is {len(data):,} bytes \\(as the hub lists it\\)", "o/big", cache)
    assert hub.requests["/o/big/resolve/main/pytorch_lora_weights.safetensors"] == 1  # a HEAD
    assert parts_left(cache) == []


def test_a_file_put_in_the_lora_folder_is_named_by_its_file_name(cache, tmp_path):
    data = lora_bytes(tmp_path)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "my style.safetensors").write_bytes(data)
    assert folder_loras(cache) == ["my style.safetensors"]
    # Even where local files are not read: it is the LoRA folder's own.
    lora = fetch_lora("my style.safetensors", NAME, cache, local_files=False)
    assert lora.path == (cache / "my style.safetensors").resolve()
    assert lora.sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(InputError, match="does not read local files"):
        fetch_lora("../my style.safetensors", NAME, cache, local_files=False)
