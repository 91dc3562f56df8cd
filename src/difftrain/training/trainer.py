"""The training loop: build every component from its slice of the config, train, save.

Run it with `difftrain train --config CONFIG.yaml` (or `scripts/train_text_to_image.py`).
Randomness that shapes a step (latent sampling, noise, timesteps) comes from one CPU
generator owned by the run and saved in every checkpoint; data order and augmentation come
from the sampler's (seed, position). So a run is reproducible on any device, and a resume
can continue the exact stream.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from difftrain.config import Config, dump_config
from difftrain.data.dataset import CaptionedImageDataset, build_dataloader
from difftrain.data.folder import scan_image_folder
from difftrain.diffusion import add_noise, sample_timesteps, training_target
from difftrain.errors import TrainingStopped, UserError
from difftrain.models.loading import PipelineComponents, load_components, resolve_pretrained
from difftrain.training.checkpoint import register_unet_hooks, save_checkpoint
from difftrain.training.determinism import configure_determinism, seed_everything
from difftrain.training.metrics import MetricsLog, NullMetrics
from difftrain.training.optim import build_lr_scheduler, build_optimizer
from difftrain.training.run_dir import prepare_output_dir, write_run_description

logger = logging.getLogger("difftrain")


@dataclass
class TrainingProgress:
    """What a checkpoint needs beyond model and optimizer to continue the exact run."""

    step: int = 0
    samples_seen: int = 0
    """Position in the sample stream (all processes together)."""
    generator: torch.Generator = field(default_factory=torch.Generator)

    def state_dict(self) -> dict[str, object]:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.generator.set_state(state["generator"])


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float]


def train(cfg: Config, *, overwrite: bool = False) -> TrainResult:
    """Fine-tune the UNet of `cfg.model.pretrained` on `cfg.data` and write the outputs."""
    from accelerate import Accelerator

    output_dir = Path(cfg.train.output_dir)
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    # Check what the user gave (data, model source) before touching the output folder.
    examples = scan_image_folder(cfg.data.train_dir, cfg.data.caption_column)
    resolve_pretrained(cfg.model.pretrained)

    configure_determinism(cfg.train.deterministic)
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
    )
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, cfg, overwrite=overwrite, training=True)
    accelerator.wait_for_everyone()
    log_handler = _log_to_file(output_dir / "logs" / "train.log", accelerator.is_main_process)
    metrics = (
        MetricsLog(output_dir / "metrics.jsonl") if accelerator.is_main_process else NullMetrics()
    )
    try:
        if accelerator.is_main_process:
            write_run_description(output_dir, cfg)
        seed_everything(cfg.train.seed)
        components = load_components(cfg.model)
        losses = _train_loop(cfg, accelerator, components, examples, metrics)
        if accelerator.is_main_process:
            from difftrain.training.outputs import save_final_pipeline

            save_final_pipeline(components, accelerator.unwrap_model(components.unet), output_dir)
            logger.info("saved the trained pipeline to %s", output_dir)
        accelerator.wait_for_everyone()
        return TrainResult(output_dir=output_dir, steps=len(losses), losses=losses)
    finally:
        metrics.close()
        _release(accelerator)
        if log_handler is not None:
            logging.getLogger("difftrain").removeHandler(log_handler)
            log_handler.close()


def _train_loop(cfg, accelerator, components: PipelineComponents, examples, metrics) -> list[float]:
    train_cfg = cfg.train
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    # Frozen parts run in the compute precision; the UNet keeps fp32 master weights.
    for frozen in (components.vae, components.text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
        # Cast only when needed: diffusers warns about any dtype cast of its models.
        frozen.to(device) if frozen.dtype == weight_dtype else frozen.to(device, dtype=weight_dtype)
    unet = components.unet
    unet.train()

    dataset = CaptionedImageDataset(examples, components.tokenizer, cfg.data)
    progress = TrainingProgress(generator=torch.Generator().manual_seed(train_cfg.seed))
    optimizer = build_optimizer(train_cfg, unet.parameters())
    lr_scheduler = build_lr_scheduler(train_cfg, optimizer)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    components.unet = unet
    register_unet_hooks(accelerator, type(accelerator.unwrap_model(unet)))
    accelerator.register_for_checkpointing(lr_scheduler, progress)

    loader = build_dataloader(
        dataset,
        batch_size=train_cfg.batch_size,
        seed=train_cfg.seed,
        start_position=progress.samples_seen,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    scheduler_config = components.noise_scheduler.config
    alphas_cumprod = components.noise_scheduler.alphas_cumprod.to(device)
    prediction_type = scheduler_config.prediction_type
    logger.info(
        "training %d steps on %d images (%s, %s prediction, batch %d x %d accumulation, %s)",
        train_cfg.max_steps,
        len(dataset),
        components.source,
        prediction_type,
        train_cfg.batch_size,
        train_cfg.gradient_accumulation_steps,
        device,
    )

    losses: list[float] = []
    batches = iter(loader)
    started = time.perf_counter()
    while progress.step < train_cfg.max_steps:
        step_started = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for _ in range(train_cfg.gradient_accumulation_steps):
            batch = next(batches)
            progress.samples_seen += train_cfg.batch_size * accelerator.num_processes
            with accelerator.accumulate(unet):
                loss = diffusion_loss(
                    batch,
                    components,
                    unet,
                    progress.generator,
                    alphas_cumprod=alphas_cumprod,
                    prediction_type=prediction_type,
                    weight_dtype=weight_dtype,
                )
                step_loss += loss.detach() / train_cfg.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    step_loss = accelerator.reduce(step_loss, reduction="mean")
                    if not torch.isfinite(step_loss):
                        # Stop before the update: no NaN ever reaches the weights or a file.
                        raise TrainingStopped(
                            f"non-finite loss ({step_loss.item()}) at step {progress.step + 1}; "
                            "no weights were saved from this step; lower train.learning_rate "
                            "or check the data"
                        )
                    grad_norm = None
                    if train_cfg.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(
                            unet.parameters(), train_cfg.max_grad_norm
                        )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        lr = lr_scheduler.get_last_lr()[0]
        lr_scheduler.step()
        progress.step += 1

        loss_value = step_loss.item()
        losses.append(loss_value)
        record = {
            "step": progress.step,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "epoch": progress.samples_seen / len(dataset),
            "step_time_s": round(time.perf_counter() - step_started, 6),
            "elapsed_s": round(time.perf_counter() - started, 3),
        }
        metrics.log(record)
        logger.info(
            "step %d/%d loss %.6f lr %.3e", progress.step, train_cfg.max_steps, loss_value, lr
        )

        every = cfg.checkpointing.every_steps
        if every and progress.step % every == 0:
            path = save_checkpoint(
                accelerator,
                Path(train_cfg.output_dir),
                progress.step,
                total_limit=cfg.checkpointing.total_limit,
                write_extra=lambda folder: dump_config(cfg, folder / "config.yaml"),
            )
            logger.info("saved %s", path)
        if accelerator.is_main_process and _validation_due(cfg, progress.step):
            from difftrain.training.outputs import save_validation_grid

            path = save_validation_grid(
                components, accelerator.unwrap_model(unet), cfg, progress.step
            )
            logger.info("saved validation samples %s", path)
    return losses


def diffusion_loss(
    batch: dict[str, torch.Tensor],
    components: PipelineComponents,
    unet: torch.nn.Module,
    generator: torch.Generator,
    *,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    weight_dtype: torch.dtype,
) -> torch.Tensor:
    """The noise-prediction loss of one batch (latents and text embeddings made on the fly)."""
    device = alphas_cumprod.device
    vae = components.vae
    with torch.no_grad():
        pixels = batch["pixel_values"].to(device, dtype=weight_dtype, non_blocking=True)
        latents = vae.encode(pixels).latent_dist.sample(generator=generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = ((latents - shift) * vae.config.scaling_factor).float()
        text_embeddings = components.text_encoder(batch["input_ids"].to(device), return_dict=False)[
            0
        ]

    # Drawn on the CPU generator, then moved: the same numbers on every device.
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = sample_timesteps(latents.shape[0], len(alphas_cumprod), generator).to(device)
    noisy = add_noise(latents, noise, alphas_cumprod, timesteps)
    target = training_target(prediction_type, latents, noise, alphas_cumprod, timesteps)
    prediction = unet(noisy, timesteps, text_embeddings, return_dict=False)[0]
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def _release(accelerator) -> None:
    accelerator.end_training()
    if accelerator.num_processes == 1:
        # accelerate keeps its state process-wide and refuses a second Accelerator with other
        # settings; a later train() in this process (a notebook, the tests) may need them.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()


def _validation_due(cfg: Config, step: int) -> bool:
    if not cfg.validation.prompts:
        return False
    every = cfg.validation.every_steps
    return step == cfg.train.max_steps or bool(every and step % every == 0)


def _log_to_file(path: Path, enabled: bool) -> logging.Handler | None:
    """Send the `difftrain` logger to `path` (main process only) and to stderr."""
    root = logging.getLogger("difftrain")
    root.setLevel(logging.INFO)
    if not any(getattr(h, "_difftrain_console", False) for h in root.handlers):
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        console._difftrain_console = True
        root.addHandler(console)
    if not enabled:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    return handler
