"""A validation loss that can be compared across steps and runs.

Every held-out image is scored at the same timesteps with the same noise each time: the VAE
latent is its distribution's mean (no sampling), and the noise for (image i, timestep t) comes
from a generator seeded with (validation.seed, i, t). So the number moves only when the model
does.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch.utils.data import default_collate

from difftrain.config import Config
from difftrain.data.dataset import CaptionedImageDataset
from difftrain.data.folder import scan_image_folder
from difftrain.data.sampler import SampleKey
from difftrain.errors import UserError
from difftrain.models.latents import encode_latents
from difftrain.seeds import generator as seeded_generator
from difftrain.training.encoder_residency import encoders_loaded
from difftrain.training.loss import SampleDraws, denoising_loss
from difftrain.training.modes import eval_mode


class ValidationLoss:
    """The held-out loss; with several processes each scores its share of the images
    (`partial_sums`) and the trainer adds the shares up."""

    def __init__(self, cfg: Config, components, objective, *, rank: int = 0, world_size: int = 1):
        validation = cfg.validation
        num_timesteps = objective.num_timesteps
        if max(validation.loss_timesteps) >= num_timesteps:
            raise UserError(
                f"validation.loss_timesteps: {validation.loss_timesteps} must be below "
                f"{num_timesteps}, the scheduler's number of training timesteps"
            )
        examples = scan_image_folder(validation.loss_dir, cfg.data.caption_column)
        # Held-out images are seen as they are: centre crop, no flip, their real caption.
        data_cfg = replace(
            cfg.data, center_crop=True, random_flip=False, caption_dropout=0.0,
            shuffle_tags=False, tag_dropout=0.0,
        )  # fmt: skip
        tokenize = partial(components.family.tokenize, components.tokenizers())
        dataset = CaptionedImageDataset(examples, tokenize, data_cfg)
        # Image i is scored by process i % world_size; it keeps its index (and so its noise).
        self.indices = list(range(rank, len(dataset), world_size))
        self.items = [default_collate([dataset[SampleKey(i, 0)]]) for i in self.indices]
        self.timesteps = validation.loss_timesteps
        self.seed = validation.seed
        self.components = components
        self.objective = objective
        self._latents: list[torch.Tensor] | None = None

    def latents(self) -> list[torch.Tensor]:
        """The held-out latents (each distribution's mean), encoded once: the VAE never
        trains."""
        if self._latents is None:
            vae, device = self.components.vae, self.components.device
            self._latents = [
                encode_latents(vae, item["pixel_values"].to(device)) for item in self.items
            ]
        return self._latents

    def __call__(self, denoiser) -> float:
        """The mean loss over this process's images (all of them on one process)."""
        total, count = self.partial_sums(denoiser)
        return total / count

    def partial_sums(self, denoiser) -> tuple[float, int]:
        """(sum of losses, number of (image, timestep) pairs) over this process's images."""
        with encoders_loaded(self.components):  # released while the cache answers for them
            return self._partial_sums(denoiser)

    @torch.no_grad()
    def _partial_sums(self, denoiser) -> tuple[float, int]:
        components, objective = self.components, self.objective
        device = components.device
        # The unwrapped encoders: a DDP wrapper's forward is a collective, and processes with
        # no held-out images would never join it.
        parts = {name: getattr(part, "module", part) for name, part in components.parts.items()}
        encoders = [parts[name] for name in components.family.text_encoders if name in parts]
        total, count = 0.0, 0
        pairs = zip(self.indices, self.items, self.latents(), strict=True)
        with eval_mode(denoiser, *encoders):
            for index, item, latents in pairs:
                # Encoded each time: a text encoder trained with LoRA changes between calls.
                conditioning = components.family.encode_prompts(parts, item, device)
                for t in self.timesteps:
                    generator = seeded_generator(self.seed, "validation-loss", index, t)
                    noise = torch.randn(latents.shape, generator=generator)
                    draws = SampleDraws(noise, noise, noise, objective.fixed_timestep(t))
                    # Unweighted: runs with different loss weightings stay comparable.
                    loss = denoising_loss(
                        components.family, denoiser, objective, latents, conditioning, draws,
                        item, weighted=False,
                    )  # fmt: skip
                    total += loss.item()
                    count += 1
        return total, count
