"""Seeds derived from a run's seed, one per use, so that every random draw is reproducible on its own."""

from __future__ import annotations

import hashlib


def derived_seed(seed: int, *parts) -> int:
    """A 31-bit seed for one use (a step's sampling, an evaluation), stable across processes."""
    digest = hashlib.blake2b(":".join(map(str, (seed, *parts))).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF
