"""Tiny, randomly initialised models of each family in the real weights layout.

`make_tiny_weights(out)` writes only the SD2-base-shaped model, in weights/'s default folder
(stable-diffusion-2-base); `models` adds an SD 1.x-shaped one (tiny-sd1), an SD 2.x 768
v-prediction one (tiny-sd2-v), an SDXL one (tiny-sdxl, two text encoders, "text_time"
conditioning, a force_upcast VAE) and an SD2 inpainting one (tiny-sd2-inpainting, a UNet of 9
input channels: the latent, the mask and the masked image's latent). Their windows are smaller
than the real models' (sample_size 32 for SD 1.x's 64, SDXL's 128 and SD2 inpainting's 64, 48
for SD 2.x 768's 96) because LPIPS's cost grows with a window's pixels and the code reads the
side from the config either way; the SD2-base one keeps the real 64, which the oracle needs.
`python scripts/make_tiny_weights.py OUT` writes them from the command line.

`make_tiny_controlnet` writes a ControlNet for a tiny model, made from its UNet as diffusers makes
one for training, but with random weights where diffusers starts at zero, so that its residuals
change the UNet's output and the control image changes them. `make_tiny_weights(out, models,
controlnets=True)` writes one for each model, in controlnet/tiny-controlnet-<shape>
(tiny-controlnet-sd2 for the SD2-base-shaped model, tiny-controlnet-sdxl for the SDXL one, and
so on: TINY_CONTROLNETS).

The result has exactly the layout `python scripts/download_weights.py` produces (see
weights/README.md), so tests and CPU smoke runs exercise the same loading code as production,
in seconds and without network. The output is deterministic (seeded) but meaningless: images
made with it are noise.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from .family import INPAINTING_CHANNELS
from .folders import share
from .lpips_trunk import save_trunk
from .weights import CONTROLNET_DIRNAME, SD_DIRNAME, VGG16_RELPATH

# SD2-base's scheduler config, verbatim, so the tiny model is sampled with the real schedule.
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# SD2 was trained with OpenCLIP, which pads with id 0; in CLIP's byte-level vocabulary that is "!".
PAD_TOKEN = "!"
MODEL_MAX_LENGTH = 77
# A few real CLIP merges, so tokenising goes through BPE merging as with the real vocabulary.
MERGES = [("t", "h"), ("i", "n"), ("a", "n"), ("th", "e</w>")]

TEXT_HIDDEN_SIZE = 32


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    return dict(zip(printable + others, chars, strict=True))


def tokenizer_vocab() -> dict[str, int]:
    """CLIP's vocabulary order: bytes, bytes + "</w>", merge results, then the two specials."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def _special(content: str) -> dict[str, object]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_tokenizer(out: Path, pad_token: str = PAD_TOKEN) -> int:
    """Write SD2-base's tokenizer files (vocab, merges, two configs); return the vocab size.

    SD 1.x and SDXL's first tokenizer pad with <|endoftext|> instead (`pad_token`)."""
    # Written by hand: transformers 5's save_pretrained would write tokenizer.json instead of
    # the vocab.json + merges.txt that SD2-base ships, and skip the conversion real weights need.
    out.mkdir(parents=True, exist_ok=True)
    vocab = tokenizer_vocab()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES)
    (out / "merges.txt").write_text(merges, encoding="utf-8")
    special_tokens = {
        "bos_token": _special(BOS_TOKEN),
        "eos_token": _special(EOS_TOKEN),
        "pad_token": pad_token,
        "unk_token": _special(EOS_TOKEN),
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2) + "\n")
    config = {
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
        # tokenizer_config.json spells added tokens with a "__type" tag, as SD2-base's does.
        **{
            key: {"__type": "AddedToken", **value} if isinstance(value, dict) else value
            for key, value in special_tokens.items()
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return len(vocab)


def _vgg16_features() -> dict[str, torch.Tensor]:
    """torchvision's VGG16 `features.*` tensors with torchvision's own initialisation."""
    from torchvision.models.vgg import cfgs, make_layers

    # Only the convolutional trunk: building all of vgg16() would initialise 120M unused
    # classifier parameters and cost seconds.
    features = make_layers(cfgs["D"])
    for module in features.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            torch.nn.init.zeros_(module.bias)
    return {f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bar for a one-file save, restoring the caller's setting."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


# SD 1.5's scheduler file (a PNDM scheduler, whose config DDIM reads), SD 2.1's (DDIM with
# v-prediction) and SDXL base's (Euler), each as its repository ships it.
SD1_SCHEDULER_CONFIG = {
    **{k: v for k, v in SCHEDULER_CONFIG.items() if k != "prediction_type"},
    "_class_name": "PNDMScheduler",
}
SD2_V_SCHEDULER_CONFIG = {**SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
SDXL_SCHEDULER_CONFIG = {
    **SCHEDULER_CONFIG,
    "_class_name": "EulerDiscreteScheduler",
    "interpolation_type": "linear",
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SDXL_TIME_EMBED_DIM = 8  # SDXL's is 256: six numbers, each a sinusoidal embedding this wide

# Folder name -> (family shape, window side in latent pixels). The names say nothing to the
# loader, which reads the family from the files.
TINY_MODELS = {
    "sd2": (SD_DIRNAME, 64),
    "sd1": ("tiny-sd1", 32),
    "sd2-v": ("tiny-sd2-v", 48),
    "sdxl": ("tiny-sdxl", 32),
    "sd2-inpainting": ("tiny-sd2-inpainting", 32),
}
# Shape -> the folder under controlnet/ of the ControlNet made for that tiny model.
TINY_CONTROLNETS = {shape: f"tiny-controlnet-{shape}" for shape in TINY_MODELS}
# The conditioning embedding's channels: four levels scale the control image down 8x, onto the
# latents' grid, as diffusers' default (16, 32, 96, 256) does; few channels because its first
# level runs at the image's full resolution.
CONTROLNET_CONDITIONING_CHANNELS = (4, 8, 16, 32)


def _write_json(path: Path, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")


def _text_config(vocab_size: int, hidden_act: str, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act=hidden_act,
        # SD2's config keeps CLIP's legacy ids; eos_token_id 2 makes transformers pool at the
        # highest id, which is <|endoftext|> in this vocabulary as in the real one.
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        **extra,
    )


def make_tiny_model(sd_dir: Path, shape: str = "sd2", window: int = 64) -> Path:
    """Write one tiny model of `shape` (a key of TINY_MODELS) into `sd_dir`; return `sd_dir`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sdxl, sd1 = shape == "sdxl", shape == "sd1"
    inpainting = shape == "sd2-inpainting"
    sd_dir.mkdir(parents=True, exist_ok=True)
    # OpenAI's CLIP (SD 1.x, SDXL's first encoder) pads with <|endoftext|>, OpenCLIP with "!".
    vocab_size = write_tokenizer(sd_dir / "tokenizer", EOS_TOKEN if sd1 or sdxl else PAD_TOKEN)
    if sdxl:
        write_tokenizer(sd_dir / "tokenizer_2")
    n_encoders = 2 if sdxl else 1

    torch.manual_seed(0)
    sdxl_unet = {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": TEXT_HIDDEN_SIZE + 6 * SDXL_TIME_EMBED_DIM,
        "transformer_layers_per_block": (1, 2),
    }
    unet = UNet2DConditionModel(
        sample_size=window,
        # An inpainting UNet takes the mask and the masked image's latent beside the latent.
        in_channels=INPAINTING_CHANNELS if inpainting else 4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        # As in SD2's config, diffusers reads this as the number of heads per level; several
        # heads keep head splitting exercised. SD 1.x gives one number for every level.
        attention_head_dim=8 if sd1 else (2, 4),
        cross_attention_dim=TEXT_HIDDEN_SIZE * n_encoders,
        use_linear_projection=not sd1,
        norm_num_groups=32,
        **(sdxl_unet if sdxl else {}),
    )
    unet.save_pretrained(sd_dir / "unet", safe_serialization=True)

    torch.manual_seed(0)
    # Four levels (three downsamples) give SD's 8x latent factor. The first level runs at full
    # window resolution and dominates the cost of the many decodes in tests, hence 4 channels.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=window * 8,
        # SDXL's VAE has its own scale and overflows in fp16, which its config declares.
        scaling_factor=0.13025 if sdxl else 0.18215,
        force_upcast=sdxl,
    )
    vae.save_pretrained(sd_dir / "vae", safe_serialization=True)

    torch.manual_seed(0)
    # SD 1.x and SDXL's first encoder are OpenAI's CLIP ViT-L (quick_gelu); SD2's is OpenCLIP.
    first = _text_config(vocab_size, "quick_gelu" if sd1 or sdxl else "gelu")
    with _quiet_transformers():
        CLIPTextModel(first).save_pretrained(sd_dir / "text_encoder")
        if sdxl:
            second = _text_config(vocab_size, "gelu", projection_dim=TEXT_HIDDEN_SIZE)
            CLIPTextModelWithProjection(second).save_pretrained(sd_dir / "text_encoder_2")

    # Written verbatim: DDIMScheduler.save_pretrained would add keys the real files lack.
    scheduler = {"sd1": SD1_SCHEDULER_CONFIG, "sd2-v": SD2_V_SCHEDULER_CONFIG}.get(
        shape, SDXL_SCHEDULER_CONFIG if sdxl else SCHEDULER_CONFIG
    )
    _write_json(sd_dir / "scheduler" / "scheduler_config.json", scheduler)
    index = SDXL_MODEL_INDEX if sdxl else MODEL_INDEX
    if inpainting:
        index = {**index, "_class_name": "StableDiffusionInpaintPipeline"}
    _write_json(sd_dir / "model_index.json", index)
    return sd_dir


def random_controlnet(
    unet: UNet2DConditionModel, seed: int = 0, conditioning_channels: tuple[int, ...] | None = None
) -> ControlNetModel:
    """A ControlNet for `unet` (diffusers' `ControlNetModel.from_unet`: its down and middle
    blocks copied), on the CPU in fp32, with random weights (seeded) where a fresh ControlNet
    would hide a wrong test or measurement:
    - diffusers starts the convolutions that give out the residuals, and the embedding's last,
      at zero, so that training grows them from nothing; a fresh ControlNet then adds nothing.
      These get an ordinary convolution's random start: they change the tiny UNet's output by
      some 60% of its size.
    - an ordinary start shrinks the control image through the embedding's seven convolutions
      to almost a constant, so that any control image would do (two random ones give outputs
      0.01% of their size apart); He's start with zero biases keeps it (5 to 15% apart).
    `conditioning_channels`: the embedding's widths (default diffusers')."""
    torch.manual_seed(seed)
    channels = (
        {}
        if conditioning_channels is None
        else {"conditioning_embedding_out_channels": conditioning_channels}
    )
    controlnet = ControlNetModel.from_unet(unet, **channels).to("cpu", torch.float32)
    for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        conv.reset_parameters()
    embedding = controlnet.controlnet_cond_embedding
    for conv in [embedding.conv_in, *embedding.blocks, embedding.conv_out]:
        torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        torch.nn.init.zeros_(conv.bias)
    return controlnet


def make_tiny_controlnet(model_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny ControlNet for the tiny model in `model_dir` into `out_dir` (a
    `random_controlnet` with a small conditioning embedding); return it."""
    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet")
    controlnet = random_controlnet(unet, seed, CONTROLNET_CONDITIONING_CHANNELS)
    controlnet.save_pretrained(out_dir, safe_serialization=True)
    share(out_dir)
    return Path(out_dir)


def make_tiny_weights(
    out: Path, models: tuple[str, ...] = ("sd2",), controlnets: bool = False
) -> Path:
    """Write the tiny `models` (keys of TINY_MODELS) and the LPIPS trunk into `out`, and with
    `controlnets` a tiny ControlNet for each model (TINY_CONTROLNETS); return `out`."""
    out = Path(out)
    for shape in models:
        name, window = TINY_MODELS[shape]
        make_tiny_model(out / name, shape, window)
        if controlnets:
            make_tiny_controlnet(out / name, out / CONTROLNET_DIRNAME / TINY_CONTROLNETS[shape])

    torch.manual_seed(0)
    vgg_path = out / VGG16_RELPATH
    vgg_path.parent.mkdir(parents=True, exist_ok=True)
    save_trunk(_vgg16_features(), vgg_path)
    share(out)  # safetensors writes 0600: readable by every user, as the image's weights are
    return out
