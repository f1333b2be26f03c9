"""The PyTorch backend's integer linears (runtime_py/qlinear.py) and a quantized bundle run on them.

Reference: the same stored integers dequantized to fp32 (runtime_py.quant.dequantize, exact) and
multiplied in fp32. The kernels take bf16 activations and return bf16, so they may differ by that
rounding (a few 1e-3 relative), never more.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from cosmoe_export.cli import cli
from cosmoe_export.reference import TorchRuntime
from runtime_py import quant
from runtime_py.bundle import Bundle
from runtime_py.errors import ConfigError
from runtime_py.qlinear import ExactLinear, Int4Linear, Int8Linear, QuantEmbedding, kernel_for
from runtime_py.runner import Runner
from runtime_py.torch_engine import TorchEngine

BF16_REL = 1e-2  # two bf16 roundings (input and output) on a K-term dot product


def _quantized(n: int, k: int, scheme: str, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k ** -0.5  # [N, K]
    enc = quant.choose_encoding(scheme, (n, k), group, "float32")
    stored, scale = quant.quantize(w, enc)
    return stored, scale, enc, quant.dequantize(stored, scale, enc, k)  # W exact in fp32 [N, K]


def _tensor_bytes(module) -> int:
    """Bytes the module keeps alive: whole storages (a view into a larger buffer holds all of it)."""
    return sum(t.untyped_storage().nbytes() for t in vars(module).values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("scheme,n,k,group", [
    ("int8", 64, 128, 32), ("int8", 1280, 432, 32), ("int8", 8, 48, 32),
    ("int4", 64, 128, 32), ("int4", 1280, 432, 32), ("int4", 432, 1280, 64), ("int4", 96, 200, 128),
])
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_integer_linear_matches_the_dequantized_product(scheme, n, k, group, tokens):
    stored, scale, enc, w = _quantized(n, k, scheme, group)
    kernel = kernel_for((n, k), enc)
    layer = kernel.build(stored, scale, enc, k)
    assert isinstance(layer, Int8Linear if scheme == "int8" else Int4Linear)
    assert kernel.resident_bytes((n, k), enc) == _tensor_bytes(layer)
    x = torch.randn(1, tokens, k, generator=torch.Generator().manual_seed(1))  # [B, T, K]
    want = x @ w.T  # [B, T, N] fp32
    got = layer(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() <= BF16_REL * want.abs().max()


def test_short_last_group_is_padded_with_zeros_not_garbage():
    """K = 432 at G = 32: 13 groups of 32 and one of 16. Padding must add nothing to y, even when
    the padded columns of x would be large (they are zeros by construction, not x's memory)."""
    stored, scale, enc, w = _quantized(64, 432, "int4", 32)
    layer = kernel_for((64, 432), enc).build(stored, scale, enc, 432)
    assert layer.pad == 16
    x = torch.zeros(1, 432)
    x[0, -1] = 1.0  # only the last real input: y is W's last column
    got = layer(x)[0]
    assert (got - w[:, -1]).abs().max() <= 1e-2 * w[:, -1].abs().max()


def test_shapes_without_a_kernel_fall_back_to_dequantizing():
    enc4 = quant.choose_encoding("int4", (8, 64), 32, "float32")
    assert kernel_for((8, 64), enc4) is None  # int4 kernel needs N % 16 == 0 (a router-sized matrix)
    assert kernel_for((64, 64), quant.float_encoding("float32")) is None
    assert kernel_for((64,), enc4) is None
    # torch's int8 kernel is wrong, or crashes, when K is not a multiple of 16
    assert kernel_for((8, 24), quant.choose_encoding("int8", (8, 24), 32, "float32")) is None


@pytest.fixture(scope="module")
def quantized_bundles(tiny_bles_bundle, tmp_path_factory):
    """tiny-bles with int4 experts + int8 backbone, and with mixed int4/int8 experts."""
    out = tmp_path_factory.mktemp("qlinear")
    paths = {}
    for name, args in {"q4": ["--expert-scheme", "int4", "--backbone-scheme", "int8"],
                       "q4-backbone": ["--expert-scheme", "int8", "--backbone-scheme", "int4"]}.items():
        paths[name] = out / name
        r = CliRunner().invoke(cli, ["-q", "quantize", str(tiny_bles_bundle), "-o", str(paths[name]), *args])
        assert r.exit_code == 0, r.output
    return paths


@pytest.mark.parametrize("which", ["q4", "q4-backbone"])
def test_runner_keeps_integers_and_matches_the_dequantized_model(quantized_bundles, which):
    bundle = Bundle.open(quantized_bundles[which])
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 7, 61, 2, 300, 12]])
    want = TorchRuntime(bundle).logits(ids)  # the exporter's exact reference: dequantized fp32
    with Runner(bundle, experts_per_layer=4) as r:
        model = r.engine.model
        assert isinstance(model.embed, QuantEmbedding)
        assert isinstance(model.layers[0].attn.q, (Int8Linear, Int4Linear))
        assert isinstance(model.lm_head, (Int8Linear, Int4Linear))  # tied head on the embedding's integers
        got = r.logits(ids)
        assert (got - want).abs().max() <= 0.03 * want.abs().max()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
        gen = r.generate(ids[0].tolist(), 24)
        slot = r.store.get(1, 3)
        assert all(isinstance(getattr(slot.module, m), (Int8Linear, Int4Linear)) for m in ("gate", "up", "down"))
        assert sum(_tensor_bytes(getattr(slot.module, m)) for m in ("gate", "up", "down")) == r.expert_unit_bytes
    assert len(gen.tokens) == 24
    # The integers are what is resident: far below the float experts and backbone.
    floats = TorchEngine(bundle, dispatch=r._dispatch)  # measured, never run
    assert r.expert_unit_bytes * 3 < floats.unit_bytes
    assert r.engine.backbone_bytes * 2 < floats.backbone_bytes


