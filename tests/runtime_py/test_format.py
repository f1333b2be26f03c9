"""runtime_py/format.py is the spec: the manifest's JSON Schema and the code's registries say the same."""

from __future__ import annotations

import dataclasses

import torch

from cosmoe_export.lower.targets import MODEL_TARGETS, TARGETS
from cosmoe_export.quantization import quantize
from runtime_py import format as fmt
from runtime_py import quant


def _file_props() -> dict:
    return fmt.manifest_schema()["properties"]["files"]["items"]["properties"]


def _quant_props() -> dict:
    return fmt.manifest_schema()["properties"][fmt.QUANTIZATION_KEY]["properties"]


def test_file_entry_enums_are_the_codes():
    props = _file_props()
    assert props["role"]["enum"] == list(fmt.ROLES)
    assert props["target"]["enum"] == list(fmt.PROGRAM_TARGETS)
    assert props["unit"]["enum"] == list(fmt.PROGRAM_UNITS)
    assert props["cache"]["enum"] == list(fmt.PROGRAM_CACHES)
    assert props["dtype"]["enum"] == list(fmt.DTYPES.values())


def test_quantization_enums_are_the_codes():
    props = _quant_props()
    assert props["experts"]["enum"] == [*quant.SCHEME_NAMES, quantize.AUTO]
    assert props["backbone"]["enum"] == list(quant.SCHEME_NAMES)
    assert props["roles"]["additionalProperties"]["enum"] == [*quant.SCHEME_NAMES, quantize.AUTO]
    assert props["group_size"]["enum"] == list(quant.GROUP_SIZES)
    assert props["rounding"]["enum"] == list(quantize.ROUNDINGS)
    enc = fmt.manifest_schema()["$defs"]["encoding"]["properties"]
    assert enc["scheme"]["enum"] == list(quant.SCHEME_NAMES)
    assert enc["scale_dtype"]["enum"] == [quant.SCALE_DTYPE_NAME]
    assert set(enc["bits"]["enum"]) == {s.bits for s in quant.SCHEMES.values()} | {16, 32}


def test_lower_targets_are_the_format_targets():
    assert [*TARGETS, *MODEL_TARGETS] == list(fmt.PROGRAM_TARGETS)


def test_dtype_table_round_trips_through_torch_and_safetensors():
    for d in fmt.DTYPE_TABLE:
        assert fmt.dtype(d.name) is d
        assert fmt.st_dtype(d.st) is d
        assert fmt.dtype_of(d.torch) is d
    assert fmt.DTYPE_ALIASES == {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    assert fmt.st_dtype("F8_E4M3") is None and fmt.dtype_of(torch.complex64) is None
    assert quant.SCALE_DTYPE is fmt.dtype(quant.SCALE_DTYPE_NAME).torch


def test_program_paths():
    assert fmt.program_path("executorch", "expert", 3, 12) == "executorch/experts/layer_003/expert_012.pte"
    assert fmt.program_path("onnx", "layer", 7) == "onnx/layer_007.onnx"
    assert fmt.program_path("executorch", "embed") == "executorch/embed.pte"
    assert fmt.program_path("gguf", "model") == "gguf/model.gguf"


def test_model_enums_and_v2_keys_are_the_codes():
    from runtime_py import config, routers
    props = fmt.manifest_schema()["properties"]["model"]["properties"]
    assert props["layer_ffns"]["items"]["enum"] == list(config.FFN_KINDS)
    assert props["router"]["enum"] == list(config.ROUTERS) == list(routers.ROUTERS)
    assert props["qk_norm"]["enum"] == list(config.QK_NORMS)
    # Every v2 key is a config field and described by the schema.
    fields = {f.name for f in dataclasses.fields(config.CosmoeConfig)}
    assert set(fmt.V2_MODEL_KEYS) <= fields and set(fmt.V2_MODEL_KEYS) <= set(props)
