"""retrieval/dedup.py: duplicate groups against a breadth-first search, keep lists."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from percept_cli.errors import BadInputError
from percept_cli.retrieval.dedup import duplicate_groups, keep_list


def bfs_components(n, pairs):
    """Connected components of size >= 2 by breadth-first search over an adjacency list."""
    adjacent = [set() for _ in range(n)]
    for i, j in pairs:
        if i != j:
            adjacent[i].add(j)
            adjacent[j].add(i)
    seen, groups = set(), []
    for start in range(n):
        if start in seen or not adjacent[start]:
            continue
        component, queue = [], deque([start])
        seen.add(start)
        while queue:
            node = queue.popleft()
            component.append(node)
            for other in adjacent[node]:
                if other not in seen:
                    seen.add(other)
                    queue.append(other)
        groups.append(sorted(component))
    return sorted(groups)


@pytest.mark.parametrize("seed", range(6))
def test_groups_match_bfs_on_random_graphs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    m = int(rng.integers(0, n))
    pairs = [tuple(map(int, rng.integers(0, n, size=2))) for _ in range(m)]
    pairs += pairs[: m // 3]  # repeats
    pairs += [(j, i) for i, j in pairs[: m // 4]]  # both directions
    pairs += [(i, i) for i in rng.integers(0, n, size=3).tolist()]  # self pairs (ignored)
    groups = duplicate_groups(n, pairs)
    assert groups == bfs_components(n, pairs)
    assert all(g == sorted(g) and len(g) >= 2 for g in groups)
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)
    assert duplicate_groups(n, np.array(pairs, dtype=np.int64).reshape(-1, 2)) == groups


def test_groups_hand_example_and_empty():
    assert duplicate_groups(8, [(5, 1), (1, 7), (3, 2), (4, 4)]) == [[1, 5, 7], [2, 3]]
    assert duplicate_groups(3, []) == []
    assert duplicate_groups(3, np.zeros((0, 2), dtype=np.int64)) == []
    assert duplicate_groups(3, [(2, 2)]) == []


def test_groups_refuse_bad_pairs():
    with pytest.raises(BadInputError, match="0..3"):
        duplicate_groups(4, [(0, 4)])
    with pytest.raises(BadInputError):
        duplicate_groups(4, [(-1, 2)])
    with pytest.raises(BadInputError, match="shape"):
        duplicate_groups(4, np.zeros((3, 3), dtype=np.int64))


def test_keep_list():
    keep = keep_list([[0, 3, 5], [2, 7]], 9)
    assert keep.dtype == bool
    assert keep.tolist() == [True, True, True, False, True, False, True, False, True]
    np.testing.assert_array_equal(keep_list([], 3), [True, True, True])
    with pytest.raises(BadInputError):
        keep_list([[1, 9]], 4)


def test_keep_list_keeps_one_per_group_on_random_graph():
    rng = np.random.default_rng(7)
    n = 60
    pairs = rng.integers(0, n, size=(40, 2))
    groups = duplicate_groups(n, pairs)
    keep = keep_list(groups, n)
    grouped = {i for g in groups for i in g}
    for g in groups:
        assert keep[g].sum() == 1 and keep[min(g)]
    assert all(keep[i] for i in range(n) if i not in grouped)
    assert keep.sum() == n - sum(len(g) - 1 for g in groups)
