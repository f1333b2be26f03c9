"""Routing analysis: cache simulators and metrics on hand-built selections, then ``analyze`` end to
end on a tiny trained checkpoint and on its bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cosmoe_export.cli import cli
from cosmoe_export.errors import CosmoeError
from cosmoe_export.release import analyze
from cosmoe_export.release.analyze import eq8_loads_per_token
from cosmoe_export.release.cache_sim import belady_hits, hit_rate_curve, lru_hits, next_use
from runtime_py.routing_metrics import delta_uniform, exrep, replacement_count
from tests.conftest import add_tokenizer
from tests.cosmoe_export.training.test_train import make_tiny_checkpoint, write_corpus


def test_lru_vs_belady_cyclic_by_hand():
    # K=1, requests a b c a b c, cache of 2. LRU always evicts the expert needed next: 0 hits.
    # Belady: a, b, c miss; at c evict b (next use 4 > a's 3); a hits; at b evict a (never again,
    # c's next use is 5); c hits: 2 hits.
    sel = np.array([[0], [1], [2], [0], [1], [2]])
    assert lru_hits(sel, 2) == 0
    assert belady_hits(sel, 2, 3) == 2
    # A cache of all experts misses only the first use of each.
    assert lru_hits(sel, 3) == belady_hits(sel, 3, 3) == 3


def test_next_use_by_hand():
    sel = np.array([[0], [1], [0], [2]])
    np.testing.assert_array_equal(next_use(sel, 3), [[2, 1, 3], [2, 4, 3], [4, 4, 3], [4, 4, 4]])


def test_hits_first_inside_a_token():
    # K=2, cache of 2: token 1 = [2, 0]. Expert 0 is resident and used first, so loading 2
    # evicts 1, not 0: one hit. (Serving the requests in routing order would evict 0 and miss it.)
    sel = np.array([[0, 1], [2, 0]])
    assert lru_hits(sel, 2) == 1
    assert belady_hits(sel, 2, 3) == 1


def test_metrics_by_hand():
    # E=5, K=2: {0,1} -> {0,1} -> {0,2} -> {3,4}: replacements 0, 1, 2 -> H = 6 (Eq. 4 counts twice).
    sel = np.array([[0, 1], [0, 1], [0, 2], [3, 4]])
    assert replacement_count(sel, 5) == 6
    assert exrep(sel, 5) == pytest.approx(100 * 3 / 6)  # Eq. 5: floor(6/2) / (1*2*3)
    assert eq8_loads_per_token(sel[None], 5) == pytest.approx(3 / 3)  # Eq. 8: 3 loads over 3 transitions
    # loads .375 .25 .125 .125 .125 vs uniform .2: .175 + .05 + 3*.075 = .45
    assert delta_uniform(sel, 5) == pytest.approx(45.0)
    # LRU, cache 2 (= K, the Eq. 8 policy): t0 misses twice, t1 hits twice, t2 hits 0 and loads 2
    # (evicting 1), t3 misses twice: 3 hits of 8 = 8 - (2 cold misses + 3 replacements).
    assert lru_hits(sel, 2) == 3
    # Belady, cache 3: t2 loads 2 without evicting; t3 evicts 0 then 1 (never used again): 3 hits.
    assert belady_hits(sel, 3, 5) == 3
    # Cache 1: t0 leaves 1 resident; t1 hits 1 then loads 0; t2 hits 0 then loads 2; t3 misses:
    # 2 hits, and no policy can do better (t0 and t3 are forced misses, t1 and t2 need 2 slots).
    assert lru_hits(sel, 1) == belady_hits(sel, 1, 5) == 2


def test_lru_at_k_is_eq8_and_belady_bounds_lru():
    rng = np.random.default_rng(0)
    e, k, t = 8, 2, 400
    # Sticky routing: each token keeps its predecessor's experts with probability 0.6.
    rows = [rng.choice(e, k, replace=False)]
    for _ in range(t - 1):
        rows.append(rows[-1] if rng.random() < 0.6 else rng.choice(e, k, replace=False))
    sel = np.array(rows)
    misses_at_k = t * k - lru_hits(sel, k)
    assert misses_at_k == replacement_count(sel, e) // 2 + k  # LRU(C=K) is the Eq. 8 policy
    curve = hit_rate_curve(sel, e)
    assert curve["cache_size"] == list(range(1, e + 1))
    for lru, bel in zip(curve["lru"], curve["belady"], strict=True):
        assert lru <= bel + 1e-12
    assert curve["lru"] == sorted(curve["lru"]) and curve["belady"] == sorted(curve["belady"])
    assert curve["lru"][-1] == curve["belady"][-1] == 1 - len(np.unique(sel)) / (t * k)


@pytest.fixture(scope="module")
def tiny_bles(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    return make_tiny_checkpoint(tmp, "bles", steps=3), write_corpus(tmp / "held_out.txt", chars=30_000)


def test_analyze_end_to_end_json_and_plots(tiny_bles, tmp_path):
    ckpt, text = tiny_bles
    out, plots = tmp_path / "r.json", tmp_path / "plots"
    r = CliRunner().invoke(cli, ["analyze", str(ckpt), "--text", str(text), "--max-tokens", "1000",
                                 "--json", str(out), "--plots", str(plots)])
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output and "all" in r.output
    data = json.loads(out.read_text())
    assert data["tokens"] == 960 and data["windows"] == 15 and data["window_tokens"] == 64  # 1000 // 64 windows
    assert len(data["per_layer"]) == 4
    assert data["exrep"] == pytest.approx(np.mean([p["exrep"] for p in data["per_layer"]]))
    assert data["delta_uniform"] == pytest.approx(np.mean([p["delta_uniform"] for p in data["per_layer"]]))
    assert 0 <= data["exrep"] <= 100 and data["perplexity"] > 1
    # Eq. 8's loads are named apart from the runtime's measured loads_per_token.
    assert "loads_per_token" not in data and all("loads_per_token" not in p for p in data["per_layer"])
    assert data["eq8_loads_per_token"] == pytest.approx(sum(p["eq8_loads_per_token"] for p in data["per_layer"]))
    curve = data["hit_rate_curve"]
    assert curve["cache_size"] == list(range(1, 9)) and len(curve["lru"]) == len(curve["belady"]) == 8
    assert all(a <= b + 1e-12 for a, b in zip(curve["lru"], curve["belady"], strict=True))
    for p in data["per_layer"]:
        assert sum(p["expert_load"]) == pytest.approx(1.0, abs=1e-5)
    assert sorted(p.name for p in plots.iterdir()) == ["delta_uniform.png", "hit_rate.png", "selection_map.png"]
    assert all((plots / n).read_bytes()[:4] == b"\x89PNG" for n in ("hit_rate.png", "selection_map.png"))


def test_analyze_bundle_routes_like_its_checkpoint(tiny_bles, tmp_path):
    ckpt, text = tiny_bles
    bundle = tmp_path / "bundle"
    runner = CliRunner()
    assert runner.invoke(cli, ["-q", "split", str(ckpt), "-o", str(bundle)]).exit_code == 0
    reports = []
    for path in (ckpt, bundle):
        r = runner.invoke(cli, ["analyze", str(path), "--text", str(text), "--max-tokens", "500", "--json", "-"])
        assert r.exit_code == 0, r.output
        reports.append(json.loads(r.stdout))
    a, b = reports
    assert (a["kind"], b["kind"]) == ("checkpoint", "bundle")
    for key in ("exrep", "delta_uniform", "hit_rate_curve", "tokens"):
        assert a[key] == b[key]
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)


def test_analyze_errors(tmp_path):
    r = CliRunner().invoke(cli, ["analyze", str(tmp_path / "nope"), "--text", __file__])
    assert r.exit_code == 2 and "error:" in r.output


def test_analyze_reports_the_moe_layers_of_a_plan_with_dense_layers(hf_checkpoint, tmp_path):
    """Qwen3-MoE with a dense layer 0: the routing metrics are over the MoE layer only, and a
    selection map of the dense layer is refused in one line."""
    ckpt = hf_checkpoint("qwen3_moe_dense")
    text = tmp_path / "t.txt"
    text.write_text("the router picks two experts for every token of the text\n" * 40)
    add_tokenizer(ckpt, text)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(cli, ["analyze", str(ckpt), "--text", str(text), "--json", str(out),
                                 "--plots", str(tmp_path / "plots")])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert [p["layer"] for p in report["per_layer"]] == [1]
    assert report["exrep"] == report["per_layer"][0]["exrep"]
    with pytest.raises(CosmoeError, match="layer 0 is not an MoE layer of this model"):
        analyze.analyze(path=str(ckpt), text=text, plots=tmp_path / "p2", plot_layer=0)


def test_the_head_in_slices_gives_the_perplexity_of_whole_logits(tiny_bles, monkeypatch):
    """run_routing applies the output head HEAD_ROWS positions at a time (a batch's logits at a 50k
    vocabulary are GBs); the NLL is the cross entropy of the whole forward's logits, and hidden + head
    is the forward."""
    import torch
    import torch.nn.functional as F
    ckpt, _ = tiny_bles
    model = analyze.load(str(ckpt)).model
    ids = torch.randint(0, model.config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(ids)  # [3, 37, V]
        assert torch.equal(model.head(model.hidden(ids)[0]), logits)
    whole = float(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))
    monkeypatch.setattr(analyze, "HEAD_ROWS", 5)  # 108 positions: 21 slices of 5 and one of 3
    sels, nll = analyze.run_routing(model, ids)
    assert nll == pytest.approx(whole, rel=1e-6)
    assert all(s.shape == (3, 37, model.config.num_experts_per_tok) for s in sels.values())
