"""Tests for syncdiffusion.models.weights and the download command (scripts/download_weights.py), on
the tiny model."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from syncdiffusion.cli import download
from syncdiffusion.errors import WeightsError
from syncdiffusion.models import lpips_trunk
from syncdiffusion.models.folders import read_source, sd_variant
from syncdiffusion.models.lpips_trunk import save_trunk
from syncdiffusion.models.perceptual import load_vgg16_features
from syncdiffusion.models.tiny import make_tiny_controlnet, make_tiny_weights
from syncdiffusion.models.weights import (
    DOWNLOAD_COMMAND,
    LEGACY_VGG16_RELPATH,
    SD_DIRNAME,
    SD_REPO_ID,
    VGG16_RELPATH,
    WEIGHTS_ENV,
    check_weights,
    default_weights_dir,
    download_controlnet,
    download_weights,
    hub_offline,
    missing_parts,
)

WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
UNET = f"{SD_DIRNAME}/unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def tiny(tiny_weights: Path) -> Path:
    """The session's tiny model (conftest.py); read it, never change it."""
    return tiny_weights


@pytest.fixture
def weights_dir(tiny: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model that a test may break."""
    return Path(shutil.copytree(tiny, tmp_path / "weights"))


def _assert_actionable(exc: pytest.ExceptionInfo[WeightsError], path: Path | str) -> str:
    message = str(exc.value)
    assert str(path) in message and DOWNLOAD_COMMAND in message
    return message


# --- the tiny model -----------------------------------------------------------------------


def test_tiny_model_passes(tiny: Path) -> None:
    check_weights(tiny)
    assert missing_parts(tiny, verify=True) == []
    assert sd_variant(tiny / SD_DIRNAME) is None
    assert len(load_vgg16_features(tiny / VGG16_RELPATH)) == 26


def _modes(folder: Path) -> dict[str, str]:
    """Each file's and folder's permission bits under `folder`, but huggingface_hub's .cache/."""
    found = [folder, *(p for p in folder.rglob("*") if ".cache" not in p.parts)]
    return {p.relative_to(folder).as_posix(): oct(p.stat().st_mode & 0o777) for p in found}


def _readable(folder: Path) -> dict[str, str]:
    """The files and folders under `folder` that another user cannot read (or enter)."""
    return {
        rel: mode
        for rel, mode in _modes(folder).items()
        if mode != ("0o755" if (folder / rel).is_dir() else "0o644")
    }


def test_tiny_weights_are_readable_by_every_user(tiny: Path) -> None:
    # A Cog image's worker may run as another user than the one that wrote the weights, and
    # safetensors' save_file writes 0600.
    assert {m for r, m in _modes(tiny).items() if r.endswith(".safetensors")} == {"0o644"}
    assert _readable(tiny) == {}


def test_tiny_model_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = make_tiny_weights(tmp_path / "again")
    for path in sorted(tiny.rglob("*.safetensors")):
        rel = path.relative_to(tiny)
        assert path.read_bytes() == (again / rel).read_bytes(), rel


def test_tiny_model_script_writes_the_same_model(tiny: Path, tmp_path: Path, run_script) -> None:
    result = run_script("make_tiny_weights.py", str(tmp_path / "w"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Wrote tiny random models to {tmp_path / 'w'}: sd2")
    assert (tmp_path / "w" / UNET).read_bytes() == (tiny / UNET).read_bytes()


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


# --- broken folders -----------------------------------------------------------------------


def _remove(rel: str) -> Callable[[Path], None]:
    def remove(w: Path) -> None:
        target = w / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return remove


def _cut(rel: str, keep: float) -> Callable[[Path], None]:
    def cut(w: Path) -> None:
        data = (w / rel).read_bytes()
        (w / rel).write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])

    return cut


def _append(rel: str, data: bytes) -> Callable[[Path], None]:
    return lambda w: (w / rel).write_bytes((w / rel).read_bytes() + data)


def _config(component: str, key: str, value: object) -> Callable[[Path], None]:
    def edit(w: Path) -> None:
        path = w / SD_DIRNAME / component / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))

    return edit


