"""A training run's model stage: the model built from a preset, a config file or a pretrained source, its
classes mapped onto the data's, sigma calibrated on real queries, the objective, and the teacher."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from nala_diffusion.diffusion.objectives import NUM_TRAIN_TIMESTEPS
from nala_diffusion.models.options import layer_attention_types
from nala_diffusion.models.sources import load_denoiser
from nala_diffusion.train.run_data import RunData, probe_batch
from nala_diffusion.train.run_setup import LazyLogger

logger = LazyLogger(__name__)


@dataclass
class RunModels:
    """What the model stage hands on: the model to train, the teacher ``(model, its Objective)`` or None,
    the run's objective, class names and data-to-model class ids, and the fixed probe batch."""

    model: Any
    teacher: Optional[Tuple[Any, Any]]
    objective: Any
    id2label: Dict[int, str]
    class_ids: List[int]
    probe: Tuple[Any, Any, Any]


def model_config_file(name: str) -> str:
    """The JSON file ``--model_config`` names: the path itself, else (outside a checkout) the copy of the
    repository's ``train/configs/<file>`` installed with the package; anything else is a ``ValueError``
    saying whether it was taken for a file or a preset."""
    from nala_diffusion.models.transformer import DIT_PRESETS

    if os.path.isfile(name):
        return name
    parts = os.path.normpath(name).split(os.sep)
    if len(parts) >= 2 and parts[-2:-1] == ["configs"]:
        installed = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", parts[-1])
        if os.path.isfile(installed):
            print(f"--model_config {name}: not in {os.getcwd()}; using the installed copy {installed}", file=sys.stderr)
            return installed
    if name.endswith(".json") or name.count("/") > 1 or name.startswith((".", os.sep)):
        raise ValueError(f"--model_config {name!r}: no such file (from {os.getcwd()}); give a JSON config file or a "
                         f"preset ({', '.join(sorted(DIT_PRESETS))})")
    raise ValueError(f"--model_config {name!r} is neither a preset ({', '.join(sorted(DIT_PRESETS))}) nor a file")


def build_model(config, in_channels: int, sample_size: int, num_classes: int):
    """The model to train and the model whose queries calibrate its sigma (the pretrained source
    for ``--init_from``, else the model itself)."""
    from nala_diffusion.models.conversion import convert_dit_to_nala
    from nala_diffusion.models.sit import looks_like_checkpoint_file
    from nala_diffusion.models.transformer import DIT_PRESETS, NaLaDiTTransformer2DModel, preset_config
    expected = {"in_channels": in_channels, "sample_size": sample_size}
    if not config.init_from:  # a pretrained model's classes are mapped onto the data's (resolve_classes)
        expected["num_classes"] = num_classes
    overrides, layout = config.attention_overrides, config.layout_overrides
    if config.init_from:
        source = model = load_denoiser(config.init_from)  # a SiT checkpoint is converted to NaLa, as a DiT is
        if looks_like_checkpoint_file(config.init_from) or not isinstance(source, NaLaDiTTransformer2DModel) \
                or overrides or layout:
            # calibrated later on real data from the source's own queries
            model = convert_dit_to_nala(source, **{"attention_type": "nala", **overrides}, **layout, calibrate=False)
        model_config = dict(model.config)
    elif config.model_config in DIT_PRESETS:
        model_config = preset_config(config.model_config)
    else:
        with open(model_config_file(config.model_config), encoding="utf-8") as handle:
            model_config = {k: v for k, v in json.load(handle).items() if not k.startswith("_")}
    for key, value in expected.items():
        if model_config.get(key, value) != value and not (key == "num_classes" and model_config.get(key) is None):
            raise ValueError(f"the model has {key}={model_config[key]} but the data needs {key}={value}")
    if config.init_from:
        return model, source
    model_config = {**model_config, **expected, **overrides}
    if layout:
        model_config["attention_types"] = layer_attention_types(model_config["num_layers"],
                                                                model_config.get("attention_type", "nala"), **layout)
    model = NaLaDiTTransformer2DModel(**model_config)
    return model, model


def run_objective(config, model_config, clip_sample: bool):
    """The run's :class:`~nala_diffusion.diffusion.objectives.Objective` for a model config."""
    from nala_diffusion.diffusion.objectives import training_objective

    return training_objective(model_config, prediction_type=config.prediction_type,
                              timestep_range=config.timestep_range, clip_sample=clip_sample,
                              weighting_scheme=config.weighting_scheme, logit_mean=config.logit_mean,
                              logit_std=config.logit_std, mode_scale=config.mode_scale,
                              num_train_timesteps=NUM_TRAIN_TIMESTEPS)


