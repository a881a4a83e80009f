"""What a training run is built from, beyond the model's config: the VAE and class names an
``--init_from`` pipeline brings, how the data's classes map onto a pretrained model's, which NaLa
layers get sigma calibrated, and the sampler settings saved with the pipeline."""

from __future__ import annotations

from typing import Any, Dict, List, Optional


class LazyLogger:
    """accelerate's logger for ``name``, made on first use (so that ``--help`` imports nothing heavy)."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attribute):
        from accelerate.logging import get_logger

        return getattr(get_logger(self.name), attribute)


logger = LazyLogger(__name__)


def inherited_vae(init_from: Optional[str]) -> Optional[str]:
    """``init_from`` when it is a pipeline with a VAE (its ``vae/`` serves the run), else None."""
    if not init_from:
        return None
    from nala_diffusion.models.sources import pipeline_index

    index = pipeline_index(init_from)
    return init_from if index is not None and (index.get("vae") or [None])[0] else None


def resolve_classes(args, model, classes: List[str]):
    """(model, id2label, class_ids): the model (with a new class embedding for ``--class_embedding new``),
    the class names its pipeline will take, and the model id of each data class (data index -> id)."""
    from nala_diffusion.data.classes import map_classes, mapped_id2label
    from nala_diffusion.models.conversion import with_new_class_embedding
    from nala_diffusion.models.sources import pipeline_id2label, pipeline_index

    own = {i: name for i, name in enumerate(classes)}
    if not args.init_from:
        return model, own, list(range(len(classes)))
    if args.class_embedding == "new":
        logger.info(f"a new class embedding for the data's {len(classes)} classes", main_process_only=True)
        return with_new_class_embedding(model, len(classes)), own, list(range(len(classes)))
    source_labels = pipeline_id2label(pipeline_index(args.init_from))
    mapping = map_classes(classes, model.config.num_classes, source_labels, source=repr(args.init_from))
    class_ids = [mapping[i] for i in range(len(classes))]
    if class_ids != list(range(len(classes))) or len(classes) != model.config.num_classes:
        shown = ", ".join(f"{classes[i]} -> {class_ids[i]}" for i in range(min(len(classes), 5)))
        logger.info(f"the data's {len(classes)} classes map onto the model's {model.config.num_classes}: {shown}"
                    + (", ..." if len(classes) > 5 else ""), main_process_only=True)
    id2label = mapped_id2label(source_labels, classes, mapping) if source_labels else \
        {class_ids[i]: name for i, name in own.items()}
    return model, id2label, class_ids


def sampling_defaults(args) -> Dict[str, Any]:
    """The sampler settings of the validation grid, saved with the pipeline as its defaults."""
    return {"num_inference_steps": args.validation_inference_steps, "guidance_scale": args.validation_guidance_scale}


def layers_to_calibrate(args, model, source) -> List[str]:
    """The NaLa layers whose sigma is calibrated before the first step: every calibrated or learnable one,
    except, with ``--init_from``, those whose sigma the source brings (kept, as every other weight,
    unless ``--recalibrate_norm_scale``)."""
    from nala_diffusion.models.norm_awareness import nala_processors

    inherited = set()
    if args.init_from and not args.recalibrate_norm_scale:
        suffix = ".processor.log_norm_scale"
        inherited = {name[: -len(suffix)] for name in source.state_dict() if name.endswith(suffix)}
    return [name for name, p in nala_processors(model).items() if p.norm_scale_mode != "fixed" and name not in inherited]
