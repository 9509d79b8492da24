"""LoRA weights on one request: read through diffusers' loaders (its kohya/A1111 converters
included), held to the model before any work, fused into the networks for one panorama and taken
out after it, the base weights put back bit for bit.

Fused, a step costs what it costs without a LoRA: the networks that run are the base ones, with
`W + scale * B @ A` in place of `W`, and no adapter layer is left in them while the panorama is
made (diffusers' `fuse_lora`, then `unload_lora_weights`, which removes peft's layers and keeps
what was fused). `fuse_lora`'s inverse, `unfuse_lora`, subtracts the product again, which in
floating point does not give `W` back to the bit; so the weights a LoRA changes are kept on the
CPU beforehand and copied back afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError, one_line, shown
from .family import Family
from .lora_files import LoraFile
from .quiet import no_adapter_reports

logger = logging.getLogger(__name__)

# The components a LoRA may change, as diffusers' loaders prefix their keys.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Lora:
    """A LoRA file read and held to a model, with the scale a request gives it."""

    name: str  # the input that gave it: lora_weights or extra_lora
    file: LoraFile
    scale: float
    state_dict: dict[str, torch.Tensor]  # as the file holds it; diffusers converts it on loading
    targets: dict[str, tuple[str, ...]]  # per component, the layers it changes

    def record(self, scale_name: str) -> dict[str, Any]:
        """What a panorama's file saves of it: the source as given, its SHA-256 and scale."""
        return {
            self.name: self.file.source,
            f"{self.name}_sha256": self.file.sha256,
            scale_name: self.scale,
        }


def _loader(family: Family) -> Any:
    """diffusers' pipeline class of the family: its classmethods read and convert LoRA files."""
    import diffusers

    return getattr(diffusers, family.pipeline_class)


def _peft_keys(component: str, state_dict: dict[str, torch.Tensor], network: Any) -> dict:
    """A component's part of a converted LoRA in peft's names (`<layer>.lora_A.weight`), as
    diffusers' loaders convert it before handing it to peft."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    part = {
        key.removeprefix(f"{component}."): value
        for key, value in state_dict.items()
        if key.startswith(f"{component}.")
    }
    if not part:
        return {}
    if component == "unet":
        if "lora_A" not in next(iter(part)):
            part = convert_unet_state_dict_to_peft(part)
        return part
    part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    if not hasattr(network, "text_model"):  # transformers 5 flattens CLIPTextModel
        part = {key.removeprefix("text_model."): value for key, value in part.items()}
    return part


def _layer_problem(layer: Any, down: torch.Tensor, up: torch.Tensor | None) -> str | None:
    """Why a LoRA pair (down: r x in, up: out x r) cannot change `layer`, or None."""
    if isinstance(layer, torch.nn.Linear):
        takes, gives = layer.in_features, layer.out_features
    elif isinstance(layer, torch.nn.Conv2d):
        takes, gives = layer.in_channels, layer.out_channels
    else:
        return f"is a {type(layer).__name__}, not a linear or convolution layer"
    if down.ndim < 2 or down.shape[1] != takes:
        got = down.shape[1] if down.ndim >= 2 else "?"
        return f"takes {takes} inputs where the LoRA's takes {got}"
    if up is not None and up.shape[0] != gives:
        return f"gives {gives} outputs where the LoRA's gives {up.shape[0]}"
    return None


def read_lora(
    file: LoraFile,
    name: str,
    scale: float,
    family: Family,
    networks: Mapping[str, torch.nn.Module],
) -> Lora:
    """The LoRA of a verified file (`lora_files.fetch_lora`), read as diffusers reads it and held
    to the model's `networks` (by component name: unet, text_encoder, text_encoder_2): refused,
    naming the input, where diffusers reads no LoRA in it, where it changes none of the model's
    layers, or where its layers have other shapes than the model's (a LoRA of another family)."""
    from safetensors.torch import load_file

    given = f"{name} {shown(file.source)}"
    try:
        state_dict = load_file(file.path)  # safetensors only: nothing is unpickled
    except Exception as error:  # a file damaged since its check
        raise InputError(f"{given}: its tensors could not be read ({one_line(error)})") from None
    try:
        converted = _loader(family).lora_state_dict(dict(state_dict))[0]
    except Exception as error:  # the converters raise many types on files they do not know
        raise InputError(
            f"{given} is no LoRA diffusers reads (diffusers, peft, kohya or A1111 keys): "
            f"{one_line(error)}"
        ) from None
    components = [c for c in COMPONENTS if any(k.startswith(f"{c}.") for k in converted)]
    others = sorted({k.split(".")[0] for k in converted if k.split(".")[0] not in COMPONENTS})
    missing = [c for c in components if c not in networks]
    if missing:
        raise InputError(
            f"{given} changes {', '.join(missing)}, which this {family.name} model does not "
            f"have: a LoRA for another model family (SDXL has text_encoder_2)"
        )
    if not components:
        held = f" (its layers start with {', '.join(others[:5])})" if others else ""
        raise InputError(
            f"{given} holds no layer of a Stable Diffusion UNet or text encoder{held}: a LoRA "
            f"for another kind of model?"
        )
    targets, problems, n_layers = {}, [], 0
    for component in components:
        network = networks[component]
        layers = dict(network.named_modules())
        part = _peft_keys(component, converted, network)
        downs = {k.removesuffix(".lora_A.weight"): v for k, v in part.items() if ".lora_A." in k}
        n_layers += len(downs)
        for layer_name, down in downs.items():
            layer = layers.get(layer_name)
            up = part.get(f"{layer_name}.lora_B.weight")
            problem = (
                "is not a layer of this model"
                if layer is None
                else _layer_problem(layer, down, up)
            )
            if problem is not None:
                problems.append(f"{component}.{layer_name} {problem}")
        targets[component] = tuple(sorted(downs))
    if n_layers == 0:
        raise InputError(f"{given} holds no LoRA layer (no down/up or lora_A/lora_B pair)")
    if problems:
        raise InputError(
            f"{given} does not fit this {family.name} model: {len(problems)} of its {n_layers} "
            f"layers do not, such as {problems[0]}: a LoRA for another model family or "
            "checkpoint?"
        )
    return Lora(name, file, float(scale), state_dict, targets)


