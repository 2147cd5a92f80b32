"""Noise schedules and samplers from diffusers, configured as PixArt-Sigma and DiT were trained and sampled."""
from __future__ import annotations

from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

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


def respaced_timesteps(num_steps: int, train_steps: int = TRAIN_STEPS) -> list[int]:
    """IDDPM's `space_timesteps(T, [num_steps])`: evenly strided with rounding, descending (DiT's 250 steps)."""
    if not 1 <= num_steps <= train_steps:
        raise ValueError(f"num_steps must be in 1..{train_steps}, got {num_steps}")
    if num_steps == 1:
        return [0]
    stride = (train_steps - 1) / (num_steps - 1)
    return sorted({round(i * stride) for i in range(num_steps)}, reverse=True)
