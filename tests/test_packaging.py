"""What the package metadata promises is what its dependencies allow."""

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
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


@pytest.mark.slow
def test_the_wheel_carries_the_data_files(tmp_path):
    """A non-editable install has the demo's loader files and the ImageNet synset list."""
    import subprocess
    import sys
    import zipfile

    result = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                             "-w", str(tmp_path), "-q"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("nala_diffusion-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("nala_diffusion/data/imagenet_synsets.txt", "nala_diffusion/assets/demo_pipeline/pipeline_nala_dit.py",
                   "nala_diffusion/assets/demo_pipeline/pipeline_nala_dit_highres.py",
                   "nala_diffusion/assets/demo_pipeline/model_index.json", "nala_diffusion/pipelines/loader_file.py",
                   "nala_diffusion/train/attention_distillation.py"):
        assert needed in names, needed
