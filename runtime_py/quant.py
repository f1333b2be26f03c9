"""Quantized weights in a bundle: the schemes, their exact bytes, and how to read them back.
The spec in code for docs/FORMAT.md "Quantized tensors".

A 2-D weight W [N, K] (N output channels, K inputs; an embedding's N is its vocabulary rows) is
stored under a scheme as two tensors of the same safetensors file:

    {name}         codes    int8  [N, K]          (int8)  |  uint8 [N, ceil(K/2)]  (int4, two codes per byte)
    {name}_scale   scales   bf16  [N, ceil(K/G)]  one scale per group of G consecutive inputs of a row

    W[n, k] ~= code[n, k] * scale[n, k // G]        symmetric: no zero point

int8 is per output channel (G = K, scale [N, 1]); int4 is group-wise with G in GROUP_SIZES. When G
does not divide K the last group of each row is shorter (K mod G inputs): hidden 432 (wearable-moe)
at G = 32 is 13 groups of 32 and one of 16. Kernels that need K % G == 0 get the same weights exactly
by padding K with zero codes when they are lowered.

Bit layout of int4 (byte j of row n holds columns 2j and 2j+1):
    u = code + 8 (offset binary, 0..15);  byte = u[2j] | (u[2j+1] << 4)
and when K is odd the last high nibble of a row is padding, u = 8 (code 0). With G dividing K this
is ONNX Runtime's MatMulNBits ``B`` (reshaped [N, K/G, G/2]) with its default zero point 8, and,
unpacked, the [N, K] 0..15 input of ``torch._convert_weight_to_int4pack_for_cpu``.

Scales are bfloat16 on purpose: a bf16 is the top half of an fp32, so a lowering to fp32-scale
kernels (XNNPACK, ONNX) converts them exactly; they keep fp32's exponent range, so a group of tiny
weights cannot underflow as an fp16 scale can; and they cost half of fp32 (0.5 instead of 1 bit per
weight at G = 32). Each scale is amax / divisor rounded *up* to the next bf16, then the codes are
computed from that stored scale: decoding with the file's scale is exact, and |W| / scale never
exceeds the divisor, so rounding the scale never clips a weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from runtime_py.errors import FormatError

FLOAT = "none"  # the scheme name of a tensor kept in the bundle's float dtype
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPE = torch.bfloat16
SCALE_DTYPE_NAME = "bfloat16"
SCALE_SUFFIX = "_scale"
FLOAT_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}


def _pack_int8(codes: torch.Tensor) -> torch.Tensor:
    return codes  # int8 [N, K], two's complement, as is


def _unpack_int8(stored: torch.Tensor, k: int) -> torch.Tensor:
    return stored


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes int8 [N, K] in [-8, 7] -> uint8 [N, ceil(K/2)]: even column in the low nibble, offset by 8."""
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))  # [N, K+1], code 0 as the padding nibble
    u = (codes.to(torch.int16) + 8).to(torch.uint8)  # [N, K] 0..15
    return u[:, 0::2] | (u[:, 1::2] << 4)  # [N, K/2]


