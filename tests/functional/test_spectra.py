"""Gradient spectrum statistics against float64 dense references (numpy SVD) and planted spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _support.references import statistics_from_singular_values, svd_statistics

from gradwatch.functional.spectra import (
    STATISTICS,
    as_matrix,
    batched_singular_values,
    cross_layer_mad,
    gradient_spectrum_statistics,
    spectrum_statistics,
)

RTOL = 1e-5


def planted(m: int, n: int, s: np.ndarray, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U (m x k), V (n x k), k = len(s)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return torch.tensor((u * s) @ v.T, dtype=dtype)


def rel_err(value: float, ref: float) -> float:
    return abs(value - ref) / abs(ref)


# name -> (m, n, planted singular values)
CASES = {
    "well_conditioned": (40, 30, np.linspace(3.0, 1.0, 30)),
    "rank3_of_40x30": (40, 30, np.array([5.0, 2.0, 0.5])),
    "ill_conditioned_1e6": (30, 30, np.logspace(0, -6, 30)),
    "wide": (16, 64, np.linspace(2.0, 1.0, 16)),
    "tall": (64, 16, np.linspace(2.0, 1.0, 16)),
}


@pytest.mark.parametrize("method", ["gram", "svdvals"])
@pytest.mark.parametrize("case", list(CASES))
def test_float32_input_matches_float64_svd(case: str, method: str) -> None:
    m, n, s = CASES[case]
    a = planted(m, n, s, dtype=torch.float32)
    ref = svd_statistics(a)
    values, nonfinite = gradient_spectrum_statistics([a], method=method)
    assert not nonfinite.any()
    assert set(values) == set(STATISTICS)
    for stat in STATISTICS:
        assert values[stat].dtype == torch.float64
        assert values[stat].shape == (1,)
        err = rel_err(values[stat].item(), ref[stat])
        assert err < RTOL, f"{case} {method} {stat}: rel err {err:.2e}"


@pytest.mark.parametrize("method", ["gram", "svdvals"])
@pytest.mark.parametrize("case", list(CASES))
def test_float64_input_matches_planted_spectrum(case: str, method: str) -> None:
    """In float64 the planted matrix's spectrum is the planted one to ~1e-15: compare with it directly."""
    m, n, s = CASES[case]
    a = planted(m, n, s, dtype=torch.float64)
    ref = statistics_from_singular_values(s)
    values, _ = gradient_spectrum_statistics([a], method=method)
    for stat in STATISTICS:
        err = rel_err(values[stat].item(), ref[stat])
        assert err < RTOL, f"{case} {method} {stat}: rel err {err:.2e}"


def test_planted_values_by_hand() -> None:
    """Spectrum (4, 3, 0, ...) in a 6x5 matrix: every statistic has a closed form."""
    a = planted(6, 5, np.array([4.0, 3.0]), dtype=torch.float64)
    values, _ = gradient_spectrum_statistics([a], method="gram")
    p = np.array([4 / 7, 3 / 7])
    expected = {
        "nuclear_norm": 7.0,
        "spectral_norm": 4.0,
        "frobenius_norm": 5.0,
        "stable_rank": 25.0 / 16.0,
        "effective_rank": math.exp(-(p * np.log(p)).sum()),
        "top1_ratio": 4.0 / 7.0,
    }
    for stat, want in expected.items():
        assert values[stat].item() == pytest.approx(want, rel=1e-6), stat
    # a rank-2 spectrum of two values has effective rank strictly between 1 and 2
    assert 1.0 < values["effective_rank"].item() < 2.0


def test_effective_rank_uses_all_values_and_natural_log() -> None:
    """Flat spectrum of r equal values: effective rank is exactly r (natural log, all r values)."""
    for r in (1, 5, 20):
        s = torch.full((r,), 2.5, dtype=torch.float64)
        out = spectrum_statistics(s, stats=["effective_rank", "stable_rank", "top1_ratio"])
        assert out["effective_rank"].item() == pytest.approx(r, rel=1e-12)
        assert out["stable_rank"].item() == pytest.approx(r, rel=1e-12)
        assert out["top1_ratio"].item() == pytest.approx(1.0 / r, rel=1e-12)


