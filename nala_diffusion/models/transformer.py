"""NaLaDiTTransformer2DModel: diffusers' DiT with a configurable self-attention kernel.

A subclass of ``DiTTransformer2DModel``: same modules, same parameter names, so DiT weights load.
What it adds:

- ``attention_type`` (``"nala"``, ``"softmax"``, ``"relu_linear"``, ``"elu_linear"``) and the
  processor options in the config, so a saved model reloads with the attention it was trained with;
- any height x width the patch divides (non-square, larger than ``sample_size``), with the sin-cos
  positions squeezed into the training grid's range (``position_embedding="interpolate"``, the
  default, diffusers' ``PatchEmbed`` behaviour) or built for that grid (``"extend"``);
- ``num_classes`` with the null class ``num_classes`` for classifier-free guidance, and no random
  label drop inside the model (each DiT block would drop labels independently; drop them once, in
  the training step).
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks it up here)
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel
from torch import nn

from nala_diffusion.diffusion.objectives import FLOW_CONVENTIONS, OBJECTIVES
from nala_diffusion.models.conv_positions import BlockConvPositions
from nala_diffusion.models.options import (
    CONFIG_KEYS,
    DEFAULTS,
    FIELDS,
    LEGACY_CONFIG_DEFAULTS,
    POSITION_EMBEDDINGS,
    config_key,
    layer_attention_types,
    options_from_config,
)
from nala_diffusion.models.sources import check_loaded_weights
from nala_diffusion.models.swap import new_processors, place_processors
from nala_diffusion.utils.files import follow_umask

# DiT sizes (Peebles & Xie, Table 1); every patch size 2, 4, 8 is offered as in the DiT repo.
_DIT_SIZES = {
    "S": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64),  # hidden 384
    "B": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64),  # hidden 768
    "L": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64),  # hidden 1024
    "XL": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72),  # hidden 1152
}
DIT_PRESETS: Dict[str, Dict[str, int]] = {
    f"{size}/{patch}": {**dims, "patch_size": patch} for size, dims in _DIT_SIZES.items() for patch in (2, 4, 8)
}


def preset_config(name: str, softmax_layers: Optional[Sequence[int]] = None, **overrides) -> Dict[str, Any]:
    """Config dict of a DiT size preset (``"S/2"``, ``"B/4"``, ``"XL/2"``, ...) with overrides.

    ``softmax_layers`` (block indices, negative counting from the end) gives a hybrid layout: those
    blocks softmax, the others ``attention_type``; it is expanded into ``attention_types``."""
    key = name.upper().removeprefix("DIT-")
    if key not in DIT_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(DIT_PRESETS)}")
    config = {**DIT_PRESETS[key], **overrides}
    if softmax_layers is not None:
        config["attention_types"] = layer_attention_types(
            config["num_layers"], config.get("attention_type", "nala"), config.get("attention_types"), softmax_layers)
    return config


def with_option_parameters(init):
    """``init`` (which takes the attention options as ``**attention_options``) with a signature that lists
    each option of :class:`~nala_diffusion.models.options.AttentionOptions` as a keyword with its default,
    under its config key. diffusers' config machinery reads the signature: every option is recorded in
    the config, restored by ``from_pretrained``, and declared in one place only."""
    signature = inspect.signature(init)
    fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    options = [inspect.Parameter(config_key(name), inspect.Parameter.KEYWORD_ONLY, default=getattr(DEFAULTS, name),
                                 annotation=f.type) for name, f in FIELDS.items()]
    init.__signature__ = signature.replace(parameters=fixed + options)
    return init


def check_config(class_name: str, attention_options, *, num_attention_heads, attention_head_dim, in_channels,
                 num_layers, sample_size, patch_size, out_channels, num_classes, num_embeds_ada_norm, norm_num_groups,
                 objective, flow_convention, timestep_freq_shift, attention_type, attention_types, position_embedding):
    """Refuse a model config whose sizes, class counts, objective, layout or options are wrong, naming the key;
    returns (the class count, each block's attention type)."""
    unknown = sorted(set(attention_options) - set(CONFIG_KEYS))
    if unknown:
        raise TypeError(f"{class_name} got unexpected option(s) {unknown}; attention options: {sorted(CONFIG_KEYS)}")
    for name, value in (("num_attention_heads", num_attention_heads), ("attention_head_dim", attention_head_dim),
                        ("in_channels", in_channels), ("num_layers", num_layers), ("sample_size", sample_size),
                        ("patch_size", patch_size), ("out_channels", out_channels), ("num_classes", num_classes),
                        ("num_embeds_ada_norm", num_embeds_ada_norm), ("norm_num_groups", norm_num_groups)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__}); "
                             "check the model config")
    if not isinstance(sample_size, int) or sample_size % patch_size:
        raise ValueError(f"sample_size {sample_size} must be a multiple of patch_size {patch_size}")
    if num_classes is None:
        num_classes = num_embeds_ada_norm
    elif num_embeds_ada_norm not in (None, 1000, num_classes):
        raise ValueError(f"num_classes ({num_classes}) and num_embeds_ada_norm ({num_embeds_ada_norm}) disagree")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if flow_convention not in FLOW_CONVENTIONS:
        raise ValueError(f"flow_convention must be one of {FLOW_CONVENTIONS}, got {flow_convention!r}")
    if timestep_freq_shift not in (0, 1) or isinstance(timestep_freq_shift, bool):
        raise ValueError(f"timestep_freq_shift must be 0 (DiT's and SiT's own code) or 1 (diffusers' DiT), "
                         f"got {timestep_freq_shift!r}")
    kinds = layer_attention_types(num_layers, attention_type, attention_types)  # validates both
    if position_embedding not in POSITION_EMBEDDINGS:
        raise ValueError(f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {position_embedding!r}")
    return num_classes, kinds


class NaLaDiTTransformer2DModel(DiTTransformer2DModel):
    r"""DiT (arXiv 2212.09748) whose self-attention kernel is chosen by ``attention_type``.

    Parameters are those of ``DiTTransformer2DModel`` plus:
        num_classes (`int`, *optional*): number of classes; labels ``0..num_classes-1`` and the null
            class ``num_classes`` (unconditional). Defaults to ``num_embeds_ada_norm``.
        attention_type (`str`, defaults to ``"nala"``): ``"nala"``, ``"softmax"``, ``"relu_linear"`` or
            ``"elu_linear"``.
        attention_types (`list` of `str`, *optional*): one attention type per block, for hybrid layouts
            such as NaLaFormer's (NaLa in the early blocks, softmax in the last); ``None`` (the default)
            means every block runs ``attention_type``. Each block's processor takes the options below
            that its kind accepts. :meth:`from_preset` builds it from ``softmax_layers``.
        NaLa's kernel options (lambda, tau, gamma, the inhibit form, eps as ``attention_eps``) and
            ``learnable_power``: see :class:`~nala_diffusion.ops.params.NaLaParams`.
        norm_scale, norm_scale_mode: the query-norm scale sigma of NaLa's power
            p(r) = lambda (tau + tanh(r / sigma)): ``"calibrated"`` (the default) or ``"learnable"``
            (per-head values in the weights, starting at ``norm_scale``, set by
            :func:`~nala_diffusion.calibrate_norm_scale`; ``nala-train`` and conversion calibrate, and
            sampling warns about a model whose sigma was never set), or ``"fixed"`` (``norm_scale``
            everywhere; 1 is the official formula, and what configs saved without the key were built with).
        use_lepe, lepe_kernel_size, use_gate, use_rope, rope_base: processor extras.
        Every attention option, its default and its meaning is declared once, in
        :class:`~nala_diffusion.models.options.AttentionOptions`; its config key is the option's name
        (``eps`` is ``attention_eps``).
        use_cpe (`bool`, defaults to `False`): NaLaFormer's convolutional positional encodings, a depthwise
            3 x 3 convolution of the tokens on their grid added before each block's attention and again
            before its feed-forward network (:mod:`~nala_diffusion.models.conv_positions`); ``cpe_init``
            ``"trunc_normal"`` (NaLaFormer's) or ``"zero"`` (conversions use zero, so outputs do not change).
        objective (`str`, defaults to ``"ddpm"``): what the model was trained for, ``"ddpm"`` (noise or v
            on DiT's schedule) or ``"flow"`` (velocity on the linear path; sampled with diffusers'
            ``FlowMatch*`` schedulers); see :mod:`~nala_diffusion.diffusion.objectives`.
        flow_convention (`str`, defaults to ``"diffusers"``): a flow model's time and velocity:
            ``"diffusers"`` (timestep = sigma x 1000, velocity noise - x0) or ``"sit"`` (SiT's code:
            t = 1 - sigma in [0, 1], velocity x0 - noise); pipelines translate.
        timestep_freq_shift (`int`, defaults to `1`): the time embedding's ``downscale_freq_shift``; 1 as
            diffusers' DiT, 0 as the original DiT and SiT code (frequencies exp(-log(10000) i / 128)).
        position_embedding (`str`, defaults to ``"interpolate"``): for grids other than the training
            grid, ``"interpolate"`` squeezes each axis into the training range (as diffusers'
            ``PatchEmbed`` and PixArt: a model trained at one size has seen only those positions),
            ``"extend"`` builds the sin-cos table for the new grid (positions 0..rows-1, 0..cols-1;
            for models trained at several sizes).
    """

    @register_to_config
    @with_option_parameters
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: Optional[int] = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: Optional[int] = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-5,
        num_classes: Optional[int] = None,
        attention_type: str = "nala",
        attention_types: Optional[List[str]] = None,
        position_embedding: str = "interpolate",
        use_cpe: bool = False,
        cpe_init: str = "trunc_normal",
        objective: str = "ddpm",
        flow_convention: str = "diffusers",
        timestep_freq_shift: int = 1,
        **attention_options,
    ):
        num_classes, kinds = check_config(
            type(self).__name__, attention_options, num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim, in_channels=in_channels, num_layers=num_layers,
            sample_size=sample_size, patch_size=patch_size, out_channels=out_channels, num_classes=num_classes,
            num_embeds_ada_norm=num_embeds_ada_norm, norm_num_groups=norm_num_groups, objective=objective,
            flow_convention=flow_convention, timestep_freq_shift=timestep_freq_shift, attention_type=attention_type,
            attention_types=attention_types, position_embedding=position_embedding)
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            attention_bias=attention_bias,
            sample_size=sample_size,
            patch_size=patch_size,
            activation_fn=activation_fn,
            num_embeds_ada_norm=num_classes,
            upcast_attention=upcast_attention,
            norm_type=norm_type,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
        )
        # The config records the resolved class count under both names.
        self.register_to_config(num_classes=num_classes, num_embeds_ada_norm=num_classes)
        for block in self.transformer_blocks:
            # Keep the null-class row of the label table (so DiT weights load) but never drop
            # labels at random inside the model.
            block.norm1.emb.class_embedder.dropout_prob = 0.0
            # the time embedding's frequencies exp(-log(10000) i / (half - shift)): diffusers' DiT uses 1, the
            # original DiT and SiT code 0
            block.norm1.emb.time_proj.downscale_freq_shift = timestep_freq_shift
        if attention_types is not None:  # saved as a plain list, so configs compare equal after a round trip
            self.register_to_config(attention_types=kinds)
        for kind in dict.fromkeys(kinds):
            blocks = [index for index, each in enumerate(kinds) if each == kind]
            place_processors(*new_processors(self, kind, layers=blocks, **self.attention_options(kind)))
        if not isinstance(use_cpe, bool):
            raise ValueError(f"use_cpe must be True or False, got {use_cpe!r}")
        self.conv_positions = None
        if use_cpe:  # NaLaFormer's block: a depthwise 3x3 convolution before the attention and before the FFN
            self.conv_positions = nn.ModuleList(BlockConvPositions(self.inner_dim, cpe_init) for _ in self.transformer_blocks)
            for cpe, block in zip(self.conv_positions, self.transformer_blocks):
                cpe.attach(block)

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' config reading, with the options a config lacks taken as that config was built
        (:data:`~nala_diffusion.models.options.LEGACY_CONFIG_DEFAULTS`), not as new models default them."""
        legacy = {key: value for key, value in LEGACY_CONFIG_DEFAULTS.items() if key not in config_dict and key not in kwargs}
        return super().extract_init_dict({**config_dict, **legacy}, **kwargs)

    @classmethod
    def config_as_loaded(cls, config: Dict[str, Any]) -> Dict[str, Any]:
        """``config`` with every key it lacks (a config written before that option existed) at the value a
        model loaded from it takes: the legacy value (:data:`~nala_diffusion.models.options.LEGACY_CONFIG_DEFAULTS`),
        else the argument's default. Two configs describe the same model when these agree."""
        defaults = {name: parameter.default for name, parameter in inspect.signature(cls.__init__).parameters.items()
                    if parameter.default is not inspect.Parameter.empty}
        return {**defaults, **LEGACY_CONFIG_DEFAULTS, **config}

    # -- configuration helpers ------------------------------------------------------------------
    def attention_options(self, attention_type: Optional[str] = None) -> Dict[str, Any]:
        """Processor options from the config that a processor of ``attention_type`` (default: the
        config's ``attention_type``) accepts (:func:`~nala_diffusion.models.options.options_from_config`)."""
        return options_from_config(self.config, attention_type)

    @property
    def layer_attention_types(self) -> List[str]:
        """The attention type of each block, as the config declares it."""
        return layer_attention_types(self.config.num_layers, self.config.attention_type,
                                     self.config.get("attention_types"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``ModelMixin.from_pretrained``, refusing weights that do not fit: missing, unexpected or
        reshaped tensors and NaN/inf values raise a ``ValueError`` naming them (diffusers would only
        warn, and leave missing parameters uninitialised)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        where = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        check_loaded_weights(model, where.rstrip(os.sep), missing=info.get("missing_keys"),
                             unexpected=info.get("unexpected_keys"), mismatched=info.get("mismatched_keys"))
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, is_main_process: bool = True, save_function=None,
                        safe_serialization: bool = True, variant: Optional[str] = None, **kwargs):
        """``ModelMixin.save_pretrained``, with the weights readable as the umask allows (safetensors
        would leave them 0o600). The parameters diffusers' pipeline passes by name (``variant``, ...)
        are named here too, since it passes only those a component's signature shows."""
        super().save_pretrained(save_directory, is_main_process=is_main_process, save_function=save_function,
                                safe_serialization=safe_serialization, variant=variant, **kwargs)
        follow_umask(os.fspath(save_directory))

    @property
    def null_class_label(self) -> int:
        """The label that means "no class" (classifier-free guidance's unconditional branch)."""
        return self.config.num_classes

    @property
    def training_grid(self):
        side = self.config.sample_size // self.config.patch_size
        return side, side

    @classmethod
    def from_preset(cls, name: str, softmax_layers: Optional[Sequence[int]] = None,
                    **overrides) -> "NaLaDiTTransformer2DModel":
        """A freshly initialised model of a DiT size preset (``"S/2"``, ``"B/2"``, ``"L/2"``, ``"XL/2"``, ...).

        ``softmax_layers=[-1]`` gives a hybrid: the last block softmax, the others ``attention_type``
        (recorded in the config as ``attention_types``)."""
        return cls(**preset_config(name, softmax_layers=softmax_layers, **overrides))

    # -- forward ----------------------------------------------------------------------------------
    def _position_table(self, rows: int, cols: int, mode: str, device) -> Optional[torch.Tensor]:
        """(1, rows * cols, D) sin-cos table, or None where PatchEmbed's own table is the right one."""
        if mode == "interpolate" or (rows, cols) == self.training_grid:
            return None
        scale = self.pos_embed.interpolation_scale
        grid_h = torch.arange(rows, device=device, dtype=torch.float32) / scale
        grid_w = torch.arange(cols, device=device, dtype=torch.float32) / scale
        grid = torch.stack(torch.meshgrid(grid_w, grid_h, indexing="xy"), dim=0)  # (2, rows, cols), w first as in diffusers
        table = get_2d_sincos_pos_embed_from_grid(self.inner_dim, grid, output_type="pt")  # (rows * cols, D)
        return table.float().unsqueeze(0)

    def _embed_patches(self, hidden_states: torch.Tensor, mode: str) -> torch.Tensor:
        rows, cols = hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size
        table = self._position_table(rows, cols, mode, hidden_states.device)
        if table is None:
            return self.pos_embed(hidden_states)  # training grid, or diffusers' interpolation
        patches = self.pos_embed.proj(hidden_states).flatten(2).transpose(1, 2)  # (B, N, D)
        if self.pos_embed.layer_norm:
            patches = self.pos_embed.norm(patches)
        return (patches + table).to(patches.dtype)

    def _check_input(self, hidden_states: torch.Tensor) -> None:
        if hidden_states.ndim != 4 or hidden_states.shape[1] != self.config.in_channels:
            raise ValueError(
                f"hidden_states must be (batch, {self.config.in_channels}, height, width); got {tuple(hidden_states.shape)}"
            )
        height, width = hidden_states.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"height and width must be multiples of the patch size {self.patch_size}; got {height}x{width}"
            )

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: Optional[torch.LongTensor] = None,
        class_labels: Optional[torch.LongTensor] = None,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        return_dict: bool = True,
        position_embedding: Optional[str] = None,
    ):
        """Like ``DiTTransformer2DModel.forward``, for any height x width the patch divides.

        Args:
            hidden_states: ``(batch, in_channels, height, width)``.
            timestep: ``(batch,)`` or a scalar.
            class_labels: ``(batch,)`` in ``0..num_classes`` (``num_classes`` is the null class).
            cross_attention_kwargs: passed to the attention processors; ``grid_size`` is added.
            position_embedding: overrides the config's ``position_embedding`` for this call.

        Returns:
            ``Transformer2DModelOutput`` with ``sample`` ``(batch, out_channels, height, width)``,
            or a tuple when ``return_dict`` is False.
        """
        # 1. Input
        self._check_input(hidden_states)
        mode = position_embedding or self.config.position_embedding
        if mode not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {mode!r}")
        batch = hidden_states.shape[0]
        if timestep is not None:
            timestep = torch.as_tensor(timestep, device=hidden_states.device)
            if timestep.ndim == 0:
                timestep = timestep.expand(batch)
        rows, cols = hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size
        hidden_states = self._embed_patches(hidden_states, mode)  # (B, rows * cols, D)
        cross_attention_kwargs = dict(cross_attention_kwargs or {})
        with_grid = {"grid_size": (rows, cols), **cross_attention_kwargs}

        # 2. Blocks (each block's processor gets the token grid if it takes one: LePE and RoPE need it)
        for index, block in enumerate(self.transformer_blocks):
            block_kwargs = with_grid if _takes_grid(block.attn1.processor) else cross_attention_kwargs
            if self.conv_positions is not None:
                cpe = self.conv_positions[index]
                cpe.grid = (rows, cols)
                hidden_states = cpe.before_block(hidden_states)  # cpe2 runs inside the block (its hooks)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, None, None, None, timestep, block_kwargs, class_labels
                )
            else:
                hidden_states = block(
                    hidden_states,
                    attention_mask=None,
                    encoder_hidden_states=None,
                    encoder_attention_mask=None,
                    timestep=timestep,
                    cross_attention_kwargs=block_kwargs,
                    class_labels=class_labels,
                )  # (B, N, D)

        # 3. Output
        conditioning = self.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)
        shift, scale = self.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)  # (B, D) each
        hidden_states = self.norm_out(hidden_states) * (1 + scale[:, None]) + shift[:, None]
        hidden_states = self.proj_out_2(hidden_states)  # (B, N, p * p * C_out)

        # 4. Unpatchify on the (rows, cols) grid
        p, channels = self.patch_size, self.out_channels
        hidden_states = hidden_states.reshape(-1, rows, cols, p, p, channels)
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        output = hidden_states.reshape(-1, channels, rows * p, cols * p)  # (B, C_out, H, W)

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)


def _takes_grid(processor) -> bool:
    """Whether an attention processor's ``__call__`` names ``grid_size`` (``Attention`` drops, with a
    warning, every keyword its processor does not name)."""
    return "grid_size" in inspect.signature(processor.__call__).parameters
