"""Noise schedules, training objectives and samplers from diffusers, configured as PixArt-Sigma and DiT were
trained and sampled, and as any other schedule a pipeline folder declares (e.g. the shapes teacher's v-prediction
on the cosine schedule)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from common.config import from_dict

TRAIN_STEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02  # linear β schedule of both models
SCHEDULER_CONFIG = "scheduler_config.json"  # diffusers' file name, in a pipeline's scheduler/ folder


@dataclass(frozen=True)
class NoiseSchedule:
    """What a model predicts and on which forward process it was trained; PixArt-Sigma's and DiT's by default.

    `prediction_type` and `beta_schedule` take diffusers' names: ε, v = √ᾱ ε − √(1 − ᾱ) x0, or x0 itself;
    linear, scaled_linear or the cosine schedule (squaredcos_cap_v2). `clip_sample`, when set, makes the sampler
    clip every x0 estimate to [−clip_sample, clip_sample] (DPM-Solver++ thresholding at that value), which is
    exact for codecs whose latents are pixels in [−1, 1].
    """

    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = BETA_START
    beta_end: float = BETA_END
    train_steps: int = TRAIN_STEPS
    clip_sample: float | None = None

    @classmethod
    def from_dict(cls, data: dict, where: str = "noise schedule") -> NoiseSchedule:
        return from_dict(cls, data, where)

    def betas(self) -> torch.Tensor:
        """(train_steps,) float64 β_t, computed by diffusers from the same settings its schedulers take."""
        return ddpm_scheduler(schedule=self).betas.double()

    def scheduler_config(self) -> dict:
        """The keys of a diffusers scheduler config that carry this schedule."""
        return {"num_train_timesteps": self.train_steps, "beta_start": self.beta_start, "beta_end": self.beta_end,
                "beta_schedule": self.beta_schedule, "prediction_type": self.prediction_type,
                "thresholding": self.clip_sample is not None, "sample_max_value": self.clip_sample or 1.0}

    @classmethod
    def from_scheduler_config(cls, config: dict, where: str = "scheduler config") -> NoiseSchedule:
        """Read a diffusers scheduler config (any scheduler class); missing keys take diffusers' defaults."""
        clip = float(config.get("sample_max_value", 1.0)) if config.get("thresholding") else None
        return cls.from_dict({"prediction_type": config.get("prediction_type", "epsilon"),
                              "beta_schedule": config.get("beta_schedule", "linear"),
                              "beta_start": config.get("beta_start", BETA_START),
                              "beta_end": config.get("beta_end", BETA_END),
                              "train_steps": config.get("num_train_timesteps", TRAIN_STEPS),
                              "clip_sample": clip}, where)

    @classmethod
    def from_pipeline(cls, folder: str | Path) -> NoiseSchedule:
        """A pipeline folder's `scheduler/scheduler_config.json`, or PixArt-Sigma's schedule when it has none."""
        path = Path(folder) / "scheduler" / SCHEDULER_CONFIG
        if not path.is_file():
            return cls()
        return cls.from_scheduler_config(json.loads(path.read_text(encoding="utf-8")), where=str(path))

    def save(self, pipeline_folder: str | Path) -> Path:
        """Write `scheduler/scheduler_config.json` into a pipeline folder: the DPM-Solver++ sampler of this
        schedule, in diffusers' format (diffusers' own pipelines load it too)."""
        folder = Path(pipeline_folder) / "scheduler"
        pixart_scheduler(self).save_config(folder)
        return folder / SCHEDULER_CONFIG

    def to_dict(self) -> dict:
        return asdict(self)


