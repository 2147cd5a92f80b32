"""Precision reaches the modules it should, checked on the CPU's bf16 autocast: `bf16-mixed` keeps fp32 weights
and master weights, computes matmuls in bf16, keeps the residual stream in fp32, and stage 1 records its targets
from an fp32 teacher; pure `bf16` computes in bf16 on fp32 master weights. (DeepSpeed's side, ZeRO 0-3:
tests/recipes/test_engine.py.)"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from recipes.batches import call_model, noise_batch, to_device
from recipes.config import load_recipe
from recipes.precision import Precision
from recipes.stage1 import Distiller, teacher_records
from tests.conftest import REPO

RECIPES = [REPO / "recipes" / "tiny_pixart_hyena_x.yaml", REPO / "recipes" / "tiny_dit_hyena_y.yaml"]


def distiller(tmp_path, recipe, *sets: str) -> Distiller:
    return Distiller(load_recipe(recipe, [f"output_dir={tmp_path}", "stage1.mode=split", *sets]), 0, 1)


class Dtypes:
    """The output dtype of every module it watches, by name, and the input dtype of the `inputs` modules."""

    def __init__(self, modules: dict[str, nn.Module], inputs: dict[str, nn.Module]):
        self.seen: dict[str, torch.dtype] = {}
        for name, module in modules.items():
            module.register_forward_hook(lambda m, args, out, name=name: self.seen.__setitem__(name, out.dtype))
        for name, module in inputs.items():
            module.register_forward_pre_hook(lambda m, args, name=name: self.seen.__setitem__(name, args[0].dtype))


def watch(d: Distiller) -> Dtypes:
    """The teacher's residual stream (into the first block, out of the last) and a matmul of it; a matmul and the
    output of a student."""
    student = next(iter(d.bank.students.values()))
    return Dtypes({"teacher block": d.teacher.blocks[-1], "teacher matmul": d.teacher.blocks[0].mlp.fc1,
                   "student matmul": next(m for m in student.modules() if isinstance(m, nn.Linear)),
                   "student": student}, {"teacher stream": d.teacher.blocks[0]})


def one_step(d: Distiller) -> dict:
    """A micro-step and an optimizer step on the first training batch; the teacher's records of that batch."""
    batch = next(iter(d.batches("train")))
    loss, _ = d.micro_step(batch, torch.Generator().manual_seed(0))
    d.engine.backward(loss)
    d.engine.step()
    return teacher_records(d.teacher, d.tap, d.diffusion, batch, torch.Generator().manual_seed(0), d.dev,
                           d.teacher_precision), batch


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_bf16_mixed_keeps_fp32_weights_and_stream_and_records_fp32_targets(tmp_path, recipe):
    d = distiller(tmp_path, recipe, "deepspeed.precision=bf16-mixed")
    dtypes = watch(d)
    records, batch = one_step(d)
    assert dtypes.seen == {"teacher stream": torch.float32, "teacher block": torch.float32,
                           "teacher matmul": torch.float32, "student matmul": torch.bfloat16,
                           "student": torch.bfloat16}
    for p in d.bank.parameters():
        assert p.dtype == torch.float32 and d.engine.master_of(p) is p  # the parameters are the master weights
    assert all(p.dtype == torch.float32 for p in d.teacher.parameters())
    # the targets: the teacher's own fp32 forward, bit for bit
    x_t, t, _ = noise_batch(d.diffusion, to_device(batch, d.dev, torch.float32), torch.Generator().manual_seed(0))
    with torch.no_grad():
        call_model(d.teacher, x_t, t, to_device(batch, d.dev, torch.float32))
    reference = d.tap.take()
    for path, (inputs, _, target) in records.items():
        assert target.dtype == torch.float32 and inputs.dtype == torch.float32
        assert torch.equal(target, reference[path][2])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_a_bf16_autocast_teacher_keeps_its_residual_stream_in_fp32(tmp_path, recipe):
    d = distiller(tmp_path, recipe, "deepspeed.precision=bf16-mixed", "stage1.teacher_precision=bf16-mixed")
    dtypes = watch(d)
    records, batch = one_step(d)
    assert dtypes.seen["teacher matmul"] == torch.bfloat16  # autocast reaches the teacher's matmuls …
    assert dtypes.seen["teacher stream"] == dtypes.seen["teacher block"] == torch.float32  # … not its stream
    exact = teacher_records(d.teacher, d.tap, d.diffusion, batch, torch.Generator().manual_seed(0), d.dev,
                            Precision("fp32"))
    for path, (_, _, target) in records.items():
        assert target.dtype == torch.bfloat16
        error = ((target.float() - exact[path][2]).norm() / exact[path][2].norm()).item()
        assert 0 < error < 0.05, error


def test_pure_bf16_computes_in_bf16_on_fp32_master_weights(tmp_path):
    d = distiller(tmp_path, RECIPES[0], "deepspeed.precision=bf16")
    dtypes = watch(d)
    records, _ = one_step(d)
    assert dtypes.seen["student matmul"] == torch.bfloat16 and dtypes.seen["teacher block"] == torch.float32
    for p in d.bank.parameters():
        master = d.engine.master_of(p)
        assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert torch.equal(p, master.to(torch.bfloat16))  # the module holds the rounded masters
    assert any(not torch.equal(d.engine.master_of(p), d.engine.master_of(p).bfloat16().float())
               for p in d.bank.parameters())  # and the masters keep what bf16 cannot
    assert all(r[2].dtype == torch.float32 for r in records.values())  # targets from the fp32 teacher
