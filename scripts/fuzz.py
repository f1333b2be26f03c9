"""Fuzz the safetensors header reader and the bundle manifest validator: any byte string must either
parse to something valid or raise our own named error (CosmoeError); anything else is a crash.

    .venv/bin/pip install -e '.[fuzz]'                       # atheris (coverage-guided, libFuzzer)
    .venv/bin/python scripts/fuzz.py --seconds 300           # prints the number of executions

The first input byte picks the target (even: safetensors header, odd: manifest.json of a real tiny
bundle); seeds are a valid safetensors file and that bundle's manifest. Without atheris it falls
back to a plain loop of random mutations of the same seeds (--plain forces it). Not part of CI.
Crashing inputs are written to --crashes (atheris: its own crash-* files in the working directory).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    import atheris
except ImportError:  # the fallback below needs nothing
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["runtime_py"]):
        from runtime_py import bundle as bundle_mod
        from runtime_py import safetensors_header
else:
    from runtime_py import bundle as bundle_mod
    from runtime_py import safetensors_header
from runtime_py.errors import CosmoeError  # noqa: E402


class Target:
    def __init__(self, work: Path) -> None:
        from cosmoe_export.importers.sources import preset_source
        from cosmoe_export.importers.split import split
        from runtime_py.config import CosmoeConfig
        cfg = CosmoeConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=4, num_experts=2, num_experts_per_tok=1)
        self.bundle = work / "bundle"
        split(source=preset_source("fuzz", cfg), out=self.bundle, progress=False)
        self.manifest_path = self.bundle / "manifest.json"
        self.seeds = [b"\0" + (self.bundle / "backbone.safetensors").read_bytes(),
                      b"\1" + self.manifest_path.read_bytes()]
        self.executions = 0

    def __call__(self, data: bytes) -> None:
        self.executions += 1
        if not data:
            return
        body = data[1:]
        try:
            if data[0] % 2 == 0:
                safetensors_header.parse_header(body, file_size=len(body), where="fuzz.safetensors")
            else:
                self.manifest_path.write_bytes(body)
                bundle_mod.Bundle.open(self.bundle)
        except CosmoeError as e:
            if "\n" in str(e):
                raise AssertionError(f"multi-line error message: {str(e)!r}") from None


def mutate(rng: random.Random, seed: bytes) -> bytes:
    buf = bytearray(seed)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a byte
            buf[pos % len(buf)] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert random bytes
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 2:  # delete a run
            del buf[pos:pos + rng.randint(1, 16)]
        elif op == 3:  # an interesting ASCII token where JSON is
            buf[pos:pos] = rng.choice([b"-1", b"1e999", b"[", b"{", b'"', b"null", b"\\ud800", b"99999999999999999999",
                                       b'"__metadata__"', b'"F4"', b'"data_offsets"', b"..", b"/", b"NaN"])
        else:  # overwrite the 8-byte length prefix (after the target byte)
            buf[1:9] = rng.randrange(1 << 64).to_bytes(8, "little")
    return bytes(buf)


def plain_loop(target: Target, seconds: float, seed: int, crashes: Path) -> int:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(200):
            data = rng.randbytes(rng.randint(0, 64)) if rng.random() < 0.1 else mutate(rng, rng.choice(target.seeds))
            try:
                target(data)
            except Exception:
                crashes.mkdir(parents=True, exist_ok=True)
                path = crashes / f"crash-{target.executions}"
                path.write_bytes(data)
                print(f"fuzz: crash after {target.executions} executions, input in {path}", file=sys.stderr)
                raise
    return target.executions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plain", action="store_true", help="random-mutation loop even when atheris is installed")
    ap.add_argument("--crashes", type=Path, default=Path("fuzz-crashes"))
    args, rest = ap.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        target = Target(Path(tmp))
        if atheris is None or args.plain:
            n = plain_loop(target, args.seconds, args.seed, args.crashes)
            print(f"fuzz (plain loop): {n} executions in {args.seconds:.0f} s, no crash")
            return 0
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for i, s in enumerate(target.seeds):
            (corpus / f"seed-{i}").write_bytes(s)
        start = time.monotonic()

        def one_input(data: bytes) -> None:
            target(data)
            if time.monotonic() - start > args.seconds:
                # libFuzzer ends with exit(); print our count first, then leave without its teardown.
                print(f"fuzz (atheris): {target.executions} executions in {args.seconds:.0f} s, no crash", flush=True)
                os._exit(0)

        atheris.Setup([sys.argv[0], f"-seed={args.seed}", "-max_len=65536", *rest, str(corpus)], one_input)
        atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