def pixart_scheduler(schedule: NoiseSchedule | None = None) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2nd order, multistep), PixArt-Sigma's default sampler (20 steps, CFG 4.5 by convention), on
    the model's noise schedule (PixArt-Sigma's when None)."""
    schedule = schedule or NoiseSchedule()
    return DPMSolverMultistepScheduler(
        **schedule.scheduler_config(), algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        lower_order_final=True, timestep_spacing="linspace", steps_offset=0, use_karras_sigmas=False,
    )


def ddpm_scheduler(clip_sample: bool = False, schedule: NoiseSchedule | None = None) -> DDPMScheduler:
    """Ancestral DDPM with DiT's learned-range variance (the original samples without clipping x0)."""
    schedule = schedule or NoiseSchedule()
    return DDPMScheduler(
        num_train_timesteps=schedule.train_steps, beta_start=schedule.beta_start, beta_end=schedule.beta_end,
        beta_schedule=schedule.beta_schedule, prediction_type=schedule.prediction_type,
        variance_type="learned_range", clip_sample=clip_sample,
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
    """A noise schedule's forward process and the training objective: MSE on the model's prediction target (ε, v
    or x0), optionally min-SNR-γ weighted, plus IDDPM's VLB term when the model also predicts its variance. With
    the default schedule this is the hybrid loss (ε MSE + VLB) DiT and PixArt-Sigma were trained with."""

    def __init__(self, schedule: NoiseSchedule | None = None, min_snr_gamma: float | None = None):
        self.schedule = schedule or NoiseSchedule()
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
        self.min_snr_gamma = min_snr_gamma
        betas = self.schedule.betas()
        alphas_bar = torch.cumprod(1 - betas, dim=0)
        alphas_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_bar[:-1]])
        posterior_var = betas * (1 - alphas_bar_prev) / (1 - alphas_bar)
        self.train_steps = self.schedule.train_steps
        self.betas = betas
        self.snr = alphas_bar / (1 - alphas_bar)
        self.sqrt_alphas_bar = alphas_bar.sqrt()
        self.sqrt_one_minus_alphas_bar = (1 - alphas_bar).sqrt()
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

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model learns to predict: ε, v = √ᾱ ε − √(1 − ᾱ) x0, or x0."""
        kind = self.schedule.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "sample":
            return x0
        return self._at(self.sqrt_alphas_bar, t, x0) * noise - self._at(self.sqrt_one_minus_alphas_bar, t, x0) * x0

    def predicted_x0(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's x0 estimate from its prediction of the target."""
        a, s = self._at(self.sqrt_alphas_bar, t, x_t), self._at(self.sqrt_one_minus_alphas_bar, t, x_t)
        kind = self.schedule.prediction_type
        if kind == "epsilon":
            return (x_t - s * prediction) / a
        if kind == "sample":
            return prediction
        return a * x_t - s * prediction

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weights of the MSE: 1, or min-SNR-γ (Hang et al. 2023) expressed for the prediction target:
        min(SNR, γ) / SNR for ε, min(SNR, γ) / (SNR + 1) for v, min(SNR, γ) for x0."""
        if self.min_snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        snr = self.snr.to(t.device)[t]
        clipped = snr.clamp(max=self.min_snr_gamma)
        kind = self.schedule.prediction_type
        weight = clipped / snr if kind == "epsilon" else clipped / (snr + 1) if kind == "v_prediction" else clipped
        return weight.float()

    def training_losses(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample `mse` (on the prediction target, unweighted), `vb` (bits/dim, learned variance only) and
        `loss` = weight · mse + vb, as IDDPM/DiT for ε without weighting."""
        c = x0.shape[1]
        prediction = model_output[:, :c].float()
        mse = (self.target(x0.float(), noise.float(), t) - prediction).square().flatten(1).mean(1)
        loss = self.loss_weights(t) * mse
        if model_output.shape[1] == c:
            return {"mse": mse, "vb": torch.zeros_like(mse), "loss": loss}
        pred_x0 = self.predicted_x0(prediction.detach(), x_t.float(), t)
        vb = self._vb_bits(pred_x0, model_output[:, c:].float(), x0.float(), x_t.float(), t)
        return {"mse": mse, "vb": vb, "loss": loss + vb}

    def _vb_bits(self, pred_x0, var_values, x0, x_t, t):
        min_log = self._at(self.posterior_log_var, t, x0)
        max_log = self._at(self.betas.log(), t, x0)
        frac = (var_values + 1) / 2
        model_log_var = frac * max_log + (1 - frac) * min_log
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
