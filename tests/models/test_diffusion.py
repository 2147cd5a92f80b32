"""The training objectives: q_sample, the ε / v / x0 targets and min-SNR weights, the VLB term, against
independent formulas and diffusers' schedulers; noise schedules stored as diffusers scheduler folders."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from common.config import ConfigError
from models.diffusion import GaussianDiffusion, NoiseSchedule, pixart_scheduler


def test_q_sample_marginal():
    d = GaussianDiffusion()
    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 499, 999])
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)[t].float().reshape(-1, 1, 1, 1)
    assert torch.allclose(d.q_sample(x0, t, noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-6)


def test_vlb_is_the_kl_between_true_and_model_posteriors():
    """For t > 0 the VB term equals KL(q(x_{t-1}|x_t, x0) ‖ p(x_{t-1}|x_t)) in bits per dim, computed here from
    scratch with torch.distributions."""
    d = GaussianDiffusion()
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 3).clamp(-1, 1), torch.randn(2, 4, 3, 3)
    t = torch.tensor([10, 700])
    x_t = d.q_sample(x0, t, noise)
    eps_hat, v = noise + 0.3 * torch.randn_like(noise), torch.rand(2, 4, 3, 3) * 2 - 1
    terms = d.training_losses(torch.cat([eps_hat, v], 1), x0, x_t, t, noise)

    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    for i, step in enumerate(t.tolist()):
        ab, ab_prev, beta = abar[step], abar[step - 1], betas[step]
        post_var = beta * (1 - ab_prev) / (1 - ab)

        def post_mean(start):
            return (ab_prev.sqrt() * beta * start + (1 - beta).sqrt() * (1 - ab_prev) * x_t[i].double()) / (1 - ab)

        pred_x0 = (x_t[i].double() - (1 - ab).sqrt() * eps_hat[i].double()) / ab.sqrt()
        frac = (v[i].double() + 1) / 2
        model_var = torch.exp(frac * beta.log() + (1 - frac) * post_var.log())
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(post_mean(x0[i].double()), post_var.sqrt()),
                                               torch.distributions.Normal(post_mean(pred_x0), model_var.sqrt()))
        assert math.isclose(terms["vb"][i].item(), kl.mean().item() / math.log(2), rel_tol=1e-4)
    assert torch.allclose(terms["mse"], (noise - eps_hat).square().flatten(1).mean(1))
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])


def test_vlb_at_t0_is_the_decoder_nll_and_has_no_gradient_into_epsilon():
    d = GaussianDiffusion()
    x0, noise = torch.rand(1, 4, 2, 2) * 2 - 1, torch.randn(1, 4, 2, 2)
    t = torch.tensor([0])
    out = torch.cat([noise.clone(), torch.zeros_like(noise)], 1).requires_grad_(True)
    terms = d.training_losses(out, x0, d.q_sample(x0, t, noise), t, noise)
    assert terms["vb"].item() > 0
    terms["vb"].sum().backward()
    assert out.grad[:, :4].abs().max() == 0 and out.grad[:, 4:].abs().max() > 0  # ε is frozen in the VB term


def cosine_v() -> GaussianDiffusion:
    return GaussianDiffusion(NoiseSchedule(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2"))


def test_cosine_schedule_noising_and_v_target_equal_diffusers():
    """q_sample and the v target against diffusers' DDPMScheduler.add_noise / get_velocity on the same schedule."""
    d = cosine_v()
    reference = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    x0, noise, t = torch.randn(4, 12, 4, 4).clamp(-1, 1), torch.randn(4, 12, 4, 4), torch.tensor([0, 300, 700, 999])
    assert torch.allclose(d.q_sample(x0, t, noise), reference.add_noise(x0, noise, t), atol=1e-5)
    assert torch.allclose(d.target(x0, noise, t), reference.get_velocity(x0, noise, t), atol=1e-5)
    assert torch.allclose(d.betas, reference.betas.double(), atol=1e-7)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_x0_from_each_prediction_equals_dpm_solvers_conversion(prediction):
    """Our x0 estimate from ε, v or x0 is the one diffusers' DPM-Solver++ computes from the model output."""
    schedule = NoiseSchedule(prediction_type=prediction, beta_schedule="squaredcos_cap_v2")
    d, solver = GaussianDiffusion(schedule), pixart_scheduler(schedule)
    solver.set_timesteps(10)
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = solver.timesteps[3]
    x_t = d.q_sample(x0, t.expand(2), noise)
    target = d.target(x0, noise, t.expand(2))
    solver._step_index = 3
    assert torch.allclose(d.predicted_x0(target, x_t, t.expand(2)), x0, atol=1e-4)
    assert torch.allclose(solver.convert_model_output(target, sample=x_t), x0, atol=1e-4)


