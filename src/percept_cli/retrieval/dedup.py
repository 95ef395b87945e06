"""Near-duplicate groups: connected components of the "similar enough" pairs of a range search.

A range search of the pool against itself (``Searcher.range`` with a similarity threshold) gives the
pairs of items closer than the threshold; two items are in the same group when a chain of such pairs
links them (single linkage). :func:`duplicate_groups` finds the groups with a union-find (path
halving, union by size); :func:`keep_list` keeps one item per group.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ..errors import BadInputError


def _find(parent: list[int], i: int) -> int:
    """The root of ``i``, halving the path on the way (every node visited then points to its grandparent)."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _as_pairs(pairs) -> np.ndarray:
    """(M, 2) int64 array from an (M, 2) array or an iterable of (i, j)."""
    if isinstance(pairs, np.ndarray) or hasattr(pairs, "detach"):
        arr = np.asarray(pairs.detach().cpu().numpy() if hasattr(pairs, "detach") else pairs)
    else:
        arr = np.asarray([tuple(p) for p in pairs], dtype=np.int64)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise BadInputError(f"duplicate_groups: pairs must be (i, j) index pairs; got shape {tuple(arr.shape)}.")
    return arr.astype(np.int64, copy=False)


def duplicate_groups(n: int, pairs: Iterable[Sequence[int]] | np.ndarray) -> list[list[int]]:
    """Groups of items linked by pairs.

    Args:
        n: number of items (indices 0..n-1).
        pairs: (i, j) index pairs meaning "i and j are duplicates"; order and repeats do not matter,
            and self pairs (i == i, what a search of a pool against itself returns first) are ignored.

    Returns:
        The groups of two or more items, each sorted ascending, the groups sorted by their first
        (smallest) member. Items in no pair are left out.

    Raises:
        BadInputError: an index outside 0..n-1 or pairs that are not pairs.
    """
    arr = _as_pairs(pairs)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise BadInputError(f"duplicate_groups: pair indices must lie in 0..{n - 1}; "
                            f"found {int(arr.min())}..{int(arr.max())}.")
    arr = arr[arr[:, 0] != arr[:, 1]]
    parent = list(range(n))  # plain lists: scalar access is several times faster than on arrays
    size = [1] * n
    for i, j in arr.tolist():
        ri, rj = _find(parent, i), _find(parent, j)
        if ri == rj:
            continue
        if size[ri] < size[rj]:
            ri, rj = rj, ri
        parent[rj] = ri
        size[ri] += size[rj]
    linked = np.unique(arr) if arr.size else np.zeros(0, dtype=np.int64)
    if not linked.size:
        return []
    roots = np.array([_find(parent, int(i)) for i in linked], dtype=np.int64)
    order = np.argsort(roots, kind="stable")  # members stay ascending within a root
    roots, members = roots[order], linked[order]
    starts = np.flatnonzero(np.r_[True, roots[1:] != roots[:-1]])
    groups = [chunk.tolist() for chunk in np.split(members, starts[1:])]
    groups = [g for g in groups if len(g) >= 2]
    groups.sort(key=lambda g: g[0])
    return groups


def keep_list(groups: Sequence[Sequence[int]], n: int) -> np.ndarray:
    """(n,) bool: True for the items to keep, the first member of each group and every item in none.

    With the groups of :func:`duplicate_groups` (sorted), the first member is the lowest index.

    Raises:
        BadInputError: a member outside 0..n-1.
    """
    keep = np.ones(n, dtype=bool)
    for group in groups:
        members = np.asarray(list(group), dtype=np.int64)
        if members.size and (members.min() < 0 or members.max() >= n):
            raise BadInputError(f"keep_list: group members must lie in 0..{n - 1}.")
        keep[members[1:]] = False
    return keep
