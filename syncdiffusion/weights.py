"""Model weights on disk: the layout (weights/README.md), checking it, downloading it.

A weights folder holds one folder per model, named after its hub repository (`model_folder`
checks one), and the LPIPS trunk (`perceptual`). huggingface_hub downloads a model (resuming;
each file verified, then moved into place); torch.hub downloads torchvision's VGG16 for the
trunk. Whatever is wrong surfaces as WeightsError, whose message names the path and the command
that fixes it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from pathlib import Path

from . import perceptual
from .model_folder import folder_problem, hub_patterns, read_source, sd_variant, write_source
from .perceptual import LEGACY_VGG16_RELPATH, VGG16_RELPATH, one_line

WEIGHTS_ENV, MODEL_ENV = "SYNCDIFFUSION_WEIGHTS", "SYNCDIFFUSION_MODEL"
OFFLINE_ENV = "HF_HUB_OFFLINE"
# The values huggingface_hub reads as true (its constants._is_true), in any case.
_TRUE = {"1", "ON", "YES", "TRUE"}
DOWNLOAD_COMMAND = "python scripts/download_weights.py"
SD_REPO_ID = "stabilityai/stable-diffusion-2-base"  # the default model
SD_DIRNAME = "stable-diffusion-2-base"  # each model's folder is named after its hub repository
# Repositories `download_weights.py --model` knows by their folder name alone; any other is
# named by its repository id (owner/name).
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
CONTROLNET_DIRNAME = "controlnet"  # ControlNets sit in <weights>/controlnet/<repository name>/
_PARTIAL_DIRNAME = ".partial"  # torchvision's file waits here, outside what the loader reads


class WeightsError(RuntimeError):
    """Weights on disk are missing, incomplete or not this model's; the message says the fix."""


def default_weights_dir() -> Path:
    """The weights folder: $SYNCDIFFUSION_WEIGHTS if set, else ./weights."""
    return Path(os.environ.get(WEIGHTS_ENV) or "weights")


def default_model() -> str:
    """The model: $SYNCDIFFUSION_MODEL if set, else SD 2.0-base."""
    return os.environ.get(MODEL_ENV) or SD_DIRNAME


def model_dirname(model: str | None = None) -> str:
    """The folder under weights/ of `model`, a folder name or a hub repository id (owner/name)
    whose name part names the folder; None: the default model."""
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
    if "/" not in model and model not in KNOWN_REPOS:
        raise WeightsError(
            f"model {model!r} is not a hub repository id (owner/name) nor one of the folders "
            f"download_weights knows: {', '.join(KNOWN_REPOS)}"
        )
    return model if "/" in model else KNOWN_REPOS[model]


def missing_parts(
    weights_dir: str | os.PathLike[str], verify: bool = False, model: str | None = None
) -> list[str]:
    """The parts (the model's folder, VGG16_RELPATH) download_weights would fetch or rebuild:
    absent, broken, or (the trunk) in the old layout. `verify` also checks the trunk's hash."""
    weights_dir, name = Path(weights_dir), model_dirname(model)
    parts = [name] if folder_problem(weights_dir / name) else []
    trunk_problem = perceptual.read_trunk(weights_dir / VGG16_RELPATH, verify)[1]
    return parts + ([VGG16_RELPATH] if trunk_problem else [])


def check_weights(weights_dir: str | os.PathLike[str], model: str | None = None) -> None:
    """Raise WeightsError naming the problem of each part, or return if all is usable.

    Reads headers only: perceptual.load_vgg16_features checks the trunk's hash as it reads it."""
    weights_dir, fix = Path(weights_dir), _fix(Path(weights_dir), model)
    if not weights_dir.is_dir():
        raise WeightsError(f"Weights folder {weights_dir} does not exist. {fix}")
    if "/" in (model := model or default_model()):  # a repository id: the folder holds it
        _check_source(weights_dir, model)
    trunk = weights_dir / VGG16_RELPATH
    old_layout = not trunk.exists() and (weights_dir / LEGACY_VGG16_RELPATH).is_file()
    problems = [folder_problem(weights_dir / model_dirname(model))]
    problems += [None if old_layout else perceptual.read_trunk(trunk)[1]]
    if any(problems):
        raise WeightsError(" ".join(f"{p}." for p in problems if p) + f" {fix}")


def download_weights(
    weights_dir: str | os.PathLike[str], progress: bool = True, model: str | None = None
) -> None:
    """Fetch or rebuild what missing_parts(verify=True) reports; a rerun continues a failed one.

    `model`: a hub repository id or a folder KNOWN_REPOS names (default: default_model()).
    `progress` governs this module's messages and torch.hub's bar; huggingface_hub's bars follow
    its own switch, HF_HUB_DISABLE_PROGRESS_BARS=1."""
    weights_dir = Path(weights_dir)
    _check_source(weights_dir, repo_id(model))  # an unknown name fails first
    if folder_problem(weights_dir / model_dirname(model)):
        _download_sd(weights_dir, repo_id(model), progress)
    if perceptual.read_trunk(weights_dir / VGG16_RELPATH, verify=True)[1]:
        _make_trunk(weights_dir, progress)
    with contextlib.suppress(OSError):  # not empty: something else is staged there
        (weights_dir / _PARTIAL_DIRNAME).rmdir()


