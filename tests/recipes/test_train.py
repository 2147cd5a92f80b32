"""The engine end to end on 2 CPU processes (gloo): distillation, ZeRO-2/3 finetuning, kill -9 and exact resume,
non-finite losses. Each test launches `torchrun -m recipes.train` as a user would."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest
import torch

from models.operators.hyena import HyenaX
from models.pixart import PixArtSigma
from models.weights import load_torch
from recipes.checkpoint_size import checkpoint_bytes
from recipes.config import load_recipe
from recipes.distributed import free_port
from recipes.reporting import read_metrics
from recipes.run_lock import LOCK_FILE, Holder
from tests.conftest import REPO
from tests.recipes.test_checkpoints import craft

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
    name, exported = "blocks.1.attn.in_proj.weight", model.state_dict()["blocks.1.attn.in_proj.weight"]
    assert torch.equal(exported, saved_ema(tmp_path, name, exported.shape))
    stage2 = losses(tmp_path / "stage2" / "metrics.jsonl")
    assert stage2[-1] < stage2[0]


def saved_ema(out: Path, name: str, shape: torch.Size, ranks: int = 2) -> torch.Tensor:
    """Parameter `name`'s EMA in stage 2's last checkpoint, put together from each rank's ZeRO partition."""
    last = sorted((out / "stage2" / "checkpoints").glob("step*"))[-1]
    ema = torch.full((shape.numel(),), float("nan"))
    for rank in range(ranks):
        shards = load_torch(last / f"extra_rank{rank}.pt")["stage"]["ema"]
        if name in shards["values"]:
            values = shards["values"][name]
            ema[shards["starts"][name]:shards["starts"][name] + values.numel()] = values
    return ema.view(shape)


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


def test_zero_finetuning_steps_export_the_stage1_graft_as_it_is(tmp_path):
    """stage2.steps=0, the stage-1-only ablation: the export is the teacher with its best stage-1 students in
    place, bit for bit (2 ranks, ZeRO-2, LoRA and EMA as the tiny recipe has them)."""
    from models.weights import read_state_dict
    from recipes.builders import build_teacher

    train(tmp_path, ["stage1.steps=10", "stage2.steps=0"])
    grafted = ("blocks.1.attn", "blocks.3.attn")
    teacher = build_teacher(load_recipe(TINY, [f"output_dir={tmp_path}"])).state_dict()
    expected = {k: v for k, v in teacher.items() if not k.startswith(grafted)}
    for block in grafted:
        student = read_state_dict(tmp_path / "stage1" / "best" / f"{block}.safetensors")
        expected |= {f"{block}.{k}": v for k, v in student.items()}
    exported = read_state_dict(tmp_path / "export" / "model.safetensors")
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)


