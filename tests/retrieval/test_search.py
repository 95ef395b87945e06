"""retrieval/search.py: exact streaming top-k / range against brute-force NumPy, FAISS backends against
exact search, backend selection, stale FAISS indexes, atomic FAISS files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from percept_cli.errors import BadInputError
from percept_cli.retrieval import search as S


class FakeIndex:
    """The members of PoolIndex that search.py uses: path, manifest, vectors(), n, dim, set_faiss()."""

    def __init__(self, path: Path, arrays: list[np.ndarray], generation: str = "gen-1"):
        self.path = Path(path)
        (self.path / "parts").mkdir(parents=True, exist_ok=True)
        self._parts = []
        for k, array in enumerate(arrays):
            file = self.path / "parts" / f"{k:05d}.npy"
            np.save(file, np.asarray(array, dtype=np.float16))
            self._parts.append(np.load(file, mmap_mode="r"))
        self.manifest = {"generation": generation, "faiss": None}
        self.n = sum(int(a.shape[0]) for a in arrays)
        self.dim = int(arrays[0].shape[1])

    def vectors(self) -> list[np.ndarray]:
        return list(self._parts)

    def set_faiss(self, info: dict | None) -> None:
        # a JSON round trip, as the real manifest rewrite does: info must be JSON-serialisable
        self.manifest = {**self.manifest, "faiss": json.loads(json.dumps(info))}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim))
    return unit(centers[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim)))


def pool_of(index: FakeIndex) -> np.ndarray:
    """The whole pool as float32 of the stored float16 values, global id order."""
    return np.concatenate([np.asarray(p, dtype=np.float32) for p in index.vectors()])


def brute_topk(queries: np.ndarray, pool: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: float64 products, order (sim desc, id asc), padded with -1 / -inf."""
    sims = queries.astype(np.float64) @ pool.astype(np.float64).T
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    out = np.full((len(queries), k), -np.inf)
    for q in range(len(queries)):
        order = sorted(range(pool.shape[0]), key=lambda j: (-sims[q, j], j))[:k]
        ids[q, :len(order)] = order
        out[q, :len(order)] = sims[q, order]
    return out, ids


def brute_range(queries: np.ndarray, pool: np.ndarray, threshold: float) -> list[tuple[np.ndarray, np.ndarray]]:
    sims = queries @ pool.T  # float32, as the contract says
    result = []
    for q in range(len(queries)):
        hit = [j for j in range(pool.shape[0]) if sims[q, j] >= np.float32(threshold)]
        hit.sort(key=lambda j: (-sims[q, j], j))
        result.append((np.array(hit, dtype=np.int64), sims[q, hit]))
    return result


@pytest.fixture
def random_index(tmp_path):
    rng = np.random.default_rng(1)
    data = unit(rng.standard_normal((100, 16)))
    # parts of 37, 0, 50 and 13 rows: an empty part and chunks that straddle part borders
    return FakeIndex(tmp_path / "pool.idx", [data[:37], data[37:37], data[37:87], data[87:]])


# -- exact --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_rows", [8, 37, 1000])
def test_exact_topk_matches_brute_force(random_index, device, chunk_rows):
    rng = np.random.default_rng(2)
    queries = unit(rng.standard_normal((7, 16)))
    hits = S.exact_topk(torch.from_numpy(queries), random_index.vectors(), 20, device=device,
                        chunk_rows=chunk_rows, query_batch=3)
    sims, ids = brute_topk(queries, pool_of(random_index), 20)
    assert hits.ids.dtype == torch.int64 and hits.sims.dtype == torch.float32
    assert hits.ids.shape == (7, 20)
    np.testing.assert_array_equal(hits.ids.numpy(), ids)
    np.testing.assert_allclose(hits.sims.numpy(), sims, atol=1e-5)


