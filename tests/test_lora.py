"""LoRAs on a request: the panorama against diffusers' after `load_lora_weights`, in diffusers'
and kohya's layouts, two at once and on SDXL; the base weights back to the bit afterwards; LCM
with an LCM-style LoRA; and every bad LoRA refused by name before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from syncdiffusion import InputError, SyncDiffusionPipeline
from syncdiffusion.request.image_file import read_parameters, save_image
from syncdiffusion.testing.lora import make_lora


@pytest.fixture(scope="module")
def loras(pipe, tmp_path_factory):
    """LoRA files of the tiny SD2 model: diffusers' layout, kohya's, a second one."""
    folder = tmp_path_factory.mktemp("loras")
    networks = pipe.lora_networks()
    return {
        "diffusers": make_lora(networks, folder / "style.safetensors", seed=1),
        "kohya": make_lora(networks, folder / "kohya.safetensors", seed=2, layout="kohya"),
        "second": make_lora({"unet": pipe.unet}, folder / "second.safetensors", seed=3),
    }


# Three windows every 8 latent pixels, as diffusers lays its views out.
UNSYNCED = dict(
    prompt="a harbour",
    width=640,
    height=512,
    num_inference_steps=3,
    sync_weight=0,
    stride=8,
    seed=3,
)


def _differs(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


def _theirs(pipe, multidiffusion, adapters: dict[str, tuple[str, float]]):
    """diffusers' panorama with each adapter loaded from its file at its scale, not fused."""
    for name, (path, _) in adapters.items():
        multidiffusion.load_lora_weights(str(path), adapter_name=name)
    try:
        multidiffusion.set_adapters(list(adapters), [scale for _, scale in adapters.values()])
        inputs = {k: v for k, v in UNSYNCED.items() if k not in ("sync_weight", "stride", "seed")}
        latent = multidiffusion(
            **inputs, generator=torch.Generator("cpu").manual_seed(3), output_type="latent"
        ).images
    finally:
        multidiffusion.unload_lora_weights()
    return pipe.decode(latent)


@pytest.mark.parametrize(("layout", "scale"), [("diffusers", 0.7), ("kohya", 1.5)])
def test_unsynced_a_lora_panorama_is_diffusers_after_load_lora_weights(
    pipe, multidiffusion, loras, layout, scale
):
    plain = pipe(**UNSYNCED)
    ours = pipe(**UNSYNCED, lora_weights=str(loras[layout]), lora_scale=scale)
    theirs = _theirs(pipe, multidiffusion, {"style": (loras[layout], scale)})
    assert _differs(ours, theirs) <= 2
    assert _differs(ours, plain) > 20  # the LoRA moves the picture


def test_two_loras_at_their_scales_are_diffusers_two_adapters(
    pipe, multidiffusion, loras, capfd
):
    capfd.readouterr()
    ours = pipe(
        **UNSYNCED,
        lora_weights=str(loras["diffusers"]),
        lora_scale=0.6,
        extra_lora=str(loras["second"]),
        extra_lora_scale=-0.8,
    )
    logged = capfd.readouterr()
    assert "LOAD REPORT" not in logged.err + logged.out and "peft_config" not in logged.err
    theirs = _theirs(
        pipe, multidiffusion, {"a": (loras["diffusers"], 0.6), "b": (loras["second"], -0.8)}
    )
    assert _differs(ours, theirs) <= 2
    one = pipe(**UNSYNCED, lora_weights=str(loras["diffusers"]), lora_scale=0.6)
    assert _differs(ours, one) > 0


def _state(pipe):
    return {
        f"{component}.{name}": tensor.clone()
        for component, network in pipe.lora_networks().items()
        for name, tensor in network.state_dict().items()
    }


