"""runtime_py.quant: the quantized tensor layout, pinned bit by bit, and how readers treat it."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import torch
import torch.nn.functional as F

from runtime_py import format as fmt
from runtime_py import quant as Q
from runtime_py.errors import FormatError


def enc(scheme: str, shape: tuple[int, int], group: int = 32) -> Q.Encoding:
    return Q.choose_encoding(scheme, shape, group, "float32")


def bf16_bits(t: torch.Tensor) -> list[int]:
    return [int(v) & 0xFFFF for v in t.view(torch.int16).flatten()]


# ---- packed bytes, by hand ---------------------------------------------------------------------------
def test_int4_nibble_order_and_offset():
    codes = torch.tensor([[-8, 7, 0, -1], [1, 2, 3, 4]], dtype=torch.int8)
    packed = Q.SCHEMES["int4"].pack(codes)
    # u = code + 8; byte j = u[2j] | u[2j+1] << 4
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x00 | 0xF0, 0x08 | 0x70], [0x09 | 0xA0, 0x0B | 0xC0]]
    assert torch.equal(Q.SCHEMES["int4"].unpack(packed, 4), codes)


def test_int4_odd_k_pads_the_last_high_nibble_with_code_zero():
    codes = torch.tensor([[-8, 7, 5]], dtype=torch.int8)
    packed = Q.SCHEMES["int4"].pack(codes)
    assert packed.tolist() == [[0x00 | 0xF0, 0x0D | 0x80]]
    assert torch.equal(Q.SCHEMES["int4"].unpack(packed, 3), codes)


@pytest.mark.parametrize("n,k,g", [(16, 64, 32), (16, 432, 32), (7, 33, 32), (5, 31, 32), (4, 3, 32),
                                   (16, 100, 64), (64, 2048, 128)])
def test_int4_dequantize_equals_code_times_scale(n, k, g):
    """dequantize's weights are bit for bit the int8 codes times the bf16 scales (odd K, a short last
    group, K < G)."""
    gen = torch.Generator().manual_seed(n * k)
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)
    scale = torch.randn(n, -(-k // g), generator=gen).to(torch.bfloat16)
    enc = Q.Encoding("int4", 4, g, "bf16")
    want = codes.float().view(n, k) * scale.float().repeat_interleave(g, 1)[:, :k]
    got = Q.dequantize(Q._pack_int4(codes), scale, enc, k)
    assert got.is_contiguous() and torch.equal(got, want)
    assert torch.equal(got, Q.dequantize_codes(codes, scale, enc))
    assert torch.equal(Q.dequantize(Q._pack_int4(codes), scale, enc, k, torch.bfloat16), want.bfloat16())


def test_int4_quantize_extremes_and_golden_bytes():
    # amax 7.5 -> scale 7.5 / 7.5 = 1.0 exactly: -7.5 -> -8 (round half to even), 7 -> 7, +7.5 -> 8 -> 7
    w = torch.zeros(2, 32)
    w[0, :4] = torch.tensor([-7.5, 7.0, 0.0, -1.0])
    w[1, :2] = torch.tensor([7.5, -3.0])
    e = enc("int4", (2, 32))
    packed, scale = Q.quantize(w, e)
    assert packed.shape == (2, 16) and scale.shape == (2, 1) and scale.dtype == torch.bfloat16
    assert bf16_bits(scale) == [0x3F80, 0x3F80]  # 1.0
    assert packed[0, :2].tolist() == [0xF0, 0x78] and packed[0, 2:].tolist() == [0x88] * 14
    assert packed[1, 0].item() == (0xF | (5 << 4))  # +7.5 clamps to code 7 (u 15); -3 is u 5
    back = Q.dequantize(packed, scale, e, 32)
    assert back[0, :4].tolist() == [-8.0, 7.0, 0.0, -1.0]
    assert back[1, 0].item() == 7.0  # the positive extreme: off by half a step, no more


def test_int8_extremes_golden_bytes():
    w = torch.zeros(1, 8)
    w[0, :4] = torch.tensor([-127.0, 127.0, 0.0, 1.0])
    e = enc("int8", (1, 8))
    assert e.group_size == 8  # per output channel: one group is the whole row
    codes, scale = Q.quantize(w, e)
    assert codes.dtype == torch.int8 and scale.shape == (1, 1)
    assert bf16_bits(scale) == [0x3F80]
    assert [int(b) & 0xFF for b in codes[0, :4]] == [0x81, 0x7F, 0x00, 0x01]  # two's complement
    assert codes.min() >= -127  # -128 is never written


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_all_zero_rows_get_scale_one_and_decode_to_zero(scheme):
    w = torch.zeros(3, 64)
    w[1] = torch.linspace(-1, 1, 64)
    e = enc(scheme, (3, 64))
    stored, scale = Q.quantize(w, e)
    assert bf16_bits(scale[0]) == [0x3F80] * scale.shape[1]
    assert torch.isfinite(scale.float()).all() and (scale.float() > 0).all()
    back = Q.dequantize(stored, scale, e, 64)
    assert torch.equal(back[0], torch.zeros(64)) and torch.equal(back[2], torch.zeros(64))
    if scheme == "int4":
        assert stored[0].tolist() == [0x88] * 32


def test_scale_rounds_up_to_the_next_bf16():
    # amax / 127 = 1.001 / 127 is not a bf16: the stored scale is the next bf16 above it, so
    # |w| / scale <= 127 and no weight clips.
    w = torch.tensor([[1.001, -0.3, 0.2, 0.0]])
    e = enc("int8", (1, 4))
    codes, scale = Q.quantize(w, e)
    want = 1.001 / 127
    s = scale.float().item()
    assert s >= want and torch.tensor(s, dtype=torch.bfloat16).item() == s
    below = torch.nextafter(scale, torch.zeros_like(scale)).float().item()
    assert below < want
    assert codes.abs().max() <= 127


# ---- round trips --------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,group,shape", [
    ("int8", 32, (16, 48)), ("int4", 32, (16, 64)), ("int4", 64, (8, 128)), ("int4", 128, (8, 256)),
    ("int4", 32, (5, 432)),  # wearable hidden size: 13 groups of 32 and a short one of 16
    ("int4", 32, (3, 33)),  # odd K
    ("int4", 128, (4, 64)),  # group larger than the row: one scale per row
])
def test_round_trip_error_is_at_most_half_a_step(scheme, group, shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3  # rows of differing range
    e = enc(scheme, shape, group)
    Q.check_encoding(e, shape, "test")
    stored, scale = Q.quantize(w, e)
    specs = Q.stored_specs("x", shape, e, torch.float32)
    assert specs["x"] == (stored.dtype, tuple(stored.shape))
    assert specs["x_scale"] == (torch.bfloat16, tuple(scale.shape))
    back = Q.dequantize(stored, scale, e, shape[1])
    per_input = scale.float().repeat_interleave(e.group_size, 1)[:, :shape[1]]  # [N, K]
    assert ((back - w).abs() <= per_input / 2 + 1e-6).all()
    # Decoding is exact arithmetic: code * scale in fp32.
    assert torch.equal(back, Q.codes(stored, e, shape[1]).float() * per_input)


def test_bf16_source_weights_quantize_like_their_fp32_values():
    w = torch.randn(8, 64).to(torch.bfloat16)
    e = enc("int4", (8, 64))
    a, sa = Q.quantize(w, e)
    b, sb = Q.quantize(w.float(), e)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert Q.fake_quantize(w, e).dtype == torch.bfloat16


# ---- the layout is the one the kernels read --------------------------------------------------------
def test_int4_layout_matches_torch_int4pack_kernel():
    n, k, g = 64, 128, 32
    w = torch.randn(n, k)
    e = enc("int4", (n, k), g)
    packed, scale = Q.quantize(w, e)
    x = torch.randn(3, k)
    u = Q.codes(packed, e, k).to(torch.int32) + 8  # [N, K] 0..15: the kernel's input
    wp = torch._convert_weight_to_int4pack_for_cpu(u, 1)
    scale_zeros = torch.stack([scale.float().t().contiguous(), torch.zeros(k // g, n)], -1)  # [K/G, N, 2]
    got = torch._weight_int4pack_mm_for_cpu(x, wp, g, scale_zeros)
    torch.testing.assert_close(got, F.linear(x, Q.dequantize(packed, scale, e, k)), rtol=1e-4, atol=1e-4)


def test_int8_layout_matches_torch_int8pack_kernel():
    w = torch.randn(32, 64)
    e = enc("int8", (32, 64))
    codes, scale = Q.quantize(w, e)
    x = torch.randn(2, 64)
    got = torch._weight_int8pack_mm(x, codes, scale.float().view(-1))
    torch.testing.assert_close(got, F.linear(x, Q.dequantize(codes, scale, e, 64)), rtol=1e-4, atol=1e-4)


# ---- encodings and the manifest -----------------------------------------------------------------------
def test_encoding_json_and_choice():
    assert enc("int4", (8, 64), 64).to_json() == {"scheme": "int4", "bits": 4, "group_size": 64,
                                                 "scale_dtype": "bfloat16"}
    assert enc("int8", (8, 64), 128).to_json() == {"scheme": "int8", "bits": 8, "group_size": 64,
                                                  "scale_dtype": "bfloat16"}
    assert enc("int4", (64,)).to_json() == {"scheme": "none", "bits": 32}  # 1-D stays float
    assert Q.choose_encoding("int8", (4, 4), 32, "bfloat16").to_json()["bits"] == 8
    assert Q.choose_encoding("none", (4, 4), 32, "bfloat16").to_json() == {"scheme": "none", "bits": 16}
    e = enc("int4", (8, 64))
    assert Q.Encoding.from_json(e.to_json()) == e


@pytest.mark.parametrize("bad,match", [
    ({"scheme": "int4", "bits": 8, "group_size": 32, "scale_dtype": "bfloat16"}, "needs bits 4"),
    ({"scheme": "int4", "bits": 4, "group_size": 48, "scale_dtype": "bfloat16"}, "group_size in"),
    ({"scheme": "int8", "bits": 8, "group_size": 32, "scale_dtype": "bfloat16"}, "group_size in \\[64\\]"),
    ({"scheme": "int4", "bits": 4, "group_size": 32, "scale_dtype": "float16"}, "scale_dtype"),
    ({"scheme": "int3", "bits": 3}, "unknown quantization scheme"),
])
def test_check_encoding_refuses_bad_records(bad, match):
    with pytest.raises(FormatError, match=match):
        Q.check_encoding(Q.Encoding.from_json(bad), (8, 64), "f.safetensors: w")


def quantized_manifest() -> dict:
    tensors = {"layers.0.moe.experts.0.gate.weight": enc("int4", (8, 64)).to_json(),
               "layers.0.ffn_norm.weight": {"scheme": "none", "bits": 32}}
    entry = {"path": "backbone.safetensors", "role": "backbone", "bytes": 1, "sha256": "0" * 64,
             "dtype": "float32", "tensors": tensors}
    return {"format": fmt.FORMAT_NAME, "format_version": 1, "model": {}, "tokenizer": None,
            "quantization": {"experts": "int4", "backbone": "int8", "group_size": 32, "rounding": "nearest",
                             "roles": {"expert": "int4", "router": "none"}},
            "provenance": {"source": {}, "tools": {}}, "files": [entry]}


def test_schema_accepts_quantized_manifest_and_old_schema_refuses_it():
    schema = fmt.manifest_schema()
    m = quantized_manifest()
    jsonschema.validate(m, schema)
    # The schema before quantization existed (same v1, without the two optional additions): a
    # reader that old refuses a quantized bundle instead of reading int4 codes as floats.
    old = copy.deepcopy(schema)
    del old["properties"]["quantization"]
    del old["properties"]["files"]["items"]["properties"]["tensors"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(m, old)
    float_manifest = {k: v for k, v in m.items() if k != "quantization"}
    float_manifest["files"] = [{k: v for k, v in m["files"][0].items() if k != "tensors"}]
    jsonschema.validate(float_manifest, old)
    jsonschema.validate(float_manifest, schema)
    bad = copy.deepcopy(m)
    bad["files"][0]["tensors"]["layers.0.ffn_norm.weight"]["extra"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
