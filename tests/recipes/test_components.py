"""Engine components in one process: LoRA attach / merge, EMA, synthetic batches, activation taps."""
from __future__ import annotations

import json

import torch

from models.graft import GraftSpec
from models.pixart import PixArtSigma
from models.weights import read_state_dict
from recipes.batches import BatchSource, SyntheticBatches
from recipes.config import LoraSection, OptimSection
from recipes.ema import EMA
from recipes.engine import Engine, LocalEngine
from recipes.lora import attach_lora, merge_lora
from recipes.precision import Precision
from recipes.stage1 import ActivationTap, BestStudents, StudentBank, student_losses
from recipes.stage2 import drop_captions


def grafted_tiny() -> tuple[PixArtSigma, list[str]]:
    model = PixArtSigma(PixArtSigma.make_config("tiny", depth=4)).eval()
    spec = GraftSpec.from_dict({"grafts": [{"type": "mlp", "name": "mlp", "config": {"expansion_ratio": 3},
                                            "layers": {"indexes": [1]}}]})
    spec.apply(model)
    return model, sorted(spec.targets(model))


def inputs():
    return torch.randn(2, 4, 8, 8), torch.tensor([3.0, 600.0]), torch.randn(2, 16, 32), torch.ones(2, 16)


def test_lora_trains_adapters_and_grafted_operators_only_and_merges_exactly():
    model, grafted = grafted_tiny()
    adapted = attach_lora(model, LoraSection(rank=4, alpha=8), grafted)
    assert "blocks.0.mlp.fc1" in adapted and "blocks.1.mlp.fc1" not in adapted  # grafted MLP: no adapter
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias"} <= trainable
    assert all("lora_" in n or n.startswith("blocks.1.mlp.") for n in trainable)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # non-zero adapters, so merging matters
        x = inputs()
        before = model(*x)
        merged = merge_lora(model)
        assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
        assert torch.allclose(merged(*x), before, atol=1e-5)


def test_ema_follows_the_master_weights_in_one_fused_update():
    layer = torch.nn.Linear(2, 2)
    engine = LocalEngine(layer, OptimSection(), 10, 1, 0, Precision("fp32"), {"layer": list(layer.parameters())})
    ema = EMA(engine, layer, decay=0.5)
    start = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(2.0)
    ema.update()
    assert torch.allclose(ema.full_state_dict()["weight"], start + 1.0)
    other = EMA(engine, layer, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.full_state_dict()["weight"], ema.full_state_dict()["weight"])


def test_ema_warmup_ramps_the_decay_of_the_sharded_ema():
    layer = torch.nn.Linear(2, 2)
    engine = LocalEngine(layer, OptimSection(), 10, 1, 0, Precision("fp32"), {"layer": list(layer.parameters())})
    ema = EMA(engine, layer, decay=0.9999, warmup=True)
    start = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(11.0)
    ema.update(step=1)  # decay min(0.9999, 2 / 11): the EMA moves 9/11 of the way
    assert torch.allclose(ema.full_state_dict()["weight"], start + 9.0)
    assert ema.decay_at(10**6) == 0.9999


def test_synthetic_batches_resume_and_split_across_ranks():
    def source(rank=0, world=1):
        return SyntheticBatches("dit", (4, 2, 2), batch_size=2, num_samples=16, seed=3, rank=rank,
                                world_size=world, num_classes=10)

    assert isinstance(source(), BatchSource)
    straight = [b["keys"] for _, b in zip(range(12), source())]
    first = source()
    for _ in zip(range(5), first):
        pass
    resumed = source()
    resumed.load_state_dict(first.state_dict())
    assert [b["keys"] for _, b in zip(range(7), resumed)] == straight[5:]
    epoch = [k for r in range(2) for _, b in zip(range(4), source(r, 2)) for k in b["keys"]]
    assert sorted(epoch) == sorted(f"synthetic-{i}" for i in range(16))  # every sample once per epoch


