import ast
import doctest
import inspect
import json
import os
import re
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline
from helpers import LargestAllocation, tiny_dit, tiny_nala

import nala_diffusion.pipelines.pipeline_nala_dit as pipeline_module
import nala_diffusion.pipelines.pipeline_nala_dit_highres as highres_module
from nala_diffusion import NaLaDiTHighResPipeline, NaLaDiTPipeline
from nala_diffusion.pipelines.sample import main as sample_main
from nala_diffusion.pipelines.schedulers import SCHEDULERS, scheduler_from_name

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
ID2LABEL = {0: "cat", 1: "dog, puppy", 2: "bird"}


def tiny_pipeline(cls=NaLaDiTPipeline, **config):
    transformer = tiny_nala(sample_size=16, num_classes=3, **config)
    return cls(transformer, DDIMScheduler(), id2label=ID2LABEL)


def sample(pipe, labels=(0, 1), seed=0, **kwargs):
    kwargs = {"height": 48, "width": 32, "num_inference_steps": 4, "output_type": "np", **kwargs}
    return pipe(list(labels), generator=torch.manual_seed(seed), **kwargs).images


@pytest.fixture
def saved(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "plain")
    return pipe, tmp_path


def without_loader_files(folder, copy):
    """A copy of a saved folder as folders were saved before they carried loader files."""
    shutil.copytree(folder, copy)
    for name in ("pipeline_nala_dit.py", "pipeline_nala_dit_highres.py"):
        (copy / name).unlink()
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "NaLaDiTPipeline"}))
    return copy


def test_three_loading_paths_give_identical_images(saved, tmp_path):
    pipe, root = saved
    expected = sample(pipe, labels=["cat", 1])
    assert expected.shape == (2, 48, 32, 3)
    # a folder saved without the loader files (as before they existed) still opens with the repository's file
    bare = without_loader_files(root / "plain", tmp_path / "bare")
    loaded = [
        NaLaDiTPipeline.from_pretrained(root / "plain"),
        DiffusionPipeline.from_pretrained(root / "plain", trust_remote_code=True),  # the folder's own loader file
        DiffusionPipeline.from_pretrained(
            bare, custom_pipeline=str(REPO / "pipelines" / "pipeline_nala_dit.py"), trust_remote_code=True
        ),
    ]
    for other in loaded:
        assert type(other).__name__ == "NaLaDiTPipeline"
        assert other.labels == pipe.labels  # names survive save/load
        np.testing.assert_array_equal(sample(other, labels=["cat", 1]), expected)


def test_highres_file_works_as_custom_pipeline(saved, tmp_path):
    _, root = saved
    by_name = DiffusionPipeline.from_pretrained(root / "plain", custom_pipeline="pipeline_nala_dit_highres",
                                                trust_remote_code=True)
    assert type(by_name).__name__ == "NaLaDiTHighResPipeline"
    assert sample(by_name, highres_mode="progressive", height=64, width=64).shape == (2, 64, 64, 3)
    # a folder without the loader files takes the repository's file by path
    bare = without_loader_files(root / "plain", tmp_path / "bare")
    pipe = DiffusionPipeline.from_pretrained(
        bare, custom_pipeline=str(REPO / "pipelines" / "pipeline_nala_dit_highres.py"), trust_remote_code=True
    )
    assert type(pipe).__name__ == "NaLaDiTHighResPipeline"


def test_seed_determinism_and_per_image_generators():
    pipe = tiny_pipeline()
    np.testing.assert_array_equal(sample(pipe, seed=3), sample(pipe, seed=3))
    assert np.abs(sample(pipe, seed=3) - sample(pipe, seed=4)).max() > 1e-3
    pair = pipe([0, 1], generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)],
                num_inference_steps=3, output_type="np").images
    single = pipe([1], generator=[torch.Generator().manual_seed(6)], num_inference_steps=3, output_type="np").images
    # image depends on its seed, not the batch (to rounding: DDIM's noise recomputed from the clipped x0 at the
    # last, least noisy step divides by sqrt(1 - alpha_bar) ~ 0.01, which scales the batch's rounding)
    np.testing.assert_allclose(pair[1], single[0], atol=5e-5)


