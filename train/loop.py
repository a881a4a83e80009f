"""A training run's optimisation: the optimiser, schedule, EMA and attention distiller, resuming from a
checkpoint, the step loop (logging, checkpoints, validation grids, stopping on a signal) and the saved
pipeline."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from tqdm.auto import tqdm

from nala_diffusion.train.losses import step_generator, training_losses
from nala_diffusion.train.run_setup import LazyLogger, sampling_defaults
from nala_diffusion.utils.files import save_grid_atomically

logger = LazyLogger(__name__)

#: learning-rate schedules that do not depend on --max_train_steps, so a resumed run may change it
STEP_FREE_SCHEDULES = ("constant", "constant_with_warmup")
#: settings that do not change what a resumed run computes; every other one must match the checkpoint's
RESUME_FREE_ARGS = {"max_train_steps", "output_dir", "checkpointing_steps", "checkpoints_total_limit",
                    "resume_from_checkpoint", "logging_steps", "validation_steps", "validation_labels",
                    "validation_inference_steps", "validation_guidance_scale", "report_to", "dataloader_num_workers",
                    "overwrite", "train_data_dir", "dataset", "init_from", "teacher", "vae", "model_config",
                    # the layout flags: the model config compares the layout they give, whatever its spelling
                    "softmax_layers", "attention_types"}


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def agreed(self, accelerator) -> bool:
        flag = torch.tensor(float(self.signal is not None), device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, "max")
        return bool(flag.item())


@dataclass
class Optimisation:
    """The prepared model, optimiser, loader and schedule, the EMA and attention distiller, the unwrapped
    model, the run's record for checkpoints and where the run stands (step, batches drawn)."""

    model: Any
    optimizer: Any
    loader: Any
    lr_scheduler: Any
    ema: Any
    distiller: Any
    unwrapped: Any
    run_state: Dict[str, Any]
    global_step: int = 0
    batch_index: int = 0


def prepare_optimisation(config, accelerator, models, data) -> Optimisation:
    """AdamW, the data loader and the schedule through ``accelerator.prepare``; the EMA (saved and loaded
    with the checkpoints) and the attention distiller; the run's record for checkpoints."""
    from diffusers.optimization import get_scheduler

    from nala_diffusion.train import checkpoints

    model = models.model
    ema = checkpoints.ema_model(model, config.ema_decay) if config.use_ema else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=config.train_batch_size, shuffle=True,
                                         num_workers=config.dataloader_num_workers)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_train_steps * accelerator.num_processes)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    distiller = None
    if config.attention_distillation_weight:
        from nala_diffusion.train.attention_distillation import AttentionDistillation

        distiller = AttentionDistillation(accelerator.unwrap_model(model), models.teacher[0] if models.teacher else None)
        logger.info(f"attention distillation on blocks {distiller.layer_indices}", main_process_only=True)
    if ema is not None:
        ema.to(accelerator.device)
        checkpoints.register_ema_hooks(accelerator, ema)
    unwrapped = accelerator.unwrap_model(model)
    args = config.as_args()
    run_state = {
        "model_config": {k: v for k, v in dict(unwrapped.config).items() if not k.startswith("_")},
        "dataset_size": len(data.dataset), "train_batch_size": config.train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes, "latent_space": data.vae is not None, "args": args,
        "class_names": data.classes, "class_ids": models.class_ids,
        "data_fingerprint": data.fingerprint, "input_weights": data.input_weights,
        "result_args": {k: v for k, v in args.items() if k not in RESUME_FREE_ARGS},
    }
    return Optimisation(model, optimizer, loader, lr_scheduler, ema, distiller, unwrapped, run_state)


