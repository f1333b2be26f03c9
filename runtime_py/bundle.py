"""Read and validate a split bundle (format v1, or v2 with a layer plan). Safe by construction: the
manifest is size-capped and schema-checked, every path must stay inside the bundle (symlinks included), and every file's
size is checked on open; its sha256 on the first load since the bundle was opened (``hash_due``,
``check_sha256``: the one check every reader uses); ``verify_integrity`` re-hashes everything."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import jsonschema

from runtime_py import format as fmt
from runtime_py import quant
from runtime_py.config import CosmoeConfig
from runtime_py.errors import FormatError, IntegrityError

# When a load compares a file's sha256 with the manifest: on the first load of each file since the
# bundle was opened, on every load, or never (its size is checked on every load whatever this says).
HASH_CHECKS = ("first", "always", "never")


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, POSIX separators
    role: str
    bytes: int
    sha256: str
    dtype: str | None = None
    layer: int | None = None
    expert: int | None = None
    tensors: dict | None = None  # quantized bundles: canonical name -> encoding (runtime_py.quant)
    target: str | None = None  # programs: runtime_py.format.PROGRAM_TARGETS
    unit: str | None = None  # programs: "embed" | "layer" | "head" | "expert"; "model" (gguf)
    precision: str | None = None  # programs: "fp32", "8da4w", "matmulnbits-int4", ...
    max_tokens: int | None = None  # programs: most tokens one call takes (T of embed/layer/head, N of an expert)
    cache: str | None = None  # layer programs: "prefix" (the filled cache slots) or "context" / None (all)
    gguf: dict | None = None  # the gguf program: architecture, tensor_types, fallbacks (lower/gguf_target.py)

    def encodings(self) -> dict[str, quant.Encoding] | None:
        """How each tensor of this file is stored; None for float bundles (all in ``dtype``)."""
        if self.tensors is None:
            return None
        return {name: quant.Encoding.from_json(e) for name, e in self.tensors.items()}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_relative_path(rel: str, where: str) -> None:
    """A manifest path must be relative, POSIX, and free of '..' segments."""
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise FormatError(f"{where}: path {rel!r} is absolute; bundle paths must be relative to the bundle")
    if ".." in p.parts or "\\" in rel:
        raise FormatError(f"{where}: path {rel!r} leaves the bundle ('..' or backslash); rebuild the bundle")


class Bundle:
    """An opened, validated bundle. Cheap: reads only manifest.json and stats files."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest
        self.config = CosmoeConfig.from_dict(manifest["model"], source=f"{root / fmt.MANIFEST_NAME} (model)")
        self.files = [FileEntry(**f) for f in manifest["files"]]
        self._by_path = {f.path: f for f in self.files}
        self._hashed: set[str] = set()
        self.experts = {(f.layer, f.expert): f for f in self.files if f.role == "expert"}
        self._check_files()

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> Bundle:
        root = Path(path)
        mpath = root / fmt.MANIFEST_NAME
        if not root.is_dir():
            raise FormatError(f"{root}: not a bundle directory (no such directory)")
        if not mpath.is_file():
            raise FormatError(f"{mpath}: missing; is {root} a bundle written by `cosmoe-export split`?")
        size = mpath.stat().st_size
        if size > fmt.MAX_MANIFEST_BYTES:
            raise FormatError(f"{mpath}: {size} bytes exceeds the {fmt.MAX_MANIFEST_BYTES}-byte manifest limit")
        try:
            manifest = json.loads(mpath.read_bytes().decode("utf-8"), object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, duplicate keys, 5,000-digit ints, deep nesting
            raise FormatError(f"{mpath}: not valid UTF-8 JSON ({str(e)[:200]!r}); rebuild the bundle") from None
        validate_manifest(manifest, where=str(mpath))
        return cls(root, manifest)

    def _check_files(self) -> None:
        mpath = self.root / fmt.MANIFEST_NAME
        root_real = self.root.resolve()
        seen = set()
        for f in self.files:
            check_relative_path(f.path, str(mpath))
            if f.path in seen:
                raise FormatError(f"{mpath}: file {f.path!r} listed twice")
            seen.add(f.path)
            real = (self.root / f.path).resolve()
            if root_real != real and root_real not in real.parents:
                raise FormatError(f"{mpath}: {f.path!r} resolves outside the bundle (symlink?) to {real}")
        cfg = self.config
        # Expert files exist for the MoE layers of the plan only: a dense layer has none.
        want = {(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)}
        if set(self.experts) != want:
            missing = sorted(want - set(self.experts))[:5]
            if missing:
                raise FormatError(f"{mpath}: expert files do not cover every (layer, expert); missing e.g. {missing}")
            extra = sorted(set(self.experts) - want)[:5]
            raise FormatError(f"{mpath}: expert files listed for layers without routed experts, e.g. {extra}; "
                              "rebuild the bundle")
        if not any(f.role == "backbone" for f in self.files):
            raise FormatError(f"{mpath}: no backbone file listed")

    # ---- access --------------------------------------------------------------------------------
    def path_of(self, entry: FileEntry) -> Path:
        return self.root / entry.path

    @property
    def backbone(self) -> FileEntry:
        return next(f for f in self.files if f.role == "backbone")

    @property
    def quantization(self) -> dict | None:
        """The manifest's ``quantization`` section; None for a float bundle."""
        return self.manifest.get(fmt.QUANTIZATION_KEY)

    @property
    def tokenizer_dir(self) -> Path | None:
        tok = self.manifest.get("tokenizer")
        return self.root / fmt.TOKENIZER_DIR if tok and tok.get("files") else None

    def checked_path(self, entry: FileEntry) -> Path:
        """The file's path after a size check: a truncated or replaced shard never loads."""
        p = self.path_of(entry)
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise IntegrityError(f"{p}: missing; the bundle is incomplete, rebuild it") from None
        if size != entry.bytes:
            raise IntegrityError(f"{p}: {size} bytes on disk, manifest says {entry.bytes}; the file changed "
                                 "after the bundle was written, rebuild it")
        return p

    def hash_due(self, entry: FileEntry, when: str = "first") -> bool:
        """Whether this load of ``entry`` must check its sha256; ``when`` is one of HASH_CHECKS."""
        if when not in HASH_CHECKS:
            raise FormatError(f"check_hash must be one of {HASH_CHECKS}, not {when!r}")
        return when == "always" or (when == "first" and entry.path not in self._hashed)

    def check_sha256(self, entry: FileEntry, digest: str | None = None) -> None:
        """IntegrityError unless the file's sha256 is the manifest's: ``digest`` of the bytes a reader
        already holds (no second read), else hashed from disk."""
        p = self.path_of(entry)
        if (digest if digest is not None else sha256_file(p)) != entry.sha256:
            raise IntegrityError(f"{p}: sha256 differs from the manifest; the file changed after the bundle was "
                                 "written. Rebuild it or run `cosmoe-export verify --integrity`")
        self._hashed.add(entry.path)

    def hashed_path(self, entry: FileEntry, when: str = "first") -> Path:
        """The file's path after a size check and, when due (``hash_due``), a sha256 check: for readers
        of a whole file, where hashing it costs little next to the work on its tensors."""
        p = self.checked_path(entry)
        if self.hash_due(entry, when):
            self.check_sha256(entry)
        return p

    def verify_integrity(self) -> list[str]:
        """Re-hash every file; returns one problem line per bad file (empty when intact)."""
        problems = []
        for f in self.files:
            p = self.path_of(f)
            try:
                self.checked_path(f)
            except IntegrityError as e:
                problems.append(str(e))
                continue
            if sha256_file(p) != f.sha256:
                problems.append(f"{p}: sha256 differs from the manifest; the file was modified")
        return problems


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    # json keeps the last of two equal keys silently; two "files" lists would mean two bundles.
    out = dict(pairs)
    if len(out) != len(pairs):
        dup = next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))
        raise ValueError(f"key {dup!r} appears twice")
    return out


