"""Caption options for tag-style captions ("a cat, red, sitting, outdoors"): shuffle the tags
and drop some, keeping the first `keep_tokens` in place (kohya's `shuffle_caption`,
`keep_tokens`, `caption_tag_dropout_rate`).

Every draw comes from the sample's own `random.Random` (keyed by its stream position), and an
option that is off draws nothing, so a run without them keeps its exact stream.
"""

from __future__ import annotations

import random

TAG_SEPARATOR = ","


def transform_caption(
    caption: str, rng: random.Random, *, shuffle_tags: bool, keep_tokens: int,
    tag_dropout: float,
) -> str:  # fmt: skip
    """The caption with its tags after `keep_tokens` dropped (each with `tag_dropout`) and
    shuffled; tags are joined again with ", "."""
    if not (shuffle_tags or tag_dropout):
        return caption
    tags = [tag.strip() for tag in caption.split(TAG_SEPARATOR) if tag.strip()]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout:
        rest = [tag for tag in rest if rng.random() >= tag_dropout]
    if shuffle_tags:
        rng.shuffle(rest)
    return ", ".join(kept + rest)
