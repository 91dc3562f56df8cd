"""A diffusers `UNet2DConditionModel` state dict in the original (CompVis LDM / SGM) layout.

    ldm = unet_to_original(unet_state_dict, unet_config)   # keys without model.diffusion_model.

The original UNet numbers its blocks flat: `input_blocks.N` are conv_in, then per level its
`layers_per_block` (resnet, transformer) pairs and a downsampler; `output_blocks.N` per level
`layers_per_block + 1` pairs, the level's upsampler appended to its last one; `middle_block`
is resnet, transformer, resnet. Transformer blocks keep their diffusers names (the original
`SpatialTransformer` has the same ones); resnets rename their layers. This is the inverse of
`convert_ldm_unet_checkpoint` in diffusers' `single_file_utils.py`, which reads the file
back with the folder's config.
"""

from __future__ import annotations

from typing import Any

from difftrain.models.single_file.mapping import LayoutError, Rule, apply_rules

RESNET_LAYERS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


def unet_to_original(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Every tensor of `state` under its original name; refuses (LayoutError) a UNet the
    original layout, or diffusers' reader of it, cannot hold."""
    return apply_rules(state, unet_rules(config), "unet")


def unet_rules(config: dict[str, Any]) -> list[Rule]:
    check_unet_config(config)
    per_level = config["layers_per_block"]
    levels = len(config["down_block_types"])
    rules = [
        Rule("time_embedding.linear_1.", "time_embed.0."),
        Rule("time_embedding.linear_2.", "time_embed.2."),
        Rule("conv_in.", "input_blocks.0.0."),
        Rule("conv_norm_out.", "out.0."),
        Rule("conv_out.", "out.2."),
        # SDXL's pooled-text + size conditioning is the original `label_emb`.
        Rule("add_embedding.linear_1.", "label_emb.0.0."),
        Rule("add_embedding.linear_2.", "label_emb.0.2."),
        Rule("mid_block.resnets.0.", "middle_block.0.", RESNET_LAYERS),
        Rule("mid_block.attentions.0.", "middle_block.1."),
        Rule("mid_block.resnets.1.", "middle_block.2.", RESNET_LAYERS),
    ]
    for level in range(levels):
        first = 1 + level * (per_level + 1)  # input_blocks.0 is conv_in
        for layer in range(per_level):
            block = f"input_blocks.{first + layer}"
            rules.append(
                Rule(f"down_blocks.{level}.resnets.{layer}.", f"{block}.0.", RESNET_LAYERS)
            )
            rules.append(Rule(f"down_blocks.{level}.attentions.{layer}.", f"{block}.1."))
        rules.append(
            Rule(
                f"down_blocks.{level}.downsamplers.0.conv.",
                f"input_blocks.{first + per_level}.0.op.",
            )
        )
    for level, kind in enumerate(config["up_block_types"]):
        first = level * (per_level + 1)
        for layer in range(per_level + 1):
            block = f"output_blocks.{first + layer}"
            rules.append(Rule(f"up_blocks.{level}.resnets.{layer}.", f"{block}.0.", RESNET_LAYERS))
            rules.append(Rule(f"up_blocks.{level}.attentions.{layer}.", f"{block}.1."))
        # The upsampler follows the last layer's resnet, and its transformer when it has one.
        slot = 2 if kind.startswith("CrossAttn") else 1
        rules.append(
            Rule(
                f"up_blocks.{level}.upsamplers.0.conv.",
                f"output_blocks.{first + per_level}.{slot}.conv.",
            )
        )
    return rules


def check_unet_config(config: dict[str, Any]) -> None:
    """The UNet shapes the original layout (and diffusers' reader of it) can express."""
    per_level = config.get("layers_per_block")
    if not isinstance(per_level, int):
        raise LayoutError(f"unet: layers_per_block {per_level!r} differs per level")
    down, up = config.get("down_block_types") or (), config.get("up_block_types") or ()
    if not down or any(kind not in DOWN_BLOCKS for kind in down):
        raise LayoutError(f"unet: down blocks {list(down)} (the layout has {DOWN_BLOCKS})")
    if len(up) != len(down) or any(kind not in UP_BLOCKS for kind in up):
        raise LayoutError(f"unet: up blocks {list(up)} (the layout has {UP_BLOCKS})")
    mid = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid != "UNetMidBlock2DCrossAttn":
        raise LayoutError(f"unet: mid block {mid} (the layout has UNetMidBlock2DCrossAttn)")
    if config.get("class_embed_type") is not None:
        raise LayoutError(f"unet: class embedding {config['class_embed_type']!r}")
    if config.get("addition_embed_type") not in (None, "text_time"):
        raise LayoutError(f"unet: addition embedding {config['addition_embed_type']!r}")
