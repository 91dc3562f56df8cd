"""Random-weight components shared by the families' tiny builtins (`build_tiny`).

Sizes are the smallest that keep each family's structure: the VAE downsamples by 8 (64 px
images are 8x8 latents, like SD's tiny model), CLIP encoders of width 32 use the local CLIP
tokenizer, and T5 encoders the local T5 tokenizer. Each builder seeds torch itself, so a
component's weights depend only on the seed it is given.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from difftrain.models.tokenizer import save_clip_tokenizer


def clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        save_clip_tokenizer(Path(tmp), max_length=max_length)
        return CLIPTokenizer.from_pretrained(tmp)


def clip_text_encoder(tokenizer, seed: int, *, hidden_size: int = 32, projection: bool = False,
                      projection_dim: int | None = None):  # fmt: skip
    """A 2-layer CLIP text encoder; `projection` makes a CLIPTextModelWithProjection (pooled
    `text_embeds` of `projection_dim`, as SDXL's and SD3's second encoders)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_encoder(tokenizer, seed: int, *, d_model: int = 32):
    """A 2-layer T5 encoder for the local T5 tokenizer."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=8,
            d_ff=d_model * 2,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def vae(seed: int, *, latent_channels: int = 4, shift_factor: float | None = None,
        scaling_factor: float = 0.18215):  # fmt: skip
    """A 4-level AutoencoderKL (downsamples by 8). SD3 / Flux VAEs have a `shift_factor`."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    channels = (8, 8, 16, 16)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
        use_quant_conv=shift_factor is None,
        use_post_quant_conv=shift_factor is None,
    )
