"""Tests for syncdiffusion.weights and scripts/download_weights.py, on the tiny model."""

from __future__ import annotations

import email.message
import fnmatch
import hashlib
import importlib.util
import json
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType

import pytest
import torch

from syncdiffusion import weights
from syncdiffusion.weights import (
    DOWNLOAD_COMMAND,
    SD_DIRNAME,
    SD_REPO_ID,
    VGG16_RELPATH,
    WEIGHTS_ENV,
    WeightsError,
    check_weights,
    default_weights_dir,
    download_weights,
    load_vgg16_features,
    missing_parts,
    sd_variant,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}


def _import_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny(tiny_weights: Path) -> Path:
    """The session's tiny model (conftest.py); read it, never change it."""
    return tiny_weights


@pytest.fixture
def weights_dir(tiny: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model that a test may break."""
    return Path(shutil.copytree(tiny, tmp_path / "weights"))


def _to_fp16_variant(sd_dir: Path) -> None:
    """Rename the weight files the way the hub's fp16 variant names them."""
    for component, stem in WEIGHT_FILES.items():
        src = sd_dir / component / f"{stem}.safetensors"
        src.rename(src.with_name(f"{stem}.fp16.safetensors"))


def _assert_actionable(exc: pytest.ExceptionInfo[WeightsError], path: Path | str) -> str:
    message = str(exc.value)
    assert str(path) in message
    assert DOWNLOAD_COMMAND in message
    return message


# --- check_weights, missing_parts ---------------------------------------------------------


def test_tiny_model_passes(tiny: Path) -> None:
    check_weights(tiny)
    assert missing_parts(tiny) == []
    assert sd_variant(tiny / SD_DIRNAME) is None


def test_tiny_model_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = _import_script("make_tiny_weights").make_tiny_weights(tmp_path / "again")
    for path in sorted(p for p in tiny.rglob("*") if p.is_file()):
        rel = path.relative_to(tiny)
        if path.suffix in {".safetensors", ".pth"}:
            assert path.read_bytes() == (again / rel).read_bytes(), rel


def test_tiny_model_loads_like_sd2_base(tiny: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    sd_dir = tiny / SD_DIRNAME
    unet = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(sd_dir, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(sd_dir, subfolder="text_encoder")
    scheduler = DDIMScheduler.from_pretrained(sd_dir, subfolder="scheduler")
    assert unet.config.in_channels == unet.config.out_channels == 4
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    assert vae.config.scaling_factor == 0.18215
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.steps_offset == 1 and not scheduler.config.set_alpha_to_one


@pytest.mark.parametrize("loader", ["CLIPTokenizer", "AutoTokenizer"])
def test_tiny_tokenizer_pads_and_truncates_to_77(tiny: Path, loader: str) -> None:
    import transformers

    tokenizer = getattr(transformers, loader).from_pretrained(tiny / SD_DIRNAME / "tokenizer")
    assert tokenizer.model_max_length == 77
    # SD2 pads with "!" (id 0), as OpenCLIP did in training, not with <|endoftext|>.
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0

    def encode(text: str) -> list[int]:
        return tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids

    short = encode("A photo of the mountains")
    assert len(short) == 77
    assert short[0] == tokenizer.bos_token_id
    assert short.count(tokenizer.eos_token_id) == 1 and short[-1] == 0
    long = encode("mountain " * 100)
    assert len(long) == 77 and long[-1] == tokenizer.eos_token_id


def test_missing_weights_folder(tmp_path: Path) -> None:
    absent = tmp_path / "nowhere"
    with pytest.raises(WeightsError) as exc:
        check_weights(absent)
    assert "does not exist" in _assert_actionable(exc, absent)
    assert f"--weights {absent}" in str(exc.value)
    assert missing_parts(absent) == [SD_DIRNAME, VGG16_RELPATH]


def test_empty_weights_folder_names_both_parts(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as exc:
        check_weights(tmp_path)
    message = _assert_actionable(exc, tmp_path / SD_DIRNAME)
    assert str(tmp_path / VGG16_RELPATH) in message
    assert missing_parts(tmp_path) == [SD_DIRNAME, VGG16_RELPATH]


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("model_index.json", "model_index.json"),
        ("unet", "unet/"),
        ("scheduler", "scheduler/"),
        ("vae/config.json", "vae/config.json"),
        ("tokenizer/tokenizer_config.json", "tokenizer/tokenizer_config.json"),
        ("tokenizer/vocab.json", "vocab.json"),
        ("text_encoder/model.safetensors", "text_encoder/"),
    ],
)
def test_missing_component(weights_dir: Path, remove: str, named: str) -> None:
    target = weights_dir / SD_DIRNAME / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(WeightsError) as exc:
        check_weights(weights_dir)
    message = _assert_actionable(exc, weights_dir / SD_DIRNAME)
    assert named in message
    assert missing_parts(weights_dir) == [SD_DIRNAME]


@pytest.mark.parametrize(
    ("keep", "expected"),
    [(0.5, "is truncated ("), (20, "is truncated ("), (4, "is truncated (")],
)
def test_truncated_safetensors(weights_dir: Path, keep: float, expected: str) -> None:
    path = weights_dir / SD_DIRNAME / "unet" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    with pytest.raises(WeightsError) as exc:
        check_weights(weights_dir)
    message = _assert_actionable(exc, weights_dir / SD_DIRNAME)
    assert f"unet/diffusion_pytorch_model.safetensors {expected}" in message
    assert missing_parts(weights_dir) == [SD_DIRNAME]


def test_truncated_safetensors_reports_sizes(weights_dir: Path) -> None:
    path = weights_dir / SD_DIRNAME / "unet" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"truncated \(\d[.\d]* [kMG]?B of \d[.\d]* [kMG]?B\)"):
        check_weights(weights_dir)


def test_safetensors_with_trailing_garbage(weights_dir: Path) -> None:
    path = weights_dir / SD_DIRNAME / "vae" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 10)
    with pytest.raises(WeightsError, match=r"vae/diffusion_pytorch_model\.safetensors is corrupt"):
        check_weights(weights_dir)


