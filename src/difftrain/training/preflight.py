"""Everything checked before a run touches its output folder: data, model, checkpoint, options.

A refused run leaves the disk exactly as it was, so every check that can fail on the user's
input runs here, before the output folder is claimed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from difftrain.config import Config
from difftrain.data.buckets import Buckets, bucket_examples
from difftrain.data.folder import Example, drop_unreadable, scan_image_folder
from difftrain.data.sources import scan_sources
from difftrain.errors import UserError
from difftrain.models.families.base import ModelFamily
from difftrain.models.loading import model_family
from difftrain.models.lora_kohya import check_export_formats
from difftrain.models.single_file.source import check_single_file_options
from difftrain.training.hub_upload import check_hub_upload
from difftrain.training.resume import (
    check_resume_config,
    check_resume_steps,
    find_resume_checkpoint,
)
from difftrain.training.run_dir import check_output_dir
from difftrain.training.tracking import check_tracker_available


@dataclass
class CheckedInputs:
    examples: list[Example]
    skipped: list[tuple[Path, str]]
    """Unreadable images left out under `data.on_bad_image: skip`, with the reason."""
    checkpoint: Path | None
    """The checkpoint to resume from, verified; None for a fresh start."""
    family: ModelFamily
    """The model's family, with this run's options."""
    buckets: Buckets | None = None
    """With data.buckets: each image's aspect-ratio bucket."""


def check_inputs(
    cfg: Config,
    allow_config_change: tuple[str, ...] = (),
    *,
    overwrite: bool = False,
    num_processes: int = 1,
) -> CheckedInputs:
    """Check what the user gave; raise UserError on the first problem, writing nothing."""
    train_cfg = cfg.train
    skip_bad = cfg.data.on_bad_image == "skip"
    examples = scan_sources(cfg.data, check=not skip_bad)
    examples, skipped = drop_unreadable(examples) if skip_bad else (examples, [])
    check_single_file_options(cfg.model)
    family = model_family(cfg.model, train_cfg)
    family.check_config(cfg)
    check_export_formats(cfg.lora, family)
    buckets = None
    if cfg.data.buckets:
        block = train_cfg.batch_size * num_processes
        paths = [example.image_path for example in examples]
        buckets = bucket_examples(paths, cfg.data, family.size_step, block)
    check_tracker_available(train_cfg.report_to)
    check_hub_upload(train_cfg.push_to_hub, cfg.hub)
    if cfg.validation.loss_every_steps:
        scan_image_folder(cfg.validation.loss_dir, cfg.data.caption_column)
    output_dir = Path(train_cfg.output_dir)
    checkpoint = find_resume_checkpoint(train_cfg.resume_from_checkpoint, output_dir)
    if checkpoint is not None:
        check_resume_config(checkpoint, cfg, allow_config_change, num_processes=num_processes)
        check_resume_steps(checkpoint, train_cfg.max_steps)
    in_place = checkpoint is not None and checkpoint.parent == output_dir.resolve()
    check_output_dir(output_dir, cfg, overwrite=overwrite, training=True, resuming=in_place)
    return CheckedInputs(examples, skipped, checkpoint, family, buckets)


def check_precision(mixed_precision: str) -> None:
    """Before the Accelerator is built: it would refuse these with a traceback of its own."""
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on the CPU")
    if mixed_precision == "bf16" and torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            raise UserError("train.mixed_precision: this GPU has no bf16 support; use fp16 or no")
