"""A diffusers `AutoencoderKL` state dict in the original (CompVis LDM) layout.

    ldm = vae_to_original(vae_state_dict, vae_config)   # keys without first_stage_model.

The original encoder counts its levels `down.N.block.M`, the decoder its `up.N` from the
bottom (diffusers' `up_blocks.0` is the original `up.{last}`); the mid-block attention is
made of 1x1 convolutions where diffusers has linear layers. The inverse of
`convert_ldm_vae_checkpoint` in diffusers' `single_file_utils.py`. SD3's and Flux's VAEs
(no quant convolutions) have the same layout.
"""

from __future__ import annotations

from typing import Any

from difftrain.models.single_file.mapping import LayoutError, Rule, apply_rules

RESNET_LAYERS = {"conv_shortcut": "nin_shortcut"}
ATTENTION_LAYERS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v"}


def conv_1x1(tensor):
    return tensor[:, :, None, None] if tensor.ndim == 2 else tensor


def vae_to_original(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    return apply_rules(state, vae_rules(config), "vae")


def vae_rules(config: dict[str, Any]) -> list[Rule]:
    levels = len(config.get("down_block_types") or ())
    if not levels or len(config.get("up_block_types") or ()) != levels:
        raise LayoutError("vae: its encoder and decoder differ in depth")
    per_level = config.get("layers_per_block", 1)
    rules = [
        Rule("quant_conv.", "quant_conv."),
        Rule("post_quant_conv.", "post_quant_conv."),
    ]
    for side in ("encoder", "decoder"):
        rules += [
            Rule(f"{side}.conv_in.", f"{side}.conv_in."),
            Rule(f"{side}.conv_out.", f"{side}.conv_out."),
            Rule(f"{side}.conv_norm_out.", f"{side}.norm_out."),
            Rule(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", RESNET_LAYERS),
            Rule(f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", RESNET_LAYERS),
            Rule(
                f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", ATTENTION_LAYERS, conv_1x1
            ),
            Rule(
                f"{side}.mid_block.attentions.0.to_out.0.",
                f"{side}.mid.attn_1.proj_out.",
                reshape=conv_1x1,
            ),
        ]
    for level in range(levels):
        down, up = f"encoder.down.{level}", f"decoder.up.{levels - 1 - level}"
        for layer in range(per_level + 1):  # the decoder has one more resnet per level
            rules.append(
                Rule(
                    f"encoder.down_blocks.{level}.resnets.{layer}.",
                    f"{down}.block.{layer}.",
                    RESNET_LAYERS,
                )
            )
            rules.append(
                Rule(
                    f"decoder.up_blocks.{level}.resnets.{layer}.",
                    f"{up}.block.{layer}.",
                    RESNET_LAYERS,
                )
            )
        rules.append(
            Rule(f"encoder.down_blocks.{level}.downsamplers.0.conv.", f"{down}.downsample.conv.")
        )
        rules.append(Rule(f"decoder.up_blocks.{level}.upsamplers.0.conv.", f"{up}.upsample.conv."))
    return rules
