"""What the package metadata promises is what its dependencies allow."""

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def lowest(specifier: str) -> Version:
    return max(Version(s.version) for s in SpecifierSet(specifier) if s.operator in (">=", "=="))


def test_requires_python_is_what_diffusers_needs():
    ours = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    theirs = importlib.metadata.metadata("diffusers")["Requires-Python"]
    assert lowest(ours) >= lowest(theirs), f"pyproject says {ours}, diffusers needs {theirs}"
    assert f"Python ≥ {lowest(ours).major}.{lowest(ours).minor}" in (REPO / "README.md").read_text()