@pytest.mark.parametrize(
    ("component", "key", "value", "named"),
    [
        ("unet", "in_channels", 9, "in_channels 9"),
        ("unet", "out_channels", 8, "out_channels 8"),
        ("unet", "cross_attention_dim", 768, "cross_attention_dim 768"),
        ("vae", "latent_channels", 16, "latent_channels 16"),
        ("vae", "block_out_channels", [4, 8, 8], "block_out_channels [4, 8, 8]"),
        ("text_encoder", "hidden_size", 64, "hidden_size 64"),
        ("unet", "_class_name", "UNet2DModel", "UNet2DModel"),
    ],
)
def test_wrong_architecture(
    weights_dir: Path, component: str, key: str, value: object, named: str
) -> None:
    config_path = weights_dir / SD_DIRNAME / component / "config.json"
    config = json.loads(config_path.read_text())
    config[key] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(WeightsError) as exc:
        check_weights(weights_dir)
    message = _assert_actionable(exc, weights_dir / SD_DIRNAME)
    assert "is not Stable Diffusion 2 base" in message
    assert named in message


def test_config_that_is_not_json(weights_dir: Path) -> None:
    (weights_dir / SD_DIRNAME / "scheduler" / "scheduler_config.json").write_text("{oops")
    with pytest.raises(WeightsError, match=r"scheduler/scheduler_config\.json is not valid JSON"):
        check_weights(weights_dir)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not a checkpoint", "does not load"),
        ({"classifier.0.weight": torch.zeros(2)}, "lacks features.0.weight"),
        ("features_wrong_shape", "features.0.weight has shape (64, 1, 3, 3)"),
        ([torch.zeros(1)], "holds a list"),
    ],
)
def test_corrupt_vgg16(weights_dir: Path, content: object, expected: str) -> None:
    path = weights_dir / VGG16_RELPATH
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "features_wrong_shape":
        state = torch.load(path, weights_only=True)
        state["features.0.weight"] = torch.zeros(64, 1, 3, 3)
        torch.save(state, path)
    else:
        torch.save(content, path)
    with pytest.raises(WeightsError) as exc:
        check_weights(weights_dir)
    assert expected in _assert_actionable(exc, path)
    assert missing_parts(weights_dir) == [VGG16_RELPATH]
    with pytest.raises(WeightsError) as exc:
        load_vgg16_features(path)
    _assert_actionable(exc, path)


