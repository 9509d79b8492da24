"""A model's folder in diffusers' layout: what each family's folder holds, checked unloaded;
likewise a ControlNet's folder.

By hand because no library checks a folder without loading it: diffusers and transformers find
a missing or broken file part way through a load, deep in a traceback. Here every file the
family needs is looked for, every JSON file parsed, every weights file's header checked by
safetensors against the file's size, and the configs held to the family's architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .family import SD, Family, architecture_problem, family_of

# diffusers' and transformers' weights file stems; the fp16 variant adds ".fp16" before the suffix.
_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
_STEMS |= {"text_encoder": "model", "text_encoder_2": "model"}
_TOKENIZER_FILES = ("tokenizer_config.json", "vocab.json", "merges.txt")
_FAMILY_FILES = ("unet/config.json", "model_index.json")  # what a folder's family is read from
# Written by the download beside model_index.json: the hub repository and revision the folder
# holds, since a folder is named after the repository's name alone (not its owner).
SOURCE_FILE = "syncdiffusion-source.json"


def share(path: str | os.PathLike[str], top: str | os.PathLike[str] | None = None) -> None:
    """Let every user read the weights at `path`: a file (0644), or a folder (0755) and all in
    it; with `top`, also the folders from `top` down to `path`. safetensors' `save_file` writes
    0600 and a download follows the umask, while a Cog image's worker may run as another user
    than the one that fetched the weights. Bits are only added, never taken away."""
    path = Path(path)
    chain = [path, *path.parents[: len(path.relative_to(top).parts)]] if top else [path]
    for folder in chain[1:]:
        folder.chmod(folder.stat().st_mode | 0o755)
    found = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in found:
        if not item.is_symlink():
            item.chmod(item.stat().st_mode | (0o755 if item.is_dir() else 0o644))


def read_source(sd_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What the download recorded in a model folder: {"repo_id": ..., "revision": ...}; None
    for a folder it did not make (made by hand, by an older version) or an unreadable record."""
    try:
        source = json.loads((Path(sd_dir) / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return source if isinstance(source, dict) and isinstance(source.get("repo_id"), str) else None


def write_source(
    sd_dir: str | os.PathLike[str],
    repo_id: str,
    revision: str | None,
    files: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Record in a model folder which hub repository and revision it holds, and once fetched
    and checked against what the hub publishes, each file's size and sha256 (`files`)."""
    record: dict[str, Any] = {"repo_id": repo_id, "revision": revision}
    if files is not None:
        record["files"] = files
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    (Path(sd_dir) / SOURCE_FILE).write_text(text, encoding="utf-8")


def sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def git_blob_id(path: Path) -> str:
    """A file's git object id (the sha1 of "blob <size>\\0" and its bytes): what the hub
    publishes of a file kept in git rather than LFS (configs, tokenizer files)."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def recorded_files(folder: Path) -> dict[str, dict[str, Any]]:
    """The files the download recorded in `folder` (relative path -> {"size", "sha256"})."""
    files = (read_source(folder) or {}).get("files")
    return files if isinstance(files, dict) else {}


def size_problem(folder: Path, noun: str) -> str | None:
    """A file the download recorded that is gone or has another size now, or None: a stat each,
    cheap enough for every load (the bytes themselves: `changed_files`)."""
    for rel, record in sorted(recorded_files(folder).items()):
        path = folder / rel
        size = path.stat().st_size if path.is_file() else None
        if size != record.get("size"):
            now = "is missing" if size is None else f"is {size:,} bytes"
            return (
                f"{noun} {folder} is incomplete: {rel} {now}, where the download recorded "
                f"{record.get('size'):,} bytes checked against the hub"
            )
    return None


def changed_files(folder: Path) -> list[str]:
    """The files the download recorded whose bytes no longer hash to the recorded sha256 (each
    file read whole: the download command's check, not the load's)."""
    return [
        rel
        for rel, record in sorted(recorded_files(folder).items())
        if not (folder / rel).is_file() or sha256_of(folder / rel) != record.get("sha256")
    ]


def read_family(sd_dir: str | os.PathLike[str]) -> Family:
    """The family of a model folder (see `family.family_of`); ValueError if it is neither."""
    unet, index = (json.loads((Path(sd_dir) / f).read_text()) for f in _FAMILY_FILES)
    family = family_of(unet, index)
    if isinstance(family, str):
        raise ValueError(f"Weights folder {sd_dir} is not a Stable Diffusion model: {family}")
    return family


def sd_variant(sd_dir: str | os.PathLike[str]) -> str | None:
    """The weights files' variant for diffusers' `variant=`: "fp16" if the folder holds only
    the fp16 files, else None."""
    try:
        components = read_family(sd_dir).weight_components
    except (OSError, ValueError):  # unreadable: folder_problem says why
        components = SD.weight_components
    return _variant(Path(sd_dir), lambda v: [weights_file(c, v) for c in components])


def _variant(folder: Path, files: Callable[[str | None], list[str]]) -> str | None:
    """The variant "fp16" if the folder holds all of `files("fp16")` and not all of
    `files(None)`, else None."""

    def has(variant: str | None) -> bool:
        return all((folder / rel).is_file() for rel in files(variant))

    return "fp16" if has("fp16") and not has(None) else None


def weights_file(component: str, variant: str | None) -> str:
    """A component's weights file in the folder, e.g. unet/diffusion_pytorch_model.safetensors."""
    return f"{component}/{_STEMS[component]}{'.' + variant if variant else ''}.safetensors"


def tensors_problem(path: Path, expected: dict[str, tuple[int, ...]], config: str) -> str | None:
    """What the weights file at `path` lacks of the tensors (name -> shape) that the network its
    `config` (a config.json, as a message names it) describes holds, or has in another shape;
    None if it has them all. Read from the file's header alone. Tensors the network does not
    hold are left alone (loaders skip them: an old text encoder's `position_ids`)."""
    with safe_open(path, framework="pt") as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118

    def shape(dims: tuple[int, ...]) -> str:
        return "x".join(map(str, dims)) or "a scalar"

    missing = [name for name in expected if name not in found]
    reshaped = [name for name in expected if name in found and found[name] != expected[name]]
    problems = []
    if missing:
        others = [name for name in found if name not in expected]
        held = f"; it holds {len(others)} others, such as {others[0]}" if others else ""
        problems.append(
            f"{len(missing)} of its {len(expected)} tensors are missing, such as "
            f"{missing[0]} ({shape(expected[missing[0]])}){held}"
        )
    if reshaped:
        name = reshaped[0]
        problems.append(
            f"{len(reshaped)} of its {len(expected)} tensors have another shape, such as "
            f"{name}: {shape(found[name])} in the file, {shape(expected[name])} by {config}"
        )
    if not problems:
        return None
    return (
        f"Weights file {path} does not hold the network {config} describes (another model's "
        f"file?): {'; '.join(problems)}"
    )


def hub_patterns(variant: str | None) -> list[str]:
    """What to fetch of a hub repository: only what diffusers reads (the repositories also
    hold .bin copies, other precisions and single-file checkpoints)."""
    files = ["model_index.json", "scheduler/*.json", "tokenizer/*", "tokenizer_2/*"]
    return files + [f"{c}/config.json" for c in _STEMS] + [weights_file(c, variant) for c in _STEMS]


def _file_problem(folder: Path, rel: str, configs: dict[str, Any], noun: str) -> str | None:
    """What is wrong with one file of a folder (absent, a safetensors header that does not match
    the file's size, a JSON file that does not parse), or None. A JSON file's content goes into
    `configs` under its first path part (the component, or the file's own name at the top)."""
    path, incomplete = folder / rel, f"{noun} {folder} is incomplete"
    if not path.is_file():
        return f"{incomplete}: {rel} is missing"
    if rel.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt"):  # checks the header against the file size
                return None
        except Exception as exc:  # SafetensorError, or OSError for an unreadable file
            size = f"{path.stat().st_size:,} bytes"
            return f"{incomplete}: {rel} is truncated or corrupt ({size}; {exc})"
    try:
        if rel.endswith(".json"):
            configs[rel.split("/")[0]] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{incomplete}: {rel} is not valid JSON ({exc})"
    return None


def folder_problem(sd_dir: Path) -> str | None:
    """One sentence on what is wrong with the model folder, or None."""
    if not sd_dir.is_dir():
        return f"Weights folder {sd_dir} does not exist"
    incomplete = f"Weights folder {sd_dir} is incomplete"
    configs: dict[str, Any] = {}  # component (or model_index.json) -> its JSON

    def problem(rel: str) -> str | None:
        return _file_problem(sd_dir, rel, configs, "Weights folder")

    if found := next(filter(None, map(problem, _FAMILY_FILES)), None):
        return found
    if not all(isinstance(configs[c], dict) for c in ("model_index.json", "unet")):
        return f"{incomplete}: model_index.json or unet/config.json is not a JSON object"
    family = family_of(configs["unet"], configs["model_index.json"])
    if isinstance(family, str):
        return f"Weights folder {sd_dir} is not Stable Diffusion 1.x/2.x or SDXL: {family}"
    components = family.weight_components
    variant = _variant(sd_dir, lambda v: [weights_file(c, v) for c in components])
    files = [f"{c}/config.json" for c in components[1:]] + ["scheduler/scheduler_config.json"]
    files += [f"{t}/{f}" for t in family.tokenizers for f in _TOKENIZER_FILES]
    if found := next(filter(None, map(problem, files)), None):
        return found
    for rel in (weights_file(c, variant) for c in components):
        if not (sd_dir / rel).is_file():
            return (
                f"{incomplete}: {rel} is missing ({', '.join(components)} must all have "
                "full-precision *.safetensors files or all have *.fp16.safetensors files)"
            )
        if found := problem(rel):
            return found
    if found := size_problem(sd_dir, "Weights folder"):
        return found
    found = architecture_problem(configs, family)
    return f"Weights folder {sd_dir} is not {family.name}: {found}" if found else None


# --- ControlNets ----------------------------------------------------------------------------

CONTROLNET_CLASS = "ControlNetModel"  # diffusers' class, as a ControlNet's config.json names it


def controlnet_weights_file(variant: str | None) -> str:
    """A ControlNet folder's weights file: diffusion_pytorch_model[.fp16].safetensors."""
    return f"diffusion_pytorch_model{'.' + variant if variant else ''}.safetensors"


def controlnet_variant(controlnet_dir: str | os.PathLike[str]) -> str | None:
    """The weights file's variant for diffusers' `variant=`, as `sd_variant` says for models."""
    return _variant(Path(controlnet_dir), lambda v: [controlnet_weights_file(v)])


def controlnet_patterns(variant: str | None) -> list[str]:
    """What to fetch of a ControlNet's hub repository: its top-level config and weights file
    (the repositories also hold .bin copies, single-file checkpoints and other versions in
    subfolders)."""
    return ["config.json", controlnet_weights_file(variant)]


def controlnet_folder_problem(controlnet_dir: Path) -> str | None:
    """One sentence on what is wrong with a ControlNet folder (diffusers' ControlNetModel
    layout: config.json and one whole weights file), or None. Whether it fits a model:
    `family.controlnet_problem`."""
    noun = "ControlNet folder"
    if not controlnet_dir.is_dir():
        return f"{noun} {controlnet_dir} does not exist"
    configs: dict[str, Any] = {}
    if found := _file_problem(controlnet_dir, "config.json", configs, noun):
        return found
    if not isinstance(config := configs["config.json"], dict):
        return f"{noun} {controlnet_dir} is incomplete: config.json is not a JSON object"
    if (found := config.get("_class_name", CONTROLNET_CLASS)) != CONTROLNET_CLASS:
        return (
            f"{noun} {controlnet_dir} is not a diffusers ControlNet: config.json is for "
            f"{found!r}, expected a {CONTROLNET_CLASS}"
        )
    rel = controlnet_weights_file(controlnet_variant(controlnet_dir))
    if not (controlnet_dir / rel).is_file():
        return (
            f"{noun} {controlnet_dir} is incomplete: {rel} is missing (nor is there "
            f"{controlnet_weights_file('fp16')})"
        )
    return _file_problem(controlnet_dir, rel, configs, noun) or size_problem(controlnet_dir, noun)
