"""The support table (cosmoe_export/importers/coverage.py): complete, printed, documented, and every
test it names exists."""

from __future__ import annotations

import re

from click.testing import CliRunner

from cosmoe_export.cli import cli
from cosmoe_export.importers import coverage
from cosmoe_export.importers.adapters import ADAPTERS, Cosmoe
from tests.conftest import FAMILIES, ROOT


def test_every_imported_architecture_has_a_row():
    hf = {name for name, cls in ADAPTERS.items() if cls is not Cosmoe}
    assert {f.architecture for f in coverage.FAMILIES} == hf
    assert {f.fixture for f in coverage.FAMILIES} <= set(FAMILIES)


def test_every_named_check_exists():
    for family in coverage.FAMILIES:
        for stage in coverage.STAGES:
            proof = family.proof(stage)
            path, _, test = proof.partition("::")
            source = (ROOT / path).read_text()
            assert not test or re.search(rf"^def {test}\(", source, re.M), proof


def test_architectures_prints_the_documented_table():
    printed = CliRunner().invoke(cli, ["architectures"]).output
    assert coverage.table() in printed
    assert coverage.table() in (ROOT / "docs/FAMILIES.md").read_text()
