"""Renaming a state dict by prefix rules, shared by the layout modules.

    apply_rules(state, [Rule("conv_in.", "input_blocks.0.0.")], "unet")

Every tensor must be claimed by a rule: a tensor no rule knows would be left out of the file
silently, and the model read back from it would miss a weight (diffusers leaves such a
parameter uninitialised rather than failing). So an unclaimed key is a `LayoutError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class LayoutError(ValueError):
    """The model has a part the original layout has no place for (said in one line)."""


@dataclass(frozen=True)
class Rule:
    source: str
    """A diffusers key prefix, ending in a dot (`down_blocks.0.resnets.1.`)."""
    target: str
    """What replaces it in the original layout."""
    renames: dict[str, str] = field(default_factory=dict)
    """Layer names right after the prefix that differ (`norm1` -> `in_layers.0`)."""
    reshape: Callable[[Any], Any] | None = None
    """Applied to weights (not biases) under the prefix: the original's 1x1 convolutions
    where diffusers has linear layers."""


def apply_rules(state: dict[str, Any], rules: list[Rule], component: str) -> dict[str, Any]:
    # The longest matching prefix wins, so `down_blocks.0.resnets.1.` never catches
    # `down_blocks.0.resnets.10.`: every prefix ends with a dot.
    ordered = sorted(rules, key=lambda rule: len(rule.source), reverse=True)
    out = {}
    for key, tensor in state.items():
        rule = next((r for r in ordered if key.startswith(r.source)), None)
        if rule is None:
            raise LayoutError(f"{component}: tensor {key} has no place in the original layout")
        rest = key[len(rule.source) :]
        head, dot, tail = rest.partition(".")
        rest = rule.renames.get(head, head) + dot + tail
        if rule.reshape is not None and key.endswith(".weight"):
            tensor = rule.reshape(tensor)
        out[rule.target + rest] = tensor
    return out


def with_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {prefix + key: tensor for key, tensor in state.items()}


def swap_halves(tensor):
    """(scale, shift) <-> (shift, scale): diffusers' final AdaLayerNormContinuous splits its
    projection the other way round from the original MMDiT / Flux `adaLN_modulation`."""
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def fuse(state: dict[str, Any], names: list[str], component: str):
    """Pop `names` from `state` and stack them on dim 0 (a fused projection)."""
    import torch

    missing = [name for name in names if name not in state]
    if missing:
        raise LayoutError(f"{component}: {missing[0]} is missing")
    return torch.cat([state.pop(name) for name in names], dim=0)
