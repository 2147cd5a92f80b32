"""Measuring calls robustly on shared machines: interleaved timing with paired ratios, peak memory, op profiles.

Timing alternates the calls (A B C A B C …) so that load drifting between rounds hits all of them alike; a ratio
is taken within each round and summarised by its median and spread over rounds. On the CPU each call also gets
its process CPU time, which other jobs' load disturbs much less than the wall clock.
"""
from __future__ import annotations

import logging
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass
class Timings:
    """Seconds per call of one thing, every timed round: wall clock (CUDA events on a GPU), and process CPU time
    on the CPU (None on a GPU)."""

    wall: list[float]
    cpu: list[float] | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.wall)


@dataclass
class Ratio:
    """A paired ratio (reference / other, per round): median, and the lowest and highest round."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, reference: list[float], other: list[float]) -> Ratio | None:
        if not reference or not other:
            return None
        ratios = [r / o for r, o in zip(reference, other)]
        return cls(statistics.median(ratios), min(ratios), max(ratios))


def time_alternating(calls: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                     desc: str) -> dict[str, Timings]:
    """Warm every call up, then time them in turn (A B A B …), `repeats` rounds."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = {name: Timings([], None if device.type == "cuda" else []) for name in calls}
    for _ in tqdm(range(repeats), desc=desc, unit="round", disable=repeats == 0):
        for name, fn in calls.items():
            wall, cpu = timed(fn, device)
            times[name].wall.append(wall)
            if cpu is not None:
                times[name].cpu.append(cpu)
    return times


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """(seconds, CPU seconds) of one call: CUDA events on a GPU (no CPU time), else the wall clock and the
    process CPU time (every thread)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, None
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated by `fn` at its peak, above what was allocated before it: the activations and temporaries
    of a forward pass, not the weights.

    On a GPU this is torch's allocator statistic (`max_memory_allocated`). On the CPU, which keeps no such
    statistic, every allocation and free of torch's CPU allocator is recorded by the profiler
    (`profile_memory`) and the running total's maximum taken; eager and compiled code allocate through it
    alike."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The raw events: function_events fold allocations into the ops that made them and keep only the frees.
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def op_profile(fn: Callable[[], object], device: torch.device, calls: int = 3, clock: str = "wall"
               ) -> dict[str, float]:
    """Self time (ms) per op in one call of `fn`, the median over `calls` calls.

    `wall`: torch.profiler's self time of each op (CPU ops; CUDA kernels on a GPU). It is wall time inside the op,
    so on a loaded machine it includes time the op waited to run. `cpu` (CPU only): the calling thread's CPU time
    in each ATen op, taken at the dispatcher (`OpCpuTimer`); with one torch thread all the work is on that thread,
    so other jobs barely disturb it.
    """
    per_call = []
    for _ in range(calls):
        if clock == "cpu":
            with OpCpuTimer() as timer:
                fn()
            per_call.append(timer.ms)
            continue
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        ms: dict[str, float] = defaultdict(float)
        for event in prof.key_averages():
            ms[event.key] += (event.self_device_time_total if device.type == "cuda"
                              else event.self_cpu_time_total) / 1e3
        per_call.append(ms)
    ops = {op for ms in per_call for op in ms}
    medians = {op: statistics.median(ms.get(op, 0.0) for ms in per_call) for op in ops}
    return {op: value for op, value in medians.items() if value > 0}


class OpCpuTimer(TorchDispatchMode):
    """Adds up the calling thread's CPU time per ATen op (`aten::addmm`, …; a custom op counts as one) while
    active. Ops are seen after autograd and decomposition, as the profiler names them."""

    def __init__(self):
        super().__init__()
        self.ms: dict[str, float] = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.thread_time()
        out = func(*args, **(kwargs or {}))
        self.ms[func._schema.name] += (time.thread_time() - start) * 1e3
        return out


def warn_cpu_clock_threads(clock: str) -> None:
    """Process CPU time counts the time idle OpenMP threads spin while they wait for work; with more than one
    thread it overstates small ops, so say so."""
    if clock == "cpu" and torch.get_num_threads() > 1:
        log.warning("CPU time with %d threads includes threads spinning while they wait; use --threads 1 for a "
                    "CPU time close to the work done", torch.get_num_threads())


def machine_load() -> float | None:
    """The 1-minute load average (runnable processes), where the OS reports one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
