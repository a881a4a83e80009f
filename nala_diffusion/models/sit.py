"""SiT checkpoints (Ma et al. 2024, github.com/willisma/SiT): read, map onto the NaLa DiT, convert.

SiT is DiT's network trained with flow matching. Its released code differs from diffusers in two
conventions, both kept by the converted model (its config says ``objective="flow"``,
``flow_convention="sit"``, ``timestep_freq_shift=0``):

* **time and velocity**: SiT's time runs from noise (t = 0) to data (t = 1), ``x_t = t x0 + (1 - t) noise``,
  and the network predicts ``x0 - noise``; diffusers' flow schedulers use ``sigma = 1 - t`` (as
  ``timestep = 1000 sigma``) and the velocity ``noise - x0``. The pipelines translate
  (:mod:`~nala_diffusion.diffusion.objectives`), so the converted model's own interface stays SiT's:
  ``model(x, timestep=t, class_labels=y).sample[:, :C]`` is SiT's ``forward(x, t, y)``.
* **time-embedding frequencies**: SiT (like the original DiT) uses ``exp(-log(10000) i / 128)``;
  diffusers' DiT embeds with ``downscale_freq_shift=1``, ``exp(-log(10000) i / 127)``.

Only weights are read: ``.safetensors``, or a PyTorch file through ``torch.load(weights_only=True)`` (a
training checkpoint's ``argparse.Namespace`` of arguments is allowed; nothing else is unpickled).
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

#: SiT's model sizes, (depth, hidden size) -> heads (SiT-S, -B, -L, -XL; models.py)
SIT_HEADS = {(12, 384): 6, (12, 768): 12, (24, 1024): 16, (28, 1152): 16}
#: keys every SiT state dict has
SIT_KEYS = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
            "final_layer.linear.weight", "blocks.0.attn.qkv.weight")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def looks_like_checkpoint_file(name: Union[str, os.PathLike, None]) -> bool:
    """Whether ``name`` is a single weights file (a SiT checkpoint) rather than a folder or Hub id."""
    return name is not None and os.path.isfile(os.fspath(name)) and os.fspath(name).endswith(CHECKPOINT_SUFFIXES)


def load_sit_state_dict(source: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """A SiT state dict from a file or a mapping; a training checkpoint's ``"ema"`` weights (else its
    ``"model"``) are taken, DDP's ``module.`` prefix removed."""
    return read_sit_checkpoint(source)[0]


