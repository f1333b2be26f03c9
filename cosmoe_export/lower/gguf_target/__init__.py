"""``lower --target gguf``: the whole bundle as one llama.cpp model file (docs/LOWERING.md "GGUF").

One file, not one per unit: llama.cpp memory-maps a model and pages its experts itself. Written
with the ``gguf`` package (the writer llama.cpp's own converter uses), one tensor at a time through
its temporary file, so memory holds one layer's experts, not the model.

Exact where GGUF can hold the bundle's form (docs/FORMAT.md "Quantized tensors" is ours, ggml's
block layouts are in ggml-common.h):
    int4, G a multiple of 32  -> Q4_0: per block of 32, d = scale (fp16), q = code + 8,
                                  byte j = q[j] | q[j + 16] << 4
    int8 per channel          -> Q8_0: per block of 32, d = the row's scale, q = code
    float                     -> F32 / BF16 / F16 as stored (1-D tensors F32: llama.cpp's norms)
Where it cannot, the nearest form, recorded in the manifest entry's ``gguf.fallbacks``: a row
length not a multiple of 32 (hidden 432) or a scale outside fp16's normal range -> F16 when every
value is exact in it, else F32; a layer's stacked experts share one type, so mixed precision
becomes the layer's highest (int4 codes are exact in Q8_0's blocks).

Here the file is written; architectures.py says which llama.cpp graph a bundle is, tensors.py makes
each tensor what that graph reads, tokenizer.py the vocabulary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from cosmoe_export.errors import CosmoeError
from cosmoe_export.lower import units
from cosmoe_export.lower.gguf_target.architectures import (  # noqa: F401  (NOT_WRITTEN: tests, docs)
    ARCHES,
    NOT_WRITTEN,
    Arch,
    architecture,
    dense_lead,
    differences,
    head_count_kv,
)
from cosmoe_export.lower.gguf_target.tensors import (
    BACKBONE_TENSORS,
    EXPERT_TENSORS,
    FLOAT_TYPES,
    Encoded,
    Q,
    T,
    add_kv_b,
    deltanet,
    encode,
    gguf_name,
    merge_gate,
    mla_rope_rows,
    rope_rows,
    template_of,
)
from cosmoe_export.lower.gguf_target.tokenizer import SPLIT_PRE, write_tokenizer  # noqa: F401  (SPLIT_PRE: tests)
from runtime_py import format as fmt
from runtime_py import model as rt_model
from runtime_py.bundle import Bundle
from runtime_py.config import CosmoeConfig


def lower(bundle: Bundle, out_dir: Path) -> list[dict[str, Any]]:
    """Write ``out_dir``/model.gguf for ``bundle``; returns its manifest entry (a list of one)."""
    arch = architecture(bundle)
    cfg = bundle.config
    rel = fmt.program_path("gguf", "model")
    path = out_dir / rel.split("/", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    float_type = FLOAT_TYPES[bundle.backbone.dtype]
    writer = gguf.GGUFWriter(path, arch.name, use_temp_file=True)
    tokenizer = _metadata(writer, bundle, arch)
    types: dict[str, int] = {}
    fallbacks: list[dict[str, str]] = []

    def add(name: str, enc: Encoded) -> None:
        raw = enc.type if enc.data.dtype == np.uint8 else None
        writer.add_tensor(name, enc.data, raw_dtype=raw)
        types[enc.type.name] = types.get(enc.type.name, 0) + 1
        if enc.fallback is not None:
            fallbacks.append({"tensor": name, "type": enc.type.name, "why": enc.fallback})

    backbone = units.backbone_weights(bundle)
    for name, w in backbone.items():
        template, layer = template_of(name)
        if template not in BACKBONE_TENSORS:
            raise CosmoeError(f"{bundle.root}: tensor {name} has no llama.cpp counterpart in {arch.name}")
        tensor, kind = BACKBONE_TENSORS[template]
        tensor = dict(arch.renames).get(tensor, tensor)
        if cfg.latent_attention and tensor in (T.ATTN_Q, T.ATTN_Q_B, T.ATTN_KV_A_MQA):
            w = mla_rope_rows(w, cfg, tensor == T.ATTN_KV_A_MQA)
        elif tensor in (T.ATTN_Q, T.ATTN_K, T.ATTN_Q_NORM, T.ATTN_K_NORM):
            w = rope_rows(w, cfg, arch.interleaved_rope)
        if tensor == T.ATTN_KV_B:
            add_kv_b(add, w, cfg, layer, float_type)
            continue
        if kind == "gate":  # written inside q's rows
            continue
        if tensor == T.ATTN_Q and cfg.attention_output_gate:
            w = merge_gate(w, backbone[name.replace(".q.", ".gate.")], cfg)
        fallback = None
        if template.startswith("layers.{l}.linear."):
            w, fallback = deltanet(template.rsplit(".linear.", 1)[1], w, cfg)
        if tensor == T.FFN_GATE_INP_SHEXP and isinstance(w, torch.Tensor):  # [1, D] in HF, {n_embd} here
            w = w.reshape(-1)
        if tensor == T.SHORTCONV_CONV:
            w = w.reshape(w.shape[0], -1)
        enc = encode([w], float_type, experts=False)
        enc.fallback = enc.fallback or fallback
        add(gguf_name(tensor, kind, layer), enc)
        if layer is not None and template == "layers.{l}.moe.router.weight":
            _add_experts(add, bundle, layer, float_type)
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        base = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_size, 2).float() / cfg.head_size))
        # ggml divides each pair's angle by its factor: default frequency / scaled frequency.
        writer.add_tensor(gguf_name(T.ROPE_FREQS, "weight"), (base / rt_model.rope_inv_freq(cfg)).numpy())
        types["F32"] = types.get("F32", 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    precision = "+".join(sorted(types, key=lambda t: (t[0] != "Q", t)))
    return [{"path": rel, "role": "program", "target": "gguf", "unit": "model", "precision": precision,
             "max_tokens": cfg.max_position_embeddings, "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest(),
             "gguf": {"architecture": arch.name, "tokenizer": tokenizer, "tensor_types": dict(sorted(types.items())),
                      "fallbacks": fallbacks, **({"differences": diff} if (diff := differences(cfg)) else {})}}]


def _add_experts(add: Callable[[str, Encoded], None], bundle: Bundle, layer: int, float_type: Q) -> None:
    """Layer ``layer``'s routed experts stacked as llama.cpp's *_exps tensors: [E, N, K] each."""
    experts = [units.expert_weights(bundle, layer, e) for e in range(bundle.config.num_experts)]
    for name, (tensor, kind) in EXPERT_TENSORS.items():
        if name in experts[0]:
            add(gguf_name(tensor, kind, layer), encode([x[name] for x in experts], float_type, experts=True))


def _metadata(w: gguf.GGUFWriter, bundle: Bundle, arch: Arch) -> str:
    """The architecture's keys and the tokenizer's; returns the tokenizer written (write_tokenizer)."""
    cfg = bundle.config
    source = bundle.manifest["provenance"]["source"]  # not the directory's name: the same bundle, the same bytes
    w.add_name(str(source.get("name") or source.get("architecture", "CosmoeForCausalLM")))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.dense_intermediate_size if dense_lead(cfg) else cfg.intermediate_size)
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    if cfg.shared_expert_intermediate_size:
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    if not cfg.latent_attention:  # MLA's are the architecture's keys (_deepseek_keys)
        w.add_head_count_kv(head_count_kv(cfg))
        w.add_key_length(cfg.head_size)
        w.add_value_length(cfg.head_size)
    w.add_rope_dimension_count(cfg.rope_dims)
    w.add_rope_freq_base(cfg.rope_theta)
    _rope_keys(w, cfg)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_vocab_size(cfg.vocab_size)
    if arch.keys is not None:
        arch.keys(w, cfg)
    return write_tokenizer(w, bundle)


def _rope_keys(w: gguf.GGUFWriter, cfg: CosmoeConfig) -> None:
    """YaRN as llama.cpp's converter writes it (conversion/base.py); Llama 3.1's is the rope_freqs tensor."""
    rope = cfg.rope_scaling or {}
    if rope.get("rope_type") != "yarn":
        return
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    for key, add in (("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                     ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                     ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
        if rope.get(key) is not None:
            add(rope[key])