# --- sd_variant ---------------------------------------------------------------------------


def test_sd_variant_fp16(weights_dir: Path) -> None:
    sd_dir = weights_dir / SD_DIRNAME
    _to_fp16_variant(sd_dir)
    assert sd_variant(sd_dir) == "fp16"
    check_weights(weights_dir)


def test_sd_variant_prefers_full_precision_when_both_present(weights_dir: Path) -> None:
    sd_dir = weights_dir / SD_DIRNAME
    for component, stem in WEIGHT_FILES.items():
        full = sd_dir / component / f"{stem}.safetensors"
        shutil.copy(full, full.with_name(f"{stem}.fp16.safetensors"))
    assert sd_variant(sd_dir) is None


def test_mixed_variants_are_rejected(weights_dir: Path) -> None:
    sd_dir = weights_dir / SD_DIRNAME
    unet = sd_dir / "unet" / "diffusion_pytorch_model.safetensors"
    unet.rename(unet.with_name("diffusion_pytorch_model.fp16.safetensors"))
    assert sd_variant(sd_dir) is None
    with pytest.raises(WeightsError, match="all have full-precision files or all have"):
        check_weights(weights_dir)


def test_sd_variant_loads_with_diffusers(weights_dir: Path) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    sd_dir = weights_dir / SD_DIRNAME
    _to_fp16_variant(sd_dir)
    variant = sd_variant(sd_dir)
    UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet", variant=variant)
    CLIPTextModel.from_pretrained(sd_dir, subfolder="text_encoder", variant=variant)


# --- load_vgg16_features ------------------------------------------------------------------


def test_load_vgg16_features_features_only(tiny: Path) -> None:
    features = load_vgg16_features(tiny / VGG16_RELPATH)
    assert len(features) == 26
    assert features["features.28.weight"].shape == (512, 512, 3, 3)


def test_load_vgg16_features_full_torchvision_state_dict(tiny: Path, tmp_path: Path) -> None:
    import torchvision

    # Keys and shapes come from torchvision itself; building on "meta" skips initialising the
    # 120M classifier parameters, which the loader drops anyway.
    with torch.device("meta"):
        reference = torchvision.models.vgg16().state_dict()
    features = torch.load(tiny / VGG16_RELPATH, weights_only=True)
    state = {k: features.get(k, torch.zeros(v.shape)) for k, v in reference.items()}
    path = tmp_path / "vgg16-397923af.pth"
    # torchvision's file dates from 2017: the legacy (non-zip) serialization format.
    torch.save(state, path, _use_new_zipfile_serialization=False)
    del state

    loaded = load_vgg16_features(path)
    assert set(loaded) == set(features)
    assert all(torch.equal(loaded[k], features[k]) for k in features)
    with torch.device("meta"):
        trunk = torchvision.models.vgg16().features
    trunk.load_state_dict({k.removeprefix("features."): v for k, v in loaded.items()}, assign=True)


# --- default_weights_dir ------------------------------------------------------------------


def test_default_weights_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    assert default_weights_dir() == Path("weights")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    assert default_weights_dir() == tmp_path


