"""Every scheduler of the `scheduler` input: its steps, its prediction of the clean latent, its
panorama against diffusers' MultiDiffusion pipeline, and synced runs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from syncdiffusion import SyncDiffusionPipeline
from syncdiffusion.app.form import model_form
from syncdiffusion.core.sampling import sample_panorama
from syncdiffusion.core.schedulers import (
    SCHEDULERS,
    clean_latent,
    declared_scheduler,
    evaluations,
    make_scheduler,
    network_calls,
    per_view,
)
from syncdiffusion.core.sync_schedule import SyncSchedule
from syncdiffusion.core.windows import panorama_windows
from syncdiffusion.models.folders import write_source
from syncdiffusion.models.tiny import SCHEDULER_CONFIG, SD2_V_SCHEDULER_CONFIG
from syncdiffusion.request.image_file import read_parameters, save_image
from syncdiffusion.request.presets import model_defaults

# Those that add no noise of their own along the way: Euler ancestral and LCM do.
DETERMINISTIC = [name for name in SCHEDULERS if name not in ("K_EULER_ANCESTRAL", "LCM")]


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 2, 5, 25])
def test_network_calls_and_steps_are_the_scheduler_s_own(name, steps):
    scheduler = make_scheduler(name, SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    plan = evaluations(scheduler)
    assert len(plan) == network_calls(name, steps) == len(scheduler.timesteps)
    assert [e.step for e in plan if e.first] == list(range(steps))
    assert [e.step for e in plan if e.last] == list(range(steps))
    assert plan[0].first and plan[-1].last


def test_heun_evaluates_twice_a_step_but_the_last_and_pndm_twice_in_its_first():
    heun = make_scheduler("HeunDiscrete", SCHEDULER_CONFIG)
    heun.set_timesteps(3)
    assert [(e.step, e.first, e.last) for e in evaluations(heun)] == [
        (0, True, False), (0, False, True), (1, True, False), (1, False, True), (2, True, True),
    ]  # fmt: skip
    pndm = make_scheduler("PNDM", SCHEDULER_CONFIG)
    pndm.set_timesteps(3)
    assert [(e.step, e.first, e.last) for e in evaluations(pndm)] == [
        (0, True, False), (0, False, True), (1, True, True), (2, True, True),
    ]  # fmt: skip


def _own_x0(scheduler, k, x, output):
    """What the scheduler itself predicts as the clean latent at its evaluation `k`, stepping a
    copy of it there (the steps before `k` fed the same sample and output)."""
    if type(scheduler).__name__ == "DPMSolverMultistepScheduler":
        for i in range(k + 1):
            scheduler.step(output, scheduler.timesteps[i], x)
        return scheduler.model_outputs[-1]  # its step's `convert_model_output`: x0
    if type(scheduler).__name__ == "PNDMScheduler":  # PLMS predicts no x0: DDIM's formula
        a = scheduler.alphas_cumprod[int(scheduler.timesteps[k])]
        if scheduler.config.prediction_type == "v_prediction":
            return a**0.5 * x - (1 - a) ** 0.5 * output
        return (x - (1 - a) ** 0.5 * output) / a**0.5
    for i in range(k):
        scheduler.scale_model_input(x, scheduler.timesteps[i])
        scheduler.step(output, scheduler.timesteps[i], x)
    scheduler.scale_model_input(x, scheduler.timesteps[k])
    stepped = scheduler.step(output, scheduler.timesteps[k], x)
    if type(scheduler).__name__ == "LCMScheduler":
        return stepped.denoised  # its consistency function's output
    return stepped.pred_original_sample


@pytest.mark.parametrize("config", [SCHEDULER_CONFIG, SD2_V_SCHEDULER_CONFIG], ids=["eps", "v"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_the_sync_step_s_x0_is_the_scheduler_s_own_prediction(name, config):
    generator = torch.Generator().manual_seed(0)
    x, output = torch.randn(2, 2, 4, 8, 8, generator=generator)
    scheduler = make_scheduler(name, config)
    scheduler.set_timesteps(6)
    for k, evaluation in enumerate(evaluations(scheduler)):
        if not evaluation.first:
            continue
        fresh = make_scheduler(name, config)
        fresh.set_timesteps(6)
        expected = _own_x0(fresh, k, x, output)
        torch.testing.assert_close(
            clean_latent(scheduler, k)(x, output), expected, rtol=1e-5, atol=1e-4
        )


def test_only_ddim_steps_each_view_on_its_own():
    assert [per_view(make_scheduler(name, SCHEDULER_CONFIG)) for name in SCHEDULERS] == [
        name == "DDIM" for name in SCHEDULERS
    ]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_unsynced_the_panorama_is_diffusers_multidiffusion_with_that_scheduler(
    pipe, multidiffusion, name
):
    # diffusers' views: 64-latent windows every 8 latent pixels, each with its own copy of the
    # scheduler's state; 640 px wide is three of them.
    multidiffusion.scheduler = make_scheduler(name, pipe.scheduler_config)
    inputs = dict(width=640, height=512, num_inference_steps=3, guidance_scale=7.5)
    ours = pipe(prompt="a harbour", sync_weight=0, stride=8, seed=3, scheduler=name, **inputs)
    latent = multidiffusion(
        prompt="a harbour",
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="latent",
        **inputs,
    ).images
    theirs = pipe.decode(latent)
    difference = (torch.tensor(ours.getdata()) - torch.tensor(theirs.getdata())).abs().max()
    assert difference <= 2, f"{name}: {difference}/255"


SYNCED = dict(
    prompt="a bay",
    width=576,
    height=512,
    num_inference_steps=2,
    sync_threshold=1,
    seed=5,
    output_type="latent",
)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_a_synced_panorama_with_each_scheduler(pipe, name):
    reported = []
    synced = pipe(**SYNCED, scheduler=name, callback=reported.append)
    assert synced.shape == (1, 4, 64, 72) and synced.isfinite().all()
    # One report a step, Heun's and PNDM's second evaluations within their step.
    assert [(r["step"], r["steps"], r["sync"]) for r in reported] == [(0, 2, True), (1, 2, False)]
    assert not torch.equal(synced, pipe(**{**SYNCED, "sync_weight": 0}, scheduler=name))


def test_ancestral_noise_comes_from_the_seed(pipe):
    inputs = {**SYNCED, "sync_threshold": 0, "scheduler": "K_EULER_ANCESTRAL"}
    first = pipe(**inputs)
    assert torch.equal(first, pipe(**inputs))
    # Euler with the noise it adds at each step: the same start, another panorama.
    assert not torch.equal(first, pipe(**{**inputs, "scheduler": "K_EULER"}))


def test_a_360_panorama_with_a_multistep_scheduler_keeps_its_seam(pipe):
    image = pipe(
        **{**SYNCED, "output_type": "pil", "width": 640, "sync_threshold": 1},
        scheduler="KarrasDPM",
        loop_closure=True,
    )
    assert image.size == (640, 512)
    assert image.info["parameters"]["scheduler"] == "KarrasDPM"


def test_the_file_records_the_scheduler_and_ddim_is_the_default(pipe, tmp_path):
    image = pipe(**{**SYNCED, "output_type": "pil", "sync_threshold": 0})
    save_image(image, tmp_path / "p.png", image.info["parameters"])
    assert read_parameters(tmp_path / "p.png")["scheduler"] == "DDIM"


@pytest.fixture(scope="module")
def turbo_weights(tiny_weights, tmp_path_factory):
    """The tiny model as a download of SD-Turbo would leave it: its source recorded, and the
    scheduler its repository declares (Euler on trailing timesteps)."""
    out = tmp_path_factory.mktemp("turbo")
    shutil.copytree(tiny_weights, out, dirs_exist_ok=True)
    folder = out / "sd-turbo"
    (out / "stable-diffusion-2-base").rename(folder)
    config = {**SCHEDULER_CONFIG, "_class_name": "EulerDiscreteScheduler"}
    config["timestep_spacing"] = "trailing"
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    write_source(folder, "stabilityai/sd-turbo", None)
    return out


def test_a_few_step_model_takes_its_own_defaults_and_its_folder_s_scheduler(turbo_weights):
    turbo = SyncDiffusionPipeline.from_pretrained(turbo_weights, device="cpu", model="sd-turbo")
    request = turbo.request(prompt="a bay")
    assert request["scheduler"] == "K_EULER"
    assert (request["num_inference_steps"], request["guidance_scale"]) == (4, 1.0)
    assert request["sync_threshold"] == 2
    reported = []
    turbo(prompt="a bay", width=576, output_type="latent", callback=reported.append)
    assert [(r["step"], r["sync"]) for r in reported] == [
        (0, True),
        (1, True),
        (2, False),
        (3, False),
    ]
    # What a request gives wins; another model's folder keeps the published defaults.
    assert turbo.request(prompt="a bay", scheduler="DDIM")["scheduler"] == "DDIM"
    assert model_defaults(turbo_weights / "sd-turbo")["scheduler"] == "K_EULER"
    assert model_defaults(turbo_weights / "lpips") == {}
    # The web app's form shows them, its select offering every scheduler.
    fields = {f["name"]: f for f in model_form(turbo_weights / "sd-turbo")["inputs"]}
    assert (fields["scheduler"]["default"], fields["num_inference_steps"]["default"]) == (
        "K_EULER",
        "4",
    )
    assert fields["scheduler"]["choices"] == list(SCHEDULERS)


@pytest.mark.parametrize(
    "config, name",
    [
        ({"_class_name": "PNDMScheduler"}, "PNDM"),
        ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, "KarrasDPM"),
        ({"_class_name": "EulerAncestralDiscreteScheduler"}, "K_EULER_ANCESTRAL"),
        ({"_class_name": "LCMScheduler"}, "LCM"),
        ({"_class_name": "UniPCMultistepScheduler"}, None),  # none of the choices
    ],
)
def test_the_scheduler_a_folder_declares_by_its_name(config, name):
    assert declared_scheduler(config) == name


@pytest.mark.parametrize("name", SCHEDULERS)
def test_the_latent_stays_fp32_when_the_network_answers_in_fp16(name):
    # A GPU's UNet answers in fp16; the panorama, and a multistep solver's history, stay fp32.
    scheduler = make_scheduler(name, SCHEDULER_CONFIG)
    scheduler.set_timesteps(3)
    latent = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    windows = panorama_windows(8, 12, 4, window=8)
    latent = sample_panorama(
        latent * scheduler.init_noise_sigma,
        windows,
        eps=lambda x, t, control: (0.5 * x).half(),
        scheduler=scheduler,
        decode=None,
        perceptual=None,
        sync=SyncSchedule(0.0, 0.99, 1, 0),
        view_batch_size=2,
        generator=torch.Generator().manual_seed(1),
    )
    assert latent.dtype == torch.float32 and latent.isfinite().all()
    history = [t for t in getattr(scheduler, "model_outputs", []) if t is not None]
    assert all(t.dtype == torch.float32 for t in history)


@pytest.mark.parametrize("name", ["DDIM", "KarrasDPM"])
def test_a_panorama_of_one_window_syncs_nothing_and_runs(pipe, name):
    one = pipe(**{**SYNCED, "width": 512}, scheduler=name)
    assert torch.equal(one, pipe(**{**SYNCED, "width": 512, "sync_weight": 0}, scheduler=name))
