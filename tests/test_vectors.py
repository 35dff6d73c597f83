"""sidecar.vectors against real USearch: both tiers, the switch, validation, persistence."""
import threading

import numpy as np
import pytest

from sidecar.errors import SidecarError, VectorIndexError, VectorInputError
from sidecar.cache.vectors import NO_KEY, Dtype, Tier, VectorIndex

DIM = 64
SEED = 20260611


def unit(n, dim=DIM, seed=SEED):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def brute_top1(matrix, keys, query):
    return keys[int(np.argmax(matrix @ query))]


@pytest.fixture(params=[d.value for d in Dtype])
def dtype(request):
    return request.param


def test_exact_round_trip():
    x = unit(200)
    index = VectorIndex(DIM, exact_below=1000)
    index.add(np.arange(200, dtype=np.uint64) + 10, x)
    assert len(index) == 200 and index.tier is Tier.EXACT
    keys, sims = index.search(x[42], k=3)
    assert keys[0] == 52 and sims[0] == pytest.approx(1.0, abs=1e-5)
    assert keys.dtype == np.uint64 and sims.dtype == np.float32
    assert np.all(np.diff(sims) <= 0)
    expected = np.sort(x @ x[42])[::-1][:3]
    np.testing.assert_allclose(sims, expected, atol=1e-5)
    assert index.remove([52, 999_999]) == 1
    assert len(index) == 199
    keys, _ = index.search(x[42], k=1)
    assert keys[0] != 52


def test_hnsw_round_trip(dtype):
    x = unit(500)
    index = VectorIndex(DIM, dtype=dtype, exact_below=0)
    index.add(np.arange(500), x)
    assert index.tier is Tier.HNSW and len(index) == 500
    keys, sims = index.search(x[123], k=5)
    assert keys[0] == 123 and sims[0] == pytest.approx(1.0, abs=2e-2)
    assert len(keys) == 5 and np.all(np.diff(sims) <= 1e-6)
    assert index.remove(np.array([123], dtype=np.uint64)) == 1
    assert len(index) == 499
    assert 123 not in index.search(x[123], k=5).keys


def test_exact_and_hnsw_agree_on_top1_for_separated_vectors(dtype):
    # Random unit vectors in 64 dimensions are nearly orthogonal: each query is a stored
    # vector plus small noise, so its top-1 is unambiguous.
    x = unit(2000)
    queries = x[::7] + 0.02 * unit(len(x[::7]), seed=SEED + 1)
    queries = np.ascontiguousarray(queries / np.linalg.norm(queries, axis=1, keepdims=True))
    keys = np.arange(2000, dtype=np.uint64)
    exact = VectorIndex(DIM, dtype=dtype, exact_below=10_000)
    # A wide search beam: this test is about the two tiers answering alike, recall at
    # the default beam is measured by `python -m bench cache`.
    hnsw = VectorIndex(DIM, dtype=dtype, exact_below=0, expansion_search=256)
    exact.add(keys, x)
    hnsw.add(keys, x)
    e = exact.search_batch(queries, k=1)
    h = hnsw.search_batch(queries, k=1)
    np.testing.assert_array_equal(e.keys[:, 0], np.arange(0, 2000, 7))
    np.testing.assert_array_equal(h.keys[:, 0], e.keys[:, 0])
    np.testing.assert_allclose(h.similarities[:, 0], e.similarities[:, 0], atol=2e-2)
    for i, q in enumerate(queries[:20]):
        assert exact.search(q, 1).keys[0] == e.keys[i, 0] == brute_top1(x, keys, q)


def test_switch_at_threshold_keeps_results():
    x = unit(1500)
    index = VectorIndex(DIM, exact_below=1000)
    index.add(np.arange(900), x[:900])
    before = [index.search(x[i], 1) for i in range(0, 900, 50)]
    assert index.tier is Tier.EXACT
    index.add(np.arange(900, 1000), x[900:1000])  # reaches the threshold exactly
    assert index.tier is Tier.HNSW and len(index) == 1000
    for i, (keys, sims) in zip(range(0, 900, 50), before):
        after = index.search(x[i], 1)
        assert after.keys[0] == keys[0] == i
        assert after.similarities[0] == pytest.approx(sims[0], abs=1e-2)
    index.add(np.arange(1000, 1500), x[1000:])
    assert len(index) == 1500 and index.search(x[1400], 1).keys[0] == 1400


