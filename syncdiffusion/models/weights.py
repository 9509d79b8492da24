"""Model weights on disk: the layout (weights/README.md), checking it, downloading it.

A weights folder holds one folder per model, named after its hub repository (`folders`
checks one), the LPIPS trunk (`lpips_trunk`), and ControlNets in `controlnet/`, one folder each,
likewise named. huggingface_hub downloads a model or a ControlNet (resuming; each file verified,
then moved into place), each file then held to the hash the hub publishes and recorded
(`folders.write_source`); torch.hub downloads torchvision's VGG16 for the trunk. Whatever is wrong
surfaces as WeightsError, whose message names the path and the command that fixes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import WeightsError, one_line
from . import lpips_trunk
from .family import controlnet_problem
from .folders import (
    changed_files,
    controlnet_folder_problem,
    controlnet_patterns,
    controlnet_variant,
    folder_problem,
    git_blob_id,
    hub_patterns,
    read_source,
    sd_variant,
    sha256_of,
    share,
    write_source,
)
from .lpips_trunk import LEGACY_VGG16_RELPATH, VGG16_RELPATH

WEIGHTS_ENV, MODEL_ENV = "SYNCDIFFUSION_WEIGHTS", "SYNCDIFFUSION_MODEL"
CONTROLNET_ENV = "SYNCDIFFUSION_CONTROLNET"  # the ControlNet of a ControlNet Cog model
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
        # An inpainting UNet (9 input channels): for `image` with `mask`, and outpainting.
        "stabilityai/stable-diffusion-2-inpainting",
        # Few-step models: their defaults are request/presets.py's.
        "stabilityai/sd-turbo",
        "stabilityai/sdxl-turbo",
    )
}
CONTROLNET_DIRNAME = "controlnet"  # ControlNets sit in <weights>/controlnet/<repository name>/
# ControlNets `download_weights.py --controlnet` knows by their folder name alone.
KNOWN_CONTROLNETS = {
    repo.split("/")[1]: repo
    for repo in (
        "lllyasviel/sd-controlnet-canny",  # SD 1.5, canny edges
        "monster-labs/control_v1p_sd15_qrcode_monster",  # SD 1.5, QR codes (the authors' example)
        "diffusers/controlnet-canny-sdxl-1.0",  # SDXL, canny edges
    )
}
_PARTIAL_DIRNAME = ".partial"  # torchvision's file waits here, outside what the loader reads


def default_weights_dir() -> Path:
    """The weights folder: $SYNCDIFFUSION_WEIGHTS if set, else ./weights."""
    return Path(os.environ.get(WEIGHTS_ENV) or "weights")


def default_model() -> str:
    """The model: $SYNCDIFFUSION_MODEL if set, else SD 2.0-base."""
    return os.environ.get(MODEL_ENV) or SD_DIRNAME


def model_dirname(model: str | None = None) -> str:
    """The folder under weights/ of `model`, a folder name or a hub repository id (owner/name)
    whose name part names the folder; None: the default model."""
    return _dirname(model or default_model(), "model", "the weights folder")


def repo_id(model: str | None = None) -> str:
    """The hub repository `model` is downloaded from: itself if an id, else a known folder's."""
    return _repo_id(model or default_model(), _MODEL)


def controlnet_dir(weights_dir: str | os.PathLike[str], name: str) -> Path:
    """The folder of ControlNet `name` (a hub repository id, whose name part names the folder,
    or a folder name): <weights>/controlnet/<name>."""
    where = f"{CONTROLNET_DIRNAME}/ in the weights folder"
    return Path(weights_dir) / CONTROLNET_DIRNAME / _dirname(name, "controlnet", where)


def controlnet_repo_id(name: str) -> str:
    """The hub repository ControlNet `name` is downloaded from: itself if an id, else a known
    folder's (KNOWN_CONTROLNETS)."""
    return _repo_id(name, _CONTROLNET)


def _dirname(name: str, what: str, where: str) -> str:
    folder = name.rstrip("/").rsplit("/", 1)[-1]
    if not folder or folder.startswith(".") or name.count("/") > 1:
        raise WeightsError(
            f"{what} must be a folder name under {where} or a hub repository id (owner/name); "
            f"got {name!r}"
        )
    return folder


def _repo_id(name: str, kind: _Kind) -> str:
    if "/" not in name and name not in kind.known:
        raise WeightsError(
            f"{kind.what} {name!r} is not a hub repository id (owner/name) nor one of the "
            f"folders download_weights knows: {', '.join(kind.known)}"
        )
    return name if "/" in name else kind.known[name]