# --- download_weights, with the network faked ---------------------------------------------


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download, serving files from a local tree.

    Like the real one with local_dir, it skips files that are already there (it trusts its
    own bookkeeping), and it can fail part way, leaving a cut-short file behind.
    """

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.fail = False
        self.calls: list[dict[str, object]] = []

    def __call__(
        self, repo_id: str, *, local_dir: Path, allow_patterns: list[str], **_: object
    ) -> str:
        self.calls.append({"repo_id": repo_id, "allow_patterns": allow_patterns})
        files = sorted(p for p in self.repo.rglob("*") if p.is_file())
        wanted = [
            p
            for p in files
            if any(fnmatch.fnmatch(p.relative_to(self.repo).as_posix(), a) for a in allow_patterns)
        ]
        for i, src in enumerate(wanted):
            dst = Path(local_dir) / src.relative_to(self.repo)
            if dst.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if self.fail and i >= len(wanted) // 2 and src.suffix == ".safetensors":
                dst.write_bytes(src.read_bytes()[:100])
                raise ConnectionError("Connection reset by peer")
            shutil.copy(src, dst)
        return str(local_dir)


class FakeResponse:
    def __init__(self, data: bytes, status: int, headers: dict[str, str], fail_after: int | None):
        self.status = status
        self.headers = email.message.Message()
        for key, value in headers.items():
            self.headers[key] = value
        self._data = data
        self._pos = 0
        self._fail_after = fail_after

    def read(self, n: int = -1) -> bytes:
        if self._fail_after is not None and self._pos >= self._fail_after:
            raise ConnectionResetError("Connection reset by peer")
        end = len(self._data) if n < 0 else self._pos + n
        if self._fail_after is not None:
            end = min(end, self._fail_after)
        chunk = self._data[self._pos : end]
        self._pos += len(chunk)
        return chunk

    def __enter__(self) -> FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class FakeServer:
    """Stands in for urllib.request.urlopen serving one file, with HTTP Range support."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.fail_after: int | None = None
        self.ranges: list[str | None] = []

    def __call__(
        self, request: urllib.request.Request, timeout: float | None = None
    ) -> FakeResponse:
        range_header = request.get_header("Range")
        self.ranges.append(range_header)
        start = int(range_header.removeprefix("bytes=").rstrip("-")) if range_header else 0
        if start >= len(self.data) and range_header:
            raise urllib.error.HTTPError(request.full_url, 416, "Range Not Satisfiable", None, None)
        body = self.data[start:]
        headers = {"Content-Length": str(len(body))}
        if range_header:
            headers["Content-Range"] = f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"
        fail_after = None if self.fail_after is None else max(self.fail_after - start, 0)
        return FakeResponse(body, 206 if range_header else 200, headers, fail_after)


@pytest.fixture
def hub_repo(tiny: Path, tmp_path: Path) -> Path:
    """A stand-in for the SD2-base hub repo: fp16 files plus files the download must skip."""
    repo = Path(shutil.copytree(tiny / SD_DIRNAME, tmp_path / "hub"))
    for component, stem in WEIGHT_FILES.items():
        full = repo / component / f"{stem}.safetensors"
        shutil.copy(full, full.with_name(f"{stem}.fp16.safetensors"))
        full.with_name(f"{stem}.bin").write_bytes(b"pickled weights")
    (repo / "512-base-ema.ckpt").write_bytes(b"single-file checkpoint")
    return repo


@pytest.fixture
def network(
    monkeypatch: pytest.MonkeyPatch, tiny: Path, hub_repo: Path
) -> tuple[FakeHub, FakeServer]:
    import huggingface_hub

    hub = FakeHub(hub_repo)
    vgg_bytes = (tiny / VGG16_RELPATH).read_bytes()
    server = FakeServer(vgg_bytes)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.setattr(urllib.request, "urlopen", server)
    # The real file's name carries its sha256 prefix; so must the stand-in's.
    sha = hashlib.sha256(vgg_bytes).hexdigest()
    monkeypatch.setattr(weights, "VGG16_URL", f"https://download.invalid/vgg16-{sha[:8]}.pth")
    return hub, server