def test_the_base_weights_are_back_to_the_bit_after_a_lora(pipe, loras):
    before = _state(pipe)
    plain = pipe(**UNSYNCED, output_type="latent")
    pipe(**UNSYNCED, lora_weights=str(loras["kohya"]), extra_lora=str(loras["second"]))
    after = _state(pipe)
    assert after.keys() == before.keys()  # no adapter layer left behind
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert not getattr(pipe.unet, "peft_config", None)
    assert torch.equal(pipe(**UNSYNCED, output_type="latent"), plain)


def test_a_failed_request_leaves_the_base_weights_too(pipe, loras):
    before = _state(pipe)
    with pytest.raises(InputError, match="width"):
        pipe(**{**UNSYNCED, "width": 700}, lora_weights=str(loras["diffusers"]))

    def fail(state):
        raise RuntimeError("stopped in the middle")

    with pytest.raises(RuntimeError, match="stopped"):
        pipe(**UNSYNCED, lora_weights=str(loras["diffusers"]), callback=fail)
    after = _state(pipe)
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_a_synced_panorama_with_a_lora_and_its_file_records_it(pipe, loras, tmp_path):
    inputs = dict(
        prompt="a bay", width=576, height=512, num_inference_steps=2, sync_threshold=1, seed=5
    )
    image = pipe(**inputs, lora_weights=str(loras["diffusers"]), lora_scale=0.5)
    assert _differs(image, pipe(**inputs)) > 0
    save_image(image, tmp_path / "p.png", image.info["parameters"])
    saved = read_parameters(tmp_path / "p.png")
    assert saved["lora_weights"] == str(loras["diffusers"])
    assert saved["lora_scale"] == 0.5
    assert len(saved["lora_weights_sha256"]) == 64
    assert "extra_lora" not in saved and "extra_lora_scale" not in saved
    plain = pipe(**inputs).info["parameters"]
    assert not any("lora" in name for name in plain)  # as files were before LoRAs


def test_lcm_with_an_lcm_style_lora_makes_a_panorama_in_4_steps(pipe, loras):
    steps = []
    image = pipe(
        prompt="a bay",
        width=576,
        height=512,
        scheduler="LCM",
        num_inference_steps=4,
        guidance_scale=1.0,
        sync_threshold=2,
        lora_weights=str(loras["second"]),
        callback=steps.append,
    )
    assert image.size == (576, 512)
    assert [(s["step"], s["steps"], s["sync"]) for s in steps] == [
        (0, 4, True), (1, 4, True), (2, 4, False), (3, 4, False),
    ]  # fmt: skip
    with pytest.raises(InputError, match="at most 50 with scheduler LCM"):
        pipe.request(prompt="a bay", scheduler="LCM", num_inference_steps=60)


@pytest.fixture(scope="module")
def sdxl(family_weights):
    return SyncDiffusionPipeline.from_pretrained(
        family_weights, device="cpu", model="tiny-sdxl"
    )


def test_an_sdxl_lora_fused_is_diffusers_adapters_unfused(sdxl, tmp_path):
    # diffusers has no SDXL panorama pipeline: the reference is this sampler on the same
    # networks with diffusers' adapters loaded (`load_lora_weights`, `set_adapters`), not fused.
    path = make_lora(sdxl.lora_networks(), tmp_path / "xl.safetensors", seed=4, layout="kohya")
    side = sdxl.window_pixels
    inputs = dict(prompt="a bay", width=2 * side, height=side, num_inference_steps=2, seed=1)
    inputs |= dict(sync_weight=0, stride=8)
    before = _state(sdxl)
    plain = sdxl(**inputs)
    ours = sdxl(**inputs, lora_weights=str(path), lora_scale=0.7)
    after = _state(sdxl)
    assert all(torch.equal(after[name], before[name]) for name in before)
    adapters = StableDiffusionXLPipeline(
        vae=sdxl.vae,
        text_encoder=sdxl.text_encoder,
        text_encoder_2=sdxl.text_encoder_2,
        tokenizer=sdxl.tokenizer,
        tokenizer_2=sdxl.tokenizer_2,
        unet=sdxl.unet,
        scheduler=sdxl.new_scheduler(),
    )
    adapters.load_lora_weights(str(path), adapter_name="xl")
    try:
        adapters.set_adapters(["xl"], [0.7])
        theirs = sdxl(**inputs)
    finally:
        adapters.unload_lora_weights()
    assert _differs(ours, theirs) <= 2
    assert _differs(ours, plain) > 20