def missing_parts(
    weights_dir: str | os.PathLike[str], verify: bool = False, model: str | None = None
) -> list[str]:
    """The parts (the model's folder, VGG16_RELPATH) download_weights would fetch or rebuild:
    absent, broken, or (the trunk) in the old layout. `verify` also re-hashes the trunk and
    every file the download recorded (`folders.changed_files`): bytes changed since."""
    weights_dir, name = Path(weights_dir), model_dirname(model)
    folder = weights_dir / name
    broken = folder_problem(folder) or (verify and changed_files(folder))
    parts = [name] if broken else []
    trunk_problem = lpips_trunk.read_trunk(weights_dir / VGG16_RELPATH, verify)[1]
    return parts + ([VGG16_RELPATH] if trunk_problem else [])


def check_weights(weights_dir: str | os.PathLike[str], model: str | None = None) -> None:
    """Raise WeightsError naming the problem of each part, or return if all is usable.

    Reads headers only: perceptual.load_vgg16_features checks the trunk's hash as it reads it."""
    weights_dir, fix = Path(weights_dir), fix_command(Path(weights_dir), model)
    if not weights_dir.is_dir():
        raise WeightsError(f"Weights folder {weights_dir} does not exist. {fix}")
    # A repository id, or a name download_weights knows (its repository): the folder holds it.
    if "/" in (model := model or default_model()) or model in KNOWN_REPOS:
        _check_source(weights_dir, repo_id(model), _MODEL)
    trunk = weights_dir / VGG16_RELPATH
    old_layout = not trunk.exists() and (weights_dir / LEGACY_VGG16_RELPATH).is_file()
    problems = [folder_problem(weights_dir / model_dirname(model))]
    problems += [None if old_layout else lpips_trunk.read_trunk(trunk)[1]]
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
    _check_source(weights_dir, repo_id(model), _MODEL)  # an unknown name fails first
    if _stale(weights_dir / model_dirname(model), _MODEL):
        fix = fix_command(weights_dir, None if repo_id(model) == SD_REPO_ID else repo_id(model))
        _download(weights_dir, repo_id(model), _MODEL, fix, progress)
    if lpips_trunk.read_trunk(weights_dir / VGG16_RELPATH, verify=True)[1]:
        _make_trunk(weights_dir, progress)
    with contextlib.suppress(OSError):  # not empty: something else is staged there
        (weights_dir / _PARTIAL_DIRNAME).rmdir()


# --- ControlNets ---------------------------------------------------------------------------


def check_controlnet(weights_dir: str | os.PathLike[str], name: str) -> Path:
    """Return the folder of ControlNet `name` (see controlnet_dir) if it is complete, else
    raise WeightsError naming the folder, what is wrong and the command that fixes it.

    Reads the config and the weights file's header only, as check_weights does for models."""
    weights_dir, fix = Path(weights_dir), controlnet_fix_command(Path(weights_dir), name)
    if "/" in name or name in KNOWN_CONTROLNETS:  # a repository's: the folder holds it
        _check_source(weights_dir, controlnet_repo_id(name), _CONTROLNET)
    folder = controlnet_dir(weights_dir, name)
    if problem := controlnet_folder_problem(folder):
        raise WeightsError(f"{problem}. {fix}")
    return folder


def download_controlnet(
    weights_dir: str | os.PathLike[str], name: str, progress: bool = True
) -> Path:
    """Fetch ControlNet `name` (a hub repository id or a folder KNOWN_CONTROLNETS names) into
    controlnet_dir(weights_dir, name) unless it is complete there; return that folder.

    As download_weights fetches a model: the fp16 file where the repository has one, the source
    recorded, a rerun continuing a failed download."""
    weights_dir = Path(weights_dir)
    repo = controlnet_repo_id(name)  # an unknown name fails first
    _check_source(weights_dir, repo, _CONTROLNET)
    folder = controlnet_dir(weights_dir, repo)
    if _stale(folder, _CONTROLNET):
        fix = controlnet_fix_command(weights_dir, name)
        _download(weights_dir, repo, _CONTROLNET, fix, progress)
    return folder


