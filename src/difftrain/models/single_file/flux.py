"""A diffusers `FluxTransformer2DModel` state dict in Black Forest Labs' layout (Flux.1).

    bfl = flux_to_original(transformer_state_dict)

Double blocks hold an image and a text stream (`img_*` / `txt_*`), each with one fused
`qkv` projection; a single block fuses its query, key, value and MLP-input projections into
one `linear1` (stacked in that order on dim 0) and its output projections into `linear2`.
QK-norm weights are called `scale`, and the final modulation is split (shift, scale) where
diffusers splits (scale, shift). The inverse of `convert_flux_transformer_checkpoint_to_diffusers`
in diffusers' `single_file_utils.py`.

That reader assumes Flux.1's width (3072, MLP ratio 4) when it splits `linear1`: it reads the
released models, not narrower ones such as the tiny builtin (whose file is still the same
layout, and what ComfyUI reads).
"""

from __future__ import annotations

import re
from typing import Any

from difftrain.models.single_file.mapping import Rule, apply_rules, fuse, swap_halves

BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def flux_to_original(state: dict[str, Any]) -> dict[str, Any]:
    state = dict(state)
    blocks = {"transformer_blocks": set(), "single_transformer_blocks": set()}
    for key in state:
        if match := BLOCK.match(key):
            blocks[match.group(1)].add(int(match.group(2)))
    fused, rules = (
        {},
        [
            Rule("time_text_embed.timestep_embedder.linear_1.", "time_in.in_layer."),
            Rule("time_text_embed.timestep_embedder.linear_2.", "time_in.out_layer."),
            Rule("time_text_embed.text_embedder.linear_1.", "vector_in.in_layer."),
            Rule("time_text_embed.text_embedder.linear_2.", "vector_in.out_layer."),
            Rule("time_text_embed.guidance_embedder.linear_1.", "guidance_in.in_layer."),
            Rule("time_text_embed.guidance_embedder.linear_2.", "guidance_in.out_layer."),
            Rule("context_embedder.", "txt_in."),
            Rule("x_embedder.", "img_in."),
            Rule("proj_out.", "final_layer.linear."),
        ],
    )
    scale = {"weight": "scale"}
    for kind in ("weight", "bias"):
        fused[f"final_layer.adaLN_modulation.1.{kind}"] = swap_halves(
            fuse(state, [f"norm_out.linear.{kind}"], "transformer")
        )
    for i in sorted(blocks["transformer_blocks"]):
        ours, theirs = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for kind in ("weight", "bias"):
            fused[f"{theirs}img_attn.qkv.{kind}"] = fuse(
                state, [f"{ours}attn.to_{p}.{kind}" for p in "qkv"], "transformer"
            )
            fused[f"{theirs}txt_attn.qkv.{kind}"] = fuse(
                state, [f"{ours}attn.add_{p}_proj.{kind}" for p in "qkv"], "transformer"
            )
        rules += [
            Rule(f"{ours}norm1.linear.", f"{theirs}img_mod.lin."),
            Rule(f"{ours}norm1_context.linear.", f"{theirs}txt_mod.lin."),
            Rule(f"{ours}attn.norm_q.", f"{theirs}img_attn.norm.query_norm.", scale),
            Rule(f"{ours}attn.norm_k.", f"{theirs}img_attn.norm.key_norm.", scale),
            Rule(f"{ours}attn.norm_added_q.", f"{theirs}txt_attn.norm.query_norm.", scale),
            Rule(f"{ours}attn.norm_added_k.", f"{theirs}txt_attn.norm.key_norm.", scale),
            Rule(f"{ours}attn.to_out.0.", f"{theirs}img_attn.proj."),
            Rule(f"{ours}attn.to_add_out.", f"{theirs}txt_attn.proj."),
            Rule(f"{ours}ff.net.0.proj.", f"{theirs}img_mlp.0."),
            Rule(f"{ours}ff.net.2.", f"{theirs}img_mlp.2."),
            Rule(f"{ours}ff_context.net.0.proj.", f"{theirs}txt_mlp.0."),
            Rule(f"{ours}ff_context.net.2.", f"{theirs}txt_mlp.2."),
        ]
    for i in sorted(blocks["single_transformer_blocks"]):
        ours, theirs = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for kind in ("weight", "bias"):
            parts = [f"{ours}attn.to_{p}.{kind}" for p in "qkv"] + [f"{ours}proj_mlp.{kind}"]
            fused[f"{theirs}linear1.{kind}"] = fuse(state, parts, "transformer")
        rules += [
            Rule(f"{ours}norm.linear.", f"{theirs}modulation.lin."),
            Rule(f"{ours}attn.norm_q.", f"{theirs}norm.query_norm.", scale),
            Rule(f"{ours}attn.norm_k.", f"{theirs}norm.key_norm.", scale),
            Rule(f"{ours}proj_out.", f"{theirs}linear2."),
        ]
    return {**apply_rules(state, rules, "transformer"), **fused}
