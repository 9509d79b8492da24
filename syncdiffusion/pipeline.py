"""`SyncDiffusionPipeline`: a Stable Diffusion model (SD2-base by default, any SD 1.x/2.x or
SDXL), LPIPS and the sampler, loaded once and called per panorama."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lpips
import torch
import torch.nn.functional as F
import transformers
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from .core.chunks import (
    RECOMPUTE_MODES,
    SyncChunks,
    auto_view_batch_size,
    free_memory,
    is_out_of_memory,
    plain_window_bytes,
    plan_sync_chunks,
    release_memory,
    sync_window_bytes,
)
from .core.control import Control, WindowControl, condition_tensor, image_record
from .core.decoding import decode, decode_panorama, to_pil, vae_scale_factor
from .core.init_image import (
    KeptRegion,
    MaskedImage,
    encode,
    image_pixels,
    mask_latent,
    mask_pixels,
    masked_pixels,
    outpaint,
    same_proportions,
    start_at,
    start_latent,
)
from .core.precision import PERCEPTUAL_DTYPE, initial_loss_scale, vae_dtype, vae_upcast
from .core.recompute import Recomputation, recompute_layers
from .core.sampling import (
    AnchorImages,
    Callback,
    guided_eps,
    sample_panorama,
    window_time_ids,
    x0_predictor,
)
from .core.schedulers import Scheduler, make_scheduler, per_view
from .core.sphere import (
    CAP_PROMPTS,
    CAPS,
    cap_mask,
    cap_picture,
    cap_prompt,
    sphere_parts,
    sphere_picture,
)
from .core.sync import lpips_features, sync_loss
from .core.sync_schedule import steps_run, sync_schedule
from .core.windows import Geometry
from .errors import InputError, WeightsError
from .models.family import SDXL, controlnet_problem, unet_family
from .models.folders import (
    controlnet_variant,
    controlnet_weights_file,
    read_family,
    read_source,
    sd_variant,
    tensors_problem,
    weights_file,
)
from .models.lora import Lora, fused, read_lora
from .models.lora_files import LORA_FOLDER, fetch_lora
from .models.lpips_trunk import VGG16_RELPATH
from .models.perceptual import load_lpips
from .models.quiet import no_progress_bars
from .models.weights import (
    check_controlnet,
    check_controlnet_fits,
    check_weights,
    controlnet_fix_command,
    default_weights_dir,
    fix_command,
    model_dirname,
)
from .request.image_file import model_identity
from .request.inputs import IMAGE_INPUTS, LORA_INPUTS, panorama_request
from .request.presets import model_defaults
from .version import __version__

logger = logging.getLogger(__name__)


def encoder_text(tokenizer: CLIPTokenizer, text: str) -> tuple[str, int | None]:
    """The part of `text` the text encoder reads, and its length in tokens (BOS and EOS
    included) where that part is the whole text; None where it is longer than the encoder reads.

    A prompt's cost stops at what the encoder reads: the text is tokenized in prefixes that
    double until one holds a margin of tokens past `model_max_length`, each cut at whitespace
    where it has any, so every word before the cut is tokenized as in the whole text (CLIP's
    pre-tokenizer splits at whitespace) and the first `model_max_length` tokens are the whole
    text's.
    """
    wanted = tokenizer.model_max_length + _TOKEN_MARGIN
    length = 4 * wanted
    # Counting a long text makes transformers warn that it is too long for the model; our
    # own notice says what happens instead, so the logs carry one line, not two.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        while True:
            if length >= len(text):
                return text, len(tokenizer(text, truncation=False).input_ids)
            prefix = text[:length]
            cut = next((i for i in range(length - 1, -1, -1) if prefix[i].isspace()), 0)
            prefix = prefix[:cut] or prefix
            if len(tokenizer(prefix, truncation=False).input_ids) > wanted:
                return prefix, None
            length *= 2
    finally:
        transformers_logging.set_verbosity(verbosity)


# Tokens past what the encoder reads that a prefix must hold, so that where it is cut inside
# a word (text without whitespace), the cut cannot reach back into the tokens the encoder reads.
_TOKEN_MARGIN = 32


def _joined(eps: Callable, beside: torch.Tensor, x: torch.Tensor, *args: Any) -> torch.Tensor:
    """`eps` of views `x` (1, 4, s, s) with `beside` (1, c, s, s) joined to their channels: an
    inpainting UNet's probe."""
    return eps(torch.cat([x, beside.to(x.dtype)], dim=1), *args)


