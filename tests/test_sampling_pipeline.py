"""Samplers through the Python API on the tiny model: phase 1 (a run at the base size) equals diffusers' own
StableDiffusionXLPipeline with the same UNet weights and the scheduler built from SDXL's config and the sampler's
flags; v-prediction and zero-terminal-SNR checkpoints are recognised and run at every scale; what a run records;
resume; strength on a picture; bad settings refused before any work."""
import json

import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LCMScheduler, StableDiffusionXLPipeline, TCDScheduler,
                       UNet2DConditionModel, UniPCMultistepScheduler)
from safetensors.torch import load_file, save_file

from minifusion import load
from minifusion.files import SavedScale
from minifusion.noise import NoiseSchedule
from minifusion.safetensors_check import CheckpointError
from minifusion.schedulers import Choice
from minifusion.tiny import TINY, random_models, write_diffusers
from minifusion.work import describe
from sampler_oracles import SDXL_SCHEDULER_CONFIG

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = dict(prompt="a red fox", negative_prompt="blurry", height=256, width=128)  # the base size: phase 1 only


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_diffusers(random_models(TINY, seed=0), TINY, tmp_path_factory.mktemp("tiny") / "diffusers")


@pytest.fixture(scope="module")
def pipes(folder):
    ours = load(folder, device="cpu", dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    theirs = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                       tokenizer_2=None, unet=unet, scheduler=DDIMScheduler(), add_watermarker=False)
    return ours, theirs


# (sampler, schedule, steps, guidance, diffusers class, its flags, how its schedule is set, extra generate() args)
CASES = [
    ("ddim", "leading", 25, 7.5, DDIMScheduler, {}, {}, {}),
    ("euler", "karras", 8, 5.0, EulerDiscreteScheduler, {}, "sigmas", {}),
    ("euler_a", "trailing", 8, 5.0, EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}, {}, {}),
    ("dpmpp_2m", "trailing", 10, 5.0, DPMSolverMultistepScheduler, {"timestep_spacing": "trailing"}, {}, {}),
    ("dpmpp_2m_sde", "trailing", 10, 5.0, DPMSolverMultistepScheduler,
     {"timestep_spacing": "trailing", "algorithm_type": "sde-dpmsolver++"}, {}, {}),
    ("unipc", "trailing", 8, 4.0, UniPCMultistepScheduler, {"timestep_spacing": "trailing"}, {}, {}),
    # DMD2's recipe: LCM on [999, 749, 499, 249] at CFG 1; TCD's: trailing (here given as its timesteps), CFG 1
    ("lcm", None, 4, 1.0, LCMScheduler, {}, "timesteps", {"timesteps": [999, 749, 499, 249]}),
    ("tcd", "trailing", 6, 1.0, TCDScheduler, {}, "timesteps", {"eta": 0.3}),
    # v-prediction with zero terminal SNR, trailing and CFG rescale 0.7, as diffusers is told
    ("ddim", "trailing", 10, 6.0, DDIMScheduler, {"timestep_spacing": "trailing", "prediction_type": "v_prediction",
                                                  "rescale_betas_zero_snr": True}, {},
     {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "guidance_rescale": 0.7}),
    ("euler", "trailing", 10, 6.0, EulerDiscreteScheduler, {"timestep_spacing": "trailing",
                                                            "prediction_type": "v_prediction",
                                                            "rescale_betas_zero_snr": True}, {},
     {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "guidance_rescale": 0.7}),
]


@pytest.mark.parametrize("sampler, schedule, steps, guidance, cls, flags, how, extra", CASES,
                         ids=[f"{c[0]}-{c[1] or 'timesteps'}-{c[7].get('prediction_type', 'eps')}" for c in CASES])
