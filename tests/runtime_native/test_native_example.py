"""The C API example of docs/NATIVE.md, as an app would use it: the page shows the file unchanged, it
compiles as C11 against the installed header and library with every warning an error, and it prints
the greedy tokens `cosmoe-run` prints for the same bundle, prompt and budget."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "runtime_native" / "examples" / "generate.c"
VENV = ROOT / ".venv"


def test_docs_show_the_example_unchanged():
    assert EXAMPLE.read_text() in (ROOT / "docs" / "NATIVE.md").read_text()


def test_example_compiles_and_matches_cosmoe_run(lowered_tiny, tmp_path):
    binary = tmp_path / "generate"
    subprocess.run(["cc", "-std=c11", "-Wall", "-Wextra", "-Werror", EXAMPLE, f"-I{ROOT / 'runtime_native/include'}",
                    f"-L{VENV / 'lib'}", "-lcosmoe", f"-Wl,-rpath,{VENV / 'lib'}", "-o", binary], check=True)
    got = subprocess.run([binary, lowered_tiny], capture_output=True, text=True, check=True).stdout.split()
    want = subprocess.run([VENV / "bin" / "cosmoe-run", lowered_tiny, "--prompt-ids", "1,2,3,4,5",
                           "--max-new-tokens", "16", "--experts-per-layer", "4", "--policy", "lru", "--quiet"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert len(got) == 16 and got == want
    bad = subprocess.run([binary, tmp_path / "nowhere"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a bundle directory" in bad.stderr
