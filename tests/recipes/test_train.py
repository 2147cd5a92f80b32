"""The engine end to end on 2 CPU processes (gloo): distillation, ZeRO-2/3 finetuning, kill -9 and exact resume,
non-finite losses. Each test launches `torchrun -m recipes.train` as a user would."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.operators.hyena import HyenaX
from models.pixart import PixArtSigma
from recipes.checkpoint_size import checkpoint_bytes
from recipes.config import load_recipe
from recipes.distributed import free_port
from recipes.reporting import read_metrics
from tests.conftest import REPO

TINY = REPO / "recipes" / "tiny_pixart_hyena_x.yaml"
SELF_GRAFT = "graft.grafts=[{type: mha, name: mha, config: {num_heads: 4, qkv_bias: true}, layers: {ratio: 0.5}}]"
pytestmark = pytest.mark.slow


def command(out: Path, sets: list[str], extra: list[str] = (), recipe: Path = TINY) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "recipes.train", str(recipe), "--set", f"output_dir={out}"]
    for item in sets:
        cmd += ["--set", item]
    return cmd + list(extra)


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def train(out: Path, sets: list[str], extra: list[str] = (), check: bool = True, recipe: Path = TINY
          ) -> subprocess.CompletedProcess:
    result = subprocess.run(command(out, sets, extra, recipe), capture_output=True, text=True, timeout=900, cwd=REPO,
                            env=environment())
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def losses(metrics: Path, key: str = "train/loss") -> list[float]:
    return [row[key] for row in read_metrics(metrics) if key in row]


def test_stage1_self_graft_loss_falls_tenfold(tmp_path):
    """Fresh attention students regress the teacher's attention: the loss falls ≥ 10×, every layer is reported."""
    train(tmp_path, [SELF_GRAFT, "stage1.steps=300", "stage1.log_every=5", "stage1.eval_every=100"], ["--stage", "1"])
    curve = losses(tmp_path / "stage1" / "metrics.jsonl")
    assert curve[0] / curve[-1] >= 10, curve
    table = (tmp_path / "stage1" / "layers.md").read_text()
    assert "blocks.1.attn" in table and "blocks.3.attn" in table
    for path in ("blocks.1.attn", "blocks.3.attn"):
        info = json.loads((tmp_path / "stage1" / "best" / f"{path}.json").read_text())
        assert info["rel_err"] < 0.25 and info["loss"] == "l1"
    assert (tmp_path / "stage1" / "loss_curves.png").is_file()
    assert list((tmp_path / "stage1" / "tensorboard").iterdir())


@pytest.mark.parametrize("zero, stage1_mode", [(2, "data_parallel"), (3, "split")])
def test_end_to_end_graft_under_zero(tmp_path, tiny_pipeline, zero, stage1_mode):
    """Stage 1 → stage 2 (LoRA, caption dropout) → export; the stage-2 loss falls and the export loads as a
    grafted model."""
    from recipes.null_caption import main as write_null_caption

    null = write_null_caption(["--pipeline", str(tiny_pipeline), "--out", str(tmp_path / "null.safetensors"),
                               "--max-length", "16"])
    train(tmp_path, [f"deepspeed.zero_stage={zero}", f"stage1.mode={stage1_mode}", "stage1.steps=60",
                     "stage2.steps=60", "stage2.log_every=5", "data.caption_dropout=0.3", f"data.null_caption={null}"])
    stage1 = losses(tmp_path / "stage1" / "metrics.jsonl")
    assert stage1[-1] < stage1[0] / 2
    stage2 = losses(tmp_path / "stage2" / "metrics.jsonl")
    assert sum(stage2[-3:]) / 3 < 0.9 * sum(stage2[:3]) / 3, stage2
    model = PixArtSigma.from_pretrained(tmp_path / "export")
    assert isinstance(model.blocks[1].attn, HyenaX) and isinstance(model.blocks[3].attn, HyenaX)
    assert not any("lora" in k for k in model.state_dict())
    out = model(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 16, 32), torch.ones(1, 16))
    assert out.shape == (1, 8, 8, 8) and torch.isfinite(out).all()