def test_download_resumes_and_never_exposes_half_a_model(
    tmp_path: Path, network: tuple[FakeHub, FakeServer]
) -> None:
    hub, server = network
    target = tmp_path / "downloaded"
    sd_final = target / SD_DIRNAME
    vgg_final = target / VGG16_RELPATH

    hub.fail = True
    with pytest.raises(WeightsError) as exc:
        download_weights(target, progress=False)
    assert "ConnectionError" in _assert_actionable(exc, target / ".partial" / SD_DIRNAME)
    assert not sd_final.exists()
    assert missing_parts(target) == [SD_DIRNAME, VGG16_RELPATH]
    assert hub.calls[0]["repo_id"] == SD_REPO_ID

    hub.fail = False
    server.fail_after = len(server.data) // 2
    with pytest.raises(WeightsError) as exc:
        download_weights(target, progress=False)
    _assert_actionable(exc, target / ".partial" / "vgg16-397923af.pth")
    assert missing_parts(target) == [VGG16_RELPATH]
    assert not vgg_final.exists()
    assert (target / ".partial" / "vgg16-397923af.pth").stat().st_size == server.fail_after

    server.fail_after = None
    download_weights(target, progress=False)
    assert server.ranges[-1] == f"bytes={len(server.data) // 2}-"
    check_weights(target)
    assert vgg_final.read_bytes() == server.data
    assert sd_variant(sd_final) == "fp16"
    assert not (target / ".partial").exists()
    # Only what diffusers needs came down: no .bin copies, no single-file checkpoint.
    got = {p.relative_to(sd_final).as_posix() for p in sd_final.rglob("*") if p.is_file()}
    assert not any(name.endswith((".bin", ".ckpt")) for name in got)
    assert "unet/diffusion_pytorch_model.safetensors" not in got


def test_download_skips_complete_parts(
    weights_dir: Path, network: tuple[FakeHub, FakeServer]
) -> None:
    hub, server = network
    download_weights(weights_dir, progress=False)
    assert hub.calls == [] and server.ranges == []


def test_download_replaces_a_broken_model(
    weights_dir: Path, network: tuple[FakeHub, FakeServer]
) -> None:
    hub, server = network
    unet = weights_dir / SD_DIRNAME / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:1000])
    (weights_dir / VGG16_RELPATH).write_bytes(b"junk")
    download_weights(weights_dir, progress=False)
    check_weights(weights_dir)
    assert len(hub.calls) == 1 and server.ranges == [None]


def test_download_completed_file_is_not_fetched_again(
    tmp_path: Path, network: tuple[FakeHub, FakeServer]
) -> None:
    _, server = network
    partial = tmp_path / "w" / ".partial" / "vgg16-397923af.pth"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(server.data)  # a run that died between fetching and moving into place
    download_weights(tmp_path / "w", progress=False)
    assert server.ranges[-1] == f"bytes={len(server.data)}-"
    assert (tmp_path / "w" / VGG16_RELPATH).read_bytes() == server.data


def test_download_rejects_a_file_with_the_wrong_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, network: tuple[FakeHub, FakeServer]
) -> None:
    monkeypatch.setattr(weights, "VGG16_URL", "https://download.invalid/vgg16-00000000.pth")
    target = tmp_path / "w"
    with pytest.raises(WeightsError, match="sha256") as exc:
        download_weights(target, progress=False)
    _assert_actionable(exc, target / ".partial" / "vgg16-397923af.pth")
    assert not (target / VGG16_RELPATH).exists()
    assert not (target / ".partial" / "vgg16-397923af.pth").exists()


# --- scripts/download_weights.py ----------------------------------------------------------


def test_cli_reports_failure_without_traceback(
    tmp_path: Path, network: tuple[FakeHub, FakeServer], capsys: pytest.CaptureFixture[str]
) -> None:
    hub, _ = network
    hub.fail = True
    cli = _import_script("download_weights")
    assert cli.main(["--weights", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert f"{DOWNLOAD_COMMAND} --weights {tmp_path / 'w'}" in err

    hub.fail = False
    assert cli.main(["--weights", str(tmp_path / "w")]) == 0
    assert "Done" in capsys.readouterr().out
    assert cli.main(["--weights", str(tmp_path / "w")]) == 0
    assert "nothing to download" in capsys.readouterr().out


def test_cli_uses_the_environment_default(
    tiny: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(WEIGHTS_ENV, str(tiny))
    assert _import_script("download_weights").main([]) == 0
    assert str(tiny) in capsys.readouterr().out


def test_cli_puts_the_repo_on_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # Run as `python scripts/download_weights.py`, Python puts scripts/ (not the repo root) on
    # sys.path; the script must find the uninstalled package on its own.
    without_repo = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT]
    monkeypatch.setattr(sys, "path", without_repo)
    _import_script("download_weights")
    assert sys.path[0] == str(REPO_ROOT)