def resume(config, accelerator, run: Optimisation, saved: Optional[Dict[str, Any]], resume_path: Optional[str]) -> None:
    """Load the checkpoint's state (model, optimiser, schedule, EMA, random states) and position, after
    checking that it was written by a run of these settings."""
    from nala_diffusion.train import checkpoints

    if resume_path:
        checkpoints.check_compatible(saved, run.run_state, resume_path, type(run.unwrapped))
        saved_steps = saved.get("args", {}).get("max_train_steps", config.max_train_steps)
        if saved_steps != config.max_train_steps and config.lr_scheduler not in STEP_FREE_SCHEDULES:
            raise ValueError(
                f"cannot resume from {resume_path} with --max_train_steps {config.max_train_steps}: the run was started "
                f"with {saved_steps} and its --lr_scheduler {config.lr_scheduler} decays over that count, so the "
                "learning rate would jump. Resume with the original --max_train_steps, or use a constant schedule "
                "(constant, constant_with_warmup), whose run may be extended")
        accelerator.load_state(resume_path)  # with the EMA, through register_ema_hooks
        run.global_step, run.batch_index = saved["global_step"], saved["batch_index"]
        logger.info(f"resumed from {resume_path} at step {run.global_step}", main_process_only=True)
    elif config.resume_from_checkpoint:
        logger.info("no checkpoint to resume from; starting a new run", main_process_only=True)
    if accelerator.is_main_process:
        with open(os.path.join(config.output_dir, "args.json"), "w", encoding="utf-8") as handle:
            json.dump(run.run_state["args"], handle, indent=2)


def checkpoint(config, accelerator, run: Optimisation) -> None:
    from nala_diffusion.train import checkpoints

    state = {**run.run_state, "global_step": run.global_step, "batch_index": run.batch_index}
    checkpoints.save_checkpoint(accelerator, config.output_dir, run.global_step, state, config.checkpoints_total_limit)


def train_steps(config, accelerator, run: Optimisation, models, data, log, stop: StopRequest) -> Optional[int]:
    """Optimiser steps up to --max_train_steps; returns None when done, or the exit status of a run stopped
    by a signal (after its checkpoint)."""
    steps_per_epoch = math.ceil(len(run.loader) / config.gradient_accumulation_steps)
    progress = tqdm(total=config.max_train_steps, initial=run.global_step, desc="steps",
                    disable=not accelerator.is_main_process)
    window = Window()
    run.model.train()
    while run.global_step < config.max_train_steps:
        epoch = run.global_step // steps_per_epoch
        run.loader.set_epoch(epoch)
        skip = (run.global_step - epoch * steps_per_epoch) * config.gradient_accumulation_steps
        for batch, labels in accelerator.skip_first_batches(run.loader, skip) if skip else run.loader:
            if not optimiser_step(config, accelerator, run, models, data, batch, labels, window):
                continue
            progress.update(1)
            after_step(config, accelerator, run, models, data, log, window, progress)
            if stop.agreed(accelerator):
                if run.global_step % config.checkpointing_steps:
                    checkpoint(config, accelerator, run)
                logger.warning(f"stopped by signal at step {run.global_step}; resume with --resume_from_checkpoint "
                               "latest", main_process_only=True)
                accelerator.end_training()
                return 128 + (stop.signal or signal.SIGTERM)
            if run.global_step >= config.max_train_steps:
                break
    progress.close()
    return None