def test_students_see_the_teachers_own_operator_inputs():
    """A student that is an exact copy of its teacher operator has zero stage-1 loss (teacher forcing)."""
    teacher = PixArtSigma(PixArtSigma.make_config("tiny", depth=4)).eval()
    spec = GraftSpec.from_dict({"grafts": [{"type": "mha", "name": "mha", "config": {"num_heads": 4,
                                                                                   "qkv_bias": True},
                                            "layers": {"indexes": [2]}}]})
    students = spec.build_operators(teacher)
    students["blocks.2.attn"].load_state_dict(teacher.blocks[2].attn.state_dict())
    tap = ActivationTap(teacher, ["blocks.2.attn"])
    with torch.no_grad():
        teacher(*inputs())
        records = tap.take()
        losses, _ = student_losses(StudentBank(students, spec.targets(teacher)), records, {"blocks.2.attn": "l1"},
                                   1.0)
    assert records["blocks.2.attn"][1] == (4, 4)
    assert losses["blocks.2.attn"].item() < 1e-6


def test_best_students_keep_each_layers_lowest_error_and_resume(tmp_path):
    teacher = PixArtSigma(PixArtSigma.make_config("tiny", depth=4)).eval()
    spec = GraftSpec.from_dict({"grafts": [{"type": "mlp", "name": "mlp", "config": {"expansion_ratio": 2},
                                            "layers": {"indexes": [1, 3]}}]})
    grafts = spec.targets(teacher)
    bank = StudentBank(spec.build_operators(teacher), grafts)
    engine = LocalEngine(bank, OptimSection(), 10, 1, 0, Precision("fp32"), bank.param_groups())
    assert isinstance(engine, Engine)
    losses = {"blocks.1.mlp": "l2", "blocks.3.mlp": "l2"}
    best = BestStudents(tmp_path / "best", grafts, losses, writes=True)
    assert best.update(10, {"blocks.1.mlp": 0.5, "blocks.3.mlp": 0.4}) == ["blocks.1.mlp", "blocks.3.mlp"]
    assert best.update(20, {"blocks.1.mlp": 0.3, "blocks.3.mlp": 0.6}) == ["blocks.1.mlp"]
    best.save(engine, bank, ["blocks.1.mlp"])
    saved = read_state_dict(tmp_path / "best" / "blocks.1.mlp.safetensors")
    assert saved.keys() == bank.students["blocks_1_mlp"].state_dict().keys()
    record = json.loads((tmp_path / "best" / "blocks.1.mlp.json").read_text())
    assert (record["rel_err"], record["step"], record["loss"]) == (0.3, 20, "l2")

    resumed = BestStudents(tmp_path / "best", grafts, losses, writes=True)
    resumed.load_state(json.loads(json.dumps(best.state())))
    assert resumed.update(30, {"blocks.1.mlp": 0.35, "blocks.3.mlp": 0.45}) == []
    assert resumed.update(40, {"blocks.1.mlp": 0.35, "blocks.3.mlp": 0.39}) == ["blocks.3.mlp"]

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 20, "train/blocks.1.mlp": 0.125}) + "\n")
    table = best.table([metrics]).splitlines()
    assert len(table) == 3 and "blocks.1.mlp" in table[2] and "0.125" in table[2] and "0.3" in table[2]


def test_dropped_captions_take_the_mask_the_recipe_chooses():
    text, mask = torch.randn(2, 4, 3), torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    null = (torch.randn(4, 3), torch.tensor([1, 0, 0, 0]))
    drop = torch.tensor([True, False])
    for convention, dropped_mask in (("own", null[1]), ("prompt", mask[0])):
        new_text, new_mask = drop_captions(text, mask, null, convention, drop)
        assert torch.equal(new_text[0], null[0]) and torch.equal(new_mask[0], dropped_mask)
        assert torch.equal(new_text[1], text[1]) and torch.equal(new_mask[1], mask[1])  # kept captions untouched


def test_stage2_model_starts_the_same_whatever_the_global_rng(tmp_path):
    """With a pretrained teacher, fresh operators and LoRA weights come from the recipe seed, not from the state of
    torch's default generator (seeded at random at start-up), so two stage-2 runs start from the same weights."""
    from recipes.config import load_recipe
    from recipes.stage2 import grafted_model
    from tests.conftest import REPO

    PixArtSigma(PixArtSigma.make_config("tiny", depth=4)).save_diffusers(tmp_path / "teacher")
    recipe = load_recipe(REPO / "recipes" / "tiny_pixart_hyena_x.yaml", [f"model.pretrained={tmp_path / 'teacher'}"])
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(grafted_model(recipe, students_dir=None).state_dict())
    assert states[0].keys() == states[1].keys() and any("lora_A" in k for k in states[0])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
