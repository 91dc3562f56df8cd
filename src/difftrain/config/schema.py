"""The config schema: one small keyword-only dataclass per section.

Each field carries its default and, where a value can be impossible, a check. The docstring
under each field is the documentation users read (the README's "Config" table sums it
up). Unknown keys,
wrong types and impossible values are rejected by `difftrain.config.loader`, which names the
dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from difftrain.config.checks import (
    _at_least_one,
    _checked,
    _folder_name,
    _multiple_of_8,
    _non_negative,
    _positive,
    _probability,
    _seed,
    _timesteps,
)

LRScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]


@dataclass(kw_only=True)
class ModelConfig:
    pretrained: str = "builtin:tiny"
    """Hub id (`org/name`), a local diffusers folder, a single-file checkpoint
    (`model.safetensors` in the original SD / SDXL layout, as ComfyUI and A1111 use), or
    `builtin:tiny` / `builtin:small` (random-weight models built locally, for tests and the
    quick start)."""

    single_file_config: str | None = None
    """For a single-file `pretrained`: the diffusers folder or hub id whose configs, tokenizers
    and scheduler describe it (e.g. stabilityai/stable-diffusion-xl-base-1.0); a local folder
    works offline. Null lets diffusers infer it from the checkpoint (needs the Hub)."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) to load; ignored for local folders."""

    family: Literal["sd", "sdxl", "sd3", "flux"] | None = None
    """Model family; null reads it from the pipeline's model_index.json `_class_name`
    (StableDiffusionPipeline: sd, StableDiffusionXLPipeline: sdxl, StableDiffusion3Pipeline:
    sd3, FluxPipeline: flux). Set it for a pipeline of another class with the same layout."""

    vae: str | None = None
    """Another VAE to train and save with (an AutoencoderKL folder or hub id), e.g. SDXL's
    fp16-fix VAE; null keeps the pipeline's own."""

    vae_dtype: Literal["fp32", "fp16", "bf16"] | None = None
    """Precision the (frozen) VAE runs in; null follows train.mixed_precision, except for a
    VAE whose config says `force_upcast` (SDXL's own, which overflows in fp16): fp32."""

    drop_t5: bool = False
    """SD3: leave the T5 text encoder out (much less memory); its share of the conditioning
    is zeros, as in SD3 pipelines without text_encoder_3, and the saved pipeline has none."""

    max_sequence_length: int | None = _checked(None, _positive, maximum=4096)
    """T5 tokens per caption (SD3 default 256, Flux 512); null uses the family's default."""


@dataclass(kw_only=True)
class SourceConfig:
    """One of several training sources (`data.sources`), each with its own repeats."""

    train_dir: str | None = None
    dataset: str | None = None
    shards: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    repeats: int = _checked(1, _positive)
    """Each image of this source appears this many times per epoch (kohya's concept
    folders: balance a small source against a large one)."""


