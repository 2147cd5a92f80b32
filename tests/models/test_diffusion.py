"""The stage-2 objective: q_sample, ε MSE and the VLB term against independent formulas."""
from __future__ import annotations

import math

import torch

from models.diffusion import GaussianDiffusion


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
