"""Integer weights kept as integers in the PyTorch backend: linears on PyTorch's CPU int kernels.

A quantized bundle stores W[n, k] = code[n, k] * scale[n, k // G] (runtime_py/quant.py). Instead of
dequantizing to fp32 when a tensor loads (4-8x the bytes, and every decode step streams them), the
runtime keeps the codes and multiplies with

    int8 (per channel)  torch._weight_int8pack_mm(x, codes [N, K], scale [N])
    int4 (group G)      torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, G, scales_and_zeros)

Both take bfloat16 activations: with fp32 activations they fall back to slow paths
(bench/quant_kernels.py measured them 5-15x slower than fp32 F.linear), with bf16 they are what
makes the int4/int8 wearable bundle decode at 3.7x transformers (docs/BENCHMARKS.md). So x is
rounded to bf16 on the way in and y returned in x's dtype: the only difference from the
dequantized fp32 product is that rounding (relative 2^-9 per input) and the bf16 output (2^-9).

That rounding is the PyTorch backend's alone (a device's kernels round activations their own way:
XNNPACK's and ONNX Runtime's int8 activations), so it is a choice, runtime_py.backends.TORCH_ACTIVATIONS: "bf16" is the
fast path above, "fp32" the bundle's own math exactly, with the integers still resident (each call
dequantizes its codes, as the exporter's reference does once at load: the same fp32 weights, the
same product, bit for bit). verify gates the PyTorch backend on "fp32" (docs/QUANTIZATION.md).

int4: the kernel takes offset-binary nibbles u = code + 8 and decodes (u - 8) * scale + zero, so our
symmetric codes need zero = 0. It needs G in (32, 64, 128, 256) and N divisible by 16 (int8: K
divisible by 16; tensors no kernel takes are dequantized instead). A short last group (K mod G != 0,
e.g. hidden 432 at G = 32) is padded with code 0, which decodes to 0 whatever the scale, and x is
padded with zeros to match.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime_py import quant
from runtime_py.quant import Encoding

ACT_DTYPE = torch.bfloat16  # what the int kernels are fast with
INT4_GROUPS = (32, 64, 128, 256)
INT4_N_MULTIPLE = 16
# torch 2.13's _weight_int8pack_mm returns garbage (one token) or crashes (several) when K is not a
# multiple of 16; found by tests/runtime_py/test_qlinear.py, checked shape by shape. Such tensors are dequantized.
INT8_K_MULTIPLE = 16
ALIGN = 64  # bytes


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is the whole of its storage and starts on a cache line, else a copy (which
    PyTorch allocates aligned). torch 2.13's int8 kernel crashes on codes that are not 16-byte aligned
    (found by tests/cosmoe_export/release/test_build.py, then shown alone: a view at offset 8
    segfaults, 16 and 64 do not), and a view into a shard's bytes would keep the whole read buffer
    alive, beyond the bytes the store accounts for this module."""
    whole = t.untyped_storage().nbytes() == t.nbytes
    return t if whole and t.data_ptr() % ALIGN == 0 else t.clone()


