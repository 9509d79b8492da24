"""Model weights on disk: the folder layout, checking it, and downloading what is missing.

A weights folder holds two parts (see weights/README.md):

    stable-diffusion-2-base/   a diffusers folder: model_index.json, unet/, vae/, text_encoder/,
                               tokenizer/, scheduler/; full-precision or fp16-variant safetensors
    lpips/vgg16-397923af.pth   torchvision's ImageNet VGG16 state dict (the LPIPS trunk)

Everything that can go wrong with them surfaces as WeightsError, whose message names the path
and the command that fixes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shlex
import shutil
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SD_DIRNAME = "stable-diffusion-2-base"
SD_REPO_ID = "stabilityai/stable-diffusion-2-base"
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
VGG16_RELPATH = "lpips/vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
WEIGHTS_ENV = "SYNCDIFFUSION_WEIGHTS"
DOWNLOAD_COMMAND = "python scripts/download_weights.py"

# Downloads are staged here, inside the weights folder so that the final os.replace is an
# atomic rename on one filesystem, and outside the names the loader looks at.
_PARTIAL_DIRNAME = ".partial"

# File stem of each weight-bearing component; the fp16 variant inserts ".fp16" before the suffix.
_WEIGHT_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
_CONFIG_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}

# Only what diffusers reads: the SD2-base repo also holds .bin copies, full-precision copies and
# a 5 GB single-file checkpoint, none of which are needed.
_SD_ALLOW_PATTERNS = (
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/model.fp16.safetensors",
)

# torchvision's configuration "D" (VGG16): conv widths per stage, each stage ending in max-pool.
_VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

# safetensors refuses headers above this size; a larger length field means a corrupt file.
_SAFETENSORS_MAX_HEADER = 100_000_000

# VGG16 files that loaded and checked out in this process, by identity and stat. The real file
# is 528 MB and a predictor checks it more than once before loading it.
_VGG16_VERIFIED: set[tuple[int, int, int, int]] = set()


def _vgg16_feature_shapes() -> dict[str, tuple[int, ...]]:
    """Shapes of torchvision's vgg16().features state dict, keyed as in the full model."""
    shapes: dict[str, tuple[int, ...]] = {}
    index, in_channels = 0, 3
    for stage in _VGG16_STAGES:
        for width in stage:
            shapes[f"features.{index}.weight"] = (width, in_channels, 3, 3)
            shapes[f"features.{index}.bias"] = (width,)
            in_channels = width
            index += 2  # the Conv2d and the ReLU after it
        index += 1  # the MaxPool2d
    return shapes


_VGG16_FEATURE_SHAPES = _vgg16_feature_shapes()


class WeightsError(RuntimeError):
    """Weights on disk are missing, incomplete or not this model's; the message says the fix."""


def default_weights_dir() -> Path:
    """The weights folder: $SYNCDIFFUSION_WEIGHTS if set, else ./weights."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env) if env else Path("weights")


def missing_parts(weights_dir: str | os.PathLike[str]) -> list[str]:
    """Which of SD_DIRNAME and VGG16_RELPATH are absent, incomplete or broken in weights_dir."""
    weights_dir = Path(weights_dir)
    parts = []
    if _sd_problem(weights_dir / SD_DIRNAME) is not None:
        parts.append(SD_DIRNAME)
    if _vgg16_check(weights_dir / VGG16_RELPATH) is not None:
        parts.append(VGG16_RELPATH)
    return parts


def check_weights(weights_dir: str | os.PathLike[str]) -> None:
    """Raise WeightsError naming the first problem of each part, or return if all is usable."""
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise WeightsError(f"Weights folder {weights_dir} does not exist. {_fix(weights_dir)}")
    problems = [
        problem
        for problem in (
            _sd_problem(weights_dir / SD_DIRNAME),
            _vgg16_check(weights_dir / VGG16_RELPATH),
        )
        if problem is not None
    ]
    if problems:
        raise WeightsError(" ".join(f"{p}." for p in problems) + f" {_fix(weights_dir)}")


def sd_variant(sd_dir: str | os.PathLike[str]) -> str | None:
    """Return "fp16" if only the fp16 variant files are all in sd_dir, else None (for variant=)."""
    sd_dir = Path(sd_dir)
    if all(_weights_file(sd_dir, c, None).is_file() for c in _WEIGHT_STEMS):
        return None
    if all(_weights_file(sd_dir, c, "fp16").is_file() for c in _WEIGHT_STEMS):
        return "fp16"
    return None


def load_vgg16_features(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load the `features.*` tensors of a torchvision VGG16 state dict; WeightsError if unusable."""
    path = Path(path)
    features, problem = _vgg16_problem(path)
    if problem is not None or features is None:
        # The fix command can name the folder only when the file sits where download puts it.
        weights_dir = path.parent.parent if path.parent.name == "lpips" else None
        raise WeightsError(f"{problem}. {_fix(weights_dir)}")
    return features


