"""A training run's checkpoints: writing them, resuming from one, stopping on a signal.

A mixin of `TrainingRun` (training/trainer.py), kept apart so the loop reads in one screen;
it uses the run's accelerator, models, optimizer state (`self.state`) and config.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch

from difftrain.config import dump_config
from difftrain.errors import TrainingInterrupted, UserError
from difftrain.training.checkpoint import load_trained_models, save_checkpoint, save_trained_models
from difftrain.training.distributed import run_on_main
from difftrain.training.sharding import (
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
    plain_copy,
    read_denoiser_state,
)
from difftrain.training.state import load_training_state, read_optimizer_state, save_main_state

logger = logging.getLogger("difftrain")


def _read_sharded_state(checkpoint: Path, denoiser, name: str) -> tuple[dict, dict]:
    """A checkpoint's whole denoiser and optimizer state for an FSDP run; refuses a checkpoint
    written without FSDP (its optimizer state is keyed by parameter number, not name)."""
    optimizer_state = read_optimizer_state(checkpoint)
    if any(isinstance(key, int) for key in optimizer_state.get("state", {})):
        raise UserError(
            f"cannot resume from {checkpoint} with train.fsdp on: it was written by a run "
            "without FSDP (on one process FSDP is off); resume it without FSDP, or start anew"
        )
    return read_denoiser_state(checkpoint, denoiser, name), optimizer_state


class RunCheckpoints:
    def resume(self, checkpoint: Path) -> None:
        """Restore model, optimizer, LR schedule, RNG states and stream position."""
        accelerator = self.accelerator
        try:
            if self.fsdp:
                # The main process reads the files (its verdict shared, so no process waits
                # in a collective for one that has failed) and sends each process its shard.
                read: list = []
                run_on_main(
                    accelerator,
                    lambda: read.append(
                        _read_sharded_state(checkpoint, self.denoiser, self.family.denoiser)
                    ),
                )
                denoiser_state, optimizer_state = read[0] if read else ({}, {})
                load_full_model_state(self.denoiser, denoiser_state)
                load_full_optimizer_state(self.denoiser, self.optimizer, optimizer_state)
            else:
                load_trained_models(
                    checkpoint, **self._trained_models_spec(), device=accelerator.device
                )
            load_training_state(
                checkpoint, self.state, rank=accelerator.process_index, with_optimizer=not self.fsdp
            )
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            # Files that verify against their manifest but do not fit this run (another
            # model's weights, a hand-edited state): the input's fault, not a bug.
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise UserError(
                f"cannot resume from {checkpoint}: {reason}; resume from another checkpoint"
            ) from None
        self._apply_config_after_resume()
        logger.info("resumed from %s at step %d", checkpoint, self.progress.step)

    def _apply_config_after_resume(self) -> None:
        """Hyperparameters come from this run's config, not the checkpoint's.

        Loading restores the optimizer's and the EMA's settings as they were saved; a key
        the user was allowed to change (`--allow-config-change`), or `train.max_steps`, must
        win. When nothing changed, every number set here is the one already there.
        """
        train_cfg = self.cfg.train
        for group in self.optimizer.param_groups:
            group.update(
                betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                eps=train_cfg.adam_epsilon,
                weight_decay=train_cfg.adam_weight_decay,
                initial_lr=train_cfg.learning_rate,
            )
        if self.ema is not None:
            ema_cfg = self.cfg.ema
            self.ema.decay = ema_cfg.decay
            self.ema.use_ema_warmup = ema_cfg.warmup
            self.ema.inv_gamma = ema_cfg.inv_gamma
            self.ema.power = ema_cfg.power
        # The schedule is a function of the config (peak rate, max_steps): set this step's
        # rate from the current one.
        scheduler = self.lr_scheduler
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            scheduler.base_lrs = [train_cfg.learning_rate] * len(scheduler.base_lrs)
            rates = [
                base * factor(scheduler.last_epoch)
                for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
            ]
            for group, rate in zip(self.optimizer.param_groups, rates, strict=True):
                group["lr"] = rate
            scheduler._last_lr = rates

    def _maybe_checkpoint(self, force: bool = False) -> bool:
        every = self.cfg.checkpointing.every_steps
        if not force and not (every and self.progress.step % every == 0):
            return False
        gathered = None
        if self.fsdp:  # every process takes part in gathering; the main one writes
            gathered = (
                plain_copy(self.denoiser),
                full_optimizer_state(self.denoiser, self.optimizer),
            )
        uploads = self.hub_uploads()  # main process with train.push_to_hub, else None
        if uploads is not None:
            uploads.before_checkpoint(self.cfg.checkpointing.total_limit)
        path = save_checkpoint(
            self.accelerator, self.output_dir, self.progress.step,
            total_limit=self.cfg.checkpointing.total_limit,
            write_main=lambda folder: self._write_checkpoint_files(folder, gathered),
        )  # fmt: skip
        logger.info("saved %s", path)
        if uploads is not None:
            uploads.push_checkpoint(path)  # in the background (hub.push_checkpoints)
        return True

    def _trained_models_spec(self, denoiser=None) -> dict[str, object]:
        if denoiser is None:
            denoiser = self.accelerator.unwrap_model(self.denoiser)
        return {
            "family": self.family,
            "denoiser": denoiser,
            "text_encoders": self.trained_text_encoders,
            "lora": self.cfg.lora.enabled,
            "ema": self.ema,
        }

    def _write_checkpoint_files(self, folder: Path, gathered: tuple | None = None) -> None:
        """`gathered`: a sharded run's (whole denoiser, whole optimizer state), main process."""
        denoiser, optimizer_state = gathered if gathered is not None else (None, None)
        save_trained_models(folder, **self._trained_models_spec(denoiser))
        save_main_state(
            folder, self.state, num_processes=self.accelerator.num_processes,
            optimizer_state=optimizer_state,
        )  # fmt: skip
        dump_config(self.cfg, folder / "config.yaml")

    def _stop_for_signal(self, signum: int, checkpointed: bool) -> None:
        if not checkpointed:
            self._maybe_checkpoint(force=True)
        path = self.output_dir / f"checkpoint-{self.progress.step}"
        raise TrainingInterrupted(
            signum,
            f"{signal.Signals(signum).name} received: stopped after step {self.progress.step} "
            f"with checkpoint {path}; continue with --resume-from-checkpoint latest",
        )
