"""What each source architecture goes through, and the check that proves each cell.

``cosmoe-export architectures`` prints this table and docs/FAMILIES.md holds the same
(tests/cosmoe_export/importers/test_coverage.py checks that they agree and that every test named
here exists). A cell is proven either by a CI test on the family's tiny checkpoint
(tests/conftest.py FAMILIES) or by bench/families.py, which runs every family through every
stage and backend and is too slow for CI.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("import", "quantize", "executorch", "onnx", "native", "gguf")

IMPORT = "tests/cosmoe_export/importers/test_importers.py::test_canonical_logits_match_transformers"
QUANTIZE = "tests/test_families.py::test_quantize_every_family"
ONNX = "tests/test_families.py::test_onnx_runs_every_family_as_pytorch"
EXECUTORCH = "tests/test_families.py::test_executorch_and_native_run_as_pytorch"
BENCH = "bench/families.py"
GGUF = "tests/cosmoe_export/lower/test_gguf.py::test_each_family_runs_on_its_llamacpp_architecture"
GGUF_REFUSED = "tests/cosmoe_export/lower/test_gguf.py::test_gguf_refuses_by_name_and_writes_nothing"


@dataclass(frozen=True)
class Family:
    name: str  # as docs/MODELS.md names it
    architecture: str  # the HF architectures entry (importers/adapters.py ADAPTERS)
    fixture: str  # tests/conftest.py FAMILIES key
    executorch: str = BENCH  # what proves the ExecuTorch and native cells
    native: str = BENCH
    gguf: str = GGUF_REFUSED  # lower --target gguf + llama.cpp, or its refusal
    gguf_fixture: str | None = None  # the fixture of the GGUF cell, when not the row's

    def proof(self, stage: str) -> str:
        return {"import": IMPORT, "quantize": QUANTIZE, "onnx": ONNX, "executorch": self.executorch,
                "native": self.native, "gguf": self.gguf}[stage]

    def fixture_of(self, stage: str) -> str:
        return self.gguf_fixture if stage == "gguf" and self.gguf_fixture else self.fixture


FAMILIES = [
    Family("Mixtral", "MixtralForCausalLM", "mixtral", gguf=GGUF),
    Family("Qwen2-MoE", "Qwen2MoeForCausalLM", "qwen2_moe", gguf=GGUF),
    # GGUF: all-MoE Qwen3 runs (qwen3_moe); with dense layers it is refused (qwen3_moe_dense, REFUSED in the test).
    Family("Qwen3-MoE (with dense layers)", "Qwen3MoeForCausalLM", "qwen3_moe_dense", gguf=GGUF,
           gguf_fixture="qwen3_moe"),
    # GGUF: as released (olmoe_mha) it runs; with clip_qkv (the row's fixture) it is refused.
    Family("OLMoE", "OlmoeForCausalLM", "olmoe", gguf=GGUF, gguf_fixture="olmoe_mha"),
    Family("Granite MoE", "GraniteMoeForCausalLM", "granitemoe", gguf=GGUF),
    Family("Granite MoE (shared)", "GraniteMoeSharedForCausalLM", "granitemoeshared", EXECUTORCH, EXECUTORCH,
           gguf=GGUF),
    Family("HunYuan MoE", "HunYuanMoEV1ForCausalLM", "hunyuan_moe", gguf=GGUF),
    Family("ERNIE 4.5 MoE", "Ernie4_5_MoeForCausalLM", "ernie4_5_moe", gguf=GGUF),
    Family("GLM-4 MoE", "Glm4MoeForCausalLM", "glm4_moe", EXECUTORCH, EXECUTORCH, gguf=GGUF),
    Family("Phi-MoE", "PhimoeForCausalLM", "phimoe"),
    # GGUF: with llama.cpp's clamp and its rounding of YaRN's range it runs exactly (gpt_oss_rounded_yarn); the
    # row's fixture (clamp 1.5) is refused; as released, test_gguf.py says and measures the YaRN difference.
    Family("gpt-oss", "GptOssForCausalLM", "gpt_oss", EXECUTORCH, EXECUTORCH, gguf=GGUF,
           gguf_fixture="gpt_oss_rounded_yarn"),
    # GGUF: as V2-Lite (greedy routing) it runs; with groups scored by their best expert (the row's fixture)
    # llama.cpp's deepseek2 scores them otherwise and it is refused.
    Family("DeepSeek-V2", "DeepseekV2ForCausalLM", "deepseek_v2", EXECUTORCH, EXECUTORCH, gguf=GGUF,
           gguf_fixture="deepseek_v2_lite"),
    Family("DeepSeek-V3", "DeepseekV3ForCausalLM", "deepseek_v3", EXECUTORCH, EXECUTORCH, gguf=GGUF),
    # GGUF: as released (no conv biases, no routed scaling) it runs; the row's fixture has both and is refused.
    Family("LFM2-MoE", "Lfm2MoeForCausalLM", "lfm2_moe", EXECUTORCH, EXECUTORCH, gguf=GGUF,
           gguf_fixture="lfm2_moe_released"),
    # GGUF: with DeltaNet key and value heads of one width (as released) it runs; the row's fixture has them
    # apart (16 and 12), which llama.cpp's qwen35moe cannot hold, and is refused.
    Family("Qwen3.5-MoE", "Qwen3_5MoeForCausalLM", "qwen3_5_moe", EXECUTORCH, EXECUTORCH, gguf=GGUF,
           gguf_fixture="qwen3_5_moe_released"),
]


def table() -> str:
    """The support table as Markdown: one row per family, each cell the check that proves it."""
    rows = ["| family | architecture | " + " | ".join(STAGES) + " |", "|---|---|" + "---|" * len(STAGES)]
    for f in FAMILIES:
        cells = [_cell(f.proof(s), f.fixture_of(s)) for s in STAGES]
        rows.append(f"| {f.name} | `{f.architecture}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _cell(proof: str, fixture: str) -> str:
    if proof == BENCH:
        return f"`{BENCH}`"
    test = proof.split("::")[1]  # parametrized by family: one run per fixture
    if proof == GGUF_REFUSED:
        return f"refused: `{test}` ({fixture})"
    return f"`{test}` ({fixture})"