def _scheduler(key: str, value: object) -> Callable[[Path], None]:
    def edit(w: Path) -> None:
        path = w / SD_DIRNAME / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))

    return edit


def _trunk(edit: Callable[[dict[str, torch.Tensor]], None], **metadata: str) -> Callable:
    """Rewrite the trunk with `edit` applied to its tensors (and no hash unless given)."""

    def rewrite(w: Path) -> None:
        features = load_file(w / VGG16_RELPATH)
        edit(features)
        save_file(features, w / VGG16_RELPATH, metadata=metadata or None)

    return rewrite


def _mixed_variants(w: Path) -> None:
    unet = w / UNET
    unet.rename(unet.with_name("diffusion_pytorch_model.fp16.safetensors"))


SD, TRUNK = SD_DIRNAME, VGG16_RELPATH
BROKEN = {  # what breaks the folder: (how, which part is then missing, what the message says)
    "no model_index": (_remove(f"{SD}/model_index.json"), SD, "model_index.json is missing"),
    "no unet/": (_remove(f"{SD}/unet"), SD, "unet/config.json is missing"),
    "no scheduler/": (_remove(f"{SD}/scheduler"), SD, "scheduler/scheduler_config.json is"),
    "no vae config": (_remove(f"{SD}/vae/config.json"), SD, "vae/config.json is missing"),
    "no tokenizer config": (
        _remove(f"{SD}/tokenizer/tokenizer_config.json"),
        SD,
        "tokenizer/tokenizer_config.json is missing",
    ),
    "no vocab": (_remove(f"{SD}/tokenizer/vocab.json"), SD, "tokenizer/vocab.json is missing"),
    "no text weights": (
        _remove(f"{SD}/text_encoder/model.safetensors"),
        SD,
        "text_encoder/model.safetensors is missing (unet, vae, text_encoder must all have",
    ),
    "mixed variants": (_mixed_variants, SD, "all have full-precision *.safetensors files or all"),
    "unet half": (_cut(UNET, 0.5), SD, "diffusion_pytorch_model.safetensors is truncated or"),
    "unet 20 bytes": (_cut(UNET, 20), SD, "unet/diffusion_pytorch_model.safetensors is trunc"),
    "unet 4 bytes": (_cut(UNET, 4), SD, "is truncated or corrupt (4 bytes;"),
    "vae trailing bytes": (
        _append(f"{SD}/vae/diffusion_pytorch_model.safetensors", b"\0" * 10),
        SD,
        "vae/diffusion_pytorch_model.safetensors is truncated or corrupt",
    ),
    "scheduler not JSON": (
        lambda w: (w / SD / "scheduler" / "scheduler_config.json").write_text("{oops"),
        SD,
        "scheduler/scheduler_config.json is not valid JSON",
    ),
    "unet window 0": (
        _config("unet", "sample_size", 0),
        SD,
        "unet/config.json has sample_size 0, expected a whole number of at least 16 (the window",
    ),
    "unet window 8": (_config("unet", "sample_size", 8), SD, "has sample_size 8, expected a"),
    "unet window text": (_config("unet", "sample_size", "64"), SD, "has sample_size '64', exp"),
    "scheduler steps": (
        _scheduler("num_train_timesteps", -5),
        SD,
        "scheduler/scheduler_config.json has num_train_timesteps -5, expected a whole number of "
        "at least 1 (the training schedule's steps)",
    ),
    "scheduler steps float": (_scheduler("num_train_timesteps", 1e3), SD, "timesteps 1000.0, e"),
    "unet in_channels": (_config("unet", "in_channels", 8), SD, "in_channels 8, expected 4 or 9"),
    "unet out_channels": (_config("unet", "out_channels", 8), SD, "out_channels 8"),
    "unet cross dim": (_config("unet", "cross_attention_dim", 768), SD, "cross_attention_dim 768"),
    "vae latents": (_config("vae", "latent_channels", 16), SD, "latent_channels 16"),
    "vae levels": (_config("vae", "block_out_channels", [4, 8, 8]), SD, "[4, 8, 8], expected 4"),
    "text width": (_config("text_encoder", "hidden_size", 64), SD, "hidden_size 64"),
    "unet class": (_config("unet", "_class_name", "UNet2DModel"), SD, "_class_name UNet2DModel"),
    "text class": (_config("text_encoder", "architectures", ["T5"]), SD, "is for ['T5']"),
    "no trunk": (_remove(TRUNK), TRUNK, "vgg16-features.safetensors is missing"),
    "trunk junk": (
        lambda w: (w / TRUNK).write_bytes(b"not weights"),
        TRUNK,
        "is not a whole safetensors file",
    ),
    "trunk half": (_cut(TRUNK, 0.5), TRUNK, "is not a whole safetensors file"),
    "trunk shape": (
        _trunk(lambda f: f.update({"features.0.weight": torch.zeros(64, 1, 3, 3)})),
        TRUNK,
        "size mismatch for features.0.weight: copying a param with shape torch.Size([64, 1, 3, 3])",
    ),
    "trunk lacks": (
        _trunk(lambda f: f.pop("features.28.bias")),
        TRUNK,
        'Missing key(s) in state_dict: "features.28.bias"',
    ),
    "trunk extra": (
        _trunk(lambda f: f.update({"classifier.0.bias": torch.zeros(2)})),
        TRUNK,
        'Unexpected key(s) in state_dict: "classifier.0.bias"',
    ),
    "trunk no hash": (_trunk(lambda f: None), TRUNK, "does not record its tensors_sha256"),
}


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


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_broken_folder(weights_dir: Path, case: str) -> None:
    breakage, part, expected = BROKEN[case]
    breakage(weights_dir)
    with pytest.raises(WeightsError) as exc:
        check_weights(weights_dir)
    assert expected in _assert_actionable(exc, weights_dir / part)
    assert missing_parts(weights_dir) == [part]
    if part == VGG16_RELPATH:
        with pytest.raises(WeightsError) as exc:
            load_vgg16_features(weights_dir / VGG16_RELPATH)
        assert expected in _assert_actionable(exc, weights_dir / VGG16_RELPATH)


