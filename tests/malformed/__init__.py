"""A corpus of crafted bad inputs, each paired with the error it must produce.

``cases.CASES`` lists them; each case writes its bad input into a fresh workspace and returns the
``cosmoe-export`` arguments that must fail on it. tests/cosmoe_export/test_malformed.py runs every case through the
real CLI. Adding a case for a new command is one ``case(...)`` call in cases.py.
"""

from tests.malformed.cases import CASES, Case, Workspace

__all__ = ["CASES", "Case", "Workspace"]