# --- messages and downloads ---------------------------------------------------------------


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


def _check_source(weights_dir: Path, repo: str) -> None:
    """Raise WeightsError if the folder of `repo` records another repository of the same name."""
    sd_dir = weights_dir / model_dirname(repo)
    held = (read_source(sd_dir) or {}).get("repo_id", repo)
    if held != repo:
        other = shlex.quote(f"{weights_dir}-{repo.split('/')[0]}")
        raise WeightsError(
            f"Weights folder {sd_dir} holds {held}, not {repo}: models of one name share a "
            f"folder. Remove {sd_dir} to put {repo} there, or keep both with another weights "
            f"folder for {repo}: {DOWNLOAD_COMMAND} --model {shlex.quote(repo)} --weights "
            f"{other}, then set {WEIGHTS_ENV}={other} (or pass --weights {other})"
        )


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids downloads, read now and as huggingface_hub reads it (1,
    true, yes or on, in any case). It holds for every download here, torch.hub's too."""
    return os.environ.get(OFFLINE_ENV, "").strip().upper() in _TRUE


def _offline_error(what: str, fix: str) -> WeightsError:
    return WeightsError(
        f"{what} is missing and {OFFLINE_ENV}={os.environ.get(OFFLINE_ENV)} forbids downloads; "
        f"unset it to download. {fix}"
    )


def _download_sd(weights_dir: Path, repo: str, progress: bool) -> None:
    import huggingface_hub

    # Straight into place: huggingface_hub writes each file under .cache/ and moves it in whole,
    # so a file the loader finds is never half-written; it resumes those it had begun, and
    # re-hashes files it did not record (or that changed since) and fetches those that differ.
    sd_dir = weights_dir / model_dirname(repo)
    sd_dir.mkdir(parents=True, exist_ok=True)
    fix = _fix(weights_dir, None if repo == SD_REPO_ID else repo)
    if hub_offline():
        raise _offline_error(f"{repo} in {sd_dir}", fix)
    _say(progress, f"Downloading {repo} (fp16 files where it has them) into {sd_dir}")

    def failed(exc: Exception) -> WeightsError:
        return WeightsError(
            f"Downloading {repo} into {sd_dir} failed ({one_line(exc)}). The files "
            f"fetched so far are kept and a rerun continues. {fix}"
        )

    # One revision for both fetches, recorded before the first file lands: the folder says
    # whose files it holds even when a download stops part way.
    try:
        revision = huggingface_hub.model_info(repo).sha
    except Exception as exc:  # network and hub errors come in many types
        raise failed(exc) from exc
    write_source(sd_dir, repo, revision)

    def fetch(variant: str | None) -> None:
        try:
            huggingface_hub.snapshot_download(
                repo, revision=revision, local_dir=sd_dir, allow_patterns=hub_patterns(variant)
            )
        except Exception as exc:  # the same
            raise failed(exc) from exc

    fetch("fp16")
    if sd_variant(sd_dir) != "fp16":  # a repository without fp16 files (fine-tunes often)
        fetch(None)
    if problem := folder_problem(sd_dir):
        raise WeightsError(f"Downloaded {repo}, but {problem}. {fix}")
    _say(progress, f"{repo} is in {sd_dir}")


def _make_trunk(weights_dir: Path, progress: bool) -> None:
    """Fetch torchvision's VGG16 (or take the old layout's copy) and keep what LPIPS reads."""
    staging, fix = weights_dir / _PARTIAL_DIRNAME, _fix(weights_dir)
    source = staging / Path(LEGACY_VGG16_RELPATH).name
    staging.mkdir(parents=True, exist_ok=True)
    if (weights_dir / LEGACY_VGG16_RELPATH).is_file():
        os.replace(weights_dir / LEGACY_VGG16_RELPATH, source)
    if hub_offline() and not source.is_file():
        raise _offline_error(f"the LPIPS trunk {weights_dir / VGG16_RELPATH}", fix)
    _say(progress, f"Making the LPIPS trunk from {perceptual.VGG16_URL} in {staging}")
    try:
        perceptual.fetch_torchvision_file(source, progress)
    except Exception as exc:  # network errors, and RuntimeError for a wrong sha256
        raise WeightsError(
            f"Downloading {perceptual.VGG16_URL} into {staging} failed ({one_line(exc)}); "
            f"nothing was kept. {fix}"
        ) from exc
    features, problem = perceptual.read_torchvision_file(source)
    if features is None:
        raise WeightsError(f"{problem}. {fix}")
    final, written = weights_dir / VGG16_RELPATH, staging / Path(VGG16_RELPATH).name
    perceptual.save_trunk(features, written)
    final.parent.mkdir(exist_ok=True)
    os.replace(written, final)
    source.unlink()
    _say(progress, f"The LPIPS trunk ({final.stat().st_size:,} bytes) is in {final}")