def test_min_snr_weights_and_the_weighted_loss():
    for prediction, formula in (("epsilon", lambda snr: torch.clamp(snr, max=5) / snr),
                                ("v_prediction", lambda snr: torch.clamp(snr, max=5) / (snr + 1)),
                                ("sample", lambda snr: torch.clamp(snr, max=5))):
        d = GaussianDiffusion(NoiseSchedule(prediction_type=prediction), min_snr_gamma=5.0)
        t = torch.tensor([0, 100, 500, 999])
        abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t]
        assert torch.allclose(d.loss_weights(t), formula(abar / (1 - abar)).float(), rtol=1e-5)
    d = GaussianDiffusion(NoiseSchedule(prediction_type="v_prediction"), min_snr_gamma=5.0)
    x0, noise, t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.tensor([0, 100, 500, 999])
    out = torch.randn(4, 3, 2, 2)
    terms = d.training_losses(out, x0, d.q_sample(x0, t, noise), t, noise)
    mse = (d.target(x0, noise, t) - out).square().flatten(1).mean(1)
    assert torch.allclose(terms["mse"], mse) and torch.allclose(terms["loss"], d.loss_weights(t) * mse)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        GaussianDiffusion(min_snr_gamma=0.0)


def test_learned_variance_with_v_prediction_takes_x0_from_v():
    """The VLB term of a v-model equals the ε-model's VLB at the ε that v implies."""
    v_model, eps_model = cosine_v(), GaussianDiffusion(NoiseSchedule(beta_schedule="squaredcos_cap_v2"))
    x0, noise, t = torch.randn(2, 3, 2, 2).clamp(-1, 1), torch.randn(2, 3, 2, 2), torch.tensor([50, 600])
    x_t = v_model.q_sample(x0, t, noise)
    v = v_model.target(x0, noise, t) + 0.1 * torch.randn(2, 3, 2, 2)
    a, s = v_model._at(v_model.sqrt_alphas_bar, t, x0), v_model._at(v_model.sqrt_one_minus_alphas_bar, t, x0)
    eps = a * v + s * x_t
    var = torch.rand(2, 3, 2, 2) * 2 - 1
    vb_v = v_model.training_losses(torch.cat([v, var], 1), x0, x_t, t, noise)["vb"]
    vb_eps = eps_model.training_losses(torch.cat([eps, var], 1), x0, x_t, t, noise)["vb"]
    assert torch.allclose(vb_v, vb_eps, rtol=1e-4)


def test_schedule_round_trips_through_a_diffusers_scheduler_folder(tmp_path):
    schedule = NoiseSchedule(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", clip_sample=1.0)
    path = schedule.save(tmp_path)
    assert path == tmp_path / "scheduler" / "scheduler_config.json"
    assert NoiseSchedule.from_pipeline(tmp_path) == schedule
    loaded = DPMSolverMultistepScheduler.from_pretrained(tmp_path / "scheduler")  # diffusers reads it too
    assert loaded.config.prediction_type == "v_prediction" and loaded.config.thresholding
    assert NoiseSchedule.from_pipeline(tmp_path / "nothing") == NoiseSchedule()
    with pytest.raises(ConfigError, match="prediction_type"):
        NoiseSchedule.from_scheduler_config({"prediction_type": "flow"})