def check_controlnet_fits(model_dir: Path, controlnet_dir: Path) -> None:
    """Raise WeightsError naming both folders and each difference if the ControlNet's residuals
    or inputs do not fit the model's UNet (`family.controlnet_problem`)."""

    def config(path: Path) -> dict:
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise WeightsError(f"{path} cannot be read ({one_line(exc)})") from exc
        if not isinstance(found, dict):
            raise WeightsError(f"{path} is not a JSON object")
        return found

    unet = config(Path(model_dir) / "unet" / "config.json")
    if problem := controlnet_problem(config(Path(controlnet_dir) / "config.json"), unet):
        raise WeightsError(f"{controlnet_dir} does not fit {model_dir}: {problem}")


# --- messages and downloads ---------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    """What differs between a model and a ControlNet, for naming, checking and fetching one."""

    what: str  # as download_weights.py's option names one (--model, --controlnet)
    plural: str  # in messages
    known: dict[str, str]  # folder name -> hub repository, for those the download knows
    folder: Callable[[Path, str], Path]  # (weights folder, repository id) -> its folder
    problem: Callable[[Path], str | None]  # what is wrong with a folder, or None
    patterns: Callable[[str | None], list[str]]  # what to fetch of its repository, by variant
    variant: Callable[[Path], str | None]  # the variant a folder holds


_MODEL = _Kind(
    "model",
    "models",
    KNOWN_REPOS,
    lambda weights_dir, repo: weights_dir / model_dirname(repo),
    folder_problem,
    hub_patterns,
    sd_variant,
)
_CONTROLNET = _Kind(
    "controlnet",
    "ControlNets",
    KNOWN_CONTROLNETS,
    controlnet_dir,
    controlnet_folder_problem,
    controlnet_patterns,
    controlnet_variant,
)


def fix_command(weights_dir: Path | None, model: str | None = None) -> str:
    """ "Run: <the download command>" that fills `weights_dir` with `model` (default: the
    default model); without a folder, the command for the default one."""
    model = model or default_model()
    chosen = "" if model_dirname(model) == SD_DIRNAME else _option(_MODEL, model)
    folder = f" --weights {shlex.quote(str(weights_dir))}" if weights_dir is not None else ""
    return f"Run: {DOWNLOAD_COMMAND}{chosen}{folder}"


def controlnet_fix_command(weights_dir: Path, name: str) -> str:
    """ "Run: <the download command>" that puts ControlNet `name` in `weights_dir`."""
    folder = shlex.quote(str(weights_dir))
    return f"Run: {DOWNLOAD_COMMAND}{_option(_CONTROLNET, name)} --weights {folder}"


def _option(kind: _Kind, name: str) -> str:
    """The download's option that names `name`, or with a folder name the download does not
    know, the repository id to fill in (it needs the owner too)."""
    known = "/" in name or name in kind.known
    return f" --{kind.what} {shlex.quote(name) if known else 'OWNER/' + shlex.quote(name)}"


def _check_source(weights_dir: Path, repo: str, kind: _Kind) -> None:
    """Raise WeightsError if the folder of `repo` records another repository of the same name."""
    folder = kind.folder(weights_dir, repo)
    held = (read_source(folder) or {}).get("repo_id", repo)
    if held != repo:
        other = shlex.quote(f"{weights_dir}-{repo.split('/')[0]}")
        raise WeightsError(
            f"Weights folder {folder} holds {held}, not {repo}: {kind.plural} of one name share "
            f"a folder. Remove {folder} to put {repo} there, or keep both with another weights "
            f"folder for {repo}: {DOWNLOAD_COMMAND}{_option(kind, repo)} --weights {other}, "
            f"then set {WEIGHTS_ENV}={other} (or pass --weights {other})"
        )


def _stale(folder: Path, kind: _Kind) -> bool:
    """Whether `folder` needs a download: broken, or holding files whose bytes changed since
    the download recorded them, which are removed first so that it fetches them again."""
    changed = changed_files(folder)
    for rel in changed:
        (folder / rel).unlink(missing_ok=True)
    return bool(changed) or kind.problem(folder) is not None


def _checked_against_hub(folder: Path, siblings: list[Any], fix: str) -> dict[str, dict]:
    """Each file of `folder` the hub lists, held to what it publishes (an LFS file's sha256,
    another's git object id, and the size); the record of their sizes and sha256s. A file that
    differs is removed, so that a rerun fetches it again, and raises WeightsError."""
    files: dict[str, dict] = {}
    for sibling in siblings:
        path = folder / sibling.rfilename
        if not path.is_file():
            continue  # not fetched (the patterns leave it out)
        sha256 = sha256_of(path)
        lfs = getattr(sibling, "lfs", None)
        if lfs is not None:
            what, published, got = "sha256", lfs.sha256, sha256
        else:
            what, published, got = "git object id", sibling.blob_id, git_blob_id(path)
        if published is not None and got != published:
            path.unlink()
            raise WeightsError(
                f"Downloaded {path}, but its {what} is {got} where the hub publishes "
                f"{published}: it was removed; a rerun fetches it again. {fix}"
            )
        files[sibling.rfilename] = {"size": path.stat().st_size, "sha256": sha256}
    return files


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


