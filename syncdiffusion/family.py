"""Model families: what differs between Stable Diffusion 1.x/2.x and SDXL, in one description.

Everything else that differs between checkpoints (the window side, the VAE's scaling factor and
depth, the prediction type, the text encoders' widths) is read from the components' configs
where it is used. A folder's family is read from its files (the UNet's config, then
`model_index.json`), never from its name, and `architecture_problem` holds the components'
configs to what the family's architecture needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """The components a family's folder holds and how its prompts are encoded."""

    name: str
    # diffusers' pipeline class for the family, as model_index.json names it.
    pipeline_class: str
    # Text encoders and their tokenizers, paired, in the order their states are concatenated.
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    # transformers class of each text encoder (the last one of SDXL also gives the pooled text).
    text_encoder_classes: tuple[str, ...]
    # Which hidden state conditions the UNet: None the encoder's output (after its final layer
    # norm), -2 the penultimate layer's (SDXL).
    hidden_state: int | None
    # SDXL's UNet also takes the pooled text and six size/crop numbers ("text_time").
    addition_embed_type: str | None

    @property
    def weight_components(self) -> tuple[str, ...]:
        """Folders that hold a weights file."""
        return ("unet", "vae", *self.text_encoders)


SD = Family(
    name="Stable Diffusion 1.x/2.x",
    pipeline_class="StableDiffusionPipeline",
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    text_encoder_classes=("CLIPTextModel",),
    hidden_state=None,
    addition_embed_type=None,
)
SDXL = Family(
    name="SDXL",
    pipeline_class="StableDiffusionXLPipeline",
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    text_encoder_classes=("CLIPTextModel", "CLIPTextModelWithProjection"),
    hidden_state=-2,
    addition_embed_type="text_time",
)
FAMILIES = (SD, SDXL)
# Config values every SD 1.x/2.x and SDXL checkpoint shares (an absent key takes diffusers'
# default).
_SHARED_VALUES = [
    ("unet", "_class_name", "UNet2DConditionModel"),
    ("vae", "_class_name", "AutoencoderKL"),
    ("unet", "in_channels", 4),
    ("unet", "out_channels", 4),
    ("vae", "latent_channels", 4),
]


def unet_family(unet_config: dict[str, Any]) -> Family | None:
    """The family whose conditioning the UNet takes, or None."""
    embed = unet_config.get("addition_embed_type")
    return next((f for f in FAMILIES if f.addition_embed_type == embed), None)


def family_of(unet_config: dict[str, Any], model_index: dict[str, Any]) -> Family | str:
    """The family of a folder from its UNet's config and model_index.json, or why it is neither.

    The UNet decides: it is what needs SDXL's extra conditioning. model_index.json must then
    list the family's components (a folder that lacks one cannot be loaded as that family).
    """
    family = unet_family(unet_config)
    if family is None:
        embed = unet_config.get("addition_embed_type")
        return (
            f"unet/config.json has addition_embed_type {embed!r}; Stable Diffusion 1.x/2.x has "
            "none and SDXL has 'text_time'"
        )
    missing = [c for c in (*family.text_encoders, *family.tokenizers) if c not in model_index]
    if missing:
        found = model_index.get("_class_name")
        return (
            f"its UNet is {family.name}'s but model_index.json ({found}) lists no "
            f"{', '.join(missing)}"
        )
    return family


def architecture_problem(configs: dict[str, Any], family: Family) -> str | None:
    """What in the components' configs (component name -> config.json) does not fit the
    family's architecture, or None."""
    if not all(isinstance(configs[c], dict) for c in family.weight_components):
        return f"a config.json of {', '.join(family.weight_components)} is not a JSON object"
    for component, key, expected in _SHARED_VALUES:
        found = configs[component].get(key, expected)
        if found != expected:
            return f"{component}/config.json has {key} {found}, expected {expected}"
    for component, cls in zip(family.text_encoders, family.text_encoder_classes, strict=True):
        if cls not in (found := configs[component].get("architectures") or [cls]):
            return f"{component}/config.json is for {found}, expected a {cls}"
    # Both families' VAEs have four levels: 8 image pixels per latent pixel.
    if not isinstance(levels := configs["vae"].get("block_out_channels"), list) or len(levels) != 4:
        return f"vae/config.json has block_out_channels {levels}, expected 4 levels (8x)"
    # transformers leaves values equal to CLIPTextConfig's defaults out of the files it writes.
    # SDXL's UNet reads both encoders' states side by side: its width is their sum.
    widths = [configs[c].get("hidden_size", 512) for c in family.text_encoders]
    cross = configs["unet"].get("cross_attention_dim")
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