def test_output_types_and_images_per_label():
    pipe = tiny_pipeline()
    pil = sample(pipe, output_type="pil")
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (32, 48)
    pt = sample(pipe, output_type="pt")
    assert pt.shape == (2, 3, 48, 32) and 0 <= pt.min() and pt.max() <= 1
    latent = sample(pipe, output_type="latent")
    assert latent.shape == (2, 3, 48, 32)
    assert sample(pipe, labels=["bird"], num_images_per_label=3).shape == (3, 48, 32, 3)


def test_guidance_one_skips_the_unconditional_half():
    pipe = tiny_pipeline()
    seen = []
    pipe.transformer.register_forward_hook(lambda module, args, kwargs_out: seen.append(args[0].shape[0]))
    sample(pipe, guidance_scale=1.0)
    assert set(seen) == {2}
    seen.clear()
    sample(pipe, guidance_scale=4.0)
    assert set(seen) == {4}
    assert np.abs(sample(pipe, guidance_scale=1.0) - sample(pipe, guidance_scale=4.0)).max() > 1e-3


def test_learned_sigma_and_latent_space_with_vae(tmp_path):
    sigma = NaLaDiTPipeline(tiny_nala(sample_size=16, num_classes=3, out_channels=6), DDIMScheduler())
    assert np.isfinite(sample(sigma)).all()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=32,
    ).eval()
    pipe = NaLaDiTPipeline(tiny_nala(in_channels=4, out_channels=8, num_classes=3), DDIMScheduler(), vae=vae)
    assert pipe.size_unit == 4 and pipe.default_sample_size == 16
    images = sample(pipe, height=24, width=40)
    assert images.shape == (2, 24, 40, 3) and np.isfinite(images).all()
    assert sample(pipe, height=24, width=40, output_type="latent").shape == (2, 4, 12, 20)
    pipe.save_pretrained(tmp_path)
    np.testing.assert_array_equal(sample(NaLaDiTPipeline.from_pretrained(tmp_path), height=24, width=40), images)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_samples(name):
    flow = name.startswith("flow_")  # the flow-matching samplers take a flow model
    pipe = tiny_pipeline(objective="flow") if flow else tiny_pipeline()
    pipe.scheduler = scheduler_from_name(name, pipe.scheduler.config)
    images = sample(pipe, num_inference_steps=3)
    assert images.shape == (2, 48, 32, 3) and np.isfinite(images).all()
    other = tiny_pipeline() if flow else tiny_pipeline(objective="flow")
    other.scheduler = scheduler_from_name(name, other.scheduler.config)
    with pytest.raises(ValueError, match="objective, but the scheduler"):  # a sampler of the other objective
        sample(other, num_inference_steps=3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(labels=["horse"]), "unknown label name 'horse'"),
        (dict(labels=[3]), r"id 3 is out of range; allowed ids are 0..2"),
        (dict(labels=[]), "class_labels is empty"),
        (dict(height=47), "height=47 must be a positive multiple of 2"),
        (dict(width=0), "width=0"),
        (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
        (dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0"),
        (dict(output_type="jpg"), "output_type"),
        (dict(latents=torch.randn(2, 3, 8, 8)), r"latents have shape \(2, 3, 8, 8\)"),
        (dict(highres_mode="tiled"), "highres_mode"),
        (dict(strength=0.0), "strength"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, match):
    pipe = tiny_pipeline(NaLaDiTHighResPipeline)
    labels = kwargs.pop("labels", [0, 1])
    with pytest.raises(ValueError, match=match):
        sample(pipe, labels=labels, **kwargs)


def test_bad_components_raise():
    with pytest.raises(ValueError, match="id2label has ids"):
        NaLaDiTPipeline(tiny_nala(num_classes=3), DDIMScheduler(), id2label={7: "x"})
    latent_only = NaLaDiTPipeline(tiny_nala(in_channels=4), DDIMScheduler())  # a latent model without its vae
    latents = latent_only([1], num_inference_steps=2, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()
    with pytest.raises(ValueError, match="no vae"):
        latent_only([1], num_inference_steps=2, output_type="pil")
    with pytest.raises(ValueError, match="no vae"):
        tiny_pipeline(NaLaDiTHighResPipeline).enable_vae_tiling()


def test_callback_on_step_end_can_replace_latents():
    pipe = tiny_pipeline()
    steps = []

    def callback(pipe, i, t, tensors):
        steps.append(i)
        return {"latents": torch.zeros_like(tensors["latents"])}

    images = sample(pipe, num_inference_steps=3, callback_on_step_end=callback, output_type="pt")
    assert steps == [0, 1, 2]
    assert torch.allclose(images, torch.full_like(images, 0.5))  # zero latents decode to mid-grey


def documented_defaults(function):
    """{name: default} from ``name (`type`, *optional*, defaults to `value`)`` lines of a docstring."""
    found = {}
    for name, value in re.findall(r"^\s*(\w+) \(`[^`]*`(?:[^)]*?)defaults to `([^`]*)`\)", function.__doc__, re.M):
        found[name] = None if value == "None" else ast.literal_eval(value)
    return found


@pytest.mark.parametrize("cls", [NaLaDiTPipeline, NaLaDiTHighResPipeline])
def test_docstring_defaults_equal_signature(cls):
    documented = documented_defaults(cls.__call__)
    signature = inspect.signature(cls.__call__).parameters
    assert len(documented) >= 5
    for name, value in documented.items():
        assert signature[name].default == value, name


@pytest.mark.parametrize("module", [pipeline_module, highres_module])
def test_docstring_examples_run(module):
    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert results.attempted >= 4 and results.failed == 0


@pytest.mark.parametrize("mode", ["direct", "progressive"])
@pytest.mark.parametrize("attention_type", ["nala", "softmax"])
def test_highres_modes_reach_twice_the_training_side(mode, attention_type):
    pipe = tiny_pipeline(NaLaDiTHighResPipeline, attention_type=attention_type)
    out = pipe([0, 2], highres_mode=mode, num_inference_steps=4, output_type="np", generator=torch.manual_seed(0))
    assert out.images.shape == (2, 32, 32, 3) and np.isfinite(out.images).all()
    expected = [(32, 32)] if mode == "direct" else [(16, 16), (32, 32)]
    assert [(s["height"], s["width"]) for s in out.stages] == expected
    assert all(s["seconds"] > 0 for s in out.stages)


def test_progressive_stage_sizes():
    pipe = tiny_pipeline(NaLaDiTHighResPipeline)
    assert pipe.stage_sizes(64, 128) == [(8, 16), (16, 32), (32, 64), (64, 128)]  # longer side starts at 16
    assert pipe.stage_sizes(64, 64, num_stages=2) == [(32, 32), (64, 64)]
    assert pipe.stage_sizes(16, 16) == [(16, 16)]




def test_nala_largest_tensor_grows_linearly_with_pixels():
    transformer = tiny_nala(sample_size=16, num_classes=3)
    largest = []
    for side in (32, 64, 128):
        with torch.no_grad(), LargestAllocation() as probe:
            transformer(torch.randn(1, 3, side, side), timestep=torch.tensor([10]), class_labels=torch.tensor([0]))
        largest.append(probe.largest)
    assert largest[1] / largest[0] <= 4.5 and largest[2] / largest[1] <= 4.5  # 4x pixels -> about 4x memory


def test_sampling_defaults_are_saved_and_used_when_a_call_leaves_them_out(tmp_path):
    pipe = tiny_pipeline()
    assert pipe.sampling_settings() == {"num_inference_steps": 50, "guidance_scale": 4.0}  # DiT's
    pipe = NaLaDiTPipeline(pipe.transformer, pipe.scheduler, id2label=ID2LABEL,
                           sampling_defaults={"num_inference_steps": 3, "guidance_scale": 1.0})
    pipe.save_pretrained(tmp_path)
    loaded = NaLaDiTHighResPipeline.from_pretrained(tmp_path)
    assert loaded.sampling_settings() == {"num_inference_steps": 3, "guidance_scale": 1.0}
    assert loaded.sampling_settings(7, 2.5) == {"num_inference_steps": 7, "guidance_scale": 2.5}
    batch_sizes = []
    loaded.transformer.register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].shape[0]))
    loaded([0, 1], height=16, width=16, output_type="np")
    assert batch_sizes == [2, 2, 2]  # 3 steps, guidance 1 (no unconditional half)
    batch_sizes.clear()
    loaded([0, 1], height=16, width=16, num_inference_steps=2, guidance_scale=3.0, output_type="np")
    assert batch_sizes == [4, 4]
    with pytest.raises(ValueError, match="unknown keys"):
        NaLaDiTPipeline(pipe.transformer, pipe.scheduler, sampling_defaults={"steps": 3})


