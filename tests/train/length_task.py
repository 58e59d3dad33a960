"""A preference task where length is a shortcut: in the training pairs the chosen answer is the longer
one in 90% of pairs, while the marker word (the real preference, synthetic.py's) sits in the chosen answer
in only 70% of them, independently; in the held-out pairs the marker is always in the chosen answer and
the chosen answer is the longer one in half of them. A model that learns the length rule is right on
held-out chosen-longer pairs and wrong on chosen-shorter ones; one that learns the marker is right on both."""

from __future__ import annotations

import random
from typing import Any

from synthetic import QUESTIONS, answer

PADDING = "indeed certainly furthermore basically".split()  # what makes an answer the longer one


def pair(rng: random.Random, index: int, chosen_longer: bool, marker_right: bool) -> dict[str, Any]:
    chosen, rejected = answer(rng, marker_right), answer(rng, not marker_right)
    padding = " ".join(rng.choice(PADDING) for _ in range(rng.randint(6, 10)))
    if chosen_longer:
        chosen = f"{chosen} {padding}"
    else:
        rejected = f"{rejected} {padding}"
    return {
        "prompt": [{"role": "user", "content": f"{rng.choice(QUESTIONS)} ({index})"}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def training_pairs(n: int, seed: int = 0, longer: float = 0.9, marker: float = 0.7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [pair(rng, i, rng.random() < longer, rng.random() < marker) for i in range(n)]


def held_out_pairs(n: int, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [pair(rng, 10_000 + i, i % 2 == 0, True) for i in range(n)]
