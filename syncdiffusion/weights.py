"""Model weights on disk: the folder layout (weights/README.md), checking it, downloading it.

huggingface_hub fetches Stable Diffusion (resuming; each file verified, then moved into place),
torch.hub fetches torchvision's VGG16 (to a temporary file, its full sha256 checked, then moved),
safetensors reads and validates the weights files. Whatever is wrong surfaces as WeightsError,
whose message names the path and the command that fixes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from .family import SD, Family, family_of

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# The default model; any other is a folder beside it, named after its hub repository.
SD_DIRNAME = "stable-diffusion-2-base"
SD_REPO_ID = "stabilityai/stable-diffusion-2-base"
MODEL_ENV = "SYNCDIFFUSION_MODEL"
# Hub repositories `download_weights.py --model` knows by their folder name alone; any other
# is named by its repository id (owner/name).
KNOWN_REPOS = {
    repo.split("/")[1]: repo
    for repo in (
        SD_REPO_ID,
        "stabilityai/stable-diffusion-2-1-base",
        "stabilityai/stable-diffusion-2-1",
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "stabilityai/stable-diffusion-xl-base-1.0",
    )
}
VGG16_RELPATH = "lpips/vgg16-features.safetensors"
# Folders written before the trunk was cut down hold torchvision's whole file (528 MB) here.
LEGACY_VGG16_RELPATH = "lpips/vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
# torchvision names the file after the first 8 hex digits of its sha256; this is the whole
# digest of that 553,433,881-byte file, as download manifests that verify it record it.
VGG16_SHA256 = "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"
WEIGHTS_ENV = "SYNCDIFFUSION_WEIGHTS"
DOWNLOAD_COMMAND = "python scripts/download_weights.py"

# torchvision's file is fetched into here, inside the weights folder (an atomic os.replace
# away) but outside the names the loader looks at.
_PARTIAL_DIRNAME = ".partial"
_HASH_KEY = "tensors_sha256"  # in the trunk's safetensors metadata; see _tensors_sha256
# File stem of each weight-bearing component; the fp16 variant inserts ".fp16" before the suffix.
_WEIGHT_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
_TOKENIZER_FILES = ("tokenizer_config.json", "vocab.json", "merges.txt")
# Config values every SD 1.x/2.x and SDXL checkpoint shares (an absent key takes diffusers'
# default).
_SD_VALUES = [
    ("unet", "_class_name", "UNet2DConditionModel"),
    ("vae", "_class_name", "AutoencoderKL"),
    ("unet", "in_channels", 4),
    ("unet", "out_channels", 4),
    ("vae", "latent_channels", 4),
]
# Only what diffusers reads: the hub repo also holds .bin copies, full-precision copies and a
# 5 GB single-file checkpoint. Full-precision files are fetched only where a repository has no
# fp16 ones (fine-tunes often have not).
_SD_ALLOW_PATTERNS = ["model_index.json", "scheduler/*.json", "tokenizer/*", "tokenizer_2/*"]
_SD_ALLOW_PATTERNS += [f"{c}/config.json" for c in _WEIGHT_STEMS]
_FP16_PATTERNS = [f"{c}/{stem}.fp16.safetensors" for c, stem in _WEIGHT_STEMS.items()]
_FULL_PATTERNS = [f"{c}/{stem}.safetensors" for c, stem in _WEIGHT_STEMS.items()]

Features = dict[str, "torch.Tensor"]


class WeightsError(RuntimeError):
    """Weights on disk are missing, incomplete or not this model's; the message says the fix."""


def default_weights_dir() -> Path:
    """The weights folder: $SYNCDIFFUSION_WEIGHTS if set, else ./weights."""
    return Path(os.environ.get(WEIGHTS_ENV) or "weights")


def default_model() -> str:
    """The model folder: $SYNCDIFFUSION_MODEL if set, else SD 2.0-base's."""
    return os.environ.get(MODEL_ENV) or SD_DIRNAME


def model_dirname(model: str | None = None) -> str:
    """The folder under weights/ of `model`: a folder name, or a hub repository id whose name
    part names the folder (`stabilityai/stable-diffusion-xl-base-1.0`); None: the default."""
    model = model or default_model()
    name = model.rstrip("/").rsplit("/", 1)[-1]
    if not name or name.startswith(".") or model.count("/") > 1:
        raise WeightsError(
            f"model must be a folder name under the weights folder or a hub repository id "
            f"(owner/name); got {model!r}"
        )
    return name


