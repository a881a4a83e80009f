"""Opening a model folder runs no code from it: each replay below plants a file that writes a marker when
Python runs it, and loading through our classes and tools must never write the marker."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler
from helpers import tiny_nala
from hub_cache import hub_env, publish

from nala_diffusion import NaLaDiTHighResPipeline, NaLaDiTPipeline, demo_pipeline_path


def payload(marker) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')\n"


@pytest.fixture()
def folder(tmp_path):
    """A saved NaLa pipeline (pixel space, 2 classes) and the marker path its planted code would write."""
    pipe = NaLaDiTPipeline(tiny_nala(in_channels=3, out_channels=3, num_classes=2, sample_size=8), DDIMScheduler(),
                           id2label={0: "cat", 1: "dog"})
    pipe.save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe", tmp_path / "marker"


def plant_component_file(root, marker):
    """transformer/evil.py: a subclass of our transformer with module-level code, named by model_index.json."""
    (root / "transformer" / "evil.py").write_text(
        payload(marker) + "from nala_diffusion import NaLaDiTTransformer2DModel\n\n\n"
        "class Evil(NaLaDiTTransformer2DModel):\n    pass\n")
    index = json.loads((root / "model_index.json").read_text())
    index["transformer"] = ["evil", "Evil"]
    (root / "model_index.json").write_text(json.dumps(index))


def test_a_component_file_named_by_the_folder_is_refused_and_never_run(folder):
    root, marker = folder
    plant_component_file(root, marker)
    for load in (NaLaDiTPipeline.from_pretrained, NaLaDiTHighResPipeline.from_pretrained):
        with pytest.raises(ValueError, match=r"'transformer' as \['evil', 'Evil'\].*diffusers and nala_diffusion"):
            load(root)
    assert not marker.exists()


def test_a_component_file_of_a_hub_repository_is_refused_by_the_tools(folder, tmp_path):
    root, marker = folder
    plant_component_file(root, marker)
    cache = tmp_path / "hub"
    publish(cache, lambda snapshot: shutil.copytree(root, snapshot, dirs_exist_ok=True), "someone/nala-demo")
    result = subprocess.run([sys.executable, "-m", "nala_diffusion.pipelines.sample", "--model", "someone/nala-demo",
                             "--out", str(tmp_path / "grid.png"), "--steps", "1"],
                            env=hub_env(cache), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "['evil', 'Evil']" in result.stderr, result.stderr[-2000:]
    assert not marker.exists() and not (tmp_path / "grid.png").exists()


def test_custom_pipeline_is_refused_and_the_folders_highres_file_never_runs(folder):
    root, marker = folder
    (root / "pipeline_nala_dit_highres.py").write_text(payload(marker))
    with pytest.raises(ValueError, match="NaLaDiTHighResPipeline.from_pretrained"):
        NaLaDiTPipeline.from_pretrained(root, custom_pipeline="pipeline_nala_dit_highres")
    with pytest.raises(ValueError, match="trust_remote_code"):
        NaLaDiTPipeline.from_pretrained(root, trust_remote_code=True)
    high = NaLaDiTHighResPipeline.from_pretrained(root)  # the way to the high-resolution pipeline
    assert type(high) is NaLaDiTHighResPipeline
    assert not marker.exists()


def test_a_utf7_coding_cookie_hiding_code_in_a_comment_never_runs(folder):
    root, marker = folder
    # read as UTF-8 this is a comment; imported as UTF-7, "+AAo-" is a newline and the payload runs
    hidden = payload(marker).strip().replace("'", "+ACc-").replace("(", "+ACg-").replace(")", "+ACk-")
    text = "# coding: utf-7\n# harmless +AAo-" + hidden + "\nfrom nala_diffusion.pipelines.pipeline_nala_dit import " \
           "NaLaDiTPipeline  # noqa: F401\n"
    (root / "pipeline_nala_dit.py").write_text(text)
    pipe = NaLaDiTPipeline.from_pretrained(root)
    assert pipe.labels == {"cat": 0, "dog": 1}
    assert not marker.exists()
    # the planted file does run when imported as Python would import it: the replay is real
    sys.path.insert(0, str(root))
    try:
        import importlib

        sys.modules.pop("pipeline_nala_dit", None)
        importlib.import_module("pipeline_nala_dit")
        assert marker.exists()
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("pipeline_nala_dit", None)


def test_imports_written_in_the_loader_files_docstring_are_never_imported(folder, tmp_path, monkeypatch):
    root, marker = folder
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "nala_marker_module.py").write_text(payload(marker))
    monkeypatch.syspath_prepend(str(modules))  # importable, as an installed package would be
    (root / "pipeline_nala_dit.py").write_text(
        '"""Loads the pipeline.\n\nimport nala_marker_module\n"""\n\n'
        "from nala_diffusion.pipelines.pipeline_nala_dit import NaLaDiTPipeline  # noqa: F401\n")
    pipe = NaLaDiTPipeline.from_pretrained(root)
    assert pipe.num_classes == 2
    assert "nala_marker_module" not in sys.modules and not marker.exists()


def test_unknown_libraries_and_classes_are_refused_naming_the_entry(folder):
    root, _ = folder
    index = json.loads((root / "model_index.json").read_text())
    for entry in (["transformers", "CLIPTextModel"], ["nala_diffusion", "nala_attention"], ["os", "system"],
                  ["nala_diffusion.eval.study", "main"], "NaLaDiTTransformer2DModel"):
        (root / "model_index.json").write_text(json.dumps({**index, "scheduler": entry}))
        with pytest.raises(ValueError, match=r"names 'scheduler' as"):
            NaLaDiTPipeline.from_pretrained(root)


def test_the_demo_and_saved_folders_still_load_with_both_loaders(folder):
    from diffusers import DiffusionPipeline

    root, _ = folder
    ours = NaLaDiTPipeline.from_pretrained(root)
    generic = DiffusionPipeline.from_pretrained(root, trust_remote_code=True)  # the user's explicit choice
    assert type(generic) is NaLaDiTPipeline
    for name, tensor in ours.transformer.state_dict().items():
        assert torch.equal(generic.transformer.state_dict()[name], tensor), name
    demo = NaLaDiTPipeline.from_pretrained(demo_pipeline_path(), dtype=torch.float16)
    assert demo.transformer.dtype == torch.float16 and demo.config.sampling_defaults["num_inference_steps"] == 25
    assert demo.config._name_or_path == str(demo_pipeline_path())
    swapped = NaLaDiTPipeline.from_pretrained(root, scheduler=DDIMScheduler(clip_sample=False))
    assert swapped.scheduler.config.clip_sample is False
    with pytest.raises(ValueError, match="unknown keyword arguments"):
        NaLaDiTPipeline.from_pretrained(root, torch_dtyp=torch.float16)