@contextmanager
def fused(
    family: Family,
    components: Mapping[str, Any],
    loras: list[Lora],
) -> Iterator[None]:
    """The `loras` fused into the networks for the duration, each at its scale; the weights they
    change put back bit for bit afterwards, however the block ends.

    `components` are those of the family's diffusers pipeline (unet, vae, text encoders,
    tokenizers, scheduler), which share their networks with the caller: diffusers' loaders
    (`load_lora_weights`, `set_adapters`, `fuse_lora`, `unload_lora_weights`) change them in
    place.
    """
    if not loras:
        yield
        return
    networks = {name: components[name] for name in COMPONENTS if name in components}
    kept = {}  # (component, parameter name) -> its base value, on the CPU
    for lora in loras:
        for component, layers in lora.targets.items():
            parameters = dict(networks[component].named_parameters())
            for layer in layers:
                for kind in ("weight", "bias"):
                    key = (component, f"{layer}.{kind}")
                    if key[1] in parameters and key not in kept:
                        kept[key] = parameters[key[1]].detach().to("cpu", copy=True)
    # Neither pipeline's extras are used: diffusers' SD pipeline wants its safety checker
    # declared absent, SDXL's its watermark.
    extra: dict[str, Any] = {"feature_extractor": None}
    if family.pipeline_class == "StableDiffusionPipeline":
        extra |= {"safety_checker": None, "requires_safety_checker": False}
    else:
        extra |= {"add_watermarker": False}
    pipeline = _loader(family)(**components, **extra)
    names = [lora.name for lora in loras]
    touched = sorted({c for lora in loras for c in lora.targets})
    try:
        with no_adapter_reports():
            for lora in loras:
                try:
                    pipeline.load_lora_weights(dict(lora.state_dict), adapter_name=lora.name)
                except (MemoryError, torch.OutOfMemoryError):
                    raise
                except Exception as error:  # a file our check let through, peft did not
                    raise InputError(
                        f"{lora.name} {shown(lora.file.source)} could not be loaded by diffusers: "
                        f"{one_line(error)}"
                    ) from None
            pipeline.set_adapters(names, [lora.scale for lora in loras])
            pipeline.fuse_lora(components=touched, lora_scale=1.0, adapter_names=names)
            pipeline.unload_lora_weights()  # peft's layers out; what was fused stays
        yield
    finally:
        pipeline.unload_lora_weights()  # where loading failed half-way
        parameters = {c: dict(networks[c].named_parameters()) for c in {c for c, _ in kept}}
        with torch.no_grad():
            for (component, name), value in kept.items():
                parameters[component][name].copy_(value)