def download_weights(weights_dir: str | os.PathLike[str], progress: bool = True) -> None:
    """Download the parts missing_parts reports into weights_dir; a rerun resumes a failed one."""
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    if _sd_problem(weights_dir / SD_DIRNAME) is not None:
        _download_sd(weights_dir, progress)
    if _vgg16_check(weights_dir / VGG16_RELPATH) is not None:
        _download_vgg16(weights_dir, progress)
    with contextlib.suppress(OSError):  # not empty: something else is staged there
        (weights_dir / _PARTIAL_DIRNAME).rmdir()


# --- checks -------------------------------------------------------------------------------


def _fix(weights_dir: Path | None) -> str:
    if weights_dir is None:
        return f"Run: {DOWNLOAD_COMMAND}"
    return f"Run: {DOWNLOAD_COMMAND} --weights {shlex.quote(str(weights_dir))}"


def _size(n: int) -> str:
    """Human-readable byte count, e.g. "3 MB", "1.7 GB"."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            break
        value /= 1000
    text = f"{value:.1f}" if value < 10 and unit != "B" else f"{value:.0f}"
    return f"{text.removesuffix('.0')} {unit}"


def _weights_file(sd_dir: Path, component: str, variant: str | None) -> Path:
    infix = f".{variant}" if variant else ""
    return sd_dir / component / f"{_WEIGHT_STEMS[component]}{infix}.safetensors"


def _safetensors_problem(path: Path) -> str | None:
    """Why path is not a whole safetensors file, judged from its header and size alone."""
    size = path.stat().st_size
    if size < 8:
        return f"is truncated ({_size(size)}, less than its 8-byte header length)"
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > _SAFETENSORS_MAX_HEADER:
            return f"is corrupt (header length {header_len} bytes; safetensors allows 100 MB)"
        if 8 + header_len > size:
            return f"is truncated ({_size(size)}; its header alone needs {_size(8 + header_len)})"
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        ends = [
            int(entry["data_offsets"][1])
            for name, entry in header.items()
            if name != "__metadata__"
        ]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "is corrupt (its header is not a safetensors JSON header)"
    if not ends:
        return "is corrupt (it holds no tensors)"
    expected = 8 + header_len + max(ends)
    if size < expected:
        return f"is truncated ({_size(size)} of {_size(expected)})"
    if size > expected:
        return f"is corrupt ({_size(size)}; its header describes {_size(expected)})"
    return None


def _read_json(path: Path) -> dict[str, Any] | str:
    """The JSON object in path, or the reason it cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"is not valid JSON ({exc})"
    if not isinstance(data, dict):
        return f"holds a JSON {type(data).__name__}, not an object"
    return data


