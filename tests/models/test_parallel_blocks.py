"""Parallel pairs (depth-to-width restructuring): the fused block equals the two-branch computation, its weights are the
teacher's blocks stacked, the graft spec validates, exports, reloads and counts FLOPs."""
from __future__ import annotations

import copy

import pytest
import torch

from common.config import ConfigError
from eval.flops import meta_forward_flops, meta_model, pixart_forward_flops
from models.dit import DiT
from models.graft import GraftSpec
from models.operators.hyena import HyenaX
from models.parallel_blocks import ParallelDiTPair, ParallelPixArtPair, pair_from_blocks, unfused_pairs
from models.pixart import PixArtSigma
from tests.conftest import max_rel_err

PAIRS = {"type": "blocks", "name": "parallel_pair", "layers": {"ratio": 1.0}}


def spec(*grafts) -> GraftSpec:
    return GraftSpec.from_dict({"grafts": list(grafts)})


def tiny(family: str, depth: int = 4):
    if family == "pixart":
        model = PixArtSigma(PixArtSigma.make_config("tiny", depth=depth)).eval()
        mask = (torch.arange(16) < torch.tensor([[5], [16]])).long()  # a partial caption mask
        return model, (torch.randn(2, 4, 8, 12), torch.tensor([3.0, 600.0]), torch.randn(2, 16, 32), mask)
    model = DiT(DiT.make_config("tiny", depth=depth)).eval()
    return model, (torch.randn(2, 4, 8, 8), torch.tensor([3.0, 600.0]), torch.tensor([1, 7]))


def randomize_merges(model) -> None:
    """Merge weights away from [I, I] (and non-zero scale tables / gates), so every term matters."""
    with torch.no_grad():
        for block in model.blocks:
            block.merge.weight.normal_(0, 0.3)
            block.merge.bias.normal_()


@pytest.mark.parametrize("family", ["pixart", "dit"])
def test_fused_pairs_equal_the_two_branch_computation_forward_and_backward(family):
    """One fused block per pair computes x + merge(concat(a(x) − x, b(x) − x)) of the teacher's own blocks, and its
    gradients are the two blocks' gradients stacked (fp32, ≤ 1e-5)."""
    teacher, inputs = tiny(family)
    with torch.no_grad():  # DiT's adaLN-Zero starts at zero gates: make every branch term count
        for block in teacher.blocks:
            for p in block.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    fused = copy.deepcopy(teacher)
    spec(PAIRS).apply(fused)
    assert len(fused.blocks) == 2 and fused.blocks.indexes() == [0, 2]
    assert isinstance(fused.blocks[0], ParallelPixArtPair if family == "pixart" else ParallelDiTPair)
    randomize_merges(fused)
    reference = unfused_pairs(teacher, fused)  # UnfusedPair: the teacher's two blocks on x, then the same merge
    out, ref = fused(*inputs), reference(*inputs)
    assert max_rel_err(out, ref) <= 1e-5
    (out.square().mean()).backward()
    (ref.square().mean()).backward()
    for first, pair in zip([0, 2], fused.blocks):
        branches = reference.blocks[first].branches
        for name, grad in ((n, p.grad) for n, p in pair.named_parameters() if not n.startswith("merge.")):
            stacked = torch.stack([b.get_parameter(name).grad for b in branches])
            assert max_rel_err(grad, stacked) <= 1e-5, name
        assert max_rel_err(pair.merge.weight.grad, reference.blocks[first].merge.weight.grad) <= 1e-5


@pytest.mark.parametrize("family", ["pixart", "dit"])
def test_a_fresh_pair_sums_the_two_updates_and_stacks_the_teachers_tensors(family):
    teacher, inputs = tiny(family)
    a, b = teacher.blocks[2], teacher.blocks[3]
    pair = pair_from_blocks(a, b)
    d = teacher.config.hidden_size
    assert torch.equal(pair.merge.weight, torch.cat([torch.eye(d), torch.eye(d)], 1))
    assert not pair.merge.bias.any()
    for key, tensor in pair.state_dict().items():  # the documented layout: [k] is block (2 + k)'s tensor
        if not key.startswith("merge."):
            assert torch.equal(tensor[0], a.state_dict()[key]) and torch.equal(tensor[1], b.state_dict()[key]), key
    x = torch.randn(2, 16, d)
    args = (torch.randn(2, 16, d), inputs[3], torch.randn(2, 6 * d), (4, 4)) if family == "pixart" else \
        (torch.randn(2, d), (4, 4))
    with torch.no_grad():
        expected = x + (a(x, *args) - x) + (b(x, *args) - x)
        assert max_rel_err(pair(x, *args), expected) <= 1e-5
        assert max_rel_err(pair.update(x, *args), expected - x) <= 1e-5
    with torch.no_grad():  # the pair holds copies: training it leaves the teacher alone
        pair.attn.qkv.weight.add_(1.0)
    assert not torch.equal(pair.attn.qkv.weight[0], a.attn.qkv.weight)


