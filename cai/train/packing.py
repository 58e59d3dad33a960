"""Padding-free batches (`packing: true`): whole examples concatenated into rows of at most
`max_tokens_per_batch` tokens, each example at the positions it has on its own and attending only to
itself (data.pack with no shared prefix), so every token of a batch is an example's token and the
losses are those of the examples one by one. Rows are filled by best-fit decreasing, as TRL's
`packing_strategy: bfd`: on HH-RLHF's lengths (a long tail) padded batches spend most tokens on pads.
"""

from __future__ import annotations

import bisect
import random


def best_fit_decreasing(lengths: list[int], order: list[int], budget: int) -> list[list[int]]:
    """Items (indexes into `lengths`) in bins of at most `budget` tokens: longest first (ties in `order`),
    each into the fullest bin it still fits in, else a new bin. Every item fits alone (length <= budget)."""
    rank = {item: k for k, item in enumerate(order)}
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, bin index), sorted: the fullest bins first
    for item in sorted(order, key=lambda i: (-lengths[i], rank[i])):
        at = bisect.bisect_left(free, (lengths[item], -1))
        if at == len(free):
            bins.append([item])
            left, index = budget - lengths[item], len(bins) - 1
        else:
            left, index = free.pop(at)
            bins[index].append(item)
            left -= lengths[item]
        bisect.insort(free, (left, index))
    return bins


class PackedBatches:
    """`data.Batches` for packed rows: each batch is the items of one bin, a pure function of
    (seed, epoch) so that a resumed run gets what the uninterrupted one got. Items are shuffled before
    the (stable) best-fit, so equal-length items change bins between epochs, and the bins are shuffled;
    each process reads every world_size-th bin."""

    def __init__(self, lengths: list[int], budget: int, seed: int, rank: int = 0, world_size: int = 1):
        self.lengths, self.budget, self.seed, self.rank, self.world_size = lengths, budget, seed, rank, world_size
        # the number of bins depends on the lengths only, not on the epoch's order among equal lengths
        self.per_epoch = len(self.bins(0)) // world_size
        if self.per_epoch == 0:
            raise ValueError(f"{len(lengths)} examples make no packed batch on each of {world_size} processes")
        self._epoch, self._plan = -1, []

    def bins(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        bins = best_fit_decreasing(self.lengths, order, self.budget)
        rng.shuffle(bins)
        return bins

    def __call__(self, position: int) -> list[int]:
        epoch, index = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, self.bins(epoch)[self.rank :: self.world_size][: self.per_epoch]
        return self._plan[index]
