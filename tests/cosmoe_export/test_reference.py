"""cosmoe_export/reference.py: the reference models hold one decoder layer at a time when a model
does not fit in memory (issue 16), and compute exactly what the whole model computes."""

from __future__ import annotations

from functools import partial

import torch

from cosmoe_export.importers.sources import open_source
from cosmoe_export.reference import TorchRuntime, fits_in_memory, float_bytes, source_model
from runtime_py.bundle import Bundle
from runtime_py.memory import memory_available
from tests.conftest import _run_cli


def _materialized(model) -> list[int]:
    """The decoder layers whose weights are in memory (not on the meta device)."""
    return [i for i, layer in enumerate(model.layers) if any(not p.is_meta for p in layer.parameters())]


def test_a_streamed_source_model_computes_the_whole_models_logits_one_layer_at_a_time(hf_checkpoint):
    source = open_source(str(hf_checkpoint("mixtral")), hash_files=False)
    whole = source_model(source, streamed=False)
    streamed = source_model(source, streamed=True)
    assert _materialized(streamed) == [] and _materialized(whole) == list(range(len(whole.layers)))
    seen = []
    for i, layer in enumerate(streamed.layers):  # runs after the hook that fills the layer
        layer.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, _materialized(streamed))))
    experts_held = []  # experts of the layer in memory once the MoE has the one it asked for

    def counted(e, moe, lookup):
        expert = lookup(e)
        experts_held.append(sum(any(not p.is_meta for p in x.parameters()) for x in moe.experts))
        return expert

    for layer in streamed.layers:
        layer.routed.expert_lookup = partial(counted, moe=layer.routed, lookup=layer.routed.expert_lookup)
    ids = torch.randint(0, source.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = whole(ids), streamed(ids)
    assert torch.equal(want, got)
    assert len(experts_held) >= len(streamed.layers) and set(experts_held) == {1}  # the one before is gone
    assert seen == [(i, [i]) for i in range(len(streamed.layers))]  # only the running layer is held
    assert _materialized(streamed) == []  # and none once the forward is done
    with torch.inference_mode():  # a second forward reads the layers again
        assert torch.equal(streamed(ids), want)
    # bf16 rounding happens as the whole model's does
    with torch.inference_mode():
        assert torch.equal(source_model(source, torch.bfloat16, streamed=False)(ids),
                           source_model(source, torch.bfloat16, streamed=True)(ids))


def test_a_streamed_bundles_math_holds_one_expert_at_a_time_and_loads_each_once(tmp_path):
    out = tmp_path / "b"
    _run_cli("-q", "split", "tiny", "-o", str(out))
    bundle = Bundle.open(out)
    keep, stream = TorchRuntime(bundle), TorchRuntime(bundle, stream_experts=True)
    held, asked = [], []
    for i, layer in enumerate(stream.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: held.append({key[0] for key in stream.store.resident}))
    get = stream.store.get
    stream.store.get = lambda layer, e: asked.append(list(stream.store.resident)) or get(layer, e)
    ids = torch.randint(0, bundle.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(keep.logits(ids), stream.logits(ids))
    assert all(layers == set() for layers in held)  # no earlier layer's experts when a layer starts
    assert len(asked) > bundle.config.num_experts and all(r == [] for r in asked)  # none held when one is asked for
    assert stream.store.resident == [] and len(keep.store.resident) > bundle.config.num_experts
    assert stream.store.loads == keep.store.loads  # a forward uses each selected expert once: no reloads


def test_memory_available_sees_a_data_limit():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    assert memory_available() > 0
    # The limit the process runs under bounds it: set one just above what it holds now, in a child.
    import subprocess
    import sys
    code = ("import resource; from cosmoe_export.reference import fits_in_memory\n"
            "from runtime_py.memory import memory_available, rss_bytes\n"
            "resource.setrlimit(resource.RLIMIT_DATA, (rss_bytes() + (64 << 20), resource.RLIM_INFINITY))\n"
            "print(memory_available() <= 64 << 20, fits_in_memory(40 << 20), fits_in_memory(16 << 20))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "True"]
    assert float_bytes(open_source("tiny")) > 0 and fits_in_memory(1)


def test_large_frees_go_back_to_the_kernel():
    """Why streamed stages fix glibc's mmap threshold (runtime_py.memory.give_back_large_frees): once
    a 14 MiB block has been freed, glibc serves 4 MiB blocks from the heap and freeing every other
    one returns nothing; with the threshold fixed it returns all of them. In children: the setting
    holds for the whole process."""
    import subprocess
    import sys
    code = ("import sys, torch; from runtime_py.memory import give_back_large_frees, rss_bytes\n"
            "assert sys.argv[1] == 'default' or give_back_large_frees()\n"
            "w = torch.ones(14 << 18); del w\n"
            "ts = [torch.ones(1 << 20) for _ in range(100)]; held = rss_bytes(); del ts[::2]\n"
            "print((held - rss_bytes()) >> 20)")
    freed = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                      check=True).stdout) for mode in ("default", "fixed")}
    assert freed["default"] < 50 and freed["fixed"] >= 190, freed  # MiB of the 200 freed
