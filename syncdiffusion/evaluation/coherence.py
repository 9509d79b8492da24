"""The paper's coherence figures of a panorama's crops, and the networks they run on: Intra-LPIPS,
Intra-Style-L (Gram matrices on torchvision's VGG19) and CLIP-S (torchmetrics' CLIPScore). How
each is computed: `syncdiffusion.evaluation.report`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPProcessor

from ..errors import EvaluationError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STYLE_CONVS = 5  # the paper's style layers: conv_1 .. conv_5 of vgg19.features
CLIP_MODEL = "openai/clip-vit-base-patch16"


class PairSpread:
    """Sums over every pair of a stream of equal-shaped tensors of (a - b)**2, elementwise, in
    the memory of two tensors: n times the running sum of squared deviations from the mean
    (Welford's update, stable where the tensors nearly agree)."""

    def __init__(self) -> None:
        self.n, self.mean, self.squares = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        self.n += 1
        if self.mean is None:
            self.mean, self.squares = x.clone(), torch.zeros_like(x)
            return
        delta = x - self.mean
        self.mean += delta / self.n
        self.squares += delta * (x - self.mean)

    def pair_sum(self) -> torch.Tensor:
        """The sum over the n * (n - 1) / 2 pairs of (a - b)**2."""
        return self.n * self.squares


@torch.no_grad()
def intra_lpips(model, tiles: list[torch.Tensor]) -> float:
    """Mean LPIPS over all pairs of `tiles` (each (3, h, w) in [0, 1]), at least two."""
    # LPIPS(a, b) is a sum over layers of lin((normalise(f(a)) - normalise(f(b)))^2), averaged
    # over space; lin is a 1x1 convolution without bias, so the sum over pairs is lin of the
    # pairs' summed squares, which PairSpread keeps whatever the number of crops.
    import lpips

    spreads = [PairSpread() for _ in model.lins]
    for tile in tiles:
        outs = model.net(model.scaling_layer(tile[None] * 2 - 1))
        for spread, out in zip(spreads, outs, strict=True):
            spread.add(lpips.normalize_tensor(out))
    n = len(tiles)
    total = sum(
        lpips.spatial_average(lin(spread.pair_sum()), keepdim=True).item()
        for lin, spread in zip(model.lins, spreads, strict=True)
    )
    return total / (n * (n - 1) // 2)


def gram(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix of one crop's features (1, C, H, W), divided by C * H * W."""
    _, c, h, w = features.shape
    flat = features.reshape(c, h * w)
    return torch.mm(flat, flat.t()).div(c * h * w)


@torch.no_grad()
def style_grams(vgg19_features: torch.nn.Sequential, tile: torch.Tensor) -> list[torch.Tensor]:
    """Gram matrices of the first STYLE_CONVS convolution outputs (before ReLU) of one crop."""
    mean = torch.tensor(IMAGENET_MEAN, device=tile.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=tile.device).view(-1, 1, 1)
    x = (tile[None] - mean) / std
    grams = []
    for layer in vgg19_features:
        # torchvision's ReLUs work in place and would overwrite the conv output kept here.
        x = F.relu(x) if isinstance(layer, torch.nn.ReLU) else layer(x)
        if isinstance(layer, torch.nn.Conv2d):
            grams.append(gram(x))
            if len(grams) == STYLE_CONVS:
                return grams
    raise ValueError(f"the network has fewer than {STYLE_CONVS} convolutions")


def intra_style_l(vgg19_features: torch.nn.Sequential, tiles: list[torch.Tensor]) -> float:
    """Sum over all pairs of `tiles` (each (3, h, w) in [0, 1]) of the summed Gram style loss."""
    # Per layer, the sum over pairs of the mean squared Gram difference is the mean of the
    # pairs' summed squares; kept in float64, as the paper's code sums its pairs.
    spreads = [PairSpread() for _ in range(STYLE_CONVS)]
    for tile in tiles:
        for spread, gram_matrix in zip(spreads, style_grams(vgg19_features, tile), strict=True):
            spread.add(gram_matrix.double())
    return sum(spread.pair_sum().mean().item() for spread in spreads)


def hub_file(weights) -> Path:
    """The file of torchvision `weights` in the torch hub cache, downloaded there if missing."""
    from urllib.parse import urlparse

    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not path.is_file():
        try:
            weights.get_state_dict(progress=True, check_hash=True)
        except (OSError, RuntimeError) as exc:
            raise EvaluationError(
                f"{path.name} (torchvision's {weights}) is not in the torch hub cache and could "
                f"not be downloaded ({type(exc).__name__}: {exc}). Download {weights.url} to "
                f"{path} (TORCH_HOME moves the cache), then run again."
            ) from exc
    return path


def load_vgg19_features(path: Path) -> torch.nn.Sequential:
    """torchvision's VGG19 convolutional trunk with the weights in `path`."""
    from torchvision.models.vgg import cfgs, make_layers

    state = torch.load(path, map_location="cpu", weights_only=True)
    features = make_layers(cfgs["E"])
    features.load_state_dict(
        {
            key.removeprefix("features."): v
            for key, v in state.items()
            if key.startswith("features.")
        }
    )
    return features.eval().requires_grad_(False)


class ProjectedCLIP(CLIPModel):
    """CLIPModel whose get_image_features and get_text_features return the projected embeddings.

    That is what torchmetrics' CLIPScore expects; transformers 5 wraps them in an output object
    (its `pooler_output`), which torchmetrics 1.9 does not unwrap (Lightning-AI/torchmetrics#3407).
    """

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _embedding(super().get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _embedding(super().get_text_features(*args, **kwargs))


def _embedding(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_clip_score(model_dir: Path | None):
    """torchmetrics' CLIPScore on the paper's CLIP, or on the same model saved in `model_dir`."""
    try:
        from torchmetrics.multimodal import CLIPScore
    except ImportError as exc:
        raise EvaluationError(
            f"--clip needs torchmetrics ({exc}): pip install -r requirements-eval.txt"
        ) from exc

    source = str(model_dir) if model_dir is not None else CLIP_MODEL
    try:
        # What CLIPScore(model_name_or_path=CLIP_MODEL) loads, through ProjectedCLIP, and from a
        # local folder too (torchmetrics takes only hub names, or a callable).
        return CLIPScore(
            model_name_or_path=lambda: (
                ProjectedCLIP.from_pretrained(source),
                CLIPProcessor.from_pretrained(source),
            )
        )
    except OSError as exc:
        raise EvaluationError(
            f"CLIP model {source} could not be loaded ({exc}). Without network, download "
            f"{CLIP_MODEL} where there is (hf download {CLIP_MODEL} --local-dir DIR) and pass "
            "--clip-model DIR."
        ) from exc
