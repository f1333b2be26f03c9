"""ExecuTorch expert programs from a template: lower once per expert layout, then write each expert.

Experts of one shape and precision layout lower to the same graph; only the weights differ. XNNPACK
keeps every weight outside its graph, in the program's named data, under the sha256 hex of its
bytes ("scale_" + sha256 for quantization scales; backends/xnnpack/operators/node_visitor.py), and
its delegate payload refers to each by that key. So an expert's program is the template's program
with each constant's bytes and key replaced, serialized again by ExecuTorch's own writer.

The payload is an XNNPACK flatbuffer that ExecuTorch 1.5 cannot read back in Python, so its keys
are replaced in place: a key keeps its length (64 hex digits, with or without "scale_"), so no
flatbuffer offset moves. Each key must occur exactly once in the template's payloads, and building
a template checks that writing its own weights reproduces its direct export byte for byte;
anything else raises TemplateError rather than writing a wrong program.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from cosmoe_export.lower import executorch_target, units
from runtime_py import quant
from runtime_py.config import CosmoeConfig

if TYPE_CHECKING:
    from executorch.exir.schema import Program

# One entry per matrix, by name: (name, codes or weight shape [N, K], scales shape or None, encoding
# or None for fp32). With the expert kind, hidden size and token bound it fixes the lowered graph.
Layout = tuple[tuple, ...]


class TemplateError(RuntimeError):
    """The lowered template is not laid out as this writer expects."""


@dataclass(frozen=True)
class _Slot:
    """One constant of the template, in its named-data order."""

    source: int  # index into constants(weights)
    blob: int  # which delegate payload refers to it
    offset: int  # where its key starts in that payload
    key_length: int
    size: int  # bytes of its data


@dataclass(frozen=True)
class Template:
    program: Program  # delegate payloads inline, no named data
    slots: tuple[_Slot, ...]


_TEMPLATES: dict[tuple, Template] = {}  # per process; a template holds only its program (kilobytes)


def expert_pte(config: CosmoeConfig, weights: dict[str, units.Weight]) -> bytes:
    """The expert's program, byte for byte what export_expert writes, from the cached template.
    Experts with biases or another activation than SwiGLU (gpt-oss) are exported directly: their
    biases are constants this writer does not locate yet."""
    if config.expert_bias or config.expert_act != "silu":
        return export_expert(config, weights)
    # Everything export_expert's graph depends on: the config fields it reads and the weights' layout.
    key = (config.expert_kind, config.hidden_size, units.max_tokens(config), layout(weights))
    if key not in _TEMPLATES:
        _TEMPLATES[key] = build_template(config, layout(weights))
    return write(_TEMPLATES[key], weights)


def export_expert(config: CosmoeConfig, weights: dict[str, units.Weight]) -> bytes:
    """One expert lowered directly: torch.export and XNNPACK (seconds)."""
    program = executorch_target.ExpertProgram(config, weights).eval()
    x = torch.zeros(2, config.hidden_size)
    # N tokens per call up to the prefill chunk, not the context: ExecuTorch plans its buffers for
    # the largest N, and a plan for 2,048 tokens (7 MB at hidden 432) dwarfed a 1 MB int4 expert.
    n = torch.export.Dim("n", min=1, max=units.max_tokens(config))
    return executorch_target.to_pte(program, (x,), dynamic_shapes=({0: n},))


def layout(weights: dict[str, units.Weight]) -> Layout:
    def entry(name: str, w: units.Weight) -> tuple:
        if isinstance(w, units.QuantWeight):
            return name, tuple(w.codes.shape), tuple(w.scales.shape), w.encoding
        return name, tuple(w.shape), None, None
    return tuple(entry(name, weights[name]) for name in sorted(weights))


def constants(weights: dict[str, units.Weight]) -> list[tuple[str, bytes]]:
    """(named-data key, bytes) of each constant XNNPACK stores for these weights, as its node visitor
    computes them: the key is the sha256 hex of the bytes, prefixed "scale_" for scales."""
    out = []
    for name in sorted(weights):
        for i, data in enumerate(_encoded(weights[name])):
            out.append((("scale_" if i else "") + hashlib.sha256(data).hexdigest(), data))
    return out


def _encoded(w: units.Weight) -> list[bytes]:
    """The bytes XNNPACK stores for one matrix as executorch_target lowers it."""
    if not isinstance(w, units.QuantWeight):
        return [_raw(w.detach().float())]  # [N, K] fp32, as the nn.Linear holds it
    if w.encoding.scheme == "int8":  # 8da8w, per channel: codes as they are, fp32 scales [N]
        return [_raw(w.codes.to(torch.int8)), _raw(w.scales.float())]
    # 8da4w, per group: QLinear zero-pads K to a group multiple; XNNPACK offsets codes to unsigned and
    # packs two per byte, element 2j in the low nibble (convert_to_qc4w); scales go to bf16 [N, Kp/G].
    # In numpy: torch's int8 arithmetic on strided views took ~50 ms per wearable matrix, numpy ~1 ms.
    k = w.codes.shape[1]
    c = np.pad(w.codes.to(torch.int8).numpy(), ((0, 0), (0, -k % w.encoding.group_size))).astype(np.uint8) + 8
    pairs = c.reshape(-1, 2)  # [N * Kp / 2, 2]
    return [(pairs[:, 0] | pairs[:, 1] << 4).tobytes(), _raw(w.scales.float().to(torch.bfloat16))]


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def build_template(config: CosmoeConfig, lay: Layout) -> Template:
    """Lower an expert of this layout with synthetic weights and locate each of its constants."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    synthetic = _synthetic(lay)
    pte = export_expert(config, synthetic)
    parsed = deserialize_pte_binary(pte)
    program = parsed.program
    if parsed.mutable_data or any(len(b.storage) for b in program.constant_buffer):
        raise TemplateError("the template holds data outside XNNPACK's named data")
    keys = list(parsed.named_data.pte_data) if parsed.named_data else []
    mine = constants(synthetic)
    source = {key: i for i, (key, _) in enumerate(mine)}
    if len(source) != len(mine) or sorted(keys) != sorted(source):
        raise TemplateError(f"the template's named data {keys} are not the expert's constants {sorted(source)}")
    blobs = [d.data for d in program.backend_delegate_data]
    slots = []
    for key in keys:
        blob, offset = _find_once(blobs, key.encode())
        slots.append(_Slot(source[key], blob, offset, len(key), len(mine[source[key]][1])))
    template = Template(program, tuple(slots))
    if write(template, synthetic) != pte:
        raise TemplateError("the template does not reproduce its own export")
    return template


