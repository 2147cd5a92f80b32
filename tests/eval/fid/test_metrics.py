"""FID, IS and precision / recall on synthetic features with closed-form or independently computed answers."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from eval.fid.metrics import frechet_distance, gaussian_stats, inception_score, precision_recall


def scipy_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The reference formula as ADM's evaluator and pytorch-fid compute it: a matrix square root by sqrtm."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def random_covariance(rng, dim: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((dim, rank or 2 * dim))
    return a @ a.T / a.shape[1]


def test_fid_of_diagonal_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    s1, s2 = rng.uniform(0.1, 3, 64), rng.uniform(0.1, 3, 64)
    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(closed_form, rel=1e-10)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("rank", [None, 20])  # full-rank and singular (fewer samples than dimensions) covariances
def test_fid_matches_scipy_sqrtm_reference(rank):
    rng = np.random.default_rng(1)
    dim = 48
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim) * 0.5
    sigma1, sigma2 = random_covariance(rng, dim, rank), random_covariance(rng, dim, rank)
    expected = scipy_frechet_distance(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_gaussian_stats_are_mean_and_unbiased_covariance():
    features = np.random.default_rng(2).standard_normal((50, 5))
    mu, sigma = gaussian_stats(features)
    centred = features - features.mean(0)
    assert np.allclose(mu, features.mean(0)) and np.allclose(sigma, centred.T @ centred / 49)
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(features[:1])


def test_fid_rejects_statistics_of_different_layers():
    with pytest.raises(ValueError, match="same feature layer"):
        frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))


@pytest.mark.parametrize("confidence", [0.999, 0.6, 1 / 8])
def test_inception_score_closed_form(confidence):
    """Balanced classes, each sample puts `confidence` on its class and spreads the rest evenly: the marginal is
    uniform, so IS = exp(a·log(a·C) + (1 − a)·log((1 − a)·C / (C − 1))); a = 1/C gives 1, a → 1 gives C."""
    classes, per_class = 8, 5
    a = confidence
    probs = np.full((classes * per_class, classes), (1 - a) / (classes - 1))
    probs[np.arange(classes * per_class), np.arange(classes * per_class) % classes] = a
    logits = np.log(probs) + 3.0  # a constant shift must not matter
    expected = np.exp(a * np.log(a * classes) + (1 - a) * np.log((1 - a) * classes / (classes - 1)))
    assert inception_score(logits) == pytest.approx(expected, rel=1e-9)


def test_inception_score_averages_over_splits():
    """Two splits: one confident and balanced (IS = C), one uniform (IS = 1) → mean (C + 1) / 2."""
    classes = 4
    confident = np.eye(classes)[np.arange(8) % classes] * 50.0
    uniform = np.zeros((8, classes))
    assert inception_score(np.concatenate([confident, uniform]), split_size=8) == pytest.approx((classes + 1) / 2,
                                                                                                rel=1e-6)


def line(xs) -> np.ndarray:
    """Points on a line, embedded in 3-D (distances are |Δx|)."""
    xs = np.asarray(xs, dtype=np.float64)
    return np.stack([xs, np.zeros_like(xs), np.zeros_like(xs)], axis=1)


def test_precision_recall_on_point_clouds_with_a_known_answer():
    """Reference: x = 0…99. Samples: copies of 0…49 plus 50 far points. Precision = 50/100. Recall: reference
    points up to 52 are covered (sample 49's 3rd neighbour is 46, radius 3; sample 48's radius is 2), so 53/100."""
    reference = line(range(100))
    samples = line(list(range(50)) + list(range(1000, 1050)))
    precision, recall = precision_recall(reference, samples, row_batch=7)  # small blocks exercise the batching
    assert precision == pytest.approx(0.5) and recall == pytest.approx(0.53)
    assert precision_recall(reference, reference) == (1.0, 1.0)
    assert precision_recall(reference, line(np.arange(100) + 500.0)) == (0.0, 0.0)


def test_precision_recall_matches_a_brute_force_count():
    rng = np.random.default_rng(3)
    reference, samples = rng.standard_normal((60, 5)), rng.standard_normal((40, 5)) + 0.7

    def brute(manifold, points, k=3):
        d_mm = ((manifold[:, None] - manifold[None]) ** 2).sum(-1)
        radii = np.sort(d_mm, axis=1)[:, k]
        d_pm = ((points[:, None] - manifold[None]) ** 2).sum(-1)
        return float((d_pm <= radii[None]).any(1).mean())

    precision, recall = precision_recall(reference, samples, row_batch=16)
    assert precision == pytest.approx(brute(reference, samples)) and recall == pytest.approx(brute(samples, reference))
