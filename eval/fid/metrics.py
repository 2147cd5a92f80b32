"""The sample-quality metrics of the ADM evaluator (guided-diffusion `evaluations/evaluator.py`) on Inception features.

- FID / sFID: Fréchet distance between Gaussians fitted to two feature sets (mean, unbiased covariance).
- Inception Score: exp(E_x KL(p(y|x) ‖ p(y))) per split of 5,000 samples, averaged over splits.
- Precision / recall (Kynkäänniemi et al. 2019): k-NN manifolds with k = 3 on squared Euclidean distances; a point
  is inside a manifold when it lies within some manifold point's distance to that point's k-th nearest neighbour.

Everything is numerically independent of the network that produced the features, so it is tested on synthetic
features with closed-form answers.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

IS_SPLIT_SIZE = 5000  # ADM's (and improved-GAN's) split size
PR_NEIGHBOURS = 3  # ADM's nhood_sizes=[3]


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (N - 1), in float64, as ADM's `compute_statistics`."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors as an (N, D) array, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½.

    With Σ1 = F Fᵀ (pivoted Cholesky), Σ1 Σ2 has the eigenvalues of the symmetric PSD matrix Fᵀ Σ2 F, so the
    trace term is Σ √λ from one symmetric eigenvalue solve. This is exact for singular covariances too and avoids
    `scipy.linalg.sqrtm`'s complex round-off, which ADM's evaluator patches with an ε·I offset.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape} (are both from the same feature layer?)")
    factor = _psd_factor(sigma1)
    middle = factor.T @ sigma2 @ factor
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _psd_factor(sigma: np.ndarray) -> np.ndarray:
    """F (D, rank) with F Fᵀ = Σ for a covariance Σ, by LAPACK's pivoted Cholesky (`dpstrf`, rank-revealing)."""
    upper, pivots, rank, info = scipy.linalg.lapack.dpstrf((sigma + sigma.T) / 2)
    if info < 0:
        raise ValueError(f"dpstrf rejected the covariance (argument {-info}); is it a finite square matrix?")
    factor = np.zeros((len(sigma), rank))
    factor[pivots - 1] = np.triu(upper)[:rank].T  # Pᵀ Σ P = Uᵀ U
    return factor


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Mean over consecutive splits of exp(mean KL(p(y|x) ‖ p(y))); logits (N, classes) before the softmax."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start:start + split_size]
        log_marginal = torch.logsumexp(part, dim=0) - np.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(R, D), (C, D) → (R, C) squared Euclidean distances, clipped at 0 like ADM's `_batch_pairwise_distances`."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min_(0)


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURS, row_batch: int = 4096) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the same set (the point itself excluded)."""
    if len(features) <= k:
        raise ValueError(f"a k-NN manifold with k={k} needs more than {k} points, got {len(features)}")
    radii = []
    for start in range(0, len(features), row_batch):
        dist = _squared_distances(features[start:start + row_batch], features)
        radii.append(dist.topk(k + 1, dim=1, largest=False).values[:, k])  # index 0 is the point itself
    return torch.cat(radii)


def inside_manifold(points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor,
                    row_batch: int = 4096) -> torch.Tensor:
    """Boolean per point: within radii[j] of some manifold point j (ADM's `less_thans`, `<=`)."""
    inside = []
    for start in range(0, len(points), row_batch):
        dist = _squared_distances(points[start:start + row_batch], manifold)
        inside.append((dist <= radii[None]).any(dim=1))
    return torch.cat(inside)


def precision_recall(reference: np.ndarray | torch.Tensor, samples: np.ndarray | torch.Tensor,
                     k: int = PR_NEIGHBOURS, device: str | torch.device = "cpu",
                     row_batch: int = 4096) -> tuple[float, float]:
    """Precision: share of samples inside the reference manifold; recall: share of references inside the
    sample manifold (ADM's `compute_prec_recall`, in float32 rather than its float16 distance blocks)."""
    ref = torch.as_tensor(np.asarray(reference), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(samples), dtype=torch.float32, device=device)
    ref_radii, fake_radii = manifold_radii(ref, k, row_batch), manifold_radii(fake, k, row_batch)
    precision = inside_manifold(fake, ref, ref_radii, row_batch).double().mean().item()
    recall = inside_manifold(ref, fake, fake_radii, row_batch).double().mean().item()
    return precision, recall
