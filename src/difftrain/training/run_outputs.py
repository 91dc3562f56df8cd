"""A training run's outputs: validation grids, the final pipeline or LoRA, the model card.

A mixin of `TrainingRun` (training/trainer.py), kept apart so the loop reads in one screen;
it uses the run's accelerator, models, EMA and config.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from difftrain.errors import StorageFull
from difftrain.io import storage_failure
from difftrain.training.checkpoint import list_checkpoints
from difftrain.training.sharding import plain_copy

logger = logging.getLogger("difftrain")


class RunOutputs:
    def whole_denoiser(self):
        """The denoiser with all its weights, for sampling and saving: a sharded run gathers
        it (a collective: call on every process; None except on the main one)."""
        if not self.fsdp:
            return self.accelerator.unwrap_model(self.denoiser)
        copy = plain_copy(self.denoiser)
        return copy.to(self.device) if copy is not None else None

    def _maybe_validate(self) -> None:
        validation, step = self.cfg.validation, self.progress.step
        due = step == self.cfg.train.max_steps or (
            validation.every_steps and step % validation.every_steps == 0
        )
        if not (validation.prompts and due):
            return
        denoiser = self.whole_denoiser() if self.fsdp else None  # gathered by every process
        if self.accelerator.is_main_process:
            from difftrain.training.encoder_residency import encoders_loaded

            with encoders_loaded(self.components):
                self._save_grid(denoiser, step)

    def _save_grid(self, denoiser, step: int) -> None:
        from difftrain.training.outputs import save_validation_grid

        unwrap = self.accelerator.unwrap_model
        denoiser = denoiser if denoiser is not None else unwrap(self.denoiser)
        parts = {
            name: unwrap(part) if isinstance(part, torch.nn.Module) else part
            for name, part in self.components.parts.items()
        }
        with self.final_weights(denoiser):
            path = save_validation_grid(self.components, parts, denoiser, self.cfg, step)
        self.last_grid = path
        logger.info("saved validation samples %s", path)
        self.tracker.log_image("samples", path, step)

    @contextmanager
    def final_weights(self, denoiser) -> Iterator[None]:
        """Within the block, `denoiser` holds the weights the run will publish (EMA when
        used)."""
        if self.ema is None or not self.cfg.ema.use_for_final:
            yield
            return
        self.ema.store(denoiser.parameters())
        self.ema.copy_to(denoiser.parameters())
        try:
            yield
        finally:
            self.ema.restore(denoiser.parameters())

    def write_model_card(self, losses: list[float]) -> None:
        from difftrain.training.model_card import write_model_card

        cfg = self.cfg
        base = cfg.model.pretrained
        if base.startswith("builtin:"):
            base = self.components.source  # a folder diffusers can load, unlike "builtin:tiny"
        settings = {
            "model family": f"{self.family.name} ({self.family.pipeline_class})",
            "training": "LoRA" if cfg.lora.enabled else f"full {self.family.denoiser}",
            "resolution": cfg.data.resolution,
            "max_steps": cfg.train.max_steps,
            "batch size x accumulation": (
                f"{cfg.train.batch_size} x {cfg.train.gradient_accumulation_steps}"
            ),
            "learning rate": f"{cfg.train.learning_rate:g} ({cfg.train.lr_scheduler})",
            "mixed precision": cfg.train.mixed_precision,
            "prediction type": self.objective.prediction_type,
            "seed": cfg.train.seed,
        }
        if cfg.lora.enabled:
            settings["LoRA rank / alpha"] = f"{cfg.lora.rank} / {cfg.lora.alpha:g}"
        if cfg.ema.enabled:
            settings["EMA decay"] = cfg.ema.decay
        if cfg.train.snr_gamma is not None:
            settings["min-SNR gamma"] = cfg.train.snr_gamma
        write_model_card(
            self.output_dir,
            base_model=base,
            data_dir=cfg.data.train_dir
            or cfg.data.dataset
            or cfg.data.shards
            or ", ".join(s.train_dir or s.dataset or s.shards for s in cfg.data.sources),
            num_images=len(self.dataset),
            settings=settings,
            final_loss=losses[-1] if losses else None,
            steps=self.progress.step,
            lora=cfg.lora.enabled,
            pipeline_class=self.family.pipeline_class,
            dropped=self.family.dropped_parts(),
            sample_grid=self.last_grid,
            kohya="kohya" in cfg.lora.export_formats,
            single_file_config=cfg.model.single_file_config,
        )

    def gather_for_publish(self) -> None:
        """Every process: a sharded run gathers the whole denoiser for the main one to save."""
        if self.fsdp:
            self.final_denoiser = self.whole_denoiser()

    def publish(self, losses: list[float]) -> None:
        """The final pipeline (or LoRA weights) and the model card in OUTPUT_DIR.

        A failed write (a full disk) is one line naming the checkpoint that is still intact.
        """
        try:
            self._save_outputs()
            self.write_model_card(losses)
        except Exception as exc:
            reason = storage_failure(exc)
            if reason is None:
                raise
            checkpoints = list_checkpoints(self.output_dir)
            intact = (
                f"{checkpoints[-1][1].name} is intact, continue from it with "
                "--resume-from-checkpoint latest" if checkpoints else "no checkpoint was written"
            )  # fmt: skip
            raise StorageFull(
                f"could not write the trained model to {self.output_dir} ({reason}); "
                f"{intact} once you free space or fix permissions"
            ) from None
        uploads = self.hub_uploads()
        if uploads is not None:
            from difftrain.training.hub_upload import upload_patterns

            # Waited for by the trainer once every process is past its barrier.
            uploads.push_outputs(
                upload_patterns(self.output_dir, lora=self.cfg.lora.enabled,
                                last_grid=self.last_grid),
                self.progress.step,
            )  # fmt: skip

    def hub_uploads(self):
        """The run's HubUploads (main process, train.push_to_hub), made on first use."""
        if not (self.cfg.train.push_to_hub and self.accelerator.is_main_process):
            return None
        if getattr(self, "_hub_uploads", None) is None:
            from difftrain.training.hub_upload import HubUploads

            self._hub_uploads = HubUploads(
                self.cfg.hub, self.output_dir, peers_wait=self.accelerator.num_processes > 1
            )
        return self._hub_uploads

    def finish_uploads(self) -> None:
        """Main process: wait for every upload to the Hub; a failed final upload raises
        HubUploadFailed (one line, exit 2) with the command that uploads the outputs later."""
        uploads = getattr(self, "_hub_uploads", None)
        if uploads is not None:
            uploads.wait()

    def _save_outputs(self) -> None:
        """The final pipeline (full fine-tune) or adapter weights (LoRA) in OUTPUT_DIR."""
        denoiser = self.final_denoiser or self.accelerator.unwrap_model(self.denoiser)
        if self.cfg.lora.enabled:
            from difftrain.models.lora import save_lora_weights

            save_lora_weights(self.output_dir, self.family, denoiser, self.trained_text_encoders)
            if "kohya" in self.cfg.lora.export_formats:
                from difftrain.models.lora_kohya import kohya_metadata, save_kohya_lora

                metadata = kohya_metadata(
                    self.cfg, self.family, denoiser, steps=self.progress.step,
                    num_images=len(self.dataset), prediction_type=self.objective.prediction_type,
                    num_processes=self.accelerator.num_processes,
                )  # fmt: skip
                save_kohya_lora(
                    self.output_dir, self.family, denoiser, self.trained_text_encoders, metadata
                )
            return
        from difftrain.training.outputs import save_final_pipeline

        with self.final_weights(denoiser):
            save_final_pipeline(self.components, denoiser, self.output_dir)
