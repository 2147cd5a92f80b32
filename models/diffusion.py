"""Noise schedules and samplers from diffusers, configured as PixArt-Sigma and DiT were trained and sampled."""
from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

TRAIN_STEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02  # linear β schedule of both models


def pixart_scheduler() -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2nd order, multistep), PixArt-Sigma's default sampler (20 steps, CFG 4.5 by convention)."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=TRAIN_STEPS, beta_start=BETA_START, beta_end=BETA_END, beta_schedule="linear",
        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        lower_order_final=True, timestep_spacing="linspace", steps_offset=0, use_karras_sigmas=False,
    )


def ddpm_scheduler(clip_sample: bool = False) -> DDPMScheduler:
    """Ancestral DDPM with DiT's learned-range variance (the original samples without clipping x0)."""
    return DDPMScheduler(
        num_train_timesteps=TRAIN_STEPS, beta_start=BETA_START, beta_end=BETA_END, beta_schedule="linear",
        prediction_type="epsilon", variance_type="learned_range", clip_sample=clip_sample,
    )


def ddim_scheduler() -> DDIMScheduler:
    """DDIM on the linear β schedule, the scheduler diffusers' converted DiT pipelines (facebook/DiT-XL-2-*) ship."""
    return DDIMScheduler(num_train_timesteps=TRAIN_STEPS, beta_start=BETA_START, beta_end=BETA_END,
                         beta_schedule="linear", prediction_type="epsilon", clip_sample=False)


def respaced_timesteps(num_steps: int, train_steps: int = TRAIN_STEPS) -> list[int]:
    """IDDPM's `space_timesteps(T, [num_steps])`: evenly strided with rounding, descending (DiT's 250 steps)."""
    if not 1 <= num_steps <= train_steps:
        raise ValueError(f"num_steps must be in 1..{train_steps}, got {num_steps}")
    if num_steps == 1:
        return [0]
    stride = (train_steps - 1) / (num_steps - 1)
    return sorted({round(i * stride) for i in range(num_steps)}, reverse=True)


class GaussianDiffusion:
    """The 1000-step linear-β forward process and IDDPM's hybrid loss (ε MSE + VLB for the learned variance),
    the objective both DiT and PixArt-Sigma were trained with."""

    def __init__(self, train_steps: int = TRAIN_STEPS, beta_start: float = BETA_START, beta_end: float = BETA_END):
        betas = torch.linspace(beta_start, beta_end, train_steps, dtype=torch.float64)
        alphas_bar = torch.cumprod(1 - betas, dim=0)
        alphas_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_bar[:-1]])
        posterior_var = betas * (1 - alphas_bar_prev) / (1 - alphas_bar)
        self.train_steps = train_steps
        self.betas = betas
        self.sqrt_alphas_bar = alphas_bar.sqrt()
        self.sqrt_one_minus_alphas_bar = (1 - alphas_bar).sqrt()
        self.sqrt_recip_alphas_bar = (1 / alphas_bar).sqrt()
        self.sqrt_recipm1_alphas_bar = (1 / alphas_bar - 1).sqrt()
        # IDDPM clips the t = 0 posterior variance (which is 0) to the t = 1 value
        self.posterior_log_var = torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]]))
        self.posterior_mean_coef1 = betas * alphas_bar_prev.sqrt() / (1 - alphas_bar)
        self.posterior_mean_coef2 = (1 - alphas_bar_prev) * (1 - betas).sqrt() / (1 - alphas_bar)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table.to(t.device)[t].float().reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε."""
        return self._at(self.sqrt_alphas_bar, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_bar, t, x0) * noise

    def training_losses(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample `mse` (ε), `vb` (bits/dim, learned variance only) and their sum `loss`, as IDDPM/DiT."""
        c = x0.shape[1]
        eps = model_output[:, :c].float()
        mse = (noise.float() - eps).square().flatten(1).mean(1)
        if model_output.shape[1] == c:
            return {"mse": mse, "vb": torch.zeros_like(mse), "loss": mse}
        vb = self._vb_bits(eps.detach(), model_output[:, c:].float(), x0.float(), x_t.float(), t)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    def _vb_bits(self, eps, var_values, x0, x_t, t):
        min_log = self._at(self.posterior_log_var, t, x0)
        max_log = self._at(self.betas.log(), t, x0)
        frac = (var_values + 1) / 2
        model_log_var = frac * max_log + (1 - frac) * min_log
        pred_x0 = (self._at(self.sqrt_recip_alphas_bar, t, x0) * x_t
                   - self._at(self.sqrt_recipm1_alphas_bar, t, x0) * eps)
        model_mean = self._posterior_mean(pred_x0, x_t, t)
        true_mean = self._posterior_mean(x0, x_t, t)
        kl = normal_kl(true_mean, self._at(self.posterior_log_var, t, x0), model_mean, model_log_var)
        kl = kl.flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).flatten(1).mean(1)
        return torch.where(t == 0, nll / math.log(2.0), kl)

    def _posterior_mean(self, x0, x_t, t):
        return self._at(self.posterior_mean_coef1, t, x0) * x0 + self._at(self.posterior_mean_coef2, t, x0) * x_t


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).square() * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
                                        ) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under a Gaussian (IDDPM's decoder term)."""

    def cdf(v):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v.pow(3))))

    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