def test_a_changed_trunk_fails_its_hash_on_load(weights_dir: Path) -> None:
    path = weights_dir / VGG16_RELPATH
    with safe_open(path, framework="pt") as f:
        recorded = f.metadata()
    # Same names and shapes, one value changed, the old hash kept: a random trunk in disguise.
    _trunk(lambda f: f["features.0.bias"].add_(1), **recorded)(weights_dir)
    check_weights(weights_dir)  # headers only, as a setup checks before it loads
    assert missing_parts(weights_dir) == []
    assert missing_parts(weights_dir, verify=True) == [VGG16_RELPATH]
    with pytest.raises(WeightsError, match="is damaged: its tensors hash to") as exc:
        load_vgg16_features(path)
    _assert_actionable(exc, weights_dir)


# --- sd_variant ---------------------------------------------------------------------------


def _to_fp16_variant(sd_dir: Path) -> None:
    """Rename the weight files the way the hub's fp16 variant names them."""
    for component, stem in WEIGHT_FILES.items():
        src = sd_dir / component / f"{stem}.safetensors"
        src.rename(src.with_name(f"{stem}.fp16.safetensors"))


def test_sd_variant_fp16_loads_with_diffusers(weights_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    sd_dir = weights_dir / SD_DIRNAME
    _to_fp16_variant(sd_dir)
    assert sd_variant(sd_dir) == "fp16"
    check_weights(weights_dir)
    UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet", variant="fp16")


def test_sd_variant_prefers_full_precision_when_both_present(weights_dir: Path) -> None:
    sd_dir = weights_dir / SD_DIRNAME
    for component, stem in WEIGHT_FILES.items():
        full = sd_dir / component / f"{stem}.safetensors"
        shutil.copy(full, full.with_name(f"{stem}.fp16.safetensors"))
    assert sd_variant(sd_dir) is None


# --- the old layout -----------------------------------------------------------------------


OTHER_TENSORS = {  # a component's weights file replaced by another network's: its header is whole
    "unet": ("vae", "208 of its 208 tensors are missing, such as conv_in.bias; it holds 184 "),
    "vae": ("unet", "184 of its 184 tensors are missing, such as decoder.conv_in.bias; it holds"),
    "text_encoder": ("vae", "36 of its 36 tensors are missing, such as embeddings.position_emb"),
}


@pytest.mark.parametrize("component", OTHER_TENSORS)
def test_another_networks_tensors_fail_naming_the_file(weights_dir: Path, component: str) -> None:
    from syncdiffusion import SyncDiffusionPipeline

    other, expected = OTHER_TENSORS[component]
    sd = weights_dir / SD_DIRNAME
    target = sd / component / f"{WEIGHT_FILES[component]}.safetensors"
    shutil.copy(sd / other / f"{WEIGHT_FILES[other]}.safetensors", target)
    check_weights(weights_dir)  # a whole file: only loading tells whose tensors it holds
    with pytest.raises(WeightsError) as exc:
        SyncDiffusionPipeline.from_pretrained(weights_dir, "cpu")
    message = _assert_actionable(exc, target)
    assert f"does not hold the network {component}/config.json describes" in message
    assert expected in message


def test_a_tensor_of_another_shape_fails_naming_it(weights_dir: Path) -> None:
    from syncdiffusion import SyncDiffusionPipeline

    tensors = load_file(weights_dir / UNET)
    tensors["conv_in.weight"] = tensors["conv_in.weight"][:, :, :1, :1].contiguous()
    save_file(tensors, weights_dir / UNET)
    with pytest.raises(WeightsError) as exc:
        SyncDiffusionPipeline.from_pretrained(weights_dir, "cpu")
    assert (
        "1 of its 208 tensors have another shape, such as conv_in.weight: 32x4x1x1 in the file, "
        "32x4x3x3 by unet/config.json"
    ) in _assert_actionable(exc, weights_dir / UNET)


def _torchvision_file(tiny: Path, path: Path) -> Path:
    """A stand-in for torchvision's vgg16-397923af.pth: the tiny trunk plus a classifier tensor,
    in the legacy (pre-zip) serialization torchvision's 2017 file uses."""
    state = {**load_file(tiny / VGG16_RELPATH), "classifier.6.bias": torch.zeros(1000)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return path


def test_old_layout_loads_with_a_one_line_notice(
    tiny: Path, weights_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (weights_dir / VGG16_RELPATH).unlink()
    _torchvision_file(tiny, weights_dir / LEGACY_VGG16_RELPATH)
    check_weights(weights_dir)
    assert missing_parts(weights_dir) == [VGG16_RELPATH]  # download_weights converts it
    with caplog.at_level(logging.WARNING, logger="syncdiffusion"):
        features = load_vgg16_features(weights_dir / VGG16_RELPATH)
    expected = load_file(tiny / VGG16_RELPATH)
    assert features.keys() == expected.keys()
    assert all(torch.equal(features[k], expected[k]) for k in expected)
    [notice] = caplog.messages
    assert "\n" not in notice and "old layout" in notice and DOWNLOAD_COMMAND in notice


# --- default_weights_dir ------------------------------------------------------------------


def test_default_weights_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    assert default_weights_dir() == Path("weights")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    assert default_weights_dir() == tmp_path


# --- download_weights: the hub faked, torchvision's file served from a file:// URL --------


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


class FakeHub:
    """Stands in for huggingface_hub's snapshot_download and model_info, serving files from a
    local tree at one revision: `repos[repo_id]`, else `repo` whatever the id.

    Like the real one, it moves each file into place only once whole, leaves files that match
    alone, and can fail part way (then nothing half-written is left in local_dir).
    """

    def __init__(self, repo: Path, revision: str = "0123abc") -> None:
        self.repo, self.revision, self.fail, self.calls = repo, revision, False, []
        self.flip: str | None = None  # a file the transfer damages
        self.repos: dict[str, Path] = {}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
        import huggingface_hub

        monkeypatch.setattr(huggingface_hub, "snapshot_download", self)
        monkeypatch.setattr(huggingface_hub, "model_info", self.model_info)
        return self

    def model_info(self, repo_id: str, files_metadata: bool = False) -> SimpleNamespace:
        """What the hub publishes of the repository: with `files_metadata`, each file's size,
        git object id, and for weights (kept in LFS on the hub) their sha256."""
        repo = self.repos.get(repo_id, self.repo)
        siblings = []
        for path in sorted(p for p in repo.rglob("*") if p.is_file()):
            data, rel = path.read_bytes(), path.relative_to(repo).as_posix()
            lfs = None
            if rel.endswith((".safetensors", ".bin", ".ckpt")):
                lfs = BlobLfsInfo(len(data), hashlib.sha256(data).hexdigest(), 134)
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            metadata = {"size": len(data), "blob_id": blob, "lfs": lfs} if files_metadata else {}
            siblings.append(RepoSibling(rel, **metadata))
        return SimpleNamespace(id=repo_id, sha=self.revision, siblings=siblings)

    def __call__(
        self, repo_id: str, *, revision: str, local_dir: Path, allow_patterns: list[str]
    ) -> str:
        assert revision == self.revision
        self.calls.append(repo_id)
        repo = self.repos.get(repo_id, self.repo)
        files = sorted(p for p in repo.rglob("*") if p.is_file())
        rels = [p.relative_to(repo).as_posix() for p in files]
        wanted = [r for r in rels if any(fnmatch.fnmatch(r, a) for a in allow_patterns)]
        for i, rel in enumerate(wanted):
            src, dst = repo / rel, Path(local_dir) / rel
            if self.fail and i >= len(wanted) // 2:
                raise ConnectionError("Connection reset by peer")
            if not dst.is_file() or dst.read_bytes() != src.read_bytes():
                dst.parent.mkdir(parents=True, exist_ok=True)
                part = dst.with_name(dst.name + ".incomplete")
                shutil.copy(src, part)
                if rel == self.flip:  # damaged on the way: a byte in its middle flipped
                    _flip_a_byte(part)
                os.replace(part, dst)
        return str(local_dir)


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch, tiny: Path, tmp_path: Path) -> FakeHub:
    """The SD2-base repo (fp16 files, plus files the download must skip) behind a fake hub, and
    a stand-in for torchvision's VGG16 file behind lpips_trunk.VGG16_URL with its sha256."""
    repo = Path(shutil.copytree(tiny / SD_DIRNAME, tmp_path / "hub"))
    for component, stem in WEIGHT_FILES.items():
        full = repo / component / f"{stem}.safetensors"
        shutil.copy(full, full.with_name(f"{stem}.fp16.safetensors"))
        full.with_name(f"{stem}.bin").write_bytes(b"pickled weights")
    (repo / "512-base-ema.ckpt").write_bytes(b"single-file checkpoint")
    hub = FakeHub(repo).install(monkeypatch)
    source = _torchvision_file(tiny, tmp_path / "server" / "vgg16-397923af.pth")
    monkeypatch.setattr(lpips_trunk, "VGG16_URL", source.as_uri())
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setattr(lpips_trunk, "VGG16_SHA256", digest)
    return hub


def _server_down(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(lpips_trunk, "VGG16_URL", (tmp_path / "gone" / "vgg16.pth").as_uri())


def test_download_fails_cleanly_and_a_rerun_finishes(
    tiny: Path, tmp_path: Path, network: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "downloaded"
    url = lpips_trunk.VGG16_URL
    network.fail = True
    with pytest.raises(WeightsError) as exc:
        download_weights(target, progress=False)
    assert "ConnectionError" in _assert_actionable(exc, target / SD_DIRNAME)
    assert network.calls == [SD_REPO_ID]
    assert missing_parts(target) == [SD_DIRNAME, VGG16_RELPATH]
    for path in (target / SD_DIRNAME).rglob("*.safetensors"):  # whole, or not there
        safe_open(path, framework="pt")

    network.fail = False
    _server_down(monkeypatch, tmp_path)
    with pytest.raises(WeightsError, match="URLError") as exc:
        download_weights(target, progress=False)
    _assert_actionable(exc, target / ".partial")
    assert missing_parts(target) == [VGG16_RELPATH]

    monkeypatch.setattr(lpips_trunk, "VGG16_URL", url)
    download_weights(target, progress=False)
    check_weights(target)
    assert missing_parts(target, verify=True) == []
    assert sd_variant(target / SD_DIRNAME) == "fp16"
    assert not (target / ".partial").exists()
    trunk = load_vgg16_features(target / VGG16_RELPATH)
    assert trunk.keys() == load_file(tiny / VGG16_RELPATH).keys()  # the classifier is gone
    # Only what diffusers needs came down: no .bin copies, no single-file checkpoint.
    got = {p.name for p in (target / SD_DIRNAME).rglob("*") if p.is_file()}
    assert not any(name.endswith((".bin", ".ckpt")) for name in got)
    assert "diffusion_pytorch_model.safetensors" not in got


def test_downloaded_weights_are_readable_by_every_user(
    tmp_path: Path, network: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # huggingface_hub writes files by the umask; safetensors' save_file (the trunk) writes 0600.
    network.repos["alice/tiny-controlnet"] = make_tiny_controlnet(
        network.repo, tmp_path / "controlnet-hub"
    )
    for repo in (network.repo, tmp_path / "controlnet-hub"):
        for path in repo.rglob("*"):
            path.chmod(0o700 if path.is_dir() else 0o600)
    old = os.umask(0o077)
    try:
        download_weights(tmp_path / "w", progress=False)
        download_controlnet(tmp_path / "w", "alice/tiny-controlnet", progress=False)
    finally:
        os.umask(old)
    assert _readable(tmp_path / "w") == {}
    assert _modes(tmp_path / "w")[UNET.replace(".safetensors", ".fp16.safetensors")] == "0o644"


def test_download_rejects_a_file_with_the_wrong_sha256(
    tmp_path: Path, network: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lpips_trunk, "VGG16_SHA256", "397923af" + "0" * 56)
    target = tmp_path / "w"
    with pytest.raises(WeightsError, match="invalid hash value") as exc:
        download_weights(target, progress=False)
    _assert_actionable(exc, target)
    assert not (target / "lpips").exists()
    assert list((target / ".partial").iterdir()) == []


def test_download_skips_complete_parts(
    weights_dir: Path, network: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _server_down(monkeypatch, tmp_path)
    download_weights(weights_dir, progress=False)
    assert network.calls == []


def test_download_converts_the_old_layout_without_the_network(
    tiny: Path, weights_dir: Path, network: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    (weights_dir / VGG16_RELPATH).unlink()
    source = Path(lpips_trunk.VGG16_URL.removeprefix("file://"))
    shutil.copy(source, weights_dir / LEGACY_VGG16_RELPATH)
    _server_down(monkeypatch, tmp_path)
    download_weights(weights_dir, progress=False)
    assert not (weights_dir / LEGACY_VGG16_RELPATH).exists()
    assert missing_parts(weights_dir, verify=True) == []
    assert (weights_dir / VGG16_RELPATH).read_bytes() == (tiny / VGG16_RELPATH).read_bytes()


def test_download_rebuilds_a_changed_trunk(weights_dir: Path, network: FakeHub) -> None:
    with safe_open(weights_dir / VGG16_RELPATH, framework="pt") as f:
        recorded = f.metadata()
    _trunk(lambda f: f["features.0.bias"].add_(1), **recorded)(weights_dir)
    download_weights(weights_dir, progress=False)
    assert missing_parts(weights_dir, verify=True) == [] and network.calls == []


def test_saved_trunk_records_the_hash_of_its_tensors(tmp_path: Path) -> None:
    features = {"features.0.bias": torch.arange(3.0)}
    save_trunk(features, tmp_path / "a.safetensors")
    save_trunk({"features.0.bias": torch.arange(3.0) + 1}, tmp_path / "b.safetensors")
    hashes = []
    for name in ("a", "b"):
        with safe_open(tmp_path / f"{name}.safetensors", framework="pt") as f:
            hashes.append(f.metadata()["tensors_sha256"])
    assert hashes[0] != hashes[1] and all(len(h) == 64 for h in hashes)


def test_a_model_of_the_same_name_from_another_owner_is_refused(
    tmp_path: Path, network: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "w"
    network.fail = True  # stopped part way: the folder already says whose files it holds
    with pytest.raises(WeightsError):
        download_weights(target, progress=False, model="alice/tiny-sd")
    assert read_source(target / "tiny-sd") == {"repo_id": "alice/tiny-sd", "revision": "0123abc"}
    network.calls.clear()
    with pytest.raises(WeightsError) as exc:
        download_weights(target, progress=False, model="bob/tiny-sd")
    message = str(exc.value)
    assert f"{target / 'tiny-sd'} holds alice/tiny-sd, not bob/tiny-sd" in message
    assert f"Remove {target / 'tiny-sd'}" in message and WEIGHTS_ENV in message
    assert network.calls == []  # nothing merged into alice's folder

    network.fail = False
    download_weights(target, progress=False, model="alice/tiny-sd")
    check_weights(target, "alice/tiny-sd")
    check_weights(target, "tiny-sd")  # named by its folder: whatever the folder holds
    with pytest.raises(WeightsError, match="holds alice/tiny-sd, not bob/tiny-sd"):
        check_weights(target, "bob/tiny-sd")
    assert download.main(["--model", "bob/tiny-sd", "--weights", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds alice/tiny-sd, not bob/tiny-sd" in err


FP16_UNET = f"{SD_DIRNAME}/unet/diffusion_pytorch_model.fp16.safetensors"


def test_each_file_is_checked_against_what_the_hub_publishes(
    tmp_path: Path, network: FakeHub
) -> None:
    target = tmp_path / "w"
    network.flip = FP16_UNET.split("/", 1)[1]  # a byte flipped on the way, the size the same
    with pytest.raises(WeightsError) as exc:
        download_weights(target, progress=False)
    message = _assert_actionable(exc, target / FP16_UNET)
    published = hashlib.sha256((network.repo / network.flip).read_bytes()).hexdigest()
    assert "its sha256 is " in message and f"where the hub publishes {published}" in message
    assert not (target / FP16_UNET).exists()  # removed: the rerun fetches it again

    network.flip = None
    download_weights(target, progress=False)
    files = read_source(target / SD_DIRNAME)["files"]
    assert files["unet/diffusion_pytorch_model.fp16.safetensors"]["sha256"] == published
    assert set(files) >= {"model_index.json", "tokenizer/vocab.json", "vae/config.json"}
    check_weights(target)


def test_bytes_changed_after_the_download_are_found_by_the_download_command(
    tmp_path: Path, network: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "w"
    download_weights(target, progress=False)
    _flip_a_byte(target / FP16_UNET)
    check_weights(target)  # a load checks the recorded sizes only: a stat a file
    assert missing_parts(target, verify=True) == [SD_DIRNAME]  # the command re-hashes
    network.calls.clear()
    assert download.main(["--weights", str(target)]) == 0
    assert network.calls == [SD_REPO_ID]
    assert (target / FP16_UNET).read_bytes() == (network.repo / network_rel(FP16_UNET)).read_bytes()
    assert missing_parts(target, verify=True) == []

    index = target / SD_DIRNAME / "model_index.json"  # still JSON, one line longer
    index.write_text(index.read_text() + "\n")
    with pytest.raises(WeightsError) as exc:
        check_weights(target)
    size = index.stat().st_size
    assert (
        f"is incomplete: model_index.json is {size:,} bytes, where the download recorded "
        f"{size - 1:,} bytes checked against the hub"
    ) in _assert_actionable(exc, target / SD_DIRNAME)


def network_rel(rel: str) -> str:
    return rel.split("/", 1)[1]


def test_an_unrecorded_incomplete_folder_is_not_merged_into(
    weights_dir: Path, network: FakeHub
) -> None:
    (weights_dir / UNET).unlink()  # a folder made by hand, or by an older version: no record
    with pytest.raises(WeightsError) as exc:
        download_weights(weights_dir, progress=False)
    message = _assert_actionable(exc, weights_dir / SD_DIRNAME)
    assert "unet/diffusion_pytorch_model.safetensors is missing" in message
    assert "no download recorded whose files it holds" in message
    assert f"remove {weights_dir / SD_DIRNAME}, then run the command again" in message
    assert network.calls == [] and read_source(weights_dir / SD_DIRNAME) is None


def test_a_known_name_whose_folder_holds_another_owners_copy_says_so(
    tmp_path: Path, network: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "w"
    download_weights(target, progress=False, model="alice/stable-diffusion-2-base")
    check_weights(target, "alice/stable-diffusion-2-base")
    expected = f"holds alice/stable-diffusion-2-base, not {SD_REPO_ID}"
    with pytest.raises(WeightsError, match=expected):
        check_weights(target)  # the default, a name the download knows: SD_REPO_ID's
    assert download.main(["--weights", str(target)]) == 1
    assert expected in capsys.readouterr().err


def test_the_panorama_records_the_revision_of_its_weights(tmp_path: Path, network: FakeHub):
    from syncdiffusion import SyncDiffusionPipeline

    network.revision = "f00dcafe"
    download_weights(tmp_path / "w", progress=False, model="alice/tiny-sd")
    pipe = SyncDiffusionPipeline.from_pretrained(tmp_path / "w", "cpu", model="alice/tiny-sd")
    image = pipe(prompt="a cove", width=512, num_inference_steps=1, sync_threshold=0)
    assert image.info["parameters"]["model_revision"] == "f00dcafe"


# --- scripts/download_weights.py ----------------------------------------------------------


def test_cli_reports_failure_without_traceback(
    tmp_path: Path, network: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    network.fail = True
    cli = download
    assert cli.main(["--weights", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert f"{DOWNLOAD_COMMAND} --weights {tmp_path / 'w'}" in err

    network.fail = False
    assert cli.main(["--weights", str(tmp_path / "w")]) == 0
    assert "Done" in capsys.readouterr().out
    assert cli.main(["--weights", str(tmp_path / "w")]) == 0
    assert "nothing to download" in capsys.readouterr().out


def test_cli_uses_the_environment_default(
    tiny: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(WEIGHTS_ENV, str(tiny))
    assert download.main([]) == 0
    assert str(tiny) in capsys.readouterr().out


def test_the_script_runs_the_command(tiny: Path, run_script) -> None:
    result = run_script("download_weights.py", "--weights", str(tiny))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tiny} already holds every part; nothing to download.\n"


@pytest.mark.parametrize("value", ["1", "true", "YES", "On"])
def test_offline_mode_downloads_nothing_for_any_true_value(
    tiny: Path, tmp_path: Path, network: FakeHub, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    with pytest.raises(WeightsError, match=f"HF_HUB_OFFLINE={value} forbids downloads"):
        download_weights(tmp_path / "empty", progress=False)
    assert network.calls == []
    # torch.hub's file too: the model in place, the trunk missing.
    weights = Path(shutil.copytree(tiny, tmp_path / "no-trunk"))
    (weights / VGG16_RELPATH).unlink()
    with pytest.raises(WeightsError, match=r"the LPIPS trunk .* forbids downloads"):
        download_weights(weights, progress=False)
    assert not (weights / VGG16_RELPATH).exists()


@pytest.mark.parametrize("value, offline", [("", False), ("0", False), ("false", False)])
def test_offline_mode_is_off_for_false_values(monkeypatch, value, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline() is offline