@dataclass(kw_only=True)
class DataConfig:
    train_dir: str | None = None
    """Image folder: images plus `metadata.jsonl` (Hugging Face ImageFolder), or `x.png` with
    `x.txt` caption files. Relative paths resolve against the current working folder. One of
    train_dir, dataset and shards is required."""

    dataset: str | None = None
    """A Hugging Face `datasets` dataset instead: a hub id, or a folder written by
    `save_to_disk` (its `train` split), with `image_column` and `caption_column`."""

    image_column: str = "image"
    """Column of `dataset` that holds the images."""

    sources: list[SourceConfig] = field(default_factory=list)
    """Several sources instead of one: a list of {train_dir | dataset | shards, repeats,
    image_column, caption_column}; their examples (each repeated `repeats` times) form one
    dataset."""

    shards: str | None = None
    """WebDataset tar shards instead, as a brace pattern (`data/shard-{000..099}.tar`): each
    sample is `key.<image>` plus `key.txt` or `key.json` (`caption_column`). Shards are read
    in place, never unpacked; they must be local (or mounted) files."""

    caption_column: str = "text"
    """Column of `metadata.jsonl` that holds the caption."""

    resolution: int = _checked(512, _multiple_of_8, maximum=8192)
    """Training images are resized (shorter side) and cropped to this square size (at most
    8192; Flux needs a multiple of 16, its latents are packed 2x2)."""

    center_crop: bool = False
    """Crop the centre; otherwise a random crop (reproducible from `train.seed`)."""

    random_flip: bool = False
    """Flip images horizontally with probability 0.5 (reproducible from `train.seed`)."""

    num_workers: int = _checked(0, _non_negative)
    """Data-loader worker processes; 0 loads in the training process."""

    caption_dropout: float = _checked(0.0, _probability)
    """Probability of training on an empty caption instead (teaches the unconditional
    prediction that classifier-free guidance needs); reproducible from `train.seed`."""

    buckets: bool = False
    """Aspect-ratio buckets: each image trains at about resolution² pixels in the bucket shape
    nearest its own (sides multiples of the family's size step), cropped as center_crop says,
    and every batch comes from one bucket. The run writes OUTPUT_DIR/buckets.json."""

    bucket_max_ratio: float = _checked(2.0, _at_least_one)
    """Longest bucket side over the shorter one (1.0 is square only)."""

    cache_latents: bool = False
    """Cache each sample's VAE posterior (mean and std, so the latent sample stays the run's
    own draw) and stop decoding and encoding its image every step. An entry is keyed by the
    image file's content, the crop, flip and size, the VAE's weights and dtype: an edited
    image, a new resolution or another VAE never reuses an old entry. Needs
    data.center_crop: true (a random crop would need one entry per crop)."""

    cache_text_embeddings: bool = False
    """Cache the text encoders' outputs per caption (keyed by the token ids, the encoders'
    weights and dtype); not while a text encoder trains."""

    cache_dir: str | None = None
    """Where cache entries live, shared by runs; null is $DIFFTRAIN_CACHE/latents
    (~/.cache/difftrain/latents). Safe to delete at any time (`difftrain cache clear`)."""

    shuffle_tags: bool = False
    """Shuffle a caption's comma-separated tags every time it is drawn (tag-style captions),
    after the first `keep_tokens`; reproducible from `train.seed`."""

    keep_tokens: int = _checked(0, _non_negative)
    """Leading tags that `shuffle_tags` and `tag_dropout` leave in place (e.g. a trigger)."""

    tag_dropout: float = _checked(0.0, _probability)
    """Probability of leaving out each tag after the first `keep_tokens`."""

    on_bad_image: Literal["error", "skip"] = "error"
    """A corrupt or truncated image stops the run (`error`), or is left out and listed in
    `OUTPUT_DIR/skipped_images.txt` (`skip`; every image is then decoded once up front)."""