def test_base_size_equals_diffusers_pipeline(pipes, sampler, schedule, steps, guidance, cls, flags, how, extra):
    ours, theirs = pipes
    latents = torch.randn(1, 4, 32, 16, generator=torch.Generator().manual_seed(11))
    result = ours.generate(**BASE, num_inference_steps=steps, guidance_scale=guidance, sampler=sampler,
                           schedule=schedule, latents=latents, seed=5, **extra)
    got = result.latents[0]
    noise = NoiseSchedule(extra.get("prediction_type", "epsilon"), extra.get("rescale_betas_zero_snr", False))
    run = Choice(sampler, schedule, extra.get("timesteps"), extra.get("eta")).sampling(steps, noise)
    theirs.scheduler = cls.from_config({**SDXL_SCHEDULER_CONFIG, **flags})
    kwargs = {}
    if how == "sigmas":
        kwargs["sigmas"] = [p.sigma / p.alpha for p in run.points]
    elif how == "timesteps":
        kwargs["timesteps"] = [int(p.t) for p in run.points[:-1]]
    else:
        kwargs["num_inference_steps"] = steps
    # both start from x_T = latents in the variance-preserving state; Euler schedulers keep x / alpha and scale
    # the given latents by init_noise_sigma
    theirs.scheduler.set_timesteps(**kwargs)
    ve = isinstance(theirs.scheduler, (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler))
    start = latents / run.points[0].alpha / theirs.scheduler.init_noise_sigma if ve else latents
    context, pooled = ours.encode_prompt(BASE["prompt"], BASE["negative_prompt"])
    ref = theirs(prompt_embeds=context[1:], negative_prompt_embeds=context[:1], pooled_prompt_embeds=pooled[1:],
                 negative_pooled_prompt_embeds=pooled[:1], height=256, width=128, guidance_scale=guidance,
                 guidance_rescale=extra.get("guidance_rescale", 0.0), eta=extra.get("eta", 0.0),
                 latents=start, generator=torch.Generator().manual_seed(5), output_type="latent", **kwargs).images
    err = ((got - ref).abs().max() / ref.std()).item()
    print(f"{sampler} {schedule or extra.get('timesteps')} {steps} steps CFG {guidance} {extra}: {err:.1e}")
    assert err <= 1e-4
    assert result.stats[0]["unet_evaluations"] == steps * (2 if guidance > 1 else 1)


# ---- checkpoints that are not epsilon-prediction ----

def with_markers(tiny_file, path, *markers):
    tensors = load_file(str(tiny_file))
    save_file({**tensors, **{m: torch.tensor([]) for m in markers}}, str(path),
              metadata={"modelspec.resolution": "256x256"})
    return path


def test_single_file_markers_are_recognised(tiny_file, tmp_path):
    v = load(with_markers(tiny_file, tmp_path / "vpred.safetensors", "v_pred", "ztsnr"), device="cpu",
             dtype=torch.float32)
    assert v.noise_schedule == NoiseSchedule("v_prediction", True, source="v_pred, ztsnr keys")
    assert v.noise_schedule.describe() == "v-prediction, zero terminal SNR (v_pred, ztsnr keys)"
    only = load(with_markers(tiny_file, tmp_path / "v.safetensors", "v_pred"), device="cpu", dtype=torch.float32)
    assert (only.noise_schedule.prediction_type, only.noise_schedule.rescale_betas_zero_snr) == ("v_prediction", False)
    plain = load(tiny_file, device="cpu", dtype=torch.float32)
    assert plain.noise_schedule == NoiseSchedule() and plain.noise_schedule.describe().startswith("epsilon prediction")
    # DemoFusion on it, every scale, told nothing: v-prediction, zero SNR; an override wins, and is recorded
    result = v.generate("a fox", height=512, width=256, num_inference_steps=2, seed=1, sampler="dpmpp_2m")
    assert len(result.latents) == 2 and all(torch.isfinite(z).all() for z in result.latents)
    record = json.loads(result.images[-1].info["minifusion"])["settings"]
    assert (record["prediction"], record["zero_snr"], record["schedule"]) == ("v_prediction", True, "karras")
    told = v.generate("a fox", height=256, width=128, num_inference_steps=1, seed=1, prediction_type="epsilon")
    assert json.loads(told.images[0].info["minifusion"])["settings"]["prediction"] == "epsilon"