def test_restructured_model_exports_reloads_and_mixes_with_operator_grafts(tmp_path):
    """Pairs (0, 1) and (2, 3) of a depth-6 PixArt-Sigma beside Hyena-X in block 5: graft.yaml + weights reload to the
    same outputs, through our loader and the diffusers wrapper."""
    from models.diffusers_transformers import GraftedPixArtTransformer2DModel

    model, inputs = tiny("pixart", depth=6)
    spec({**PAIRS, "layers": {"indexes": [0, 1, 2, 3]}},
         {"type": "mha", "name": "hyena_x", "config": {}, "layers": {"indexes": [5]}}).apply(model)
    assert model.blocks.indexes() == [0, 2, 4, 5] and isinstance(model.blocks[5].attn, HyenaX)
    with torch.no_grad():
        model.blocks[2].merge.weight.normal_(0, 0.3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "graft.yaml").read_text().startswith("grafts:\n- type: blocks\n  name: parallel_pair\n")
    reloaded = PixArtSigma.from_pretrained(tmp_path)
    wrapped = GraftedPixArtTransformer2DModel.from_pretrained(tmp_path)
    with torch.no_grad():
        out = model(*inputs)
        assert torch.equal(reloaded(*inputs), out)
        latents, t, captions, mask = inputs
        assert torch.equal(wrapped(latents, captions, t, encoder_attention_mask=mask, return_dict=False)[0], out)
    assert sorted(reloaded.graft.targets(reloaded)) == ["blocks.0", "blocks.2", "blocks.5.attn"]


def test_gradient_checkpointing_of_pairs_gives_the_same_gradients():
    model, inputs = tiny("dit")
    spec(PAIRS).apply(model)
    model.train()
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(0)
        model(*inputs).square().mean().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("grafts, message", [
    ([{**PAIRS, "layers": {"indexes": [0, 1, 2]}}], "3 blocks selected; parallel pairs need an even number"),
    ([{**PAIRS, "layers": {"indexes": [0, 2]}}], "blocks 0 and 2 would be paired but are not consecutive"),
    ([{**PAIRS, "layers": {"indexes": [0, 1]}}, {**PAIRS, "layers": {"indexes": [1, 2]}}],
     r"grafts\[1\]: block 1 is already in a parallel pair of grafts\[0\]"),
    ([{**PAIRS, "layers": {"indexes": [0, 1]}}, {"type": "mlp", "name": "mlp", "config": {"expansion_ratio": 2},
                                                "layers": {"indexes": [1]}}],
     r"grafts\[1\]: block 1 is in a parallel pair of grafts\[0\]; operator grafts and parallel pairs must touch"),
])
def test_bad_pairings_are_named(grafts, message):
    model, _ = tiny("pixart")
    with pytest.raises(ConfigError, match=message):
        spec(*grafts).apply(model)


def test_pair_spec_errors_and_odd_depth():
    with pytest.raises(ConfigError, match="type blocks takes name one of"):
        spec({**PAIRS, "name": "triple"})
    with pytest.raises(ConfigError, match="takes no config"):
        spec({**PAIRS, "config": {"merge": "sum"}})
    with pytest.raises(ConfigError, match=r"type must be one of \['blocks', 'mha', 'mlp'\]"):
        spec({**PAIRS, "type": "block", "config": {}})
    model, _ = tiny("dit", depth=3)
    with pytest.raises(ConfigError, match="the model's depth 3 is odd"):
        spec(PAIRS).apply(model)
    spec({**PAIRS, "layers": {"indexes": [1, 2]}}).apply(model)  # any consecutive pair, the rest stays sequential
    assert model.blocks.indexes() == [0, 1]


def test_blocks_with_qk_norm_have_no_fused_form():
    model = PixArtSigma(PixArtSigma.make_config("tiny", depth=2, qk_norm=True))
    with pytest.raises(ConfigError, match="qk-norm"):
        spec(PAIRS).apply(model)


def test_dit_xl2_halves_to_14_blocks_and_pixart_flops_match_the_meta_counter():
    """On the meta device: DiT-XL/2 restructured has 14 sequential blocks and ≈ 6% more parameters (the paper's +6%);
    PixArt-Sigma 2K's analytic FLOPs equal torch's counter, the pairs adding only the merge projections."""
    with torch.device("meta"):
        dit = DiT(DiT.make_config("DiT-XL/2"))
    before = sum(p.numel() for p in dit.parameters())
    spec(PAIRS).apply(dit)
    assert len(dit.blocks) == 14 and dit.blocks.indexes() == list(range(0, 28, 2))
    added = sum(p.numel() for p in dit.parameters()) - before
    assert added == 14 * (2 * 1152 * 1152 + 1152) and 0.055 < added / before < 0.065
    config = PixArtSigma.make_config("PixArt-Sigma-XL-2-2K-MS")
    pairs = spec(PAIRS)
    base, paired = (pixart_forward_flops(config, 2, (128, 128), 300, g) for g in (None, pairs))
    assert paired["total"] == meta_forward_flops(config, 2, (128, 128), 300, pairs)
    assert paired["merge"] == 2 * 14 * 2 * 128 * 128 * 2 * 1152 * 1152
    assert paired["total"] - paired["merge"] == base["total"]
    assert len(meta_model(config, pairs).blocks) == 14