@dataclass(kw_only=True)
class TrainConfig:
    output_dir: str = _checked("outputs/run", _folder_name)
    """Where the run writes everything; `--output-dir` overrides it."""

    seed: int = _checked(0, _seed, maximum=2**32 - 1)
    """Seeds model noise, timesteps, data order and augmentation."""

    max_steps: int = _checked(100, _positive)
    """Number of optimizer steps (each sees batch_size x gradient_accumulation_steps images)."""

    batch_size: int = _checked(1, _positive)
    """Images per forward pass."""

    gradient_accumulation_steps: int = _checked(1, _positive)
    """Forward passes whose gradients are summed into one optimizer step."""

    optimizer: Literal["adamw", "adamw_8bit", "prodigy"] = "adamw"
    """`adamw` (torch's AdamW, with its fused kernel where torch has one), `adamw_8bit`
    (bitsandbytes' 8-bit AdamW, a quarter of the state memory: `pip install bitsandbytes`) or
    `prodigy` (Prodigy, which estimates the learning rate itself: `pip install prodigyopt`, and
    set `learning_rate: 1.0`). All three take the adam_* keys."""

    learning_rate: float = _checked(1e-5, _positive)
    """Peak learning rate; for prodigy, a factor on the rate it estimates (1.0 is usual)."""

    lr_scheduler: LRScheduler = "constant"
    """Learning-rate schedule after warmup (diffusers' `get_scheduler` names)."""

    lr_warmup_steps: int = _checked(0, _non_negative)
    """Optimizer steps of linear warmup from 0 to `learning_rate`."""

    adam_beta1: float = _checked(0.9, _probability)
    adam_beta2: float = _checked(0.999, _probability)
    adam_weight_decay: float = _checked(1e-2, _non_negative)
    adam_epsilon: float = _checked(1e-8, _positive)

    max_grad_norm: float = _checked(1.0, _non_negative)
    """Clip the gradient norm to this value; 0 turns clipping off."""

    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision through accelerate; trained weights stay fp32."""

    allow_tf32: bool = False
    """Let Ampere+ GPUs use TF32 for fp32 matmuls and convolutions (faster, ~10 mantissa bits)."""

    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass: less memory, about 20-30% slower."""

    compile: bool = False
    """Compile the denoiser's forward with torch.compile (in place: checkpoints keep their keys).
    The compile happens in the first step (minutes on a CPU); the CPU needs a C++ compiler."""

    fsdp: bool = False
    """Shard a full fine-tune's UNet weights, gradients and optimizer state over the processes
    with FSDP2 (on several processes; not with LoRA or EMA). Checkpoints and the final pipeline
    are gathered into the ordinary formats. See docs/distributed.md."""

    use_8bit_adam: bool = False
    """Deprecated: true is `optimizer: adamw_8bit` (refused beside another optimizer)."""

    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """Train for this parameterisation instead of the scheduler's own; the saved pipeline's
    scheduler is switched with it, so inference matches."""

    timestep_sampling: Literal["uniform", "logit_normal", "mode"] | None = None
    """Flow-matching families (sd3, flux): how training sigmas are drawn (diffusers'
    `compute_density_for_timestep_sampling`); null is each family's default in diffusers'
    scripts: logit_normal for sd3 (as SD3's paper), uniform for flux."""

    logit_mean: float | None = None
    """Mean of the logit-normal timestep density (null: 0.0)."""

    logit_std: float | None = _checked(None, _positive)
    """Standard deviation of the logit-normal timestep density (null: 1.0)."""

    mode_scale: float | None = None
    """Scale of the `mode` timestep density (null: 1.29)."""

    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] | None = None
    """Flow-matching families: per-sample loss weight from the sigma (diffusers'
    `compute_loss_weighting_for_sd3`); null is none."""

    guidance_scale: float | None = _checked(None, _non_negative)
    """Flux: the guidance value fed to a guidance-distilled transformer (Flux.1-dev) while
    training; null is 3.5 (as diffusers' Flux scripts). Unused by a transformer without a
    guidance input."""

    snr_gamma: float | None = _checked(None, _positive)
    """Min-SNR loss weighting (Hang et al., 2023) with this gamma (5.0 is usual); null is off."""

    noise_offset: float = _checked(0.0, _non_negative)
    """Add this much per-channel constant noise (helps very dark / bright images); 0 is off."""

    input_perturbation: float = _checked(0.0, _non_negative)
    """Perturb the noise that makes the model input by this factor (Ning et al., 2023); 0 is off."""

    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Also send metrics to TensorBoard (OUTPUT_DIR/logs/) or Weights & Biases;
    metrics.jsonl is always written."""

    push_to_hub: bool = False
    """Upload the final pipeline or LoRA, the model card and the last sample grid to
    `hub.repo_id` with huggingface_hub when the run ends."""

    deterministic: bool = False
    """Seed everything and force deterministic kernels: two runs give identical weights."""

    resume_from_checkpoint: str | None = None
    """`latest` (the newest complete checkpoint in the output folder, or a fresh start when
    there is none) or the path of a `checkpoint-N` folder; `--resume-from-checkpoint` sets it."""

    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss stops the run (`stop`, keeping the last good checkpoint), or its update
    is dropped (`skip`) and counted in metrics.jsonl."""

    max_nonfinite_steps: int = _checked(5, _positive)
    """With `on_nonfinite: skip`, stop after this many non-finite steps in a row."""


