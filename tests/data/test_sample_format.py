"""The on-disk sample format: safetensors members read header-only, tensors read back bit-exactly from files."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from data.sample_format import SampleError, decode_tensors, encode_tensors, shard_sample, tensor_layout, valid_tokens
from data.shard_io import TensorRef


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def test_tensor_layout_locates_every_tensor_and_reads_back_bit_exact(tmp_path):
    tensors = {"latent": torch.randn(4, 5, 6).bfloat16(), "t5": torch.randn(3, 8).bfloat16(),
               "half": torch.randn(7).half(), "ids": torch.arange(5), "empty": torch.zeros(0, 3)}
    blob = save(tensors)
    path = tmp_path / "member.bin"
    path.write_bytes(b"x" * 123 + blob)  # the member sits at an offset inside a file, as in a tar
    layout = tensor_layout(blob)
    assert set(layout) == set(tensors)
    for name, tensor in tensors.items():
        dtype, shape, offset = layout[name]
        assert (dtype, shape) == (tensor.dtype, tuple(tensor.shape))
        out = torch.empty(shape, dtype=dtype)
        TensorRef(str(path), 123 + offset, dtype, shape).read_into(out)
        assert torch.equal(bits(out), bits(tensor))


def test_tensor_ref_casts_when_the_batch_dtype_differs(tmp_path):
    latent = torch.randn(4, 3, 3).bfloat16()
    path = tmp_path / "t.safetensors"
    path.write_bytes(save({"latent": latent}))
    dtype, shape, offset = tensor_layout(path.read_bytes())["latent"]
    out = torch.empty(shape, dtype=torch.float32)
    TensorRef(str(path), offset, dtype, shape).read_into(out)
    assert torch.equal(out, latent.float())


def test_tensor_ref_reports_a_shard_that_shrank(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(10))
    with pytest.raises(OSError, match="changed after it was indexed"):
        TensorRef(str(path), 0, torch.float32, (8,)).read_into(torch.empty(8))


@pytest.mark.parametrize("blob, message", [
    (b"\x01\x02", "not a safetensors file"),
    ((10**6).to_bytes(8, "little") + b"{}", "overruns"),
    ((5).to_bytes(8, "little") + b"nojsn", "malformed"),
    (len(b'{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}').to_bytes(8, "little")
     + b'{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}', "malformed"),
    (len(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}').to_bytes(8, "little")
     + b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}' + bytes(8), "does not fit"),
])
def test_malformed_tensor_members_are_sample_errors(blob, message):
    with pytest.raises(SampleError, match=message) as err:
        tensor_layout(blob)
    assert err.value.reason == "undecodable"


def test_encode_stores_floats_as_bf16_and_decodes():
    latent = torch.randn(4, 2, 2)
    decoded = decode_tensors(encode_tensors({"latent": latent, "ids": torch.arange(3)}))
    assert decoded["latent"].dtype == torch.bfloat16 and torch.equal(decoded["latent"], latent.bfloat16())
    assert torch.equal(decoded["ids"], torch.arange(3))


def test_shard_sample_members():
    sample = shard_sample(12, {"latent": torch.zeros(4, 2, 2)}, {"prompt": "a cat"}, caption="a cat", label=3,
                          image=b"png-bytes")
    assert sample["__key__"] == "000000012"
    assert set(sample) == {"__key__", "safetensors", "json", "txt", "cls", "png"}
    assert sample["cls"] == b"3" and sample["txt"] == b"a cat"


def test_valid_tokens_needs_a_prefix_mask():
    features = torch.randn(5, 2)
    assert torch.equal(valid_tokens(features, torch.tensor([1, 1, 1, 0, 0])), features[:3])
    for bad in ([0, 1, 1, 0, 0], [0, 0, 0, 0, 0]):
        with pytest.raises(ValueError, match="prefix"):
            valid_tokens(features, torch.tensor(bad))
