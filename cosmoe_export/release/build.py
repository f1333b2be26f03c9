"""``build``: one recipe -> one verified bundle and its report (docs/REPORT.md).

Stages, each writing its own directory of the work directory (default: OUT.work beside OUT):

    split -> quantize (if the recipe has [quantize]) -> lower (if it has targets)
          -> verify -> analyze -> budget_curve

Every stage leaves a stamp: the sha256 of everything its output depends on (the source's file
hashes or the input bundle's manifest, which lists every file's sha256; its recipe section; the
sha256 of its texts; the versions of the tools, this package's included). A stage whose stamp
matches and whose output is still there is skipped. Thresholds are input to no stage: the verify
stage stores measurements (verify.measure) and the build gates them (cosmoe_export/release/gates.py, the
same gates as `verify`), so rerunning after a threshold change re-exports and re-measures nothing.

OUT is replaced atomically with report.json, report.md, plots/ and, only when every gate passed,
bundle/ (hard links to the last stage's files, re-hashed against the manifest first): a bundle in
OUT is a verified bundle. A failed build leaves the report and names the candidate bundle in the
work directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cosmoe_export.atomic import atomic_dir
from cosmoe_export.errors import CosmoeError
from cosmoe_export.importers.sources import Source, open_source
from cosmoe_export.release import budget_curve as curves
from cosmoe_export.release import gates as gating
from cosmoe_export.release import report as rep
from cosmoe_export.release import report_plots
from cosmoe_export.release.recipe import Recipe, resolve_source, with_source
from cosmoe_export.versions import tool_versions
from runtime_py import format as fmt
from runtime_py.backends import BACKENDS, RESIDENT_ONLY, native_binary
from runtime_py.bundle import Bundle, sha256_file
from runtime_py.memory import peak_rss_bytes, reset_peak_rss

# Every package whose version can change a byte or a number of the build (stage keys, manifest, report).
TOOLS = ("transformers", "tokenizers", "numpy", "executorch", "torchao", "onnx", "onnxscript", "onnxruntime",
         "matplotlib")
STAMP_SUFFIX = ".stamp.json"
RESULT = "result.json"  # what measuring stages write into their directory
PLOTS = "plots"


@dataclass(frozen=True)
class BuildResult:
    out: Path
    work: Path
    passed: bool
    bundle: Path | None  # OUT/bundle when every gate passed, else None
    candidate: Path  # the last stage's bundle in the work directory
    report: dict[str, Any]


def build(*, recipe: Recipe, source: str | None = None, out: Path, work: Path | None = None,
          progress: bool = True, log: Callable[[str], None] = lambda line: None) -> BuildResult:
    """Build and gate ``recipe`` (``source`` overrides its ``source.model``) into ``out``."""
    recipe = with_source(recipe, resolve_source(source, Path.cwd()) if source else None)
    if recipe.source.model is None:
        where = recipe.path or recipe.name
        raise CosmoeError(f"{where}: names no source model (source.model); pass --source CHECKPOINT_DIR or a preset")
    out = Path(out)
    _check_out(out)
    work = Path(work) if work is not None else out.with_name(out.name + ".work")
    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(work):
            return _Build(recipe, work, progress, log).run(out)
    except CosmoeError:
        # Bad input found by a stage (a truncated shard, NaN weights...): a work directory this call
        # created holds nothing worth keeping, and must not be left behind looking like a build.
        if created:
            shutil.rmtree(work, ignore_errors=True)
        raise


@contextlib.contextmanager
def _locked(work: Path) -> Iterator[None]:
    """One build per work directory: two would replace each other's stage outputs mid-stage. The
    kernel drops the lock when the process ends, however it ends."""
    with open(work / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CosmoeError(f"{work}: another build is using this work directory; wait for it or pass "
                              "another --work") from None
        yield


class _Build:
    def __init__(self, recipe: Recipe, work: Path, progress: bool, log: Callable[[str], None]) -> None:
        self.recipe, self.work, self.progress, self.log = recipe, work, progress, log
        self.tools = tool_versions(*TOOLS)
        # The exporter's own code counts through its version ("cosmoe-export" in tools): after editing
        # the code without a version change, build into a fresh --work directory.
        self.env = {"tools": self.tools}
        self.stages: dict[str, dict[str, Any]] = {}

    # ---- the stage mechanism --------------------------------------------------------------------
    def stage(self, name: str, inputs: dict[str, Any], run: Callable[[Path], None]) -> Path:
        """Run ``run(out)`` unless the stamp says its inputs are unchanged and ``out`` is intact."""
        out, stamp_path = self.work / name, self.work / f"{name}{STAMP_SUFFIX}"
        key = _sha256_json({"stage": name, **inputs, **self.env})
        stamp = _read_json(stamp_path)
        if stamp is not None and stamp.get("key") == key and stamp.get("output") == _fingerprint(out):
            self.stages[name] = {"status": "skipped", "seconds": 0.0, "peak_rss_mb": None, "key": key}
            self.log(f"{name}: inputs unchanged, reusing {out}")
            return out
        stamp_path.unlink(missing_ok=True)  # a stage killed half-way must never look done
        self.log(f"{name}: running")
        # The stage's own peak: this process's high-water mark, reset as it starts (None where the
        # kernel refuses the reset). Pool workers (--jobs) are processes of their own, not counted.
        windowed = reset_peak_rss()
        t0 = time.perf_counter()
        run(out)
        seconds = time.perf_counter() - t0
        peak = round(peak_rss_bytes() / 1e6, 1) if windowed else None
        _write_atomic(stamp_path, json.dumps({"stage": name, "key": key, "output": _fingerprint(out),
                                              "inputs": inputs, **self.env}, indent=2) + "\n")
        self.stages[name] = {"status": "ran", "seconds": round(seconds, 3), "peak_rss_mb": peak, "key": key}
        self.log(f"{name}: done in {seconds:.1f} s" + (f", peak RSS {peak:,.0f} MB" if peak is not None else ""))
        return out

    def text(self, paths: tuple[Path, ...], name: str) -> tuple[Path, str] | tuple[None, None]:
        """The recipe's text files concatenated into one file of the work directory: (path, sha256)."""
        if not paths:
            return None, None
        parts = []
        for p in paths:
            try:
                parts.append(p.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise CosmoeError(f"{p}: cannot read this recipe text as UTF-8 ({e}); fix the recipe's path") from None
        data = "\n\n".join(parts).encode("utf-8")
        path = self.work / "texts" / f"{name}.txt"
        path.parent.mkdir(exist_ok=True)
        if not path.is_file() or path.read_bytes() != data:
            _write_atomic(path, data)
        return path, hashlib.sha256(data).hexdigest()

    # ---- stages ----------------------------------------------------------------------------------
    def split(self, source: Source) -> Path:
        from cosmoe_export.importers.split import split
        dtype = self.recipe.split.dtype

        def run(out: Path) -> None:
            split(source=source, out=out, dtype=fmt.DTYPE_ALIASES[dtype] if dtype else None, force=True,
                  progress=self.progress)
        return self.stage("split", {"source": _identity(source), "split": dataclasses.asdict(self.recipe.split)}, run)

    def quantize(self, bundle: Path) -> Path:
        from cosmoe_export.quantization.quantize import quantize
        q = self.recipe.quantize
        assert q is not None
        calib, calib_sha = self.text(q.calibration, "calibration")
        config = q.config(calib)
        section = {**dataclasses.asdict(q), "calibration": calib_sha}

        def run(out: Path) -> None:
            quantize(bundle=bundle, out=out, config=config, force=True, progress=self.progress,
                     executor=self.recipe.executor.config())
        # The executor is no input: every executor and job count writes the same bytes.
        return self.stage("quantize", {"bundle": _fingerprint(bundle), "quantize": section}, run)

    def lower(self, bundle: Path) -> Path:
        from cosmoe_export.lower import lower
        targets = list(self.recipe.lower.targets)

        def run(out: Path) -> None:
            # lower adds programs to a bundle in place; here it works on links to the input's files
            # (lower replaces files by rename, never writes into them), published whole at the end.
            with atomic_dir(out, force=True) as tmp:
                _link_tree(bundle, tmp)
                lower(bundle_path=tmp, targets=targets, progress=self.progress,
                      executor=self.recipe.executor.config())
        return self.stage("lower", {"bundle": _fingerprint(bundle), "targets": targets}, run)

    def verify(self, bundle: Path, source: Source) -> Path:
        from cosmoe_export.release.verify import measure
        v = self.recipe.verify
        reference = v.reference or self.recipe.source.model
        ref_identity = _identity(source) if reference == self.recipe.source.model else \
            _identity(open_source(reference, allow_pickle=self.recipe.source.allow_pickle))
        text, text_sha = self.text(v.text, "verify")
        section = {**dataclasses.asdict(v), "text": text_sha, "reference": ref_identity,
                   **_native_identity(v.backends)}
        section.pop("gates")  # the build gates the stored measurements (run)

        def run(out: Path) -> None:
            # One measure call: the reference runs once for all backends.
            result = measure(bundle_path=bundle, reference=reference, backend=list(v.backends),
                             new_tokens=v.new_tokens, text=text, max_tokens=v.max_tokens, budget=v.budget_bytes,
                             experts_per_layer=v.experts_per_layer, policy=v.policy,
                             torch_activations=v.torch_activations, allow_pickle=self.recipe.source.allow_pickle)
            if text is not None:
                result["text"] = {**result["text"], "file": "verify.txt", "sha256": text_sha}
            result["bundle"] = bundle.name
            result["reference"] = str(reference)
            result.update(budget=v.budget, experts_per_layer=v.experts_per_layer, policy=v.policy)
            _write_result(out, result)
        return self.stage("verify", {"bundle": _fingerprint(bundle), "verify": section}, run)

    def analyze(self, bundle: Path) -> Path | None:
        text, text_sha = self.text(self.recipe.analyze_text, "analyze")
        if text is None:
            return None
        a = self.recipe.analyze
        section = {**dataclasses.asdict(a), "text": text_sha, "title": self.recipe.name}

        def run(out: Path) -> None:
            from cosmoe_export.release.analyze import load, routing_report, selection_map_layer
            from cosmoe_export.text import encode_with, windows
            loaded = load(str(bundle))
            cfg = loaded.config
            ids = encode_with(loaded.tokenizer_path, text, vocab_size=cfg.vocab_size, max_tokens=a.max_tokens,
                              purpose="the recipe's analyze text", owner=bundle)
            batch = windows(ids, cfg.max_position_embeddings)  # [B, T]
            numbers, sels = routing_report(loaded.model, batch)  # sels: MoE layer -> [B, T, K]
            layer = selection_map_layer(cfg, a.layer, f"{self.recipe.path}: analyze.layer")
            with atomic_dir(out, force=True) as tmp:
                report_plots.routing(tmp / PLOTS, numbers, sels[layer][0], layer, self.recipe.name)
                (tmp / RESULT).write_text(json.dumps({**numbers, "selection_map_layer": layer}, indent=2) + "\n")
        return self.stage("analyze", {"bundle": _fingerprint(bundle), "analyze": section}, run)

    def budget_curve(self, bundle: Path) -> Path | None:
        c, v = self.recipe.budget_curve, self.recipe.verify
        if not c.enabled:
            return None
        policy = c.policy or (v.policy if v.policy != "resident" else "lru")
        text, _ = self.text(v.text, "verify")
        prompt = _prompt_ids(Bundle.open(bundle), text, c.prompt_tokens, c.new_tokens)
        backends = [b for b in v.backends if b not in RESIDENT_ONLY]  # a curve needs budgets
        section = {**dataclasses.asdict(c), "policy": policy, "backends": backends, "prompt": prompt,
                   **_native_identity(v.backends)}

        def run(out: Path) -> None:
            curve = curves.measure(bundle_path=bundle, backends=backends, policy=policy, prompt_ids=prompt,
                                   new_tokens=c.new_tokens, repeats=max(1, c.repeats), points=c.points,
                                   progress=self.progress)
            _write_result(out, curve)
        return self.stage("budget_curve", {"bundle": _fingerprint(bundle), "budget_curve": section}, run)

    # ---- the whole build -------------------------------------------------------------------------
    def run(self, out: Path) -> BuildResult:
        r = self.recipe
        source = open_source(r.source.model, allow_pickle=r.source.allow_pickle)
        arch = source.provenance.get("architecture", "CosmoeForCausalLM")
        if r.source.architecture is not None and arch != r.source.architecture:
            raise CosmoeError(f"{r.source.model}: is a {arch} checkpoint; recipe {r.path or r.name} is for "
                              f"{r.source.architecture} (pick the recipe for {arch})")
        bundle = self.split(source)
        if r.quantize is not None:
            bundle = self.quantize(bundle)
        if r.lower.targets:
            bundle = self.lower(bundle)
        measured = _read_json(self.verify(bundle, source) / RESULT)
        analyzed = self.analyze(bundle)
        curved = self.budget_curve(bundle)
        integrity = Bundle.open(bundle).verify_integrity()  # the release gate re-hashes every byte it ships

        plots_dir = self.work / "report-plots"
        shutil.rmtree(plots_dir, ignore_errors=True)
        plots: list[Path] = []
        if analyzed is not None:
            plots += sorted((analyzed / PLOTS).glob("*.png"))
        curve = _read_json(curved / RESULT) if curved is not None else None
        if curve is not None:
            plots_dir.mkdir(parents=True)
            plots.append(report_plots.budget_curve(plots_dir, curve, r.name))
        routing = _read_json(analyzed / RESULT) if analyzed is not None else None
        opened = Bundle.open(bundle)
        limits = gating.thresholds(gating.precision_class(opened), dict(r.verify.gates))
        report = rep.make_report(recipe=_recipe_info(r), bundle=_bundle_info(opened, r.source.model),
                                 integrity=integrity, integrity_gate=gating.integrity(integrity), verify=measured,
                                 limits=limits, gates=[gating.evaluate(m, limits) for m in measured["results"]],
                                 routing=routing, curve=curve, plots=[f"{PLOTS}/{p.name}" for p in plots],
                                 stages=self.stages, tools=self.tools)
        report["bundle"]["path"] = "bundle" if report["passed"] else str(bundle)
        with atomic_dir(out, force=True) as tmp:
            if report["passed"]:
                _link_tree(bundle, tmp / "bundle")
            (tmp / PLOTS).mkdir()
            for p in plots:
                shutil.copyfile(p, tmp / PLOTS / p.name)
            rep.write_json(report, tmp / "report.json")
            (tmp / "report.md").write_text(rep.markdown(report), encoding="utf-8")
        return BuildResult(out, self.work, report["passed"], out / "bundle" if report["passed"] else None, bundle,
                           report)


# ---- helpers -------------------------------------------------------------------------------------
def _check_out(out: Path) -> None:
    """OUT is replaced as a whole: refuse anything that is not an earlier build's output."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").is_file())):
        raise CosmoeError(f"{out}: exists and is not a build output (no report.json); choose another -o or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)


def _identity(source: Source) -> dict[str, Any]:
    """What a source's bytes are: file hashes for checkpoints (tokenizer included), name and seed for presets."""
    tok = {p.name: sha256_file(p) for p in source.tokenizer_files}
    return {"provenance": source.provenance, "config": source.config.to_dict(), "tokenizer": tok}


def _fingerprint(path: Path) -> str | None:
    """A bundle: its manifest's sha256 (the manifest lists every file's sha256) once every listed file
    has its recorded size; a result directory: the sha256 of its files. None when missing or broken."""
    if not path.is_dir():
        return None
    manifest = path / fmt.MANIFEST_NAME
    if manifest.is_file():
        try:
            bundle = Bundle.open(path)
            for f in bundle.files:
                bundle.checked_path(f)
        except CosmoeError:
            return None
        return sha256_file(manifest)
    h = hashlib.sha256()
    for p in sorted(x for x in path.rglob("*") if x.is_file()):
        h.update(str(p.relative_to(path)).encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def _link_tree(src: Path, dst: Path) -> None:
    """dst mirrors src with hard links (a copy where the file system has none)."""
    for p in sorted(src.rglob("*")):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, target)
        except OSError:
            shutil.copyfile(p, target)


def _prompt_ids(bundle: Bundle, text: Path | None, n: int, new_tokens: int) -> list[int]:
    """The first n tokens of the verification text, or fixed pseudo-random ids without one."""
    cfg = bundle.config
    n = max(1, min(n, cfg.max_position_embeddings - new_tokens - 1))
    if text is not None:
        from cosmoe_export.text import encode_file
        return encode_file(bundle, text, max_tokens=n, purpose="the budget curve's prompt")
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()


def _native_identity(backends: tuple[str, ...]) -> dict[str, Any]:
    """For the stages that measure on the native runner: the sha256 of its binary, which is a tool
    without a version number (a rebuilt runner measures again); on llama.cpp, llama-cpp-python's version."""
    out: dict[str, Any] = {}
    if "native" in backends:
        path = native_binary()
        out["native_runner"] = sha256_file(path) if path is not None else None
    if "llamacpp" in backends:
        out["llama_cpp"] = tool_versions("llama-cpp-python")["llama-cpp-python"]
    return out


def _recipe_info(r: Recipe) -> dict[str, Any]:
    if r.path is not None:
        sha = sha256_file(r.path)
    else:
        sha = _sha256_json(dataclasses.asdict(r))
    return {"name": r.name, "description": r.description, "file": str(r.path) if r.path else None, "sha256": sha}


def _bundle_info(bundle: Bundle, source: str) -> dict[str, Any]:
    by_target: dict[str, set[str]] = {}
    for f in bundle.files:
        if f.role == "program" and f.target and f.precision:
            by_target.setdefault(f.target, set()).add(f.precision)
    programs = {backend: by_target[t] for backend, t in BACKENDS.items() if t in by_target}
    q = bundle.quantization
    return {
        "source": source,
        "files": len(bundle.files) + 1,
        "bytes": sum(f.bytes for f in bundle.files),
        "manifest_sha256": sha256_file(bundle.root / fmt.MANIFEST_NAME),
        "dtype": bundle.backbone.dtype,
        "precision": gating.precision_class(bundle),
        "quantization": {k: q[k] for k in ("experts", "backbone", "group_size", "rounding")} if q else None,
        "targets": sorted({f.target for f in bundle.files if f.role == "program" and f.target}),
        "programs_by_backend": {k: sorted(v) for k, v in programs.items()},
    }


def _sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def _write_result(out: Path, data: dict[str, Any]) -> None:
    with atomic_dir(out, force=True) as tmp:
        (tmp / RESULT).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
