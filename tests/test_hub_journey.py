"""The path a user takes with a pretrained DiT, offline, through a Hub cache in facebook/DiT-XL-2-256's layout:
convert, fine-tune on ImageNet-synset folders, sample, score; and the pieces it rests on."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hub_cache import DIT_REPO, TENCH, hub_env, publish, run_offline, snapshot_folder, write_dit_hub_cache
from PIL import Image

from nala_diffusion.data.classes import imagenet_synsets, map_classes, mapped_id2label

SYNSETS = ["n01440764", "n01443537"]  # ImageNet classes 0 (tench) and 1 (goldfish)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    write_dit_hub_cache(cache)
    return cache


def image_folders(root, classes, count=4, size=20):
    rng = np.random.default_rng(0)
    for name in classes:
        os.makedirs(root / name, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def tool(cache, *argv, expect=0):
    result = subprocess.run([sys.executable, "-m", *argv], env=hub_env(cache), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


TRAIN = "nala_diffusion.train.train_nala_dit"


def train_args(data, out, *extra):
    return [TRAIN, "--init_from", DIT_REPO, "--train_data_dir", str(data), "--resolution", "16",
            "--max_train_steps", "2", "--train_batch_size", "4", "--output_dir", str(out), "--checkpointing_steps", "2",
            "--report_to", "none", *extra]


@pytest.mark.slow
def test_the_journey_convert_fine_tune_sample_and_score_offline(hub, tmp_path):
    data = image_folders(tmp_path / "data", SYNSETS)
    run = tmp_path / "run"
    trained = tool(hub, *train_args(data, run, "--teacher", DIT_REPO, "--cache_latents"))
    assert "n01440764 -> 0, n01443537 -> 1" in trained.stderr  # the synsets map onto DiT's ids
    index = json.loads((run / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]  # the DiT repository's vae/, taken by the trainer
    assert index["id2label"]["0"] == f"{TENCH}, n01440764" and len(index["id2label"]) == 1000
    assert index["sampling_defaults"] == {"num_inference_steps": 25, "guidance_scale": 4.0}
    assert (run / "pipeline_nala_dit.py").is_file()
    args = json.loads((run / "args.json").read_text())
    assert args["init_from"] == DIT_REPO and args["vae"] is None

    grid = tmp_path / "grid.png"
    tool(hub, "nala_diffusion.pipelines.sample", "--model", str(run), "--labels", "tench", "n01443537",
         "--steps", "2", "--out", str(grid))
    assert Image.open(grid).size == (2 * 16 + 3 * 2, 16 + 2 * 2)  # two 16 x 16 samples with the grid's padding

    # the trained pipeline, published on the Hub and sampled by its id (offline, from the cache)
    publish(hub, lambda snapshot: shutil.copytree(run, snapshot, dirs_exist_ok=True,
                                                  ignore=shutil.ignore_patterns("checkpoint-*", "latent_cache")),
            "someone/nala-run")
    tool(hub, "nala_diffusion.pipelines.sample", "--model", "someone/nala-run", "--labels", "tench", "--steps", "2",
         "--out", str(tmp_path / "by_id.png"))
    assert Image.open(tmp_path / "by_id.png").size == (16, 16)  # one image: no grid padding
    # the trained pipeline, scored against the data folder
    classifier = __import__("nala_diffusion").demo_classifier_path()
    tool(hub, "nala_diffusion.eval.fid", "calc", "--model", str(run), "--num_samples", "4", "--steps", "2",
         "--out", str(tmp_path / "fid"), "--ref", str(data), "--feature_extractor", classifier, "--metrics", "fid")
    result = json.loads((tmp_path / "fid" / "fid.json").read_text())
    assert np.isfinite(result["fid"]) and result["num_samples"] == 4 and result["num_reference"] == 8


def test_convert_dit_pipeline_to_nala_from_a_hub_id_keeps_vae_scheduler_labels_and_samples(hub):
    out = run_offline(hub, f"""
        import torch
        from diffusers import DiTPipeline
        from nala_diffusion import NaLaDiTPipeline, convert_dit_pipeline_to_nala

        pipe = convert_dit_pipeline_to_nala("{DIT_REPO}")
        assert isinstance(pipe, NaLaDiTPipeline) and pipe.transformer.config.attention_type == "nala"
        assert type(pipe.vae).__name__ == "AutoencoderKL" and type(pipe.scheduler).__name__ == "DDIMScheduler"
        assert pipe.id2label[0] == "{TENCH}" and pipe.labels["Tinca tinca"] == 0 and len(pipe.id2label) == 1000
        images = pipe(["tench", 7], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
        assert images.shape == (2, 16, 16, 3) and images.std() > 0
        # from a loaded DiTPipeline too; with softmax attention it is the DiT itself
        dit = DiTPipeline.from_pretrained("{DIT_REPO}")
        same = convert_dit_pipeline_to_nala(dit, attention_type="softmax")
        assert same.id2label[0] == "{TENCH}"
        x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 999])
        assert torch.equal(same.transformer(x, timestep=t, class_labels=y).sample,
                           dit.transformer(x, timestep=t, class_labels=y).sample)
        # what nala-sample / nala-fid --model facebook/DiT-XL-2-256 load: the DiT unchanged
        from nala_diffusion import NaLaDiTHighResPipeline
        from nala_diffusion.pipelines.conversion import load_pipeline
        said = []
        tool_pipe = load_pipeline("{DIT_REPO}", NaLaDiTHighResPipeline, announce=said.append)
        assert "running it unchanged" in said[0] and isinstance(tool_pipe, NaLaDiTHighResPipeline)
        assert torch.equal(tool_pipe.transformer(x, timestep=t, class_labels=y).sample,
                           dit.transformer(x, timestep=t, class_labels=y).sample)
        print("ok")
    """)
    assert "ok" in out.stdout


@pytest.mark.slow
def test_class_folders_that_are_not_the_models_classes_are_refused_then_trained_with_a_new_embedding(hub, tmp_path):
    data = image_folders(tmp_path / "data", ["cats", "dogs", "owls"], count=2)
    refused = tool(hub, *train_args(data, tmp_path / "refused"), expect=2)
    assert "--class_embedding new" in refused.stderr and "3 folder(s) match none" in refused.stderr
    assert not (tmp_path / "refused" / "model_index.json").exists()
    run = tmp_path / "new"
    tool(hub, *train_args(data, run, "--class_embedding", "new", "--vae", DIT_REPO))
    index = json.loads((run / "model_index.json").read_text())
    config = json.loads((run / "transformer" / "config.json").read_text())
    assert index["id2label"] == {"0": "cats", "1": "dogs", "2": "owls"} and config["num_classes"] == 3


@pytest.mark.slow
def test_a_model_that_is_nowhere_is_one_clear_line(hub, tmp_path):
    missing = tool(hub, "nala_diffusion.pipelines.sample", "--model", "someone/not-a-model", "--out",
                   str(tmp_path / "x.png"), expect=2)
    assert "not a local folder" in missing.stderr and str(hub) in missing.stderr and "Traceback" not in missing.stderr
    data = image_folders(tmp_path / "data", SYNSETS, count=1)
    vae = tool(hub, *train_args(data, tmp_path / "run", "--vae", "someone/no-vae"), expect=2)
    assert "VAE 'someone/no-vae'" in vae.stderr and "Traceback" not in vae.stderr


def test_a_transformer_folder_is_not_a_pipeline_and_the_tools_say_how_to_make_one(tmp_path):
    from helpers import tiny_nala

    from nala_diffusion.pipelines.conversion import load_pipeline
    from nala_diffusion.pipelines.pipeline_nala_dit import NaLaDiTPipeline

    tiny_nala().save_pretrained(tmp_path / "transformer_only")
    with pytest.raises(ValueError, match="transformer folder .* not a pipeline.*convert_dit_pipeline_to_nala"):
        load_pipeline(str(tmp_path / "transformer_only"), NaLaDiTPipeline)


def test_map_classes_synsets_label_names_own_classes_and_refusal():
    assert len(imagenet_synsets()) == 1000 and imagenet_synsets()[0] == "n01440764"
    assert imagenet_synsets() == sorted(imagenet_synsets())  # ImageFolder's order of an ImageNet train folder
    assert map_classes(["n01443537", "n15075141"], 1000) == {0: 1, 1: 999}
    labels = {0: "tench, Tinca tinca", 1: "goldfish", 2: "great white shark"}
    assert map_classes(["Goldfish", "tinca tinca"], 3, labels) == {0: 1, 1: 0}
    assert map_classes(["a", "b"], 2) == {0: 0, 1: 1}  # same count, no names: the model's own classes
    assert map_classes(["tench, Tinca tinca", "goldfish", "great white shark"], 3, labels) == {0: 0, 1: 1, 2: 2}
    with pytest.raises(ValueError, match=r"1 folder\(s\) match none.*'shark'.*--class_embedding new"):
        map_classes(["goldfish", "shark"], 3, labels)
    assert mapped_id2label(labels, ["goldfish", "n0"], {0: 1, 1: 2}) == {0: "tench, Tinca tinca", 1: "goldfish",
                                                                         2: "great white shark, n0"}


def test_the_generic_diffusers_loader_opens_the_demo_and_saved_folders(tmp_path):
    from diffusers import DiffusionPipeline

    from nala_diffusion import NaLaDiTHighResPipeline, NaLaDiTPipeline, demo_pipeline_path

    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(demo_pipeline_path())
    pipe = DiffusionPipeline.from_pretrained(demo_pipeline_path(), trust_remote_code=True)
    assert type(pipe) is NaLaDiTPipeline and pipe.labels["cat"] == 1
    pipe.save_pretrained(tmp_path / "saved", variant="fp16")
    assert (tmp_path / "saved" / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    again = DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True, variant="fp16")
    high = NaLaDiTHighResPipeline.from_pretrained(tmp_path / "saved", variant="fp16")  # no flag: no file of it runs
    assert type(high) is NaLaDiTHighResPipeline and high.config.sampling_defaults == pipe.config.sampling_defaults
    for loaded in (again, high):
        for name, tensor in pipe.transformer.state_dict().items():
            assert torch.equal(loaded.transformer.state_dict()[name], tensor), name


def test_hub_snapshot_layout_is_the_real_repositorys(hub):
    snapshot = snapshot_folder(hub)
    index = json.loads(open(os.path.join(snapshot, "model_index.json")).read())
    assert index["_class_name"] == "DiTPipeline" and index["transformer"] == ["diffusers", "Transformer2DModel"]
    assert sorted(os.listdir(snapshot)) == ["model_index.json", "scheduler", "transformer", "vae"]
