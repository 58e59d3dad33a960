"""Per-row seeds derived from the run seed, so any row's choices can be replayed alone."""

from __future__ import annotations

import hashlib
import random


def derive_seed(run_seed: int, *parts: object) -> int:
    """A 31-bit seed from (run seed, row id, stage, ...): the same parts give the same seed in any process.

    Python's hash() is salted per process, so a cryptographic hash of the parts' text is used instead.
    """
    text = "\x1f".join(str(p) for p in (run_seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


def rng(run_seed: int, *parts: object) -> random.Random:
    return random.Random(derive_seed(run_seed, *parts))
