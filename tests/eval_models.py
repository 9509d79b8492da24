"""Random stand-ins for the evaluation's networks, written where the real ones would be found.

VGG16 and VGG19 go into a torch hub cache, under the file names torchvision's weights API
looks for, so both scripts/evaluate.py and the paper's code (tests/paper_metrics.py) load them
as they would load the ImageNet weights. CLIP is a tiny random CLIPModel saved with a tokenizer
and an image processor, a folder CLIPModel/CLIPProcessor.from_pretrained read without network.
"""

from __future__ import annotations

from pathlib import Path

import torch

VGG_FILES = {"D": "vgg16-397923af.pth", "E": "vgg19-dcbb9e9d.pth"}  # torchvision config: file
# torchvision's VGG classifier shapes; the metrics never use it, but loading checks it.
_CLASSIFIER = {0: (4096, 512 * 7 * 7), 3: (4096, 4096), 6: (1000, 4096)}


def random_vgg_state(config: str) -> dict[str, torch.Tensor]:
    """A full torchvision VGG state dict: random conv trunk, all-zero classifier."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs[config])
    for module in features.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    for index, shape in _CLASSIFIER.items():
        # Expanded zeros are saved as one element each: a 500 MB classifier in a few bytes.
        state[f"classifier.{index}.weight"] = torch.zeros(1).expand(shape)
        state[f"classifier.{index}.bias"] = torch.zeros(1).expand(shape[0])
    return state


def write_hub_vgg(torch_home: Path, configs: str = "DE", seed: int = 0) -> Path:
    """Write random VGG16 ("D") and/or VGG19 ("E") into torch_home's hub cache; return its dir."""
    checkpoints = Path(torch_home) / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    for config in configs:
        torch.manual_seed(seed)
        torch.save(random_vgg_state(config), checkpoints / VGG_FILES[config])
    return checkpoints


def write_tiny_clip(out: Path) -> Path:
    """A tiny random CLIP (model, tokenizer, image processor) in `out`, loadable offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from syncdiffusion.models.tiny import write_tokenizer

    out = Path(out)
    vocab_size = write_tokenizer(out)
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2}
    config = CLIPConfig(
        # CLIP's legacy ids, as the tiny models set them: eos_token_id 2 pools at the
        # highest id, <|endoftext|> in this vocabulary.
        text_config={
            **small,
            "vocab_size": vocab_size,
            "num_attention_heads": 4,
            **{"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        },
        # The real model's 224 px input, so the processor resizes as it does for it.
        vision_config={**small, "image_size": 224, "patch_size": 32, "num_attention_heads": 4},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    CLIPImageProcessor().save_pretrained(out)  # openai/clip-vit-base-patch16's settings
    return out