def test_exact_topk_pads_when_k_exceeds_n(tmp_path):
    rng = np.random.default_rng(3)
    index = FakeIndex(tmp_path / "p", [unit(rng.standard_normal((3, 8))), unit(rng.standard_normal((2, 8)))])
    queries = unit(rng.standard_normal((4, 8)))
    hits = S.exact_topk(torch.from_numpy(queries), index.vectors(), 8, chunk_rows=2)
    sims, ids = brute_topk(queries, pool_of(index), 5)
    np.testing.assert_array_equal(hits.ids[:, :5].numpy(), ids)
    np.testing.assert_allclose(hits.sims[:, :5].numpy(), sims, atol=1e-5)
    assert (hits.ids[:, 5:] == -1).all()
    assert torch.isneginf(hits.sims[:, 5:]).all()


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 5, 100])
@pytest.mark.parametrize("splits", [(4, 9), ()])
def test_exact_topk_ties_prefer_lower_ids(tmp_path, chunk_rows, splits):
    # dyadic values: every product is exact in float16/float32, so the ties are real ties
    e1, e2 = [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]
    half = [0.5, 0.5, 0.5, 0.5]  # sim 0.5 with e1
    rows = [e2, half, e1, e2, e1, half, e1, e2, e1, e1, half]
    #       0   1     2   3   4   5     6   7   8   9   10      (e1 at 2, 4, 6, 8, 9)
    arr = np.array(rows, dtype=np.float32)
    index = FakeIndex(tmp_path / "t", np.split(arr, list(splits)))  # several parts, or one
    hits = S.exact_topk(torch.tensor([e1]), index.vectors(), 3, chunk_rows=chunk_rows)
    assert hits.ids[0].tolist() == [2, 4, 6]  # five items tie at 1.0: the three lowest ids
    assert hits.sims[0].tolist() == [1.0, 1.0, 1.0]
    hits = S.exact_topk(torch.tensor([e1]), index.vectors(), 7, chunk_rows=chunk_rows)
    assert hits.ids[0].tolist() == [2, 4, 6, 8, 9, 1, 5]
    assert hits.sims[0].tolist() == [1.0] * 5 + [0.5, 0.5]


def test_exact_range_matches_brute_force(random_index, device):
    rng = np.random.default_rng(4)
    queries = unit(rng.standard_normal((6, 16)))
    for threshold in (0.2, 0.45, 1.5):
        got = S.exact_range(torch.from_numpy(queries), random_index.vectors(), threshold, device=device,
                            chunk_rows=9, query_batch=4)
        want = brute_range(queries, pool_of(random_index), threshold)
        assert len(got) == 6
        for (ids, sims), (want_ids, want_sims) in zip(got, want):
            assert ids.dtype == np.int64 and sims.dtype == np.float32
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_allclose(sims, want_sims, atol=1e-6)
    assert all(len(ids) == 0 for ids, _ in S.exact_range(torch.from_numpy(queries), random_index.vectors(), 1.5))


def test_exact_range_threshold_is_inclusive(tmp_path):
    e1 = [1.0, 0.0, 0.0, 0.0]
    arr = np.array([[0.5, 0.5, 0.5, 0.5], e1, [0.0, 1.0, 0.0, 0.0], [0.5, -0.5, 0.5, 0.5], e1],
                   dtype=np.float32)
    index = FakeIndex(tmp_path / "r", [arr[:2], arr[2:]])
    (ids, sims), = S.exact_range(torch.tensor([e1]), index.vectors(), 0.5, chunk_rows=2)
    assert ids.tolist() == [1, 4, 0, 3] and sims.tolist() == [1.0, 1.0, 0.5, 0.5]
    just_above = float(np.nextafter(np.float32(0.5), np.float32(1)))
    (ids, _), = S.exact_range(torch.tensor([e1]), index.vectors(), just_above, chunk_rows=2)
    assert ids.tolist() == [1, 4]


def test_bad_queries_are_refused(random_index):
    with pytest.raises(BadInputError, match="dimension 8"):
        S.exact_topk(torch.zeros(2, 8), random_index.vectors(), 3)
    with pytest.raises(BadInputError, match="k must be"):
        S.exact_topk(torch.zeros(2, 16), random_index.vectors(), 0)
    with pytest.raises(BadInputError, match="NaN"):
        S.exact_range(torch.full((1, 16), float("nan")), random_index.vectors(), 0.5)


# -- choosing a FAISS kind ------------------------------------------------------------------------------

