"""A validation loss that can be compared across steps and runs.

Every held-out image is scored at the same timesteps with the same noise each time: the VAE
latent is its distribution's mean (no sampling), and the noise for (image i, timestep t) comes
from a generator seeded with (validation.seed, i, t). So the number moves only when the model
does.
"""

from __future__ import annotations

import torch

from difftrain.config import Config
from difftrain.data.dataset import CaptionedImageDataset
from difftrain.data.folder import scan_image_folder
from difftrain.data.sampler import SampleKey
from difftrain.diffusion import add_noise, training_target


class ValidationLoss:
    def __init__(self, cfg: Config, components, device: torch.device, weight_dtype: torch.dtype):
        validation = cfg.validation
        examples = scan_image_folder(validation.loss_dir, cfg.data.caption_column)
        # Held-out images are seen as they are: centre crop, no flip, their real caption.
        data_cfg = cfg.data.__class__(
            **{**vars(cfg.data), "center_crop": True, "random_flip": False, "caption_dropout": 0.0}
        )
        dataset = CaptionedImageDataset(examples, components.tokenizer, data_cfg)
        self.items = [dataset[SampleKey(i, 0)] for i in range(len(dataset))]
        self.timesteps = validation.loss_timesteps
        self.seed = validation.seed
        self.components = components
        self.device = device
        self.weight_dtype = weight_dtype

    @torch.no_grad()
    def __call__(self, unet, prediction_type: str, alphas_cumprod: torch.Tensor) -> float:
        vae, text_encoder = self.components.vae, self.components.text_encoder
        was_training = unet.training
        unet.eval()
        total, count = 0.0, 0
        try:
            for index, item in enumerate(self.items):
                pixels = item["pixel_values"][None].to(self.device, dtype=self.weight_dtype)
                latents = vae.encode(pixels).latent_dist.mean
                shift = getattr(vae.config, "shift_factor", None) or 0.0
                latents = ((latents - shift) * vae.config.scaling_factor).float()
                embeddings = text_encoder(item["input_ids"][None].to(self.device))[0]
                for t in self.timesteps:
                    generator = torch.Generator().manual_seed(
                        (self.seed * 1_000_003 + index) * 10_007 + t
                    )
                    noise = torch.randn(latents.shape, generator=generator).to(self.device)
                    timesteps = torch.tensor([t], device=self.device)
                    noisy = add_noise(latents, noise, alphas_cumprod, timesteps)
                    target = training_target(
                        prediction_type, latents, noise, alphas_cumprod, timesteps
                    )
                    prediction = unet(noisy, timesteps, embeddings, return_dict=False)[0]
                    total += torch.mean((prediction.float() - target.float()) ** 2).item()
                    count += 1
        finally:
            unet.train(was_training)
        return total / count