def repo_id(model: str | None = None) -> str:
    """The hub repository `model` is downloaded from: itself if an id, else a known folder's."""
    model = model or default_model()
    if "/" in model:
        return model
    if model not in KNOWN_REPOS:
        raise WeightsError(
            f"model {model!r} is not a hub repository id (owner/name) nor one of the folders "
            f"download_weights knows: {', '.join(KNOWN_REPOS)}"
        )
    return KNOWN_REPOS[model]


def missing_parts(
    weights_dir: str | os.PathLike[str], verify: bool = False, model: str | None = None
) -> list[str]:
    """The parts (the model's folder, VGG16_RELPATH) download_weights would fetch or rebuild:
    absent, broken, or (the trunk) in the old layout. `verify` also checks the trunk's hash."""
    weights_dir, name = Path(weights_dir), model_dirname(model)
    parts = [name] if _sd_problem(weights_dir / name) else []
    return parts + ([VGG16_RELPATH] if _read_trunk(weights_dir / VGG16_RELPATH, verify)[1] else [])


def check_weights(weights_dir: str | os.PathLike[str], model: str | None = None) -> None:
    """Raise WeightsError naming the problem of each part, or return if all is usable.

    Reads headers only: load_vgg16_features checks the trunk's hash as it reads it."""
    weights_dir, name = Path(weights_dir), model_dirname(model)
    if not weights_dir.is_dir():
        raise WeightsError(
            f"Weights folder {weights_dir} does not exist. {_fix(weights_dir, model)}"
        )
    trunk = weights_dir / VGG16_RELPATH
    old_layout = not trunk.exists() and (weights_dir / LEGACY_VGG16_RELPATH).is_file()
    problems = [_sd_problem(weights_dir / name)]
    problems += [None if old_layout else _read_trunk(trunk)[1]]
    if any(problems):
        fix = _fix(weights_dir, model)
        raise WeightsError(" ".join(f"{p}." for p in problems if p) + f" {fix}")


def read_family(sd_dir: str | os.PathLike[str]) -> Family:
    """The family of a checked model folder (see `family.family_of`)."""
    sd_dir = Path(sd_dir)
    unet, index = (
        json.loads((sd_dir / f).read_text()) for f in ("unet/config.json", "model_index.json")
    )
    family = family_of(unet, index)
    if isinstance(family, str):
        raise WeightsError(f"Weights folder {sd_dir} is not a Stable Diffusion model: {family}")
    return family


