"""A NaLa pipeline from a pretrained DiT pipeline, and the one loader the command-line tools share.

    pipe = convert_dit_pipeline_to_nala("facebook/DiT-XL-2-256")      # NaLa, sigma calibrated
    pipe.save_pretrained("dit-xl-nala")                                 # nala-sample / nala-fid --model dit-xl-nala

The converted pipeline keeps the source's VAE, scheduler and ImageNet labels; only the transformer
changes (:func:`~nala_diffusion.convert_dit_to_nala`, whose keyword arguments pass through).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Type, Union

import torch

from nala_diffusion.models.conversion import convert_dit_to_nala
from nala_diffusion.models.sources import (
    hub_options,
    load_dit,
    not_found,
    pipeline_id2label,
    pipeline_index,
    read_config,
)

#: pipeline classes whose folders convert: diffusers' DiT pipeline
DIT_PIPELINES = ("DiTPipeline",)


def _id2label_of(pipeline, num_classes: int) -> Optional[Dict[int, str]]:
    """A loaded DiT pipeline's class names as the source had them: from its config, else from the
    ``model_index.json`` of the folder or id it was loaded from. A pipeline built in memory keeps only
    ``labels`` (name -> id, sorted by name, one id per name): rebuilt from it, every class it lost (a name of
    two classes, such as ImageNet's "crane", names only the last) is named by its ImageNet synset or
    ``"class <id>"``, with a warning saying to pass ``id2label``."""
    labels = pipeline.config.get("id2label") if hasattr(pipeline, "config") else None
    if labels:
        return {int(k): str(v) for k, v in labels.items()}
    source = getattr(pipeline, "name_or_path", None)  # the folder or id it was loaded from keeps the names' order
    if source:
        try:
            labels = pipeline_id2label(pipeline_index(source))
        except (OSError, ValueError):
            labels = None
        if labels:
            return labels
    names: Dict[int, list] = {}
    for name, class_id in (getattr(pipeline, "labels", None) or {}).items():
        names.setdefault(int(class_id), []).append(name)
    if not names:
        return None
    lost = [i for i in range(num_classes) if i not in names]
    if lost:
        import warnings

        from nala_diffusion.data.classes import IMAGENET_NUM_CLASSES, imagenet_synsets
        synsets = imagenet_synsets() if num_classes == IMAGENET_NUM_CLASSES else None
        for i in lost:
            names[i] = [synsets[i] if synsets else f"class {i}"]
        warnings.warn(f"the DiT pipeline was built in memory, and its labels (one id per name) lost every name of "
                      f"{len(lost)} class(es) ({lost[:10]}): they are named by {'synset' if synsets else 'id'}, and "
                      "synonyms are in alphabetical order. Pass id2label= (the source's model_index.json entry) to "
                      "keep the names as the source had them", stacklevel=3)
    return {k: ", ".join(v) for k, v in sorted(names.items())}


def _scheduler_of(name: str, index: dict, revision: Optional[str]):
    """The scheduler a DiT pipeline folder names (a diffusers class) from its ``scheduler/`` config."""
    import diffusers

    library, class_name = (index.get("scheduler") or [None, None])[:2]
    scheduler_class = getattr(diffusers, class_name or "", None) if library == "diffusers" else None
    if scheduler_class is None:
        raise ValueError(f"{name!r} names the scheduler {library}.{class_name}, not a diffusers scheduler")
    return scheduler_class.from_pretrained(name, subfolder="scheduler", **hub_options(name, revision))


def convert_dit_pipeline_to_nala(
    pipeline: Union[str, os.PathLike, Any],
    *,
    revision: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    pipeline_class: Optional[Type] = None,
    id2label: Optional[Dict[int, str]] = None,
    **convert_kwargs,
):
    """A :class:`~nala_diffusion.NaLaDiTPipeline` from a diffusers DiT pipeline: the source's VAE,
    scheduler and ``id2label``, and its transformer converted by :func:`~nala_diffusion.convert_dit_to_nala`.

    Args:
        pipeline: a loaded ``DiTPipeline``, or a pipeline folder or Hub id (``"facebook/DiT-XL-2-256"``),
            read through diffusers' loaders (Hub cache, ``HF_HUB_OFFLINE``, tokens apply).
        revision: the Hub revision of ``pipeline`` when it is an id.
        dtype: the dtype to load the weights in (default: float32).
        pipeline_class: the class to build (default ``NaLaDiTPipeline``; e.g. ``NaLaDiTHighResPipeline``).
        id2label: the class names to keep (default: the source's ``id2label``; a ``DiTPipeline`` built in
            memory keeps only its ``labels``, from which names shared by two classes cannot be recovered).
        convert_kwargs: keyword arguments of :func:`~nala_diffusion.convert_dit_to_nala`
            (``attention_type``, ``softmax_layers``, ``calibration_inputs``, options ...).
    """
    from diffusers import AutoencoderKL

    from nala_diffusion.pipelines.pipeline_nala_dit import NaLaDiTPipeline

    pipeline_class = pipeline_class or NaLaDiTPipeline
    if isinstance(pipeline, (str, os.PathLike)):
        name = os.fspath(pipeline)
        index = pipeline_index(name, revision)
        if index is None:
            if read_config(name, "config.json", revision=revision) is not None:
                raise ValueError(f"{name!r} is a transformer, not a pipeline: convert it with convert_dit_to_nala and "
                                 "give the result a VAE, scheduler and labels (docs/usage.md)")
            raise not_found(name, "DiT pipeline", revision)
        if index.get("_class_name") not in DIT_PIPELINES:
            raise ValueError(f"{name!r} is a {index.get('_class_name')!r}, not one of {DIT_PIPELINES}")
        transformer = load_dit(name, dtype=dtype, revision=revision)
        has_vae = bool((index.get("vae") or [None])[0])
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", use_safetensors=True, dtype=dtype,
                                            **hub_options(name, revision)) if has_vae else None
        scheduler = _scheduler_of(name, index, revision)
        id2label = id2label or pipeline_id2label(index)
    else:
        transformer, scheduler = pipeline.transformer, pipeline.scheduler
        vae = getattr(pipeline, "vae", None)
        id2label = id2label or _id2label_of(pipeline, transformer.config.num_embeds_ada_norm or 1000)
    nala = convert_dit_to_nala(transformer, **convert_kwargs)
    return pipeline_class(transformer=nala, scheduler=scheduler, vae=vae, id2label=id2label)


def load_pipeline(name: Union[str, os.PathLike], pipeline_class: Type, *, dtype: Optional[torch.dtype] = None,
                  revision: Optional[str] = None, announce=print):
    """The pipeline behind ``--model`` of the command-line tools, from a folder or Hub id:

    - a NaLa pipeline (``save_pretrained`` output, ``nala-train``'s run folder): loaded as it is;
    - a diffusers ``DiTPipeline`` (``facebook/DiT-XL-2-256``): converted with ``attention_type="softmax"``,
      which computes exactly what the DiT computes (``announce`` says so), e.g. for its FID;
    - a transformer folder, or nothing: a ``ValueError`` saying what to pass instead.
    """
    name = os.fspath(name)
    index = pipeline_index(name, revision)
    if index is None:
        config = read_config(name, "config.json", revision=revision)
        if config is not None:
            raise ValueError(
                f"{name!r} is a transformer folder (a {config.get('_class_name')}), not a pipeline: sampling also needs "
                "a scheduler, class names and, in latent space, a VAE. Convert a DiT pipeline with "
                "convert_dit_pipeline_to_nala(...).save_pretrained(DIR), or save NaLaDiTPipeline(transformer, scheduler, "
                "vae=..., id2label=...) (docs/usage.md)")
        raise not_found(name, "--model", revision)
    if index.get("_class_name") in DIT_PIPELINES:
        announce(f"{name}: a diffusers {index['_class_name']}; running it unchanged (its attention as softmax, exact)")
        return convert_dit_pipeline_to_nala(name, revision=revision, dtype=dtype, pipeline_class=pipeline_class,
                                            attention_type="softmax")
    return pipeline_class.from_pretrained(name, dtype=dtype, **hub_options(name, revision))
