"""fp16 on the GPU, proven on the CPU: LPIPS stays fp32 and the sync backward is loss-scaled.

fp16 convolutions are very slow on the CPU, so these tests work at the level of LPIPS and of
one view's sync gradient, on the tiny model, rather than on whole panoramas.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from syncdiffusion import SyncDiffusionPipeline
from syncdiffusion.core.decoding import decode
from syncdiffusion.core.precision import LossScale, initial_loss_scale
from syncdiffusion.core.sampling import guided_eps, sample_panorama, x0_predictor
from syncdiffusion.core.sync import lpips_features, lpips_to_anchor, sync_gradient
from syncdiffusion.core.sync_schedule import sync_schedule
from syncdiffusion.testing.measure import SD2_CONFIGS, SDXL_CONFIGS


@pytest.fixture(scope="module")
def pipe16(tiny_weights):
    """The tiny model as CUDA users get it: UNet, VAE and text encoder in fp16."""
    return SyncDiffusionPipeline.from_pretrained(tiny_weights, device="cpu", dtype=torch.float16)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)


def test_the_perceptual_network_stays_fp32_beside_fp16_networks(pipe16):
    assert pipe16.unet.dtype == pipe16.vae.dtype == torch.float16
    assert {p.dtype for p in pipe16.perceptual.parameters()} == {torch.float32}


def _extreme_lpips(perceptual):
    """LPIPS whose first VGG layer is all zero on dark pixels and over 100 per channel on bright
    ones: 64 channels of squares sum to more than fp16's largest number (65504)."""
    model = copy.deepcopy(perceptual)
    conv = model.net.slice1[0]
    conv.weight.data.fill_(2.0)
    conv.bias.data.zero_()
    return model


def test_lpips_of_fp16_images_is_finite_and_matches_fp32_where_features_vanish_or_blow_up(
    pipe16,
):
    model = _extreme_lpips(pipe16.perceptual)
    generator = torch.Generator().manual_seed(0)
    # Left half dark (features exactly 0 after ReLU), right half bright (features over 100).
    images = torch.cat(
        [torch.full((2, 3, 64, 32), -1.0), torch.full((2, 3, 64, 32), 1.0)], dim=-1
    ) + 0.05 * torch.rand(2, 3, 64, 64, generator=generator)
    anchor = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        first = model.net(model.scaling_layer(images))[0]
        assert (first[..., :8] == 0).all() and (first[..., -8:] ** 2).sum(dim=1).min() > 65504
        anchor_features = lpips_features(model, anchor)

    def distance_and_grad(x):
        x = x.detach().requires_grad_()
        distance = lpips_to_anchor(model, x, anchor_features)
        (grad,) = torch.autograd.grad(distance.sum(), x)
        return distance.detach(), grad.float()

    d32, g32 = distance_and_grad(images.half().float())
    d16, g16 = distance_and_grad(images.half())
    assert d16.isfinite().all() and g16.isfinite().all()
    assert torch.allclose(d16, d32, rtol=1e-5)
    assert cosine(g16, g32) > 0.9999


def _view_gradient(pipe, view, t, scale):
    """The sync gradient of `view` at timestep `t` for a fixed anchor, loss-scaled by `scale`."""
    scheduler = pipe.new_scheduler()
    scheduler.set_timesteps(50)
    embeddings = pipe.encode_prompt("a harbour at dawn")
    eps = partial(guided_eps, pipe.unet, text_embeddings=embeddings, guidance_scale=7.5)
    anchor_image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        anchor_features = lpips_features(pipe.perceptual, anchor_image * 2 - 1)
    return sync_gradient(
        view,
        [0],
        x0_predictor(scheduler, eps, scheduler.timesteps[t]),
        partial(decode, pipe.vae),
        pipe.perceptual,
        anchor_features,
        LossScale(1, scale),
    )


@pytest.fixture(scope="module")
def view_gradients(pipe, pipe16):
    """One 64x64 view's sync gradient at the first step: fp32, and fp16 with and without scaling."""
    view = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(5))
    return {
        "fp32": _view_gradient(pipe, view, 0, 1.0),
        "fp16": _view_gradient(pipe16, view, 0, initial_loss_scale(torch.float16)),
        "fp16 unscaled": _view_gradient(pipe16, view, 0, 1.0),
    }


