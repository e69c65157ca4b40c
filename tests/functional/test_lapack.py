"""The GIL-free dsyevd used by the CPU spectra route, against numpy and a float64 reference."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gradwatch.functional import _lapack


def _gram(n: int, rank: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((n, rank))
    return a @ a.T


def test_scipy_lapack_is_found() -> None:
    pytest.importorskip("scipy")
    assert _lapack.lapack_available()


@pytest.mark.parametrize("n, rank", [(1, 1), (7, 3), (64, 64), (200, 50)])
def test_matches_numpy_eigvalsh(n: int, rank: int) -> None:
    g = _gram(n, rank, seed=n)
    ref = np.linalg.eigvalsh(g)
    got = _lapack.eigvalsh(g)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * ref.max())
    assert np.all(np.diff(got) >= 0)
    np.testing.assert_array_equal(g, _gram(n, rank, seed=n))  # input untouched without overwrite


def test_known_spectrum_and_overwrite() -> None:
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((30, 30)))
    lam = np.logspace(-6, 2, 30)
    g = np.ascontiguousarray((q * lam) @ q.T)
    g = (g + g.T) / 2
    got = _lapack.eigvalsh(g.copy(), overwrite=True)
    np.testing.assert_allclose(got, lam, rtol=0, atol=1e-12 * lam.max())


def test_fallback_without_scipy_gives_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    g = _gram(50, 20, seed=3)
    with_lapack = _lapack.eigvalsh(g)
    monkeypatch.setattr(_lapack, "_resolved", True)
    monkeypatch.setattr(_lapack, "_dsyevd", None)
    assert not _lapack.lapack_available()
    np.testing.assert_allclose(_lapack.eigvalsh(g), with_lapack, rtol=0, atol=1e-12 * with_lapack.max())


def test_threads_get_their_own_results() -> None:
    pytest.importorskip("scipy")
    grams = [_gram(120, 60, seed=s) for s in range(8)]
    refs = [np.linalg.eigvalsh(g) for g in grams]
    out: dict[int, np.ndarray] = {}

    def solve(i: int) -> None:
        for _ in range(3):
            out[i] = _lapack.eigvalsh(grams[i])

    threads = [threading.Thread(target=solve, args=(i,)) for i in range(len(grams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, ref in enumerate(refs):
        np.testing.assert_allclose(out[i], ref, rtol=0, atol=1e-12 * ref.max())


def test_non_square_raises() -> None:
    with pytest.raises(ValueError, match="square"):
        _lapack.eigvalsh(np.zeros((3, 4)))