def kill_all(processes: list[psutil.Process]) -> list[psutil.Process]:
    """SIGKILL every process of a tree (torchrun starts each worker in a session of its own, so killing a process
    group is not enough); returns the processes still running 10 s later."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    return still_running(processes, 10)


def still_running(processes: list[psutil.Process], within: float) -> list[psutil.Process]:
    """The processes not gone (ended or a zombie) after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        alive = []
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                if process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def run_until(out: Path, sets: list[str], checkpoint: Path, launcher_only: bool = False) -> None:
    """Start training and kill -9 it once `checkpoint` is complete: its whole process tree, or only the launcher
    (torchrun), whose workers must then end by themselves within seconds. Nothing may be left running."""
    process = subprocess.Popen(command(out, sets), cwd=REPO, env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    launcher = psutil.Process(process.pid)
    tree = [launcher]
    try:
        deadline = time.time() + 600
        while not (checkpoint / "COMPLETE").is_file():
            if process.poll() is not None or time.time() > deadline:
                raise AssertionError(f"run ended or timed out before {checkpoint} was written")
            time.sleep(0.02)
        workers = launcher.children(recursive=True)
        tree += workers
        assert len(workers) >= 2, workers
        if launcher_only:
            launcher.kill()
            process.wait()
            left = still_running(workers, 5)
            assert not left, f"workers outlived their killed launcher: {left}"
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            tree += [p for p in launcher.children(recursive=True) if p not in tree]
        left = kill_all(tree)
        process.wait()
    assert not left, f"still running after kill -9 of the whole tree: {left}"


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
    """On teacher-generated shards: kill -9 of the launcher in stage 1 (its workers, and their reader workers,
    end with it), resume, kill -9 of everything in stage 2, resume. The exported weights are byte-equal to a run
    that was never interrupted (CPU, fp32, same world size), with stage 1 on a multistep schedule in epochs and
    per-student plateaus, and stage 2 on LoRA with its EMA sharded by ZeRO-2."""
    sets = ["data.source=shards", f"data.train={teacher_shards}", "stage1.select_on=train", "stage1.steps=100",
            "stage1.optim.schedule=multistep", "stage1.optim.milestone_unit=epochs", "stage1.optim.milestones=[2, 5]",
            "stage1.optim.plateau={patience: 0, threshold: 0.5}", "stage1.checkpoint_every=20",
            "stage1.eval_every=20", "stage2.steps=60", "stage2.checkpoint_every=10"]
    train(tmp_path / "straight", sets)
    killed = tmp_path / "killed"
    run_until(killed, sets, killed / "stage1" / "checkpoints" / "step00000020", launcher_only=True)
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
    from recipes.deepspeed_loading import DEEPSPEED_RECORDS

    for stage in (1, 2):
        folder = sorted((out / f"stage{stage}" / "checkpoints").glob("step*"))[-1]
        files = [load_torch(f, allowed=DEEPSPEED_RECORDS) for f in sorted(folder.glob("*.pt"))]
        predicted = checkpoint_bytes(recipe, stage)
        assert predicted.tensors <= sum(tensor_bytes(f) for f in files) <= predicted.tensors + 1024, stage
        on_disk = sum(f.stat().st_size for f in folder.iterdir())
        assert predicted.total <= on_disk <= predicted.total + 64_000 * len(files), (stage, on_disk, predicted)
    module = load_torch(folder / "mp_rank_00_model_states.pt", allowed=DEEPSPEED_RECORDS)["module"]
    assert module and all("lora_" in k or k.startswith(("blocks.1.attn.", "blocks.3.attn.")) for k in module)


def test_non_finite_training_stops_and_keeps_only_good_checkpoints(tmp_path):
    """lr 1e12: the weights blow up. The run stops (at a NaN loss, or at a checkpoint whose weights are not
    finite or give a non-finite loss), names the last good checkpoint, and every checkpoint left is finite."""
    result = train(tmp_path, ["stage1.steps=20", "stage2.optim.lr=1e12", "stage2.steps=50",
                              "stage2.checkpoint_every=1"], check=False)
    assert result.returncode != 0
    assert re.search(r"NonFinite(Loss|Weights)Error: stage2: (non-finite loss at step|after step) \d+",
                     result.stderr), result.stderr[-3000:]
    assert "synthetic-" in result.stderr  # the offending samples are named
    checkpoints = sorted((tmp_path / "stage2" / "checkpoints").glob("step*"))
    named = re.search(r"last good checkpoint: (\S+)", result.stderr, re.IGNORECASE)[1]
    assert named == (str(checkpoints[-1]) if checkpoints else "None")
    for checkpoint in checkpoints:
        assert (checkpoint / "COMPLETE").is_file()
        states = load_torch(checkpoint / "mp_rank_00_model_states.pt")["module"]
        assert all(torch.isfinite(t).all() for t in states.values() if t.is_floating_point()), checkpoint
    staging = tmp_path / "stage2" / "checkpoints" / ".staging"
    assert not staging.exists() or not list(staging.iterdir())
    assert not (tmp_path / "export").exists()


def test_a_run_folder_keeps_its_settings_and_its_lock_and_refuses_crafted_checkpoints(tmp_path):
    """Killed in stage 1 at step 10. Then: a live job's lock refuses a second job; another lr is refused with a
    diff; a crafted DeepSpeed file in the checkpoint is refused unread; and with a torn metrics line and the lr
    change allowed, stage 1 finishes with the new lr from step 11 on, the change recorded."""
    sets = ["stage1.steps=20", "stage1.checkpoint_every=10", "stage1.eval_every=10", "stage1.log_every=1",
            "stage1.optim.warmup_steps=0"]
    checkpoint = tmp_path / "stage1" / "checkpoints" / "step00000010"
    run_until(tmp_path, sets, checkpoint)
    only_stage1 = ["--stage", "1"]

    (tmp_path / LOCK_FILE).write_text(json.dumps(asdict(Holder.me())))  # this test's process: a live job
    held = train(tmp_path, sets, only_stage1, check=False)
    assert held.returncode != 0 and f"is in use by {socket.gethostname()} pid {os.getpid()}" in held.stderr, \
        held.stderr[-2000:]
    (tmp_path / LOCK_FILE).unlink()

    changed = [*sets, "stage1.optim.lr=1e-3"]
    refused = train(tmp_path, changed, only_stage1, check=False)
    assert refused.returncode != 0, refused.stderr[-2000:]
    assert "Changed: stage1.optim.lr: 0.002 → 0.001" in refused.stderr and "--allow-change stage1.optim.lr" in \
        refused.stderr

    model_states = checkpoint / "mp_rank_00_model_states.pt"
    original = model_states.read_bytes()
    craft(model_states, tmp_path / "MARKER")
    crafted = train(tmp_path, sets, only_stage1, check=False)
    assert crafted.returncode != 0 and f"{model_states}: refused: it holds Python objects" in crafted.stderr
    assert not (tmp_path / "MARKER").exists()
    model_states.write_bytes(original)

    with open(tmp_path / "stage1" / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "train/lo')  # what a full disk leaves
    train(tmp_path, changed, [*only_stage1, "--allow-change", "stage1.optim.lr"])
    lr = {row["step"]: row["lr"] for row in read_metrics(tmp_path / "stage1" / "metrics.jsonl")}
    assert sorted(lr) == list(range(1, 21))
    assert [lr[s] for s in range(1, 21)] == pytest.approx([2e-3] * 10 + [1e-3] * 10)
    assert all(json.loads(line) for line in (tmp_path / "stage1" / "metrics.jsonl").read_text().splitlines())
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["changes"][0]["changed"] == {"stage1.optim.lr": {"from": 2e-3, "to": 1e-3}}
    assert record["recipe"]["stage1"]["optim"]["lr"] == 1e-3
    assert json.loads((tmp_path / "stage1" / "DONE").read_text())["run_id"] == record["run_id"]
    assert not (tmp_path / LOCK_FILE).exists()


def test_parallel_pairs_distil_finetune_and_export(tmp_path):
    """Depth 4 → 2 parallel pairs: stage 1 regresses each pair's residual update (the teacher's own blocks, summed,
    start at about 6% relative error on this tiny teacher), stage 2 finetunes the whole model, and the export
    reloads as fused pairs holding stage 2's EMA weights."""
    from models.parallel_blocks import ParallelPixArtPair

    train(tmp_path, ["stage1.steps=60", "stage2.steps=20", "stage2.log_every=5"],
          recipe=REPO / "recipes" / "tiny_pixart_parallel.yaml")
    stage1 = losses(tmp_path / "stage1" / "metrics.jsonl")
    assert stage1[-1] < stage1[0] / 2, stage1
    for path in ("blocks.0", "blocks.2"):
        info = json.loads((tmp_path / "stage1" / "best" / f"{path}.json").read_text())
        assert info["rel_err"] < 0.03 and info["loss"] == "l1", info
    assert all(math.isfinite(x) for x in losses(tmp_path / "stage2" / "metrics.jsonl"))
    model = PixArtSigma.from_pretrained(tmp_path / "export")
    assert len(model.blocks) == 2 and all(isinstance(b, ParallelPixArtPair) for b in model.blocks)
    assert model.blocks.indexes() == [0, 2]
    state = model.state_dict()
    assert all(torch.equal(state[k], saved_ema(tmp_path, k, state[k].shape))
               for k in ("blocks.0.merge.weight", "blocks.2.attn.qkv.weight"))
    d = model.config.hidden_size
    assert not torch.equal(state["blocks.0.merge.weight"], torch.eye(d).repeat(1, 2))  # trained, not the sum