def resolved_variance_loss(config, objective, learned: bool, in_channels: int, out_channels: int) -> str:
    """--variance_loss as the run uses it: vlb for a DDPM model with learned variance unless told otherwise;
    a choice the model cannot honour is refused."""
    if config.variance_loss is None:
        return "vlb" if learned and objective.name == "ddpm" else "none"
    if config.variance_loss == "vlb" and objective.name == "flow":
        raise ValueError("--variance_loss vlb is DDPM's variational bound; this is a flow model "
                         f"({config.init_from or config.model_config}), whose learned-variance channels are not sampled")
    if config.variance_loss == "vlb" and not learned:
        raise ValueError(f"--variance_loss vlb needs a model with learned variance (out_channels = 2 x {in_channels}); "
                         f"this one has out_channels {out_channels}")
    return config.variance_loss


def build_models(config, data: RunData, device, resume_path: Optional[str]):
    """(the config with what the model decides resolved, :class:`RunModels`, the data with model class ids):
    the model, classes, objective and probe batch; sigma calibrated on a new run; the teacher."""
    from nala_diffusion.data.classes import MappedLabels
    from nala_diffusion.models.norm_awareness import calibrate_norm_scale
    from nala_diffusion.train.run_setup import layers_to_calibrate, resolve_classes

    model, calibration_source = build_model(config, data.in_channels, data.sample_size, len(data.classes))
    calibrate_layers = layers_to_calibrate(config, model, calibration_source)
    model, id2label, class_ids = resolve_classes(config, model, data.classes)
    if config.class_embedding == "new":
        calibration_source = model  # the source's labels mean other classes
    dataset = MappedLabels(data.dataset, class_ids)
    objective = run_objective(config, model.config, clip_sample=data.vae is None)
    if objective.name == "flow" and config.prediction_type != "epsilon":
        raise ValueError(f"the model is a flow model ({config.init_from or config.model_config}); --prediction_type is "
                         "DDPM's choice")
    learned = model.out_channels == 2 * data.in_channels
    config = config.but(variance_loss=resolved_variance_loss(config, objective, learned, data.in_channels,
                                                             model.out_channels))
    logger.info(f"objective: {objective.name}", main_process_only=True)
    probe = probe_batch(config, dataset, data.vae, objective, device)
    if calibrate_layers and not resume_path:
        # sigma from the queries the layers see on real noised data (a resumed run loads its own)
        model.to(device)
        calibration_source.to(device)
        sigmas = calibrate_norm_scale(model, probe[0], timestep=probe[1], class_labels=probe[2],
                                      source=calibration_source, quantile=config.norm_scale_quantile,
                                      layers=calibrate_layers)
        logger.info(f"calibrated NaLa's norm_scale per layer and head: {sigmas}", main_process_only=True)
    del calibration_source
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    teacher = load_teacher(config, model, objective, data, device) if config.teacher else None
    data = dataclasses.replace(data, dataset=dataset)
    return config, RunModels(model, teacher, objective, id2label, class_ids, probe), data


def load_teacher(config, model, objective, data: RunData, device):
    """(the frozen teacher, its Objective in its own conventions): it must match the student's channels,
    classes and objective."""
    from nala_diffusion.diffusion.objectives import objective_of

    in_channels = data.in_channels
    teacher = load_denoiser(config.teacher).to(device).eval().requires_grad_(False)
    if teacher.config.in_channels != in_channels or teacher.config.num_embeds_ada_norm != model.config.num_classes:
        raise ValueError(f"the teacher {config.teacher!r} has {teacher.config.in_channels} channels and "
                         f"{teacher.config.num_embeds_ada_norm} classes; the student has {in_channels} and "
                         f"{model.config.num_classes}")
    student = objective.name
    if objective_of(teacher.config) != student:
        raise ValueError(f"the teacher {config.teacher!r} was trained with the {objective_of(teacher.config)!r} "
                         f"objective and the student trains with {student!r}; distillation needs both to predict the "
                         "same thing (pass --objective to match, or another --teacher)")
    return teacher, run_objective(config, teacher.config, clip_sample=data.vae is None)