def _load_checked(cls: Any, folder: Path, weights: Path, fix: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(folder)`, its weights file first held to the tensors the network its
    config describes holds: another model's file fails with a WeightsError naming the file and
    what it lacks or has in another shape, where diffusers would fail copying out of a meta
    tensor and transformers would fill the missing tensors with random numbers."""
    config = f"{folder.name}/config.json"
    try:
        network, loaded = cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    except Exception as exc:  # both raise many types on a tensor of another shape
        with torch.device("meta"):  # the network of the config, without its memory
            if hasattr(cls, "load_config"):  # diffusers
                built = cls.from_config(cls.load_config(folder))
            else:  # transformers
                built = cls(cls.config_class.from_pretrained(folder))
        if problem := tensors_problem(weights, _shapes(built), config):
            raise WeightsError(f"{problem}. {fix}") from exc
        raise
    # The loaders' own report: it knows the names they rename (transformers' `text_model.`).
    if missing := sorted(loaded.get("missing_keys") or ()):
        others = sorted(loaded.get("unexpected_keys") or ())
        held = f"; it holds {len(others)} others, such as {others[0]}" if others else ""
        raise WeightsError(
            f"Weights file {weights} does not hold the network {config} describes (another "
            f"model's file?): {len(missing)} of its {len(_shapes(network))} tensors are missing, "
            f"such as {missing[0]}{held}. {fix}"
        )
    return network


def _shapes(network: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in network.state_dict().items()}


class SyncDiffusionPipeline:
    """Coherent panoramas from Stable Diffusion with SyncDiffusion (Lee et al. 2023).

    SD 1.x/2.x take the components of `StableDiffusionPipeline`; SDXL also `text_encoder_2`
    and `tokenizer_2`, as `StableDiffusionXLPipeline` does. `force_zeros_for_empty_prompt`
    (SDXL's model_index.json sets it) makes an empty negative prompt zeros, as diffusers does.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: Scheduler,
        perceptual: lpips.LPIPS,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        force_zeros_for_empty_prompt: bool = False,
        controlnet: ControlNetModel | None = None,
    ) -> None:
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.controlnet = controlnet
        self.tokenizer, self.scheduler_config, self.perceptual = (
            tokenizer,
            scheduler.config,
            perceptual,
        )
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        family = unet_family(unet.config)
        if family is None or (family is SDXL and None in (text_encoder_2, tokenizer_2)):
            raise ValueError(
                "the UNet is neither SD 1.x/2.x's nor SDXL's, or SDXL's without text_encoder_2 "
                "and tokenizer_2"
            )
        self.family = family
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        for model in (*self._networks(), perceptual):
            model.eval().requires_grad_(False)
        # Whatever the other networks' dtype, the perceptual one is fp32 (see `precision`).
        perceptual.to(PERCEPTUAL_DTYPE)
        # What the sync backward recomputes rather than keeps (`recompute`): the networks it
        # runs through, the VAE's decoder only.
        self.recompute = recompute_layers(*self._denoisers(), vae.decoder, perceptual)
        self._window_bytes: dict[tuple[torch.device, torch.dtype, bool, bool], int] = {}
        # The hub revision of the weights, where their folder records one (`from_pretrained`).
        self.model_revision: str | None = None
        # The ControlNet's folder name and hub revision, where it was loaded from one.
        self.controlnet_name: str | None = None
        self.controlnet_revision: str | None = None
        # The model's own defaults beside the published ones (a few-step model's: `presets`).
        self.defaults: dict[str, Any] = {}
        # Where requests' LoRAs are downloaded to and kept (`lora_files`), and whether a LoRA
        # may be a local file: a server that takes requests from others sets it False.
        self.lora_dir = default_weights_dir() / LORA_FOLDER
        self.lora_local_files = True

    @classmethod
    def from_pretrained(
        cls,
        weights_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        model: str | None = None,
        controlnet: str | None = None,
    ) -> SyncDiffusionPipeline:
        """Load from a weights folder (default `$SYNCDIFFUSION_WEIGHTS` or `weights/`), no network.

        `model` is the model's folder in it (default `$SYNCDIFFUSION_MODEL`, else
        stable-diffusion-2-base): any SD 1.x/2.x or SDXL checkpoint in the diffusers layout,
        its family read from its files. `controlnet` is a ControlNet's folder under
        `controlnet/` (a hub id or a known name, as `download_weights.py --controlnet` takes),
        which must fit the model; the pipeline then lays panoramas out by a condition image.
        CUDA when available, else the CPU; fp16 on CUDA, fp32 on the CPU unless `dtype` says.
        `dtype` is that of the UNet, ControlNet, VAE and text encoders, except a VAE that must be
        upcast; LPIPS is always fp32 (`precision`).
        """
        weights_dir = Path(weights_dir) if weights_dir is not None else default_weights_dir()
        check_weights(weights_dir, model)
        control_dir = None
        if controlnet is not None:
            control_dir = check_controlnet(weights_dir, controlnet)
            check_controlnet_fits(weights_dir / model_dirname(model), control_dir)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        sd = weights_dir / model_dirname(model)
        family = read_family(sd)
        local = {"local_files_only": True}
        kwargs = {**local, "torch_dtype": dtype, "variant": sd_variant(sd)}
        encoders = zip(family.text_encoders, family.text_encoder_classes, strict=True)
        fix = fix_command(weights_dir, model)

        def load(cls: Any, name: str, **more: Any) -> Any:
            weights = sd / weights_file(name, kwargs["variant"])
            return _load_checked(cls, sd / name, weights, fix, **{**kwargs, **more})

        with no_progress_bars():
            index = DiffusionPipeline.load_config(sd, **local)  # model_index.json
            vae_config = AutoencoderKL.load_config(sd, subfolder="vae", **local)
            upcast = vae_dtype(dtype, vae_upcast(vae_config, family))
            pipe = cls(
                unet=load(UNet2DConditionModel, "unet"),
                vae=load(AutoencoderKL, "vae", torch_dtype=upcast),
                **{name: load(getattr(transformers, kind), name) for name, kind in encoders},
                **{
                    name: CLIPTokenizer.from_pretrained(sd, subfolder=name, **local)
                    for name in family.tokenizers
                },
                scheduler=DDIMScheduler.from_pretrained(sd, subfolder="scheduler", **local),
                perceptual=load_lpips(weights_dir / VGG16_RELPATH),
                force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt")),
                controlnet=None
                if control_dir is None
                else _load_checked(
                    ControlNetModel,
                    control_dir,
                    control_dir / controlnet_weights_file(controlnet_variant(control_dir)),
                    controlnet_fix_command(weights_dir, controlnet),
                    **{**kwargs, "variant": controlnet_variant(control_dir)},
                ),
            )
        pipe.model_revision = (read_source(sd) or {}).get("revision")
        pipe.defaults = model_defaults(sd)
        pipe.lora_dir = weights_dir / LORA_FOLDER
        if control_dir is not None:
            pipe.controlnet_name = control_dir.name
            pipe.controlnet_revision = (read_source(control_dir) or {}).get("revision")
        return pipe.to(device)

    def with_controlnet(
        self, controlnet: ControlNetModel | None, name: str | None = None
    ) -> SyncDiffusionPipeline:
        """The same networks with `controlnet` (None: without one), sharing every weight; `name`
        is what files record of it (default: a hash of its config). Raises ValueError, saying
        what differs, for a ControlNet that does not fit the UNet."""
        if controlnet is not None and (
            problem := controlnet_problem(dict(controlnet.config), dict(self.unet.config))
        ):
            raise ValueError(f"the ControlNet does not fit the model: {problem}")
        pipe = SyncDiffusionPipeline(
            unet=self.unet,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            scheduler=self.new_scheduler(),
            perceptual=self.perceptual,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            controlnet=controlnet,
        )
        pipe.model_revision, pipe.controlnet_name = self.model_revision, name
        pipe.defaults = self.defaults
        pipe.lora_dir, pipe.lora_local_files = self.lora_dir, self.lora_local_files
        return pipe.to(self.device)

    def _networks(self) -> list[torch.nn.Module]:
        """The model's networks (not LPIPS)."""
        return [*self._denoisers(), self.vae, *self.text_encoders()]

    def _denoisers(self) -> list[torch.nn.Module]:
        """The networks of a noise prediction: the UNet, and the ControlNet where there is one."""
        return [self.unet] + ([self.controlnet] if self.controlnet is not None else [])

    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders, in the order their states are concatenated."""
        return [self.text_encoder, self.text_encoder_2][: len(self.family.text_encoders)]

    def to(self, device: str | torch.device) -> SyncDiffusionPipeline:
        """Move every network to `device`."""
        for model in (*self._networks(), self.perceptual):
            model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """Where the networks are."""
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """The networks' floating-point type."""
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: 2 per downsampling level of the VAE."""
        return vae_scale_factor(self.vae)

    @property
    def inpainting(self) -> bool:
        """Whether the UNet is an inpainting one: it takes the mask and the masked image's
        latent beside the noisy latent (9 input channels, `init_image.MaskedImage`)."""
        return self.unet.config.in_channels != self.vae.config.latent_channels

    @property
    def window(self) -> int:
        """A view's side in latent pixels: the UNet's training size (64 SD2-base, 128 SDXL)."""
        return self.unet.config.sample_size

    @property
    def window_pixels(self) -> int:
        """A view's side in image pixels (512 SD2-base, 768 SD 2.1, 1024 SDXL)."""
        return self.geometry.window_pixels

    @property
    def geometry(self) -> Geometry:
        """The model's windows: what its inputs' bounds and its panoramas' views follow."""
        return Geometry(self.window, self.vae_scale_factor)

    def window_bytes(
        self, eps: Callable, scheduler: Scheduler, sync: bool = True, recompute: bool = True
    ) -> int:
        """One window's memory in a chunk, counted once per device and dtype on a 16x16-latent
        probe; `eps` and `scheduler` are a call's own. In a sync step
        (`chunks.sync_window_bytes`): what its backward keeps, with `self.recompute`
        recomputed, and the peak of that recomputation, or without `recompute` every
        activation; in another step (`chunks.plain_window_bytes`): the peak of its guided UNet
        forward."""
        key = (self.device, self.dtype, sync, sync and recompute)
        if key in self._window_bytes:
            return self._window_bytes[key]
        side, t = 16, scheduler.timesteps[0]
        pixels = self.vae_scale_factor * side
        probe = torch.zeros(1, self.vae.config.latent_channels, side, side, device=self.device)
        if self.inpainting:  # the mask and the masked image's latent beside the views
            extra = self.unet.config.in_channels - probe.shape[1]
            beside = torch.zeros(1, extra, side, side, device=self.device)
            eps = partial(_joined, eps, beside)
        control = None
        if self.controlnet is not None:
            crop = torch.zeros(1, 3, pixels, pixels, device=self.device)
            control = WindowControl(self.controlnet, crop, 1.0)
        parameters = [
            p
            for model in (*self._denoisers(), self.vae, self.perceptual)
            for p in (*model.parameters(), *model.buffers())
        ]
        if not sync:

            def denoise(x: torch.Tensor) -> torch.Tensor:
                return scheduler.step(eps(x, t, control), int(t), x).prev_sample

            count = plain_window_bytes(denoise, probe, self.window, parameters)
        else:
            with torch.no_grad():
                anchor = lpips_features(
                    self.perceptual, torch.zeros(1, 3, pixels, pixels, device=self.device)
                )
            loss = partial(
                sync_loss,
                windows=[0],
                predict_x0=x0_predictor(scheduler, eps, t, control),
                decode=partial(decode, self.vae),
                model=self.perceptual,
                anchor_features=anchor,
            )
            layers = self.recompute if recompute else ()
            count = sync_window_bytes(loss, probe, self.window, parameters, layers)
        self._window_bytes[key] = count
        return count

    def sync_chunks(
        self,
        eps: Callable,
        scheduler: Scheduler,
        n_windows: int,
        recompute: str = "auto",
        view_batch_size: int | None = None,
    ) -> SyncChunks:
        """Whether a call's sync backward recomputes and how many windows go per call, from
        each way's `window_bytes` and the free memory (`chunks.plan_sync_chunks`)."""
        kept, recomputed = (self.window_bytes(eps, scheduler, True, r) for r in (False, True))
        return plan_sync_chunks(
            recompute, n_windows, kept, recomputed, self.device, view_batch_size
        )

    def new_scheduler(self, name: str = "DDIM") -> Scheduler:
        """A fresh scheduler `name` (`schedulers.SCHEDULERS`, default DDIM, the published one)
        from the model's scheduler config, so no call sees another's state."""
        return make_scheduler(name, self.scheduler_config)

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> torch.Tensor:
        """Text embeddings `[negative, prompt]`, (2, 77, D); over-long text is cut to 77 tokens."""
        return self._encode(prompt, negative_prompt)[0]

    def _encode(
        self, prompt: str, negative_prompt: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Text embeddings (2, 77, D) and, for SDXL, the UNet's added conditions, each
        `[negative, prompt]`: the pooled text of the last encoder and the windows' size/crop.

        SD 1.x/2.x condition on the last hidden state; SDXL on the penultimate one of each
        encoder, concatenated, as `StableDiffusionXLPipeline` does.
        """
        texts = []
        for name, text in (("negative_prompt", negative_prompt), ("prompt", prompt)):
            read, n_tokens = encoder_text(self.tokenizer, text)
            max_length = self.tokenizer.model_max_length
            if n_tokens is None or n_tokens > max_length:
                length = f"more than {max_length}" if n_tokens is None else str(n_tokens)
                logger.warning(
                    "%s is %s tokens long; the text encoder reads the first %d",
                    name,
                    length,
                    max_length,
                )
            texts.append(read)
        states, pooled = [], None
        tokenizers = (self.tokenizer, self.tokenizer_2)
        with torch.no_grad():
            for encoder, tokenizer in zip(self.text_encoders(), tokenizers, strict=False):
                ids = tokenizer(
                    texts,
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
                layer = self.family.hidden_state
                output = encoder(ids.to(self.device), output_hidden_states=layer is not None)
                states.append(output[0] if layer is None else output.hidden_states[layer])
                if self.family.addition_embed_type is not None:
                    pooled = output[0]  # of the last encoder: its projected, pooled text
        embeddings = torch.cat(states, dim=-1)
        if pooled is None:
            return embeddings, None
        if self.force_zeros_for_empty_prompt and negative_prompt == "":
            embeddings[0], pooled[0] = 0, 0
        time_ids = window_time_ids(self.window_pixels).to(self.device, embeddings.dtype)
        return embeddings, {"text_embeds": pooled, "time_ids": time_ids}

    def decode(self, latents: torch.Tensor, loop_closure: bool = False) -> Image.Image:
        """A panorama latent (1, 4, H/8, W/8) to its 8-bit RGB picture.

        With `loop_closure` the width is decoded as a circle, so the picture's left and right
        edges meet without a seam in a 360-degree viewer.
        """
        with torch.no_grad():
            return to_pil(decode_panorama(self.vae, latents.to(self.device), loop_closure)[0])

    def request(self, /, **inputs: Any) -> dict[str, Any]:
        """Every input of one panorama on this model by name: those given, checked, and the
        model's defaults for the rest (`inputs.panorama_inputs`; with a ControlNet, the control
        inputs too). Raises `InputError`."""
        return panorama_request(
            inputs, self.geometry, control=self.controlnet is not None, defaults=self.defaults
        )

    def lora_networks(self) -> dict[str, torch.nn.Module]:
        """The networks a LoRA may change, by component name: the UNet and the text encoders."""
        encoders = zip(self.family.text_encoders, self.text_encoders(), strict=True)
        return {"unet": self.unet, **dict(encoders)}

    def loras(self, request: dict[str, Any]) -> list[Lora]:
        """The LoRAs of a checked request (`request`), each fetched (downloaded once into
        `lora_dir`), verified and held to this model (`lora.read_lora`). Raises `InputError`
        naming the input."""
        networks = self.lora_networks()
        found = []
        for name, scale_name in LORA_INPUTS.items():
            if request[name] is not None:
                file = fetch_lora(request[name], name, self.lora_dir, self.lora_local_files)
                found.append(read_lora(file, name, request[scale_name], self.family, networks))
        return found

    def fused_loras(self, loras: list[Lora]) -> AbstractContextManager[None]:
        """`loras` (`loras()`) fused into this model's networks for the duration, the base
        weights back to the bit afterwards (`lora.fused`)."""
        components = {
            "unet": self.unet,
            "vae": self.vae,
            "scheduler": self.new_scheduler(),
            **self.lora_networks(),
            "tokenizer": self.tokenizer,
            **({"tokenizer_2": self.tokenizer_2} if self.family is SDXL else {}),
        }
        return fused(self.family, components, loras)

    def __call__(
        self,
        /,
        *,
        view_batch_size: int | None = None,
        recompute: Literal["auto", "always", "never"] = "auto",
        output_type: Literal["pil", "latent"] = "pil",
        callback: Callback | None = None,
        **inputs: Any,
    ) -> Image.Image | torch.Tensor:
        """One panorama: a PIL image, or with `output_type="latent"` its (1, 4, H/8, W/8) latent.

        `inputs` are the panorama's, by name (`prompt`, `width`, `seed`, ...: see
        `inputs.panorama_inputs`); the model's defaults fill in the rest. Sides are at least
        one window (`window_pixels`) and `stride` is below one window. `view_batch_size`:
        windows per network call (default: as many as fit the free memory). `recompute`: the
        sync backward's activations recomputed rather than kept ("always"), kept ("never"), or
        ("auto") kept where the memory allows it and recomputed where not, or where one window
        kept runs out of memory: the same picture to the bit at the same chunk size. `callback`
        gets a dict after every denoising step (step, steps, t, sync, latent, view_batch_size:
        the windows per network call that fitted in that step, recompute and recompute_reason:
        whether a synced step recomputed and why, and loss_scale_back_offs: the windows' sync
        backward passes redone at a lower fp16 loss scale so far; from an `image`, the steps
        that run are counted). With `image` (and `mask`, `prompt_strength`) the panorama starts
        from a picture: restyled, repainted where the mask is white, or extended around it
        (`init_image`). With `sphere` it is the whole sphere, its band and its sky and ground
        caps made as three pictures and put together (`core.sphere`), the callback counting
        their steps as one run. The image's `info["parameters"]` holds every input, the model's
        identity (and hub revision, where its folder records one) and the version.
        """
        # 1. Check every input.
        request = self.request(**inputs)
        if output_type not in ("pil", "latent"):
            raise InputError(f"output_type must be 'pil' or 'latent'; got {output_type!r}")
        if view_batch_size is not None and (
            isinstance(view_batch_size, bool)
            or not isinstance(view_batch_size, int)
            or view_batch_size < 1
        ):
            raise InputError(
                f"view_batch_size must be a positive integer or None; got {view_batch_size!r}"
            )
        if recompute not in RECOMPUTE_MODES:
            allowed = ", ".join(repr(mode) for mode in RECOMPUTE_MODES)
            raise InputError(f"recompute must be one of {allowed}; got {recompute!r}")
        if request.get("sphere") and output_type == "latent":
            raise InputError(
                "output_type 'latent' is not available with sphere: a sphere is three "
                "panoramas (its band and its caps) put together as pictures"
            )

        # 2. The LoRAs, fetched and held to the model before any work, fused for this panorama.
        loras = self.loras(request)
        with self.fused_loras(loras):
            if request.get("sphere"):
                made = self._sphere(request, view_batch_size, recompute, callback)
            else:
                made = self._panorama(request, view_batch_size, recompute, output_type, callback)
        if output_type == "latent":
            return made
        image = made

        # 7. Keep what made the picture with it.
        image.info["parameters"] = {
            **self._recorded_inputs(request),
            **{k: v for lora in loras for k, v in lora.record(LORA_INPUTS[lora.name]).items()},
            "model": model_identity(self.unet.config),
            **({"model_revision": self.model_revision} if self.model_revision else {}),
            **self._controlnet_record(request),
            "syncdiffusion": __version__,
        }
        return image

    def _panorama(
        self,
        request: dict[str, Any],
        view_batch_size: int | None,
        recompute: str,
        output_type: str,
        callback: Callback | None,
        lead: AnchorImages | None = None,
        follow: AnchorImages | None = None,
    ) -> Image.Image | torch.Tensor:
        """Steps 3 to 6 of `__call__`: the picture (or latent) of a checked request; its anchor's
        images kept in `lead`, or its windows synced to those of `follow` (`sample_panorama`)."""
        # 3. Encode the prompt.
        text_embeddings, added_conditions = self._encode(
            request["prompt"], request["negative_prompt"]
        )

        # 4. The initial noise: drawn on the CPU in fp32 as published, from a private generator;
        # with an image, after its latent's sample, as diffusers' img2img draws them. An
        # inpainting UNet always takes a mask and the masked image (with neither, everything is
        # made anew: a white mask over grey); at full strength it starts from noise, the image
        # unencoded, and the masked image's sample is drawn after the noise, as diffusers'
        # inpainting pipeline draws them.
        generator = torch.Generator("cpu").manual_seed(request["seed"])
        f = self.vae_scale_factor
        width, height = request["width"], request["height"]
        image, mask = self._image_and_mask(request)
        if self.inpainting and mask is None:
            mask = Image.new("L", (width, height), 255)
        full_strength = image is None or request["prompt_strength"] == 1
        from_noise = mask is not None and full_strength
        pixels = None if image is None else image_pixels(image, width, height)
        if pixels is not None and not (self.inpainting and from_noise):
            with torch.no_grad():
                image_latent = encode(self.vae, pixels.to(self.device), generator)
        latent_size = (height // f, width // f)
        latent = torch.randn(
            (1, self.vae.config.latent_channels, *latent_size), generator=generator
        ).to(self.device)
        windows = self.geometry.windows(request)
        masked = None
        if self.inpainting:
            held = mask_pixels(mask, width, height)
            with torch.no_grad():
                masked_latent = encode(
                    self.vae, masked_pixels(pixels, held).to(self.device), generator
                )
            held = F.interpolate(held, size=latent_size).to(self.device)
            masked = MaskedImage(held, masked_latent, windows)

        # 5. The views, the schedule and the condition image's crops.
        control = None
        if self.controlnet is not None:
            control = Control(
                self.controlnet,
                # In the ControlNet's dtype once, not once per crop.
                condition_tensor(request["control_image"], request["width"], request["height"]).to(
                    self.device, self.controlnet.dtype
                ),
                windows,
                self.vae_scale_factor,
                request["controlnet_conditioning_scale"],
                request["control_guidance_start"],
                request["control_guidance_end"],
            )
        scheduler = self.new_scheduler(request["scheduler"])
        scheduler.set_timesteps(request["num_inference_steps"])
        # From the first timestep, or the one the image's strength leaves, without looking it up.
        start, kept = start_at(scheduler, steps_run(request)), None
        if image is None or (self.inpainting and from_noise):
            # A k-diffusion scheduler starts from noise of its largest sigma (DDIM's factor is 1).
            latent = latent * scheduler.init_noise_sigma
        else:
            noise = latent
            latent = start_latent(scheduler, image_latent, noise, start, from_noise)
            if mask is not None and not self.inpainting:
                held = mask_latent(mask, width, height, f).to(self.device)
                kept = KeptRegion(image_latent, held, noise)
        # What a window needs in memory is the networks' (a step's own arithmetic is a few
        # elementwise operations): counted on a DDIM step, which keeps no state to disturb.
        memory_probe = scheduler
        if not per_view(scheduler):
            memory_probe = self.new_scheduler()
            memory_probe.set_timesteps(request["num_inference_steps"])
        eps = partial(
            guided_eps,
            self.unet,
            text_embeddings=text_embeddings,
            guidance_scale=request["guidance_scale"],
            added_conditions=added_conditions,
        )

        # 6. Denoise, then decode. Out of memory where no smaller chunk or tiled decode fits
        # fails this panorama only, and after clean-up.
        out_of_memory = None
        try:
            with torch.no_grad():
                plan = self.sync_chunks(eps, memory_probe, len(windows), recompute, view_batch_size)
                logger.info("sync backward: %s", plan.reason)
                plain_batch_size = view_batch_size or auto_view_batch_size(
                    len(windows), self.window_bytes(eps, memory_probe, sync=False), self.device
                )
                fallback = self.recompute if recompute == "auto" else ()
                recomputation = (
                    Recomputation(self.recompute, reason=plan.reason)
                    if plan.recompute
                    else Recomputation((), fallback, plan.reason)
                )
                latent = sample_panorama(
                    latent,
                    windows,
                    eps=eps,
                    scheduler=scheduler,
                    decode=partial(decode, self.vae),
                    perceptual=self.perceptual,
                    sync=sync_schedule(request),
                    view_batch_size=plan.view_batch_size,
                    plain_batch_size=plain_batch_size,
                    recompute=recomputation,
                    initial_loss_scale=initial_loss_scale(self.dtype),
                    control=control,
                    generator=generator,
                    callback=callback,
                    start=start,
                    kept=kept,
                    masked=masked,
                    lead=lead,
                    follow=follow,
                )
                if output_type == "latent":
                    image = None
                else:
                    image = self.decode(latent, request["loop_closure"])
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            out_of_memory = str(error)  # its text only: the error would keep the chunk alive
        if out_of_memory is not None:
            # Raised here, past the `except`, so that neither this error's context nor a
            # traceback keeps the failed chunk's tensors alive while the next request sizes
            # its chunks.
            release_memory()
            raise MemoryError(
                f"out of {self.device.type} memory even with one window at a time "
                f"({free_memory(self.device) / 2**30:.1f} GiB free after clean-up); "
                "the GPU is too small for this model or is shared with other work. "
                f"PyTorch said: {out_of_memory}"
            )
        return latent if image is None else image

    def _sphere(
        self,
        request: dict[str, Any],
        view_batch_size: int | None,
        recompute: str,
        callback: Callback | None,
    ) -> Image.Image:
        """A whole sphere (`core.sphere`): its band around the horizon, then its sky and ground
        caps, each made from the band's projection onto its cube face and synced to the band's
        anchor (its predicted clean image at each synced step), put together. The callback
        counts the three parts' steps as one run, and says which part (`part`)."""
        band_request, cap_request = sphere_parts(request)
        steps, done = steps_run(band_request) + len(CAPS) * steps_run(cap_request), 0
        anchor = AnchorImages()

        def run(part: dict[str, Any], name: str, **anchors: AnchorImages) -> Image.Image:
            nonlocal done

            def report(state: dict[str, Any]) -> None:
                callback({**state, "step": done + state["step"], "steps": steps, "part": name})

            made = self._panorama(
                part, view_batch_size, recompute, "pil", report if callback else None, **anchors
            )
            done += steps_run(part)
            return made

        band = run(band_request, "band", lead=anchor)
        size = cap_request["width"]
        caps = {
            face: run(
                {
                    **cap_request,
                    "prompt": cap_prompt(request, face),
                    "image": cap_picture(band, face),
                    "mask": cap_mask(face, size),
                },
                face,
                follow=anchor,
            )
            for face in CAPS
        }
        return sphere_picture(band, caps)

    @staticmethod
    def _image_and_mask(
        request: dict[str, Any],
    ) -> tuple[Image.Image | None, Image.Image | None]:
        """The picture the panorama starts from and its mask (white: made anew), at any size:
        the request's image where it has the panorama's proportions, else the image placed in
        the middle of the panorama with the rest made anew (`init_image.outpaint`)."""
        image, mask = request["image"], request["mask"]
        if image is None:
            return None, None
        width, height = request["width"], request["height"]
        if same_proportions(image, width, height):
            return image, mask
        logger.info(
            "image is %dx%d, not the %dx%d panorama's proportions: it is placed in the middle "
            "and the rest is made anew",
            image.width,
            image.height,
            width,
            height,
        )
        return outpaint(image, mask, width, height)

    @staticmethod
    def _recorded_inputs(request: dict[str, Any]) -> dict[str, Any]:
        """The inputs a file saves: the image and mask by their pixels' hash and size (as the
        condition image), and none of `IMAGE_INPUTS` without an image, which they would not have
        changed (a panorama from noise saves what it saved before they were inputs). The LoRAs
        are saved by `Lora.record`, only where a request has one."""
        loras = {*LORA_INPUTS, *LORA_INPUTS.values()}
        request = {name: value for name, value in request.items() if name not in loras}
        if not request.get("sphere"):  # as a panorama saved before it was an input
            request.pop("sphere", None)
        for name in CAP_PROMPTS.values():  # likewise, a cap's prompt left empty
            if not request.get(name):
                request.pop(name, None)
        if request["image"] is None:
            return {name: value for name, value in request.items() if name not in IMAGE_INPUTS}
        mask = request["mask"]
        return {
            **request,
            "image": image_record(request["image"]),
            "mask": None if mask is None else image_record(mask),
        }

    def _controlnet_record(self, request: dict[str, Any]) -> dict[str, Any]:
        """What a file saves of the ControlNet and the condition image (by its pixels' hash and
        size: the image itself stays with its owner)."""
        if self.controlnet is None:
            return {}
        record = {
            "control_image": image_record(request["control_image"]),
            "controlnet": self.controlnet_name or model_identity(self.controlnet.config),
        }
        if self.controlnet_revision:
            record["controlnet_revision"] = self.controlnet_revision
        return record
