"""A transformers CLIP text encoder in the two layouts original checkpoints use.

    clip_l = clip_to_original(text_encoder_state, "cond_stage_model.transformer.")
    big_g = open_clip_to_original(text_encoder_2_state, "conditioner.embedders.1.model.")

OpenAI's CLIP (SD 1.x's encoder, SDXL's first) is stored as the transformers model itself,
under `text_model.`. OpenCLIP's (SD 2.x's, SDXL's second) is stored as open_clip has it:
`transformer.resblocks.N` with the query, key and value projections fused into one
`in_proj_weight` (q, k, v stacked on dim 0, as `torch.nn.MultiheadAttention` holds them),
the positional embedding as a bare tensor, and `text_projection` as the matrix the pooled
output is multiplied by (the transpose of the linear layer's weight). diffusers' reader
(`convert_open_clip_checkpoint`) splits the fused projection by the hidden width again.
"""

from __future__ import annotations

import re
from typing import Any

from difftrain.models.single_file.mapping import Rule, apply_rules, fuse, with_prefix

LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")


def transformers_keys(state: dict[str, Any]) -> dict[str, Any]:
    """The state dict with every key under `text_model.`, as transformers before 5.6 and
    every original checkpoint name them (newer ones drop that level in `CLIPTextModel`).

    `position_ids` (an arange buffer some older files saved) is left out: the loaders make
    it, and diffusers' reader would refuse it as an unexpected weight."""
    out = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith("text_model.") and key != "text_projection.weight":
            key = "text_model." + key
        out[key] = tensor
    return out


def clip_to_original(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return with_prefix(transformers_keys(state), prefix)


def open_clip_to_original(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    state = transformers_keys(state)
    layers = sorted({int(m.group(1)) for key in state if (m := LAYER.match(key))})
    rules = [
        Rule("text_model.embeddings.token_embedding.", "token_embedding."),
        Rule("text_model.final_layer_norm.", "ln_final."),
    ]
    fused = {}
    for layer in layers:
        theirs, ours = f"text_model.encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            names = [f"{theirs}self_attn.{p}_proj.{kind}" for p in "qkv"]
            fused[f"{ours}attn.in_proj_{kind}"] = fuse(state, names, "text encoder")
        rules += [
            Rule(f"{theirs}layer_norm1.", f"{ours}ln_1."),
            Rule(f"{theirs}layer_norm2.", f"{ours}ln_2."),
            Rule(f"{theirs}self_attn.out_proj.", f"{ours}attn.out_proj."),
            Rule(f"{theirs}mlp.fc1.", f"{ours}mlp.c_fc."),
            Rule(f"{theirs}mlp.fc2.", f"{ours}mlp.c_proj."),
        ]
    bare = {}
    position = state.pop("text_model.embeddings.position_embedding.weight", None)
    if position is not None:
        bare["positional_embedding"] = position
    projection = state.pop("text_projection.weight", None)
    if projection is not None:
        bare["text_projection"] = projection.T.contiguous()
    out = {**apply_rules(state, rules, "text encoder"), **fused, **bare}
    return with_prefix(out, prefix)
