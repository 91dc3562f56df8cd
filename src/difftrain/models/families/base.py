"""The interface every model family implements, with what most families share.

A family knows its pipeline's layout (which components exist and what they are called), how
captions become the denoiser's conditioning, how the denoiser is called, and which objective
trains it. Everything else in difftrain (the loop, checkpoints, validation, outputs, LoRA)
works from these answers and never names a family.

Components are held in one dict keyed by the pipeline's own component names (`unet`,
`transformer`, `text_encoder_2`, ...), so saving and sampling pass them to the diffusers
pipeline class as they are.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

from difftrain.errors import UserError

CLIP_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
"""Attention projections of a CLIP text encoder, where text-encoder LoRA adapters go."""


@dataclass(frozen=True, kw_only=True)
class FamilyOptions:
    """The run's settings a family's encoding and denoiser call depend on."""

    max_sequence_length: int | None = None
    """T5 tokens per caption (families with a T5 encoder); None: the family's default."""

    drop_t5: bool = False
    """SD3 without its T5 encoder: its part of the conditioning is zeros."""

    guidance_scale: float | None = None
    """Flux's distilled-guidance input; None: the family's default."""


class ModelFamily:
    """One pipeline layout. Subclasses set the class attributes and the three methods that
    differ between families: `encode_prompts`, `predict` and `build_tiny`."""

    name: ClassVar[str]
    title: ClassVar[str]
    """The family's name in messages ("Stable Diffusion XL")."""
    pipeline_class: ClassVar[str]
    """The diffusers pipeline class that saves and samples this family."""

    denoiser: ClassVar[str] = "unet"
    """Component name of the network that trains (`unet` or `transformer`)."""

    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    """In pipeline order; `text_encoders[i]` reads the ids of `tokenizers[i]`."""

    lora_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    """Text encoders that take LoRA adapters with `lora.train_text_encoder` (those diffusers'
    LoRA format for this pipeline covers)."""

    flow_matching: ClassVar[bool] = False
    """Trained with the rectified-flow objective (velocity target, sigmas); otherwise DDPM."""

    uses_t5: ClassVar[bool] = False
    default_max_sequence_length: ClassVar[int] = 77
    max_t5_tokens: ClassVar[int] = 512
    """The longest T5 prompt the family's pipeline takes (diffusers refuses more)."""
    can_drop_t5: ClassVar[bool] = False
    takes_guidance: ClassVar[bool] = False
    """The denoiser may have a distilled-guidance input (`train.guidance_scale`)."""
    default_timestep_sampling: ClassVar[str] = "uniform"
    """Flow families: `train.timestep_sampling` when unset (as diffusers' own script)."""
    size_step: ClassVar[int] = 8
    """Image sides must be multiples of this (the VAE's 8, times a 2x2 patch where latents
    are packed): what aspect-ratio bucket sides are made of."""
    packed_channels: ClassVar[int] = 1
    """Latent channels per denoiser input channel (Flux packs 2x2 patches: 4)."""

    def __init__(self, options: FamilyOptions | None = None):
        self.options = options or FamilyOptions()

    # --- layout -------------------------------------------------------------------------------

    def dropped_parts(self) -> tuple[str, ...]:
        """Components this run leaves out (never loaded, None in the saved pipeline)."""
        return ()

    def parts_to_load(self) -> tuple[str, ...]:
        dropped = self.dropped_parts()
        names = (*self.tokenizers, *self.text_encoders, "vae", self.denoiser)
        return tuple(name for name in names if name not in dropped)

    def required_parts(self) -> tuple[str, ...]:
        """Component folders a pipeline of this family must have (the scheduler included)."""
        return (*self.parts_to_load(), "scheduler")

    def weight_parts(self) -> tuple[str, ...]:
        return tuple(name for name in self.parts_to_load() if name not in self.tokenizers)

    def max_sequence_length(self) -> int:
        return self.options.max_sequence_length or self.default_max_sequence_length

    # --- data -> conditioning -----------------------------------------------------------------

    def tokenize(self, parts: dict[str, Any], caption: str) -> dict[str, Any]:
        """One caption's token ids for every tokenizer, as `tokens.<tokenizer name>`."""
        ids = {}
        for name in self.tokenizers:
            if name in self.dropped_parts():
                continue
            tokenizer = parts[name]
            length = self.max_sequence_length() if self._is_t5(name) else tokenizer.model_max_length
            ids[f"tokens.{name}"] = tokenizer(
                caption,
                max_length=length,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            ).input_ids[0]
        return ids

    def _is_t5(self, tokenizer_name: str) -> bool:
        return self.uses_t5 and tokenizer_name == self.tokenizers[-1]

    def encode_prompts(self, parts: dict[str, Any], batch: dict[str, Any], device) -> dict:
        """The denoiser's text conditioning for a batch (tensors on `device`).

        Every tensor has the batch on dim 0, one row per caption, so a sample's rows can be
        cached and batches assembled from them; what is the same for every sample (Flux's
        text ids) is made in `predict`.
        """
        raise NotImplementedError

    def predict(self, denoiser, noisy, timesteps, conditioning: dict, batch: dict):
        """The denoiser's output for `noisy` latents (B, C, H, W), in the latents' layout."""
        raise NotImplementedError

    # --- outputs --------------------------------------------------------------------------------

    def pipeline_type(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def sampling_pipeline(self, parts: dict[str, Any], denoiser, scheduler):
        """A pipeline over the live components (no copies): what validation grids sample."""
        cls = self.pipeline_type()
        given = {**parts, self.denoiser: denoiser, "scheduler": scheduler}
        kwargs = {}
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if name == "self" or parameter.kind is not parameter.POSITIONAL_OR_KEYWORD:
                continue
            if name in given:
                kwargs[name] = given[name]
            elif parameter.default is inspect.Parameter.empty:
                kwargs[name] = None  # a component this run left out (SD3's T5)
        kwargs.update(self.sampling_settings())
        pipeline = cls(**kwargs)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def sampling_call_settings(self) -> dict[str, Any]:
        """Pipeline call arguments that follow the run: the T5 prompt length it trained with."""
        return {"max_sequence_length": self.max_sequence_length()} if self.uses_t5 else {}

    def sampling_settings(self) -> dict[str, Any]:
        """Non-component arguments of the pipeline class (safety checker off, ...)."""
        return {}

    def shard_units(self, denoiser) -> list:
        """The denoiser's blocks that FSDP shards one by one (the whole model comes last)."""
        raise NotImplementedError

    # --- config ---------------------------------------------------------------------------------

    def check_config(self, cfg) -> None:
        """Refuse options that do not apply to this family (rather than ignore them)."""
        train, model = cfg.train, cfg.model
        where = f"model family {self.name}"
        if self.flow_matching:
            for key in ("snr_gamma", "prediction_type"):
                if getattr(train, key) is not None:
                    raise UserError(
                        f"train.{key}: does not apply to {where} (flow matching has no noise "
                        "schedule to weight or reparameterise); remove it, or use "
                        "train.loss_weighting"
                    )
            if train.input_perturbation:
                raise UserError(
                    f"train.input_perturbation: applies to DDPM families only, not {where}; "
                    "remove it"
                )
            sampling = train.timestep_sampling or self.default_timestep_sampling
            for key, used_by in (("logit_mean", "logit_normal"), ("logit_std", "logit_normal"),
                                 ("mode_scale", "mode")):  # fmt: skip
                if getattr(train, key) is not None and sampling != used_by:
                    raise UserError(
                        f"train.{key}: is a parameter of train.timestep_sampling: {used_by}, "
                        f"and this run samples {sampling}; remove it or set the sampling"
                    )
        else:
            for key in (
                "timestep_sampling", "loss_weighting", "logit_mean", "logit_std", "mode_scale"
            ):  # fmt: skip
                if getattr(train, key) is not None:
                    raise UserError(
                        f"train.{key}: applies to flow-matching families (sd3, flux) only, not "
                        f"{where}; remove it"
                    )
        if train.guidance_scale is not None and not self.takes_guidance:
            raise UserError(
                f"train.guidance_scale: is Flux's distilled-guidance input and does not apply "
                f"to {where}; remove it"
            )
        if model.drop_t5 and not self.can_drop_t5:
            raise UserError(f"model.drop_t5: applies to sd3 only, not {where}; remove it")
        length = model.max_sequence_length
        if length is not None and not self.uses_t5:
            raise UserError(
                f"model.max_sequence_length: sets the T5 prompt length and {where} has no T5 "
                "encoder; remove it"
            )
        if length is not None and length > self.max_t5_tokens:
            # The family's pipeline refuses longer prompts: the model could not be sampled.
            raise UserError(
                f"model.max_sequence_length: {length} is more than the {self.max_t5_tokens} "
                f"T5 tokens the {self.pipeline_class} takes; use at most {self.max_t5_tokens}"
            )
        if cfg.lora.train_text_encoder and not self.lora_text_encoders:
            raise UserError(
                f"lora.train_text_encoder: {where} has no text encoder that takes LoRA "
                "adapters; remove it"
            )

    # --- tiny builtin ---------------------------------------------------------------------------

    @classmethod
    def build_tiny(cls, seed: int = 0):
        """A pipeline of this family with random weights from `seed`, built without download."""
        raise NotImplementedError


def penultimate_clip(encoder, ids, *, with_pooled: bool) -> tuple[Any, Any]:
    """A CLIP encoder's penultimate hidden states (what SDXL / SD3 condition on) and its
    pooled output: `text_embeds` of a projection model, `pooler_output` otherwise."""
    output = encoder(ids, output_hidden_states=True)
    hidden = output.hidden_states[-2]
    if not with_pooled:
        return hidden, None
    pooled = getattr(output, "text_embeds", None)
    return hidden, pooled if pooled is not None else output.pooler_output