def test_nala_sample_cli_writes_a_png(saved, capsys):
    _, root = saved
    out = root / "grid.png"
    code = sample_main(["--model", str(root / "plain"), "--labels", "cat", "2", "--steps", "2",
                        "--height", "32", "--width", "48", "--out", str(out), "--scheduler", "dpm"])
    assert code == 0 and PIL.Image.open(out).size == (2 * 48 + 3 * 2, 32 + 2 * 2)
    progressive = root / "big.png"
    code = sample_main(["--model", str(root / "plain"), "--labels", "bird", "--steps", "2", "--height", "64",
                        "--width", "64", "--highres-mode", "progressive", "--out", str(progressive)])
    assert code == 0 and PIL.Image.open(progressive).size == (64, 64)  # one image: no grid padding
    assert "stage 32x32" in capsys.readouterr().out
    assert sample_main(["--model", str(root / "plain"), "--labels", "horse", "--out", str(root / "x.png")]) == 2
    assert not (root / "x.png").exists()


def test_callback_reads_the_diffusers_properties():
    pipe = tiny_pipeline()
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append((p.guidance_scale, p.do_classifier_free_guidance, p.num_timesteps))
        return kwargs

    pipe([0], num_inference_steps=3, guidance_scale=2.5, output_type="np", callback_on_step_end=callback)
    assert seen == [(2.5, True, 3)] * 3
    highres = tiny_pipeline(NaLaDiTHighResPipeline)
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        highres([0], num_inference_steps=2, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])


