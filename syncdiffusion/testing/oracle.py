"""The test oracle: a literal, slow re-statement of the published wrapper's SyncDiffusion.

Nothing in the product calls this; it lives in `syncdiffusion.testing` so that the tests and the
scripts import it alike. It is written to be obviously the published algorithm
(docs/ALGORITHM.md): one view at a time, the anchor's gradient computed and thrown away, the
anchor run twice, LPIPS called whole. Tests and `scripts/benchmark.py` compare the fast pipeline
against it. It shares no code with the fast
path on purpose, window geometry included; it only borrows the loaded networks.
"""

from __future__ import annotations

import torch
import torchvision.transforms as T
from PIL import Image
from torch.autograd import grad


def _get_views(height: int, width: int, stride: int, loop_closure: bool) -> list[tuple]:
    latent_h, latent_w = height // 8, width // 8
    n_h = (latent_h - 64) // stride + 1
    n_w = (latent_w - 64) // stride + 1
    views = []
    for i in range(n_h * n_w):
        h_start = int((i // n_w) * stride)
        w_start = int((i % n_w) * stride)
        views.append((h_start, h_start + 64, w_start, w_start + 64))
    if loop_closure:
        for j in range(64 // stride - 2):
            w_start = int(latent_w - 64 + (j + 1) * stride)
            w_end = int((j + 1) * stride)
            views.append((0, 64, w_start, w_end))
    return views


def _view_of(latent: torch.Tensor, view: tuple) -> torch.Tensor:
    h_start, h_end, w_start, w_end = view
    if w_end < w_start:
        return torch.cat(
            [latent[:, :, h_start:h_end, w_start:], latent[:, :, h_start:h_end, :w_end]], dim=-1
        )
    return latent[:, :, h_start:h_end, w_start:w_end]


def oracle_panorama(
    pipe,
    prompt: str,
    negative_prompt: str = "",
    width: int = 2048,
    height: int = 512,
    guidance_scale: float = 7.5,
    sync_weight: float = 20.0,
    sync_decay_rate: float = 0.99,
    sync_freq: int = 1,
    sync_threshold: int = 5,
    num_inference_steps: int = 50,
    stride: int = 16,
    seed: int = 2,
    loop_closure: bool = False,
) -> tuple[Image.Image, torch.Tensor]:
    """The published panorama and its final latent, from the networks loaded in `pipe`."""
    unet, vae, tokenizer, text_encoder = pipe.unet, pipe.vae, pipe.tokenizer, pipe.text_encoder
    percept_loss, device = pipe.perceptual, pipe.device
    scheduler = pipe.new_scheduler()

    def decode_latents(latents):
        latents = 1 / 0.18215 * latents
        imgs = vae.decode(latents).sample
        return (imgs / 2 + 0.5).clamp(0, 1)

    with torch.no_grad():
        text_input = tokenizer(
            prompt,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        text_embeddings = text_encoder(text_input.input_ids.to(device))[0]
        uncond_input = tokenizer(
            negative_prompt,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        uncond_embeddings = text_encoder(uncond_input.input_ids.to(device))[0]
        text_embeds = torch.cat([uncond_embeddings, text_embeddings])

    views = _get_views(height, width, stride, loop_closure)
    torch.manual_seed(seed)
    latent = torch.randn((1, unet.config.in_channels, height // 8, width // 8))
    count = torch.zeros_like(latent, requires_grad=False, device=device)
    value = torch.zeros_like(latent, requires_grad=False, device=device)
    latent = latent.to(device)
    scheduler.set_timesteps(num_inference_steps)
    anchor_view_idx = len(views) // 2
    sync_scheduler = [sync_weight * (sync_decay_rate**i) for i in range(num_inference_steps)]

    def guided(latent_view, t):
        noise_pred = unet(torch.cat([latent_view] * 2), t, encoder_hidden_states=text_embeds).sample
        noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
        return noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)

    # Published: fp32 weights under CUDA autocast; on the CPU this is a no-op.
    with torch.autocast("cuda", enabled=latent.is_cuda):
        for i, t in enumerate(scheduler.timesteps):
            count.zero_()
            value.zero_()
            syncing = (i + 1) % sync_freq == 0 and i < sync_threshold
            if syncing:
                with torch.no_grad():
                    latent_view = _view_of(latent, views[anchor_view_idx]).detach()
                    latent_pred_x0 = scheduler.step(guided(latent_view, t), t, latent_view)[
                        "pred_original_sample"
                    ]
                    decoded_image_anchor = decode_latents(latent_pred_x0)

            for view_idx, view in enumerate(views):
                latent_view = _view_of(latent, view).detach()
                latent_view_copy = latent_view.clone().detach()
                if syncing:
                    with torch.enable_grad():
                        latent_view = latent_view.requires_grad_()
                        out = scheduler.step(guided(latent_view, t), t, latent_view)
                        decoded_x0 = decode_latents(out["pred_original_sample"])
                        percept = percept_loss(
                            decoded_x0 * 2.0 - 1.0, decoded_image_anchor * 2.0 - 1.0
                        )
                        norm_grad = grad(outputs=percept, inputs=latent_view)[0]
                    if view_idx != anchor_view_idx:
                        latent_view_copy = latent_view_copy - sync_scheduler[i] * norm_grad

                with torch.no_grad():
                    out = scheduler.step(guided(latent_view_copy, t), t, latent_view_copy)
                    latent_view_denoised = out["prev_sample"]

                h_start, h_end, w_start, w_end = view
                if w_end < w_start:
                    split = latent.shape[-1] - w_start
                    value[:, :, h_start:h_end, w_start:] += latent_view_denoised[..., :split]
                    value[:, :, h_start:h_end, :w_end] += latent_view_denoised[..., split:]
                    count[:, :, h_start:h_end, w_start:] += 1
                    count[:, :, h_start:h_end, :w_end] += 1
                else:
                    value[:, :, h_start:h_end, w_start:w_end] += latent_view_denoised
                    count[:, :, h_start:h_end, w_start:w_end] += 1

            latent = torch.where(count > 0, value / count, value)

    with torch.no_grad():
        imgs = decode_latents(latent)
    return T.ToPILImage()(imgs[0].cpu()), latent