class Window:
    """The loss sums, images and batches since the last log row, and when it began."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.images, self.batches, self.sums = time.perf_counter(), 0, 0, {}


def optimiser_step(config, accelerator, run: Optimisation, models, data, batch, labels, window: Window) -> bool:
    """One batch's forward and backward (an optimiser step when gradients sync); True when a step was
    completed (the EMA updated and the step counted)."""
    generator = step_generator(config.seed, run.batch_index, accelerator.process_index, accelerator.device)
    run.batch_index += 1
    with accelerator.accumulate(run.model):
        losses = training_losses(config, run.model, models.teacher, data.vae, models.objective, batch, labels,
                                 run.unwrapped.null_class_label, data.in_channels, generator, run.distiller)
        accelerator.backward(losses["loss"])
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(run.model.parameters(), config.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    for key, value in losses.items():
        window.sums[key] = window.sums.get(key, 0.0) + accelerator.reduce(value.detach(), "mean").item()
    window.images += len(labels) * accelerator.num_processes
    window.batches += 1
    if not accelerator.sync_gradients:
        return False
    if run.ema is not None:
        run.ema.step(run.unwrapped.parameters())
    run.global_step += 1
    return True


def after_step(config, accelerator, run: Optimisation, models, data, log, window: Window, progress) -> None:
    """The log row, checkpoint and validation grid that fall on this step."""
    step = run.global_step
    if step % config.logging_steps == 0 or step == config.max_train_steps:
        elapsed = time.perf_counter() - window.start
        row = {"step": step, "lr": run.lr_scheduler.get_last_lr()[0], "images_per_second": window.images / elapsed,
               **{k: v / window.batches for k, v in window.sums.items()}}
        progress.set_postfix(loss=f"{row['loss']:.4f}")
        if log is not None:
            log.write(row)
        accelerator.log(row, step=step)
        window.reset()
    if step % config.checkpointing_steps == 0:
        checkpoint(config, accelerator, run)
    if config.validation_steps and step % config.validation_steps == 0:
        responding = validate(config, accelerator, run.unwrapped, run.ema, models, data.vae, step)
        if responding is not None:
            if log is not None:
                log.write({"step": step, "responding_fraction": responding})
            accelerator.log({"responding_fraction": responding}, step=step)


@torch.no_grad()
def validate(config, accelerator, model, ema, models, vae, step) -> Optional[float]:
    """Sample a grid with the (EMA) weights on the main process; others wait. For NaLa models, also
    returns the share of the probe batch's queries whose power still responds to their norm
    (averaged over layers; a warning names saturated layers)."""
    from nala_diffusion.models.norm_awareness import mean_responding_fraction, nala_processors, saturation_report
    from nala_diffusion.pipelines.pipeline_nala_dit import NaLaDiTPipeline
    responding = None
    if accelerator.is_main_process:
        if ema is not None:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
        model.eval()
        pipeline = NaLaDiTPipeline(model, models.objective.sampling_scheduler(), vae=vae, id2label=models.id2label)
        pipeline.set_progress_bar_config(disable=True)
        labels = [models.class_ids[i] for i in config.validation_labels or range(min(len(models.class_ids), 8))]
        generators = [torch.Generator(accelerator.device).manual_seed(config.seed + i) for i in range(len(labels))]
        images = pipeline(labels, generator=generators, output_type="pt", **sampling_defaults(config)).images
        save_grid_atomically(images.float().cpu(), os.path.join(config.output_dir, "samples", f"step-{step:06d}.png"),
                             nrow=len(labels))
        if nala_processors(model):
            probe = models.probe
            report = saturation_report(model, probe[0], timestep=probe[1], class_labels=probe[2])
            responding = mean_responding_fraction(report)
            logger.info(f"step {step}: {responding:.1%} of NaLa's queries have a power that responds to their norm")
        model.train()
        if ema is not None:
            ema.restore(model.parameters())
    accelerator.wait_for_everyone()
    return responding


def save_result(config, accelerator, run: Optimisation, models, data) -> None:
    """The EMA (or last) weights saved as a pipeline in output_dir, with the validation sampler settings."""
    from nala_diffusion.pipelines.pipeline_nala_dit import NaLaDiTPipeline
    from nala_diffusion.train.run_folder import save_pipeline_atomically

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if run.ema is not None:
            run.ema.copy_to(run.unwrapped.parameters())
        pipeline = NaLaDiTPipeline(transformer=run.unwrapped.float().eval(), vae=data.vae, id2label=models.id2label,
                                   scheduler=models.objective.sampling_scheduler(),
                                   sampling_defaults=sampling_defaults(config))
        save_pipeline_atomically(pipeline, config.output_dir)
        logger.info(f"saved the pipeline to {config.output_dir}")
    accelerator.end_training()
