"""Model families: one module per pipeline layout, all behind `ModelFamily` (base.py).

The training loop, checkpoints, validation and outputs call the family's methods and never
name one. A family is picked from the pipeline's `model_index.json` `_class_name`, or from
`model.family`. This registry is plain data (no torch import), so the pre-flight checks and
`difftrain --help` stay fast; a family's module is imported when it is first used.

Adding a family: write `families/<name>.py` with a `FAMILY` class derived from `ModelFamily`,
and list it here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from difftrain.models.families.base import ModelFamily

PIPELINE_CLASSES: dict[str, str] = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
"""Family name -> the diffusers pipeline class it trains (and saves)."""

FAMILY_NAMES = tuple(PIPELINE_CLASSES)


def family_for_class(class_name: str) -> str | None:
    """The family that trains pipelines of `class_name`, or None."""
    for name, pipeline_class in PIPELINE_CLASSES.items():
        if pipeline_class == class_name:
            return name
    return None


def family_class(name: str) -> type[ModelFamily]:
    """The `ModelFamily` subclass of family `name` (one of FAMILY_NAMES)."""
    return importlib.import_module(f"difftrain.models.families.{name}").FAMILY
