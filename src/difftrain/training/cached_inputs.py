"""The denoiser's inputs from the latent and text-embedding cache (`data.cache_latents`,
`data.cache_text_embeddings`), computed and stored on a miss.

A latent entry holds the VAE posterior's mean and std (the run still draws the latent sample
from its own seeded generator), keyed by the image file's content, the crop, flip and size,
the VAE's weights and dtype (`LatentKeys`). A text entry holds one caption's conditioning
tensors, keyed by its token ids, the family, the text encoders' weights and dtype. So a key
names everything its tensors depend on: an edited image, another resolution or crop, a
different VAE or encoder never meets an old entry. A miss is computed the way an uncached
step computes it (the same pixels, one batch of the misses), so a cached run trains on what
an uncached run would.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from difftrain.data.cache import TensorCache, default_cache_dir, entry_key, weights_hash
from difftrain.data.dataset import LatentKeys
from difftrain.models.latents import LatentPosterior, encode_posterior
from difftrain.training.encoder_residency import encoders_loaded

logger = logging.getLogger("difftrain")


def build_input_cache(cfg, components) -> InputCache | None:
    """The run's cache of denoiser inputs, or None when `data` caches nothing."""
    data = cfg.data
    if not (data.cache_latents or data.cache_text_embeddings):
        return None
    return InputCache(cfg, components, latents=data.cache_latents, text=data.cache_text_embeddings)


class InputCache:
    def __init__(self, cfg, components, *, latents: bool, text: bool):
        root = cfg.data.cache_dir
        self.cache = TensorCache(Path(root).expanduser() if root else default_cache_dir())
        self.components = components
        self.latents, self.text = latents, text
        self.dataset = None
        """Set by the run: makes a missing latent's pixels."""
        self.counts = {"latent": [0, 0], "text": [0, 0]}
        """kind -> [entries read, entries computed]."""
        self.latent_keys = None
        if latents:
            vae = components.vae
            # The latents are in the denoiser's units: the VAE's shift and scale count too.
            factors = f"scale={vae.config.scaling_factor!r},shift={vae.config.shift_factor!r}"
            self.latent_keys = LatentKeys(f"{weights_hash(vae)};{factors}", str(vae.dtype))
        self._text_identity = {}
        if text:
            encoders = components.text_encoders
            family = components.family
            denoiser = getattr(components.denoiser, "config", {})
            self._text_identity = {
                "family": family.name,
                # What shapes the conditioning besides the encoders: SD3's T5 length (zeros
                # without T5) and the width CLIP is padded to.
                "options": {
                    "max_sequence_length": family.max_sequence_length(),
                    "dropped": list(family.dropped_parts()),
                    "joint_attention_dim": getattr(denoiser, "joint_attention_dim", None),
                },
                "encoders": {name: weights_hash(model) for name, model in encoders.items()},
                "dtype": str(next(iter(encoders.values())).dtype),
            }

    def posterior(self, batch: dict) -> LatentPosterior:
        keys = batch["latent_key"]
        rows = [self.cache.get("latent", key) for key in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            with encoders_loaded(self.components, keep=True):
                rows = self._fill_latents(batch, keys, rows, missing)
        self._count("latent", len(keys), len(missing))
        device = self.components.device
        return LatentPosterior(
            mean=torch.stack([row["mean"] for row in rows]).to(device),
            std=torch.stack([row["std"] for row in rows]).to(device),
        )

    def _fill_latents(self, batch: dict, keys: list[str], rows: list, missing: list[int]):
        positions = [
            (int(batch["sample_index"][i]), int(batch["augment_seed"][i])) for i in missing
        ]
        pixels = torch.stack([self.dataset.pixels(*position) for position in positions])
        computed = self.store_latents([keys[i] for i in missing], pixels.to(self.components.device))
        for row, i in zip(computed, missing, strict=True):
            rows[i] = row
        return rows

    def store_latents(self, keys: list[str], pixels: torch.Tensor) -> list[dict]:
        """Encode `pixels` (one VAE batch) and store each row's posterior under its key."""
        computed = encode_posterior(self.components.vae, pixels)
        rows = []
        for j, key in enumerate(keys):
            rows.append({"mean": computed.mean[j].cpu(), "std": computed.std[j].cpu()})
            self.cache.put("latent", key, rows[-1])
        return rows

    def conditioning(self, batch: dict) -> dict:
        names = sorted(key for key in batch if key.startswith("tokens."))
        size = len(batch[names[0]])
        keys = [
            entry_key(
                "text",
                **self._text_identity,
                tokens={name: batch[name][i].tolist() for name in names},
            )  # fmt: skip
            for i in range(size)
        ]
        rows = [self.cache.get("text", key) for key in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        components = self.components
        if missing:
            picked = torch.tensor(missing)
            sub_batch = {name: batch[name][picked] for name in names}
            with torch.no_grad(), encoders_loaded(components, keep=True):
                computed = components.family.encode_prompts(
                    components.parts, sub_batch, components.device
                )
            for j, i in enumerate(missing):
                rows[i] = {name: value[j].cpu() for name, value in computed.items()}
                self.cache.put("text", keys[i], rows[i])
        self._count("text", size, len(missing))
        return {
            name: torch.stack([row[name] for row in rows]).to(components.device) for name in rows[0]
        }

    def _count(self, kind: str, read: int, computed: int) -> None:
        self.counts[kind][0] += read - computed
        self.counts[kind][1] += computed

    def summary(self) -> str:
        parts = [
            f"{kind} cache: {read} read, {computed} computed"
            for kind, (read, computed) in self.counts.items()
            if read or computed
        ]
        return f"{'; '.join(parts)} ({self.cache.root})"