def read_sit_checkpoint(source: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> Tuple[Dict[str, torch.Tensor],
                                                                                             Optional[int]]:
    """(the state dict of :func:`load_sit_state_dict`, the class count a training checkpoint's ``args`` records
    (SiT's train.py saves ``--num-classes`` there), or None)."""
    if isinstance(source, Mapping):
        state = dict(source)
        where = "the state dict"
    else:
        path = os.fspath(source)
        where = repr(path)
        if not os.path.isfile(path):
            raise ValueError(f"no SiT checkpoint at {path!r}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            try:
                with torch.serialization.safe_globals([argparse.Namespace]):
                    state = torch.load(path, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, AttributeError) as error:
                raise ValueError(
                    f"{path!r} is not a checkpoint of weights only: torch.load(weights_only=True) refused it "
                    f"({str(error).splitlines()[0]}). Pickled objects can run code, so they are not loaded; save "
                    "the state dict alone (torch.save(model.state_dict(), ...)) or as .safetensors") from None
    args = state.get("args")
    num_classes = getattr(args, "num_classes", None) if args is not None else None
    if isinstance(args, Mapping):
        num_classes = args.get("num_classes")
    for wrapper in ("ema", "model", "state_dict"):
        if isinstance(state.get(wrapper), Mapping):
            state = dict(state[wrapper])
            break
    state = {re.sub(r"^module\.", "", k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing = [k for k in SIT_KEYS if k not in state]
    if missing:
        raise ValueError(f"{where} is not a SiT checkpoint (models.py of github.com/willisma/SiT): it lacks {missing}; "
                         f"its first keys are {sorted(state)[:5]}")
    return state, (int(num_classes) if num_classes is not None else None)


def sit_config(state: Mapping[str, torch.Tensor], num_attention_heads: Optional[int] = None,
               num_classes: Optional[int] = None) -> Dict[str, Any]:
    """The NaLa DiT config (softmax attention, SiT's conventions) of a SiT state dict, from its tensor
    shapes: depth, width, patch size, channels, classes, learned sigma, input size; heads from
    ``num_attention_heads`` or SiT's size table; the class count from ``num_classes`` (a training
    checkpoint's ``args``) where given, which must explain the label table's rows."""
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"the SiT's final layer gives {out_channels} channels for {in_channels} input channels; "
                         "expected the same or twice as many (learned sigma)")
    if "pos_embed" not in state:
        raise ValueError("the SiT state dict has no pos_embed, whose shape gives the input size")
    tokens = state["pos_embed"].shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"the SiT's pos_embed holds {tokens} positions, not a square grid")
    hidden_mlp = state["blocks.0.mlp.fc1.weight"].shape[0]
    if hidden_mlp != 4 * hidden:
        raise ValueError(f"the SiT's MLP is {hidden_mlp} wide for width {hidden}; the DiT block needs mlp_ratio 4")
    heads = num_attention_heads or SIT_HEADS.get((depth, hidden))
    if heads is None:
        raise ValueError(f"a SiT of depth {depth} and width {hidden} is none of SiT's sizes (S, B, L, XL); pass "
                         "num_attention_heads")
    if hidden % heads:
        raise ValueError(f"num_attention_heads {heads} does not divide the SiT's width {hidden}")
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    classes = sit_classes(rows, num_classes)
    return {"num_attention_heads": int(heads), "attention_head_dim": int(hidden // heads),
            "in_channels": int(in_channels), "out_channels": int(out_channels), "num_layers": int(depth),
            "sample_size": int(grid * patch), "patch_size": int(patch), "num_classes": int(classes),
            "norm_eps": 1e-6, "attention_type": "softmax", "objective": "flow", "flow_convention": "sit",
            "timestep_freq_shift": 0}


def sit_classes(rows: int, num_classes: Optional[int]) -> int:
    """The class count of a SiT label table of ``rows`` rows. SiT's ``LabelEmbedder`` adds a last row, the
    null class of classifier-free guidance, only when trained with class dropout > 0; without ``num_classes``
    (a bare state dict, as SiT releases them) that row is assumed, as every released SiT has it."""
    if num_classes is None:
        return rows - 1
    if rows == num_classes + 1:
        return num_classes
    if rows == num_classes:
        raise ValueError(f"the SiT was trained with {num_classes} classes and class dropout 0: its label table has no "
                         "null-class row, so it has no unconditional prediction for classifier-free guidance, which "
                         "the NaLa DiT's null class stands for. Fine-tune a SiT with class dropout (its default 0.1)")
    raise ValueError(f"the SiT's label table has {rows} rows, which {num_classes} classes (its checkpoint's args) "
                     f"cannot explain: expected {num_classes + 1} (with the null class) or {num_classes}")


def sit_to_dit_keys(state: Mapping[str, torch.Tensor], depth: int) -> Dict[str, torch.Tensor]:
    """SiT's keys as diffusers' DiT names them (the mapping of diffusers' scripts/convert_dit_to_diffusers.py:
    the shared time and label embedders copied into every block, qkv split)."""
    out = {"pos_embed.proj.weight": state["x_embedder.proj.weight"], "pos_embed.proj.bias": state["x_embedder.proj.bias"],
           "proj_out_1.weight": state["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": state["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": state["final_layer.linear.weight"], "proj_out_2.bias": state["final_layer.linear.bias"]}
    for i in range(depth):
        block, sit = f"transformer_blocks.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[f"{block}norm1.emb.timestep_embedder.linear_1.{part}"] = state[f"t_embedder.mlp.0.{part}"]
            out[f"{block}norm1.emb.timestep_embedder.linear_2.{part}"] = state[f"t_embedder.mlp.2.{part}"]
            out[f"{block}norm1.linear.{part}"] = state[f"{sit}adaLN_modulation.1.{part}"]
            for name, tensor in zip(("to_q", "to_k", "to_v"), state[f"{sit}attn.qkv.{part}"].chunk(3, dim=0)):
                out[f"{block}attn1.{name}.{part}"] = tensor
            out[f"{block}attn1.to_out.0.{part}"] = state[f"{sit}attn.proj.{part}"]
            out[f"{block}ff.net.0.proj.{part}"] = state[f"{sit}mlp.fc1.{part}"]
            out[f"{block}ff.net.2.{part}"] = state[f"{sit}mlp.fc2.{part}"]
        out[f"{block}norm1.emb.class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
    placed = {"pos_embed", *(f"{prefix}.{part}" for prefix in (
        "x_embedder.proj", "final_layer.adaLN_modulation.1", "final_layer.linear", "t_embedder.mlp.0", "t_embedder.mlp.2",
        *(f"blocks.{i}.{name}" for i in range(depth) for name in (
            "adaLN_modulation.1", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))) for part in ("weight", "bias")),
        "y_embedder.embedding_table.weight"}
    unused = sorted(set(state) - placed)
    if unused:
        raise ValueError(f"the SiT state dict has {len(unused)} tensor(s) the DiT layout has no place for: "
                         f"{unused[:8]}{' ...' if len(unused) > 8 else ''}. It is another network (SiT's models.py "
                         "has none of them, e.g. no q_norm/k_norm); nothing was converted")
    return {k: v.detach().float().clone() for k, v in out.items()}


def load_sit(source: Union[str, os.PathLike, Mapping[str, torch.Tensor]], num_attention_heads: Optional[int] = None):
    """A SiT checkpoint as a NaLa DiT with softmax attention that computes what SiT computes (its
    conventions kept in the config)."""
    from nala_diffusion.models.transformer import NaLaDiTTransformer2DModel

    state, num_classes = read_sit_checkpoint(source)
    config = sit_config(state, num_attention_heads, num_classes)
    model = NaLaDiTTransformer2DModel(**config)
    table = model.pos_embed.pos_embed  # diffusers' sin-cos table: SiT's fixed one (MAE's), checked, not loaded
    if tuple(table.shape) != tuple(state["pos_embed"].shape) or not torch.allclose(
            table.float(), state["pos_embed"].float(), atol=1e-5):
        raise ValueError("the SiT's pos_embed is not the fixed 2-D sin-cos table this model builds; it cannot be kept")
    missing, unexpected = model.load_state_dict(sit_to_dit_keys(state, config["num_layers"]), strict=False)
    missing = [k for k in missing if k != "pos_embed.pos_embed"]
    if missing or unexpected:
        raise ValueError(f"the SiT's weights do not fit the NaLa DiT: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def convert_sit_to_nala(source: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                        num_attention_heads: Optional[int] = None, **convert_kwargs):
    """A NaLa DiT from a SiT checkpoint: a ``.pt`` / ``.pth`` state dict (read with
    ``torch.load(weights_only=True)``; a training checkpoint's ``"ema"`` weights) or ``.safetensors`` file,
    or the state dict itself. Depth, width, patch size, channels, classes and learned sigma come from the
    tensor shapes, heads from ``num_attention_heads`` or SiT's size table (S/B/L/XL). Then
    :func:`~nala_diffusion.models.conversion.convert_dit_to_nala` with ``convert_kwargs``
    (``attention_type="nala"`` by default, hybrids, sigma calibrated); ``attention_type="softmax"`` gives
    SiT itself. The model keeps SiT's time and velocity conventions (module docstring); sample it with
    ``NaLaDiTPipeline`` and a ``FlowMatchEulerDiscreteScheduler`` (and SiT's VAE, ``stabilityai/sd-vae-ft-ema``)."""
    from nala_diffusion.models.conversion import convert_dit_to_nala

    return convert_dit_to_nala(load_sit(source, num_attention_heads), **convert_kwargs)