def test_dit_recipe_full_finetuning_with_ema(tmp_path):
    """The DiT flavour: class labels, full finetuning, EMA weights in the export."""
    from models.dit import DiT
    from models.operators.hyena import HyenaY

    run = train(tmp_path, ["stage1.steps=30", "stage2.steps=30", "stage2.log_every=5"],
                recipe=REPO / "recipes" / "tiny_dit_hyena_y.yaml")
    for label in ("stage 1 students", "stage 2 model"):  # the logs say which kernels ran: the pure path, on CPU
        assert f"{label} ran on: CausalDepthwiseConv1d: torch ×2" in run.stderr
    model = DiT.from_pretrained(tmp_path / "export")
    assert [i for i, b in enumerate(model.blocks) if isinstance(b.attn, HyenaY)] == [1, 3]
    assert "| self-attention | `hyena_y` | 1, 3 | 2 / 4 (50%) |" in (tmp_path / "export" / "README.md").read_text()
    last = sorted((tmp_path / "stage2" / "checkpoints").glob("step*"))[-1]
    name, exported = "blocks.1.attn.in_proj.weight", model.state_dict()["blocks.1.attn.in_proj.weight"]
    ema = torch.full((exported.numel(),), float("nan"))
    for rank in range(2):  # each rank's checkpoint holds the EMA of its own ZeRO-2 partition
        shards = torch.load(last / f"extra_rank{rank}.pt", weights_only=True)["stage"]["ema"]
        if name in shards["values"]:
            values = shards["values"][name]
            ema[shards["starts"][name]:shards["starts"][name] + values.numel()] = values
    assert torch.equal(exported.flatten(), ema)
    stage2 = losses(tmp_path / "stage2" / "metrics.jsonl")
    assert stage2[-1] < stage2[0]


