"""The package's rooms: folders saved by any version load, and the old module path of the model stays."""

import json
import subprocess
import sys

from nala_diffusion import demo_pipeline_path

LOAD = """
import sys
from nala_diffusion import NaLaDiTPipeline
pipe = NaLaDiTPipeline.from_pretrained(sys.argv[1])
print(type(pipe.transformer).__module__, pipe.transformer.config.attention_type)
"""


def load_in_a_fresh_process(folder):
    # a fresh interpreter: no module the test session imported can help diffusers find the class
    result = subprocess.run([sys.executable, "-c", LOAD, str(folder)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


def test_the_shipped_demo_names_the_old_module_and_loads():
    with open(f"{demo_pipeline_path()}/model_index.json", encoding="utf-8") as handle:
        index = json.load(handle)
    assert index["transformer"] == ["nala_diffusion.model", "NaLaDiTTransformer2DModel"]
    assert load_in_a_fresh_process(demo_pipeline_path()) == ["nala_diffusion.models.transformer", "nala"]


def test_folders_saved_now_and_before_the_rooms_load(tmp_path):
    from nala_diffusion import NaLaDiTPipeline
    from nala_diffusion.model import NaLaDiTTransformer2DModel as Old
    from nala_diffusion.models.transformer import NaLaDiTTransformer2DModel

    assert Old is NaLaDiTTransformer2DModel
    pipe = NaLaDiTPipeline.from_pretrained(demo_pipeline_path())
    pipe.save_pretrained(tmp_path / "now")
    index = json.loads((tmp_path / "now" / "model_index.json").read_text())
    assert index["transformer"] == ["nala_diffusion.models.transformer", "NaLaDiTTransformer2DModel"]
    assert load_in_a_fresh_process(tmp_path / "now")[1] == "nala"
    # a folder written before the sub-packages names nala_diffusion.model, as the demo does
    index["transformer"][0] = "nala_diffusion.model"
    (tmp_path / "now" / "model_index.json").write_text(json.dumps(index))
    assert load_in_a_fresh_process(tmp_path / "now")[1] == "nala"
