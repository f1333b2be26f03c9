"""The one writer of a bundle's ``manifest.json``: ``split``, ``quantize`` and ``lower`` all build theirs here.

A manifest is written in three steps, in this order: its head (model, tokenizer, quantization,
provenance), its files, then the write. The writer refuses any other order (files added twice, a
write before the files, anything after the write), validates the result against the format
(runtime_py.bundle.validate_manifest, the readers' own check) before a byte reaches disk, and
replaces the file atomically (write beside, rename), so a reader sees the old manifest or the new.
Key order is fixed here, which keeps the bytes the same for the same bundle.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from runtime_py import format as fmt
from runtime_py.bundle import validate_manifest


class ManifestWriter:
    def __init__(self, *, model: dict, tokenizer: dict | None, provenance: dict,
                 quantization: dict | None = None) -> None:
        self._head: dict = {"format": fmt.FORMAT_NAME, "format_version": fmt.format_version_for(model),
                            "model": model,
                            "tokenizer": tokenizer}
        if quantization is not None:
            self._head[fmt.QUANTIZATION_KEY] = quantization
        self._head["provenance"] = provenance
        self._files: list[dict] | None = None
        self._append = False  # an updated manifest takes more files after the ones it kept
        self._written = False

    @classmethod
    def updating(cls, manifest: dict, keep: Callable[[dict], bool]) -> ManifestWriter:
        """A writer for a bundle's existing manifest (``lower``): its head as it is, its files those
        ``keep`` accepts; new files are added after them."""
        writer = cls.__new__(cls)
        writer._head = {k: v for k, v in manifest.items() if k != "files"}
        writer._files = [f for f in manifest["files"] if keep(f)]
        writer._append = True
        writer._written = False
        return writer

    def add_tools(self, tools: dict[str, str]) -> None:
        """Record more tool versions in the provenance (sorted by name)."""
        self._check_open()
        merged = {**self._head["provenance"]["tools"], **tools}
        self._head["provenance"] = {**self._head["provenance"], "tools": dict(sorted(merged.items()))}

    def add_files(self, entries: list[dict]) -> None:
        """The bundle's files, in manifest order. Once for a new manifest; an updated one appends."""
        self._check_open()
        if self._files is not None and not self._append:
            raise RuntimeError("manifest files were already added")
        paths = [e["path"] for e in (self._files or []) + entries]
        if len(set(paths)) != len(paths):
            raise RuntimeError(f"manifest lists a path twice: {sorted(p for p in paths if paths.count(p) > 1)[:3]}")
        self._files = (self._files or []) + list(entries)

    def manifest(self) -> dict:
        if self._files is None:
            raise RuntimeError("a manifest needs its files before it is built")
        return {**self._head, "files": self._files}

    def write(self, root: Path, *, where: str) -> dict:
        """Validate, then replace ``root/manifest.json`` atomically; returns the manifest written."""
        self._check_open()
        manifest = self.manifest()
        validate_manifest(manifest, where=where)  # never ship one the readers refuse
        path = Path(root) / fmt.MANIFEST_NAME
        tmp = path.with_name(f".{fmt.MANIFEST_NAME}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(fmt.dumps_manifest(manifest))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._written = True
        return manifest

    def _check_open(self) -> None:
        if self._written:
            raise RuntimeError("the manifest was already written")