def test_the_export_loses_nothing_under_pure_bf16(tmp_path):
    """Pure bf16 (the module holds bf16 copies), LoRA, no EMA: the frozen tensors of the export are the teacher's,
    bit for bit; the trained ones are DeepSpeed's fp32 master weights; the adapters are merged in fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from models.weights import read_state_dict
    from recipes.builders import build_teacher

    sets = ["deepspeed.precision=bf16", "stage1.steps=10", "stage2.steps=10", "stage2.ema_decay=null"]
    train(tmp_path, sets)
    recipe = load_recipe(TINY, [f"output_dir={tmp_path}", *sets])
    exported = read_state_dict(tmp_path / "export" / "model.safetensors")
    teacher = build_teacher(recipe).state_dict()
    master = get_fp32_state_dict_from_zero_checkpoint(tmp_path / "stage2" / "checkpoints", "step00000010",
                                                      exclude_frozen_parameters=True)
    grafted = ("blocks.1.attn.", "blocks.3.attn.")
    adapted = {k.replace(".lora_A.default", "").rsplit(".", 1)[0] for k in master if ".lora_A." in k}
    scale = recipe.stage2.lora.alpha / recipe.stage2.lora.rank
    assert adapted and all(v.dtype == torch.float32 for v in exported.values())
    for name, value in exported.items():
        layer = name.rsplit(".", 1)[0]
        if name.startswith(grafted):
            assert torch.equal(value, master[name]), name  # trained: the fp32 master, not its bf16 copy
        elif layer in adapted and name.endswith(".weight"):
            delta = master[f"{layer}.lora_B.default.weight"] @ master[f"{layer}.lora_A.default.weight"]
            assert torch.allclose(value, teacher[name] + scale * delta, rtol=0, atol=1e-6), name
            assert not torch.equal(value, teacher[name])
        else:
            assert torch.equal(value, teacher[name]), name  # frozen: the teacher's, bit for bit
    assert any(not torch.equal(v, v.bfloat16().float()) for k, v in exported.items() if k.startswith(grafted))


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: torchrun starts its workers in sessions of their own, out of its group's reach."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def run_until(out: Path, sets: list[str], checkpoint: Path) -> None:
    """Start training and kill -9 the whole job (launcher and workers) once `checkpoint` is complete."""
    process = subprocess.Popen(command(out, sets), cwd=REPO, env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (checkpoint / "COMPLETE").is_file():
        if process.poll() is not None or time.time() > deadline:
            raise AssertionError(f"run ended or timed out before {checkpoint} was written")
        time.sleep(0.02)
    workers = descendants(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


@pytest.fixture(scope="module")
def teacher_shards(tmp_path_factory) -> Path:
    """32 image-text pairs generated by a tiny teacher into 8 shards, through the real generation CLI."""
    from data.generate import main as generate
    from data.prompt_generator import main as write_prompts

    folder = tmp_path_factory.mktemp("shards")
    write_prompts(["--n", "32", "--seed", "0", "--out", str(folder / "prompts.txt")])
    generate(["--tiny", "--prompts", str(folder / "prompts.txt"), "--out", str(folder / "shards"), "--height", "64",
              "--width", "64", "--steps", "2", "--shard-size", "4", "--batch-size", "4"])
    return folder / "shards"


def test_kill_and_resume_reproduces_an_uninterrupted_run(tmp_path, teacher_shards):
    """On teacher-generated shards: kill -9 in stage 1, resume, kill -9 in stage 2, resume. The exported weights
    are byte-equal to a run that was never interrupted (CPU, fp32, same world size), with stage 1 on a multistep
    schedule in epochs and per-student plateaus, and stage 2 on LoRA with its EMA sharded by ZeRO-2."""
    sets = ["data.source=shards", f"data.train={teacher_shards}", "stage1.select_on=train", "stage1.steps=100",
            "stage1.optim.schedule=multistep", "stage1.optim.milestone_unit=epochs", "stage1.optim.milestones=[2, 5]",
            "stage1.optim.plateau={patience: 0, threshold: 0.5}", "stage1.checkpoint_every=20",
            "stage1.eval_every=20", "stage2.steps=60", "stage2.checkpoint_every=10"]
    train(tmp_path / "straight", sets)
    killed = tmp_path / "killed"
    run_until(killed, sets, killed / "stage1" / "checkpoints" / "step00000020")
    assert not (killed / "stage1" / "DONE").exists()
    run_until(killed, sets, killed / "stage2" / "checkpoints" / "step00000010")
    assert (killed / "stage1" / "DONE").exists() and not (killed / "export").exists()
    train(killed, sets, ["--resume", "auto"])
    for name in ("export/model.safetensors", "stage1/best/blocks.1.attn.safetensors",
                 "stage1/best/blocks.3.attn.safetensors"):
        assert (killed / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    lrs = [row for row in read_metrics(killed / "stage1" / "metrics.jsonl") if "lr/blocks.1.attn" in row]
    assert lrs == [row for row in read_metrics(tmp_path / "straight" / "stage1" / "metrics.jsonl")
                   if "lr/blocks.1.attn" in row]
    assert min(row["lr/blocks.1.attn"] for row in lrs) < 2e-3 * 0.5 ** 2  # milestones and plateaus both acted
    kept = sorted(p.name for p in (killed / "stage2" / "checkpoints").glob("step*"))
    assert kept == ["step00000040", "step00000050", "step00000060"]  # keep-last-k
    assert (killed / "stage2" / "checkpoints" / "step00000060" / "zero_to_fp32.py").is_file()
    check_checkpoint_arithmetic(load_recipe(TINY, [f"output_dir={killed}", *sets]), killed)


def tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def check_checkpoint_arithmetic(recipe, out: Path) -> None:
    """recipes.checkpoint_size's arithmetic on the tiny run's files: the tensors they hold weigh what it says (the
    trained parameters only, their optimizer state, the EMA shards), the files little more."""
    for stage in (1, 2):
        folder = sorted((out / f"stage{stage}" / "checkpoints").glob("step*"))[-1]
        files = [torch.load(f, map_location="cpu", weights_only=False) for f in sorted(folder.glob("*.pt"))]
        predicted = checkpoint_bytes(recipe, stage)
        assert predicted.tensors <= sum(tensor_bytes(f) for f in files) <= predicted.tensors + 1024, stage
        on_disk = sum(f.stat().st_size for f in folder.iterdir())
        assert predicted.total <= on_disk <= predicted.total + 64_000 * len(files), (stage, on_disk, predicted)
    module = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert module and all("lora_" in k or k.startswith(("blocks.1.attn.", "blocks.3.attn.")) for k in module)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    result = train(tmp_path, ["stage1.steps=20", "stage2.optim.lr=1e12", "stage2.steps=50",
                              "stage2.checkpoint_every=1"], check=False)
    assert result.returncode != 0
    assert "NonFiniteLossError" in result.stderr and "non-finite loss at step" in result.stderr
    assert "synthetic-" in result.stderr  # the offending samples are named
    checkpoints = sorted((tmp_path / "stage2" / "checkpoints").glob("step*"))
    assert checkpoints and all((c / "COMPLETE").is_file() for c in checkpoints)
    staging = tmp_path / "stage2" / "checkpoints" / ".staging"
    assert not staging.exists() or not list(staging.iterdir())
    assert not (tmp_path / "export").exists()