def test_svdvals_is_a_float64_reference_for_rank_deficient_float32() -> None:
    """A float32 SVD of a rank-deficient 384x384 gradient moved effective rank by 1.6e-5; the reference must not."""
    a = planted(384, 384, np.linspace(5.0, 1.0, 8), seed=3, dtype=torch.float32)
    ref = svd_statistics(a)
    for method in ("svdvals", "gram"):
        values, _ = gradient_spectrum_statistics([a], method=method)
        for stat in ("nuclear_norm", "effective_rank"):
            err = rel_err(values[stat].item(), ref[stat])
            assert err < RTOL, f"{method} {stat}: rel err {err:.2e}"


def test_gram32_accurate_when_well_conditioned() -> None:
    a = planted(40, 30, np.linspace(3.0, 1.0, 30), dtype=torch.float32)
    ref = svd_statistics(a)
    values, _ = gradient_spectrum_statistics([a], method="gram32")
    for stat in STATISTICS:
        assert rel_err(values[stat].item(), ref[stat]) < 1e-4, stat


def test_gram32_inaccurate_when_rank_deficient() -> None:
    """Why "gram" (float64) is the default: in float32 the Gram's rounding noise, ~eps32 * s_1^2, turns the 27
    zero singular values of a rank-3 matrix into values ~3e-4 * s_1 that inflate nuclear norm and effective rank."""
    a = planted(40, 30, np.array([5.0, 2.0, 0.5]), dtype=torch.float32)
    ref = svd_statistics(a)
    g32, _ = gradient_spectrum_statistics([a], method="gram32")
    g64, _ = gradient_spectrum_statistics([a], method="gram")
    err32 = rel_err(g32["nuclear_norm"].item(), ref["nuclear_norm"])
    err64 = rel_err(g64["nuclear_norm"].item(), ref["nuclear_norm"])
    assert err32 > 1e-5
    assert err64 < 1e-7
    assert rel_err(g32["effective_rank"].item(), ref["effective_rank"]) > 1e-4
    # what survives the rounding: the spectral and Frobenius norms
    assert rel_err(g32["spectral_norm"].item(), ref["spectral_norm"]) < 1e-5
    assert rel_err(g32["frobenius_norm"].item(), ref["frobenius_norm"]) < 1e-6