def test_the_fp16_sync_gradient_points_where_the_fp32_one_does(view_gradients):
    g32, g16 = view_gradients["fp32"], view_gradients["fp16"]
    assert g16.dtype == torch.float32 and g16.isfinite().all()
    assert cosine(g16, g32) > 0.99
    assert g16.norm() / g32.norm() == pytest.approx(1, abs=0.02)


def test_without_a_loss_scale_the_fp16_gradient_underflows(view_gradients):
    # What the loss scale prevents: most of the gradient flushed to zero on the way back.
    g32, unscaled = view_gradients["fp32"], view_gradients["fp16 unscaled"]
    assert cosine(unscaled, g32) < cosine(view_gradients["fp16"], g32)
    assert (unscaled == 0).float().mean() > 10 * (view_gradients["fp16"] == 0).float().mean()


def test_a_window_redone_at_a_lower_loss_scale_is_counted_and_reaches_the_callback(pipe):
    # fp32 gradients do not overflow even at a scale of 3e38, so the overflow is a stand-in: the
    # first backward pass through the decoder comes back infinite, as an fp16 one would.
    request = pipe.request(
        prompt="a bay", width=768, num_inference_steps=2, sync_threshold=1, seed=0
    )
    windows = pipe.geometry.windows(request)  # 3: the anchor and 2 synced windows
    scheduler = pipe.new_scheduler()
    scheduler.set_timesteps(request["num_inference_steps"])
    backward_passes = []

    def decode_overflowing_once(x0):
        if x0.requires_grad:  # a sync backward's decode, not the anchor's
            if not backward_passes:
                x0.register_hook(lambda grad: torch.full_like(grad, float("inf")))
            backward_passes.append(len(x0))
        return decode(pipe.vae, x0)

    states = []
    latent = sample_panorama(
        torch.randn(1, 4, 64, 96, generator=torch.Generator().manual_seed(0)),
        windows,
        eps=partial(
            guided_eps, pipe.unet, text_embeddings=pipe.encode_prompt("a bay"), guidance_scale=7.5
        ),
        scheduler=scheduler,
        decode=decode_overflowing_once,
        perceptual=pipe.perceptual,
        sync=sync_schedule(request),
        view_batch_size=2,
        initial_loss_scale=initial_loss_scale(torch.float16),
        callback=states.append,
    )
    # Both synced windows shared the pass that overflowed, and were redone together once.
    assert backward_passes == [2, 2]
    assert [state["loss_scale_back_offs"] for state in states] == [2, 2]
    assert latent.isfinite().all()


def test_loss_scale_back_offs_count_each_window_lowered():
    scale = LossScale(3, initial_loss_scale(torch.float16))
    scale.back_off([])
    scale.back_off([0, 2])
    scale.back_off([2])
    assert scale.back_offs == 3
    assert scale.of(torch.tensor([0, 1, 2])).tolist() == [2.0**12, 2.0**16, 2.0**8]


def test_the_vae_is_upcast_as_diffusers_pipelines_would_and_read_from_the_file():
    import json

    from diffusers import AutoencoderKL

    from syncdiffusion.core.precision import vae_dtype, vae_upcast
    from syncdiffusion.models.family import SD, SDXL

    sd2 = json.loads((SD2_CONFIGS / "vae.json").read_text())
    sdxl = json.loads((SDXL_CONFIGS / "vae.json").read_text())
    # SD2-base's file predates the key: its VAE runs in fp16, as in diffusers' SD pipeline,
    # although a model built from the file reports force_upcast true (diffusers' default).
    assert "force_upcast" not in sd2 and not vae_upcast(sd2, SD)
    with torch.device("meta"):  # the architecture only: nothing allocated
        assert AutoencoderKL.from_config(sd2).config.force_upcast is True
    assert vae_dtype(torch.float16, vae_upcast(sd2, SD)) == torch.float16
    assert vae_upcast(sdxl, SDXL) and vae_dtype(torch.float16, True) == torch.float32
    # An SDXL file without the key upcasts, as diffusers' SDXL pipeline reads it; a fix-up VAE
    # that says false does not.
    assert vae_upcast({}, SDXL) and not vae_upcast({"force_upcast": False}, SDXL)
    # SD 1.x/2.x VAEs saved by newer diffusers carry the default, true: diffusers' SD pipeline
    # ignores it and runs them in fp16, and so does this one.
    assert not vae_upcast({"force_upcast": True}, SD)
    assert vae_dtype(torch.bfloat16, True) == torch.bfloat16  # bf16 has fp32's range
