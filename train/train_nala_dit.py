"""Train a class-conditional NaLa DiT with accelerate: from scratch, or converted from a DiT and distilled.

    python train/train_nala_dit.py --train_data_dir DATA --resolution 32 --model_config S/2 \\
        --max_train_steps 10000 --output_dir runs/s2
    accelerate launch --multi_gpu --num_processes 8 train/train_nala_dit.py ...   # DDP (FSDP/DeepSpeed refused)
    accelerate launch --multi_gpu --num_processes 2 train/train_nala_dit.py ...   # no GPU: 2 CPU processes (gloo)
    nala-train --init_from facebook/DiT-XL-2-256 --teacher facebook/DiT-XL-2-256 --vae VAE_DIR ...

From Python, the same run is ``train(RunConfig(...))`` (:class:`~nala_diffusion.train.run_config.RunConfig`
holds every flag as a field). The output folder becomes a pipeline folder (EMA weights) that
``NaLaDiTPipeline.from_pretrained`` loads, with ``args.json``, ``log.csv``, sample grids in ``samples/`` and
``checkpoint-<step>`` folders. Noise, timesteps, label drops and flips come from a generator seeded by
(seed, batch index, process), so a resumed run draws exactly what an uninterrupted one would.

The run's stages live in their own modules: :mod:`~nala_diffusion.train.run_folder` (the output folder),
:mod:`~nala_diffusion.train.run_data` (data and VAE), :mod:`~nala_diffusion.train.run_model` (model,
classes, calibration, objective, teacher), :mod:`~nala_diffusion.train.losses` and
:mod:`~nala_diffusion.train.loop` (optimisation, resume, the step loop, the saved pipeline).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Optional, Sequence

from nala_diffusion.train.loop import RESUME_FREE_ARGS, STEP_FREE_SCHEDULES, StopRequest  # noqa: F401 (public)
from nala_diffusion.train.run_config import RunConfig
from nala_diffusion.train.run_folder import RUN_OUTPUTS, check_output_dir, clear_run  # noqa: F401 (public)
from nala_diffusion.train.run_model import build_model, model_config_file  # noqa: F401 (public)
from nala_diffusion.utils.cli_args import exit_on_input_error
from nala_diffusion.utils.locks import output_lock

#: accelerate distributed types whose sharded parameters validation and EMA cannot read
SHARDED_TYPES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def parse_args(argv: Optional[Sequence[str]] = None) -> RunConfig:
    """The :class:`RunConfig` of ``nala-train``'s flags."""
    return RunConfig.from_flags(argv, description=__doc__.split("\n\n")[0])


def main(config: RunConfig) -> int:
    """Run ``config`` under the output folder's lock; returns the exit status (0, or 128 + the signal that
    stopped it)."""
    check_output_dir(config)
    # the run installs its own SIGTERM/SIGINT handlers (StopRequest); a caller in the same process
    # (nala-study) gets its own back afterwards
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # other processes of a distributed run: the main one holds the lock
        with output_lock(config.output_dir, "the training run", hold=int(os.environ.get("RANK", "0")) == 0):
            return run(config)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(config: RunConfig) -> int:
    """Train ``config`` from Python, exactly as ``nala-train`` with the same flags does (resumed, locked,
    stoppable); returns the exit status."""
    if not isinstance(config, RunConfig):
        raise ValueError(f"train() takes a RunConfig, got {type(config).__name__}")
    return main(config)


def check_distributed(accelerator) -> None:
    """Refuse sharded training: validation sampling and the EMA read the full parameters of the unwrapped
    model on one process, which FSDP and DeepSpeed shard across processes. DDP (and one process) work."""
    kind = str(getattr(accelerator.distributed_type, "name", accelerator.distributed_type))
    if kind in SHARDED_TYPES:
        raise ValueError(f"accelerate is configured for {kind}, which shards the parameters; nala-train's validation "
                         "and EMA need them whole. Launch with DDP (accelerate launch --multi_gpu) or one process")


def make_accelerator(config: RunConfig):
    """The run's ``Accelerator`` (CPU processes where no GPU is), refusing sharding and a mixed precision the
    device cannot run."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    from nala_diffusion.utils.distributed import use_cpu_processes

    report_to = config.report_to
    if report_to == "auto":
        report_to = "tensorboard" if _has_tensorboard() else None
    accelerator = Accelerator(
        cpu=use_cpu_processes(),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if report_to in (None, "none") else report_to,
        project_config=ProjectConfiguration(project_dir=config.output_dir,
                                            logging_dir=os.path.join(config.output_dir, "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    check_distributed(accelerator)
    if accelerator.mixed_precision in ("fp16", "bf16") and not accelerator.native_amp:
        raise ValueError(f"mixed precision {accelerator.mixed_precision} (--mixed_precision or accelerate's configuration) "
                         f"does not run on {accelerator.device}: accelerate would train in float32 and the run would "
                         "record fp16. On a CPU use bf16 or no; nothing was written")
    return accelerator, report_to


def run(config: RunConfig) -> int:
    """The stages in order: folder checks, data, accelerator, inputs, models, optimisation, resume, steps, save."""
    from accelerate.utils import set_seed

    from nala_diffusion.train import checkpoints, loop
    from nala_diffusion.train.run_data import load_inputs, read_data
    from nala_diffusion.train.run_folder import resume_point
    from nala_diffusion.train.run_log import CsvLog
    from nala_diffusion.train.run_model import build_models

    resume_path = resume_point(config)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    data = read_data(config)
    accelerator, report_to = make_accelerator(config)
    set_seed(config.seed)
    stop = StopRequest()
    os.makedirs(config.output_dir, exist_ok=True)
    if accelerator.is_main_process:
        removed = checkpoints.remove_partial_checkpoints(config.output_dir)
        if removed:
            loop.logger.warning(f"removed partially written checkpoints {removed}", main_process_only=True)
    data = load_inputs(config, data, accelerator, resume_path)
    config, models, data = build_models(config, data, accelerator.device, resume_path)
    optimisation = loop.prepare_optimisation(config, accelerator, models, data)
    loop.resume(config, accelerator, optimisation, data.saved, resume_path)
    distiller = optimisation.distiller
    extra_columns = ["loss_attention", *(f"loss_attention_{i}" for i in distiller.layer_indices)] if distiller else []
    log = CsvLog(os.path.join(config.output_dir, "log.csv"), keep_until_step=optimisation.global_step,
                 extra_columns=extra_columns) if accelerator.is_main_process else None
    if report_to not in (None, "none"):
        accelerator.init_trackers("nala_dit", config={k: v for k, v in config.as_args().items()
                                                      if isinstance(v, (int, float, str, bool))})
    stopped = loop.train_steps(config, accelerator, optimisation, models, data, log, stop)
    if stopped is not None:
        return stopped
    loop.save_result(config, accelerator, optimisation, models, data)
    return 0


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def cli(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return main(parse_args(argv))
    except ValueError as error:
        return exit_on_input_error("nala-train", error)


if __name__ == "__main__":
    sys.exit(cli())