def _unpack_int4(stored: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(K/2)] -> codes int8 [N, K] in [-8, 7]."""
    n, half = stored.shape
    u = torch.empty(n, 2 * half, dtype=torch.uint8)  # [N, 2*ceil(K/2)] 0..15
    u[:, 0::2] = stored & 0x0F  # columns 0, 2, 4, ...
    u[:, 1::2] = stored >> 4  # columns 1, 3, 5, ...
    return u[:, :k].view(torch.int8) - 8  # [N, K]


@dataclass(frozen=True)
class Scheme:
    """One integer scheme. ``divisor``: scale = amax / divisor; codes are round(W / scale) clamped to
    [qmin, qmax]."""

    name: str
    bits: int
    qmin: int
    qmax: int
    divisor: float
    group_sizes: tuple[int, ...] | None  # None: per output channel (G = K)
    code_dtype: torch.dtype
    codes_per_byte: int
    pack: Callable[[torch.Tensor], torch.Tensor]  # codes int8 [N, K] -> stored
    unpack: Callable[[torch.Tensor, int], torch.Tensor]  # (stored, K) -> codes int8 [N, K]


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    # [-127, 127]: the symmetric range every int8 weight kernel takes (XNNPACK qc8w, torch
    # _weight_int8pack_mm); -128 is never written, so negating a code cannot overflow.
    Scheme("int8", 8, -127, 127, 127.0, None, torch.int8, 1, _pack_int8, _unpack_int8),
    # All 16 levels: torchao's symmetric mapping (scale = amax / ((qmax - qmin) / 2) = amax / 7.5),
    # the one its 8da4w lowering for ExecuTorch uses. -amax lands on -8, +amax on 7.5 -> 7: both
    # extremes are within half a step, and no level is wasted as with amax / 7.
    Scheme("int4", 4, -8, 7, 7.5, GROUP_SIZES, torch.int8, 2, _pack_int4, _unpack_int4),
)}
SCHEME_NAMES = (FLOAT, *SCHEMES)


@dataclass(frozen=True)
class Encoding:
    """How one tensor is stored, exactly as the manifest records it (``tensors`` of a file entry)."""

    scheme: str  # FLOAT or a SCHEMES key
    bits: int  # 32 or 16 for floats
    group_size: int | None = None  # inputs per scale; K for per-channel int8
    scale_dtype: str | None = None

    @property
    def quantized(self) -> bool:
        return self.scheme != FLOAT

    def to_json(self) -> dict:
        if not self.quantized:
            return {"scheme": FLOAT, "bits": self.bits}
        return {"scheme": self.scheme, "bits": self.bits, "group_size": self.group_size,
                "scale_dtype": self.scale_dtype}

    @classmethod
    def from_json(cls, data: dict) -> Encoding:
        return cls(data["scheme"], data["bits"], data.get("group_size"), data.get("scale_dtype"))


def float_encoding(dtype_name: str) -> Encoding:
    return Encoding(FLOAT, FLOAT_BITS[dtype_name])


def choose_encoding(scheme: str, shape: tuple[int, ...], group_size: int, float_dtype: str) -> Encoding:
    """The encoding of a tensor of ``shape`` under ``scheme``: only 2-D tensors are quantized; int8
    is per output channel whatever ``group_size`` says."""
    if scheme == FLOAT or len(shape) != 2:
        return float_encoding(float_dtype)
    s = SCHEMES[scheme]
    return Encoding(s.name, s.bits, shape[1] if s.group_sizes is None else group_size, SCALE_DTYPE_NAME)


def check_encoding(enc: Encoding, shape: tuple[int, ...], where: str) -> None:
    """Raise FormatError unless ``enc`` can store a tensor of ``shape``."""
    if not enc.quantized:
        if enc.bits not in FLOAT_BITS.values():
            raise FormatError(f"{where}: float tensor with {enc.bits} bits; expected 16 or 32")
        return
    s = SCHEMES.get(enc.scheme)
    if s is None:
        raise FormatError(f"{where}: unknown quantization scheme {enc.scheme!r}; this runtime reads "
                          f"{list(SCHEME_NAMES)} (upgrade cosmoe-export?)")
    if len(shape) != 2:
        raise FormatError(f"{where}: only 2-D tensors can be quantized, this one has shape {shape}")
    k = shape[1]
    allowed = (k,) if s.group_sizes is None else s.group_sizes
    if enc.bits != s.bits or enc.scale_dtype != SCALE_DTYPE_NAME or enc.group_size not in allowed:
        raise FormatError(f"{where}: bad {enc.scheme} encoding {enc.to_json()} for shape {shape}: needs bits "
                          f"{s.bits}, scale_dtype {SCALE_DTYPE_NAME}, group_size in {list(allowed)}")


def stored_specs(name: str, shape: tuple[int, ...], enc: Encoding,
                 float_dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The safetensors entries (name -> dtype, shape) that hold canonical tensor ``name``."""
    if not enc.quantized:
        return {name: (float_dtype, tuple(shape))}
    s = SCHEMES[enc.scheme]
    n, k = shape
    return {name: (s.code_dtype if s.codes_per_byte == 1 else torch.uint8, (n, -(-k // s.codes_per_byte))),
            name + SCALE_SUFFIX: (SCALE_DTYPE, (n, -(-k // enc.group_size)))}


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """w [N, K] -> [N, ceil(K/G), G] fp32, the short last group padded with zeros."""
    n, k = w.shape
    w = torch.nn.functional.pad(w.float(), (0, -k % g))  # [N, ceil(K/G)*G]
    return w.view(n, -1, g)


def scales(w: torch.Tensor, enc: Encoding) -> torch.Tensor:
    """w [N, K] (float) -> bf16 scales [N, ceil(K/G)]: amax / divisor rounded up to a bf16; 1 for
    all-zero groups (any scale decodes zeros exactly; 1 keeps consumers that divide by it finite)."""
    s = SCHEMES[enc.scheme]
    amax = _grouped(w, enc.group_size).abs().amax(-1)  # [N, K/G], padding zeros never raise it
    want = torch.where(amax > 0, amax / s.divisor, torch.ones_like(amax))  # [N, K/G] fp32
    near = want.to(SCALE_DTYPE)
    up = torch.nextafter(near, torch.full_like(near, math.inf))
    return torch.where(near.float() < want, up, near)


def quantize(w: torch.Tensor, enc: Encoding) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (float, finite) -> (stored codes, bf16 scales [N, K/G]) under ``enc``."""
    s = SCHEMES[enc.scheme]
    n, k = w.shape
    scale = scales(w, enc)  # [N, K/G]
    q = torch.round(_grouped(w, enc.group_size) / scale.float()[..., None]).clamp_(s.qmin, s.qmax)  # [N, K/G, G]
    return s.pack(q.view(n, -1)[:, :k].to(torch.int8)), scale


def codes(stored: torch.Tensor, enc: Encoding, k: int) -> torch.Tensor:
    """Stored codes -> int8 codes [N, K]."""
    return SCHEMES[enc.scheme].unpack(stored, k)


def dequantize(stored: torch.Tensor, scale: torch.Tensor, enc: Encoding, k: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(stored codes, scales [N, K/G]) -> W [N, K] in ``dtype``; exact in fp32 (code * bf16 scale)."""
    return dequantize_codes(codes(stored, enc, k), scale, enc, dtype)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, enc: Encoding,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes int8 [N, K], scales [N, K/G]) -> W [N, K] in ``dtype``."""
    n, k = q.shape
    g = enc.group_size
    if k % g:
        q = torch.nn.functional.pad(q, (0, -k % g))  # [N, ceil(K/G)*G]
    w = torch.mul(q.view(n, -1, g), scale.float()[..., None]).view(n, -1)  # [N, ceil(K/G)*G] fp32
    w = w if w.shape[1] == k else w[:, :k].contiguous()  # [N, K]
    return w if dtype == torch.float32 else w.to(dtype)


def fake_quantize(w: torch.Tensor, enc: Encoding) -> torch.Tensor:
    """W rounded through ``enc`` and back, in w's dtype: what a runtime will compute with."""
    if not enc.quantized:
        return w
    return dequantize(*quantize(w, enc), enc, w.shape[1], w.dtype)
