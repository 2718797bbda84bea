"""Bootstrap uncertainty of FID / sFID / IS (evaluations.metrics.bootstrap, paired_bootstrap), on
synthetic Gaussian features in a small dimension, where independent sample sets are cheap to draw."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluations import metrics as M

D = 6


def gaussian(rng: np.random.Generator, n: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return (rng.normal(size=(n, D)) * scale + shift).astype(np.float32)


@pytest.fixture(scope="module")
def ref() -> np.ndarray:
    return gaussian(np.random.default_rng(0), 3000)


def test_resample_counts_keep_every_split_whole():
    counts = M.resample_counts(23, 50, seed=3, block=10)
    assert counts.shape == (50, 23) and counts.dtype == torch.int64
    assert (counts[:, :10].sum(1) == 10).all() and (counts[:, 10:20].sum(1) == 10).all()
    assert (counts[:, 20:].sum(1) == 3).all()
    assert torch.equal(counts, M.resample_counts(23, 50, seed=3, block=10))
    assert not torch.equal(counts, M.resample_counts(23, 50, seed=4, block=10))


@pytest.mark.parametrize("n", [40, 4])  # more rows than dimensions (D x D route) and fewer (N x N route)
def test_weighted_terms_equal_metrics_of_the_repeated_rows(ref, n):
    # An independent route: materialise the resample with np.repeat and use the plain metrics.
    rng = np.random.default_rng(1)
    x, logits = gaussian(rng, n, 0.2), (rng.normal(size=(n, 7)) * 2).astype(np.float32)
    counts = M.resample_counts(n, 3, seed=0)
    fid_terms = M._FrechetTerms(x, *M.statistics(ref), torch.device("cpu"))
    assert (fid_terms.gram is None) == (n > D)
    is_terms = M._InceptionScoreTerms(logits, 5000, torch.device("cpu"))
    fids, scores = fid_terms(counts.double()), is_terms(counts.double())
    for c, fid, score in zip(counts.numpy(), fids, scores):
        rows = np.repeat(np.arange(n), c)
        expected = M.frechet_distance(*M.statistics(x[rows]), *M.statistics(ref), method="eigh")
        assert float(fid) == pytest.approx(expected, rel=1e-6)  # ADM: float32 means
        assert float(score) == pytest.approx(M.inception_score(logits[rows]), rel=1e-5)


def test_bootstrap_value_is_the_full_set_metric_and_interval_is_symmetric(ref):
    rng = np.random.default_rng(2)
    sample = {"pool": gaussian(rng, 300, 0.1), "spatial": gaussian(rng, 300, 0.0, 1.2),
              "logits": (rng.normal(size=(300, 9)) * 2).astype(np.float32)}
    out = M.bootstrap({"pool": ref, "spatial": ref[:, ::-1]}, sample, num_resamples=30, seed=0, split_size=100)
    assert list(out) == ["fid", "sfid", "inception_score"]
    assert out["fid"]["value"] == M.frechet_distance(*M.statistics(sample["pool"]), *M.statistics(ref),
                                                     method="eigh")
    assert out["inception_score"]["value"] == M.inception_score(sample["logits"], 100)
    for r in out.values():
        assert r["std"] > 0 and r["ci_low"] < r["value"] < r["ci_high"]
        assert r["ci_high"] - r["value"] == pytest.approx(r["value"] - r["ci_low"])
        assert r["ci_high"] - r["ci_low"] == pytest.approx(2 * 1.959964 * r["std"], rel=1e-6)


def test_bootstrap_std_of_fid_matches_monte_carlo(ref):
    # The spread of FID over independent sample sets, against the bootstrap's estimate from one set.
    rng = np.random.default_rng(3)
    mu, sigma = M.statistics(ref)
    draws = [M.frechet_distance(*M.statistics(gaussian(rng, 400, 0.15, 1.1)), mu, sigma, method="eigh")
             for _ in range(60)]
    mc_std = np.std(draws, ddof=1)
    boot = [M.bootstrap({"mu": mu, "sigma": sigma}, {"pool": gaussian(rng, 400, 0.15, 1.1)}, 100, seed=s)
            for s in range(3)]
    for b in boot:
        assert 0.5 * mc_std < b["fid"]["std"] < 2 * mc_std, (b["fid"]["std"], mc_std)


def test_seeds_make_results_reproducible(ref):
    sample = {"pool": gaussian(np.random.default_rng(4), 100, 0.3)}
    first = M.bootstrap({"pool": ref}, sample, num_resamples=20, seed=7)
    assert first == M.bootstrap({"pool": ref}, sample, num_resamples=20, seed=7)
    other_batching = M.bootstrap({"pool": ref}, sample, num_resamples=20, seed=7, batch=3)["fid"]
    assert other_batching == pytest.approx(first["fid"], rel=1e-9)  # same resamples, other rounding
    assert first["fid"]["std"] != M.bootstrap({"pool": ref}, sample, num_resamples=20, seed=8)["fid"]["std"]


def correlated_pair(rng: np.random.Generator, n: int, planted: float) -> tuple[np.ndarray, np.ndarray]:
    """B = A moved a little (shared noise, as two guidance settings from the same seeds),
    plus a planted mean shift of B away from the reference."""
    a = gaussian(rng, n, 0.1)
    b = a + (rng.normal(size=a.shape) * 0.05).astype(np.float32) + np.float32(planted)
    return a, b


def test_paired_interval_is_narrow_and_finds_a_planted_difference(ref):
    a, b = correlated_pair(np.random.default_rng(5), 400, planted=0.03)
    out = M.paired_bootstrap({"pool": ref}, {"pool": a}, {"pool": b}, num_resamples=100, seed=0)["fid"]
    full = lambda x: M.frechet_distance(*M.statistics(x), *M.statistics(ref), method="eigh")  # noqa: E731
    assert out["a"] == full(a) and out["b"] == full(b) and out["delta"] == out["b"] - out["a"]
    unpaired_std = np.hypot(out["a_std"], out["b_std"])
    assert out["std"] < unpaired_std / 5, (out["std"], unpaired_std)
    assert out["delta"] > 0 and out["ci_low"] > 0 and out["p_value"] < 0.01  # B is worse, and we can tell
    assert out["ci_low"] < out["delta"] < out["ci_high"]
    # without the planted shift the interval covers zero
    a, b = correlated_pair(np.random.default_rng(6), 400, planted=0.0)
    null = M.paired_bootstrap({"pool": ref}, {"pool": a}, {"pool": b}, num_resamples=100, seed=0)["fid"]
    assert null["ci_low"] < 0 < null["ci_high"] and null["p_value"] > 0.05


def test_p_value_is_the_normal_approximation():
    assert M.two_sided_p(1.96, 1.0) == pytest.approx(0.05, abs=1e-4)
    assert M.two_sided_p(-1.0, 1.0) == pytest.approx(0.3173, abs=1e-4)
    assert (M.two_sided_p(0.0, 0.0), M.two_sided_p(0.1, 0.0)) == (1.0, 0.0)


def test_precision_recall_behind_the_flag(ref):
    rng = np.random.default_rng(7)
    sample = {"pool": gaussian(rng, 60, 0.2)}
    small_ref = {"pool": ref[:80]}
    assert "precision" not in M.bootstrap(small_ref, sample, 10)
    out = M.bootstrap(small_ref, sample, 10, precision_recall=True)
    precision, recall = M.precision_recall(small_ref["pool"], sample["pool"], device="cpu")
    assert (out["precision"]["value"], out["recall"]["value"]) == (precision, recall)
    assert out["precision"]["std"] > 0 and out["recall"]["std"] > 0


def test_given_values_are_the_centres_and_leave_the_spread_alone(ref):
    rng = np.random.default_rng(9)
    sample, small_ref = {"pool": gaussian(rng, 60, 0.2)}, {"pool": ref[:80]}
    plain = M.bootstrap(small_ref, sample, 10, precision_recall=True)
    given = {"fid": 12.5, "precision": 0.25, "recall": 0.75, "unused": 1.0}  # e.g. compute_all's dict
    centred = M.bootstrap(small_ref, sample, 10, precision_recall=True, values=given)
    assert set(centred) == set(plain) == {"fid", "precision", "recall"}
    for metric, d in centred.items():
        assert d["value"] == given[metric] and d["std"] == plain[metric]["std"]
        assert d["ci_low"] == pytest.approx(given[metric] - M.Z95 * d["std"])


def test_bad_inputs_are_clear_errors(ref):
    rng = np.random.default_rng(8)
    good = {"pool": gaussian(rng, 20)}
    with pytest.raises(ValueError, match="num_resamples must be a whole number >= 10"):
        M.bootstrap({"pool": ref}, good, num_resamples=9)
    with pytest.raises(ValueError, match="num_resamples"):
        M.paired_bootstrap({"pool": ref}, good, good, num_resamples=5)
    with pytest.raises(ValueError, match="must have 6 columns"):
        M.bootstrap({"pool": ref[:, :4]}, good)
    with pytest.raises(ValueError, match="at least 2 rows"):
        M.bootstrap({"pool": ref}, {"pool": good["pool"][:1]})
    with pytest.raises(ValueError, match="same number of rows, got 20 .A. and 19 .B."):
        M.paired_bootstrap({"pool": ref}, good, {"pool": good["pool"][:19]})
    with pytest.raises(ValueError, match="different numbers of rows"):
        M.bootstrap({"pool": ref}, {**good, "logits": np.zeros((19, 3), np.float32)})
    with pytest.raises(ValueError, match="needs at least one of"):
        M.bootstrap({"pool": ref}, {"images": good["pool"]})
    with pytest.raises(ValueError, match="carry different arrays"):
        M.paired_bootstrap({"pool": ref}, good, {**good, "logits": np.zeros((20, 3), np.float32)})