def _synthetic(lay: Layout) -> dict[str, units.Weight]:
    """Weights of this layout, all distinct (so every constant has its own key in the template)."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, units.Weight] = {}
    for name, shape, scales_shape, enc in lay:
        if enc is None:
            out[name] = torch.randn(shape, generator=g)
            continue
        s = quant.SCHEMES[enc.scheme]
        codes = torch.randint(s.qmin, s.qmax + 1, shape, generator=g, dtype=torch.int8)
        scales = (torch.rand(scales_shape, generator=g) + 0.5).to(torch.bfloat16).float()  # exact bf16, as a bundle's
        out[name] = units.QuantWeight(codes, scales, enc)
    return out


def _find_once(blobs: list[bytes], needle: bytes) -> tuple[int, int]:
    """(payload, offset) of the one occurrence of a key in the delegate payloads."""
    count = sum(blob.count(needle) for blob in blobs)
    if count != 1:
        raise TemplateError(f"key {needle.decode()} occurs {count} times in the delegate payloads, not once")
    return next((b, blob.find(needle)) for b, blob in enumerate(blobs) if needle in blob)


def write(template: Template, weights: dict[str, units.Weight]) -> bytes:
    """The template's program with these weights' constants: what a direct export would write."""
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import CONSTANT_TENSOR_ALIGNMENT
    from executorch.exir._serialize._named_data_store import NamedDataStore
    from executorch.exir._serialize._program import PTEFile, serialize_pte_binary
    from executorch.exir.capture._config import ExecutorchBackendConfig
    from executorch.exir.schema import BackendDelegateInlineData

    mine = constants(weights)
    if len(mine) != len(template.slots):
        raise TemplateError(f"{len(mine)} constants for a template of {len(template.slots)}")
    blobs = [bytearray(d.data) for d in template.program.backend_delegate_data]
    # Named data in the template's order, so segments come out in the order a direct export has;
    # identical constants share one entry, as XNNPACK's own store makes them.
    store = NamedDataStore()
    for slot in template.slots:
        key, data = mine[slot.source]
        if len(key) != slot.key_length or len(data) != slot.size:
            raise TemplateError(f"constant {slot.source} is {len(data)} bytes, the template's {slot.size}")
        blobs[slot.blob][slot.offset:slot.offset + slot.key_length] = key.encode()
        store.add_named_data(key, data, alignment=CONSTANT_TENSOR_ALIGNMENT)
    program = dataclasses.replace(template.program,
                                  backend_delegate_data=[BackendDelegateInlineData(data=bytes(b)) for b in blobs])
    config = ExecutorchBackendConfig()  # what to_executorch() serializes with by default (to_pte)
    return bytes(serialize_pte_binary(
        PTEFile(program=program, named_data=store.get_named_data_store_output()),
        extract_delegate_segments=config.extract_delegate_segments, segment_alignment=config.segment_alignment,
        constant_tensor_alignment=config.constant_tensor_alignment, delegate_alignment=config.delegate_alignment))
