"""Metrics against the truth (confounder mode) and of mixing and conservation (integrate mode)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def columnwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r between matching columns of two (cells x genes) arrays; NaN for constant ones."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a0 = a - a.mean(axis=0)
    b0 = b - b.mean(axis=0)
    den = np.sqrt((a0 ** 2).sum(axis=0) * (b0 ** 2).sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (a0 * b0).sum(axis=0) / den, np.nan)


def match_latents(z_hat: np.ndarray, z_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z is identified only up to sign and permutation: pair each true column with the estimated
    column of largest |r| (Hungarian matching for k > 1). Returns (order, signed r per true column).
    """
    k_hat, k = z_hat.shape[1], z_true.shape[1]
    r = np.zeros((k, k_hat))
    for i in range(k):
        for j in range(k_hat):
            r[i, j] = np.nan_to_num(columnwise_pearson(z_true[:, [i]], z_hat[:, [j]])[0])
    rows, cols = linear_sum_assignment(-np.abs(r))
    order = np.full(k, -1)
    order[rows] = cols
    signed = np.array([r[i, order[i]] if order[i] >= 0 else np.nan for i in range(k)])
    return order, signed


def auroc_matched(z_prob: np.ndarray, z_true: np.ndarray, order: np.ndarray,
                  signs: np.ndarray) -> list[float]:
    """AUROC of each matched Z probability for its true binary Z (sign-flipped where r < 0)."""
    from sklearn.metrics import roc_auc_score

    out = []
    for i, j in enumerate(order):
        truth = z_true[:, i]
        if j < 0 or len(np.unique(truth)) < 2:
            out.append(float("nan"))
            continue
        score = z_prob[:, j] if signs[i] >= 0 else 1.0 - z_prob[:, j]
        out.append(float(roc_auc_score(truth, score)))
    return out


def ols_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(slope, intercept, Pearson r) of the least-squares line of y on x."""
    x = np.asarray(x, float).ravel()
    y = np.asarray(y, float).ravel()
    if x.std() == 0 or y.std() == 0:
        return 0.0, float(y.mean()), float("nan")
    r = float(np.corrcoef(x, y)[0, 1])
    slope = r * y.std() / x.std()
    return float(slope), float(y.mean() - slope * x.mean()), r