def test_choose_faiss_kind():
    big = 1 << 40
    assert S.choose_faiss_kind(1000, 512, big) == "flat"
    assert S.choose_faiss_kind(2_000_000, 512, big) == "flat"
    assert S.choose_faiss_kind(3_000_000, 512, big) == "ivf-flat"
    # 3M x (4*512 + 8) bytes = 6.17 GB: needs 12.3 GB of memory at the documented half-share rule
    assert S.choose_faiss_kind(3_000_000, 512, 16 * 2**30) == "ivf-flat"
    assert S.choose_faiss_kind(3_000_000, 512, 8 * 2**30) == "ivf-pq"
    # a small pool whose float32 vectors do not fit either
    assert S.choose_faiss_kind(100_000, 768, 100_000 * 3080) == "ivf-pq"


# -- FAISS --------------------------------------------------------------------------------------------

def test_faiss_flat_gives_the_exact_ids(random_index):
    pytest.importorskip("faiss")
    info = S.build_faiss(random_index, "flat")
    assert info["kind"] == "flat" and info["generation"] == "gen-1"
    assert random_index.manifest["faiss"]["file"] == info["file"]
    assert info["recall_at_10"] == 1.0
    searcher = S.Searcher(random_index, backend="faiss")
    assert searcher.backend == "faiss"
    queries = unit(np.random.default_rng(5).standard_normal((9, 16)))
    hits = searcher.topk(torch.from_numpy(queries), 12)
    sims, ids = brute_topk(queries, pool_of(random_index), 12)
    np.testing.assert_array_equal(hits.ids.numpy(), ids)
    np.testing.assert_allclose(hits.sims.numpy(), sims, atol=1e-5)
    padded = searcher.topk(torch.from_numpy(queries), 130)
    assert (padded.ids[:, 100:] == -1).all() and sorted(padded.ids[0, :100].tolist()) == list(range(100))


def test_faiss_flat_range_equals_exact(random_index):
    pytest.importorskip("faiss")
    S.build_faiss(random_index, "flat")
    searcher = S.Searcher(random_index, backend="faiss")
    queries = torch.from_numpy(unit(np.random.default_rng(6).standard_normal((5, 16))))
    for threshold in (0.1, 0.4):
        got = searcher.range(queries, threshold)
        want = S.exact_range(queries, random_index.vectors(), threshold)
        for (ids, sims), (want_ids, want_sims) in zip(got, want):
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_allclose(sims, want_sims, atol=1e-6)


def test_forced_ivf_flat_recall_and_its_independent_recomputation(tmp_path):
    pytest.importorskip("faiss")
    data = clustered(3000, 32, 30, seed=7)
    index = FakeIndex(tmp_path / "c", [data[:1200], data[1200:2500], data[2500:]])
    info = S.build_faiss(index, "ivf-flat", seed=0)
    assert info["kind"] == "ivf-flat" and "HNSW32" in info["factory"] and info["factory"].endswith(",Flat")
    assert info["nlist"] >= 2 and info["nlist"] * 39 <= 3000  # clamped so that training has enough points
    assert 39 * info["nlist"] <= info["trained_on"] < 3000
    assert info["recall_at_10"] >= 0.9
    query_ids = np.load(index.path / info["queries_file"])
    assert len(query_ids) == info["recall_queries"] > 0
    pool = pool_of(index)
    queries = pool[query_ids]
    _, truth = brute_topk(queries, pool, 10)
    found = S.Searcher(index, backend="faiss").topk(torch.from_numpy(queries), 10).ids.numpy()
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall == pytest.approx(info["recall_at_10"], abs=1e-9)


def test_ivf_pq_reports_exact_similarities(tmp_path):
    pytest.importorskip("faiss")
    data = clustered(1000, 16, 10, seed=8)
    index = FakeIndex(tmp_path / "q", [data[:600], data[600:]])
    info = S.build_faiss(index, "ivf-pq", seed=0)
    assert info["kind"] == "ivf-pq" and info["pq"] and 16 % info["pq"]["m"] == 0
    searcher = S.Searcher(index, backend="faiss")
    queries = unit(np.random.default_rng(9).standard_normal((4, 16)))
    pool = pool_of(index)
    hits = searcher.topk(torch.from_numpy(queries), 5)
    ids = hits.ids.numpy()
    assert (ids >= 0).all()
    exact = np.einsum("qd,qkd->qk", queries.astype(np.float64), pool[ids].astype(np.float64))
    np.testing.assert_allclose(hits.sims.numpy(), exact, atol=1e-5)
    assert (np.diff(hits.sims.numpy(), axis=1) <= 0).all()
    for q, (r_ids, r_sims) in enumerate(searcher.range(torch.from_numpy(queries), 0.3)):
        np.testing.assert_allclose(r_sims, pool[r_ids] @ queries[q], atol=1e-5)
        assert (r_sims >= np.float32(0.3)).all()


