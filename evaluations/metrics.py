"""The ADM evaluator's metric math: FID, sFID, Inception Score, improved precision and recall.

Every function follows openai/guided-diffusion's `evaluations/evaluator.py` (commit 22e0df8),
including its numerics: float32 means, float64 covariances (N - 1), scipy's sqrtm of
sigma_sample @ sigma_ref, float32 IS in consecutive splits of 5000, and k=3 manifold radii
from squared distances computed in float16 with a float32 fallback per 10000x10000 block.
All functions accept numpy arrays or torch tensors of any feature dimension.

    compute_all(ref, sample) -> {"inception_score", "fid", "sfid", "precision", "recall"}
    bootstrap(ref, sample) -> {metric: {value, std, ci_low, ci_high}}
    paired_bootstrap(ref, sample_a, sample_b) -> {metric: {a, b, delta, std, ci_low, ci_high, p_value}}
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import scipy
import torch
from scipy import linalg
from scipy.linalg import lapack

from softcfg_patch.precision import tf32
from softcfg_patch.versions import version_tuple

DISTANCE_RULES = ("fp16", "fp32")
FID_METHODS = ("sqrtm", "eigh")
POOL_DIM, SPATIAL_DIM, LOGIT_DIM = 2048, 2023, 1008


# ----------------------------------------------------------------------------- input checks

def _features(x, name: str, dim: int | None = None, min_rows: int = 1) -> np.ndarray:
    """A finite float32 [N, D] numpy array, or a ValueError that says what was wrong."""
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns, got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}; evaluate more images")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = np.unique(np.nonzero(~np.isfinite(x))[0])
        raise ValueError(f"{name} contains NaN/inf in {len(bad)} rows (first: {bad[:5].tolist()}); the "
                         f"network output is broken (bad weights, fp16 overflow?) - fix it and recompute")
    return x


# ----------------------------------------------------------------------------- FID / sFID

def statistics(features, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as ADM: float32 column means and the float64 unbiased covariance (N - 1).

    The covariance is accumulated over row chunks of the centred float64 features, which
    equals numpy.cov without its full float64 copy of a 50k x 2048 matrix.
    """
    x = _features(features, "features", min_rows=2)
    mu = np.mean(x, axis=0)  # float32, as np.mean of the float32 activations in ADM
    mean64 = np.mean(x, axis=0, dtype=np.float64)
    sigma = np.zeros((x.shape[1], x.shape[1]), dtype=np.float64)
    for start in range(0, len(x), chunk):
        centred = x[start:start + chunk].astype(np.float64) - mean64
        sigma += centred.T @ centred
    return mu, sigma / (len(x) - 1)


def _check_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.atleast_1d(np.asarray(mu)), np.atleast_2d(np.asarray(sigma))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mu/sigma contain NaN or inf; recompute the statistics")
    return mu, sigma


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # scipy 1.16 deprecated `disp` (removed in 1.18); before that, disp=True prints to stdout.
    if version_tuple(scipy.__version__) >= (1, 16):
        return linalg.sqrtm(a)
    return linalg.sqrtm(a, disp=False)[0]


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """tr sqrtm(sigma1 @ sigma2) exactly as ADM: eps retry on non-finite, imaginary-part check."""
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
                      stacklevel=3)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 @ sigma2); "
                             f"the covariances are not valid (too few samples for the feature dimension?)")
        covmean = covmean.real
    return np.trace(covmean)


