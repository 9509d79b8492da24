"""The sync backward recomputes activations rather than keeping them where memory needs it: the
same gradient to the bit, in a fraction of the memory, and only in the sync backward."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import syncdiffusion.core.sampling as sampling
from syncdiffusion.core import recompute
from syncdiffusion.core.chunks import peak_live_bytes, saved_bytes
from syncdiffusion.core.decoding import decode
from syncdiffusion.core.precision import LossScale
from syncdiffusion.core.sampling import guided_eps, x0_predictor
from syncdiffusion.core.sync import lpips_features, sync_gradient, sync_loss
from syncdiffusion.errors import InputError

SYNCED = dict(prompt="a bay", width=640, height=512, num_inference_steps=2, seed=1)


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
    pipe(**SYNCED, sync_threshold=0, output_type="latent", recompute="always")
    assert calls == []  # plain denoising: no_grad, nothing kept, nothing recomputed
    pipe(**SYNCED, sync_threshold=1, output_type="latent", recompute="always")
    assert len(calls) > 0 and all(calls)
    calls.clear()
    pipe(**SYNCED, sync_threshold=1, output_type="latent", recompute="never")
    assert calls == []
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


def _steps(pipe, **options):
    log = []
    latent = pipe(**SYNCED, sync_threshold=1, output_type="latent", callback=log.append, **options)
    synced = log[0]
    return latent, (synced["recompute"], synced["view_batch_size"], synced["recompute_reason"])


@pytest.fixture(scope="module")
def recomputed(pipe):
    """The synced panorama recomputed, one window at a time."""
    return _steps(pipe, recompute="always", view_batch_size=1)[0]


def test_kept_and_recomputed_give_the_same_panorama_to_the_bit(pipe):
    kept, (recomputed_first, *_) = _steps(pipe, recompute="never", view_batch_size=2)
    again, (recomputed_then, *_) = _steps(pipe, recompute="always", view_batch_size=2)
    assert (recomputed_first, recomputed_then) == (False, True)
    assert torch.equal(kept, again)


@pytest.fixture
def plain_chunks_of_one(monkeypatch):
    """The plain (unsynced) predictions one window at a time, as `recomputed` makes them: the
    size auto picks follows the free memory, and the UNet's float rounding its batch."""
    import syncdiffusion.pipeline as pipeline

    monkeypatch.setattr(pipeline, "auto_view_batch_size", lambda *args: 1)


def test_auto_on_the_cpu_keeps_one_window_at_a_time_and_says_why(
    pipe, recomputed, plain_chunks_of_one
):
    latent, (recomputes, chunk, reason) = _steps(pipe)
    assert (recomputes, chunk) == (False, 1)
    assert reason.startswith("kept: predicted 1.00 a window kept in chunks of 1 against 1.33")
    assert torch.equal(latent, recomputed)


def test_a_kept_window_out_of_memory_falls_back_to_recomputation(
    pipe, recomputed, plain_chunks_of_one, monkeypatch
):
    real = sampling.sync_gradient
    tries = []

    def only_recomputed_fits(*args):
        tries.append(bool(args[-1]))
        if not args[-1]:  # the layers recomputed: none
            raise torch.OutOfMemoryError("CUDA out of memory (kept activations)")
        return real(*args)

    monkeypatch.setattr(sampling, "sync_gradient", only_recomputed_fits)
    latent, (recomputes, chunk, reason) = _steps(pipe)
    assert tries == [False, True]  # once kept, then recomputed from then on
    assert (recomputes, chunk) == (True, 1)
    assert reason.startswith("recomputed: one window kept ran out of memory (planned: kept:")
    assert torch.equal(latent, recomputed)
    with pytest.raises(MemoryError, match="even with one window"):
        _steps(pipe, recompute="never")


@pytest.mark.parametrize("value", ["sometimes", None, True])
def test_a_recompute_mode_outside_the_three_is_refused_by_name(pipe, value):
    with pytest.raises(InputError) as refused:
        pipe(**SYNCED, recompute=value, output_type="latent")
    assert str(refused.value) == (
        f"recompute must be one of 'auto', 'always', 'never'; got {value!r}"
    )


def test_a_window_kept_counts_more_than_recomputed(pipe, step):
    scheduler, eps, _ = step
    kept = pipe.window_bytes(eps, scheduler, recompute=False)
    assert kept > pipe.window_bytes(eps, scheduler) > pipe.window_bytes(eps, scheduler, sync=False)