def test_label_forms_and_numeric_types():
    pipe = tiny_pipeline()
    nested = sample(pipe, labels=[[1], [2]])
    assert np.array_equal(nested, sample(pipe, labels=[1, 2]))
    assert np.array_equal(sample(pipe, labels=[np.int64(1), torch.tensor(2)]), nested)
    with pytest.raises(ValueError, match="not a class id"):
        sample(pipe, labels=[1.7])
    images = pipe([0], height=np.int64(16), width=16, num_inference_steps=np.int64(2), output_type="np").images
    assert images.shape == (1, 16, 16, 3)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance_scale"):
            sample(pipe, guidance_scale=bad)


def test_nala_sample_refuses_bad_arguments_before_loading(tmp_path, capsys):
    cases = [
        (["--out", str(tmp_path)], "is a folder"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
        (["--model", str(tmp_path / "nonexistent")], "no such folder"),
    ]
    for extra, message in cases:
        args = extra if extra[0] == "--out" else [*extra, "--out", str(tmp_path / "g.png")]
        assert sample_main(args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_written_pngs_follow_the_umask(tmp_path):
    from nala_diffusion.metrics.samples import save_png_atomically
    from nala_diffusion.utils.files import save_grid_atomically

    previous = os.umask(0o022)
    try:
        save_grid_atomically(torch.rand(2, 3, 8, 8), str(tmp_path / "grid.png"), nrow=2)
        save_png_atomically(PIL.Image.new("RGB", (4, 4)), str(tmp_path / "one.png"))
    finally:
        os.umask(previous)
    assert {oct(os.stat(tmp_path / n).st_mode & 0o777) for n in ("grid.png", "one.png")} == {oct(0o644)}


def test_folders_with_missing_unexpected_or_non_finite_tensors_are_refused(tmp_path):
    # defect: a pipeline folder with a missing tensor loaded with a warning and sampled garbage
    import os

    from safetensors.torch import load_file, save_file

    from nala_diffusion import NaLaDiTPipeline, NaLaDiTTransformer2DModel

    NaLaDiTPipeline(tiny_nala(sample_size=16, num_classes=3), DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    weights = next((tmp_path / "pipe" / "transformer").glob("*.safetensors"))
    pristine = load_file(weights)
    assert NaLaDiTPipeline.from_pretrained(tmp_path / "pipe") is not None
    for change, message in [
        (lambda sd: sd.pop("proj_out_1.weight"), "missing tensors: proj_out_1.weight"),
        (lambda sd: sd.__setitem__("stray.weight", torch.ones(2)), "unexpected tensors: stray.weight"),
        (lambda sd: sd["proj_out_2.bias"].fill_(float("nan")), "non-finite values (NaN or inf) in: proj_out_2.bias"),
    ]:
        state = {k: v.clone() for k, v in pristine.items()}
        change(state)
        save_file(state, weights)
        for load in (lambda: NaLaDiTPipeline.from_pretrained(tmp_path / "pipe"),
                     lambda: NaLaDiTTransformer2DModel.from_pretrained(tmp_path / "pipe", subfolder="transformer")):
            with pytest.raises(ValueError, match=re.escape(message)):
                load()
    assert os.path.exists(weights)


def test_custom_pipeline_path_through_the_installed_package_works_from_any_folder(saved, monkeypatch):
    import nala_diffusion.pipelines.pipeline_nala_dit as module

    _, root = saved
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    pipe = DiffusionPipeline.from_pretrained(root / "plain", custom_pipeline=module.__file__, trust_remote_code=True)
    assert type(pipe).__name__ == "NaLaDiTPipeline"


def test_non_finite_samples_are_refused_not_written_black():
    from nala_diffusion import NaLaDiTPipeline as Pipe

    pipe = Pipe(tiny_nala(sample_size=16, num_classes=3), DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    # a guidance that overflows float32: DDIM would clip x0 and hide it, so the predictions are checked
    with pytest.raises(ValueError, match=r"NaN or inf model predictions \(timestep \d+\) in 2 of 2 images .* a huge "
                                         "guidance_scale"):
        pipe([0, 1], num_inference_steps=2, guidance_scale=1e39, output_type="np")
    latent = Pipe(tiny_nala(sample_size=16, num_classes=3), DDIMScheduler(clip_sample=False))
    latent.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=r"NaN or inf latents in 2 of 2 images .* a huge guidance_scale"):
        latent([0, 1], num_inference_steps=2, guidance_scale=1e39, output_type="latent")
    nan_start = torch.full((1, 3, 16, 16), float("nan"))
    with pytest.raises(ValueError, match=r"NaN or inf model predictions \(timestep \d+\) in 1 of 1 images"):
        pipe([0], num_inference_steps=2, latents=nan_start, output_type="latent")
    with pytest.raises(ValueError, match="NaN or inf latents in 1 of 1 images"):
        latent([0], num_inference_steps=2, latents=nan_start, output_type="latent")


def test_wrong_types_and_components_get_clear_errors(tmp_path):
    from nala_diffusion import NaLaDiTPipeline as Pipe
    from nala_diffusion import NaLaDiTTransformer2DModel

    with pytest.raises(ValueError, match="this pipeline needs a NaLaDiTTransformer2DModel.*convert_dit_to_nala"):
        Pipe(tiny_dit(), DDIMScheduler())
    with pytest.raises(ValueError, match=r"num_layers must be a positive integer, got '2' \(str\)"):
        NaLaDiTTransformer2DModel(num_layers="2", num_attention_heads=2, attention_head_dim=8, sample_size=8,
                                  patch_size=2, norm_num_groups=1)
    pipe = Pipe(tiny_nala(sample_size=16, num_classes=3), DDIMScheduler())
    with pytest.raises(ValueError, match="num_images_per_label must be an integer >= 1, got True"):
        pipe([0], num_images_per_label=True, num_inference_steps=1)


def test_a_latent_model_without_vae_returns_its_latents_for_np_and_pt(tmp_path):
    # what diffusers' PipelineTesterMixin.test_save_load_optional_components does: vae=None, output_type="np"
    from nala_diffusion import NaLaDiTPipeline as Pipe

    pipe = Pipe(tiny_nala(in_channels=4, num_classes=3), DDIMScheduler(), vae=None)
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=2, generator=torch.manual_seed(0))
    with pytest.warns(UserWarning, match="no vae to decode its 4-channel latents"):
        images = pipe([0, 1], output_type="np", **call).images
    latents = pipe([0, 1], output_type="latent", num_inference_steps=2, generator=torch.manual_seed(0)).images
    assert images.shape == (2, 8, 8, 4) and np.array_equal(images, latents.permute(0, 2, 3, 1).numpy())
    pipe.save_pretrained(tmp_path / "no_vae")
    loaded = Pipe.from_pretrained(tmp_path / "no_vae")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.vae is None
    with pytest.warns(UserWarning):
        again = loaded([0, 1], output_type="np", num_inference_steps=2, generator=torch.manual_seed(0)).images
    assert np.array_equal(again, images)
    with pytest.raises(ValueError, match="cannot be shown as images"):
        pipe([0], output_type="pil", num_inference_steps=1)