@dataclass(kw_only=True)
class CheckpointingConfig:
    every_steps: int = _checked(500, _non_negative)
    """Write `OUTPUT_DIR/checkpoint-N` every N optimizer steps; 0 turns checkpoints off."""

    total_limit: int | None = _checked(None, _positive)
    """Keep at most this many checkpoints (the oldest go first); null keeps all."""


@dataclass(kw_only=True)
class ValidationConfig:
    prompts: list[str] = field(default_factory=list)
    """Prompts rendered into `OUTPUT_DIR/samples/step-N.png`; empty turns sampling off."""

    every_steps: int = _checked(0, _non_negative)
    """Render the prompts every N optimizer steps (and at the end); 0 renders at the end only."""

    seed: int = _checked(0, _seed, maximum=2**32 - 1)
    """Seed of the sampling noise (and of the validation-loss noise), so results are
    comparable across steps and runs."""

    num_inference_steps: int = _checked(20, _positive, maximum=1000)
    """Denoising steps per validation image (at most 1000, the usual training timesteps)."""
    guidance_scale: float | None = _checked(None, _non_negative)
    """Guidance of the validation images (Flux: its distilled-guidance input); null uses the
    pipeline's own default (SD 7.5, SDXL 5, SD3 7, Flux 3.5)."""

    loss_every_steps: int = _checked(0, _non_negative)
    """Every N steps, a validation loss on `loss_dir` at fixed timesteps and fixed noise, so it
    is comparable across steps and runs (logged as `val_loss`); 0 turns it off."""

    loss_dir: str | None = None
    """Held-out image folder (same layouts as data.train_dir) for the validation loss."""

    loss_timesteps: list[int] = field(
        default_factory=lambda: [100, 300, 500, 700, 900], metadata={"check": _timesteps}
    )
    """Timesteps at which every held-out image is scored."""


@dataclass(kw_only=True)
class LoraConfig:
    enabled: bool = False
    """Train low-rank adapters (peft) instead of the whole UNet."""

    rank: int = _checked(4, _positive, maximum=1024)
    alpha: float = _checked(4.0, _positive)
    """Scale of the adapter output is alpha / rank."""

    dropout: float = _checked(0.0, _probability)

    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet modules that get adapters (the attention projections by default)."""

    train_text_encoder: bool = False
    """Also put adapters on the text encoder's attention projections and train them."""

    export_formats: list[Literal["diffusers", "kohya"]] = field(
        default_factory=lambda: ["diffusers"]
    )
    """LoRA files the run writes: `diffusers` (pytorch_lora_weights.safetensors, for
    `load_lora_weights`) and/or `kohya` (pytorch_lora_weights_kohya.safetensors, the key
    format ComfyUI and AUTOMATIC1111 load, with kohya's ss_* metadata); SD 1.x/2.x and SDXL."""


@dataclass(kw_only=True)
class EmaConfig:
    enabled: bool = False
    """Keep an exponential moving average of the UNet weights (saved as `unet_ema/`)."""

    decay: float = _checked(0.9999, _probability)
    """Upper bound of the EMA decay."""

    update_every: int = _checked(1, _positive)
    """Update the average every N optimizer steps."""

    warmup: bool = True
    """diffusers' power schedule: decay = 1 - (1 + step / inv_gamma) ** -power, capped by
    `decay`; false uses diffusers' default (1 + step) / (10 + step), also capped."""

    inv_gamma: float = _checked(1.0, _positive)
    power: float = _checked(2 / 3, _positive)

    use_for_final: bool = True
    """Save the EMA weights (not the raw ones) as the final UNet; validation images use them."""


@dataclass(kw_only=True)
class HubConfig:
    repo_id: str | None = None
    """Hugging Face Hub repository (`user/name`) that `train.push_to_hub` uploads to; it is
    created if missing. The token comes from `HF_TOKEN` or `hf auth login`, never the config."""

    private: bool = True
    """Create the repository as private (an existing one keeps its visibility)."""

    push_checkpoints: bool = False
    """Also upload each checkpoint-N folder as it is written (under checkpoints/)."""


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    hub: HubConfig = field(default_factory=HubConfig)