def test_switch_with_replaced_keys_in_the_crossing_batch():
    x = unit(120)
    index = VectorIndex(DIM, exact_below=100)
    index.add(np.arange(90), x[:90])
    # keys 80..89 are replaced by new vectors, 90..109 are new: 110 entries after
    index.add(np.arange(80, 110), x[90:120])
    assert index.tier is Tier.HNSW and len(index) == 110
    assert index.search(x[95], 1).keys[0] == 85  # key 85 now holds x[95]
    assert index.search(x[10], 1).keys[0] == 10


def test_duplicate_keys_replace(dtype):
    x = unit(4)
    for exact_below in (100, 0):
        index = VectorIndex(DIM, dtype=dtype, exact_below=exact_below)
        index.add([1, 2], x[:2])
        index.add([1], x[2:3])  # replaces key 1
        assert len(index) == 2
        assert index.search(x[2], 1).keys[0] == 1
        assert index.search(x[0], 1).keys[0] != 1 or index.search(x[0], 2).similarities[0] < 0.9
        # within one batch the last vector wins
        index.add(np.array([3, 3], dtype=np.uint64), np.ascontiguousarray(x[[0, 3]]))
        assert len(index) == 3
        keys, sims = index.search(x[3], 1)
        assert keys[0] == 3 and sims[0] == pytest.approx(1.0, abs=2e-2)


def test_empty_index_search():
    q = unit(1)[0]
    for exact_below in (10, 0):
        index = VectorIndex(DIM, exact_below=exact_below)
        keys, sims = index.search(q, 3)
        assert keys.shape == (0,) and sims.shape == (0,)
        batch = index.search_batch(unit(2), 3)
        assert batch.counts.tolist() == [0, 0]
        assert (batch.keys == NO_KEY).all() and np.isneginf(batch.similarities).all()


def test_k_larger_than_index_and_batch_padding():
    x = unit(3)
    for exact_below in (10, 0):
        index = VectorIndex(DIM, exact_below=exact_below)
        index.add([7, 8, 9], x)
        assert len(index.search(x[0], 10).keys) == 3
        batch = index.search_batch(x[:2], 5)
        assert batch.counts.tolist() == [3, 3]
        assert (batch.keys[:, 3:] == NO_KEY).all()
        assert np.isneginf(batch.similarities[:, 3:]).all()
        assert batch.keys[0, 0] == 7 and batch.keys[1, 0] == 8


