"""A diffusers `SD3Transformer2DModel` state dict in Stability AI's MMDiT layout (SD3, SD3.5).

    mmdit = sd3_to_original(transformer_state_dict, transformer_config)

Each joint block is an `x_block` (the image stream) and a `context_block` (the text stream),
each with one fused `qkv` projection; SD3.5's second image attention (`attn2`, MMDiT-X) and
RMS QK-norms (`ln_q` / `ln_k`) sit beside them. The last block's text stream only modulates
(no output projection, no MLP), and its modulation, like the final layer's, is split
(shift, scale) where diffusers splits (scale, shift). The inverse of
`convert_sd3_transformer_checkpoint_to_diffusers` in diffusers' `single_file_utils.py`.
"""

from __future__ import annotations

from typing import Any

from difftrain.models.single_file.mapping import Rule, apply_rules, fuse, swap_halves


def sd3_to_original(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    state = dict(state)
    layers = config["num_layers"]
    fused, rules = (
        {},
        [
            Rule("pos_embed.pos_embed", "pos_embed"),
            Rule("pos_embed.proj.", "x_embedder.proj."),
            Rule("time_text_embed.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
            Rule("time_text_embed.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
            Rule("time_text_embed.text_embedder.linear_1.", "y_embedder.mlp.0."),
            Rule("time_text_embed.text_embedder.linear_2.", "y_embedder.mlp.2."),
            Rule("context_embedder.", "context_embedder."),
            Rule("proj_out.", "final_layer.linear."),
        ],
    )
    for kind in ("weight", "bias"):
        fused[f"final_layer.adaLN_modulation.1.{kind}"] = swap_halves(
            fuse(state, [f"norm_out.linear.{kind}"], "transformer")
        )
    for i in range(layers):
        ours, x, c = (
            f"transformer_blocks.{i}.",
            f"joint_blocks.{i}.x_block.",
            f"joint_blocks.{i}.context_block.",
        )
        for kind in ("weight", "bias"):
            fused[f"{x}attn.qkv.{kind}"] = fuse(
                state, [f"{ours}attn.to_{p}.{kind}" for p in "qkv"], "transformer"
            )
            fused[f"{c}attn.qkv.{kind}"] = fuse(
                state, [f"{ours}attn.add_{p}_proj.{kind}" for p in "qkv"], "transformer"
            )
            if f"{ours}attn2.to_q.{kind}" in state:
                fused[f"{x}attn2.qkv.{kind}"] = fuse(
                    state, [f"{ours}attn2.to_{p}.{kind}" for p in "qkv"], "transformer"
                )
            if i == layers - 1:  # the text stream's last modulation is a final-layer norm
                fused[f"{c}adaLN_modulation.1.{kind}"] = swap_halves(
                    fuse(state, [f"{ours}norm1_context.linear.{kind}"], "transformer")
                )
        rules += [
            Rule(f"{ours}attn.norm_q.", f"{x}attn.ln_q."),
            Rule(f"{ours}attn.norm_k.", f"{x}attn.ln_k."),
            Rule(f"{ours}attn.norm_added_q.", f"{c}attn.ln_q."),
            Rule(f"{ours}attn.norm_added_k.", f"{c}attn.ln_k."),
            Rule(f"{ours}attn.to_out.0.", f"{x}attn.proj."),
            Rule(f"{ours}attn.to_add_out.", f"{c}attn.proj."),
            Rule(f"{ours}attn2.norm_q.", f"{x}attn2.ln_q."),
            Rule(f"{ours}attn2.norm_k.", f"{x}attn2.ln_k."),
            Rule(f"{ours}attn2.to_out.0.", f"{x}attn2.proj."),
            Rule(f"{ours}norm1.linear.", f"{x}adaLN_modulation.1."),
            Rule(f"{ours}norm1_context.linear.", f"{c}adaLN_modulation.1."),
            Rule(f"{ours}ff.net.0.proj.", f"{x}mlp.fc1."),
            Rule(f"{ours}ff.net.2.", f"{x}mlp.fc2."),
            Rule(f"{ours}ff_context.net.0.proj.", f"{c}mlp.fc1."),
            Rule(f"{ours}ff_context.net.2.", f"{c}mlp.fc2."),
        ]
    return {**apply_rules(state, rules, "transformer"), **fused}