def test_searcher_backend_selection_and_stale_refusal(random_index):
    pytest.importorskip("faiss")
    queries = torch.from_numpy(unit(np.random.default_rng(10).standard_normal((3, 16))))
    assert S.Searcher(random_index).backend == "exact"
    with pytest.raises(BadInputError, match="no FAISS index"):
        S.Searcher(random_index, backend="faiss")
    S.build_faiss(random_index, "flat")
    assert S.Searcher(random_index).backend == "faiss"
    exact = S.Searcher(random_index, backend="exact")
    assert exact.backend == "exact"
    want = S.exact_topk(queries, random_index.vectors(), 4)
    assert torch.equal(exact.topk(queries, 4).ids, want.ids)

    random_index.manifest = {**random_index.manifest, "generation": "gen-2"}  # the pool changed since
    with pytest.raises(BadInputError, match="stale") as err:
        S.Searcher(random_index, backend="faiss")
    assert str(random_index.path) in str(err.value) and "Rebuild" in str(err.value)
    auto = S.Searcher(random_index, backend="auto")
    assert auto.backend == "exact" and "stale" in auto.note
    assert torch.equal(auto.topk(queries, 4).ids, want.ids)
    with pytest.raises(BadInputError, match="backend"):
        S.Searcher(random_index, backend="annoy")


def test_missing_faiss_package(random_index, monkeypatch):
    pytest.importorskip("faiss")
    S.build_faiss(random_index, "flat")
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    with pytest.raises(BadInputError, match=r"percept\[faiss\]"):
        S.build_faiss(random_index, "flat")
    with pytest.raises(BadInputError, match=r"percept\[faiss\]"):
        S.Searcher(random_index, backend="faiss")
    assert S.Searcher(random_index, backend="auto").backend == "exact"


def test_faiss_files_are_written_atomically(random_index, monkeypatch):
    faiss = pytest.importorskip("faiss")
    folder = random_index.path / "faiss"
    first = S.build_faiss(random_index, "flat")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [Path(first["file"]).name, Path(first["queries_file"]).name])
    second = S.build_faiss(random_index, "ivf-flat")
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([Path(second["file"]).name, Path(second["queries_file"]).name])  # the first is gone

    def broken_write(index, path):
        Path(path).write_bytes(b"half an index")
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken_write)
    with pytest.raises(OSError, match="disk full"):
        S.build_faiss(random_index, "flat")
    assert sorted(p.name for p in folder.iterdir()) == names  # no temp file left, nothing replaced
    assert random_index.manifest["faiss"] == second
    monkeypatch.undo()
    assert S.Searcher(random_index, backend="faiss").backend == "faiss"  # the recorded index still loads


def test_faiss_range_boundary_is_inclusive(tmp_path):
    pytest.importorskip("faiss")
    e1 = [1.0, 0.0, 0.0, 0.0]
    arr = np.array([[0.5, 0.5, 0.5, 0.5], e1, [0.0, 1.0, 0.0, 0.0], [0.5, -0.5, 0.5, 0.5], e1], dtype=np.float32)
    index = FakeIndex(tmp_path / "b", [arr[:2], arr[2:]])
    S.build_faiss(index, "flat")
    searcher = S.Searcher(index, backend="faiss")
    (ids, sims), = searcher.range(torch.tensor([e1]), 0.5)  # faiss itself returns only sims > radius
    assert ids.tolist() == [1, 4, 0, 3] and sims.tolist() == [1.0, 1.0, 0.5, 0.5]
    (ids, _), = searcher.range(torch.tensor([e1]), float(np.nextafter(np.float32(0.5), np.float32(1))))
    assert ids.tolist() == [1, 4]
