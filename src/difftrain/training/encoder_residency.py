"""The VAE and text encoders out of memory while the cache answers for them.

With `data.cache_latents` and `data.cache_text_embeddings` both on (and no text encoder
training), a step reads every input from the cache: the encoders are dead weight, gigabytes for
SDXL's. They are released before the first step (so the optimizer's state takes their place and
the peak drops by their size) and loaded back, placed as before, only for what needs them:
a cache miss, a validation grid, the validation loss. After a miss they stay loaded until a step
needs them no more (a cold cache misses on most steps of its first epoch).

The cache keys were computed from their weights before the release, and a reload reads the same
files, so nothing a run computes changes (tested: the same losses as a run that keeps them).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger("difftrain")


class EncoderResidency:
    def __init__(self, parts: dict[str, Any], names: list[str], reload: Callable[[], dict]):
        self.parts = parts
        """The run's components (PipelineComponents.parts), edited in place."""
        self.names = names
        self.reload = reload
        """() -> {name: model}, loaded and placed as the run placed them."""
        self.needed_this_step = False
        self.reloads = 0

    @property
    def released(self) -> bool:
        return self.names[0] not in self.parts

    def release(self) -> None:
        for name in self.names:
            self.parts.pop(name, None)
        gc.collect()  # the models may sit in reference cycles; free their memory now

    @contextmanager
    def loaded(self, *, keep: bool = False) -> Iterator[None]:
        """The encoders in `parts` within the block; with `keep`, until the step ends."""
        was_released = self.released
        if was_released:
            self.parts.update(self.reload())
            self.reloads += 1
        try:
            yield
        finally:
            if keep:
                self.needed_this_step = True
            elif was_released:
                self.release()

    def step_done(self) -> None:
        """Release the encoders again once a whole step went without them."""
        if not self.released and not self.needed_this_step:
            self.release()
            logger.info("every input of the last step was cached: VAE and text encoders released")
        self.needed_this_step = False


def step_done(components) -> None:
    if components.residency is not None:
        components.residency.step_done()


@contextmanager
def encoders_loaded(components, *, keep: bool = False) -> Iterator[None]:
    """`components`' VAE and text encoders present within the block (a no-op unless released)."""
    residency = getattr(components, "residency", None)
    if residency is None:
        yield
        return
    with residency.loaded(keep=keep):
        yield
