"""The training script, run as users run it: in subprocesses, on a tiny ImageFolder."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, lock_held_by_a_live_process, tiny_dit
from PIL import Image
from safetensors.torch import load_file

from nala_diffusion import NaLaDiTPipeline, NaLaDiTTransformer2DModel
from nala_diffusion.train.train_nala_dit import cli

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "train" / "train_nala_dit.py")
TINY_CONFIG = {k: v for k, v in TINY.items() if k != "sample_size"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "images" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            pixels = (rng.random((20, 24, 3)) * 80 + c * 80).astype("uint8")
            Image.fromarray(pixels).save(root / "images" / f"class{c}" / f"{i}.png")
    (root / "images" / "class0" / "broken.png").write_bytes(b"not a png")
    (root / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    return root


def base_args(data, out, steps=6, checkpointing_steps=4, **extra):
    args = ["--train_data_dir", str(data / "images"), "--resolution", "16", "--model_config", str(data / "tiny.json"),
            "--train_batch_size", "4", "--max_train_steps", str(steps), "--output_dir", str(out), "--logging_steps", "1",
            "--checkpointing_steps", str(checkpointing_steps), "--report_to", "none"]
    for key, value in extra.items():
        args += [f"--{key}"] + ([] if value is True else [str(value)])
    return args


def train(args, launcher=(sys.executable,), check=True, **popen):
    result = subprocess.run([*launcher, SCRIPT, *args], capture_output=True, text=True, timeout=600, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def log_rows(out):
    with open(out / "log.csv", newline="") as handle:
        return [{k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(handle)]


def test_run_writes_a_loadable_pipeline_and_its_records(data, tmp_path):
    out = tmp_path / "run"
    result = train(base_args(data, out, steps=6, use_ema=True, validation_steps=3, validation_inference_steps=2))
    assert "skipped 1 unreadable image" in result.stderr
    for name in ["model_index.json", "args.json", "log.csv", "samples/step-000003.png", "samples/step-000006.png",
                 "checkpoint-4/model.safetensors", "checkpoint-4/ema/diffusion_pytorch_model.safetensors",
                 "checkpoint-4/ema/config.json", "transformer/config.json"]:
        assert (out / name).exists(), name
    rows = log_rows(out)
    losses = [r for r in rows if r["loss"] is not None]
    assert [r["step"] for r in losses] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] > 0 and r["lr"] == 1e-4 and r["images_per_second"] > 0 for r in losses)
    # validation logs the share of queries whose power responds to the norm: sigma was calibrated
    responding = [r["responding_fraction"] for r in rows if r["responding_fraction"] is not None]
    assert len(responding) == 2 and all(f > 0.5 for f in responding)
    assert "calibrated NaLa's norm_scale" in result.stderr
    assert json.loads((out / "args.json").read_text())["max_train_steps"] == 6
    pipe = NaLaDiTPipeline.from_pretrained(out)
    assert pipe.labels == {"class0": 0, "class1": 1, "class2": 2}
    images = pipe(["class2"], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    # the saved transformer holds the EMA weights of the last checkpoint's EMA, advanced to the end
    ema = load_file(out / "checkpoint-4" / "ema" / "diffusion_pytorch_model.safetensors")
    final = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    raw = load_file(out / "checkpoint-4" / "model.safetensors")
    assert set(ema) <= set(final) and set(ema) <= set(raw)
    # the EMA is an average of the weights, not the weights: it differs from the raw step-4 model
    # (the decay warms up as (1 + t) / (10 + t)) and the output holds it, advanced two more steps
    changed = [k for k in ema if not torch.equal(ema[k], raw[k])]
    assert len(changed) > len(ema) // 2 and all(torch.isfinite(t).all() for t in ema.values())
    assert any(not torch.equal(final[k], ema[k]) for k in ema)


def test_ema_with_zero_decay_is_exactly_the_weights(data, tmp_path):
    # with decay 0 the EMA must equal the trained weights tensor by tensor: the EMA is wired to the
    # right parameters, in the right order, and saved as the output
    out = tmp_path / "ema0"
    train(base_args(data, out, steps=4, use_ema=True, ema_decay=0.0))
    ema = load_file(out / "checkpoint-4" / "ema" / "diffusion_pytorch_model.safetensors")
    raw = load_file(out / "checkpoint-4" / "model.safetensors")
    final = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert ema and all(torch.equal(ema[k], raw[k]) for k in ema)
    assert all(torch.equal(final[k], raw[k]) for k in ema)


@pytest.mark.slow
def test_killed_run_resumes_exactly(data, tmp_path):
    extra = dict(gradient_accumulation_steps=2, lr_scheduler="cosine", lr_warmup_steps=2, use_ema=True)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    train(base_args(data, reference, steps=14, **extra))
    process = subprocess.Popen([sys.executable, SCRIPT, *base_args(data, killed, steps=14, **extra)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-4").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps_before = [r["step"] for r in log_rows(killed)]
    assert steps_before[-1] < 14 and not (killed / "model_index.json").exists()
    result = train(base_args(data, killed, steps=14, resume_from_checkpoint="latest", **extra))
    assert "resumed from" in result.stderr
    # the EMA state is read back without diffusers' alarms about its settings or a deprecated call
    assert "will be ignored" not in result.stderr and "FutureWarning" not in result.stderr, result.stderr[-2000:]
    resumed_rows, reference_rows = log_rows(killed), log_rows(reference)
    assert [r["step"] for r in resumed_rows] == list(range(1, 15))  # the step count never restarted
    for a, b in zip(resumed_rows, reference_rows):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["lr"] == pytest.approx(b["lr"])
    weights = [load_file(run / "transformer" / "diffusion_pytorch_model.safetensors") for run in (reference, killed)]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])


def test_sigterm_writes_a_checkpoint_before_exit(data, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, SCRIPT, *base_args(data, out, steps=100000, checkpointing_steps=100000)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((out / "log.csv").exists() and len(log_rows(out)) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and int(checkpoints[0].name.split("-")[1]) >= 3
    assert "resume with --resume_from_checkpoint latest" in stderr


@pytest.mark.slow
def test_two_cpu_processes(data, tmp_path):
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    train(base_args(data, out, steps=4), launcher=launcher, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    # --overwrite on two processes: one removes the old run, neither trips over the other
    train(base_args(data, out, steps=4, overwrite=True), launcher=launcher, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    state = json.loads((out / "checkpoint-4" / "training_state.json").read_text())
    assert state["num_processes"] == 2 and (out / "checkpoint-4" / "random_states_1.pkl").exists()
    images = NaLaDiTPipeline.from_pretrained(out)([0, 1], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_distillation_from_a_converted_dit(data, tmp_path):
    teacher = tmp_path / "teacher"
    dit = tiny_dit(in_channels=3, num_classes=3)
    dit.save_pretrained(teacher)
    (teacher / "config.json").write_text(json.dumps({**json.loads((teacher / "config.json").read_text()),
                                                     "sample_size": 16}))
    out = tmp_path / "student"
    args = base_args(data, out, steps=4, init_from=teacher, teacher=teacher, distill_weight=0.5, inhibit="cosine")
    args[args.index("--model_config") + 1] = "S/2"  # ignored: --init_from decides the architecture
    train(args)
    rows = log_rows(out)
    assert all(r["loss_distill"] is not None and r["loss_distill"] > 0 for r in rows)
    assert all(r["loss"] == pytest.approx(r["loss_target"] + 0.5 * r["loss_distill"], rel=1e-5) for r in rows)
    config = NaLaDiTTransformer2DModel.load_config(out / "transformer")
    assert config["attention_type"] == "nala" and config["inhibit"] == "cosine"
    assert config["norm_scale_mode"] == "calibrated"
    # sigma was calibrated from the teacher's own queries on the training data (then kept fixed)
    weights = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    sigma = weights["transformer_blocks.0.attn1.processor.log_norm_scale"].exp()
    assert sigma.shape == (2,) and (sigma > 1.2).all()


@pytest.mark.slow  # a full training run (or several): the default set stays under five minutes
def test_norm_scale_flags_fixed_and_learnable(data, tmp_path):
    fixed = tmp_path / "fixed"
    train(base_args(data, fixed, steps=2, norm_scale_mode="fixed", norm_scale=2.5))
    config = NaLaDiTTransformer2DModel.load_config(fixed / "transformer")
    assert (config["norm_scale_mode"], config["norm_scale"]) == ("fixed", 2.5)
    learnable = tmp_path / "learnable"
    train(base_args(data, learnable, steps=3, norm_scale_mode="learnable"))
    model = NaLaDiTPipeline.from_pretrained(learnable).transformer
    sigma = model.transformer_blocks[0].attn1.processor.log_norm_scale
    assert isinstance(sigma, torch.nn.Parameter) and sigma.exp().min() > 1.2  # calibrated start, then trained


@pytest.mark.slow  # a full training run (or several): the default set stays under five minutes
def test_latent_space_with_cached_latents(data, tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "run"
    train(base_args(data, out, steps=4, vae=tmp_path / "vae", cache_latents=True))
    assert len(list((out / "latent_cache").glob("*.safetensors"))) == 1
    pipe = NaLaDiTPipeline.from_pretrained(out)
    assert pipe.vae is not None and pipe.transformer.config.in_channels == 4 and pipe.transformer.config.sample_size == 8
    assert pipe([1], num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)
    # latents are not clipped to [-1, 1]: the saved DDIM does not clip, so its steps need no clipping fix
    from nala_diffusion.diffusion.objectives import clipping_step_kwargs

    assert pipe.scheduler.config.clip_sample is False and clipping_step_kwargs(pipe.scheduler) == {}
    # another VAE at the same path: resume is refused, and a new run does not reuse the old latents
    torch.manual_seed(1)
    type(vae)(**vae.config).save_pretrained(tmp_path / "vae")
    result = train(base_args(data, out, steps=6, vae=tmp_path / "vae", cache_latents=True,
                             resume_from_checkpoint="latest"), check=False)
    assert result.returncode == 2 and "--vae weights: checkpoint" in result.stderr
    train(base_args(data, tmp_path / "again", steps=1, vae=tmp_path / "vae", cache_latents=True))
    assert len(list((out / "latent_cache").glob("*.safetensors"))) == 1  # nothing added to the old run


@pytest.mark.slow  # a full training run (or several): the default set stays under five minutes
def test_resume_refuses_other_data_behind_the_same_class_names(data, tmp_path):
    out = tmp_path / "run"
    copy = tmp_path / "images"
    for image in (data / "images").rglob("*.png"):
        target = copy / image.relative_to(data / "images")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(image.read_bytes())
    args = base_args(data, out, steps=4)
    args[args.index("--train_data_dir") + 1] = str(copy)
    train(args)
    Image.fromarray(np.full((20, 24, 3), 7, np.uint8)).save(copy / "class1" / "0.png")  # one image changed
    resumed = [*args[:args.index("--max_train_steps") + 1], "6", *args[args.index("--max_train_steps") + 2:],
               "--resume_from_checkpoint", "latest"]
    result = train(resumed, check=False)
    assert result.returncode == 2 and "the training data (another dataset, or files added" in result.stderr


def test_errors_are_clear_and_overwrite_nothing(data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    (tmp_path / "hollow" / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "hollow" / "a" / "x.png")
    cases = [
        (["--train_data_dir", str(tmp_path / "missing")], "does not exist"),
        (["--train_data_dir", str(empty)], "one subfolder per class"),
        (["--train_data_dir", str(tmp_path / "hollow")], "Found no valid file for the classes b"),
        (["--dataset", "builtin:nothing"], "unknown built-in dataset"),
    ]
    for data_args, message in cases:
        args = base_args(data, tmp_path / "out")
        index = args.index("--train_data_dir")
        args[index: index + 2] = data_args
        assert cli(args) == 2  # in-process: these fail before any accelerator or model is made
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    out = tmp_path / "run"
    train(base_args(data, out, steps=4))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert cli(base_args(data, out, steps=4)) == 2
    assert "already holds a training run" in capsys.readouterr().err
    wider = json.loads((data / "tiny.json").read_text())
    wider["attention_head_dim"] = 16
    (tmp_path / "wider.json").write_text(json.dumps(wider))
    args = base_args(data, out, steps=8, resume_from_checkpoint="latest")
    args[args.index("--model_config") + 1] = str(tmp_path / "wider.json")
    incompatible = train(args, check=False)
    assert incompatible.returncode == 2 and "incompatible configuration" in incompatible.stderr
    assert "model attention_head_dim: checkpoint 8, this run 16" in incompatible.stderr
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_resume_accepts_a_checkpoint_written_before_an_option_existed():
    # a checkpoint's config lacks the options added since it was written: they count at the value loading
    # gives them, so a run whose model is the same resumes, and one whose model differs is still refused
    from nala_diffusion.train import checkpoints

    model = NaLaDiTTransformer2DModel(**{**TINY, "attention_type": "nala"})
    current = {"model_config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")}}
    older = {k: v for k, v in current["model_config"].items() if k not in ("use_cpe", "cpe_init", "lepe_init")}
    checkpoints.check_compatible({"model_config": older}, current, "ckpt", NaLaDiTTransformer2DModel)
    with pytest.raises(ValueError, match="incompatible configuration\n  model cpe_init"):
        checkpoints.check_compatible({"model_config": older}, current, "ckpt")  # without the class: key by key
    with_cpe = {"model_config": {**current["model_config"], "use_cpe": True}}
    with pytest.raises(ValueError, match="model use_cpe: checkpoint False, this run True"):
        checkpoints.check_compatible({"model_config": older}, with_cpe, "ckpt", NaLaDiTTransformer2DModel)
    # sigma's mode: configs from before it existed were built with sigma fixed, not today's calibrated default
    assert current["model_config"]["norm_scale_mode"] == "calibrated"
    no_mode = {k: v for k, v in current["model_config"].items() if k != "norm_scale_mode"}
    with pytest.raises(ValueError, match="model norm_scale_mode: checkpoint 'fixed', this run 'calibrated'"):
        checkpoints.check_compatible({"model_config": no_mode}, current, "ckpt", NaLaDiTTransformer2DModel)


@pytest.mark.slow
def test_resume_refuses_what_it_cannot_continue_exactly(data, tmp_path, capsys):
    # a finished run without checkpoints: "resume latest" must not start again over its weights
    out = tmp_path / "finished"
    train(base_args(data, out, steps=2, checkpointing_steps=100))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert cli(base_args(data, out, steps=4, checkpointing_steps=100, resume_from_checkpoint="latest")) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    # a run with a checkpoint: a changed objective, EMA or class names are refused, naming them
    out = tmp_path / "run"
    train(base_args(data, out, steps=4))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    renamed = tmp_path / "renamed"
    for c in range(3):
        (renamed / f"kind{c}").mkdir(parents=True)
        for image in (data / "images" / f"class{c}").glob("*.png"):
            (renamed / f"kind{c}" / image.name).write_bytes(image.read_bytes())
    other_data = base_args(data, out, steps=6, resume_from_checkpoint="latest")
    other_data[other_data.index("--train_data_dir") + 1] = str(renamed)
    for args, message in [
        (base_args(data, out, steps=6, resume_from_checkpoint="latest", prediction_type="v_prediction"),
         "--prediction_type: checkpoint 'epsilon', this run 'v_prediction'"),
        (base_args(data, out, steps=6, resume_from_checkpoint="latest", use_ema=True), "--use_ema: checkpoint False"),
        (other_data, "the training data (another dataset, or files added, removed or changed)"),
    ]:
        result = train(args, check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    # --overwrite trains again from step 0; a zero step count is a usage error
    train(base_args(data, out, steps=2, overwrite=True))
    assert [row["step"] for row in log_rows(out)][-1] == 2
    with pytest.raises(SystemExit) as exit_info:
        cli(base_args(data, tmp_path / "zero", checkpointing_steps=0))
    assert exit_info.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


def test_a_second_trainer_on_one_folder_is_refused(data, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    with lock_held_by_a_live_process(out) as pid:
        assert cli(base_args(data, out, steps=2)) == 2
        assert f"being written by process {pid}" in capsys.readouterr().err
        assert os.listdir(out) == [".lock"]


@pytest.mark.slow  # a full training run (or several): the default set stays under five minutes
def test_hybrid_layout_trains_loads_and_refuses_another_layout_on_resume(data, tmp_path, capsys):
    out = tmp_path / "hybrid"
    train(base_args(data, out, steps=4, softmax_layers=-1, use_ema=True))
    pipe = NaLaDiTPipeline.from_pretrained(out)
    assert pipe.transformer.config.attention_types == ["nala", "softmax"]
    assert [type(b.attn1.processor).__name__ for b in pipe.transformer.transformer_blocks] == \
        ["NaLaAttnProcessor", "SoftmaxAttnProcessor"]
    nala_layer = pipe.transformer.transformer_blocks[0].attn1.processor  # no sigma flags: the one default, calibrated
    assert nala_layer.norm_scale_mode == NaLaDiTTransformer2DModel.from_preset("S/8", num_layers=1).config.norm_scale_mode
    assert not nala_layer.norm_scale_uncalibrated
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    result = train(base_args(data, out, steps=6, resume_from_checkpoint="latest", softmax_layers=0, use_ema=True),
                   check=False)
    assert result.returncode == 2
    assert "model attention_types: checkpoint ['nala', 'softmax'], this run ['softmax', 'nala']" in result.stderr
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    # the same layout resumes, EMA weights of both kinds of layer included
    result = train(base_args(data, out, steps=6, resume_from_checkpoint="latest", softmax_layers=-1, use_ema=True))
    assert "resumed from" in result.stderr and [r["step"] for r in log_rows(out)][-1] == 6
    assert cli(base_args(data, tmp_path / "bad", steps=2, attention_types="nala")) == 2
    assert "attention_types has 1 entries but the model has 2 blocks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(base_args(data, tmp_path / "both", steps=2, softmax_layers=0, attention_types="nala"))
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow  # a full training run (or several): the default set stays under five minutes
def test_a_decaying_schedule_refuses_another_step_count_on_resume(data, tmp_path):
    out = tmp_path / "cosine"
    train(base_args(data, out, steps=4, lr_scheduler="cosine"))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    result = train(base_args(data, out, steps=6, lr_scheduler="cosine", resume_from_checkpoint="latest"), check=False)
    assert result.returncode == 2 and "--lr_scheduler cosine decays over that count" in result.stderr
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    # the same count resumes (here: nothing left to do but the final save)
    assert train(base_args(data, out, steps=4, lr_scheduler="cosine", resume_from_checkpoint="latest")).returncode == 0


def test_weights_and_checkpoints_follow_the_umask(data, tmp_path):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "shared"
        train(base_args(data, out, steps=4, use_ema=True))
        pipe = NaLaDiTPipeline.from_pretrained(out)
        pipe.save_pretrained(tmp_path / "copy")
        pipe.transformer.save_pretrained(tmp_path / "model")
    finally:
        os.umask(previous)
    weights = [p for folder in (out, tmp_path / "copy", tmp_path / "model") for p in folder.rglob("*.safetensors")]
    assert any("checkpoint-4" in str(p) for p in weights) and any("ema" in p.parts for p in weights)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in weights}
    assert set(modes.values()) == {"0o644"}, modes


@pytest.mark.slow  # a full training run (or several): the default set stays under five minutes
def test_overwrite_removes_only_the_run_and_data_inside_output_dir_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    train(base_args(data, out, steps=4))
    (out / "notes.txt").write_text("mine")
    (out / "my_images").mkdir()
    train(base_args(data, out, steps=2, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine" and (out / "my_images").is_dir()
    assert [row["step"] for row in log_rows(out)][-1] == 2 and not (out / "checkpoint-4").exists()
    # an output_dir that holds the data: refused before anything is touched
    inside = tmp_path / "project"
    (inside / "data").mkdir(parents=True)
    for c in range(2):
        (inside / "data" / f"c{c}").mkdir()
        for image in list((data / "images" / f"class{c}").glob("[0-9].png"))[:2]:
            (inside / "data" / f"c{c}" / image.name).write_bytes(image.read_bytes())
    args = base_args(data, inside, steps=2, overwrite=True)
    args[args.index("--train_data_dir") + 1] = str(inside / "data")
    before = sorted(p.relative_to(inside) for p in inside.rglob("*"))
    assert cli(args) == 2 and "contains the training data" in capsys.readouterr().err
    assert sorted(p.relative_to(inside) for p in inside.rglob("*")) == before


def test_validation_labels_outside_the_data_are_refused_at_start(data, tmp_path, capsys):
    out = tmp_path / "labels"
    assert cli(base_args(data, out, steps=2, validation_steps=1, validation_labels=99)) == 2
    assert "--validation_labels [99] are not classes of the data (0..2)" in capsys.readouterr().err
    assert not list(out.glob("checkpoint-*")) and not (out / "log.csv").exists()


def test_an_in_process_run_gives_the_signal_handlers_back(data, tmp_path):
    """Both handlers are set here, so the check holds however the test process was started (a shell's
    background job starts with SIGINT ignored)."""
    def mine(signum, frame):
        raise AssertionError("not called")

    previous = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert cli(base_args(data, tmp_path / "inproc", steps=1)) == 0  # as nala-study runs it
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is mine
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_full_disk_during_a_checkpoint_is_named_and_loses_nothing(tmp_path, monkeypatch):
    import collections

    from nala_diffusion.train import checkpoints

    class FullDiskAccelerator:
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, folder):
            os.makedirs(folder)
            (Path(folder) / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: "
                               "basic_ios::clear: iostream error")

    (tmp_path / "checkpoint-10").mkdir()
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30, 2**20))
    with pytest.raises(ValueError, match=r"could not write checkpoint-20 in .*: the disk holding .* is full \(1 MiB free\)"):
        checkpoints.save_checkpoint(FullDiskAccelerator(), str(tmp_path), 20, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10"]  # the partial one removed, the old kept


def test_sharded_training_is_refused_ddp_is_not():
    from accelerate.utils import DistributedType

    from nala_diffusion.train.train_nala_dit import check_distributed

    class Fake:
        def __init__(self, kind):
            self.distributed_type = kind

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ValueError, match="shards the parameters.*--multi_gpu"):
            check_distributed(Fake(kind))
    for kind in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.NO):
        check_distributed(Fake(kind))


class _RunsCodeWhenUnpickled:
    """An object whose unpickling writes a file: what a malicious optimizer.bin could carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_checkpoint_states_are_read_without_running_pickled_code(tmp_path):
    """Checkpoints hold accelerate's torch.save files; loading them must refuse arbitrary objects."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(2, 2)
        model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
        accelerator.save_state(str(tmp_path / "checkpoint"))
        draw = torch.rand(3)
        accelerator.load_state(str(tmp_path / "checkpoint"))
        assert torch.equal(torch.rand(3), draw), "the RNG state was not restored on resume"

        marker = tmp_path / "marker.txt"
        torch.save({"state": _RunsCodeWhenUnpickled(str(marker))}, tmp_path / "checkpoint" / "optimizer.bin")
        with pytest.raises(Exception, match="weights_only|Unsupported global"):
            accelerator.load_state(str(tmp_path / "checkpoint"))
        assert not marker.exists()
    finally:
        AcceleratorState._reset_state(True)  # later in-process runs set up their own accelerator
