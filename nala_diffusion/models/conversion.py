"""Build a NaLa DiT from a pretrained diffusers DiT by weight inheritance.

Every DiT weight is copied; only parameters the DiT does not have (processor extras) are new, and
they start as identity (LePE zero-initialised). The output gate cannot start as identity, so it is
refused here. With ``attention_type="softmax"`` the converted model computes exactly what the
original did.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel

from nala_diffusion.models.norm_awareness import calibrate_norm_scale
from nala_diffusion.models.options import CONFIG_KEYS, layer_attention_types
from nala_diffusion.models.sources import check_dit_config, load_dit
from nala_diffusion.models.transformer import NaLaDiTTransformer2DModel

# what a model was trained for and how it reads time (SiT's conventions): kept by every conversion
OBJECTIVE_KEYS = ("objective", "flow_convention", "timestep_freq_shift")
# Config keys that NaLaDiTTransformer2DModel shares with diffusers' DiT.
DIT_CONFIG_KEYS = (
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "num_layers",
    "dropout",
    "norm_num_groups",
    "attention_bias",
    "sample_size",
    "patch_size",
    "activation_fn",
    "num_embeds_ada_norm",
    "upcast_attention",
    "norm_type",
    "norm_elementwise_affine",
    "norm_eps",
)


def convert_dit_to_nala(
    dit: Union[str, os.PathLike, DiTTransformer2DModel],
    *,
    attention_type: str = "nala",
    softmax_layers: Optional[Sequence[int]] = None,
    attention_types: Optional[Sequence[str]] = None,
    subfolder: Optional[str] = None,
    variant: Optional[str] = None,
    revision: Optional[str] = None,
    num_classes: Optional[int] = None,
    calibrate: bool = True,
    calibration_inputs: Optional[Dict[str, Any]] = None,
    **attention_options,
) -> NaLaDiTTransformer2DModel:
    """A :class:`NaLaDiTTransformer2DModel` with the weights of a pretrained DiT.

    Args:
        dit: a ``DiTTransformer2DModel`` (or one of ours), or a folder / Hub id (see :func:`load_dit`).
        attention_type: the attention of the new model (``"nala"`` by default).
        softmax_layers: block indices (negative counting from the end) kept as softmax attention, the
            hybrid layout of NaLaFormer's released models: those blocks compute exactly what the DiT's
            did, the others run ``attention_type``, and sigma is calibrated only where NaLa runs.
        attention_types: one attention type per block instead (not with ``softmax_layers``). From one
            of our models, its own layout is kept when neither is given and ``attention_type`` is its.
        num_classes: class count, defaults to the DiT's ``num_embeds_ada_norm``.
        attention_options: config options of :class:`NaLaDiTTransformer2DModel` (``inhibit``,
            ``use_lepe``, ``position_embedding``, ...). From one of our models (any attention type)
            its options and extras (LePE, gate, RoPE) and their weights come along unless overridden.
            Adding ``use_gate=True`` to a model without a gate is refused: a gate cannot start as
            identity. NaLa's ``norm_scale_mode`` is the models' default, ``"calibrated"``.
        calibrate: set sigma of new calibrated/learnable NaLa layers from the DiT's own queries
            (:func:`~nala_diffusion.calibrate_norm_scale` with the DiT as the source).
        calibration_inputs: keyword arguments of one forward call of the DiT for that calibration,
            e.g. ``{"hidden_states": noisy_latents, "timestep": t, "class_labels": y}``, ideally real
            data noised at the timesteps you sample at. Without them, standard-normal latents at
            timesteps spread over the schedule stand in (DiT queries come after a LayerNorm, so their
            norms depend little on the content; real inputs are still better).
    """
    if not isinstance(dit, torch.nn.Module):
        dit = load_dit(dit, subfolder=subfolder, variant=variant, revision=revision)
    if not isinstance(dit, DiTTransformer2DModel):
        raise ValueError(f"expected a DiTTransformer2DModel, got {type(dit).__name__}")
    check_dit_config({**dit.config, "_class_name": "DiTTransformer2DModel"}, type(dit).__name__)

    config = {k: dit.config[k] for k in DIT_CONFIG_KEYS if k in dit.config}
    if isinstance(dit, NaLaDiTTransformer2DModel):
        accepted = set(CONFIG_KEYS) | {"position_embedding", "num_classes", "use_cpe", "cpe_init", *OBJECTIVE_KEYS}
        attention_options = {**{k: v for k, v in dit.config.items() if k in accepted}, **attention_options}
        if softmax_layers is None and attention_types is None and attention_type == dit.config.attention_type:
            attention_types = dit.config.get("attention_types")
    kinds = layer_attention_types(config["num_layers"], attention_type, attention_types, softmax_layers)
    hybrid = softmax_layers is not None or attention_types is not None
    if attention_options.get("use_gate") and not dit.config.get("use_gate"):
        raise ValueError("use_gate cannot start as identity, so a converted model cannot have it; train one from scratch")
    if num_classes is not None and num_classes != config["num_embeds_ada_norm"]:
        raise ValueError(
            f"num_classes={num_classes} does not match the DiT's {config['num_embeds_ada_norm']} classes"
        )
    config.update(attention_options, attention_type=attention_type, attention_types=kinds if hybrid else None)
    parameter = next(dit.parameters())
    model = NaLaDiTTransformer2DModel(**config).to(parameter.device)
    if parameter.dtype != torch.float32:
        model = model.to(dtype=parameter.dtype)

    source = dit.state_dict()
    missing = load_dit_weights(model, source)
    new_sigma = [k for k in missing if k.endswith("log_norm_scale")]
    if calibrate and new_sigma:
        inputs = calibration_inputs if calibration_inputs is not None else noise_calibration_inputs(dit)
        calibrate_norm_scale(model, source=dit, **inputs)
    return model.eval() if not dit.training else model


def load_dit_weights(model: NaLaDiTTransformer2DModel, source: Dict[str, torch.Tensor]) -> List[str]:
    """Load a DiT's ``source`` weights into the new ``model``; returns the names the DiT did not have (new
    processor parameters and convolutions, the convolutions zeroed so the model starts as the DiT). A block
    whose attention changes leaves its old processor weights behind (a warning); any other mismatch raises."""
    missing, unexpected = model.load_state_dict(source, strict=False)
    not_new = [k for k in missing if ".processor." not in k and not k.startswith("conv_positions.")]
    with torch.no_grad():  # new convolutions (LePE, CPE) start as identity, whatever their init for new models
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name in missing and (".lepe." in name or name.startswith("conv_positions.")):
                tensor.zero_()
    dropped = [k for k in unexpected if ".processor." in k]  # extras of blocks whose attention changed
    unexpected = [k for k in unexpected if ".processor." not in k]
    if dropped:
        blocks = sorted({k.split(".processor.")[0] for k in dropped})
        warnings.warn(f"{len(blocks)} block(s) change attention and leave their processor weights behind "
                      f"({', '.join(sorted({k.rsplit('.', 1)[-1] for k in dropped}))} of {', '.join(blocks[:4])}"
                      f"{' ...' if len(blocks) > 4 else ''}): the new kind does not use them", stacklevel=3)
    if unexpected or not_new:
        raise ValueError(
            "the DiT's weights do not fit the NaLa model: "
            f"unexpected {unexpected[:5]}, missing {not_new[:5]}"
        )
    return missing


def noise_calibration_inputs(dit: DiTTransformer2DModel, batch: int = 8, seed: int = 0) -> Dict[str, Any]:
    """Stand-in calibration inputs for a DiT: standard-normal latents at ``batch`` timesteps spread
    over the schedule (as the model reads them: SiT's flow time is 1 - t / 1000), with random labels
    (fixed seed)."""
    from nala_diffusion.diffusion.objectives import model_timestep

    generator = torch.Generator().manual_seed(seed)
    parameter = next(dit.parameters())
    size = dit.config.sample_size
    latents = torch.randn(batch, dit.config.in_channels, size, size, generator=generator)
    timesteps = model_timestep(dit.config, torch.linspace(0, 999, batch).round().long())
    labels = torch.randint(0, dit.config.num_embeds_ada_norm, (batch,), generator=generator)
    return {"hidden_states": latents.to(parameter.device, parameter.dtype), "timestep": timesteps.to(parameter.device),
            "class_labels": labels.to(parameter.device)}


def with_new_class_embedding(model: NaLaDiTTransformer2DModel, num_classes: int,
                             init_std: float = 0.02) -> NaLaDiTTransformer2DModel:
    """A copy of ``model`` with a new class embedding of ``num_classes`` classes (plus the null class),
    initialised as DiT initialises it (normal, std 0.02); every other weight, sigma included, is kept.
    For fine-tuning a pretrained DiT on classes it does not have."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    config.update(num_classes=num_classes, num_embeds_ada_norm=num_classes)
    parameter = next(model.parameters())
    new = NaLaDiTTransformer2DModel(**config).to(device=parameter.device, dtype=parameter.dtype)
    kept = {k: v for k, v in model.state_dict().items() if ".class_embedder." not in k}
    missing, unexpected = new.load_state_dict(kept, strict=False)
    if unexpected or any(".class_embedder." not in k for k in missing):
        raise ValueError(f"the model's weights do not fit its copy: unexpected {unexpected[:5]}, missing {missing[:5]}")
    tables = [t for name, t in new.named_parameters() if ".class_embedder." in name]
    with torch.no_grad():  # one table, copied to every block, as diffusers' DiT holds DiT's one y_embedder
        tables[0].normal_(0.0, init_std)
        for table in tables[1:]:
            table.copy_(tables[0])
    return new.train(model.training)
