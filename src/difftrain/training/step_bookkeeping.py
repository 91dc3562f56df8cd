"""What happens around each optimizer step: a non-finite loss stopped or skipped, the held-out
validation loss when due, the step's metrics record and log line.

A mixin of `TrainingRun` (training/trainer.py), kept apart so the loop reads in one screen;
it uses the run's config, progress, tracker, accelerator and validation loss.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from difftrain.errors import TrainingStopped
from difftrain.training.compile import note_compile_time
from difftrain.training.distributed import sum_over_processes

logger = logging.getLogger("difftrain")


@dataclass
class StepResult:
    loss: float
    lr: float
    grad_norm: float | None
    skipped: bool


class StepBookkeeping:
    def _on_nonfinite(self, loss: float) -> None:
        cfg, progress = self.cfg.train, self.progress
        step = progress.step + 1
        progress.nonfinite_in_a_row += 1
        progress.nonfinite_total += 1
        if cfg.on_nonfinite == "stop":
            raise TrainingStopped(
                f"non-finite loss ({loss}) at step {step}; no weights were saved from this "
                "step; lower train.learning_rate or check the data (or set "
                "train.on_nonfinite: skip)"
            )
        if progress.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
            raise TrainingStopped(
                f"{progress.nonfinite_in_a_row} non-finite losses in a row, the last at step "
                f"{step} (train.max_nonfinite_steps); lower train.learning_rate or check the data"
            )
        logger.warning("non-finite loss (%s) at step %d: update skipped", loss, step)

    def _maybe_validation_loss(self) -> float | None:
        every = self.cfg.validation.loss_every_steps
        if self.validation_loss is None or self.progress.step % every:
            return None
        # Sharded: the denoiser is gathered and the main process scores every image; otherwise
        # each process scores its share.
        denoiser = self.whole_denoiser()
        total, count = 0.0, 0
        if denoiser is not None:
            with self.accelerator.autocast():
                total, count = self.validation_loss.partial_sums(denoiser)
        # Add the shares up.
        total, count = sum_over_processes(self.accelerator, total, count)
        return total / count

    def _log_step(
        self, result: StepResult, val_loss: float | None, step_started: float, started: float
    ) -> None:
        step, loss, lr = self.progress.step, result.loss, result.lr
        record = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "epoch": self.progress.samples_seen / len(self.dataset),
            "skipped": result.skipped,
            "nonfinite_total": self.progress.nonfinite_total,
            "step_time_s": round(time.perf_counter() - step_started, 6),
            "elapsed_s": round(time.perf_counter() - started, 3),
        }
        if val_loss is not None:
            record["val_loss"] = val_loss
        note_compile_time(record)  # the first step compiles (train.compile)
        self.tracker.log(record)
        line = f"step {step}/{self.cfg.train.max_steps} loss {loss:.6f} lr {lr:.3e}"
        line += f" val_loss {val_loss:.6f}" if val_loss is not None else ""
        logger.info(line, extra={"per_step": True})
