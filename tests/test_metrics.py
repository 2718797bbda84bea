"""ADM metric math vs the golden activations of tests/fixtures/evaluator (made by running the
upstream evaluator's own numpy/scipy code; see that folder's README)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluations import metrics as M

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "evaluator"
NAMES = {"ref_pool": ("ref_pool_q", "feature_scale"), "ref_spatial": ("ref_spatial_q", "feature_scale"),
         "sample_pool": ("sample_pool_q", "feature_scale"), "sample_spatial": ("sample_spatial_q", "feature_scale"),
         "sample_logits": ("sample_logits_q", "logit_scale")}


@pytest.fixture(scope="module")
def golden() -> dict:
    raw = np.load(GOLDEN / "evaluator_golden.npz")
    data = {k: raw[k] for k in raw.files}
    for name, (codes, scale) in NAMES.items():  # power-of-two scales: the decoding is exact
        data[name] = data[codes].astype(np.float32) * np.float32(data[scale])
    data["expected"] = json.loads((GOLDEN / "evaluator_expected.json").read_text())
    return data


@pytest.fixture(scope="module")
def stats(golden) -> dict:
    return {name: M.statistics(golden[name]) for name in NAMES if not name.endswith("logits")}


@pytest.fixture(scope="module")
def main_results(golden) -> dict:
    ref = {"pool": golden["ref_pool"], "spatial": golden["ref_spatial"]}
    sample = {"pool": golden["sample_pool"], "spatial": golden["sample_spatial"], "logits": golden["sample_logits"]}
    return M.compute_all(ref, sample, fid_method="eigh", device="cpu")


def test_golden_decoding(golden):
    for name, digest in golden["expected"]["meta"]["sha256_float32"].items():
        assert hashlib.sha256(np.ascontiguousarray(golden[name]).tobytes()).hexdigest() == digest, name


def test_statistics_match_adm(golden, stats):
    for name, (mu, sigma) in stats.items():
        exp = golden["expected"]["statistics"][name]
        assert mu.dtype == np.float32 and sigma.dtype == np.float64
        assert np.array_equal(mu, golden[f"{name}_mu"]), name  # float32 means, bit for bit
        np.testing.assert_allclose(mu[:4], exp["mu_first4"], rtol=0, atol=0)
        np.testing.assert_allclose(np.trace(sigma), exp["sigma_trace"], rtol=1e-12)
        np.testing.assert_allclose(sigma.sum(), exp["sigma_sum"], rtol=1e-10)
        np.testing.assert_allclose([sigma[0, 0], sigma[0, 1]], [exp["sigma_00"], exp["sigma_01"]], rtol=1e-10)


def test_compute_all_golden_all_five(golden, main_results):
    exp = golden["expected"]["main"]
    assert list(main_results) == ["inception_score", "fid", "sfid", "precision", "recall"]
    assert abs(main_results["inception_score"] - exp["inception_score"]) <= 1e-5 * exp["inception_score"]
    assert abs(main_results["fid"] - exp["fid"]) <= 1e-5
    assert abs(main_results["sfid"] - exp["sfid"]) <= 1e-5
    assert main_results["precision"] == exp["precision"]  # the fp16 rule reproduces the counts exactly
    assert main_results["recall"] == exp["recall"]


def test_fid_sqrtm_route_equals_eigh_route(stats):
    # ADM's scipy sqrtm on a 256-d corner (each full 2048-d sqrtm takes minutes on 2 cores);
    # the float64 eigenvalues of the non-symmetric product are the independent referee.
    d = slice(0, 256)
    (m1, s1), (m2, s2) = stats["sample_pool"], stats["ref_pool"]
    m1, s1, m2, s2 = m1[d], s1[d, d], m2[d], s2[d, d]
    diff = m1 - m2  # float32, as ADM
    referee = diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    assert M.frechet_distance(m1, s1, m2, s2, method="sqrtm") == pytest.approx(referee, abs=1e-8)
    assert M.frechet_distance(m1, s1, m2, s2, method="eigh") == pytest.approx(referee, abs=1e-8)
    for method in M.FID_METHODS:  # a set against itself
        assert abs(M.frechet_distance(m2, s2, m2, s2, method=method)) <= 1e-8


@pytest.mark.skipif(not os.environ.get("SOFTCFG_SLOW_TESTS"), reason="full 2048-d sqrtm: set SOFTCFG_SLOW_TESTS=1")
def test_fid_sqrtm_full_golden(stats, golden):
    fid = M.frechet_distance(*stats["sample_pool"], *stats["ref_pool"], method="sqrtm")
    assert abs(fid - golden["expected"]["main"]["fid"]) <= 1e-8


@pytest.mark.parametrize("method", M.FID_METHODS)
def test_frechet_distance_closed_form_small_dim(method):
    # Diagonal Gaussians: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.linspace(0.5, 2.0, 64), np.linspace(1.5, 0.2, 64)
    mu1, mu2 = np.linspace(0, 1, 64), np.zeros(64)
    expected = mu1 @ mu1 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_small_n_rank_deficient_agrees():
    # 40 rows in 64 dims (singular covariances) - the digits-demo regime with few rows
    rng = np.random.default_rng(0)
    s1 = M.statistics(rng.standard_normal((40, 64)).astype(np.float32))
    s2 = M.statistics((rng.standard_normal((50, 64)) * 1.3 + 0.2).astype(np.float32))
    values = [M.frechet_distance(*s1, *s2, method=m) for m in M.FID_METHODS]
    assert np.isfinite(values).all() and values[0] == pytest.approx(values[1], rel=1e-6)
    assert abs(M.frechet_distance(*s1, *s1, method="eigh")) < 1e-8


def test_version_strings_compare_as_release_numbers(monkeypatch):
    from softcfg_patch.versions import version_tuple
    assert version_tuple("1.16.0rc1") == (1, 16, 0) and version_tuple("1.16rc1") == (1, 16)
    assert version_tuple("4.46.0.dev0") == (4, 46, 0) and version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert version_tuple("1.9.3") < (1, 16) <= version_tuple("1.16.0rc1") < version_tuple("1.16.1")
    with pytest.raises(ValueError, match="cannot read a version number from 'dev'"):
        version_tuple("dev")
    monkeypatch.setattr(M.scipy, "__version__", "1.16rc1")  # the sqrtm switch read int("16rc1")
    np.testing.assert_allclose(M._sqrtm(np.diag([4.0, 9.0])), np.diag([2.0, 3.0]))


def test_frechet_distance_errors():
    eye = np.eye(2)
    with pytest.raises(ValueError, match="Imaginary component"):  # ADM's check on invalid covariances
        M.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), eye)
    with pytest.raises(ValueError, match="different dimensions"):
        M.frechet_distance(np.zeros(2), eye, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"mu must be \[D\] and sigma \[D, D\]"):
        M.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), eye)
    with pytest.raises(ValueError, match="NaN"):
        M.frechet_distance(np.array([0.0, np.nan]), eye, np.zeros(2), eye)
    with pytest.raises(ValueError, match="method"):
        M.frechet_distance(np.zeros(2), eye, np.zeros(2), eye, method="newton")


@pytest.mark.parametrize("split", ["5000", "1000", "512"])
def test_inception_score_splits(golden, split):
    exp = golden["expected"]["inception_score_splits"][split]
    splits = M.inception_score_splits(golden["sample_logits"], int(split))
    np.testing.assert_allclose(splits, exp["per_split"], rtol=1e-5)
    assert M.inception_score(golden["sample_logits"], int(split)) == pytest.approx(exp["value"], rel=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_inception_score_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        M.inception_score(np.array([[0.0, np.nan], [1.0, 2.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="underflowed"):
        M.inception_score(np.array([[0.0, 200.0], [1.0, 2.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        M.inception_score(np.zeros(5))


def test_radii_and_memberships_match_fp16_rule(golden):
    ref_r = M.manifold_radii(golden["ref_pool"], device="cpu")
    sample_r = M.manifold_radii(golden["sample_pool"], device="cpu")
    assert np.array_equal(ref_r, golden["radii_ref_fp16"]) and np.array_equal(sample_r, golden["radii_sample_fp16"])
    s_in, r_in = M.manifold_membership(golden["ref_pool"], ref_r, golden["sample_pool"], sample_r, device="cpu")
    assert np.array_equal(s_in, golden["sample_in_ref_manifold_fp16"].astype(bool))
    assert np.array_equal(r_in, golden["ref_in_sample_manifold_fp16"].astype(bool))
    # swapped roles: precision and recall exchange
    r_in2, s_in2 = M.manifold_membership(golden["sample_pool"], sample_r, golden["ref_pool"], ref_r, device="cpu")
    exp = golden["expected"]["swapped"]
    assert (r_in2.mean(), s_in2.mean()) == (exp["precision"], exp["recall"])


def _fp16_rule_numpy(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The README's fp16 rule re-derived in numpy: each float16 op = exact float64 value rounded once."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)

    def f64(x):
        return x.astype(np.float64)

    nu = (f64(u16) ** 2).astype(np.float16).astype(np.float32).sum(1).astype(np.float16)
    nv = (f64(v16) ** 2).astype(np.float16).astype(np.float32).sum(1).astype(np.float16)
    g2 = (2 * f64((u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16))).astype(np.float16)
    d = (f64((f64(nu)[:, None] - f64(g2)).astype(np.float16)) + f64(nv)[None, :]).astype(np.float16)
    return np.maximum(d, np.float16(0)).astype(np.float32)


@pytest.mark.parametrize("scale", [0.001, 0.3, 3.0])
def test_fp16_rule_bit_exact_on_random_data(scale):
    # unlike the golden data, these values round at every step (magnitudes from 1e-3 to ~4e4)
    rng = np.random.default_rng(7)
    u = (rng.standard_normal((120, 40)) * scale * rng.uniform(0.5, 2, (120, 1))).astype(np.float32)
    v = (rng.standard_normal((90, 40)) * scale).astype(np.float32)
    v[:30] = u[:30]
    expected = _fp16_rule_numpy(u, v)
    assert np.isfinite(expected).all()
    got = M.pairwise_distances(torch.from_numpy(u), torch.from_numpy(v), "fp16").numpy()
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, M.pairwise_distances(torch.from_numpy(u), torch.from_numpy(v), "fp32").numpy())


def test_precision_recall_fp32_matches_exact(golden):
    got = M.precision_recall(golden["ref_pool"], golden["sample_pool"], distance="fp32", device="cpu")
    assert got == tuple(golden["expected"]["precision_recall_variants"]["float32_distances"])
    assert np.array_equal(M.manifold_radii(golden["ref_pool"], distance="fp32"), golden["radii_ref_exact"])


def test_precision_recall_fp16_overflow_falls_back_to_fp32(golden):
    exp = golden["expected"]["fp16_overflow_fallback"]
    u, v = torch.from_numpy(golden["ref_pool"][:50] * 16), torch.from_numpy(golden["sample_pool"][:60] * 16)
    assert torch.equal(M.pairwise_distances(u, v, "fp16"), M.pairwise_distances(u, v, "fp32"))
    got = M.precision_recall(golden["ref_pool"] * 16, golden["sample_pool"] * 16, device="cpu")
    assert got == (exp["precision"], exp["recall"])


def test_precision_recall_small_blocks_unchanged(golden):
    # 1000-row blocks: several column blocks per row block exercise the running k-NN merge
    got = M.precision_recall(golden["ref_pool"], golden["sample_pool"], row_batch_size=1000,
                             col_batch_size=1000, device="cpu")
    variants = golden["expected"]["precision_recall_variants"]
    assert got == tuple(variants["fp16 rule with row/col batch 1000 instead of 10000"])


def test_precision_recall_small_n_small_dim_brute_force():
    # 64-d features with a few hundred rows and odd block sizes, against a float64 brute force
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((300, 64)).astype(np.float32)
    sample = (rng.standard_normal((250, 64)) * 1.1 + 0.3).astype(np.float32)

    def sqdist(a, b):
        a, b = a.astype(np.float64), b.astype(np.float64)
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(sqdist(ref, ref), 1)[:, 3]
    r_sample = np.sort(sqdist(sample, sample), 1)[:, 3]
    cross = sqdist(ref, sample)
    precision = (cross <= r_ref[:, None]).any(0).mean()
    recall = (cross <= r_sample[None, :]).any(1).mean()
    got = M.precision_recall(ref, sample, distance="fp32", row_batch_size=37, col_batch_size=41, device="cpu")
    assert got == pytest.approx((precision, recall), abs=1.5 / 250)
    fp16 = M.precision_recall(ref, sample, device="cpu")  # default rule, blocks larger than N
    assert fp16 == pytest.approx((precision, recall), abs=0.02)


def test_precision_recall_bad_input():
    x = np.zeros((10, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="at least 4 rows"):
        M.precision_recall(x[:3], x)
    with pytest.raises(ValueError, match="differ in dimension"):
        M.precision_recall(x, np.zeros((10, 9), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        M.precision_recall(x, np.full((10, 8), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="distance"):
        M.precision_recall(x, x, distance="bf16")


def test_compute_all_uses_precomputed_stats_and_checks_input(golden):
    ref = {"pool": golden["ref_pool"][:300], "spatial": None}
    sample = {"pool": golden["sample_pool"][:200], "logits": golden["sample_logits"][:200]}
    # ADM: stored mu/sigma replace a batch's own statistics for FID/sFID. Both batches get the
    # statistics of the same 50 rows (low rank keeps this fast), so both distances are ~0,
    # while precision/recall still use the pool rows.
    pool_stats = M.statistics(golden["sample_pool"][:50])
    spatial_stats = M.statistics(golden["sample_spatial"][:50])
    for batch in (ref, sample):
        batch["mu"], batch["sigma"] = pool_stats
        batch["mu_s"], batch["sigma_s"] = spatial_stats
    out = M.compute_all(ref, sample, fid_method="eigh", device="cpu")
    assert abs(out["fid"]) < 1e-6 and abs(out["sfid"]) < 1e-6
    assert (out["precision"], out["recall"]) == M.precision_recall(ref["pool"], sample["pool"], device="cpu")
    with pytest.raises(ValueError, match="logits"):
        M.compute_all(ref, {"pool": sample["pool"]})
    with pytest.raises(ValueError, match="2048 columns"):
        M.compute_all({"pool": golden["ref_pool"][:, :64]}, sample)
    with pytest.raises(ValueError, match="spatial"):
        M.compute_all({"pool": golden["ref_pool"][:300]}, sample)
    with pytest.raises(ValueError, match="'mu' but no 'sigma'"):
        M.compute_all({**ref, "sigma": None}, sample)
    bad = {**sample, "pool": np.where(np.arange(200)[:, None] == 7, np.nan, sample["pool"]).astype(np.float32)}
    with pytest.raises(ValueError, match=r"NaN/inf in 1 rows \(first: \[7\]\)"):
        M.compute_all(ref, bad)