def read_model_index(sd_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The folder's model_index.json: its components and pipeline options."""
    return json.loads((Path(sd_dir) / "model_index.json").read_text())


def sd_variant(sd_dir: str | os.PathLike[str]) -> str | None:
    """Return "fp16" if only the fp16 variant files are all in sd_dir, else None (for variant=)."""
    components = _weight_components(Path(sd_dir))

    def has(variant: str) -> bool:
        return all(_weights_file(Path(sd_dir), c, variant).is_file() for c in components)

    return "fp16" if has("fp16") and not has("") else None


def load_vgg16_features(path: str | os.PathLike[str]) -> Features:
    """The trunk's `features.*` tensors, read once and hash-checked; WeightsError if unusable.

    `path` may also be torchvision's whole VGG16 file (`.pth`). Where `path` is absent but
    torchvision's file lies beside it (the old layout), that file is read instead, with a notice."""
    path = Path(path)
    legacy = path.parent / Path(LEGACY_VGG16_RELPATH).name
    # The fix command can name the folder only when the file sits where download puts it.
    fix = _fix(path.parent.parent if path.parent.name == "lpips" else None)
    if path.suffix == ".pth":  # torchvision's whole file, as in the torch hub cache
        features, problem = _read_torchvision_file(path)
    elif not path.exists() and legacy.is_file():
        logger.warning("%s is the old layout; `%s` makes %s of it.", legacy, fix[5:], path.name)
        features, problem = _read_torchvision_file(legacy)
    else:
        features, problem = _read_trunk(path, verify=True)
    if features is None:
        raise WeightsError(f"{problem}. {fix}")
    return features


def save_vgg16_features(features: Features, path: str | os.PathLike[str]) -> None:
    """Write the trunk's tensors as safetensors, with their hash for load_vgg16_features."""
    from safetensors.torch import save_file

    features = {k: v.contiguous() for k, v in features.items()}
    # One metadata key: safetensors writes several in no fixed order, and the file would differ.
    save_file(features, path, metadata={_HASH_KEY: _tensors_sha256(features)})


def download_weights(
    weights_dir: str | os.PathLike[str], progress: bool = True, model: str | None = None
) -> None:
    """Fetch or rebuild what missing_parts(verify=True) reports; a rerun continues a failed one.

    `model` is a hub repository id or a folder name KNOWN_REPOS knows (default: default_model()).
    `progress` governs this module's messages and torch.hub's bar; huggingface_hub's bars follow
    its own switch, HF_HUB_DISABLE_PROGRESS_BARS=1."""
    weights_dir = Path(weights_dir)
    if _sd_problem(weights_dir / model_dirname(model)):
        repo = repo_id(model)  # before anything is written: an unknown name fails cleanly
        weights_dir.mkdir(parents=True, exist_ok=True)
        _download_sd(weights_dir, repo, progress)
    weights_dir.mkdir(parents=True, exist_ok=True)
    if _read_trunk(weights_dir / VGG16_RELPATH, verify=True)[1]:
        _make_trunk(weights_dir, progress)
    with contextlib.suppress(OSError):  # not empty: something else is staged there
        (weights_dir / _PARTIAL_DIRNAME).rmdir()


# --- checks -------------------------------------------------------------------------------
# By hand because no library checks a folder without loading it: diffusers and transformers
# find a missing or broken file part way through a load, deep in a traceback.


def _fix(weights_dir: Path | None, model: str | None = None) -> str:
    model = model or default_model()
    name = model_dirname(model)
    if name == SD_DIRNAME:
        chosen = ""
    elif "/" in model or name in KNOWN_REPOS:
        chosen = f" --model {shlex.quote(model)}"
    else:  # a folder the download does not know: it needs the repository's owner too
        chosen = f" --model OWNER/{shlex.quote(name)}"
    folder = f" --weights {shlex.quote(str(weights_dir))}" if weights_dir is not None else ""
    return f"Run: {DOWNLOAD_COMMAND}{chosen}{folder}"


def _one_line(exc: BaseException) -> str:
    """The exception's type and message on one line, for messages that quote it."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _weight_components(sd_dir: Path) -> tuple[str, ...]:
    """The weight-bearing components of the folder's family (SD's where it cannot be read)."""
    try:
        return read_family(sd_dir).weight_components
    except (OSError, ValueError, WeightsError):
        return SD.weight_components


def _weights_file(sd_dir: Path, component: str, variant: str | None) -> Path:
    infix = f".{variant}" if variant else ""
    return sd_dir / component / f"{_WEIGHT_STEMS[component]}{infix}.safetensors"


def _sd_problem(sd_dir: Path) -> str | None:
    """One sentence on what is wrong with the Stable Diffusion folder, or None."""
    if not sd_dir.is_dir():
        return f"Weights folder {sd_dir} does not exist"
    incomplete = f"Weights folder {sd_dir} is incomplete"
    configs: dict[str, Any] = {}

    def read(files: tuple[str, ...]) -> str | None:
        for rel in files:
            if not (sd_dir / rel).is_file():
                return f"{incomplete}: {rel} is missing"
            try:
                if rel.endswith(".json"):
                    text = (sd_dir / rel).read_text(encoding="utf-8")
                    configs[rel.split("/")[0]] = json.loads(text)
            except (OSError, ValueError) as exc:
                return f"{incomplete}: {rel} is not valid JSON ({exc})"
        return None

    if problem := read(("model_index.json", "unet/config.json")):
        return problem
    if not all(isinstance(configs[c], dict) for c in ("model_index.json", "unet")):
        return f"{incomplete}: model_index.json or unet/config.json is not a JSON object"
    family = family_of(configs["unet"], configs["model_index.json"])
    if isinstance(family, str):
        return f"Weights folder {sd_dir} is not Stable Diffusion 1.x/2.x or SDXL: {family}"
    files = tuple(f"{c}/config.json" for c in family.weight_components[1:])
    files += ("scheduler/scheduler_config.json",)
    files += tuple(f"{t}/{f}" for t in family.tokenizers for f in _TOKENIZER_FILES)
    if problem := read(files):
        return problem
    variant = sd_variant(sd_dir)
    for component in family.weight_components:
        path = _weights_file(sd_dir, component, variant)
        other = _weights_file(sd_dir, component, None if variant else "fp16")
        if not path.is_file() and other.is_file():
            return (
                f"{incomplete}: {component}/{path.name} is missing "
                f"({', '.join(family.weight_components)} must all have full-precision files "
                "or all have *.fp16.safetensors files)"
            )
        if not path.is_file():
            return f"{incomplete}: {component}/ has no weights file ({path.name} or {other.name})"
        try:
            with safe_open(path, framework="pt"):  # checks the header against the file's size
                pass
        except Exception as exc:  # SafetensorError, or OSError for an unreadable file
            size = f"{path.stat().st_size:,} bytes"
            return f"{incomplete}: {component}/{path.name} is truncated or corrupt ({size}; {exc})"
    problem = _architecture_problem(configs, family)
    return f"Weights folder {sd_dir} is not {family.name}: {problem}" if problem else None


def _architecture_problem(configs: dict[str, Any], family: Family) -> str | None:
    """What in the component configs does not fit the family's architecture, or None."""
    if not all(isinstance(configs[c], dict) for c in family.weight_components):
        return f"a config.json of {', '.join(family.weight_components)} is not a JSON object"
    for component, key, expected in _SD_VALUES:
        found = configs[component].get(key, expected)
        if found != expected:
            return f"{component}/config.json has {key} {found}, expected {expected}"
    for component, cls in zip(family.text_encoders, family.text_encoder_classes, strict=True):
        if cls not in (found := configs[component].get("architectures") or [cls]):
            return f"{component}/config.json is for {found}, expected a {cls}"
    # Both families' VAEs have four levels: 8 image pixels per latent pixel.
    if not isinstance(levels := configs["vae"].get("block_out_channels"), list) or len(levels) != 4:
        return f"vae/config.json has block_out_channels {levels}, expected 4 levels (8x)"
    cross = configs["unet"].get("cross_attention_dim")
    # transformers leaves values equal to CLIPTextConfig's defaults out of the files it writes.
    # SDXL's UNet reads both encoders' states side by side: its width is their sum.
    widths = [configs[c].get("hidden_size", 512) for c in family.text_encoders]
    if (set(cross) if isinstance(cross, list) else {cross}) != {sum(widths)}:
        hidden = " and ".join(
            f"{c}/config.json has hidden_size {w}"
            for c, w in zip(family.text_encoders, widths, strict=True)
        )
        total = f" (together {sum(widths)})" if len(widths) > 1 else ""
        return (
            f"{hidden}{total} but unet/config.json has cross_attention_dim {cross}; "
            "they must be equal"
        )
    return None