@pytest.mark.parametrize("method", ["gram", "gram32", "svdvals"])
def test_batched_singular_values_descending_float64(method: str) -> None:
    stack = torch.stack([planted(12, 7, np.array([3.0, 2.0, 1.0]), seed=i) for i in range(3)])
    sv = batched_singular_values(stack, method)
    assert sv.dtype == torch.float64
    assert sv.shape == (3, 7)
    assert torch.all(sv[:, :-1] >= sv[:, 1:])
    torch.testing.assert_close(sv[:, :3], torch.tensor([[3.0, 2.0, 1.0]] * 3, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    assert torch.all(sv[:, 3:] < 1e-3)


@pytest.mark.parametrize("method", ["gram", "gram32", "svdvals"])
def test_batched_singular_values_of_no_matrices(method: str) -> None:
    assert batched_singular_values(torch.empty(0, 5, 3), method).shape == (0, 3)


@pytest.mark.parametrize("method", ["gram", "svdvals"])
def test_grouping_matches_one_at_a_time(method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 5), (5, 8), (8, 5), (3, 3), (16, 4), (5, 8), (8, 5)]
    mats = [torch.randn(*sh, generator=gen) for sh in shapes]
    mats.append(torch.randn(6, 6, generator=gen, dtype=torch.float64))  # same shape, other dtype: own group
    mats.append(torch.randn(8, 5, generator=gen, dtype=torch.float64))
    together, nonfinite = gradient_spectrum_statistics(mats, method=method)
    assert not nonfinite.any()
    for i, m in enumerate(mats):
        alone, _ = gradient_spectrum_statistics([m], method=method)
        ref = svd_statistics(m)
        for stat in STATISTICS:
            assert together[stat].shape == (len(mats),)
            assert together[stat][i].item() == pytest.approx(alone[stat].item(), rel=1e-12, abs=0), (i, stat)
            assert rel_err(together[stat][i].item(), ref[stat]) < RTOL, (i, stat)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_route_concurrent_matches_torch_batched_route(threads: int) -> None:
    """The CPU route (numpy LAPACK, one matrix per worker thread) agrees with the GPU route's torch batched
    float64 eigvalsh run on the CPU, for any number of workers, non-contiguous views included; and it leaves
    the BLAS thread count as it found it."""
    from threadpoolctl import threadpool_info

    from gradwatch.functional.spectra import _gram_eigen_singular_values

    gen = torch.Generator().manual_seed(1)
    fused = torch.randn(24, 3 * 10, generator=gen)
    mats = [fused[:, :10], fused[:, 10:20], torch.randn(10, 24, generator=gen).t(), torch.randn(24, 10, generator=gen)]
    assert not any(m.is_contiguous() for m in mats[:3])
    blas_before = [(i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        host = batched_singular_values(torch.stack([m.contiguous() for m in mats]), "gram")
        values, _ = gradient_spectrum_statistics(mats)
    finally:
        torch.set_num_threads(before)
    assert [(i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"] == blas_before
    batched = _gram_eigen_singular_values(torch.stack([m.contiguous() for m in mats]), torch.float64)
    torch.testing.assert_close(host, batched, rtol=1e-12, atol=1e-12)
    for stat, v in spectrum_statistics(batched).items():
        torch.testing.assert_close(values[stat], v, rtol=1e-12, atol=0)


def test_stats_subset_and_order() -> None:
    a = planted(10, 6, np.array([2.0, 1.0]))
    values, _ = gradient_spectrum_statistics([a, a.t()], stats=["top1_ratio", "spectral_norm"])
    assert list(values) == ["top1_ratio", "spectral_norm"]
    torch.testing.assert_close(values["spectral_norm"], torch.tensor([2.0, 2.0], dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(values["top1_ratio"], torch.tensor([2 / 3, 2 / 3], dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad_value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("method", ["gram", "gram32", "svdvals"])
def test_nonfinite_matrix_is_nan_only_for_itself(bad_value: float, method: str) -> None:
    gen = torch.Generator().manual_seed(1)
    mats = [torch.randn(8, 5, generator=gen) for _ in range(3)] + [torch.randn(4, 4, generator=gen)]
    clean, _ = gradient_spectrum_statistics(mats, method=method)
    poisoned = [m.clone() for m in mats]
    poisoned[1][2, 3] = bad_value
    before = [m.clone() for m in poisoned]
    values, nonfinite = gradient_spectrum_statistics(poisoned, method=method)
    assert nonfinite.tolist() == [False, True, False, False]
    for stat in STATISTICS:
        assert math.isnan(values[stat][1].item()), stat
        for i in (0, 2, 3):
            assert values[stat][i].item() == pytest.approx(clean[stat][i].item(), rel=1e-12), (stat, i)
    # the caller's tensors are untouched (the non-finite one is zeroed only in a copy)
    for b, p in zip(before, poisoned):
        assert torch.equal(b.nan_to_num(), p.nan_to_num())
    assert not torch.isfinite(poisoned[1][2, 3])


@pytest.mark.parametrize("method", ["gram", "gram32", "svdvals"])
def test_all_zero_matrix(method: str) -> None:
    values, nonfinite = gradient_spectrum_statistics([torch.zeros(7, 4), torch.eye(4)], method=method)
    assert nonfinite.tolist() == [False, False]
    for stat in ("nuclear_norm", "spectral_norm", "frobenius_norm"):
        assert values[stat][0].item() == 0.0, stat
    for stat in ("stable_rank", "effective_rank", "top1_ratio"):
        assert math.isnan(values[stat][0].item()), stat
    # the identity next to it: flat spectrum of 4 ones
    expected = {"nuclear_norm": 4.0, "spectral_norm": 1.0, "frobenius_norm": 2.0, "stable_rank": 4.0,
                "effective_rank": 4.0, "top1_ratio": 0.25}
    for stat, want in expected.items():
        assert values[stat][1].item() == pytest.approx(want, rel=1e-6), stat


def test_frobenius_norm_exact_from_entries() -> None:
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    values, _ = gradient_spectrum_statistics([a], stats=["frobenius_norm"], method="gram32")
    assert values["frobenius_norm"].item() == pytest.approx(math.sqrt(sum(i * i for i in range(12))), rel=1e-14)


def test_conv_kernel_as_matrix() -> None:
    gen = torch.Generator().manual_seed(2)
    kernel = torch.randn(6, 3, 5, 5, generator=gen)
    mat = as_matrix(kernel)
    assert mat.shape == (6, 75)
    assert mat.data_ptr() == kernel.data_ptr()  # a view
    torch.testing.assert_close(mat[2, 3 * 25 - 1], kernel[2, 2, 4, 4])
    ref = svd_statistics(kernel.reshape(6, -1))
    values, _ = gradient_spectrum_statistics([mat])
    for stat in STATISTICS:
        assert rel_err(values[stat].item(), ref[stat]) < RTOL, stat
    lin = torch.randn(4, 3)
    assert as_matrix(lin) is lin
    assert as_matrix(torch.randn(4, 2, 3)).shape == (4, 6)
    with pytest.raises(ValueError, match=r"expected a tensor with >= 2 dims, got shape \(5,\)"):
        as_matrix(torch.randn(5))


def test_non_matrix_input_raises() -> None:
    with pytest.raises(ValueError, match=r"expected 2-D matrices, got shape \(2, 3, 4\) at index 1"):
        gradient_spectrum_statistics([torch.randn(3, 3), torch.randn(2, 3, 4)])


def test_empty_list() -> None:
    values, nonfinite = gradient_spectrum_statistics([], stats=["nuclear_norm"])
    assert values["nuclear_norm"].shape == (0,)
    assert nonfinite.shape == (0,)


def test_cross_layer_mad_by_hand() -> None:
    x = torch.tensor([1.0, 4.0, 2.0, 2.5], dtype=torch.float64)
    # |4-1| + |2-4| + |2.5-2| = 5.5, over L-1 = 3
    assert cross_layer_mad(x).item() == pytest.approx(5.5 / 3, rel=1e-15)
    assert cross_layer_mad(x[:2]).item() == pytest.approx(3.0)
    batch = torch.stack([x, torch.zeros(4, dtype=torch.float64), torch.tensor([0.0, 1.0, 0.0, 1.0])])
    torch.testing.assert_close(cross_layer_mad(batch), torch.tensor([5.5 / 3, 0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("n", [0, 1])
def test_cross_layer_mad_needs_two_layers(n: int) -> None:
    with pytest.raises(ValueError, match=f"at least 2 layers, got {n}"):
        cross_layer_mad(torch.ones(n))


def test_unknown_statistic_names_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown statistic 'rank'.*\['nuclear_norm', 'spectral_norm', "
                                         r"'frobenius_norm', 'stable_rank', 'effective_rank', 'top1_ratio'\]"):
        gradient_spectrum_statistics([torch.eye(3)], stats=["nuclear_norm", "rank"])
    with pytest.raises(ValueError, match=r"unknown statistic 'rank'"):
        spectrum_statistics(torch.ones(3), stats=["rank"])


def test_unknown_method_names_choices() -> None:
    with pytest.raises(ValueError, match=r"`method` expected one of \['gram', 'gram32', 'svdvals'\], got 'svd'"):
        gradient_spectrum_statistics([torch.eye(3)], method="svd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"got 'lanczos'"):
        batched_singular_values(torch.eye(3)[None], "lanczos")  # type: ignore[arg-type]


def test_half_precision_inputs() -> None:
    a = planted(16, 8, np.linspace(2.0, 1.0, 8), dtype=torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        low = a.to(dtype)
        ref = svd_statistics(low)  # of exactly the rounded matrix
        for method in ("gram", "svdvals"):
            values, _ = gradient_spectrum_statistics([low], method=method)
            for stat in STATISTICS:
                assert rel_err(values[stat].item(), ref[stat]) < RTOL, (dtype, method, stat)


def _spectra_in_child(queue) -> None:  # runs in a forked child
    torch.set_num_threads(2)
    values, _ = gradient_spectrum_statistics([torch.eye(5) * 2.0, torch.ones(4, 6)], stats=["nuclear_norm"])
    queue.put(values["nuclear_norm"].tolist())


def test_forked_child_gets_its_own_worker_threads() -> None:
    """A process forked after the worker pool exists (a DataLoader worker, a fork-started job) inherits the
    pool object but none of its threads; its spectra must still complete, not wait forever."""
    import multiprocessing as mp

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gradient_spectrum_statistics([torch.eye(3), torch.eye(3)])  # the parent's pool now exists
    finally:
        torch.set_num_threads(before)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_spectra_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("spectra in a forked child hung")
    assert child.exitcode == 0
    np.testing.assert_allclose(queue.get(timeout=5), [10.0, math.sqrt(24.0)], rtol=1e-6)