def test_folder_scheduler_config_is_read(folder, tmp_path):
    import shutil
    copy = shutil.copytree(folder, tmp_path / "lightning")
    (copy / "scheduler").mkdir()
    config = {**SDXL_SCHEDULER_CONFIG, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
              "timestep_spacing": "trailing"}
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    pipe = load(copy, device="cpu", dtype=torch.float32)
    assert pipe.noise_schedule == NoiseSchedule("v_prediction", True, "trailing", "scheduler/scheduler_config.json")
    result = pipe.generate("a fox", height=256, width=128, num_inference_steps=1, seed=0, sampler="euler")
    assert json.loads(result.images[0].info["minifusion"])["settings"]["schedule"] == "trailing"  # the model's own
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "sample"}))
    with pytest.raises(CheckpointError, match="prediction_type \"sample\" is not one minifusion samples"):
        load(copy, device="cpu", dtype=torch.float32)


# ---- what a run records, resume, strength ----

def test_settings_recorded_and_resume_continues_with_its_sampler(tiny_pipe, tmp_path):
    kw = dict(height=512, width=256, num_inference_steps=2, guidance_rescale=0.3)
    first = [next(tiny_pipe.iter_generate("a fox", seed=3, sampler="DPM++ 2M SDE", eta=0.5, **kw))]
    saved = first[0].settings
    assert {k: saved[k] for k in ("sampler", "schedule", "timesteps", "eta", "guidance_rescale", "strength",
                                  "prediction", "zero_snr")} == {
        "sampler": "dpmpp_2m_sde", "schedule": "exponential", "timesteps": None, "eta": 0.5, "guidance_rescale": 0.3,
        "strength": 1.0, "prediction": "epsilon", "zero_snr": False}
    resume = SavedScale(1, first[0].latents, *first[0].anchor, first[0].generator_state, saved)
    resumed = tiny_pipe.generate("a fox", resume=resume, **kw)
    assert json.loads(resumed.images[-1].info["minifusion"])["settings"]["sampler"] == "dpmpp_2m_sde"
    whole = tiny_pipe.generate("a fox", seed=3, sampler="dpmpp_2m_sde", eta=0.5, **kw)
    assert torch.equal(resumed.latents[-1], whole.latents[-1])


def test_strength_on_a_picture_runs_the_last_steps(tiny_pipe):
    picture = tiny_pipe.decode(torch.randn(1, 4, 32, 16, generator=torch.Generator().manual_seed(0)))
    steps = []
    half = tiny_pipe.generate("a fox", image=picture, num_inference_steps=4, seed=1, strength=0.5,
                              callback=lambda *a: steps.append(a))
    work = describe(512, 256, base_px=256, window=32, steps=4, strength=0.5, first_scale=2)
    assert half.stats[-1]["unet_evaluations"] == work[0].unet_evals == 2 * 2 * (3 + 4)
    assert steps[-1] == (2, 2, 2, work[0].unet_evals)
    assert json.loads(half.images[-1].info["minifusion"])["settings"]["strength"] == 0.5


@pytest.mark.parametrize("kwargs, message", [
    ({"sampler": "heun"}, "sampler 'heun' is invalid"),
    ({"schedule": "Karras", "timesteps": [999, 499]}, "schedule 'karras' is invalid with timesteps"),
    ({"strength": 0.0}, "strength 0.0 is invalid"),
    ({"sampler": "unipc", "eta": 0.1}, "eta 0.1 is invalid for sampler 'unipc'"),
    ({"sampler": "ddim", "scheduler": "euler"}, "scheduler is the older name of sampler"),
])
def test_bad_sampling_refused_before_any_work(tiny_pipe, monkeypatch, kwargs, message):
    monkeypatch.setattr(tiny_pipe, "encode_prompt", lambda *a, **k: pytest.fail("did work for a bad request"))
    with pytest.raises(ValueError, match=message):
        tiny_pipe.generate("a fox", height=256, width=256, num_inference_steps=4, **kwargs)
