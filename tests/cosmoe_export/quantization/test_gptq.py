"""GPTQ (cosmoe_export/quantization/gptq.py) against round-to-nearest, where the two must agree."""

from __future__ import annotations

import pytest
import torch

from cosmoe_export.quantization import gptq
from runtime_py import quant


@pytest.mark.parametrize("scheme,group,shape", [("int4", 32, (16, 96)), ("int4", 32, (8, 48)),
                                                ("int4", 128, (8, 256)), ("int8", 32, (16, 200))])
def test_identity_hessian_is_round_to_nearest_bit_for_bit(scheme, group, shape):
    """With H = I no column's error moves any other column (H^-1 is diagonal), so GPTQ must pick
    exactly the codes and scales round-to-nearest picks: the same bytes."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1]))
    enc = quant.choose_encoding(scheme, shape, group, "float32")
    want_codes, want_scales = quant.quantize(w, enc)
    codes, scales = gptq.gptq_quantize(w, gptq.inverse_factor(torch.eye(shape[1], dtype=torch.float64)), enc)
    assert torch.equal(scales, want_scales)
    assert torch.equal(codes, want_codes)


def test_correlated_inputs_move_codes_and_lower_the_output_error():
    """The opposite check: on correlated inputs GPTQ must differ from round-to-nearest and do better
    on the layer's output (what it minimises), or the identity test above proves nothing."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.1 * torch.randn(512, 64, generator=g)
    enc = quant.choose_encoding("int4", (16, 64), 32, "float32")
    rtn = quant.dequantize(*quant.quantize(w, enc), enc, 64)
    opt = quant.dequantize(*gptq.gptq_quantize(w, gptq.inverse_factor(gptq.hessian(x)), enc), enc, 64)
    assert not torch.equal(rtn, opt)
    assert (x @ (opt - w).t()).pow(2).sum() < 0.8 * (x @ (rtn - w).t()).pow(2).sum()


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int8", 32)])
def test_rows_rounded_in_pieces_give_the_bytes_of_rounding_them_at_once(monkeypatch, scheme, group):
    """gptq_quantize rounds ROWS rows at a time (an output head's float64 copy would not fit): rows
    never interact, so the pieces must give exactly the codes and scales of one pass over all rows."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 64, generator=g)
    x = torch.randn(256, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.1 * torch.randn(256, 64, generator=g)
    enc = quant.choose_encoding(scheme, (40, 64), group, "float32")
    hinv = gptq.inverse_factor(gptq.hessian(x))
    whole = gptq.gptq_quantize(w, hinv, enc)
    monkeypatch.setattr(gptq, "ROWS", 16)  # 16 + 16 + 8
    pieces = gptq.gptq_quantize(w, hinv, enc)
    assert torch.equal(whole[0], pieces[0]) and torch.equal(whole[1], pieces[1])