def _psd_factor(sigma: np.ndarray) -> np.ndarray:
    """F [D, r] with sigma = F F^T, by pivoted Cholesky (LAPACK pstrf). r is the numerical rank:
    directions below D * eps * max(diag) are dropped, so a covariance of N < D rows costs O(D^2 N)."""
    c, piv, rank, info = lapack.dpstrf(np.asarray(sigma, dtype=np.float64), lower=1)
    if info < 0:
        raise ValueError(f"pivoted Cholesky failed (LAPACK info {info}); is sigma a covariance matrix?")
    factor = np.empty((sigma.shape[0], rank))
    factor[piv - 1] = np.tril(c)[:, :rank]  # undo the pivoting: sigma = (P L)(P L)^T
    return factor


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrtm(sigma1 @ sigma2) via symmetric eigenvalues: with sigma1 = F F^T, sigma1 @ sigma2
    has the nonzero eigenvalues of the PSD matrix F^T sigma2 F. Several times faster than sqrtm,
    fast for low-rank covariances and free of complex round-off; agrees with sqrtm to ~1e-9."""
    factor = _psd_factor(sigma1)
    inner = factor.T @ sigma2 @ factor
    eig = linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrtm(S1 S2). ADM passes the sample first.

    method "sqrtm" is ADM's exact code path (scipy.linalg.sqrtm); "eigh" computes the same trace
    from symmetric eigenvalues (scipy), much faster for 2048-d features on CPU.
    """
    if method not in FID_METHODS:
        raise ValueError(f"method must be one of {FID_METHODS}, got {method!r}")
    mu1, sigma1 = _check_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"statistics have different dimensions: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2  # float32 when both means are float32, as in ADM
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------- Inception Score

