"""LoRA files for tests: random low-rank updates of a model's attention layers, written in the
formats LoRAs are published in (diffusers/peft keys, or kohya's, as sd-scripts and A1111 write
them), so that tests load them the way users' files are loaded."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

# The layers LoRA trainers adapt by default: the attention projections of the UNet's
# transformer blocks and of the CLIP text encoders.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# kohya's prefix of each component's layers.
_KOHYA = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def _layers(component: str, network: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    targets = UNET_TARGETS if component == "unet" else TEXT_TARGETS
    return {
        name: module
        for name, module in network.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(tuple(f".{t}" for t in targets))
    }


def make_lora(
    networks: Mapping[str, torch.nn.Module],
    path: str | Path,
    rank: int = 4,
    strength: float = 0.5,
    seed: int = 0,
    layout: Literal["diffusers", "kohya"] = "diffusers",
) -> Path:
    """A random LoRA of `networks` (by component: unet, text_encoder, text_encoder_2) written to
    `path` as safetensors; `strength` is the size of `B @ A` against a layer's inputs.

    diffusers: `unet.<layer>.lora_A.weight` / `lora_B`, the text encoders' layers under
    `text_model.` as the hub's files name them. kohya: `lora_unet_<layer with _>.lora_down.weight`
    / `lora_up` / `alpha` (= rank), and `lora_te_` (one text encoder) or `lora_te1_` / `lora_te2_`.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    single_encoder = "text_encoder_2" not in networks
    for component, network in networks.items():
        for name, layer in _layers(component, network).items():
            down = torch.randn(rank, layer.in_features, generator=generator)
            down /= layer.in_features**0.5
            up = strength * torch.randn(layer.out_features, rank, generator=generator) / rank**0.5
            if component != "unet" and not hasattr(network, "text_model"):
                name = f"text_model.{name}"  # transformers 5 flattens CLIPTextModel; files don't
            if layout == "diffusers":
                tensors[f"{component}.{name}.lora_A.weight"] = down
                tensors[f"{component}.{name}.lora_B.weight"] = up
            else:
                prefix = _KOHYA[component]
                if component == "text_encoder" and single_encoder:
                    prefix = "lora_te"
                key = f"{prefix}_{name.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"] = down
                tensors[f"{key}.lora_up.weight"] = up
                tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    path = Path(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path
