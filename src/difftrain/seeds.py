"""Every seed difftrain uses, derived from its parts by one function.

A random draw is keyed by what it is for: `derive_seed(run_seed, "noise", sample_position)`.
Hashing the parts (instead of arithmetic such as `seed * 1_000_003 + index`) keeps every seed
in range for any inputs (a seed near 2**32 and a run of 10**12 samples), and different parts
never collide: (1, 23) and (12, 3) give unrelated seeds.
"""

from __future__ import annotations

import hashlib

SEED_BITS = 63
"""torch.Generator.manual_seed takes any 64-bit value; 63 bits also fit a signed int64."""


def derive_seed(*parts: int | str) -> int:
    """A seed in [0, 2**63) determined by `parts` (ints and strings) alone."""
    text = "\x1f".join(f"{type(part).__name__}:{part}" for part in parts)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)


def generator(*parts: int | str):
    """A CPU `torch.Generator` seeded with `derive_seed(*parts)`."""
    import torch

    return torch.Generator().manual_seed(derive_seed(*parts))