def _softmax32(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def inception_score_splits(logits, split_size: int = 5000) -> list[float]:
    """Per-split Inception Scores: consecutive chunks of `split_size` rows in file order,
    the last chunk may be shorter; float32 throughout, as ADM."""
    x = _features(logits, "logits")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    scores = []
    for start in range(0, len(x), split_size):
        p = _softmax32(x[start:start + split_size])
        p_y = np.mean(p, axis=0, keepdims=True)
        kl = np.mean(np.sum(p * (np.log(p) - np.log(p_y)), axis=1))
        scores.append(np.exp(kl))
    scores = np.asarray(scores, dtype=np.float32)
    if not np.isfinite(scores).all():
        raise ValueError("Inception Score is not finite: a softmax probability underflowed to 0 (logits "
                         "spread > ~100); check that `logits` are the network's unbiased logits")
    return [float(s) for s in scores]


def inception_score(logits, split_size: int = 5000) -> float:
    """ADM's Inception Score from unbiased logits [N, C]: the plain mean of the split scores."""
    return float(np.mean(np.asarray(inception_score_splits(logits, split_size), dtype=np.float32)))


# ----------------------------------------------------------------------------- precision / recall

def _prepare(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What every distance block of one feature set needs, computed once: the float32 rows and
    norms (fallback) and the float16-cast rows (float32 storage, for the GEMM) and float16 norms."""
    x = x.float()
    h = x.to(torch.float16)
    return {"x32": x, "n32": (x * x).sum(1), "x16": h.float(), "n16": (h * h).sum(1, dtype=torch.float32).half()}


def _rows(prepared: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in prepared.items()}


def _block_distances(a: dict, b: dict, distance: str, sub_rows: int = 2048) -> torch.Tensor:
    """Squared distances between two prepared blocks, float32 [len(a), len(b)].

    "fp16" is ADM's DistanceBlock: TF evaluates max((|u|^2 - 2 u.v) + |v|^2, 0) on float16
    tensors, and uses the result only if every entry of the block is finite, else recomputes
    the block in float32. Here the squares and dot products are taken in float32 from the
    float16-cast inputs (exact products, float32 accumulation) and rounded once; the other steps
    run on torch float16 tensors, which compute in float32 and round - equal to native float16
    operations since float32 has 24 >= 2 * 11 + 2 bits (double rounding is harmless).
    """
    out = torch.empty(len(a["x32"]), len(b["x32"]), dtype=torch.float32, device=a["x32"].device)
    with tf32(False):
        if distance == "fp16":
            for s in range(0, len(out), sub_rows):  # bounds the temporaries of 10000 x 10000 blocks
                g = (a["x16"][s:s + sub_rows] @ b["x16"].t()).half()
                d = (a["n16"][s:s + sub_rows, None] - 2 * g) + b["n16"][None, :]
                out[s:s + sub_rows] = torch.clamp_min(d, 0)  # NaN stays NaN, as in tf.maximum
            # entries are >= 0 and <= 65504, so the float32 sum is finite iff every entry is
            if bool(torch.isfinite(out.sum())):
                return out
        for s in range(0, len(out), sub_rows):
            g = a["x32"][s:s + sub_rows] @ b["x32"].t()
            out[s:s + sub_rows] = torch.clamp_min((a["n32"][s:s + sub_rows, None] - 2 * g) + b["n32"][None, :], 0)
    return out


def pairwise_distances(u: torch.Tensor, v: torch.Tensor, distance: str = "fp16") -> torch.Tensor:
    """Squared distances of one block (float32) under ADM's "fp16" rule or plain "fp32"."""
    if distance not in DISTANCE_RULES:
        raise ValueError(f"distance must be one of {DISTANCE_RULES}, got {distance!r}")
    return _block_distances(_prepare(u), _prepare(v), distance)


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def manifold_radii(features, k: int = 3, row_batch_size: int = 10000, col_batch_size: int = 10000,
                   distance: str = "fp16", device=None) -> np.ndarray:
    """Squared distance of each vector to its k-th nearest other vector (float32 [N]).

    Distances are computed in ADM's row x column blocks (the fp16/fp32 choice is per block),
    keeping a running k+1 smallest per row (the vector itself counts, at distance ~0).
    """
    if distance not in DISTANCE_RULES:
        raise ValueError(f"distance must be one of {DISTANCE_RULES}, got {distance!r}")
    x = _prepare(torch.from_numpy(_features(features, "features", min_rows=k + 1)).to(_device(device)))
    n = len(x["x32"])
    radii = np.empty(n, dtype=np.float32)
    for r in range(0, n, row_batch_size):
        rows, best = _rows(x, r, r + row_batch_size), None
        for c in range(0, n, col_batch_size):
            block = _block_distances(rows, _rows(x, c, c + col_batch_size), distance)
            if best is not None:
                block = torch.cat([best, block], 1)
            best = torch.topk(block, min(k + 1, block.shape[1]), dim=1, largest=False).values
        radii[r:r + len(best)] = best[:, k].cpu().numpy()
    return radii


def manifold_membership(ref_features, ref_radii, sample_features, sample_radii,
                        row_batch_size: int = 10000, col_batch_size: int = 10000,
                        distance: str = "fp16", device=None) -> tuple[np.ndarray, np.ndarray]:
    """(sample_in_ref, ref_in_sample) bool arrays: whether a sample lies in some reference ball
    d(s, r) <= radius(r), and whether a reference lies in some sample ball (ties count)."""
    if distance not in DISTANCE_RULES:
        raise ValueError(f"distance must be one of {DISTANCE_RULES}, got {distance!r}")
    dev = _device(device)
    ref = torch.from_numpy(_features(ref_features, "ref_features")).to(dev)
    sample = torch.from_numpy(_features(sample_features, "sample_features")).to(dev)
    if ref.shape[1] != sample.shape[1]:
        raise ValueError(f"reference and sample features differ in dimension: {ref.shape[1]} vs {sample.shape[1]}")
    r_rad = torch.from_numpy(np.asarray(ref_radii, dtype=np.float32)).to(dev)
    s_rad = torch.from_numpy(np.asarray(sample_radii, dtype=np.float32)).to(dev)
    if r_rad.shape != (len(ref),) or s_rad.shape != (len(sample),):
        raise ValueError("radii must have one entry per feature row")
    ref, sample = _prepare(ref), _prepare(sample)
    sample_in = torch.zeros(len(s_rad), dtype=torch.bool, device=dev)
    ref_in = torch.zeros(len(r_rad), dtype=torch.bool, device=dev)
    for r in range(0, len(r_rad), row_batch_size):
        for c in range(0, len(s_rad), col_batch_size):
            d = _block_distances(_rows(ref, r, r + row_batch_size), _rows(sample, c, c + col_batch_size), distance)
            ref_in[r:r + row_batch_size] |= (d <= s_rad[None, c:c + col_batch_size]).any(1)
            sample_in[c:c + col_batch_size] |= (d <= r_rad[r:r + row_batch_size, None]).any(0)
    return sample_in.cpu().numpy(), ref_in.cpu().numpy()


def precision_recall(ref_feats, sample_feats, k: int = 3, row_batch_size: int = 10000,
                     col_batch_size: int = 10000, distance: str = "fp16", device=None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al.) with ADM's manifold estimator.

    precision = fraction of samples inside the reference manifold, recall = fraction of
    references inside the sample manifold. Needs more than k rows in each set.
    """
    opts = dict(row_batch_size=row_batch_size, col_batch_size=col_batch_size, distance=distance, device=device)
    ref = _features(ref_feats, "ref_feats", min_rows=k + 1)
    sample = _features(sample_feats, "sample_feats", min_rows=k + 1)
    if ref.shape[1] != sample.shape[1]:
        raise ValueError(f"ref_feats and sample_feats differ in dimension: {ref.shape[1]} vs {sample.shape[1]}")
    ref_radii = manifold_radii(ref, k, **opts)
    sample_radii = manifold_radii(sample, k, **opts)
    sample_in, ref_in = manifold_membership(ref, ref_radii, sample, sample_radii, **opts)
    return float(np.mean(sample_in, dtype=np.float64)), float(np.mean(ref_in, dtype=np.float64))


# ----------------------------------------------------------------------------- all five

def _stats_of(batch: dict, key: str, mu_key: str, sigma_key: str, dim: int, name: str):
    """Precomputed statistics when the batch carries them (ADM's npz `mu`/`sigma`), else computed."""
    if batch.get(mu_key) is not None:
        if batch.get(sigma_key) is None:
            raise ValueError(f"{name} has '{mu_key}' but no '{sigma_key}'; provide both or neither")
        mu, sigma = _check_stats(batch[mu_key], batch[sigma_key], f"{name} {mu_key}/{sigma_key}")
        if mu.shape[0] != dim:
            raise ValueError(f"{name} '{mu_key}' has dimension {mu.shape[0]}, expected {dim}")
        return mu, sigma
    if batch.get(key) is None:
        raise ValueError(f"{name} needs '{key}' features [N, {dim}] (or precomputed '{mu_key}'/'{sigma_key}')")
    return statistics(_features(batch[key], f"{name} {key}", dim=dim, min_rows=2))


def compute_all(ref: dict, sample: dict, *, split_size: int = 5000, k: int = 3, distance: str = "fp16",
                fid_method: str = "sqrtm", row_batch_size: int = 10000, col_batch_size: int = 10000,
                device=None) -> dict[str, float]:
    """The five ADM numbers from Inception activations.

    ref / sample: dicts with `pool` [N, 2048], `spatial` [N, 2023] (ADM order) and, for the
    sample, `logits` [N, 1008] (unbiased). A dict may also carry precomputed `mu`, `sigma`
    (pool) and `mu_s`, `sigma_s` (spatial); as in ADM these then replace its own statistics
    for FID / sFID, while precision and recall still use its `pool` rows.
    """
    if "logits" not in sample:
        raise ValueError("sample needs 'logits' [N, 1008] (unbiased Inception logits) for the Inception Score")
    ref_pool = _features(ref["pool"], "ref pool", dim=POOL_DIM, min_rows=k + 1) if "pool" in ref else None
    sample_pool = (_features(sample["pool"], "sample pool", dim=POOL_DIM, min_rows=k + 1)
                   if "pool" in sample else None)
    if ref_pool is None or sample_pool is None:
        raise ValueError("ref and sample both need 'pool' features [N, 2048] for precision and recall")
    logits = _features(sample["logits"], "sample logits", dim=LOGIT_DIM)
    if len(logits) != len(sample_pool):
        raise ValueError(f"sample logits have {len(logits)} rows but pool has {len(sample_pool)}")
    ref_pool_stats = _stats_of({**ref, "pool": ref_pool}, "pool", "mu", "sigma", POOL_DIM, "ref")
    sample_pool_stats = _stats_of({**sample, "pool": sample_pool}, "pool", "mu", "sigma", POOL_DIM, "sample")
    ref_spatial_stats = _stats_of(ref, "spatial", "mu_s", "sigma_s", SPATIAL_DIM, "ref")
    sample_spatial_stats = _stats_of(sample, "spatial", "mu_s", "sigma_s", SPATIAL_DIM, "sample")
    precision, recall = precision_recall(ref_pool, sample_pool, k=k, row_batch_size=row_batch_size,
                                         col_batch_size=col_batch_size, distance=distance, device=device)
    return {
        "inception_score": inception_score(logits, split_size),
        "fid": frechet_distance(*sample_pool_stats, *ref_pool_stats, method=fid_method),
        "sfid": frechet_distance(*sample_spatial_stats, *ref_spatial_stats, method=fid_method),
        "precision": precision,
        "recall": recall,
    }


# ----------------------------------------------------------------------------- bootstrap
#
# How sure is a FID? Resample the sample set's rows with replacement (the reference statistics
# stay fixed: ADM's reference batch is given) and recompute every metric on each resample. A
# resample is a vector of counts c (how often each row was drawn), so its statistics are
# weighted sums over the original rows: nothing is copied, and the Frechet trace needs one
# small weighted covariance and one symmetric eigendecomposition per resample (see _FrechetTerms).

MIN_RESAMPLES = 10
Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal


def _check_resamples(num_resamples: int) -> None:
    if int(num_resamples) != num_resamples or num_resamples < MIN_RESAMPLES:
        raise ValueError(f"num_resamples must be a whole number >= {MIN_RESAMPLES} (a standard deviation from "
                         f"fewer resamples is noise), got {num_resamples}; use 100 or more")


def resample_counts(n: int, num_resamples: int, seed: int, block: int = 5000) -> torch.Tensor:
    """Bootstrap counts [num_resamples, n] (int64), drawn on the CPU from `seed` so that results
    do not depend on the device. Rows are resampled within consecutive blocks of `block` rows
    (the Inception Score's splits), so every split keeps its size; for n <= block this is the
    plain bootstrap."""
    gen = torch.Generator().manual_seed(int(seed))
    start = torch.arange(n) // block * block
    length = torch.clamp(n - start, max=block)
    u = torch.rand(num_resamples, n, generator=gen, dtype=torch.float64)
    idx = start + torch.clamp((u * length).long(), max=length - 1)
    counts = torch.zeros(num_resamples, n, dtype=torch.int64)
    return counts.scatter_add_(1, idx, torch.ones_like(idx))


class _FrechetTerms:
    """Frechet distances of reweighted copies of one sample set to a fixed reference.

    With the reference covariance factored once as F F^T, tr sqrt(S_c S_ref) is the sum of
    square roots of the eigenvalues of F^T S_c F, which is the covariance of the projected rows
    Y = (X - mean) F under the same weights. So each resample costs one weighted Gram matrix of
    Y (N x r) and one eigvalsh of r x r, batched, in float64 on the device. With fewer rows than
    r, the same nonzero eigenvalues come from an N x N matrix: with P = I - 1 c^T / N, the
    weighted covariance is Y^T P^T diag(c) P Y / (N - 1), whose eigenvalues are those of
    diag(sqrt c) P (Y Y^T) P^T diag(sqrt c) / (N - 1), and Y Y^T is computed once.
    """

    def __init__(self, features: np.ndarray, mu_ref, sigma_ref, device: torch.device):
        mu_ref, sigma_ref = _check_stats(mu_ref, sigma_ref, "reference statistics")
        self.ref_stats = (mu_ref, sigma_ref)
        if mu_ref.shape[0] != features.shape[1]:
            raise ValueError(f"reference and sample features differ in dimension: {mu_ref.shape[0]} vs "
                             f"{features.shape[1]}")
        x = torch.from_numpy(features).to(device, torch.float64)
        self.n, self.mean = len(x), x.mean(0)
        self.x = x - self.mean  # centred: keeps the weighted sums well conditioned
        self.sq = (self.x * self.x).sum(1)
        factor = torch.from_numpy(_psd_factor(sigma_ref)).to(device)
        self.y = self.x @ factor
        self.gram = self.y @ self.y.T if self.n < factor.shape[1] else None
        self.mu_ref = torch.from_numpy(np.asarray(mu_ref, dtype=np.float64)).to(device)
        self.tr_ref = float(np.trace(sigma_ref))

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        """FID for each row of `weights` [B, N] (resample counts, each row summing to N)."""
        n = self.n
        m_x = weights @ self.x / n                                          # [B, D], centred mean
        tr = ((weights @ self.sq) - n * (m_x * m_x).sum(1)) / (n - 1)       # tr S_c
        inner = self._inner(weights)
        eig = torch.linalg.eigvalsh((inner + inner.transpose(1, 2)) / 2)
        diff = self.mean + m_x - self.mu_ref
        return (diff * diff).sum(1) + tr + self.tr_ref - 2 * eig.clamp_min(0).sqrt().sum(1)


    def _inner(self, weights: torch.Tensor) -> torch.Tensor:
        """[B, k, k] matrices whose eigenvalues are those of F^T S_c F (k = min(N, r))."""
        n = self.n
        if self.gram is None:
            m_y = weights @ self.y / n
            inner = torch.stack([(self.y * w[:, None]).T @ self.y for w in weights])
            return (inner - n * m_y[:, :, None] * m_y[:, None, :]) / (n - 1)
        cg = weights @ self.gram  # c^T G, [B, N]
        centred = (self.gram - cg[:, None, :] / n - cg[:, :, None] / n
                   + (cg * weights).sum(1)[:, None, None] / n ** 2)  # P G P^T
        root = weights.sqrt()
        return root[:, :, None] * centred * root[:, None, :] / (n - 1)


class _InceptionScoreTerms:
    """Inception Scores of reweighted copies of the logits, split by split as ADM (float64):
    with counts c over a split of L rows, p_y = sum c_i p_i / L and
    IS_split = exp(sum c_i H_i / L - p_y . log p_y), H_i = p_i . log p_i."""

    def __init__(self, logits: np.ndarray, split_size: int, device: torch.device):
        z = torch.from_numpy(logits).to(device, torch.float64)
        self.p = torch.softmax(z, 1)
        self.h = (self.p * torch.log_softmax(z, 1)).sum(1)
        self.splits = [(s, min(s + split_size, len(z))) for s in range(0, len(z), split_size)]

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        scores = []
        for start, stop in self.splits:
            w = weights[:, start:stop]
            p_y = w @ self.p[start:stop] / (stop - start)
            kl = w @ self.h[start:stop] / (stop - start) - torch.special.xlogy(p_y, p_y).sum(1)  # 0 log 0 = 0
            scores.append(torch.exp(kl))
        return torch.stack(scores, 1).mean(1)


def _check_split_size(split_size: int) -> None:
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")


def _bootstrap_terms(ref: dict, sample: dict, name: str, device: torch.device, split_size: int,
                     ref_stats: dict | None = None) -> dict:
    """{metric: callable(weights [B, N]) -> values [B]} for what `sample` carries: fid (`pool`),
    sfid (`spatial`), inception_score (`logits`); every array the same number of rows.
    `ref_stats` caches the reference statistics between calls."""
    _check_split_size(split_size)
    terms, rows, ref_stats = {}, {}, {} if ref_stats is None else ref_stats
    for metric, key, mu_key, sigma_key in (("fid", "pool", "mu", "sigma"), ("sfid", "spatial", "mu_s", "sigma_s")):
        if sample.get(key) is None:
            continue
        x = _features(sample[key], f"{name} {key}", min_rows=2)
        rows[key] = len(x)
        if key not in ref_stats:
            ref_stats[key] = _stats_of(ref, key, mu_key, sigma_key, x.shape[1], "ref")
        terms[metric] = _FrechetTerms(x, *ref_stats[key], device)
    if sample.get("logits") is not None:
        logits = _features(sample["logits"], f"{name} logits", min_rows=2)
        rows["logits"] = len(logits)
        terms["inception_score"] = _InceptionScoreTerms(logits, split_size, device)
    if not terms:
        raise ValueError(f"{name} needs at least one of 'pool', 'spatial' (features [N, D]) or 'logits' [N, C]")
    if len(set(rows.values())) > 1:
        raise ValueError(f"{name} arrays have different numbers of rows: {rows}; they must describe the same images")
    return terms


def _full_values(sample: dict, terms: dict, split_size: int, fid_method: str) -> dict:
    """The metrics of the whole set as the evaluator reports them (ADM's numerics)."""
    out = {}
    for metric, key in (("fid", "pool"), ("sfid", "spatial")):
        if metric in terms:
            out[metric] = frechet_distance(*statistics(sample[key]), *terms[metric].ref_stats, method=fid_method)
    if "inception_score" in terms:
        out["inception_score"] = inception_score(sample["logits"], split_size)
    return out


def _resampled(terms: dict, counts: torch.Tensor, device: torch.device, batch: int) -> dict:
    """{metric: float64 numpy [num_resamples]} over the resamples, `batch` resamples at a time."""
    out = {m: [] for m in terms}
    for start in range(0, len(counts), batch):
        w = counts[start:start + batch].to(device, torch.float64)
        for metric, term in terms.items():
            out[metric].append(term(w).cpu())
    return {m: torch.cat(v).numpy() for m, v in out.items()}


def _add_precision_recall(ref: dict, sample: dict, counts: torch.Tensor, k: int, device, values: dict,
                          draws: dict) -> None:
    """Full-set precision and recall into `values` (as `precision_recall`), per resample into `draws`.

    The reference manifold is fixed, so a resample's precision is the count-weighted share of
    samples inside it. The sample manifold is rebuilt from the resample's unique rows (a
    repeated row would have a k-NN radius of zero), which costs a k-NN search each."""
    ref_pool = _features(ref.get("pool"), "ref pool", min_rows=k + 1)
    pool = _features(sample["pool"], "sample pool", dim=ref_pool.shape[1], min_rows=k + 1)
    ref_radii = manifold_radii(ref_pool, k, device=device)
    sample_in, ref_in = manifold_membership(ref_pool, ref_radii, pool, manifold_radii(pool, k, device=device),
                                            device=device)
    values["precision"] = float(np.mean(sample_in, dtype=np.float64))
    values["recall"] = float(np.mean(ref_in, dtype=np.float64))
    precision = counts.double().numpy() @ sample_in.astype(np.float64) / len(pool)
    recall = []
    for c in counts.numpy():
        unique = pool[c > 0]
        if len(unique) <= k:
            raise ValueError(f"a resample has only {len(unique)} distinct rows; precision/recall need more than "
                             f"k={k}: use more samples or leave precision/recall out")
        _, ref_inside = manifold_membership(ref_pool, ref_radii, unique, manifold_radii(unique, k, device=device),
                                            device=device)
        recall.append(float(np.mean(ref_inside, dtype=np.float64)))
    draws.update({"precision": precision, "recall": np.asarray(recall)})


def _interval(value: float, std: float) -> tuple[float, float]:
    return value - Z95 * std, value + Z95 * std


def bootstrap(ref: dict, sample: dict, num_resamples: int = 100, seed: int = 0, *,
              precision_recall: bool = False, split_size: int = 5000, k: int = 3, fid_method: str = "eigh",
              batch: int = 8, device=None, values: dict | None = None) -> dict[str, dict[str, float]]:
    """Bootstrap uncertainty of the metrics of one sample set against a fixed reference.

    ref / sample: the dicts `compute_all` takes, any feature dimension: fid needs `pool` in the
    sample (and `pool` or `mu`/`sigma` in ref), sfid `spatial` (or `mu_s`/`sigma_s`),
    inception_score the sample's `logits`; metrics whose inputs are absent are left out.
    Precision and recall (`precision_recall=True`) need `pool` in both and cost one k-NN search
    per resample.

    Returns {metric: {value, std, ci_low, ci_high}}: value = the full-set metric (ADM's number;
    FID with `fid_method`), std = the standard deviation over `num_resamples` resamples (rows
    drawn with replacement within the Inception Score's splits of `split_size` rows), and the
    95 % interval value +- 1.96 std. Not a percentile interval: resampling repeats rows, which
    lowers the effective N, so FID's bootstrap distribution sits above the value and its
    percentiles can miss the value entirely; its spread is still the sampling noise of the value.
    Deterministic for a given seed, on any device. `values`: the full-set metrics if already
    computed (`compute_all`'s dict); they become the centres and are not computed again.
    """
    _check_resamples(num_resamples)
    dev = _device(device)
    terms = _bootstrap_terms(ref, sample, "sample", dev, split_size)
    counts = resample_counts(_num_rows(sample), num_resamples, seed, split_size)
    full = _full_values(sample, terms, split_size, fid_method) if values is None else {m: values[m] for m in terms}
    draws = _resampled(terms, counts, dev, batch)
    if precision_recall:
        _add_precision_recall(ref, sample, counts, k, dev, full, draws)
    if values is not None:
        full.update({m: values[m] for m in full if m in values})
    out = {}
    for metric, value in full.items():
        std = float(np.std(draws[metric], ddof=1))
        low, high = _interval(value, std)
        out[metric] = {"value": float(value), "std": std, "ci_low": low, "ci_high": high}
    return out


def paired_bootstrap(ref: dict, sample_a: dict, sample_b: dict, num_resamples: int = 200, seed: int = 0, *,
                     precision_recall: bool = False, split_size: int = 5000, k: int = 3, fid_method: str = "eigh",
                     batch: int = 8, device=None) -> dict[str, dict[str, float]]:
    """Is B better than A? The two sample sets are paired row by row (same class label and seed,
    as the samplers produce for two guidance settings), so one set of resampled row indices is
    applied to both: noise shared by a pair of rows cancels in the difference.

    Returns per metric {a, b, delta, std, ci_low, ci_high, p_value, a_std, b_std}: a and b the
    full-set values, delta = b - a, std the bootstrap std of the resampled deltas, the 95 %
    interval delta +- 1.96 std, and the two-sided p-value of delta = 0 from the normal
    approximation 2 (1 - Phi(|delta| / std)), consistent with the interval (a resampling count
    cannot resolve small p-values). a_std / b_std: each set's own bootstrap std.
    Precision and recall (`precision_recall=True`) rebuild the sample manifold on unique rows.
    """
    _check_resamples(num_resamples)
    dev = _device(device)
    ref_stats = {}
    terms_a = _bootstrap_terms(ref, sample_a, "sample_a", dev, split_size, ref_stats)
    terms_b = _bootstrap_terms(ref, sample_b, "sample_b", dev, split_size, ref_stats)
    if set(terms_a) != set(terms_b):
        raise ValueError(f"sample_a and sample_b carry different arrays ({sorted(terms_a)} vs {sorted(terms_b)})")
    n_a, n_b = (_num_rows(s) for s in (sample_a, sample_b))
    if n_a != n_b:
        raise ValueError(f"paired sets need the same number of rows, got {n_a} (A) and {n_b} (B); pair row i of A "
                         f"with row i of B (same label and seed), or use the unpaired bootstrap on each")
    counts = resample_counts(n_a, num_resamples, seed, split_size)
    values_a = _full_values(sample_a, terms_a, split_size, fid_method)
    values_b = _full_values(sample_b, terms_b, split_size, fid_method)
    draws_a, draws_b = _resampled(terms_a, counts, dev, batch), _resampled(terms_b, counts, dev, batch)
    if precision_recall:
        for values, draws, sample in ((values_a, draws_a, sample_a), (values_b, draws_b, sample_b)):
            _add_precision_recall(ref, sample, counts, k, dev, values, draws)
    out = {}
    for metric in values_a:
        a, b = float(values_a[metric]), float(values_b[metric])
        std = float(np.std(draws_b[metric] - draws_a[metric], ddof=1))
        low, high = _interval(b - a, std)
        out[metric] = {"a": a, "b": b, "delta": b - a, "std": std, "ci_low": low, "ci_high": high,
                       "p_value": two_sided_p(b - a, std),
                       "a_std": float(np.std(draws_a[metric], ddof=1)),
                       "b_std": float(np.std(draws_b[metric], ddof=1))}
    return out


def _num_rows(sample: dict) -> int:
    for key in ("pool", "spatial", "logits"):
        if sample.get(key) is not None:
            return len(sample[key])
    return 0


def two_sided_p(delta: float, std: float) -> float:
    """2 (1 - Phi(|delta| / std)) from the normal approximation; 1 for delta = 0."""
    if delta == 0:
        return 1.0
    if std <= 0:
        return 0.0
    return float(math.erfc(abs(delta) / std / math.sqrt(2)))