@cache
def _vgg16_feature_shapes() -> dict[str, tuple[int, ...]]:
    """Names and shapes of torchvision's vgg16().features, keyed as in the full model."""
    import torch
    from torchvision.models.vgg import cfgs, make_layers

    with torch.device("meta"):  # shapes only: nothing allocated or initialised
        trunk = make_layers(cfgs["D"])
    return {f"features.{k}": tuple(v.shape) for k, v in trunk.state_dict().items()}


def _features_problem(path: Path, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What keeps these tensors (name -> shape) from being VGG16's `features`, or None."""
    expected = _vgg16_feature_shapes()
    for key in [*expected, *sorted(set(shapes) - set(expected))]:
        found, want = shapes.get(key), expected.get(key)
        if found != want:
            what = "is missing" if found is None else f"has shape {found}, expected {want}"
            what = "should not be there" if want is None else what
            return f"Weights file {path} is not torchvision's VGG16 features: {key} {what}"
    return None


def _tensors_sha256(tensors: Features) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _read_trunk(path: Path, verify: bool = False) -> tuple[Features | None, str | None]:
    """The trunk's tensors (if `verify`: read and hash-checked) and None, or None and why not."""
    if not path.is_file():
        return None, f"Weights file {path} is missing"
    try:
        with safe_open(path, framework="pt") as f:
            recorded, names = (f.metadata() or {}).get(_HASH_KEY), list(f.keys())
            problem = _features_problem(path, {k: tuple(f.get_slice(k).get_shape()) for k in names})
            tensors = {k: f.get_tensor(k) for k in names} if verify and not problem else {}
    except Exception as exc:  # SafetensorError, or OSError for an unreadable file
        return None, f"Weights file {path} is not a whole safetensors file ({_one_line(exc)})"
    if problem or recorded is None:
        return None, problem or f"Weights file {path} does not record its {_HASH_KEY}"
    if verify and (actual := _tensors_sha256(tensors)) != recorded:
        return None, f"Weights file {path} is damaged: its tensors hash to {actual}, not {recorded}"
    return tensors, None


def _read_torchvision_file(path: Path) -> tuple[Features | None, str | None]:
    """The `features.*` tensors of torchvision's VGG16 state dict in path, or None and why not."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a bad file
        return None, f"Weights file {path} does not load as a PyTorch state dict ({_one_line(exc)})"
    if not isinstance(state, dict):
        return None, f"Weights file {path} holds a {type(state).__name__}, not a state dict"
    features = {k: v for k, v in state.items() if str(k).startswith("features.")}
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in features.items()}
    problem = _features_problem(path, shapes)
    return (None, problem) if problem else (features, None)


# --- downloads ----------------------------------------------------------------------------


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


def _download_sd(weights_dir: Path, repo: str, progress: bool) -> None:
    import huggingface_hub

    # Straight into place: huggingface_hub writes each file under .cache/ and moves it in whole,
    # so a file the loader finds is never half-written; it resumes those it had begun, and
    # re-hashes files it did not record (or that changed since) and fetches those that differ.
    sd_dir = weights_dir / model_dirname(repo)
    fix = _fix(weights_dir, None if repo == SD_REPO_ID else repo)
    _say(progress, f"Downloading {repo} (fp16 files where it has them) into {sd_dir}")

    def fetch(patterns: list[str]) -> None:
        try:
            huggingface_hub.snapshot_download(repo, local_dir=sd_dir, allow_patterns=patterns)
        except Exception as exc:  # network and hub errors come in many types
            raise WeightsError(
                f"Downloading {repo} into {sd_dir} failed ({_one_line(exc)}). The files "
                f"fetched so far are kept and a rerun continues. {fix}"
            ) from exc

    fetch(_SD_ALLOW_PATTERNS + _FP16_PATTERNS)
    components = _weight_components(sd_dir)
    if not all(_weights_file(sd_dir, c, "fp16").is_file() for c in components):
        fetch(_FULL_PATTERNS)
    problem = _sd_problem(sd_dir)
    if problem:
        raise WeightsError(f"Downloaded {repo}, but {problem}. {fix}")
    _say(progress, f"{repo} is in {sd_dir}")


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _make_trunk(weights_dir: Path, progress: bool) -> None:
    """Fetch torchvision's VGG16 (or take the old layout's copy), check its whole sha256, and
    keep only the trunk LPIPS reads."""
    import torch

    staging = weights_dir / _PARTIAL_DIRNAME
    source = staging / Path(VGG16_URL).name
    staging.mkdir(parents=True, exist_ok=True)
    if (weights_dir / LEGACY_VGG16_RELPATH).is_file():
        os.replace(weights_dir / LEGACY_VGG16_RELPATH, source)
    # torch.hub cannot resume, so a file fetched whole by an earlier run is kept if it checks out.
    if source.is_file() and _sha256(source) != VGG16_SHA256:
        _say(progress, f"{source} is not torchvision's VGG16 (its sha256 differs); replacing it")
        source.unlink()
    if not source.is_file():
        _say(progress, f"Downloading {VGG16_URL} into {staging}")
        try:
            torch.hub.download_url_to_file(VGG16_URL, str(source), VGG16_SHA256, progress)
        except Exception as exc:  # network errors, and RuntimeError for a wrong sha256
            raise WeightsError(
                f"Downloading {VGG16_URL} into {staging} failed ({_one_line(exc)}); nothing was "
                f"kept. {_fix(weights_dir)}"
            ) from exc
    features, problem = _read_torchvision_file(source)
    if features is None:
        raise WeightsError(f"{problem}. {_fix(weights_dir)}")
    final, written = weights_dir / VGG16_RELPATH, staging / Path(VGG16_RELPATH).name
    save_vgg16_features(features, written)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(written, final)
    source.unlink()
    _say(progress, f"The LPIPS trunk ({final.stat().st_size:,} bytes) is in {final}")
