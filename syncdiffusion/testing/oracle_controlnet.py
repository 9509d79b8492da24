"""The ControlNet test oracle: a literal, slow re-statement of the SyncDiffusion authors'
SyncControlNet (`SyncControlNet/pipeline_sync_controlnet.py` of their repository, September
2023) on SD 1.x/2.x, as their notebook runs it (DDIM, one ControlNet, no guess mode).

Like `oracle`, nothing in the product calls it, and it shares no code with the fast path; it
only borrows the networks loaded in a pipeline. Where their pipeline differs from the published
SyncDiffusion wrapper, this follows theirs: each view's sync gradient is applied to the anchor
too (it is zero there), the sync step runs while `i < sync_threshold` (no `sync_freq`),
classifier-free guidance is skipped for `guidance_scale <= 1`, and the final decode divides by
the VAE's scaling factor. It draws no 360-degree panoramas: theirs has no loop closure.
"""

from __future__ import annotations

import torch
import torchvision.transforms as T
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from torch.autograd import grad


def _get_views(height: int, width: int, window_size: int = 64, stride: int = 16) -> list[tuple]:
    num_blocks_height = (height - window_size) // stride + 1
    num_blocks_width = (width - window_size) // stride + 1
    views = []
    for i in range(num_blocks_height * num_blocks_width):
        h_start = int((i // num_blocks_width) * stride)
        w_start = int((i % num_blocks_width) * stride)
        views.append((h_start, h_start + window_size, w_start, w_start + window_size))
    return views


def oracle_sync_controlnet(
    pipe,
    control_image: Image.Image,
    prompt: str,
    negative_prompt: str = "",
    width: int = 2048,
    height: int = 512,
    guidance_scale: float = 7.5,
    sync_weight: float = 20.0,
    sync_decay_rate: float = 0.99,
    sync_threshold: int = 5,
    num_inference_steps: int = 50,
    stride: int = 16,
    seed: int = 2,
    controlnet_conditioning_scale: float = 1.0,
    control_guidance_start: float = 0.0,
    control_guidance_end: float = 1.0,
) -> tuple[Image.Image, torch.Tensor]:
    """Their panorama and its final latent, from the networks loaded in `pipe` (which has a
    ControlNet)."""
    unet, vae, controlnet = pipe.unet, pipe.vae, pipe.controlnet
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    perceptual_loss, device = pipe.perceptual, pipe.device
    scheduler = pipe.new_scheduler()
    do_classifier_free_guidance = guidance_scale > 1.0

    def decode_latents(latents):
        latents = 1 / vae.config.scaling_factor * latents
        image = vae.decode(latents, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

    def encode(text):
        ids = tokenizer(
            text,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return text_encoder(ids.to(device))[0]

    with torch.no_grad():
        prompt_embeds = encode(prompt)
        if do_classifier_free_guidance:
            prompt_embeds = torch.cat([encode(negative_prompt), prompt_embeds])

    # prepare_image: resized to the panorama, in [0, 1].
    processor = VaeImageProcessor(do_convert_rgb=True, do_normalize=False)
    image = processor.preprocess([control_image], height=height, width=width).to(torch.float32)
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (1, unet.config.in_channels, height // 8, width // 8)
    latents = torch.randn(shape, generator=generator, dtype=prompt_embeds.dtype).to(device)
    latents = latents * scheduler.init_noise_sigma

    controlnet_keep = [
        1.0
        - float(
            i / len(timesteps) < control_guidance_start
            or (i + 1) / len(timesteps) > control_guidance_end
        )
        for i in range(len(timesteps))
    ]
    window_size = unet.config.sample_size
    views = _get_views(height // 8, width // 8, window_size, stride)
    count = torch.zeros_like(latents, requires_grad=False, device=device)
    value = torch.zeros_like(latents, requires_grad=False, device=device)
    anchor_view_idx = len(views) // 2
    sync_scheduler = torch.tensor(
        [sync_weight * (sync_decay_rate**i) for i in range(num_inference_steps)]
    )
    side = 8 * window_size
    cond_images = torch.zeros((len(views), 3, side, side))
    for i in range(len(views)):
        cond_images[i] = image[
            0, :, 8 * views[i][0] : 8 * views[i][1], 8 * views[i][2] : 8 * views[i][3]
        ]
    cond_images = cond_images.to(device=device)

    def noise_prediction(latent_view, t, cond_i, i):
        latent_model_input = (
            torch.cat([latent_view] * 2) if do_classifier_free_guidance else latent_view
        )
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        cond_scale = controlnet_conditioning_scale * controlnet_keep[i]
        down_block_res_samples, mid_block_res_sample = controlnet(
            latent_model_input,
            t,
            encoder_hidden_states=prompt_embeds,
            controlnet_cond=cond_i,
            conditioning_scale=cond_scale,
            guess_mode=False,
            return_dict=False,
        )
        noise_pred = unet(
            latent_model_input,
            t,
            encoder_hidden_states=prompt_embeds,
            down_block_additional_residuals=down_block_res_samples,
            mid_block_additional_residual=mid_block_res_sample,
            return_dict=False,
        )[0]
        if do_classifier_free_guidance:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        return noise_pred

    with torch.autocast("cuda", enabled=latents.is_cuda):
        for i, t in enumerate(timesteps):
            count.zero_()
            value.zero_()
            with torch.no_grad():
                if i < sync_threshold:
                    h_start, h_end, w_start, w_end = views[anchor_view_idx]
                    latent_view = latents[:, :, h_start:h_end, w_start:w_end].detach()
                    cond_i = cond_images[anchor_view_idx].unsqueeze(0).detach()
                    noise_pred = noise_prediction(latent_view, t, cond_i, i)
                    latent_pred_x0 = scheduler.step(noise_pred, t, latent_view)[
                        "pred_original_sample"
                    ]
                    decoded_image_anchor = decode_latents(latent_pred_x0)

            for view_idx, (h_start, h_end, w_start, w_end) in enumerate(views):
                latent_view = latents[:, :, h_start:h_end, w_start:w_end].detach()
                cond_i = cond_images[view_idx].unsqueeze(0).detach()
                latent_view_copy = latent_view.clone().detach()
                if i < sync_threshold:
                    with torch.enable_grad():
                        latent_view = latent_view.requires_grad_(True)
                        noise_pred = noise_prediction(latent_view, t, cond_i, i)
                        pred_x0 = scheduler.step(noise_pred, t, latent_view)["pred_original_sample"]
                        decoded_x0 = decode_latents(pred_x0)
                        perceptual = perceptual_loss(
                            2 * decoded_x0 - 1, 2 * decoded_image_anchor - 1
                        )
                        norm_grad = grad(outputs=perceptual, inputs=latent_view, allow_unused=True)[
                            0
                        ]
                    latent_view_copy = latent_view_copy - sync_scheduler[i] * norm_grad

                with torch.no_grad():
                    noise_pred = noise_prediction(latent_view_copy, t, cond_i, i)
                    latents_view_updated = scheduler.step(noise_pred, t, latent_view_copy)[
                        "prev_sample"
                    ]
                value[:, :, h_start:h_end, w_start:w_end] += latents_view_updated
                count[:, :, h_start:h_end, w_start:w_end] += 1

            latents = torch.where(count > 0, value / count, value)

    with torch.no_grad():
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1)
    return T.ToPILImage()(image[0].cpu()), latents