def test_a_lora_of_another_family_is_refused_naming_it(pipe, sdxl, tmp_path):
    xl = make_lora(sdxl.lora_networks(), tmp_path / "xl.safetensors")
    with pytest.raises(InputError, match=r"lora_weights .*text_encoder_2.*another model family"):
        pipe(**UNSYNCED, lora_weights=str(xl))
    unet_only = make_lora({"unet": sdxl.unet}, tmp_path / "xl-unet.safetensors")
    with pytest.raises(InputError, match=r"extra_lora .* does not fit this Stable Diffusion"):
        pipe(**UNSYNCED, extra_lora=str(unet_only))


def test_a_lora_whose_layers_are_no_model_s_is_refused(pipe, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"transformer.blocks.0.lora_A.weight": torch.zeros(4, 8)}, path)
    with pytest.raises(InputError, match=r"lora_weights .*no layer of a Stable Diffusion"):
        pipe(**UNSYNCED, lora_weights=str(path))
    save_file({"unet.no_such_block.to_q.lora_A.weight": torch.zeros(4, 8)}, path)
    with pytest.raises(InputError, match=r"no_such_block.* is not a layer of this model"):
        pipe(**UNSYNCED, lora_weights=str(path))


def test_a_local_file_is_refused_where_the_server_says_so(pipe, loras):
    pipe.lora_local_files = False
    try:
        with pytest.raises(InputError, match="lora_weights"):
            pipe(**UNSYNCED, lora_weights=str(loras["diffusers"]))
    finally:
        pipe.lora_local_files = True


def test_in_fp16_a_fused_layer_is_w_plus_scale_b_a_rounded_and_comes_back(tiny_weights, loras):
    half = SyncDiffusionPipeline.from_pretrained(tiny_weights, device="cpu", dtype=torch.float16)
    before = _state(half)
    request = half.request(prompt="a bay", lora_weights=str(loras["diffusers"]), lora_scale=3)
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    from safetensors.torch import load_file

    held = load_file(loras["diffusers"])
    down, up = held[f"unet.{layer}.lora_A.weight"], held[f"unet.{layer}.lora_B.weight"]
    with half.fused_loras(half.loras(request)):
        during = _state(half)
        fused = during[f"unet.{layer}.weight"]
    assert fused.dtype == torch.float16
    assert all(t.dtype == before[name].dtype for name, t in during.items())
    # Rank 4 and no alpha (alpha = rank): W + 3 * B @ A, in fp32, rounded to fp16.
    expected = before[f"unet.{layer}.weight"].float() + 3 * up @ down
    torch.testing.assert_close(fused.float(), expected, atol=2e-3, rtol=2e-3)
    assert all(t.isfinite().all() for t in during.values())
    after = _state(half)
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_a_lora_diffusers_cannot_load_is_refused_by_name_and_changes_nothing(
    pipe, loras, monkeypatch
):
    from diffusers import StableDiffusionPipeline

    def refuse(self, *args, **kwargs):
        raise ValueError("Target modules {'to_q'} not found in the base model")

    before = _state(pipe)
    monkeypatch.setattr(StableDiffusionPipeline, "load_lora_weights", refuse)
    with pytest.raises(InputError, match=r"^lora_weights .* could not be loaded by diffusers"):
        pipe(**UNSYNCED, lora_weights=str(loras["diffusers"]))
    after = _state(pipe)
    assert all(torch.equal(after[name], before[name]) for name in before)
