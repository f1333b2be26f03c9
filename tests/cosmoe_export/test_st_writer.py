"""The streaming writer's bytes are pinned: equal to safetensors' own, and to a golden header."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save

from cosmoe_export.st_writer import SafetensorsWriter


def write(path, tensors, metadata=None):
    w = SafetensorsWriter(path, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, metadata)
    for name in w.order:
        w.write(name, tensors[name])
    sha = w.close()
    return path.read_bytes(), sha


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_same_bytes_as_safetensors(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=g).to(dtype) for n, s in
               [("layers.10.w", (3, 5)), ("layers.2.w", (7,)), ("embed", (4, 2, 2)), ("scalar", ())]}
    data, sha = write(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    assert data == save(tensors, metadata={"format": "pt"})
    assert sha == hashlib.sha256(data).hexdigest()


def test_golden_header(tmp_path):
    data, _ = write(tmp_path / "g.safetensors", {"b": torch.ones(2), "a": torch.zeros(1, 1, dtype=torch.bfloat16)},
                    {"format": "pt"})
    header = b'{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},' \
             b'"a":{"dtype":"BF16","shape":[1,1],"data_offsets":[8,10]}}'
    header += b" " * ((8 - len(header) % 8) % 8)
    assert data[:8] == len(header).to_bytes(8, "little")
    assert data[8:8 + len(header)] == header
    assert data[8 + len(header):] == b"\x00\x00\x80\x3f" * 2 + b"\x00\x00"


def test_refuses_overwrite_and_wrong_tensor(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"")
    with pytest.raises(FileExistsError):
        SafetensorsWriter(p, {"a": (torch.float32, (1,))})
    w = SafetensorsWriter(tmp_path / "y.safetensors", {"a": (torch.float32, (2,))})
    with pytest.raises(RuntimeError, match="header says"):
        w.write("a", torch.zeros(3))
    w.abort()
