"""The sync backward recomputes activations rather than keeping them: the same gradient to the
bit, in a fraction of the memory, and only in the sync backward."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from syncdiffusion.core import recompute
from syncdiffusion.core.chunks import peak_live_bytes, saved_bytes
from syncdiffusion.core.decoding import decode
from syncdiffusion.core.precision import LossScale
from syncdiffusion.core.sampling import guided_eps, x0_predictor
from syncdiffusion.core.sync import lpips_features, sync_gradient, sync_loss


@pytest.fixture(scope="module")
def step(pipe):
    """The first of two steps' scheduler, eps and an anchor's LPIPS features on the tiny model."""
    scheduler = pipe.new_scheduler()
    scheduler.set_timesteps(2)
    eps = partial(
        guided_eps, pipe.unet, text_embeddings=pipe.encode_prompt("a bay"), guidance_scale=7.5
    )
    with torch.no_grad():
        anchor = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(1))
        features = lpips_features(pipe.perceptual, anchor * 2 - 1)
    return scheduler, eps, features


def test_the_recomputed_layers_are_the_blocks_of_each_network_none_inside_another(pipe):
    layers = pipe.recompute
    assert len({id(layer) for layer in layers}) == len(layers)
    for layer in layers:
        assert not any(other is not layer and other in set(layer.modules()) for other in layers)
    kinds = {type(layer).__name__ for layer in layers}
    assert {"ResnetBlock2D", "BasicTransformerBlock", "Upsample2D", "Sequential"} <= kinds
    decoder = set(pipe.vae.decoder.modules())
    assert any(layer in decoder for layer in layers)
    assert not any(layer in set(pipe.vae.encoder.modules()) for layer in layers)


def test_recomputing_gives_the_same_gradient_to_the_bit_and_leaves_the_layers_as_they_were(
    pipe, step
):
    scheduler, eps, features = step
    views = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    x0 = x0_predictor(scheduler, eps, scheduler.timesteps[0])
    grads = [
        sync_gradient(
            views,
            [0, 2],
            x0,
            partial(decode, pipe.vae),
            pipe.perceptual,
            features,
            LossScale(3, 1.0),
            layers,
        )
        for layers in ((), pipe.recompute)
    ]
    assert torch.equal(*grads)
    assert not any("forward" in layer.__dict__ for layer in pipe.recompute)


def test_recomputation_runs_only_in_the_sync_backward(pipe, monkeypatch):
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    inputs = dict(prompt="a bay", width=640, height=512, num_inference_steps=2, seed=1)
    pipe(**inputs, sync_threshold=0, output_type="latent")
    assert calls == []  # plain denoising: no_grad, nothing kept, nothing recomputed
    pipe(**inputs, sync_threshold=1, output_type="latent")
    assert len(calls) > 0 and all(calls)
    assert not any("forward" in layer.__dict__ for layer in pipe.recompute)


def test_the_window_estimate_is_what_recomputation_keeps_and_holds_at_its_peak(pipe, step):
    """The estimate, counted on a small probe, against one whole 64x64 window's sync loss: what
    it keeps for the backward with the layers recomputed, and one layer's recomputation."""
    scheduler, eps, _ = step
    with torch.no_grad():
        anchor = lpips_features(pipe.perceptual, torch.zeros(1, 3, 512, 512))
    window = torch.zeros(1, 4, 64, 64, requires_grad=True)
    networks = [pipe.unet, pipe.vae, pipe.perceptual]
    parameters = [p for m in networks for p in (*m.parameters(), *m.buffers())]
    x0 = x0_predictor(scheduler, eps, scheduler.timesteps[0])

    def loss():
        return sync_loss(window, [0], x0, partial(decode, pipe.vae), pipe.perceptual, anchor)

    with torch.enable_grad():
        whole, _ = saved_bytes(loss, parameters)
        kept, peak = saved_bytes(loss, parameters, pipe.recompute)
        with recompute.recomputing(pipe.recompute):
            # What autograd really keeps once the layers are checkpointed.
            really_kept, _ = saved_bytes(loss, parameters)
    assert really_kept == pytest.approx(kept, rel=0.05)
    assert pipe.window_bytes(eps, scheduler) == pytest.approx(kept + peak, rel=0.1)
    # On the tiny model a third less; on SD2-base's architecture 3.0 GiB against 9.1 (fp32).
    assert kept + peak < 0.75 * whole


def test_a_step_without_sync_counts_its_forward_peak_a_fraction_of_a_synced_window(pipe, step):
    scheduler, eps, _ = step
    plain = pipe.window_bytes(eps, scheduler, sync=False)
    assert 0 < plain < pipe.window_bytes(eps, scheduler) / 4


def test_peak_live_bytes_counts_what_is_alive_at_once():
    def forward():
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 8000 alive
        del a
        c = b + 1  # 8000 alive again: `a` was freed
        return c.sum()  # 4 bytes more, beside `b` and `c`

    assert peak_live_bytes(forward, []) == 8004
