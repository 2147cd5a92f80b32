"""Optional kernels never fail silently: a missing one is an info note, a broken one (on import or on its first
call) one warning, then the pure path; every module records the backend it ran. CUDA is stood in for by letting
CPU tensors be eligible, and the packages by fakes behind a patched import."""
from __future__ import annotations

import importlib
import logging
from types import SimpleNamespace

import pytest
import torch

from models.operators import attention_core, build, causal_conv, kernels
from models.operators.kernels import OptionalKernel, backend_summary, backends, log_backends_once

REAL_IMPORT = importlib.import_module


@pytest.fixture
def fresh_flash_attn(monkeypatch):
    """A not-yet-loaded flash_attn kernel that CPU tensors may use; returns a setter for what importing gives."""
    kernel = OptionalKernel("flash_attn", "flash_attn", half_only=True)
    monkeypatch.setattr(attention_core, "FLASH_ATTN", kernel)
    monkeypatch.setattr(kernels, "eligible", lambda tensors, half_only: True)

    def importing(result):
        def fake(name, *args):
            if name != "flash_attn":
                return REAL_IMPORT(name, *args)
            if isinstance(result, BaseException):
                raise result
            return result

        monkeypatch.setattr(importlib, "import_module", fake)

    return importing


def swa_and_input():
    torch.manual_seed(0)
    return build("swa", embed_dim=32, num_heads=4, window_size=[2, 2]), torch.randn(2, 20, 32)


def pure_output(op, x):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "eligible", lambda tensors, half_only: False)
        return op(x)


def warnings_of(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.name == kernels.__name__]


def test_a_kernel_broken_on_import_warns_once_and_the_pure_path_runs(fresh_flash_attn, caplog):
    fresh_flash_attn(RuntimeError("flash_attn_2_cuda: undefined symbol _ZN3c10"))
    op, x = swa_and_input()
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        first, second = op(x), op(x)
    (warning,) = warnings_of(caplog)
    assert "flash_attn" in warning.message and "undefined symbol" in warning.message and "import" in warning.message
    assert op.backend == "torch" and backends(op) == {"": "torch"}
    assert torch.equal(first, pure_output(op, x)) and torch.equal(first, second)


def test_a_kernel_broken_on_its_first_call_warns_once_and_is_not_called_again(fresh_flash_attn, caplog):
    calls = []

    def flash_attn_func(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer")

    fresh_flash_attn(SimpleNamespace(flash_attn_func=flash_attn_func))
    op, x = swa_and_input()
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        out = op(x)
        op(x)
    (warning,) = warnings_of(caplog)
    assert "first call" in warning.message and "Ampere" in warning.message
    assert len(calls) == 1 and op.backend == "torch" and torch.equal(out, pure_output(op, x))


def test_a_working_kernel_is_used_and_recorded(fresh_flash_attn, caplog):
    def flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size):
        return attention_core.blocked_window_attention(q, k, v, window_size, softmax_scale, dropout_p) * 2

    fresh_flash_attn(SimpleNamespace(flash_attn_func=flash_attn_func))
    op, x = swa_and_input()
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        out = op(x)
    assert not warnings_of(caplog) and op.backend == "flash_attn"
    assert not torch.equal(out, pure_output(op, x))  # the (fake) kernel's output, not the pure path's


def test_a_missing_kernel_is_a_note_not_a_warning(fresh_flash_attn, caplog):
    fresh_flash_attn(ModuleNotFoundError("No module named 'flash_attn'", name="flash_attn"))
    op, x = swa_and_input()
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        op(x)
        op(x)
    notes = [r for r in caplog.records if r.name == kernels.__name__]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO and "not installed" in notes[0].message
    assert op.backend == "torch"


def test_an_installed_kernel_missing_a_dependency_is_broken(fresh_flash_attn, caplog):
    fresh_flash_attn(ModuleNotFoundError("No module named 'einops'", name="einops"))
    op, x = swa_and_input()
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        op(x)
    (warning,) = warnings_of(caplog)
    assert "einops" in warning.message and op.backend == "torch"


def test_running_out_of_memory_is_not_taken_for_a_broken_kernel(fresh_flash_attn):
    def flash_attn_func(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    fresh_flash_attn(SimpleNamespace(flash_attn_func=flash_attn_func))
    op, x = swa_and_input()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        op(x)


def test_every_module_records_its_backend_and_the_model_summarises_them(monkeypatch, caplog):
    monkeypatch.setattr(causal_conv, "CAUSAL_CONV1D", OptionalKernel("causal_conv1d", "causal_conv1d"))
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"x": build("hyena_x", d_model=16, l_max=64), "y": build("hyena_y", d_model=16,
                                                                                          l_max=64)})
    assert backends(model) == {} and backend_summary(model) == "no module with an optional kernel has run"
    wrapper = torch.nn.Sequential(model["x"])
    log_backends_once(wrapper, "students")
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        wrapper(torch.randn(1, 10, 16))
        wrapper(torch.randn(1, 10, 16))
    assert backends(model) == {"x.short_filter": "torch"}  # y has not run; x's inner filter is the identity
    assert backend_summary(model) == "CausalDepthwiseConv1d: torch ×1"
    lines = [r.message for r in caplog.records if "ran on" in r.message]
    assert lines == ["students ran on: CausalDepthwiseConv1d: torch ×1"]