class Int8Linear(nn.Module):
    """y = x @ (codes * scale).T: codes int8 [N, K], scale bf16 [N]."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.codes, self.scale = _owned(codes), _owned(scale.reshape(-1))  # [N, K], [N]
        self.out_features, self.in_features = codes.shape

    @staticmethod
    def supports(shape: tuple[int, int], enc: Encoding) -> bool:
        return shape[1] % INT8_K_MULTIPLE == 0

    @staticmethod
    def resident_bytes(shape: tuple[int, int], enc: Encoding) -> int:
        n, k = shape
        return n * k + n * quant.SCALE_DTYPE.itemsize

    @classmethod
    def from_stored(cls, stored: torch.Tensor, scale: torch.Tensor, enc: Encoding, k: int) -> Int8Linear:
        return cls(stored, scale)  # int8 codes are stored as the kernel takes them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> y [..., N] in x's dtype."""
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(ACT_DTYPE), self.codes, self.scale)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Int4Linear(nn.Module):
    """y = x @ W.T with W int4 group-wise, packed once by ``_convert_weight_to_int4pack_for_cpu``."""

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, k: int) -> None:
        super().__init__()
        self.packed, self.scales_zeros, self.group = packed, scales_zeros, group  # [N, Kp/2], [Kp/G, N, 2]
        self.out_features, self.in_features = packed.shape[0], k
        self.pad = scales_zeros.shape[0] * group - k  # zero inputs appended to x: Kp - K

    @staticmethod
    def supports(shape: tuple[int, int], enc: Encoding) -> bool:
        return enc.group_size in INT4_GROUPS and shape[0] % INT4_N_MULTIPLE == 0

    @staticmethod
    def resident_bytes(shape: tuple[int, int], enc: Encoding) -> int:
        n, k = shape
        groups = -(-k // enc.group_size)
        return n * groups * enc.group_size // 2 + groups * n * 2 * ACT_DTYPE.itemsize

    @classmethod
    def from_stored(cls, stored: torch.Tensor, scale: torch.Tensor, enc: Encoding, k: int) -> Int4Linear:
        """stored uint8 [N, ceil(K/2)], scale bf16 [N, ceil(K/G)] (runtime_py/quant.py's layout)."""
        g = enc.group_size
        codes = quant.codes(stored, enc, k)  # [N, K] int8 in [-8, 7]
        codes = F.pad(codes, (0, -k % g))  # [N, Kp]: code 0 in the short last group
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32) + 8, 2)  # [N, Kp/2]
        s = scale.t()  # [Kp/G, N]
        scales_zeros = torch.stack((s, torch.zeros_like(s)), -1).contiguous()  # [Kp/G, N, 2], zero = 0
        return cls(packed, scales_zeros, g, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> y [..., N] in x's dtype."""
        x2 = x.reshape(-1, self.in_features).to(ACT_DTYPE)  # [M, K]
        if self.pad:
            x2 = F.pad(x2, (0, self.pad))  # [M, Kp]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_zeros)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class ExactLinear(nn.Module):
    """y = x @ W.T in fp32 with W dequantized from the resident codes on every call: the bundle's math
    (runtime_py.quant.dequantize, as the exporter's reference computes it) at the integers' memory."""

    def __init__(self, stored: torch.Tensor, scale: torch.Tensor, enc: Encoding, k: int) -> None:
        super().__init__()
        self.stored, self.scale, self.enc = _owned(stored), _owned(scale), enc  # as the shard stores them
        self.out_features, self.in_features = stored.shape[0], k

    @staticmethod
    def supports(shape: tuple[int, int], enc: Encoding) -> bool:
        return True

    @staticmethod
    def resident_bytes(shape: tuple[int, int], enc: Encoding) -> int:
        n, k = shape
        return n * -(-k * enc.bits // 8) + n * -(-k // enc.group_size) * quant.SCALE_DTYPE.itemsize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> y [..., N] in x's dtype."""
        w = quant.dequantize(self.stored, self.scale, self.enc, self.in_features)  # [N, K] fp32
        return F.linear(x.float(), w).to(x.dtype)


@dataclass(frozen=True)
class Kernel:
    fits: Callable[[tuple[int, int], Encoding], bool]  # can a tensor of this shape run on it
    build: Callable[[torch.Tensor, torch.Tensor, Encoding, int], nn.Module]  # (stored, scale, enc, K)
    resident_bytes: Callable[[tuple[int, int], Encoding], int]  # what the built module holds


KERNELS: dict[str, Kernel] = {
    "int8": Kernel(Int8Linear.supports, Int8Linear.from_stored, Int8Linear.resident_bytes),
    "int4": Kernel(Int4Linear.supports, Int4Linear.from_stored, Int4Linear.resident_bytes),
}


EXACT = Kernel(ExactLinear.supports, ExactLinear, ExactLinear.resident_bytes)


def kernel_for(shape: tuple[int, ...], enc: Encoding | None, activations: str = "bf16") -> Kernel | None:
    """The integer kernel for a 2-D tensor of ``shape`` under ``enc`` with ``activations`` (TORCH_ACTIVATIONS),
    or None (dequantize instead)."""
    if enc is None or not enc.quantized or len(shape) != 2:
        return None
    if activations == "fp32":
        return EXACT
    if enc.scheme not in KERNELS:
        return None
    kernel = KERNELS[enc.scheme]
    return kernel if kernel.fits(tuple(shape), enc) else None


class QuantEmbedding(nn.Module):
    """Rows of an integer table dequantized on lookup: ids [...] -> [..., D] in ``dtype``."""

    def __init__(self, stored: torch.Tensor, scale: torch.Tensor, enc: Encoding, dim: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.stored, self.scale, self.enc, self.dim, self.dtype = stored, scale, enc, dim, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)  # [M]
        rows = quant.dequantize(self.stored[flat], self.scale[flat], self.enc, self.dim, self.dtype)  # [M, D]
        return rows.view(*ids.shape, self.dim)


def install(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where canonical tensor ``name`` (``...q.weight``) lives in ``root``: an integer
    linear or embedding in place of the float one."""
    parent, _, attr = name.removesuffix(".weight").rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)