@pytest.mark.parametrize("which", ["q4", "q4-backbone"])
def test_fp32_activations_run_the_bundle_math_bit_for_bit(quantized_bundles, which):
    """torch_activations="fp32": the integers stay resident and every product is the exporter's
    reference's (same dequantized weights, same fp32 product), so the logits are equal, not close."""
    bundle = Bundle.open(quantized_bundles[which])
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 7, 61, 2, 300, 12]])
    want = TorchRuntime(bundle).logits(ids)
    with Runner(bundle, experts_per_layer=4, torch_activations="fp32") as r:
        assert isinstance(r.engine.model.layers[0].attn.q, ExactLinear)
        assert isinstance(r.engine.model.lm_head, ExactLinear)
        assert torch.equal(r.logits(ids), want)
        r.generate(ids[0].tolist(), 4)
        slot = r.store.get(1, 3)
        assert all(isinstance(getattr(slot.module, m), ExactLinear) for m in ("gate", "up", "down"))
        assert sum(_tensor_bytes(getattr(slot.module, m)) for m in ("gate", "up", "down")) == r.expert_unit_bytes
    floats = TorchEngine(bundle, dispatch=r._dispatch)  # measured, never run
    assert r.expert_unit_bytes * 3 < floats.unit_bytes  # integers resident, as with the fast kernels
    with pytest.raises(ConfigError, match="unknown activations 'fp16'"):
        Runner(bundle, torch_activations="fp16")


@pytest.mark.parametrize("offset", [0, 1, 8, 16])
def test_int8_codes_anywhere_in_a_buffer(offset):
    """Codes viewed at any offset of a shard's bytes (the int8 kernel crashes on codes that are not
    16-byte aligned, several tokens at a time): the module keeps its own copy, never the buffer."""
    stored, scale, enc, w = _quantized(64, 64, "int8", 32)
    buf = torch.empty(stored.numel() + 128, dtype=torch.int8)
    start = -buf.data_ptr() % 64 + offset
    view = buf[start:start + stored.numel()].view(64, 64)
    view.copy_(stored)
    layer = kernel_for((64, 64), enc).build(view, scale, enc, 64)
    assert layer.codes.data_ptr() % 64 == 0 and layer.codes.untyped_storage().nbytes() == stored.numel()
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(2))  # [M, K], the crashing prefill
    want = x @ w.T
    assert (layer(x) - want).abs().max() <= BF16_REL * want.abs().max()
