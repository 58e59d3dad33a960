"""Padding-free batches (`packing: true`): whole examples concatenated into rows of at most a row's
capacity (max_length; for pairs twice that), each example at the positions it has on its own and
attending only to itself (data.pack), so every token of a row is an example's token and the losses
are those of the examples one by one; a batch is `max_tokens_per_batch` / capacity such rows. Rows are
filled by best-fit decreasing, as TRL's `packing_strategy: bfd`: on HH-RLHF's lengths (a long tail)
padded batches spend most tokens on pads. Rows are capped at the longest example, not one row for the
whole batch: a row's attention costs the square of its length under a block-diagonal mask (no
variable-length kernel on a CPU or under sdpa), so one long row would spend more than the padding saved.
"""

from __future__ import annotations

import bisect


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


def rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """A batch's items (indexes into `lengths`) as rows of at most `capacity` tokens, by best-fit
    decreasing: what a trainer packs the batch data.PackedBatches gave it into."""
    return best_fit_decreasing(lengths, list(range(len(lengths))), capacity)
