"""DDIM on pixel-space models steps as DiT's ``ddim_sample`` does (the noise recomputed from the clipped x0),
and ``--protocol dit`` visits DiT's respaced timesteps; both checked against DiT's formulas written out here."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from helpers import tiny_nala

from nala_diffusion import NaLaDiTPipeline
from nala_diffusion.diffusion.objectives import clipping_step_kwargs


def dit_ddim_sample_loop(model, x, labels, alphas_cumprod, timesteps):
    """DiT's ``ddim_sample_loop`` (eta 0, ``clip_denoised=True``) on a respaced diffusion that keeps
    ``timesteps`` (descending): per step, x0 from eps and clamped to [-1, 1] (``p_mean_variance``), eps
    recomputed from that x0 (``_predict_eps_from_xstart``), then x_prev = sqrt(abar_prev) x0 +
    sqrt(1 - abar_prev) eps, with abar_prev = 1 after the last step (``alphas_cumprod_prev``)."""
    x = x.double()
    for i, t in enumerate(timesteps):
        abar = alphas_cumprod[t].double()
        abar_prev = alphas_cumprod[timesteps[i + 1]].double() if i + 1 < len(timesteps) else torch.tensor(1.0).double()
        eps = model(x.float(), timestep=torch.full((len(x),), t), class_labels=labels).sample.double()
        sqrt_recip, sqrt_recipm1 = (1 / abar).sqrt(), (1 / abar - 1).sqrt()
        x0 = (sqrt_recip * x - sqrt_recipm1 * eps).clamp(-1, 1)
        eps = (sqrt_recip * x - x0) / sqrt_recipm1
        x = x0 * abar_prev.sqrt() + (1 - abar_prev).sqrt() * eps
    return x


def dit_space_timesteps(num_timesteps, section_counts):
    """DiT's ``respace.space_timesteps`` (an int list of section counts; not the "ddimN" form)."""
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        current = 0.0
        for _ in range(count):
            steps.append(start + round(current))
            current += stride
        start += size
    return set(steps)


@pytest.mark.parametrize("steps", [10, 50])
def test_pixel_space_ddim_steps_as_dits_ddim_sample(steps):
    model = tiny_nala(in_channels=3, out_channels=3, num_classes=2, sample_size=8)
    with torch.no_grad():  # a confident, wrong model: its x0 leaves [-1, 1] at most steps, so clipping acts
        model.proj_out_2.bias.add_(3.0)
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=True)
    pipe = NaLaDiTPipeline(model, scheduler)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1])
    ours = pipe([0, 1], latents=noise, num_inference_steps=steps, guidance_scale=1.0, output_type="latent").images
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        reference = dit_ddim_sample_loop(model, noise, labels, scheduler.alphas_cumprod, scheduler.timesteps.tolist())
    torch.testing.assert_close(ours.double(), reference, atol=2e-4, rtol=1e-4)
    # diffusers' default (the unclipped noise kept) is another sampler: the check can tell them apart
    pipe._step_kwargs = lambda generator: {}
    inconsistent = pipe([0, 1], latents=noise, num_inference_steps=steps, guidance_scale=1.0,
                        output_type="latent").images
    assert (inconsistent.double() - reference).abs().max() > 1e-2


def test_only_clipping_schedulers_get_the_clipped_noise():
    assert clipping_step_kwargs(DDIMScheduler(clip_sample=True)) == {"use_clipped_model_output": True}
    assert clipping_step_kwargs(DDIMScheduler(clip_sample=False, thresholding=True)) == {"use_clipped_model_output": True}
    assert clipping_step_kwargs(DDIMScheduler(clip_sample=False)) == {}  # latent space: nothing to make consistent
    assert clipping_step_kwargs(DDPMScheduler(clip_sample=True)) == {}  # its posterior mean uses the clipped x0


def test_the_dit_protocol_visits_dits_respaced_timesteps():
    from nala_diffusion.pipelines.schedulers import set_sampler, use_dit_timesteps

    pipe = NaLaDiTPipeline(tiny_nala(), DDIMScheduler())
    set_sampler(pipe, "ddpm")
    use_dit_timesteps(pipe)
    for count in (250, 100, 25):
        pipe.scheduler.set_timesteps(count)
        visited = pipe.scheduler.timesteps.tolist()
        assert visited == sorted(dit_space_timesteps(1000, [count]), reverse=True), count
    assert visited[0] == 999 and visited[-1] == 0
    # and DDPM's step then goes to the previous visited timestep, as the respaced diffusion does
    pipe.scheduler.set_timesteps(250)
    assert int(pipe.scheduler.previous_timestep(torch.tensor(999))) == 995


@pytest.mark.slow
def test_the_demos_class_accuracy_does_not_fall_with_more_ddim_steps():
    import nala_diffusion
    from nala_diffusion import DomainClassifier

    pipe = NaLaDiTPipeline.from_pretrained(nala_diffusion.demo_pipeline_path())
    pipe.set_progress_bar_config(disable=True)
    classifier = DomainClassifier.from_pretrained(nala_diffusion.demo_classifier_path()).eval()
    labels = [c for c in range(10) for _ in range(10)]

    def accuracy(steps):
        generators = [torch.Generator().manual_seed(i) for i in range(len(labels))]
        images = pipe(labels, generator=generators, num_inference_steps=steps, guidance_scale=2.0,
                      output_type="pt").images
        with torch.no_grad():
            predictions = classifier((images * 255).round() / 255).argmax(-1)
        return (predictions == torch.tensor(labels)).float().mean().item()

    at_10, at_100 = accuracy(10), accuracy(100)
    assert at_10 >= 0.9 and abs(at_100 - at_10) <= 0.03, (at_10, at_100)
