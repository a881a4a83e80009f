"""Round four of the adversarial trial: names of several classes, SiT weights that do not fit, v-prediction's
held-out target, and what a new user trips on; each refused or right now, never silently wrong."""

import argparse
import os
import warnings

import pytest
import torch
from diffusers import DDIMScheduler
from helpers import tiny_nala
from sit_reference import random_sit

from nala_diffusion import NaLaDiTPipeline
from nala_diffusion.data.classes import imagenet_synsets, map_classes

# ImageNet's ambiguous names as DiT's id2label writes them: "crane" is 134 (the bird) and 517 (the machine)
IMAGENET_LIKE = {i: f"class {i}" for i in range(1000)}
IMAGENET_LIKE.update({134: "crane", 517: "crane", 474: "cardigan", 638: "maillot", 639: "maillot, tank suit"})


def test_a_name_of_two_classes_is_refused_listing_them():
    with pytest.raises(ValueError, match=r"'crane' names 2 classes: 134 \(n02012849, 'crane'\); 517 \(n03126707"):
        map_classes(["crane", "cardigan"], 1000, IMAGENET_LIKE)
    with pytest.raises(ValueError, match="'Maillot' names 2 classes: 638"):
        map_classes(["Maillot"], 1000, IMAGENET_LIKE)
    assert map_classes(["cardigan", "tank suit"], 1000, IMAGENET_LIKE) == {0: 474, 1: 639}
    assert imagenet_synsets()[134] == "n02012849" and imagenet_synsets()[517] == "n03126707"
    # sampling by such a name is refused too; by id it is not
    pipe = NaLaDiTPipeline(tiny_nala(num_classes=3), DDIMScheduler(), id2label={0: "crane", 1: "crane, bird", 2: "x"})
    with pytest.raises(ValueError, match=r"'crane' names 2 classes: 0 \('crane'\); 1 \('crane, bird'\)"):
        pipe.get_label_ids(["crane"])
    assert pipe.get_label_ids(["bird", 0]) == [1, 0]


def test_converting_an_in_memory_dit_pipeline_keeps_every_class():
    from diffusers import DiTPipeline
    from helpers import tiny_dit

    from nala_diffusion import convert_dit_pipeline_to_nala

    names = {0: "crane", 1: "zeta, crane, alpha", 2: "tench"}
    dit = DiTPipeline(tiny_dit(num_classes=3), None, DDIMScheduler(), id2label=names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = convert_dit_pipeline_to_nala(dit, attention_type="softmax")
    assert sorted(rebuilt.id2label) == [0, 1, 2]  # class 0 lost its only name in DiTPipeline.labels; kept by id
    assert rebuilt.id2label[0] == "class 0" and any("lost every name of 1 class" in str(w.message) for w in caught)
    exact = convert_dit_pipeline_to_nala(dit, attention_type="softmax", id2label=names)
    assert exact.id2label == names  # every id, names in the source's order


def test_sit_weights_the_dit_layout_cannot_place_are_refused_naming_them():
    from nala_diffusion.models.sit import load_sit

    state = random_sit(input_size=16, patch_size=4, in_channels=4, hidden_size=64, depth=2, num_heads=2).state_dict()
    extra = {**state, "blocks.0.attn.q_norm.weight": torch.ones(32), "blocks.0.attn.k_norm.weight": torch.ones(32),
             "unrelated": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"3 tensor\(s\).*blocks.0.attn.k_norm.weight.*unrelated"):
        load_sit(extra, num_attention_heads=2)
    assert load_sit(state, num_attention_heads=2).config.num_classes == 5


def test_sit_class_count_comes_from_the_checkpoints_args(tmp_path):
    from nala_diffusion.models.sit import load_sit

    sit = random_sit(input_size=16, patch_size=4, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=5)
    state = sit.state_dict()  # 6 label rows: 5 classes and the null class

    def checkpoint(name, num_classes, table_rows=6):
        path = tmp_path / name
        weights = {**state, "y_embedder.embedding_table.weight": state["y_embedder.embedding_table.weight"][:table_rows]}
        torch.save({"ema": weights, "args": argparse.Namespace(num_classes=num_classes)}, path)
        return path

    assert load_sit(checkpoint("with_null.pt", 5), num_attention_heads=2).config.num_classes == 5
    with pytest.raises(ValueError, match="class dropout 0: its label table has no null-class row"):
        load_sit(checkpoint("no_null.pt", 6), num_attention_heads=2)  # 6 rows, 6 classes: trained without dropout
    with pytest.raises(ValueError, match="6 rows, which 3 classes .* cannot explain"):
        load_sit(checkpoint("odd.pt", 3), num_attention_heads=2)


class Oracle:
    """A perfect denoiser of known images: from the noisy input and its timestep it recovers the noise and
    returns the target of ``prediction_type``."""

    def __init__(self, images, scheduler):
        self.images, self.scheduler, self.config = images, scheduler, {"objective": "ddpm"}

    def eval(self):
        return self

    def __call__(self, noisy, timestep, class_labels):
        from types import SimpleNamespace

        abar = self.scheduler.alphas_cumprod[timestep].reshape(-1, 1, 1, 1)
        noise = (noisy - abar.sqrt() * self.images) / (1 - abar).sqrt()
        kind = self.scheduler.config.prediction_type
        target = noise if kind == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * self.images
        return SimpleNamespace(sample=target)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_held_out_losses_score_a_perfect_predictor_of_either_type_at_zero(prediction_type):
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from nala_diffusion.eval.retrieval import heldout_mse
    from nala_diffusion.eval.studies.quality import heldout_loss

    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type=prediction_type)
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.zeros(6, dtype=torch.long)
    oracle = Oracle(images, scheduler)
    errors = heldout_mse(oracle, scheduler, images, labels, [50, 250, 900], seed=0, batch_size=6)
    assert max(errors.values()) < 1e-8, errors
    pipe = SimpleNamespace(transformer=oracle, scheduler=DDIMScheduler.from_config(scheduler.config))
    assert heldout_loss(pipe, SimpleNamespace(images=images, labels=labels)) < 1e-8


