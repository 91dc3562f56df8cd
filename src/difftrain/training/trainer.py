"""The training loop: build every component from its slice of the config, train, save.

Run it with `difftrain train --config CONFIG.yaml` (or `scripts/train_text_to_image.py`).
Every random number is keyed by where it sits in the run: data order by (seed, epoch), and a
sample's augmentation, latent sample, noise and timestep by (seed, the sample's stream
position), through `difftrain.seeds`. Nothing random lives in global state, so a run is
reproducible on any device, a sample is the same in any micro-batch or process, and a resumed
run continues the exact stream: it is bit-identical to the run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from difftrain.config import Config, config_to_dict
from difftrain.data.dataset import CaptionedImageDataset, build_dataloader
from difftrain.data.folder import Example
from difftrain.data.manifest import write_manifest
from difftrain.models.loading import PipelineComponents, load_components
from difftrain.models.sample_dropout import keyed_by
from difftrain.training.cached_inputs import build_input_cache
from difftrain.training.compile import check_compile_supported
from difftrain.training.determinism import configure_determinism, seed_everything
from difftrain.training.distributed import (
    make_accelerator,
    peers_lost_is_one_line,
    process_facts,
    release_accelerator,
    run_on_main,
)
from difftrain.training.encoder_residency import step_done
from difftrain.training.loss import diffusion_loss
from difftrain.training.model_setup import (
    DTYPES,
    build_ema,
    prepare_models,
    release_encoders,
    run_objective,
)
from difftrain.training.optim import build_lr_scheduler, build_optimizer, describe_optimizer
from difftrain.training.preflight import check_inputs, check_precision
from difftrain.training.resume import continue_in_place
from difftrain.training.run_checkpoints import RunCheckpoints
from difftrain.training.run_clock import RunClock
from difftrain.training.run_dir import claim_output_dir, write_run_description
from difftrain.training.run_logging import (
    attach_log_handlers,
    detach_log_handlers,
    report_buckets,
    report_skipped_images,
)
from difftrain.training.run_outputs import RunOutputs
from difftrain.training.sharding import norm_value, shard_denoiser
from difftrain.training.signals import startup_interrupts, stop_signals
from difftrain.training.state import TrainingProgress, TrainingState
from difftrain.training.step_bookkeeping import StepBookkeeping, StepResult
from difftrain.training.tracking import NullTracker, build_tracker, shows_progress_bar

logger = logging.getLogger("difftrain")


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    """Optimizer steps this call ran (a resumed run counts only its own)."""
    losses: list[float]
    resumed_from: Path | None = None


def train(
    cfg: Config,
    *,
    overwrite: bool = False,
    allow_config_change: tuple[str, ...] = (),
    stop_after: int | None = None,
    save_outputs: bool = True,
) -> TrainResult:
    """Fine-tune the denoiser of `cfg.model.pretrained` on `cfg.data` and write the outputs.

    For `difftrain reproduce`: `stop_after` ends after that step as if it were the last, with
    the schedule still that of `train.max_steps`; `save_outputs=False` skips the final
    pipeline or LoRA and the model card (only the metrics are wanted).
    """
    with startup_interrupts() as interrupted:
        return _train(cfg, overwrite, allow_config_change, interrupted, stop_after, save_outputs)


def _train(
    cfg: Config, overwrite: bool, allow_config_change, interrupted, stop_after, save_outputs
) -> TrainResult:
    output_dir = Path(cfg.train.output_dir)
    check_precision(cfg.train.mixed_precision)
    configure_determinism(cfg.train.deterministic)
    accelerator = make_accelerator(cfg)
    if cfg.train.compile:  # refused before the output folder is claimed
        check_compile_supported(accelerator.device)
    main = accelerator.is_main_process
    clock = RunClock()
    lock = tracker = run = None
    log_handlers: list[logging.Handler] = []
    try:
        # Checked once, on the main process (data scan, image and checkpoint hashes).
        inputs = run_on_main(
            accelerator,
            lambda: check_inputs(
                cfg, allow_config_change, overwrite=overwrite,
                num_processes=accelerator.num_processes,
            ),
        )  # fmt: skip
        checkpoint = inputs.checkpoint
        # Continuing in the checkpoint's own folder keeps that run's files; a checkpoint from
        # another folder starts this folder as any new run would (and may be refused).
        in_place = checkpoint is not None and checkpoint.parent == output_dir.resolve()

        held: list = []  # the lock stays with the main process; only the verdict is shared
        run_on_main(
            accelerator,
            lambda: held.append(
                claim_output_dir(
                    output_dir, cfg, overwrite=overwrite, training=True, resuming=in_place
                )
            ),
        )
        lock = held[0] if held else None
        interrupted()
        log_handlers = attach_log_handlers(
            output_dir / "logs" / "train.log", main, console_steps=not shows_progress_bar(main)
        )
        seed_everything(cfg.train.seed)
        interrupted()  # the safe points of start-up: between its phases
        components = load_components(cfg.model, inputs.family)
        interrupted()
        run = TrainingRun(cfg, accelerator, components, inputs.examples, inputs.buckets)
        run.last_step = min(cfg.train.max_steps, stop_after or cfg.train.max_steps)
        if checkpoint is not None:
            run.resume(checkpoint)
        if in_place:
            # Only now that the checkpoint has loaded: the steps after it are trained again,
            # so their metrics lines and later checkpoints (an abandoned branch) go.
            run_on_main(accelerator, lambda: continue_in_place(output_dir, run.progress.step))
        if main:
            write_run_description(output_dir, cfg, processes=process_facts(accelerator))
            write_manifest(output_dir, inputs.examples, cfg.data, cfg.validation)
            report_skipped_images(inputs.skipped, output_dir)
            if inputs.buckets is not None:
                report_buckets(inputs.buckets, cfg.train.batch_size * accelerator.num_processes,
                               output_dir)  # fmt: skip
        run.tracker = tracker = build_tracker(
            main,
            output_dir=output_dir,
            report_to=cfg.train.report_to,
            max_steps=cfg.train.max_steps,
            start_step=run.progress.step,
            run_config=config_to_dict(cfg),
        )
        interrupted()
        # Signals stay caught until the outputs are complete: a Ctrl-C during the final save
        # is answered once the save is done, never by a half-written pipeline.
        with stop_signals() as received, peers_lost_is_one_line(accelerator):
            interrupted()  # a Ctrl-C just before the loop's own handler took over
            clock.training_starts()
            losses = run.train(received)
            clock.training_ends()
            run.gather_for_publish()
            if main and save_outputs:
                run.publish(losses)
                clock.write(output_dir)
                kind = "LoRA weights" if cfg.lora.enabled else "pipeline"
                logger.info("saved the trained %s to %s", kind, output_dir)
            if received:
                logger.warning("%s arrived after the last step: the outputs are complete",
                               signal.Signals(received[0]).name)  # fmt: skip
        accelerator.wait_for_everyone()
        if main:  # the other processes need not wait for the Hub
            run.finish_uploads()
        return TrainResult(output_dir, len(losses), losses, resumed_from=checkpoint)
    finally:
        if run is not None and main and sys.exc_info()[0] is not None:
            # A run that stops on an error or a signal still lets a checkpoint upload that is
            # under way finish; its own failure must not hide the error that stopped the run.
            with contextlib.suppress(Exception):
                run.finish_uploads()
        if tracker is not None:
            tracker.close()
        release_accelerator(accelerator)
        detach_log_handlers(log_handlers)
        if lock is not None:
            lock.release()


class TrainingRun(RunCheckpoints, RunOutputs, StepBookkeeping):
    """Everything one training run holds, built from the config's slices."""

    def __init__(
        self,
        cfg: Config,
        accelerator,
        components: PipelineComponents,
        examples: list[Example],
        buckets=None,
    ):
        self.cfg = cfg
        self.accelerator = accelerator
        self.components = components
        self.family = family = components.family
        self.tracker = NullTracker()
        """Set by `train()` once the output folder is ready for this run's metrics."""
        self.output_dir = Path(cfg.train.output_dir)
        self.last_step = cfg.train.max_steps
        """The step the loop ends after (`train(stop_after=...)` can make it earlier)."""
        self.device = components.device = accelerator.device
        train_cfg = cfg.train
        self.weight_dtype = DTYPES.get(accelerator.mixed_precision, torch.float32)
        if train_cfg.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        denoiser = components.denoiser
        trained_text = prepare_models(components, cfg, self.device, self.weight_dtype)
        self.train_text_encoder = bool(trained_text)
        # FSDP2 (full fine-tunes on several processes): shard before the optimizer sees the
        # parameters, and keep the sharded denoiser out of accelerate's DDP wrapping.
        self.fsdp = train_cfg.fsdp and accelerator.num_processes > 1
        if self.fsdp:
            shard_denoiser(denoiser, family.shard_units(denoiser))
        self.ema = build_ema(cfg.ema, denoiser, self.device)

        self.cached = build_input_cache(cfg, components)
        tokenize = partial(family.tokenize, components.tokenizers())
        self.dataset = CaptionedImageDataset(
            examples, tokenize, cfg.data, self.cached.latent_keys if self.cached else None,
            buckets,
        )  # fmt: skip
        if self.cached is not None:
            self.cached.dataset = self.dataset
        release_encoders(components, cfg, self.cached, trained_text, self.device, self.weight_dtype)
        self.progress = TrainingProgress()
        trained = [denoiser, *trained_text.values()]
        params = [p for model in trained for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(train_cfg, params)
        self.lr_scheduler = build_lr_scheduler(train_cfg, optimizer)
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:
            # DeepSpeed wants the micro-batch size, which accelerate reads from a prepared data
            # loader; difftrain shards its own loader, so it says the size itself.
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = train_cfg.batch_size
        if self.fsdp:
            self.denoiser, self.optimizer = denoiser, accelerator.prepare(optimizer)
            wrapped_text: list = []
        else:
            self.denoiser, *wrapped_text, self.optimizer = accelerator.prepare(
                denoiser, *trained_text.values(), optimizer
            )
        components.denoiser = self.denoiser
        components.parts.update(zip(trained_text, wrapped_text, strict=True))
        self.trained_params = params
        self.trained_models = [self.denoiser, *wrapped_text]
        self.trained_text_encoders = trained_text
        """The text encoders that train (unwrapped), by component name; empty unless LoRA
        trains them."""
        self.state = TrainingState(
            progress=self.progress,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            grad_scaler=accelerator.scaler,
        )

        self.objective = run_objective(
            train_cfg, components, self.device, self.weight_dtype, self.train_text_encoder
        )
        self.last_grid: Path | None = None
        self.final_denoiser = None
        """A sharded run's gathered denoiser, for the final save (`gather_for_publish`)."""
        self.validation_loss = None
        if cfg.validation.loss_every_steps:
            from difftrain.training.validation_loss import ValidationLoss

            share = (0, 1) if self.fsdp else (accelerator.process_index, accelerator.num_processes)
            self.validation_loss = ValidationLoss(
                cfg, components, self.objective, rank=share[0], world_size=share[1]
            )

    def train(self, stop_signals: list[int]) -> list[float]:
        cfg = self.cfg.train
        processes = self.accelerator.num_processes
        logger.info(
            "training %d steps on %d images (%s, %s family, %s prediction, batch %d x %d "
            "accumulation x %d process%s = %d images per step, %s, %s)",
            cfg.max_steps, len(self.dataset), self.components.source, self.family.name,
            self.objective.prediction_type, cfg.batch_size, cfg.gradient_accumulation_steps,
            processes, "" if processes == 1 else "es",
            cfg.batch_size * cfg.gradient_accumulation_steps * processes, self.device,
            describe_optimizer(self.optimizer),
        )  # fmt: skip
        batches = iter(
            build_dataloader(
                self.dataset,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                start_position=self.progress.samples_seen,
                rank=self.accelerator.process_index,
                world_size=self.accelerator.num_processes,
            )
        )
        losses: list[float] = []
        started = time.perf_counter()
        while self.progress.step < self.last_step:
            step_started = time.perf_counter()
            result = self._optimizer_step(batches)
            self.progress.step += 1
            losses.append(result.loss)
            val_loss = self._maybe_validation_loss()
            self._log_step(result, val_loss, step_started, started)
            checkpointed = self._maybe_checkpoint()
            self._maybe_validate()
            step_done(components=self.components)
            # Every process must stop after the same step (they meet in the checkpoint), so a
            # signal seen by any of them is shared first. After the last step, just finish.
            if stop_signals:
                self.accelerator.set_trigger()
            if self.accelerator.check_trigger() and self.progress.step < self.last_step:
                self._stop_for_signal(
                    stop_signals[0] if stop_signals else signal.SIGTERM, checkpointed
                )
        if self.cached is not None:
            logger.info(self.cached.summary())
        return losses

    def _optimizer_step(self, batches: Iterator) -> StepResult:
        """One optimizer step over `gradient_accumulation_steps` batches.

        A non-finite loss either stops the run or, with `train.on_nonfinite: skip`, drops the
        update: no NaN ever reaches the weights.
        """
        cfg, accelerator, progress = self.cfg.train, self.accelerator, self.progress
        step_loss = torch.zeros((), device=self.device)
        grad_norm = None
        skipped = False
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next(batches)
            progress.samples_seen += cfg.batch_size * accelerator.num_processes
            with accelerator.accumulate(*self.trained_models):
                loss = diffusion_loss(
                    batch, self.components, self.denoiser, self.objective, self.cached
                )
                step_loss += loss.detach() / cfg.gradient_accumulation_steps
                # Gradient checkpointing re-runs the forward inside backward: the per-sample
                # LoRA dropout keys must still be there for it to draw the same masks.
                positions = [int(p) for p in batch["position"]]
                with keyed_by(self.cfg.train.seed, positions):
                    accelerator.backward(loss)
                if accelerator.sync_gradients:
                    step_loss = accelerator.reduce(step_loss, reduction="mean")
                    skipped = not torch.isfinite(step_loss)
                    if skipped:
                        self._on_nonfinite(step_loss.item())
                    elif cfg.max_grad_norm > 0:
                        norm = accelerator.clip_grad_norm_(self.trained_params, cfg.max_grad_norm)
                        grad_norm = norm_value(norm)
                if not skipped:
                    self.optimizer.step()
                    # fp16: the grad scaler skips an update whose gradients overflowed.
                    skipped = accelerator.sync_gradients and accelerator.optimizer_step_was_skipped
                self.optimizer.zero_grad(set_to_none=True)
        lr = self.lr_scheduler.get_last_lr()[0]  # the rate this step used
        if not skipped:
            # A skipped update moves neither the schedule nor the average (as accelerate's own
            # scheduler wrapper does), so both stay aligned with the updates really made.
            progress.nonfinite_in_a_row = 0
            if self.ema is not None and (progress.step + 1) % self.cfg.ema.update_every == 0:
                self.ema.step(self.accelerator.unwrap_model(self.denoiser).parameters())
            self.lr_scheduler.step()
        return StepResult(step_loss.item(), lr, grad_norm, skipped)
