"""A validation loss that can be compared across steps and runs.

Every held-out image is scored at the same timesteps with the same noise each time: the VAE
latent is its distribution's mean (no sampling), and the noise for (image i, timestep t) comes
from a generator seeded with (validation.seed, i, t). So the number moves only when the model
does.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from difftrain.config import Config
from difftrain.data.dataset import CaptionedImageDataset
from difftrain.data.folder import scan_image_folder
from difftrain.data.sampler import SampleKey
from difftrain.diffusion import add_noise, training_target
from difftrain.errors import UserError
from difftrain.models.latents import encode_latents
from difftrain.seeds import generator as seeded_generator
from difftrain.training.modes import eval_mode


class ValidationLoss:
    """The held-out loss; with several processes each scores its share of the images
    (`partial_sums`) and the trainer adds the shares up."""

    def __init__(
        self,
        cfg: Config,
        components,
        device: torch.device,
        weight_dtype: torch.dtype,
        *,
        rank: int = 0,
        world_size: int = 1,
    ):
        validation = cfg.validation
        num_timesteps = components.noise_scheduler.config.num_train_timesteps
        if max(validation.loss_timesteps) >= num_timesteps:
            raise UserError(
                f"validation.loss_timesteps: {validation.loss_timesteps} must be below "
                f"{num_timesteps}, the scheduler's number of training timesteps"
            )
        examples = scan_image_folder(validation.loss_dir, cfg.data.caption_column)
        # Held-out images are seen as they are: centre crop, no flip, their real caption.
        data_cfg = replace(cfg.data, center_crop=True, random_flip=False, caption_dropout=0.0)
        dataset = CaptionedImageDataset(examples, components.tokenizer, data_cfg)
        # Image i is scored by process i % world_size; it keeps its index (and so its noise).
        self.indices = list(range(rank, len(dataset), world_size))
        self.items = [dataset[SampleKey(i, 0)] for i in self.indices]
        self.timesteps = validation.loss_timesteps
        self.seed = validation.seed
        self.components = components
        self.device = device
        self.weight_dtype = weight_dtype
        self._latents: list[torch.Tensor] | None = None

    def latents(self) -> list[torch.Tensor]:
        """The held-out latents, encoded once: the VAE never trains."""
        if self._latents is None:
            self._latents = [
                encode_latents(
                    self.components.vae,
                    item["pixel_values"][None].to(self.device, dtype=self.weight_dtype),
                )
                for item in self.items
            ]
        return self._latents

    def __call__(self, unet, prediction_type: str, alphas_cumprod: torch.Tensor) -> float:
        """The mean loss over this process's images (all of them on one process)."""
        total, count = self.partial_sums(unet, prediction_type, alphas_cumprod)
        return total / count

    @torch.no_grad()
    def partial_sums(
        self, unet, prediction_type: str, alphas_cumprod: torch.Tensor
    ) -> tuple[float, int]:
        """(sum of losses, number of (image, timestep) pairs) over this process's images."""
        # The unwrapped encoder: a DDP wrapper's forward is a collective, and processes with no
        # held-out images would never join it.
        text_encoder = getattr(self.components.text_encoder, "module", self.components.text_encoder)
        total, count = 0.0, 0
        pairs = zip(self.indices, self.items, self.latents(), strict=True)
        with eval_mode(unet, text_encoder):
            for index, item, latents in pairs:
                # Encoded each time: a text encoder trained with LoRA changes between calls.
                embeddings = text_encoder(item["input_ids"][None].to(self.device))[0]
                for t in self.timesteps:
                    generator = seeded_generator(self.seed, "validation-loss", index, t)
                    noise = torch.randn(latents.shape, generator=generator).to(self.device)
                    timesteps = torch.tensor([t], device=self.device)
                    noisy = add_noise(latents, noise, alphas_cumprod, timesteps)
                    target = training_target(
                        prediction_type, latents, noise, alphas_cumprod, timesteps
                    )
                    prediction = unet(noisy, timesteps, embeddings, return_dict=False)[0]
                    total += torch.mean((prediction.float() - target.float()) ** 2).item()
                    count += 1
        return total, count
