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

Layer programs (``layer_pte``) work the same way, with one more kind of constant: the tensors of
ops XNNPACK does not take (the norms' weights, ...) sit in the program's constant buffers, found
by their bytes and rewritten in place. Layers of one kind and weight layout share a template.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
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
    # Constant buffers (index into program.constant_buffer) -> the float tensor (by name) they hold;
    # the others do not depend on the weights (checked on two exports).
    buffers: tuple[tuple[int, str], ...] = ()
    precision: str = ""


_TEMPLATES: dict[tuple, Template | None] = {}  # per process; a template holds only its program (kilobytes)


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
    synthetic = _synthetic(lay)
    pte = export_expert(config, synthetic)
    template = _locate(pte, synthetic)
    if write(template, synthetic) != pte:
        raise TemplateError("the template does not reproduce its own export")
    return template


# (layer weights, keys relative to the layer) -> (program bytes, precision label): a direct export.
LayerExport = Callable[[dict[str, units.Weight]], tuple[bytes, str]]


def layer_pte(config: CosmoeConfig, layer: int, weights: dict[str, units.Weight],
              export: LayerExport) -> tuple[bytes, str]:
    """Layer ``layer``'s program from the template of its kind and layout (exported once per process
    with synthetic weights), byte for byte ``export(weights)``; exported directly where a template
    cannot stand for it: two of its tensors are equal (a direct export stores them once) or the
    template's constants could not all be located (TemplateError when it was built)."""
    lay = layout(weights)
    kind = (config.mixer(layer), config.window(layer), config.ffn_kind(layer).name)
    key = ("layer", json.dumps(config.to_dict(), sort_keys=True), kind, lay)
    if key not in _TEMPLATES:
        try:
            _TEMPLATES[key] = _layer_template(lay, export)
        except TemplateError:
            _TEMPLATES[key] = None
    template = _TEMPLATES[key]
    blobs = [b for name in sorted(weights) for b in _encoded(weights[name])]
    if template is None or len(set(blobs)) != len(blobs):
        return export(weights)
    return write(template, weights), template.precision


def _layer_template(lay: Layout, export: LayerExport) -> Template:
    synthetic, other = _synthetic(lay), _synthetic(lay, seed=1)
    pte, precision = export(synthetic)
    template = dataclasses.replace(_locate(pte, synthetic), precision=precision)
    # Constant buffers not found among the weights must be the same whatever the weights are.
    second = _locate(export(other)[0], other)
    fixed = {i for i, _ in template.buffers}
    for i, (a, b) in enumerate(zip(template.program.constant_buffer, second.program.constant_buffer, strict=True)):
        if i not in fixed and a.storage != b.storage:
            raise TemplateError(f"constant buffer {i} depends on the weights but is none of them")
    if write(template, synthetic) != pte:
        raise TemplateError("the template does not reproduce its own export")
    return template


def _locate(pte: bytes, synthetic: dict[str, units.Weight]) -> Template:
    """The template of a program exported with these (all distinct) weights: where each constant is."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    parsed = deserialize_pte_binary(pte)
    program = parsed.program
    if parsed.mutable_data:
        raise TemplateError("the template holds mutable data")
    keys = list(parsed.named_data.pte_data) if parsed.named_data else []
    mine = constants(synthetic)
    source = {key: i for i, (key, _) in enumerate(mine)}
    # Every constant XNNPACK holds is one of the unit's; the unit's others are constant buffers.
    if len(source) != len(mine) or not set(keys) <= set(source):
        raise TemplateError(f"the template's named data {keys} are not among the unit's constants {sorted(source)}")
    blobs = [d.data for d in program.backend_delegate_data]
    slots = []
    for key in keys:
        blob, offset = _find_once(blobs, key.encode())
        slots.append(_Slot(source[key], blob, offset, len(key), len(mine[source[key]][1])))
    raw = {_raw(w.detach().float()): name for name, w in synthetic.items() if not isinstance(w, units.QuantWeight)}
    buffers = tuple((i, raw[b.storage]) for i, b in enumerate(program.constant_buffer) if b.storage in raw)
    named = {mine[slot.source][0] for slot in slots}
    located = named | {hashlib.sha256(_raw(synthetic[n].detach().float())).hexdigest() for _, n in buffers}
    if set(source) - located:  # a weight the program holds in a form this writer does not know
        raise TemplateError(f"constants {sorted(set(source) - located)} of the unit are not found in its program")
    return Template(program, tuple(slots), buffers)


def _synthetic(lay: Layout, seed: int = 0) -> dict[str, units.Weight]:
    """Weights of this layout, all distinct (so every constant has its own key in the template)."""
    g = torch.Generator().manual_seed(seed)
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
    from executorch.exir.schema import BackendDelegateInlineData

    mine = constants(weights)
    if len(mine) != len(template.slots) + len(template.buffers):
        raise TemplateError(f"{len(mine)} constants for a template of {len(template.slots) + len(template.buffers)}")
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
    buffers = list(template.program.constant_buffer)
    for i, name in template.buffers:
        data = _raw(weights[name].detach().float())
        if len(data) != len(buffers[i].storage):
            raise TemplateError(f"{name} is {len(data)} bytes, the template's buffer {i} {len(buffers[i].storage)}")
        buffers[i] = dataclasses.replace(buffers[i], storage=data)
    program = dataclasses.replace(template.program, constant_buffer=buffers,
                                  backend_delegate_data=[BackendDelegateInlineData(data=bytes(b)) for b in blobs])
    config = executorch_target.backend_config()  # what to_pte serializes with
    return bytes(serialize_pte_binary(
        PTEFile(program=program, named_data=store.get_named_data_store_output()),
        extract_delegate_segments=config.extract_delegate_segments, segment_alignment=config.segment_alignment,
        constant_tensor_alignment=config.constant_tensor_alignment, delegate_alignment=config.delegate_alignment))
