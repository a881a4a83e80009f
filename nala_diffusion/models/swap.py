"""Swap the self-attention processors of any diffusers model in place, and swap them back.

``DiTTransformer2DModel`` has no ``set_attn_processor``, so this walks the model's ``Attention``
modules itself. Cross-attention layers (``attn.is_cross_attention``) are left as they are.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from diffusers.models.attention_processor import Attention
from torch import nn

from nala_diffusion.models.options import (  # noqa: F401  (ATTENTION_TYPES re-exported)
    ATTENTION_TYPES,
    block_indices,
    check_attention_type,
    layer_attention_types,
    option_names,
    options_from_config,
)
from nala_diffusion.models.processors import ATTENTION_KINDS, KernelAttnProcessor


def self_attention_modules(model: nn.Module) -> Iterator[Tuple[str, Attention]]:
    """(name, module) for every self-attention ``Attention`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, Attention) and not module.is_cross_attention:
            yield name, module


def processor_options(attention_type: str) -> Tuple[str, ...]:
    """Keyword options a processor of ``attention_type`` accepts (besides the sizes), from
    :class:`~nala_diffusion.models.options.AttentionOptions`."""
    return ATTENTION_KINDS[check_attention_type(attention_type)].options


def processor_class(attention_type: str):
    return ATTENTION_KINDS[check_attention_type(attention_type)].processor


def make_processor(attention_type: str, attn: Attention, **options) -> KernelAttnProcessor:
    """A processor of ``attention_type`` sized for ``attn``, on its device and dtype."""
    cls = processor_class(attention_type)
    processor = cls(hidden_size=attn.inner_dim, num_heads=attn.heads, query_dim=attn.query_dim, **options)
    weight = attn.to_q.weight
    return processor.to(device=weight.device, dtype=weight.dtype)


def block_of(name: str) -> Optional[str]:
    """``"transformer_blocks.3"`` for ``"transformer_blocks.3.attn1"``: the name up to the index of the
    first ``ModuleList`` entry, or None for a module outside any list."""
    parts = name.split(".")
    for position, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: position + 1])
    return None


def select_layers(model: nn.Module, layers: Optional[Sequence[Union[int, str]]] = None) -> List[Tuple[str, Attention]]:
    """The self-attention modules of ``model`` chosen by ``layers``: None for all; else block indices
    (negative counting from the end; the blocks are the entries of the model's block list, e.g.
    ``transformer_blocks``, each with its self-attention) and/or module names (a self-attention module
    such as ``"transformer_blocks.3.attn1"``, or any module above it such as ``"transformer_blocks.3"``).
    Unknown indices and names are ``ValueError``s."""
    modules = list(self_attention_modules(model))
    if not modules:
        raise ValueError(f"{type(model).__name__} has no self-attention Attention modules to swap")
    if layers is None:
        return modules
    if isinstance(layers, (int, str)):
        layers = [layers]
    blocks: List[str] = []
    for name, _ in modules:
        block = block_of(name) or name
        if block not in blocks:
            blocks.append(block)
    chosen = set()
    for layer in layers:
        if isinstance(layer, str):
            found = [n for n, _ in modules if n == layer or n.startswith(layer + ".")]
            if not found:
                shown = ", ".join(n for n, _ in modules[:3])
                raise ValueError(f"{type(model).__name__} has no self-attention layer named {layer!r} or under it "
                                 f"(its self-attention layers: {shown}, ... {len(modules)} in all)")
            chosen.update(found)
        else:
            index = block_indices([layer], len(blocks), "layers")[0]
            chosen.update(n for n, _ in modules if (block_of(n) or n) == blocks[index])
    if not chosen:
        raise ValueError("layers selects no self-attention layer")
    return [(name, attn) for name, attn in modules if name in chosen]


def set_attention(model: nn.Module, attention_type: str = "nala", layers: Optional[Sequence[Union[int, str]]] = None,
                  **options) -> Dict[str, object]:
    """Give the self-attention layers of ``model`` fresh ``attention_type`` processors: every layer, or
    those chosen by ``layers`` (block indices, negative allowed, and/or module names; see
    :func:`select_layers`), the others left as they are.

    Returns the processors that were there before, keyed like diffusers' ``attn_processors``
    (``"transformer_blocks.0.attn1.processor"``); :func:`restore_attention` puts them back. A model whose
    config records its attention (``NaLaDiTTransformer2DModel``)
    has its config say what is swapped in, or refuses what the config cannot say (:func:`config_after_swap`).
    """
    modules, processors = new_processors(model, attention_type, layers, **options)  # all or none
    updates = config_after_swap(model, {name: p for (name, _), p in zip(modules, processors)})
    previous = place_processors(modules, processors)
    if updates:
        model.register_to_config(**updates)
    return previous


def new_processors(model: nn.Module, attention_type: str, layers: Optional[Sequence[Union[int, str]]] = None,
                   **options) -> Tuple[List[Tuple[str, Attention]], List[KernelAttnProcessor]]:
    """(the chosen self-attention modules, a fresh ``attention_type`` processor for each), nothing installed;
    joint-attention models are refused."""
    modules = select_layers(model, layers)
    joint = [name for name, attn in modules if getattr(attn, "added_kv_proj_dim", None) is not None]
    if joint:
        shown = ", ".join(joint[:4]) + (f" and {len(joint) - 4} more" if len(joint) > 4 else "")
        raise ValueError(
            f"{type(model).__name__} has joint-attention layers, which attend over image and text tokens together "
            f"({shown}); the processors here are for self-attention over image tokens only. Models whose "
            "self-attention takes only image tokens work: DiT, PixArt-alpha/sigma, Sana. Nothing was swapped."
        )
    return modules, [make_processor(attention_type, attn, **options) for _, attn in modules]


def place_processors(modules: Sequence[Tuple[str, Attention]], processors: Sequence[object]) -> Dict[str, object]:
    """Install ``processors`` in ``modules`` (from :func:`new_processors`); returns the previous ones by
    ``"<module>.processor"``. The model's config is not consulted: a model builds its own layers with it."""
    previous = {}
    for (name, attn), processor in zip(modules, processors):
        previous[f"{name}.processor"] = attn.processor
        attn.set_processor(processor)
    return previous


def records_attention(model: nn.Module) -> bool:
    """Whether ``model``'s config records the attention of its blocks (a ``NaLaDiTTransformer2DModel``)."""
    from nala_diffusion.models.transformer import (
        NaLaDiTTransformer2DModel,  # here: the transformer imports this module
    )

    return isinstance(model, NaLaDiTTransformer2DModel)


def config_after_swap(model: nn.Module, processors: Dict[str, object]) -> Dict[str, object]:
    """The config entries that describe ``model`` once ``processors`` (attention module name -> processor) are
    installed, so that ``save_pretrained``/``from_pretrained`` restore them (nothing for a model whose config
    does not record its attention). A processor the config cannot describe (not one of this package's kernels,
    or options other than the config's for its kind, which the config holds once for all blocks) is a
    ``ValueError``."""
    if not records_attention(model):
        return {}
    config = model.config
    declared = layer_attention_types(config["num_layers"], config["attention_type"], config.get("attention_types"))
    kinds = list(declared)
    for name, processor in processors.items():
        kind = getattr(processor, "attention_type", None)
        if kind is None or not hasattr(processor, "options"):
            raise ValueError(f"{name}: a {type(processor).__name__} cannot be recorded in the config of a "
                             f"{type(model).__name__}, so save_pretrained would not restore it; use a processor "
                             "of nala_diffusion (set_attention) or a diffusers DiT")
        recorded = options_from_config(config, kind)
        differing = {k: (recorded[k], v) for k, v in processor.options().items() if k in recorded and recorded[k] != v}
        if differing:
            shown = ", ".join(f"{k}: config {a!r}, swapped in {b!r}" for k, (a, b) in sorted(differing.items()))
            raise ValueError(
                f"the config of this {type(model).__name__} holds one set of {kind} options for every block, and "
                f"{name} would differ from it ({shown}), which save_pretrained would not keep. Build a model with "
                "those options in its config instead (convert_dit_to_nala(model, ...) or the class with them)")
        kinds[int(name.split(".")[1])] = kind
    if kinds == declared:
        return {}
    if len(set(kinds)) == 1:
        return {"attention_type": kinds[0], "attention_types": None}
    return {"attention_types": kinds}


def set_nala_attention(model: nn.Module, layers: Optional[Sequence[Union[int, str]]] = None,
                       **options) -> Dict[str, object]:
    """Swap NaLa into the self-attention layers of ``model`` (all, or those chosen by ``layers``: block
    indices or module names, as :func:`set_attention`); returns the previous processors.

    ``options`` are :class:`~nala_diffusion.NaLaAttnProcessor`'s (``inhibit``, ``power_scale``,
    ``use_lepe``, ...). Example::

        previous = set_nala_attention(dit, inhibit="cosine")
        ...
        restore_attention(dit, previous)  # bit-identical to before
        set_nala_attention(dit, layers=[0, 1])  # a hybrid: NaLa in the first two blocks, softmax after
    """
    return set_attention(model, "nala", layers=layers, **options)


def restore_attention(model: nn.Module, processors: Dict[str, object]) -> None:
    """Put back processors returned by :func:`set_attention` / :func:`set_nala_attention`."""
    named = {}
    for key, processor in processors.items():
        name = key[: -len(".processor")] if key.endswith(".processor") else key
        module = model.get_submodule(name)
        if not isinstance(module, Attention):
            raise ValueError(f"{name!r} is not an Attention module of {type(model).__name__}")
        named[name] = processor
    updates = config_after_swap(model, named)
    for name, processor in named.items():
        model.get_submodule(name).set_processor(processor)
    if updates:
        model.register_to_config(**updates)


def set_fused_attention(model: nn.Module, enabled: bool = True) -> int:
    """Run every NaLa processor of ``model`` with the ``torch.compile``-fused inference kernel
    (``nala_attention(..., compile=True)``; training steps keep the eager kernel). A run-time switch,
    not saved with the model. Returns the number of processors switched."""
    from nala_diffusion.models.processors import NaLaAttnProcessor

    count = 0
    for _, attn in self_attention_modules(model):
        if isinstance(attn.processor, NaLaAttnProcessor):
            attn.processor.compile = bool(enabled)
            count += 1
    return count


def set_attention_backend(model: nn.Module, backend: str = "auto") -> int:
    """The readout implementation of every linear processor of ``model`` (NaLa, ReLU and 1+ELU linear):
    ``"auto"`` (Triton on CUDA, torch elsewhere; the default), ``"triton"`` or ``"torch"``
    (:mod:`nala_diffusion.ops.readout`). A run-time switch, not saved with the model. Returns the number
    of processors set."""
    from nala_diffusion.models.processors import LinearAttnProcessor, NaLaAttnProcessor
    from nala_diffusion.ops.readout import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    count = 0
    for _, attn in self_attention_modules(model):
        if isinstance(attn.processor, (LinearAttnProcessor, NaLaAttnProcessor)):
            attn.processor.backend = backend
            count += 1
    return count
