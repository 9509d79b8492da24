"""Model families: what differs between Stable Diffusion 1.x/2.x and SDXL, in one description.

Everything else that differs between checkpoints (the window side, the VAE's scaling factor and
depth, the prediction type, the text encoders' widths) is read from the components' configs
where it is used. A folder's family is read from its files (the UNet's config, then
`model_index.json`), never from its name, and `architecture_problem` holds the components'
configs to what the family's architecture needs; `controlnet_problem` holds a ControlNet's config
to a UNet's.
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
# An inpainting UNet's input channels: the noisy latent, the mask, the masked image's latent.
INPAINTING_CHANNELS = 4 + 1 + 4
# Config values every SD 1.x/2.x and SDXL checkpoint shares (an absent key takes diffusers'
# default): (component, key, the values allowed, the first the default).
_SHARED_VALUES = [
    ("unet", "_class_name", ("UNet2DConditionModel",)),
    ("vae", "_class_name", ("AutoencoderKL",)),
    # An inpainting UNet (stable-diffusion-2-inpainting, SDXL's inpainting 0.1) takes the mask
    # and the masked image's latent beside the noisy latent: 4 + 1 + 4 channels.
    ("unet", "in_channels", (4, INPAINTING_CHANNELS)),
    ("unet", "out_channels", (4,)),
    ("vae", "latent_channels", (4,)),
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


# Numbers the networks and the sampling are built from, which diffusers takes unchecked (a
# `num_train_timesteps` of -5 fails deep in torch, a `sample_size` of 0 in the stride's bounds):
# (component, key, least, why).
_WHOLE_NUMBERS = (
    ("unet", "sample_size", 16, "the window in latent pixels; strides run from 8 to it less 8"),
    ("scheduler", "num_train_timesteps", 1, "the training schedule's steps"),
)


def architecture_problem(configs: dict[str, Any], family: Family) -> str | None:
    """What in the components' configs (component name -> config.json) does not fit the
    family's architecture, or None."""
    if not all(isinstance(configs[c], dict) for c in family.weight_components):
        return f"a config.json of {', '.join(family.weight_components)} is not a JSON object"
    if not isinstance(configs.get("scheduler"), dict):
        return "scheduler/scheduler_config.json is not a JSON object"
    for component, key, low, why in _WHOLE_NUMBERS:
        file = f"{component}/config.json"
        if component == "scheduler":
            file = "scheduler/scheduler_config.json"
        found = configs[component].get(key, low)
        if isinstance(found, bool) or not isinstance(found, int) or found < low:
            return f"{file} has {key} {found!r}, expected a whole number of at least {low} ({why})"
    for component, key, allowed in _SHARED_VALUES:
        found = configs[component].get(key, allowed[0])
        if found not in allowed:
            expected = " or ".join(str(value) for value in allowed)
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


# What decides whether a ControlNet fits a UNet: the shapes of the residuals it adds to the
# UNet's skip connections and middle block, and the inputs both networks take in one step.
# An absent key takes diffusers' default, the same in ControlNetModel's and
# UNet2DConditionModel's __init__. Not compared: the kinds of the down blocks, their attention
# heads and transformer depth, which shape only the ControlNet's inside (diffusers' smaller
# SDXL ControlNets have no cross-attention in their down blocks and fit SDXL all the same).
_CONTROLNET_SHAPES: dict[str, Any] = {
    "in_channels": 4,  # the noisy latents both take
    "block_out_channels": [320, 640, 1280, 1280],  # the levels and their residuals' channels
    "layers_per_block": 2,  # residuals per level (and with the levels, how many in all)
    "cross_attention_dim": 1280,  # the width of the text states both take
    "addition_embed_type": None,  # SDXL's "text_time": the pooled text and six size numbers
}
# Read only where both have SDXL's added conditioning: how it is embedded, and its width.
_TEXT_TIME_SHAPES: dict[str, Any] = {
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
}
# The ControlNet's conditioning embedding halves the control image once a level after its first
# (diffusers' default (16, 32, 96, 256): 8x), as the VAE does; every family's VAE is 8x
# (`architecture_problem`), so the embedding lands on the latents' grid.
_CONDITIONING_LEVELS = ("conditioning_embedding_out_channels", [16, 32, 96, 256])
_VAE_FACTOR = 8


def _fit_value(config: dict[str, Any], key: str, default: Any) -> Any:
    """A config's value in one form for comparing: a list for a tuple, and one number for a
    per-level list of equal numbers (a UNet may give `layers_per_block` and `cross_attention_dim`
    per level, a ControlNet gives one)."""
    value = config.get(key, default)
    value = list(value) if isinstance(value, list | tuple) else value
    if key in ("layers_per_block", "cross_attention_dim") and isinstance(value, list):
        return value[0] if len(set(value)) == 1 else value
    return value


def controlnet_problem(
    controlnet_config: dict[str, Any], unet_config: dict[str, Any]
) -> str | None:
    """What in a ControlNet's config.json does not fit a UNet's (each difference, "; "-joined,
    saying both values), or None."""
    keys = dict(_CONTROLNET_SHAPES)
    if controlnet_config.get("addition_embed_type") == unet_config.get("addition_embed_type"):
        keys |= _TEXT_TIME_SHAPES
    differences = []
    for key, default in keys.items():
        control, unet = (_fit_value(c, key, default) for c in (controlnet_config, unet_config))
        if control != unet:
            differences.append(f"{key} is {control!r} in the ControlNet and {unet!r} in the UNet")
    key, default = _CONDITIONING_LEVELS
    levels = _fit_value(controlnet_config, key, default)
    if not isinstance(levels, list) or 2 ** (len(levels) - 1) != _VAE_FACTOR:
        differences.append(
            f"{key} is {levels!r} in the ControlNet; it needs {_VAE_FACTOR.bit_length()} levels "
            f"to scale the control image down {_VAE_FACTOR}x like the latents"
        )
    families = [unet_family(c) for c in (controlnet_config, unet_config)]
    if differences and None not in families and families[0] is not families[1]:
        which = f"the ControlNet is for {families[0].name}, the UNet is {families[1].name}'s"
        differences.insert(0, which)
    return "; ".join(differences) or None