def test_warm_up_acts_when_asked_and_a_constant_schedule_with_one_is_refused(tmp_path, capsys):
    from test_train import base_args, log_rows

    from nala_diffusion.train.checkpoints import check_compatible
    from nala_diffusion.train.train_nala_dit import cli, parse_args

    root = tmp_path / "data"
    for c in range(2):
        (root / "images" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            from PIL import Image

            Image.new("RGB", (16, 16), (60 * c, 90, 30 * i)).save(root / "images" / f"class{c}" / f"{i}.png")
    (root / "tiny.json").write_text('{"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, '
                                    '"patch_size": 4, "norm_num_groups": 1}')
    args = base_args(root, tmp_path / "run", steps=4, checkpointing_steps=4, learning_rate=1e-3, lr_warmup_steps=8)
    assert parse_args(args).lr_scheduler == "constant_with_warmup"
    assert cli(args) == 0
    rates = [row["lr"] for row in log_rows(tmp_path / "run")]
    assert rates == pytest.approx([1e-3 * s / 8 for s in (1, 2, 3, 4)])  # the linear warm-up, step by step
    with pytest.raises(SystemExit):
        cli([*args, "--lr_scheduler", "constant", "--overwrite"])
    assert "--lr_scheduler constant has no warm-up" in capsys.readouterr().err
    # a checkpoint written before warm-up acted records (constant, 100) and trained without one: it resumes as
    # (constant, 0), and not as a run that warms up
    saved = {"model_config": {}, "result_args": {"lr_scheduler": "constant", "lr_warmup_steps": 100}}
    current = {"model_config": {}, "result_args": {"lr_scheduler": "constant", "lr_warmup_steps": 0}}
    check_compatible(saved, current, "ckpt")
    with pytest.raises(ValueError, match="--lr_scheduler: checkpoint 'constant', this run 'constant_with_warmup'"):
        check_compatible(saved, {**current, "result_args": {"lr_scheduler": "constant_with_warmup",
                                                            "lr_warmup_steps": 100}}, "ckpt")


def test_nala_sample_draws_a_handful_of_classes_from_a_large_model_by_default():
    from nala_diffusion.pipelines.sample import DIT_SAMPLE_CLASSES, default_labels

    assert default_labels(10) == list(range(10)) and default_labels(16) == list(range(16))
    assert default_labels(1000) == [207, 360, 387, 974, 88, 979, 417, 279] == list(DIT_SAMPLE_CLASSES)  # DiT's sample.py
    assert default_labels(100) == [0, 14, 28, 42, 57, 71, 85, 99]


def test_a_missing_model_config_file_is_named_and_the_installed_copy_serves_outside_a_checkout(tmp_path, monkeypatch):
    from nala_diffusion.train.train_nala_dit import model_config_file

    monkeypatch.chdir(tmp_path)  # outside the repository, as a user who installed the package
    found = model_config_file("train/configs/demo_photos.json")
    assert found.endswith(os.path.join("configs", "demo_photos.json")) and os.path.isfile(found)
    with pytest.raises(ValueError, match=r"'train/configs/nope.json': no such file \(from .*\); give a JSON"):
        model_config_file("train/configs/nope.json")
    with pytest.raises(ValueError, match="neither a preset .* nor a file"):
        model_config_file("Q/3")