def validate_manifest(manifest: object, *, where: str) -> None:
    """Raise FormatError unless ``manifest`` is a manifest of a version this runtime reads (<= FORMAT_VERSION)."""
    if not isinstance(manifest, dict):
        raise FormatError(f"{where}: manifest must be a JSON object")
    if manifest.get("format") != fmt.FORMAT_NAME:
        raise FormatError(f"{where}: format is {manifest.get('format')!r}, expected {fmt.FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > fmt.FORMAT_VERSION:
        raise FormatError(f"{where}: format version {version} is newer than this runtime reads "
                          f"({fmt.FORMAT_VERSION}); upgrade cosmoe-export")
    model = manifest.get("model")
    newer = [k for k in fmt.V2_MODEL_KEYS if k in model] if isinstance(model, dict) else []
    if newer and isinstance(version, int) and version < fmt.PLAN_VERSION:
        raise FormatError(f"{where}: model.{newer[0]} needs format version {fmt.PLAN_VERSION}, the manifest "
                          f"says {version}; rebuild the bundle")
    try:
        jsonschema.validate(manifest, fmt.manifest_schema())
    except jsonschema.ValidationError as e:
        loc = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise FormatError(f"{where}: invalid manifest at {loc}: {e.message}") from None
    for f in manifest["files"]:
        check_relative_path(f["path"], where)
        if f["role"] == "expert" and ("layer" not in f or "expert" not in f):
            raise FormatError(f"{where}: expert file {f['path']!r} lacks its layer or expert index")
        # A quantized bundle says how every tensor is stored; a float bundle never does. A file
        # without ``tensors`` in a quantized bundle would be read as float: refuse it instead.
        quantized = fmt.QUANTIZATION_KEY in manifest
        if f["role"] in ("backbone", "expert") and ("tensors" in f) != quantized:
            raise FormatError(f"{where}: file {f['path']!r} {'has' if 'tensors' in f else 'lacks'} per-tensor "
                              f"encodings but the manifest {'is' if quantized else 'is not'} quantized; "
                              "rebuild the bundle")
