"""LPIPS's VGG16 trunk on disk: made from torchvision's file, written and read hash-checked.

The trunk is the 13 convolutions of torchvision's ImageNet VGG16: LPIPS reads only
`vgg16().features`, 59 MB of torchvision's 528 MB file. The download takes those tensors from
torchvision's file (torch.hub checks its whole sha256) and saves them as safetensors with a hash
of the tensors in the header; `read_trunk(verify=True)` checks that hash as it reads them, so a
setup reads the file once. Readers return (tensors, None) or (None, why not); `perceptual`
turns the reason into a WeightsError that says how to fix it, and builds LPIPS on the tensors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import one_line

VGG16_RELPATH = "lpips/vgg16-features.safetensors"  # in the weights folder
# Folders written before the trunk was cut down hold torchvision's whole file here.
LEGACY_VGG16_RELPATH = "lpips/vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
# torchvision names the file after the first 8 hex digits of its sha256; this is the whole
# digest of that 553,433,881-byte file, as download manifests that verify it record it.
VGG16_SHA256 = "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"
_HASH_KEY = "tensors_sha256"  # in the trunk's safetensors metadata; see _tensors_sha256

Features = dict[str, torch.Tensor]
Read = tuple[Features | None, str | None]


def read_trunk(path: Path, verify: bool = False) -> Read:
    """The trunk's tensors and None, or None and why not. Without `verify` only the header is
    read (names, shapes, a recorded hash) and the tensors come back empty."""
    if not path.is_file():
        return None, f"Weights file {path} is missing"
    try:
        with safe_open(path, framework="pt") as f:
            recorded, names = (f.metadata() or {}).get(_HASH_KEY), list(f.keys())
            problem = _features_problem(path, {k: f.get_slice(k).get_shape() for k in names})
            tensors = {k: f.get_tensor(k) for k in names} if verify and not problem else {}
    except Exception as exc:  # SafetensorError, or OSError for an unreadable file
        return None, f"Weights file {path} is not a whole safetensors file ({one_line(exc)})"
    if problem or recorded is None:
        return None, problem or f"Weights file {path} does not record its {_HASH_KEY}"
    if verify and (actual := _tensors_sha256(tensors)) != recorded:
        return None, f"Weights file {path} is damaged: its tensors hash to {actual}, not {recorded}"
    return tensors, None


def read_torchvision_file(path: Path) -> Read:
    """The `features.*` tensors of torchvision's whole VGG16 file, or None and why not."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        features = {k: v for k, v in state.items() if k.startswith("features.")}
        problem = _features_problem(path, {k: v.shape for k, v in features.items()})
    except Exception as exc:  # torch.load raises many types; so does a file that is no dict
        return None, f"Weights file {path} does not load as a PyTorch state dict ({one_line(exc)})"
    return (None, problem) if problem else (features, None)


def save_trunk(features: Features, path: Path) -> None:
    """Write the trunk's tensors as safetensors, recording their hash for read_trunk."""
    features = {k: v.contiguous() for k, v in features.items()}
    # One metadata key: safetensors writes several in no fixed order, and the file would differ.
    save_file(features, path, metadata={_HASH_KEY: _tensors_sha256(features)})


def fetch_torchvision_file(path: Path, progress: bool) -> None:
    """torchvision's VGG16 file at `path`, its whole sha256 checked. torch.hub cannot resume, so
    a whole file already there is kept if its sha256 checks out."""
    if path.is_file():
        with path.open("rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() == VGG16_SHA256:
                return
        path.unlink()
    torch.hub.download_url_to_file(VGG16_URL, str(path), VGG16_SHA256, progress)


def _features_problem(path: Path, shapes: dict[str, list[int] | torch.Size]) -> str | None:
    """What keeps tensors of these names and shapes from being VGG16's `features`, or None."""
    from torchvision.models.vgg import cfgs, make_layers

    with torch.device("meta"):  # names and shapes only: nothing is allocated
        vgg = torch.nn.Module()
        vgg.features = make_layers(cfgs["D"])
        state = {k: torch.empty(tuple(shape)) for k, shape in shapes.items()}
    try:
        vgg.load_state_dict(state, assign=True)  # strict: every name and every shape
    except RuntimeError as exc:  # "Error(s) in loading state_dict for Module: <what>"
        what = " ".join(str(exc).split(":", 1)[-1].split()).rstrip(".")
        return f"Weights file {path} is not torchvision's VGG16 features: {what}"
    return None


def _tensors_sha256(tensors: Features) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order (by hand: the
    safetensors format has no checksum, and a hash of the whole file cannot sit inside it)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