@pytest.mark.parametrize("bad, fragment", [
    (np.zeros((2, DIM + 1), np.float32), "shape (n, 64)"),
    (np.zeros((2, DIM), np.float64), "float32"),
    (np.zeros((DIM, 2), np.float32).T, "C-contiguous"),
    (np.zeros(DIM, np.float32), "shape (n, 64)"),
    ([[0.0] * DIM] * 2, "numpy float32 array"),
])
def test_bad_vectors_raise_typed_error(bad, fragment):
    index = VectorIndex(DIM)
    with pytest.raises(VectorInputError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        index.add([1, 2], bad)
    assert len(index) == 0


@pytest.mark.parametrize("bad, fragment", [
    (np.zeros(DIM + 1, np.float32), "shape"),
    (np.zeros(DIM, np.float16), "float32"),
    (np.zeros(2 * DIM, np.float32)[::2], "C-contiguous"),
    (np.zeros((1, DIM), np.float32), "search_batch"),
    ([0.0] * DIM, "numpy float32 array"),
])
def test_bad_queries_raise_typed_error(bad, fragment):
    for exact_below in (10, 0):
        index = VectorIndex(DIM, exact_below=exact_below)
        index.add([1], unit(1))
        with pytest.raises(VectorInputError, match=fragment):
            index.search(bad, 1)


def test_bad_keys_and_arguments():
    index = VectorIndex(DIM)
    with pytest.raises(VectorInputError, match="2 keys for 1 vectors"):
        index.add([1, 2], unit(1))
    with pytest.raises(VectorInputError, match="non-negative"):
        index.add(np.array([-1]), unit(1))
    with pytest.raises(VectorInputError, match="uint64"):
        index.add([2**64], unit(1))
    with pytest.raises(VectorInputError, match="k must be"):
        index.search(unit(1)[0], 0)
    with pytest.raises(VectorInputError, match="unknown dtype"):
        VectorIndex(DIM, dtype="f64")
    with pytest.raises(VectorInputError, match="dim"):
        VectorIndex(0)
    assert issubclass(VectorInputError, ValueError)
    assert issubclass(VectorInputError, SidecarError)


def test_save_load_round_trip(tmp_path, dtype):
    x = unit(300)
    queries = np.ascontiguousarray(x[::10])
    for exact_below in (1000, 0):
        index = VectorIndex(DIM, dtype=dtype, exact_below=exact_below)
        index.add(np.arange(300) * 3, x)
        index.remove([0, 3])
        path = tmp_path / f"idx-{exact_below}.vec"
        index.save(path)
        copy = VectorIndex(DIM, dtype=dtype, exact_below=exact_below)
        copy.load(path)
        assert len(copy) == len(index) == 298 and copy.tier is index.tier
        a, b = index.search_batch(queries, 3), copy.search_batch(queries, 3)
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_allclose(a.similarities, b.similarities, atol=1e-6)
        copy.add([1], x[:1])  # still writable after load
        assert len(copy) == 299


def test_load_rejects_foreign_files(tmp_path):
    bad = tmp_path / "junk"
    bad.write_bytes(b"not an index at all, clearly" * 4)
    with pytest.raises(VectorIndexError, match="bad magic"):
        VectorIndex(DIM).load(bad)
    index = VectorIndex(DIM, dtype="f32")
    index.add([1], unit(1))
    index.save(tmp_path / "f32")
    with pytest.raises(VectorIndexError, match="dim 64"):
        VectorIndex(DIM, dtype="f16").load(tmp_path / "f32")
    with pytest.raises(VectorIndexError, match="dim 64"):
        VectorIndex(DIM * 2, dtype="f32").load(tmp_path / "f32")
    truncated = tmp_path / "short"
    truncated.write_bytes((tmp_path / "f32").read_bytes()[:-4])
    with pytest.raises(VectorIndexError, match="truncated"):
        VectorIndex(DIM, dtype="f32").load(truncated)


def test_clear_returns_to_exact():
    x = unit(50)
    index = VectorIndex(DIM, exact_below=10)
    index.add(np.arange(50), x)
    assert index.tier is Tier.HNSW
    index.clear()
    assert len(index) == 0 and index.tier is Tier.EXACT
    index.add([5], x[:1])
    assert index.search(x[0], 1).keys.tolist() == [5]


def test_memory_bytes_grows():
    index = VectorIndex(DIM, exact_below=100)
    empty = index.memory_bytes()
    index.add(np.arange(50), unit(50))
    assert index.memory_bytes() >= empty + 50 * DIM * 4
    index.add(np.arange(50, 200), unit(150, seed=1))
    assert index.tier is Tier.HNSW and index.memory_bytes() > 200 * DIM


def test_searches_while_a_worker_adds():
    # The intended use: batched adds on a worker thread (crossing the threshold on the
    # way), searches on this thread. Every search must see a consistent index.
    x = unit(3000)
    index = VectorIndex(DIM, exact_below=1000, add_chunk=16)
    index.add(np.arange(100), x[:100])
    errors = []

    def writer():
        try:
            for start in range(100, 3000, 100):
                index.add(np.arange(start, start + 100), x[start:start + 100])
        except Exception as exc:  # reported to the main thread below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    searched = 0
    while t.is_alive() or searched < 50:
        i = searched % 100
        keys, sims = index.search(x[i], 1)
        assert keys[0] == i and sims[0] == pytest.approx(1.0, abs=1e-2)
        searched += 1
    t.join()
    assert not errors
    assert len(index) == 3000 and index.tier is Tier.HNSW
