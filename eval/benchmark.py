"""What the speed benchmarks share: random inputs of a model's trained size, and timing in rounds (models timed in
turn, round after round, in one process, so that load which drifts between rounds, as it does on shared CPU
machines, affects every model alike; speed-ups as the median of the per-round ratios)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from models.dit import DiTConfig
from models.pixart import PixArtConfig

CAPTION_TOKENS = 300  # PixArt-Sigma's T5 length
TIMESTEP = 500  # any timestep costs the same


def random_inputs(config: PixArtConfig | DiTConfig, batch: int, device: torch.device, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, ...]:
    """Latents at the config's trained size and a timestep, then class labels (DiT) or random T5-sized caption
    features and an all-ones mask (PixArt-Sigma)."""
    g = torch.Generator().manual_seed(0)
    dit = isinstance(config, DiTConfig)
    side = config.input_size if dit else config.sample_size
    latents = torch.randn(batch, config.in_channels, side, side, generator=g).to(device, dtype)
    t = torch.full((batch,), float(TIMESTEP), device=device)
    if dit:
        return latents, t, torch.randint(config.num_classes, (batch,), generator=g).to(device)
    captions = torch.randn(batch, CAPTION_TOKENS, config.caption_channels, generator=g).to(device, dtype)
    return latents, t, captions, torch.ones(batch, CAPTION_TOKENS, dtype=torch.long, device=device)


def paired_speedup(baseline_s: list[float], other_s: list[float]) -> float | None:
    """Median over rounds of baseline time / other time (both timed in the same round)."""
    return statistics.median(b / o for b, o in zip(baseline_s, other_s)) if other_s else None


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds one call takes: CUDA events around it on a GPU, the wall clock on the CPU."""

    def cuda(fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def wall(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return cuda if device.type == "cuda" else wall


def time_alternating(calls: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                     desc: str) -> dict[str, list[float]]:
    """Warm every call up, then time the calls in turn (A B A B …) so slow drift affects all of them alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    measure = timer(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in tqdm(range(repeats), desc=desc, unit="round", disable=repeats == 0):
        for name, fn in calls.items():
            times[name].append(measure(fn))
    return times