def _sd_problem(sd_dir: Path) -> str | None:
    """One sentence on what is wrong with the Stable Diffusion folder, or None."""
    if not sd_dir.is_dir():
        return f"Weights folder {sd_dir} does not exist"
    incomplete = f"Weights folder {sd_dir} is incomplete"

    index = sd_dir / "model_index.json"
    if not index.is_file():
        return f"{incomplete}: model_index.json is missing"
    index_json = _read_json(index)
    if isinstance(index_json, str):
        return f"{incomplete}: model_index.json {index_json}"

    configs: dict[str, dict[str, Any]] = {}
    for component in SD_COMPONENTS:
        if not (sd_dir / component).is_dir():
            return f"{incomplete}: the {component}/ folder is missing"
        rel = f"{component}/{_CONFIG_FILES[component]}"
        if not (sd_dir / rel).is_file():
            return f"{incomplete}: {rel} is missing"
        parsed = _read_json(sd_dir / rel)
        if isinstance(parsed, str):
            return f"{incomplete}: {rel} {parsed}"
        configs[component] = parsed

    tokenizer = sd_dir / "tokenizer"
    has_bpe_files = (tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file()
    if not has_bpe_files and not (tokenizer / "tokenizer.json").is_file():
        return f"{incomplete}: tokenizer/ has neither vocab.json with merges.txt nor tokenizer.json"

    variant = sd_variant(sd_dir)
    for component in _WEIGHT_STEMS:
        path = _weights_file(sd_dir, component, variant)
        rel = f"{component}/{path.name}"
        if not path.is_file():
            other = _weights_file(sd_dir, component, None if variant else "fp16")
            if other.is_file():
                return (
                    f"{incomplete}: {rel} is missing (unet, vae and text_encoder must all have "
                    "full-precision files or all have *.fp16.safetensors files)"
                )
            return f"{incomplete}: {component}/ has no weights file ({path.name} or {other.name})"
        problem = _safetensors_problem(path)
        if problem is not None:
            return f"{incomplete}: {rel} {problem}"

    problem = _architecture_problem(configs)
    if problem is not None:
        return f"Weights folder {sd_dir} is not Stable Diffusion 2 base: {problem}"
    return None


def _architecture_problem(configs: dict[str, dict[str, Any]]) -> str | None:
    """What in the component configs does not fit SD2-base's architecture, or None."""
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    for component, expected in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        found = configs[component].get("_class_name", expected)
        if found != expected:
            return f"{component}/config.json is for a {found}, expected a {expected}"
    architectures = text.get("architectures") or ["CLIPTextModel"]
    if "CLIPTextModel" not in architectures:
        return f"text_encoder/config.json is for {architectures}, expected a CLIPTextModel"

    for key in ("in_channels", "out_channels"):
        if unet.get(key) != 4:
            return f"unet/config.json has {key} {unet.get(key)}, expected 4 (SD latents)"
    if vae.get("latent_channels") != 4:
        return f"vae/config.json has latent_channels {vae.get('latent_channels')}, expected 4"
    levels = vae.get("block_out_channels")
    if not isinstance(levels, list) or len(levels) != 4:
        return (
            f"vae/config.json has block_out_channels {levels}, expected 4 levels "
            "(an 8x downsampling autoencoder)"
        )

    cross = unet.get("cross_attention_dim")
    cross_dims = set(cross) if isinstance(cross, list) else {cross}
    # transformers leaves values equal to CLIPTextConfig's defaults (hidden_size 512) out of
    # the config files it writes.
    hidden = text.get("hidden_size", 512)
    if cross_dims != {hidden}:
        return (
            f"text_encoder/config.json has hidden_size {hidden} but unet/config.json has "
            f"cross_attention_dim {cross}; they must be equal"
        )
    return None


def _load_error_reason(exc: Exception) -> str:
    """The informative part of a torch.load error, which wraps it in paragraphs of advice."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    text = " ".join(text.split()).split(". ", 1)[0]
    return text[:200] or "no details"


def _vgg16_check(path: Path) -> str | None:
    """_vgg16_problem's verdict, remembered for files that passed and have not changed since."""
    try:
        st = path.stat()
    except OSError:
        return f"Weights file {path} is missing"
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _VGG16_VERIFIED:
        return None
    problem = _vgg16_problem(path)[1]
    if problem is None:
        _VGG16_VERIFIED.add(key)
    return problem


def _vgg16_problem(path: Path) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The VGG16 features in path and None, or None and one sentence on what is wrong."""
    import torch

    if not path.is_file():
        return None, f"Weights file {path} is missing"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a bad file
        return None, (
            f"Weights file {path} does not load as a PyTorch state dict "
            f"({type(exc).__name__}: {_load_error_reason(exc)}); it is damaged or not a checkpoint"
        )
    if not isinstance(state, dict):
        return None, f"Weights file {path} holds a {type(state).__name__}, not a state dict"
    features = {
        key: value
        for key, value in state.items()
        if isinstance(key, str) and key.startswith("features.")
    }
    missing = [key for key in _VGG16_FEATURE_SHAPES if key not in features]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return None, (
            f"Weights file {path} is not torchvision's VGG16: it lacks "
            f"{', '.join(missing[:3])}{more}"
        )
    unexpected = sorted(set(features) - set(_VGG16_FEATURE_SHAPES))
    if unexpected:
        return None, (
            f"Weights file {path} is not torchvision's VGG16 (without batch norm): it has "
            f"unexpected tensors such as {unexpected[0]}"
        )
    for key, shape in _VGG16_FEATURE_SHAPES.items():
        value = features[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return None, (
                f"Weights file {path} is not torchvision's VGG16: {key} has shape {found}, "
                f"expected {shape}"
            )
    return features, None


# --- downloads ----------------------------------------------------------------------------


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


@contextlib.contextmanager
def _hub_progress_bars(enabled: bool) -> Iterator[None]:
    """Turn huggingface_hub's progress bars off for the duration when not enabled."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    turn_off = not enabled and not are_progress_bars_disabled()
    if turn_off:
        disable_progress_bars()
    try:
        yield
    finally:
        if turn_off:
            enable_progress_bars()


def _one_line(exc: BaseException) -> str:
    """The exception's type and message on one line, for messages that quote it."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _download_sd(weights_dir: Path, progress: bool) -> None:
    import huggingface_hub

    final = weights_dir / SD_DIRNAME
    staging = weights_dir / _PARTIAL_DIRNAME / SD_DIRNAME
    staging.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not final.is_dir():
        raise WeightsError(
            f"{final} is a file, but it must be the {SD_DIRNAME} folder; move it away. "
            f"{_fix(weights_dir)}"
        )
    if final.is_dir():
        # A broken folder sits where the loader looks; moving it into staging clears that and
        # lets the download keep whichever of its files are intact. When an interrupted run
        # already staged files, those are the better start and the broken folder goes.
        if staging.exists():
            shutil.rmtree(final)
        else:
            os.replace(final, staging)
    staging.mkdir(exist_ok=True)
    # huggingface_hub trusts a file it recorded as downloaded even if it was cut short later.
    for path in staging.rglob("*.safetensors"):
        in_hub_bookkeeping = path.relative_to(staging).parts[0] == ".cache"
        if not in_hub_bookkeeping and _safetensors_problem(path) is not None:
            path.unlink()

    _say(progress, f"Downloading {SD_REPO_ID} (fp16 files) into {staging}")
    try:
        with _hub_progress_bars(progress):
            huggingface_hub.snapshot_download(
                SD_REPO_ID, local_dir=staging, allow_patterns=list(_SD_ALLOW_PATTERNS)
            )
    except Exception as exc:  # network and hub errors come in many types
        raise WeightsError(
            f"Downloading {SD_REPO_ID} into {staging} failed ({_one_line(exc)}). "
            f"The files fetched so far are kept there and a rerun continues. {_fix(weights_dir)}"
        ) from exc

    problem = _sd_problem(staging)
    if problem is not None:
        raise WeightsError(
            f"Downloaded {SD_REPO_ID}, but it is not usable: {problem}. {_fix(weights_dir)}"
        )
    # huggingface_hub's download bookkeeping; the loader does not need it.
    shutil.rmtree(staging / ".cache", ignore_errors=True)
    os.replace(staging, final)
    _say(progress, f"Stable Diffusion 2 base is in {final}")


def _expected_sha256_prefix(url: str) -> str:
    """torchvision names checkpoints <name>-<first hex digits of sha256>.pth."""
    match = re.search(r"-([0-9a-f]{8,})\.[^/]*$", url)
    if match is None:
        raise ValueError(f"URL {url} does not end in <name>-<sha256 prefix>.<ext>")
    return match.group(1)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download_vgg16(weights_dir: Path, progress: bool) -> None:
    from tqdm import tqdm

    url = VGG16_URL
    expected = _expected_sha256_prefix(url)
    final = weights_dir / VGG16_RELPATH
    staging = weights_dir / _PARTIAL_DIRNAME / Path(VGG16_RELPATH).name
    staging.parent.mkdir(parents=True, exist_ok=True)
    done = staging.stat().st_size if staging.is_file() else 0

    _say(progress, f"Downloading {url} into {staging}" + (f" from byte {done}" if done else ""))
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        try:
            response = urllib.request.urlopen(request, timeout=60)
        except urllib.error.HTTPError as exc:
            # 416: nothing lies after `done`, so an earlier run already fetched the whole file.
            if exc.code != 416 or not done:
                raise
            response = None
        if response is not None:
            with response:
                status = getattr(response, "status", 200)
                if done and status == 206:
                    content_range = response.headers.get("Content-Range", "")
                    if not content_range.startswith(f"bytes {done}-"):
                        staging.unlink()
                        raise WeightsError(
                            f"{url} answered a resume from byte {done} with range "
                            f"{content_range!r}; deleted {staging}. {_fix(weights_dir)}"
                        )
                elif done:
                    done = 0  # the server ignored the Range header and sends the whole file
                length = response.headers.get("Content-Length")
                total = done + int(length) if length else None
                with (
                    staging.open("ab" if done else "wb") as out,
                    tqdm(
                        total=total,
                        initial=done,
                        unit="B",
                        unit_scale=True,
                        desc=Path(VGG16_RELPATH).name,
                        disable=not progress,
                    ) as bar,
                ):
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as exc:
        raise WeightsError(
            f"Downloading {url} into {staging} failed ({_one_line(exc)}). "
            f"The bytes fetched so far are kept there and a rerun continues. {_fix(weights_dir)}"
        ) from exc

    digest = _sha256(staging)
    if not digest.startswith(expected):
        staging.unlink()
        raise WeightsError(
            f"Downloaded {url}, but its sha256 starts with {digest[: len(expected)]}, expected "
            f"{expected}; deleted {staging}. {_fix(weights_dir)}"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)
    _say(progress, f"VGG16 is in {final}")