def _entries(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


def _download(weights_dir: Path, repo: str, kind: _Kind, fix: str, progress: bool) -> None:
    import huggingface_hub

    # Straight into place: huggingface_hub writes each file under .cache/ and moves it in whole,
    # so a file the loader finds is never half-written; it resumes those it had begun, and
    # re-hashes files it did not record (or that changed since) and fetches those that differ.
    folder = kind.folder(weights_dir, repo)
    if read_source(folder) is None and any(p.name != ".cache" for p in _entries(folder)):
        problem = kind.problem(folder)
        raise WeightsError(
            f"{problem}, and no download recorded whose files it holds (made by hand or by an "
            f"older version), so {repo}'s files are not merged into it: remove {folder}, then "
            f"run the command again. {fix}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if hub_offline():
        raise _offline_error(f"{repo} in {folder}", fix)
    _say(progress, f"Downloading {repo} (fp16 files where it has them) into {folder}")

    def failed(exc: Exception) -> WeightsError:
        return WeightsError(
            f"Downloading {repo} into {folder} failed ({one_line(exc)}). The files "
            f"fetched so far are kept and a rerun continues. {fix}"
        )

    # One revision for both fetches, recorded before the first file lands: the folder says
    # whose files it holds even when a download stops part way.
    # What the hub publishes of each file (sizes, sha256s) comes with it, for checking them.
    try:
        info = huggingface_hub.model_info(repo, files_metadata=True)
    except Exception as exc:  # network and hub errors come in many types
        raise failed(exc) from exc
    revision = info.sha
    write_source(folder, repo, revision)

    def fetch(variant: str | None) -> None:
        try:
            huggingface_hub.snapshot_download(
                repo, revision=revision, local_dir=folder, allow_patterns=kind.patterns(variant)
            )
        except Exception as exc:  # the same
            raise failed(exc) from exc

    fetch("fp16")
    if kind.variant(folder) != "fp16":  # a repository without fp16 files (fine-tunes often)
        fetch(None)
    share(folder, weights_dir)  # readable by the image's worker, whoever it runs as
    write_source(folder, repo, revision, _checked_against_hub(folder, info.siblings or [], fix))
    if problem := kind.problem(folder):
        raise WeightsError(f"Downloaded {repo}, but {problem}. {fix}")
    _say(progress, f"{repo} is in {folder}")


def _make_trunk(weights_dir: Path, progress: bool) -> None:
    """Fetch torchvision's VGG16 (or take the old layout's copy) and keep what LPIPS reads."""
    staging, fix = weights_dir / _PARTIAL_DIRNAME, fix_command(weights_dir)
    source = staging / Path(LEGACY_VGG16_RELPATH).name
    staging.mkdir(parents=True, exist_ok=True)
    if (weights_dir / LEGACY_VGG16_RELPATH).is_file():
        os.replace(weights_dir / LEGACY_VGG16_RELPATH, source)
    if hub_offline() and not source.is_file():
        raise _offline_error(f"the LPIPS trunk {weights_dir / VGG16_RELPATH}", fix)
    _say(progress, f"Making the LPIPS trunk from {lpips_trunk.VGG16_URL} in {staging}")
    try:
        lpips_trunk.fetch_torchvision_file(source, progress)
    except Exception as exc:  # network errors, and RuntimeError for a wrong sha256
        raise WeightsError(
            f"Downloading {lpips_trunk.VGG16_URL} into {staging} failed ({one_line(exc)}); "
            f"nothing was kept. {fix}"
        ) from exc
    features, problem = lpips_trunk.read_torchvision_file(source)
    if features is None:
        raise WeightsError(f"{problem}. {fix}")
    final, written = weights_dir / VGG16_RELPATH, staging / Path(VGG16_RELPATH).name
    lpips_trunk.save_trunk(features, written)
    final.parent.mkdir(exist_ok=True)
    os.replace(written, final)
    share(final, weights_dir)
    source.unlink()
    _say(progress, f"The LPIPS trunk ({final.stat().st_size:,} bytes) is in {final}")
